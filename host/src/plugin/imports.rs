//! The host side of the WIT contract: one `impl` per imported interface, all on
//! [`HostState`], the data every plugin `Store` carries.
//!
//! Host imports never trap on a plugin's bad input: a missing object is `none`, an
//! invalid status is an `err` the plugin can see.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::http::HttpHooks;
use super::limits::Limiter;
use super::wit::setpoint::reconciler::{clock, kv, log, objects, types};
use crate::object::{Object, ObjectKey};
use crate::store::{Store, now_ms};

/// What a plugin's calls into the host can reach: its name (for logs and its
/// private key-value space) and the store.
pub struct HostContext {
    pub plugin: String,
    pub version: String,
    pub store: Store,
}

/// The data in every plugin `Store`.
pub struct HostState {
    pub(super) wasi: WasiCtx,
    pub(super) http: WasiHttpCtx,
    /// What outgoing HTTP requests may reach.
    pub(super) http_hooks: HttpHooks,
    pub(super) table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) host: Arc<HostContext>,
    /// The key being reconciled, for log fields.
    pub(super) key: String,
    /// Epoch ticks left before the current call is stopped.
    pub(super) ticks_left: u64,
    /// How many times the current call reported drift (`objects.report-drift`).
    pub(super) drifts: usize,
    /// The end of what the instance wrote to stderr.
    pub(super) stderr: super::stderr::StderrTail,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

/// A store object as the plugin sees it.
pub fn object_to_wit(o: &Object) -> types::Object {
    types::Object {
        kind: o.kind.clone(),
        name: o.metadata.name.clone(),
        namespace: o.metadata.namespace.clone(),
        uid: o.metadata.uid.clone(),
        generation: o.metadata.generation,
        labels: o
            .metadata
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        spec: o.spec.to_string(),
        status: o.status.as_ref().map(|s| s.to_string()),
        finalizers: o.metadata.finalizers.clone(),
        deleting: o.is_deleting(),
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        let plugin = &self.host.plugin;
        let version = &self.host.version;
        let key = &self.key;
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        macro_rules! emit {
            ($lvl:ident) => {
                tracing::$lvl!(target: "setpoint::plugin", plugin, version, key, fields, "{message}")
            };
        }
        match level {
            log::Level::Trace => emit!(trace),
            log::Level::Debug => emit!(debug),
            log::Level::Info => emit!(info),
            log::Level::Warn => emit!(warn),
            log::Level::Error => emit!(error),
        }
    }
}

impl objects::Host for HostState {
    fn get(&mut self, kind: String, namespace: String, name: String) -> Option<types::Object> {
        let key = ObjectKey::new(&kind, &namespace, &name);
        self.host.store.read(&key, object_to_wit)
    }

    fn list(&mut self, kind: String, selector: Vec<(String, String)>) -> Vec<types::Object> {
        let selector: BTreeMap<String, String> = selector.into_iter().collect();
        self.host
            .store
            .list(&kind, &selector)
            .iter()
            .map(object_to_wit)
            .collect()
    }

    fn set_status(
        &mut self,
        kind: String,
        namespace: String,
        name: String,
        status: String,
    ) -> Result<(), String> {
        let key = ObjectKey::new(&kind, &namespace, &name);
        self.host
            .store
            .set_status(&key, &status)
            .map_err(|e| e.to_string())
    }

    fn report_drift(&mut self, detail: String) {
        tracing::info!(plugin = %self.host.plugin, key = %self.key, "drift: {detail}");
        self.drifts += 1;
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.host.store.kv_get(&self.host.plugin, &key)
    }

    fn set(&mut self, key: String, value: Vec<u8>) {
        // The WIT function cannot fail; a disk error is the operator's to see.
        if let Err(e) = self.host.store.kv_set(&self.host.plugin, &key, value) {
            tracing::error!(plugin = %self.host.plugin, key, "kv set lost: {e}");
        }
    }

    fn delete(&mut self, key: String) {
        if let Err(e) = self.host.store.kv_delete(&self.host.plugin, &key) {
            tracing::error!(plugin = %self.host.plugin, key, "kv delete lost: {e}");
        }
    }

    fn keys(&mut self, prefix: String) -> Vec<String> {
        self.host.store.kv_keys(&self.host.plugin, &prefix)
    }
}

impl clock::Host for HostState {
    fn now(&mut self) -> u64 {
        now_ms()
    }
}
