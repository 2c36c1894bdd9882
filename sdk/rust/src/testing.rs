//! Native unit tests for plugins: [`FakeHost`] is an in-memory stand-in for the
//! Setpoint host, so a [`Reconciler`] can be tested with `cargo test`, no Wasm.
//!
//! [`FakeHost::reconcile`] goes through the same steps as the real host: the spec
//! is decoded (a bad one is a fatal error naming the field, except on a delete,
//! which goes to [`Reconciler::delete_invalid`]), the state from the last call for
//! the key is handed back, and a returned status is written to the object.
//! [`FakeHost::validate`] runs admission as the component's `admission.validate`
//! does.
//!
//! ```
//! # use setpoint_sdk::{Action, Error, Host, Info, Object, Outcome, Reconciler, Request};
//! # use setpoint_sdk::testing::FakeHost;
//! # #[derive(serde::Deserialize)] struct Spec { who: String }
//! # #[derive(serde::Serialize)] struct Status { greeting: String }
//! # struct Hello;
//! # impl Reconciler for Hello {
//! #     type Spec = Spec;
//! #     type Status = Status;
//! #     fn describe(&self) -> Info { Info::new("hello", "1.0.0", ["Greeting"]) }
//! #     fn reconcile(&self, _: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
//! #         Ok(Outcome::done().with_status(Status { greeting: format!("Hello, {}!", req.spec.who) }))
//! #     }
//! # }
//! let host = FakeHost::new();
//! let obj = Object::new("Greeting", "a", serde_json::json!({"who": "world"}));
//! let outcome = host.reconcile(&Hello, Action::Created, &obj).unwrap();
//! assert_eq!(host.object("Greeting", "", "a").unwrap().status.unwrap()["greeting"], "Hello, world!");
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use crate::http::{HttpError, Request as HttpRequest, Response as HttpResponse};
use crate::{
    Action, Error, Host, Level, Object, Outcome, Reconciler, State, call_reconcile, validate_object,
};

/// How a [`FakeHost`] answers HTTP requests.
type HttpHandler = Box<dyn Fn(&HttpRequest) -> Result<HttpResponse, HttpError>>;

/// An in-memory host: objects, key-value data, logs and a settable clock.
#[derive(Default)]
pub struct FakeHost {
    objects: RefCell<BTreeMap<String, Object>>,
    kv: RefCell<BTreeMap<String, Vec<u8>>>,
    logs: RefCell<Vec<(Level, String)>>,
    states: RefCell<BTreeMap<String, (u32, State)>>,
    now: Cell<u64>,
    drift: RefCell<Vec<String>>,
    http: RefCell<Option<HttpHandler>>,
    sent: RefCell<Vec<HttpRequest>>,
}

impl FakeHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answer the plugin's HTTP requests with `handler` (without one, every
    /// request fails with [`HttpError::Unavailable`]).
    pub fn on_http(
        &self,
        handler: impl Fn(&HttpRequest) -> Result<HttpResponse, HttpError> + 'static,
    ) {
        *self.http.borrow_mut() = Some(Box::new(handler));
    }

    /// Every HTTP request the plugin sent, in order.
    pub fn sent(&self) -> Vec<HttpRequest> {
        self.sent.borrow().clone()
    }

    /// Store an object (replacing one with the same key).
    pub fn put(&self, object: Object) {
        self.objects.borrow_mut().insert(object.key(), object);
    }

    /// An object as the fake store has it now, status included.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Object> {
        let probe = Object {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            ..Object::default()
        };
        self.objects.borrow().get(&probe.key()).cloned()
    }

    /// Every message logged so far.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }

    /// Set what `now_ms` returns.
    pub fn set_now(&self, ms: u64) {
        self.now.set(ms);
    }

    /// Reconcile `object` as the host would: store it, decode its spec, hand back
    /// the state and attempt count from the last call for its key, and write the
    /// returned status to it. A delete whose spec does not decode goes to the
    /// plugin's [`Reconciler::delete_invalid`], as in a component.
    pub fn reconcile<R: Reconciler>(
        &self,
        plugin: &R,
        action: Action,
        object: &Object,
    ) -> Result<Outcome<R::Status>, Error> {
        let key = object.key();
        let mut object = object.clone();
        object.deleting = object.deleting || action == Action::Deleted;
        if let Some(old) = self.objects.borrow().get(&key) {
            object.status = object.status.or_else(|| old.status.clone());
        }
        self.put(object.clone());
        let (attempt, state) = self.states.borrow().get(&key).cloned().unwrap_or_default();
        let result = call_reconcile(plugin, self, key.clone(), action, object, attempt, state);
        let mut states = self.states.borrow_mut();
        match &result {
            Ok(outcome) => {
                states.insert(key.clone(), (0, outcome.state.clone()));
                if let Some(status) = &outcome.status {
                    let value = serde_json::to_value(status)
                        .map_err(|e| Error::fatal(format!("cannot encode status: {e}")))?;
                    if let Some(o) = self.objects.borrow_mut().get_mut(&key) {
                        o.status = Some(value);
                    }
                }
            }
            Err(e) => {
                states.insert(key.clone(), (attempt + 1, e.state.clone()));
            }
        }
        result
    }

    /// Admission, as the host asks the component before storing `object`: decode
    /// its spec into the plugin's `Spec` (`Err` names the field, `spec.who: ...`),
    /// then the plugin's [`Reconciler::validate`]. Stores nothing.
    pub fn validate<R: Reconciler>(&self, plugin: &R, object: &Object) -> Result<(), String> {
        validate_object(plugin, object)
    }

    /// Call `prune` with the keys of every object the fake store holds.
    pub fn prune<R: Reconciler>(&self, plugin: &R) -> Result<(), Error> {
        let keys: Vec<String> = self.objects.borrow().keys().cloned().collect();
        plugin.prune(self, &keys)
    }

    /// Every drift the plugin reported, oldest first.
    pub fn drift(&self) -> Vec<String> {
        self.drift.borrow().clone()
    }

    /// Remove an object, as the host does after a successful delete.
    pub fn remove(&self, object: &Object) {
        self.objects.borrow_mut().remove(&object.key());
    }
}

impl Host for FakeHost {
    fn http(&self, request: &HttpRequest) -> Result<HttpResponse, HttpError> {
        self.sent.borrow_mut().push(request.clone());
        match &*self.http.borrow() {
            Some(handler) => handler(request),
            None => Err(HttpError::Unavailable),
        }
    }

    fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
        let mut line = message.to_string();
        for (k, v) in fields {
            line.push_str(&format!(" {k}={v}"));
        }
        self.logs.borrow_mut().push((level, line));
    }

    fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Object> {
        self.object(kind, namespace, name)
    }

    fn list(&self, kind: &str, selector: &[(&str, &str)]) -> Vec<Object> {
        self.objects
            .borrow()
            .values()
            .filter(|o| o.kind == kind)
            .filter(|o| {
                selector
                    .iter()
                    .all(|(k, v)| o.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .cloned()
            .collect()
    }

    fn set_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        status: &serde_json::Value,
    ) -> Result<(), String> {
        let probe = Object {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            ..Object::default()
        };
        match self.objects.borrow_mut().get_mut(&probe.key()) {
            Some(o) => {
                o.status = Some(status.clone());
                Ok(())
            }
            None => Err(format!("object {} not found", probe.key())),
        }
    }

    fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.kv.borrow().get(key).cloned()
    }

    fn kv_set(&self, key: &str, value: &[u8]) {
        self.kv.borrow_mut().insert(key.into(), value.to_vec());
    }

    fn kv_delete(&self, key: &str) {
        self.kv.borrow_mut().remove(key);
    }

    fn kv_keys(&self, prefix: &str) -> Vec<String> {
        self.kv
            .borrow()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.now.get()
    }

    fn report_drift(&self, detail: &str) {
        self.drift.borrow_mut().push(detail.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Info;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Deserialize)]
    struct Spec {
        fail: bool,
    }

    #[derive(Serialize, Debug, PartialEq)]
    struct Status {
        attempt: u32,
    }

    #[derive(Default)]
    struct Flaky;

    impl Reconciler for Flaky {
        type Spec = Spec;
        type Status = Status;
        fn describe(&self) -> Info {
            Info::new("flaky", "0.0.0", ["Thing"])
        }
        fn reconcile(
            &self,
            _: &dyn Host,
            req: crate::Request<Spec>,
        ) -> Result<Outcome<Status>, Error> {
            let seen = req.state.get("seen").cloned().unwrap_or_default();
            if req.spec.fail {
                return Err(Error::retry("asked to fail").with_state("seen", format!("{seen}x")));
            }
            Ok(Outcome::done()
                .with_status(Status {
                    attempt: req.attempt,
                })
                .with_state("seen", seen))
        }
    }

    #[test]
    fn fake_host_hands_back_state_and_attempts_across_failures() {
        let host = FakeHost::new();
        let failing = Object::new("Thing", "a", json!({"fail": true}));
        for _ in 0..2 {
            assert_eq!(
                host.reconcile(&Flaky, Action::Created, &failing)
                    .unwrap_err()
                    .kind,
                crate::ErrorKind::Retry
            );
        }
        let fixed = Object::new("Thing", "a", json!({"fail": false}));
        let outcome = host.reconcile(&Flaky, Action::Updated, &fixed).unwrap();
        assert_eq!(outcome.state.get("seen").map(String::as_str), Some("xx"));
        assert_eq!(
            host.object("Thing", "", "a").unwrap().status,
            Some(json!({"attempt": 2}))
        );
    }

    #[test]
    fn fake_host_refuses_a_spec_that_does_not_decode_naming_the_field() {
        let host = FakeHost::new();
        let bad = Object::new("Thing", "a", json!({"fail": "yes"}));
        for action in [Action::Created, Action::Updated, Action::Resynced] {
            let err = host.reconcile(&Flaky, action, &bad).unwrap_err();
            assert_eq!(err.kind, crate::ErrorKind::Fatal);
            assert_eq!(
                err.message,
                "the spec of Thing:a is invalid: spec.fail: invalid type: string \"yes\", expected a boolean"
            );
        }
        let missing = Object::new("Thing", "b", json!({}));
        let err = host
            .reconcile(&Flaky, Action::Created, &missing)
            .unwrap_err();
        assert_eq!(
            err.message,
            "the spec of Thing:b is invalid: spec: missing field `fail`"
        );
    }

    #[test]
    fn a_delete_with_a_spec_that_does_not_decode_succeeds_by_default() {
        let host = FakeHost::new();
        let bad = Object::new("Thing", "a", json!({"fail": 5}));
        let outcome = host.reconcile(&Flaky, Action::Deleted, &bad).unwrap();
        assert_eq!(outcome, Outcome::done());
        let logs = host.logs();
        let (level, line) = logs.last().unwrap();
        assert_eq!(*level, Level::Warn);
        assert!(line.contains("key=Thing:a"), "{line}");
        assert!(
            line.contains("spec.fail: invalid type: integer `5`"),
            "{line}"
        );
        // A retried delete (object.deleting, another action) goes the same way.
        let deleting = Object {
            deleting: true,
            ..bad
        };
        assert!(host.reconcile(&Flaky, Action::Resynced, &deleting).is_ok());
    }

    /// Records the deletes it is handed with a spec that does not decode, and
    /// refuses specs that ask to fail in its own admission rule.
    #[derive(Default)]
    struct Careful {
        deletes: RefCell<Vec<(serde_json::Value, String, State)>>,
    }

    impl Reconciler for Careful {
        type Spec = Spec;
        type Status = Status;
        fn describe(&self) -> Info {
            Info::new("careful", "0.0.0", ["Thing"])
        }
        fn reconcile(
            &self,
            _: &dyn Host,
            req: crate::Request<Spec>,
        ) -> Result<Outcome<Status>, Error> {
            Ok(Outcome::done().with_state("made", req.key))
        }
        fn delete_invalid(
            &self,
            _: &dyn Host,
            req: crate::Request<serde_json::Value>,
            error: &str,
        ) -> Result<Outcome<Status>, Error> {
            assert_eq!(req.action, Action::Deleted);
            self.deletes
                .borrow_mut()
                .push((req.spec, error.to_string(), req.state));
            Ok(Outcome::done())
        }
        fn validate(&self, object: &Object, spec: &Spec) -> Result<(), String> {
            if spec.fail && !object.labels.contains_key("allow-failure") {
                return Err("spec.fail: needs the label allow-failure".into());
            }
            Ok(())
        }
    }

    #[test]
    fn a_delete_with_a_spec_that_does_not_decode_reaches_the_plugin_with_the_raw_spec() {
        let host = FakeHost::new();
        let plugin = Careful::default();
        let good = Object::new("Thing", "a", json!({"fail": false}));
        host.reconcile(&plugin, Action::Created, &good).unwrap();
        let bad = Object::new("Thing", "a", json!({"fail": {"no": 1}}));
        assert!(host.reconcile(&plugin, Action::Deleted, &bad).is_ok());
        let deletes = plugin.deletes.borrow();
        assert_eq!(deletes.len(), 1);
        let (spec, error, state) = &deletes[0];
        assert_eq!(spec, &json!({"fail": {"no": 1}}));
        assert_eq!(error, "spec.fail: invalid type: map, expected a boolean");
        assert_eq!(state.get("made").map(String::as_str), Some("Thing:a"));
        assert!(host.object("Thing", "", "a").unwrap().deleting);
    }

    #[test]
    fn validate_admits_a_good_spec_and_refuses_a_bad_one_naming_the_field() {
        let host = FakeHost::new();
        let plugin = Careful::default();
        let good = Object::new("Thing", "a", json!({"fail": false}));
        assert_eq!(host.validate(&plugin, &good), Ok(()));
        let bad = Object::new("Thing", "a", json!({"fail": 5}));
        assert_eq!(
            host.validate(&plugin, &bad),
            Err("spec.fail: invalid type: integer `5`, expected a boolean".into())
        );
        let not_a_map = Object::new("Thing", "a", json!("yes"));
        assert_eq!(
            host.validate(&plugin, &not_a_map),
            Err("spec: invalid type: string \"yes\", expected struct Spec".into())
        );
        // serde reads a struct from a sequence too: the element is named.
        let a_list = Object::new("Thing", "a", json!([1]));
        assert_eq!(
            host.validate(&plugin, &a_list),
            Err("spec[0]: invalid type: integer `1`, expected a boolean".into())
        );
        // The plugin's own rule runs after the spec decoded.
        let asks_to_fail = Object::new("Thing", "a", json!({"fail": true}));
        assert_eq!(
            host.validate(&plugin, &asks_to_fail),
            Err("spec.fail: needs the label allow-failure".into())
        );
        let mut allowed = asks_to_fail.clone();
        allowed.labels.insert("allow-failure".into(), "yes".into());
        assert_eq!(host.validate(&plugin, &allowed), Ok(()));
        // Without a rule of its own, a plugin admits every spec that decodes.
        assert_eq!(host.validate(&Flaky, &asks_to_fail), Ok(()));
        // Admission stores nothing.
        assert!(host.object("Thing", "", "a").is_none());
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Nested {
        items: Vec<Item>,
    }
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        port: u16,
    }

    #[test]
    fn decode_spec_names_nested_fields() {
        let err = crate::decode_spec::<Nested>(&json!({"items": [{"port": 1}, {"port": 70000}]}))
            .unwrap_err();
        assert_eq!(
            err,
            "spec.items[1].port: invalid value: integer `70000`, expected u16"
        );
    }
}
