//! `hello`: the smallest useful plugin. It reconciles `Greeting` objects by writing
//! a greeting into their status, and counts greetings in its key-value store.

use serde::{Deserialize, Serialize};
use setpoint_sdk::{Error, Host, Info, Level, Outcome, Reconciler, Request};

#[derive(Deserialize)]
pub struct Spec {
    pub who: String,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Status {
    pub greeting: String,
    pub greeted: u64,
}

#[derive(Default)]
pub struct Hello;

impl Reconciler for Hello {
    type Spec = Spec;
    type Status = Status;

    fn describe(&self) -> Info {
        Info::new("hello", env!("CARGO_PKG_VERSION"), ["Greeting"])
    }

    fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
        if req.object.deleting {
            host.log(Level::Info, "goodbye", &[("who", &req.spec.who)]);
            return Ok(Outcome::done());
        }
        let greeted = host
            .kv_get("greeted")
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        host.kv_set("greeted", greeted.to_string().as_bytes());
        let greeting = format!("Hello, {}!", req.spec.who);
        host.log(Level::Info, &greeting, &[("greeted", &greeted.to_string())]);
        Ok(Outcome::done().with_status(Status { greeting, greeted }))
    }
}

setpoint_sdk::export!(Hello);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use setpoint_sdk::testing::FakeHost;
    use setpoint_sdk::{Action, Object};

    #[test]
    fn hello_greets_and_counts() {
        let host = FakeHost::new();
        let a = Object::new("Greeting", "a", json!({"who": "world"}));
        let b = Object::new("Greeting", "b", json!({"who": "you"}));
        host.reconcile(&Hello, Action::Created, &a).unwrap();
        let outcome = host.reconcile(&Hello, Action::Created, &b).unwrap();
        assert_eq!(
            outcome.status,
            Some(Status {
                greeting: "Hello, you!".into(),
                greeted: 2
            })
        );
        assert_eq!(
            host.object("Greeting", "", "a").unwrap().status.unwrap()["greeting"],
            "Hello, world!"
        );
        assert!(
            host.logs()
                .iter()
                .any(|(_, l)| l.starts_with("Hello, world!"))
        );
    }

    #[test]
    fn a_greeting_whose_spec_does_not_decode_can_still_be_deleted() {
        let host = FakeHost::new();
        let bad = Object::new("Greeting", "x", json!({"who": 5}));
        let err = host.reconcile(&Hello, Action::Created, &bad).unwrap_err();
        assert_eq!(err.kind, setpoint_sdk::ErrorKind::Fatal);
        assert_eq!(
            err.message,
            "the spec of Greeting:x is invalid: spec.who: invalid type: integer `5`, expected a string"
        );
        assert_eq!(
            host.reconcile(&Hello, Action::Deleted, &bad).unwrap(),
            Outcome::done()
        );
    }

    #[test]
    fn admission_names_the_field() {
        let host = FakeHost::new();
        let good = Object::new("Greeting", "a", json!({"who": "world"}));
        assert_eq!(host.validate(&Hello, &good), Ok(()));
        let bad = Object::new("Greeting", "x", json!({"who": 5}));
        assert_eq!(
            host.validate(&Hello, &bad),
            Err("spec.who: invalid type: integer `5`, expected a string".into())
        );
        let missing = Object::new("Greeting", "y", json!({}));
        assert_eq!(
            host.validate(&Hello, &missing),
            Err("spec: missing field `who`".into())
        );
    }
}
