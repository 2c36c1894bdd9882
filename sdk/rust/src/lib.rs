//! # setpoint-sdk: write Setpoint reconcilers in Rust
//!
//! A plugin implements [`Reconciler`] and calls [`export!`] once:
//!
//! ```
//! use setpoint_sdk::{Host, Info, Outcome, Reconciler, Request, Error};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Spec { who: String }
//!
//! #[derive(Serialize)]
//! struct Status { greeting: String }
//!
//! #[derive(Default)]
//! struct Hello;
//!
//! impl Reconciler for Hello {
//!     type Spec = Spec;
//!     type Status = Status;
//!
//!     fn describe(&self) -> Info {
//!         Info::new("hello", env!("CARGO_PKG_VERSION"), ["Greeting"])
//!     }
//!
//!     fn reconcile(&self, host: &dyn Host, req: Request<Spec>) -> Result<Outcome<Status>, Error> {
//!         let greeting = format!("Hello, {}!", req.spec.who);
//!         host.log(setpoint_sdk::Level::Info, &greeting, &[]);
//!         Ok(Outcome::done().with_status(Status { greeting }))
//!     }
//! }
//!
//! setpoint_sdk::export!(Hello);
//! ```
//!
//! The spec arrives decoded into `Spec`, and the status is encoded from `Status`.
//! Everything the plugin does to the world goes through [`Host`], so
//! [`testing::FakeHost`] can stand in for the real host in native unit tests: no
//! Wasm, no Setpoint host needed.
//!
//! ## Rounds
//!
//! The component also exports `batch-reconciler` (WIT world
//! `plugin-with-batch`, since 0.1.3): the host hands it a round of the keys
//! already queued for one worker (up to the plugin's `round-size`) in one call,
//! and the SDK runs [`Reconciler::reconcile`] for each, in order. Nothing
//! changes for the plugin's author: each request is decoded, reconciled and
//! answered as if it came alone, and the host settles each key on its own
//! (status, retries, state). What a round saves is the host's cost per call
//! (entering the instance, copying the request in and the answer out), which
//! matters for reconciles that do little work each.
//!
//! A hand-written batch method pays off when the world takes many objects at
//! once: one API request, one transaction or one file write for a round
//! instead of one per object (Cilium statedb's `BatchOperations`). The SDK
//! does not offer one yet; a plugin that needs it implements the WIT export
//! `batch-reconciler.reconcile-batch` itself.
//!
//! ## A spec that does not decode
//!
//! Error messages name the field, with serde's message:
//! `spec.who: invalid type: integer `5`, expected a string`.
//!
//! - **Admission.** The component exports `admission.validate` (WIT world
//!   `plugin-with-admission`): before the host stores an object of one of the
//!   plugin's kinds, the SDK decodes its spec into `Spec` and refuses it if that
//!   fails; then it calls [`Reconciler::validate`] for rules serde cannot express
//!   (the default admits everything that decodes).
//! - **Reconcile.** A create, update or resync whose spec does not decode fails as
//!   `fatal` (`the spec of Greeting:x is invalid: spec.who: ...`); the plugin is not
//!   called.
//! - **Delete.** A delete (action [`Action::Deleted`], or `object.deleting`) always
//!   reaches the plugin, so it can clean up and the host can release the object:
//!   with a spec that does not decode it goes to [`Reconciler::delete_invalid`]
//!   with the raw JSON spec instead of to `reconcile`. The default logs a warning
//!   and succeeds.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod http;
pub mod testing;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin-with-batch",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "::setpoint_sdk::bindings",
    });
}

use bindings::setpoint::reconciler::types as wit;

/// A plugin's state, handed back on its next call for the same key.
pub type State = BTreeMap<String, String>;

/// How important a log message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Why the host calls `reconcile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    /// The object was deleted: clean up. It is removed once this succeeds.
    Deleted,
    Resynced,
}

/// An object as the host stores it. `spec` and `status` are JSON.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub generation: u64,
    pub labels: BTreeMap<String, String>,
    pub spec: serde_json::Value,
    pub status: Option<serde_json::Value>,
    pub finalizers: Vec<String>,
    pub deleting: bool,
}

impl Object {
    /// A new object with a spec, for tests.
    pub fn new(kind: &str, name: &str, spec: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            name: name.into(),
            generation: 1,
            spec,
            ..Self::default()
        }
    }

    /// The key the host queues this object under: `kind:namespace/name`.
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}:{}", self.kind, self.name)
        } else {
            format!("{}:{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One reconcile: the object, its spec decoded, and the plugin's state.
#[derive(Clone, Debug)]
pub struct Request<S> {
    pub key: String,
    pub action: Action,
    pub object: Object,
    /// The object's spec, decoded.
    pub spec: S,
    /// 0 on a first attempt, 1, 2, ... on retries.
    pub attempt: u32,
    pub state: State,
}

/// A successful reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome<St> {
    pub requeue_after: Option<Duration>,
    pub state: State,
    pub status: Option<St>,
}

impl<St> Outcome<St> {
    /// Done: nothing more to do until the object changes.
    pub fn done() -> Self {
        Self {
            requeue_after: None,
            state: State::new(),
            status: None,
        }
    }

    /// Reconcile again after `after`, even if nothing changes.
    pub fn requeue_after(mut self, after: Duration) -> Self {
        self.requeue_after = Some(after);
        self
    }

    /// Write this status to the object.
    pub fn with_status(mut self, status: St) -> Self {
        self.status = Some(status);
        self
    }

    /// Keep `key = value` for the next call.
    pub fn with_state(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.state.insert(key.into(), value.into());
        self
    }
}

/// What the host should do after a failed reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retry with the host's back-off.
    Retry,
    /// Retry after this delay.
    RetryAfter(Duration),
    /// Do not retry until the object changes.
    Fatal,
}

/// A failed reconcile: what went wrong, how to retry, and state to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub state: State,
}

impl Error {
    /// A transient failure: retry with back-off.
    pub fn retry(message: impl Display) -> Self {
        Self::new(ErrorKind::Retry, message)
    }

    /// A transient failure: retry after `delay`.
    pub fn retry_after(delay: Duration, message: impl Display) -> Self {
        Self::new(ErrorKind::RetryAfter(delay), message)
    }

    /// A permanent failure: no retry until the object changes.
    pub fn fatal(message: impl Display) -> Self {
        Self::new(ErrorKind::Fatal, message)
    }

    fn new(kind: ErrorKind, message: impl Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
            state: State::new(),
        }
    }

    /// Keep `key = value` for the next attempt.
    pub fn with_state(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.state.insert(key.into(), value.into());
        self
    }
}

/// Turn any `Result` into a reconcile result: `.or_retry()?` or `.or_fatal()?`.
pub trait ResultExt<T> {
    /// On error, retry with back-off; the message is the error's, prefixed.
    fn or_retry(self, what: &str) -> Result<T, Error>;
    /// On error, fail for good.
    fn or_fatal(self, what: &str) -> Result<T, Error>;
}

impl<T, E: Display> ResultExt<T> for Result<T, E> {
    fn or_retry(self, what: &str) -> Result<T, Error> {
        self.map_err(|e| Error::retry(format!("{what}: {e}")))
    }
    fn or_fatal(self, what: &str) -> Result<T, Error> {
        self.map_err(|e| Error::fatal(format!("{what}: {e}")))
    }
}

/// What a plugin says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub version: String,
    pub kinds: Vec<String>,
    pub resync_interval: Option<Duration>,
}

impl Info {
    pub fn new<K: Into<String>>(
        name: &str,
        version: &str,
        kinds: impl IntoIterator<Item = K>,
    ) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            kinds: kinds.into_iter().map(Into::into).collect(),
            resync_interval: None,
        }
    }

    /// Ask to be called for every object at this interval.
    pub fn resync_every(mut self, interval: Duration) -> Self {
        self.resync_interval = Some(interval);
        self
    }
}

/// What the host offers a plugin. In a component these are the WIT imports; in
/// native tests, [`testing::FakeHost`].
pub trait Host {
    /// Log a message with structured fields.
    fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]);
    /// One object, if it exists.
    fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Object>;
    /// Every object of `kind` whose labels include `selector`.
    fn list(&self, kind: &str, selector: &[(&str, &str)]) -> Vec<Object>;
    /// Replace an object's status.
    fn set_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        status: &serde_json::Value,
    ) -> Result<(), String>;
    /// The plugin's private key-value store.
    fn kv_get(&self, key: &str) -> Option<Vec<u8>>;
    fn kv_set(&self, key: &str, value: &[u8]);
    fn kv_delete(&self, key: &str);
    fn kv_keys(&self, prefix: &str) -> Vec<String>;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Say that this reconcile found the world out of line with the desired
    /// state (and fixed it); full reconciliations count these as out of sync.
    fn report_drift(&self, detail: &str);
    /// Send an HTTP request and read the whole response, where the operator
    /// granted it (see [`http`]; the plugin is exported with
    /// `export!(Type, http)`). Without it: [`http::HttpError::Unavailable`].
    fn http(&self, request: &http::Request) -> Result<http::Response, http::HttpError> {
        let _ = request;
        Err(http::HttpError::Unavailable)
    }
}

/// A reconciler. One value is made with `Default` when the component starts and
/// lives as long as the instance; the host may recycle instances at any time, so
/// keep lasting state in the [`Host`]'s key-value store or the returned state.
pub trait Reconciler {
    /// The object's spec.
    type Spec: DeserializeOwned;
    /// The status this plugin writes.
    type Status: Serialize;

    /// Name, version and kinds.
    fn describe(&self) -> Info;

    /// Bring the world in line with one object.
    fn reconcile(
        &self,
        host: &dyn Host,
        request: Request<Self::Spec>,
    ) -> Result<Outcome<Self::Status>, Error>;

    /// Clean up after a deleted object whose spec does not decode into
    /// [`Self::Spec`]. A delete (action [`Action::Deleted`], or `object.deleting`)
    /// with such a spec cannot reach [`reconcile`](Self::reconcile), and must not
    /// fail for good either: the host keeps the object (and its finalizer) until a
    /// delete succeeds. So it comes here instead, with the raw JSON spec in
    /// `request.spec` and why it did not decode in `error` (naming the field, e.g.
    /// `spec.who: invalid type: integer `5`, expected a string`).
    ///
    /// The default logs a warning and succeeds, so the host removes the object.
    /// Override it if the plugin made something for this object that it can find
    /// without the typed spec (by `request.key`, `request.object.uid`, the raw spec
    /// or `request.state`). Return an error to keep the object and retry.
    fn delete_invalid(
        &self,
        host: &dyn Host,
        request: Request<serde_json::Value>,
        error: &str,
    ) -> Result<Outcome<Self::Status>, Error> {
        host.log(
            Level::Warn,
            "deleted with a spec that does not decode: nothing to clean up",
            &[("key", &request.key), ("error", error)],
        );
        Ok(Outcome::done())
    }

    /// Admission: check a spec that decoded into [`Self::Spec`] against rules
    /// serde cannot express (ranges, one field or the other, ...). The host calls
    /// the component's `admission.validate` before it stores an object of one of
    /// this plugin's kinds (create, update, apply; never delete); the SDK decodes
    /// the spec first, refusing one that does not decode with a message naming the
    /// field, then calls this. `Err(message)` refuses the write: name the field,
    /// e.g. `spec.port: must be below 65536`. It must not act on the world, so it
    /// gets no [`Host`]. The default admits every spec that decodes.
    fn validate(&self, object: &Object, spec: &Self::Spec) -> Result<(), String> {
        let _ = (object, spec);
        Ok(())
    }

    /// Remove whatever this plugin manages that is not in `desired_keys`. The
    /// default does nothing.
    fn prune(&self, host: &dyn Host, desired_keys: &[String]) -> Result<(), Error> {
        let _ = (host, desired_keys);
        Ok(())
    }
}

/// Decode a spec into `S`. On failure the message names the field, prefixed
/// with `spec`: `spec.who: invalid type: integer `5`, expected a string`, or
/// `spec: missing field `who``.
pub fn decode_spec<S: DeserializeOwned>(spec: &serde_json::Value) -> Result<S, String> {
    // An object with no spec at all: for a struct, name the fields it misses
    // rather than saying `null` is not a struct.
    if spec.is_null()
        && let Ok(decoded) = serde_json::from_value(serde_json::Value::Null)
    {
        return Ok(decoded);
    }
    let empty = serde_json::Value::Object(Default::default());
    let spec = if spec.is_null() { &empty } else { spec };
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = match path.as_str() {
            "." | "" => "spec".to_string(),
            p if p.starts_with('[') => format!("spec{p}"),
            p => format!("spec.{p}"),
        };
        format!("{field}: {}", e.inner())
    })
}

/// One reconcile, as both the component export and [`testing::FakeHost`] run it:
/// decode the spec and call [`Reconciler::reconcile`]. If the spec does not
/// decode, a delete (action [`Action::Deleted`] or `object.deleting`) goes to
/// [`Reconciler::delete_invalid`] with the raw spec; any other call fails as
/// `fatal`, naming the field, and keeps `state`.
pub fn call_reconcile<R: Reconciler>(
    plugin: &R,
    host: &dyn Host,
    key: String,
    action: Action,
    object: Object,
    attempt: u32,
    state: State,
) -> Result<Outcome<R::Status>, Error> {
    match decode_spec::<R::Spec>(&object.spec) {
        Ok(spec) => plugin.reconcile(
            host,
            Request {
                key,
                action,
                object,
                spec,
                attempt,
                state,
            },
        ),
        Err(error) if action == Action::Deleted || object.deleting => {
            let spec = object.spec.clone();
            let request = Request {
                key,
                action,
                object,
                spec,
                attempt,
                state,
            };
            plugin.delete_invalid(host, request, &error)
        }
        Err(error) => Err(
            Error::fatal(format!("the spec of {key} is invalid: {error}")).with_state_all(&state),
        ),
    }
}

/// Admission, as the component's `admission.validate` runs it: decode the spec
/// into the plugin's `Spec` (a failure names the field: `spec.who: ...`), then
/// call [`Reconciler::validate`].
pub fn validate_object<R: Reconciler>(plugin: &R, object: &Object) -> Result<(), String> {
    let spec = decode_spec::<R::Spec>(&object.spec)?;
    plugin.validate(object, &spec)
}

/// Decode a request's spec; a spec that does not fit is a fatal error naming the
/// field. (Deletes included: [`call_reconcile`] is what hands a delete with such
/// a spec to the plugin.)
pub fn decode_request<S: DeserializeOwned>(
    key: String,
    action: Action,
    object: Object,
    attempt: u32,
    state: State,
) -> Result<Request<S>, Error> {
    let spec = decode_spec(&object.spec).map_err(|e| {
        Error::fatal(format!("the spec of {key} is invalid: {e}")).with_state_all(&state)
    })?;
    Ok(Request {
        key,
        action,
        object,
        spec,
        attempt,
        state,
    })
}

impl Error {
    fn with_state_all(mut self, state: &State) -> Self {
        self.state = state.clone();
        self
    }
}

/// Encode an outcome's status as JSON; a status that does not encode is fatal.
pub fn encode_status<St: Serialize>(status: &Option<St>) -> Result<Option<String>, Error> {
    status
        .as_ref()
        .map(|s| {
            serde_json::to_string(s).map_err(|e| Error::fatal(format!("cannot encode status: {e}")))
        })
        .transpose()
}

/// Export a [`Reconciler`] type as this component's implementation. Call once, at
/// the crate root.
///
/// `export!(Type, http)` also gives it outgoing HTTP through [`Host::http`]
/// (see [`http`]): the component then imports `wasi:http/outgoing-handler`,
/// and loads only where the operator grants HTTP. Plain `export!(Type)`
/// leaves the import out.
#[macro_export]
macro_rules! export {
    (@with $ty:ty, $transport:ty) => {
        #[doc(hidden)]
        pub struct __SetpointExport;

        #[doc(hidden)]
        fn __setpoint_plugin() -> &'static $ty {
            static PLUGIN: ::std::sync::OnceLock<$ty> = ::std::sync::OnceLock::new();
            PLUGIN.get_or_init(<$ty as ::core::default::Default>::default)
        }

        impl $crate::bindings::exports::setpoint::reconciler::reconciler::Guest
            for __SetpointExport
        {
            fn describe() -> $crate::bindings::setpoint::reconciler::types::Info {
                $crate::__private::describe(__setpoint_plugin())
            }
            fn reconcile(
                request: $crate::bindings::setpoint::reconciler::types::Request,
            ) -> ::core::result::Result<
                $crate::bindings::setpoint::reconciler::types::Outcome,
                $crate::bindings::setpoint::reconciler::types::Failure,
            > {
                $crate::__private::reconcile::<_, $transport>(__setpoint_plugin(), request)
            }
        }

        impl $crate::bindings::exports::setpoint::reconciler::batch_reconciler::Guest
            for __SetpointExport
        {
            fn reconcile_batch(
                requests: ::std::vec::Vec<$crate::bindings::setpoint::reconciler::types::Request>,
            ) -> ::std::vec::Vec<
                ::core::result::Result<
                    $crate::bindings::setpoint::reconciler::types::Outcome,
                    $crate::bindings::setpoint::reconciler::types::Failure,
                >,
            > {
                requests
                    .into_iter()
                    .map(|request| {
                        $crate::__private::reconcile::<_, $transport>(__setpoint_plugin(), request)
                    })
                    .collect()
            }
        }

        impl $crate::bindings::exports::setpoint::reconciler::pruner::Guest for __SetpointExport {
            fn prune(
                desired_keys: ::std::vec::Vec<::std::string::String>,
            ) -> ::core::result::Result<(), $crate::bindings::setpoint::reconciler::types::ReconcileError>
            {
                $crate::__private::prune::<_, $transport>(__setpoint_plugin(), desired_keys)
            }
        }

        impl $crate::bindings::exports::setpoint::reconciler::admission::Guest
            for __SetpointExport
        {
            fn validate(
                object: $crate::bindings::setpoint::reconciler::types::Object,
            ) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::validate(__setpoint_plugin(), object)
            }
        }

        // Only a component exports the WIT functions; a native build (unit tests,
        // benchmarks) uses the plugin as a plain Rust library.
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_plugin!(__SetpointExport with_types_in $crate::bindings);
    };
    ($ty:ty, http) => {
        $crate::export!(@with $ty, $crate::__private::WasiHttp);
    };
    ($ty:ty) => {
        $crate::export!(@with $ty, $crate::__private::NoHttp);
    };
}

/// The glue between the WIT bindings and [`Reconciler`]; used by [`export!`].
#[doc(hidden)]
pub mod __private {
    use super::*;
    use crate::bindings::setpoint::reconciler::{clock, kv, log, objects};

    /// How a component sends HTTP requests: a type, so a component exported
    /// without HTTP never calls (and so never imports) the client.
    pub trait Transport {
        fn send(
            request: &crate::http::Request,
        ) -> Result<crate::http::Response, crate::http::HttpError>;
    }

    /// No outgoing HTTP: `export!(Type)`.
    pub struct NoHttp;

    impl Transport for NoHttp {
        fn send(_: &crate::http::Request) -> Result<crate::http::Response, crate::http::HttpError> {
            Err(crate::http::HttpError::Unavailable)
        }
    }

    /// `wasi:http/outgoing-handler`: `export!(Type, http)`.
    pub struct WasiHttp;

    impl Transport for WasiHttp {
        fn send(
            request: &crate::http::Request,
        ) -> Result<crate::http::Response, crate::http::HttpError> {
            crate::http::send(request)
        }
    }

    /// The real host: the component's imports.
    pub struct WasmHost<T>(std::marker::PhantomData<T>);

    impl<T> WasmHost<T> {
        const NEW: Self = WasmHost(std::marker::PhantomData);
    }

    impl<T: Transport> Host for WasmHost<T> {
        fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
            let level = match level {
                Level::Trace => log::Level::Trace,
                Level::Debug => log::Level::Debug,
                Level::Info => log::Level::Info,
                Level::Warn => log::Level::Warn,
                Level::Error => log::Level::Error,
            };
            let fields: Vec<(String, String)> = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            log::log(level, message, &fields);
        }

        fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Object> {
            objects::get(kind, namespace, name).map(from_wit_object)
        }

        fn list(&self, kind: &str, selector: &[(&str, &str)]) -> Vec<Object> {
            let selector: Vec<(String, String)> = selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            objects::list(kind, &selector)
                .into_iter()
                .map(from_wit_object)
                .collect()
        }

        fn set_status(
            &self,
            kind: &str,
            namespace: &str,
            name: &str,
            status: &serde_json::Value,
        ) -> Result<(), String> {
            objects::set_status(kind, namespace, name, &status.to_string())
        }

        fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
            kv::get(key)
        }

        fn kv_set(&self, key: &str, value: &[u8]) {
            kv::set(key, value)
        }

        fn kv_delete(&self, key: &str) {
            kv::delete(key)
        }

        fn kv_keys(&self, prefix: &str) -> Vec<String> {
            kv::keys(prefix)
        }

        fn now_ms(&self) -> u64 {
            clock::now()
        }

        fn report_drift(&self, detail: &str) {
            objects::report_drift(detail)
        }

        fn http(
            &self,
            request: &crate::http::Request,
        ) -> Result<crate::http::Response, crate::http::HttpError> {
            T::send(request)
        }
    }

    pub fn from_wit_object(o: wit::Object) -> Object {
        Object {
            kind: o.kind,
            name: o.name,
            namespace: o.namespace,
            uid: o.uid,
            generation: o.generation,
            labels: o.labels.into_iter().collect(),
            spec: serde_json::from_str(&o.spec).unwrap_or(serde_json::Value::Null),
            status: o.status.and_then(|s| serde_json::from_str(&s).ok()),
            finalizers: o.finalizers,
            deleting: o.deleting,
        }
    }

    pub fn describe<R: Reconciler>(plugin: &R) -> wit::Info {
        let info = plugin.describe();
        wit::Info {
            name: info.name,
            version: info.version,
            kinds: info.kinds,
            resync_interval: info.resync_interval.map(|d| d.as_millis() as u64),
        }
    }

    fn to_wit_error(kind: ErrorKind, message: String) -> wit::ReconcileError {
        match kind {
            ErrorKind::Retry => wit::ReconcileError::Retry(message),
            ErrorKind::RetryAfter(d) => wit::ReconcileError::RetryAfter(wit::RetryAfter {
                delay: d.as_millis() as u64,
                message,
            }),
            ErrorKind::Fatal => wit::ReconcileError::Fatal(message),
        }
    }

    pub fn reconcile<R: Reconciler, T: Transport>(
        plugin: &R,
        request: wit::Request,
    ) -> Result<wit::Outcome, wit::Failure> {
        let action = match request.action {
            wit::Action::Created => Action::Created,
            wit::Action::Updated => Action::Updated,
            wit::Action::Deleted => Action::Deleted,
            wit::Action::Resynced => Action::Resynced,
        };
        let result = call_reconcile(
            plugin,
            &WasmHost::<T>::NEW,
            request.key,
            action,
            from_wit_object(request.object),
            request.attempt,
            request.state.into_iter().collect(),
        )
        .and_then(|outcome| Ok((encode_status(&outcome.status)?, outcome)));
        match result {
            Ok((status, outcome)) => Ok(wit::Outcome {
                requeue_after: outcome.requeue_after.map(|d| d.as_millis() as u64),
                state: outcome.state.into_iter().collect(),
                status,
            }),
            Err(e) => Err(wit::Failure {
                error: to_wit_error(e.kind, e.message),
                state: e.state.into_iter().collect(),
            }),
        }
    }

    pub fn validate<R: Reconciler>(plugin: &R, object: wit::Object) -> Result<(), String> {
        // A spec that is not JSON at all is refused here; `from_wit_object` would
        // make it `null`, and the message would be about the wrong thing.
        if !object.spec.is_empty()
            && let Err(e) = serde_json::from_str::<serde_json::Value>(&object.spec)
        {
            return Err(format!("spec: not JSON: {e}"));
        }
        validate_object(plugin, &from_wit_object(object))
    }

    pub fn prune<R: Reconciler, T: Transport>(
        plugin: &R,
        desired_keys: Vec<String>,
    ) -> Result<(), wit::ReconcileError> {
        plugin
            .prune(&WasmHost::<T>::NEW, &desired_keys)
            .map_err(|e| to_wit_error(e.kind, e.message))
    }
}
