//! `swaptest`: a plugin for hot-swap tests and benchmarks. It is built twice
//! from this source: `swaptest` (describes itself as 1.0.0) and `swaptest-v2`
//! (2.0.0), with the same name and kind (`Swap`), so that either can be swapped
//! in for the other.
//!
//! A `Swap` object's spec says how many calls its key takes and how each ends:
//!
//! ```yaml
//! kind: Swap
//! metadata: {name: a}
//! spec: {mode: requeue, n: 3, delay-ms: 20}   # mode: plain | requeue | retry
//! ```
//!
//! (`record: false` in the spec skips the key-value evidence below and the
//! status's list of versions, so that repeated calls cost the same.)
//!
//! - `plain`: every call succeeds (`n` is ignored: one call).
//! - `requeue`: succeeds asking to be called again after `delay-ms`, until the
//!   `n`th call, which succeeds for good.
//! - `retry`: fails with `retry-after` `delay-ms` until the `n`th call, which
//!   succeeds.
//!
//! Which call it is comes from the state the host hands back (`calls`, reset
//! when the generation changes), so a host that lost or repeated work would
//! show it as a wrong number of calls.
//!
//! Every call leaves evidence in the plugin's key-value store, where no write
//! is ever lost to a concurrent one (each call writes keys of its own):
//!
//! - `call/<key>/<start-µs>-<instance>-<seq>`: a JSON [`Record`]: the version
//!   that ran the call, the instance (a random id drawn when the instance
//!   starts: a host's warm instance, so one per worker and version), when the
//!   call started and ended (µs of the wall clock), which call of the key it
//!   was, and how many other calls of the same key it saw running.
//! - `busy/<key>/<instance>-<seq>`: set for the length of the call. A call
//!   that finds another call's mark for its key, at its start or just before
//!   its end, has run concurrently with it and says so in its record
//!   (`overlaps`) and under `overlap/<key>/...`.
//!
//! The object's status says the same for people: the version of the last call,
//! the versions of every call of this generation in order, and when the last
//! call started.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use setpoint_sdk::{Error, Host, Info, Outcome, Reconciler, Request};

/// What a `Swap` object asks for.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Plain,
    Requeue,
    Retry,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub mode: Mode,
    /// How many calls the key takes (at least 1).
    #[serde(default = "one")]
    pub n: u32,
    /// The requeue-after or retry-after delay.
    #[serde(default = "twenty")]
    pub delay_ms: u64,
    /// Keep the per-call evidence in the key-value store (`false`: only the
    /// status, for benchmarks that measure the host rather than the plugin).
    #[serde(default = "yes")]
    pub record: bool,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn twenty() -> u64 {
    20
}

impl Spec {
    /// The calls a key with this spec takes, start to done.
    pub fn calls(&self) -> u32 {
        match self.mode {
            Mode::Plain => 1,
            Mode::Requeue | Mode::Retry => self.n.max(1),
        }
    }
}

/// One call, as kept under `call/<key>/...`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The version that ran the call (`describe()`'s).
    pub version: String,
    /// The instance that ran it.
    pub instance: String,
    /// The call's number on that instance, from 0.
    pub seq: u64,
    /// The call's number for this key and generation, from 0.
    pub call: u32,
    pub generation: u64,
    pub action: String,
    pub attempt: u32,
    /// Wall clock, µs since the Unix epoch.
    pub start_us: u64,
    pub end_us: u64,
    /// Other calls of the same key seen running during this one.
    pub overlaps: usize,
}

#[derive(Default)]
pub struct SwapTest;

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A random id for this instance (its memory is fresh when the host starts it,
/// so the id is drawn once per instance).
fn instance() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
        format!("{random:016x}")
    })
}

/// Calls made on this instance so far.
fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Calls of `key` running now, other than this one (marked `mark`).
fn others_running(host: &dyn Host, key: &str, mark: &str) -> usize {
    host.kv_keys(&format!("busy/{key}/"))
        .iter()
        .filter(|k| k.as_str() != mark)
        .count()
}

impl Reconciler for SwapTest {
    type Spec = Spec;
    type Status = serde_json::Value;

    fn describe(&self) -> Info {
        Info::new("swaptest", VERSION, ["Swap"])
    }

    fn reconcile(
        &self,
        host: &dyn Host,
        req: Request<Spec>,
    ) -> Result<Outcome<serde_json::Value>, Error> {
        if req.object.deleting {
            return Ok(Outcome::done());
        }
        let start_us = now_us();
        let (instance, seq) = (instance(), next_seq());
        let record = req.spec.record;
        let mark = format!("busy/{}/{instance}-{seq}", req.key);
        let mut overlaps = 0;
        if record {
            host.kv_set(&mark, b"");
            overlaps += others_running(host, &req.key, &mark);
        }

        let generation = req.object.generation;
        let same_generation = req.state.get("generation") == Some(&generation.to_string());
        let call: u32 = match req.state.get("calls") {
            Some(calls) if same_generation => calls.parse().unwrap_or(0),
            _ => 0,
        };
        let last = call + 1 >= req.spec.calls();
        let mut status = serde_json::json!({
            "version": VERSION,
            "calls": call + 1,
            "started-us": start_us,
            "done": last,
        });
        if record {
            let mut versions: Vec<serde_json::Value> = req
                .object
                .status
                .as_ref()
                .filter(|_| call > 0)
                .and_then(|s| s["versions"].as_array().cloned())
                .unwrap_or_default();
            versions.push(VERSION.into());
            status["versions"] = versions.into();
        }
        let (kind, ns, name) = (&req.object.kind, &req.object.namespace, &req.object.name);
        if let Err(e) = host.set_status(kind, ns, name, &status) {
            if record {
                host.kv_delete(&mark);
            }
            return Err(Error::retry(format!("cannot write the status: {e}")));
        }

        if record {
            overlaps += others_running(host, &req.key, &mark);
            let record = Record {
                version: VERSION.into(),
                instance: instance.into(),
                seq,
                call,
                generation,
                action: format!("{:?}", req.action).to_lowercase(),
                attempt: req.attempt,
                start_us,
                end_us: now_us(),
                overlaps,
            };
            let id = format!("{start_us:020}-{instance}-{seq}");
            let json = serde_json::to_vec(&record).expect("a record encodes");
            host.kv_set(&format!("call/{}/{id}", req.key), &json);
            if overlaps > 0 {
                host.kv_set(&format!("overlap/{}/{id}", req.key), &json);
            }
            host.kv_delete(&mark);
        }

        let calls = (call + 1).to_string();
        let generation = generation.to_string();
        let delay = std::time::Duration::from_millis(req.spec.delay_ms);
        match req.spec.mode {
            _ if last => Ok(Outcome::done()
                .with_state("calls", calls)
                .with_state("generation", generation)),
            Mode::Requeue => Ok(Outcome::done()
                .requeue_after(delay)
                .with_state("calls", calls)
                .with_state("generation", generation)),
            Mode::Retry => Err(Error::retry_after(
                delay,
                format!("call {} of {}", call + 1, req.spec.n),
            )
            .with_state("calls", calls)
            .with_state("generation", generation)),
            Mode::Plain => unreachable!("a plain key's only call is its last"),
        }
    }
}

setpoint_sdk::export!(SwapTest);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use setpoint_sdk::testing::FakeHost;
    use setpoint_sdk::{Action, ErrorKind, Object};

    fn records(host: &FakeHost, key: &str) -> Vec<Record> {
        host.kv_keys(&format!("call/{key}/"))
            .iter()
            .map(|k| serde_json::from_slice(&host.kv_get(k).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_requeue_key_takes_n_calls_and_records_each() {
        let host = FakeHost::new();
        let obj = Object::new("Swap", "a", json!({"mode": "requeue", "n": 3}));
        for i in 0..3 {
            let outcome = host.reconcile(&SwapTest, Action::Resynced, &obj).unwrap();
            assert_eq!(outcome.requeue_after.is_some(), i < 2, "call {i}");
        }
        let calls: Vec<u32> = records(&host, "Swap:a").iter().map(|r| r.call).collect();
        assert_eq!(calls, [0, 1, 2]);
        let status = host.object("Swap", "", "a").unwrap().status.unwrap();
        assert_eq!(status["versions"], json!([VERSION, VERSION, VERSION]));
        assert_eq!(status["done"], true);
        assert!(host.kv_keys("busy/").is_empty());
        assert!(host.kv_keys("overlap/").is_empty());
    }

    #[test]
    fn a_retry_key_fails_with_retry_after_until_its_last_call() {
        let host = FakeHost::new();
        let obj = Object::new("Swap", "b", json!({"mode": "retry", "n": 2, "delay-ms": 7}));
        let first = host
            .reconcile(&SwapTest, Action::Created, &obj)
            .unwrap_err();
        assert_eq!(
            first.kind,
            ErrorKind::RetryAfter(std::time::Duration::from_millis(7))
        );
        host.reconcile(&SwapTest, Action::Resynced, &obj).unwrap();
        assert_eq!(records(&host, "Swap:b").len(), 2);
    }

    #[test]
    fn another_calls_mark_on_the_key_is_recorded_as_an_overlap() {
        let host = FakeHost::new();
        host.kv_set("busy/Swap:c/someone-else", b"");
        let obj = Object::new("Swap", "c", json!({}));
        host.reconcile(&SwapTest, Action::Created, &obj).unwrap();
        assert_eq!(records(&host, "Swap:c")[0].overlaps, 2);
        assert_eq!(host.kv_keys("overlap/Swap:c/").len(), 1);
    }

    #[test]
    fn record_false_keeps_only_the_status() {
        let host = FakeHost::new();
        let obj = Object::new("Swap", "d", json!({"record": false}));
        host.reconcile(&SwapTest, Action::Created, &obj).unwrap();
        assert!(host.kv_keys("").is_empty());
        let status = host.object("Swap", "", "d").unwrap().status.unwrap();
        assert_eq!(status["version"], VERSION);
        assert!(status.get("versions").is_none());
    }
}
