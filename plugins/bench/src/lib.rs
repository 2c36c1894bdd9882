//! `bench`: the logic the host benchmarks measure, as a plugin and as a native
//! library, so the two can be compared call for call.
//!
//! - `Noop` objects: do nothing.
//! - `Work` objects: decode a ~1 KB spec of services, compute the desired
//!   placement (replicas per zone, sorted), and encode it as the status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use setpoint_sdk::{Error, Host, Info, Outcome, Reconciler, Request};

#[derive(Deserialize)]
pub struct Service {
    pub name: String,
    pub image: String,
    pub replicas: u32,
    pub zones: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Spec {
    Work { services: Vec<Service> },
    Noop {},
}

#[derive(Serialize, Default, Debug, PartialEq)]
pub struct Status {
    pub total_replicas: u32,
    pub placement: BTreeMap<String, Vec<String>>,
    pub images: Vec<String>,
}

#[derive(Default)]
pub struct Bench;

/// The desired state for a set of services: each replica placed round-robin over
/// its zones.
pub fn plan(services: &[Service]) -> Status {
    let mut status = Status::default();
    for s in services {
        status.total_replicas += s.replicas;
        for i in 0..s.replicas {
            if s.zones.is_empty() {
                continue;
            }
            let zone = &s.zones[i as usize % s.zones.len()];
            status
                .placement
                .entry(zone.clone())
                .or_default()
                .push(format!("{}-{i}", s.name));
        }
        if !status.images.contains(&s.image) {
            status.images.push(s.image.clone());
        }
    }
    status.images.sort();
    status
}

impl Reconciler for Bench {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        Info::new("bench", env!("CARGO_PKG_VERSION"), ["Noop", "Work"])
    }

    fn reconcile(&self, _host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        match req.spec {
            Spec::Noop {} => Ok(Outcome::done()),
            Spec::Work { services } => Ok(Outcome::done().with_status(plan(&services))),
        }
    }
}

setpoint_sdk::export!(Bench);

/// A ~1 KB `Work` spec.
pub fn sample_spec() -> serde_json::Value {
    let services: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            serde_json::json!({
                "name": format!("service-{i}"),
                "image": format!("registry.example.com/team/app-{}:1.4.0", i % 3),
                "replicas": 3 + i,
                "zones": ["eu-west-1a", "eu-west-1b", "eu-west-1c"],
                "env": { "LOG_LEVEL": "info", "REGION": "eu-west-1" }
            })
        })
        .collect();
    serde_json::json!({ "services": services })
}

#[cfg(test)]
mod tests {
    use super::*;
    use setpoint_sdk::testing::FakeHost;
    use setpoint_sdk::{Action, Object};

    #[test]
    fn sample_spec_is_about_a_kilobyte() {
        let len = sample_spec().to_string().len();
        assert!((800..1400).contains(&len), "{len}");
    }

    #[test]
    fn plan_places_every_replica() {
        let host = FakeHost::new();
        let obj = Object::new("Work", "w", sample_spec());
        let status = host
            .reconcile(&Bench, Action::Created, &obj)
            .unwrap()
            .status
            .unwrap();
        assert_eq!(status.total_replicas, (3..9).sum::<u32>());
        let placed: usize = status.placement.values().map(Vec::len).sum();
        assert_eq!(placed as u32, status.total_replicas);
        assert_eq!(status.images.len(), 3);
    }
}
