//! Instances and calls: a worker's instance slot, the limits armed around every
//! call, and what a failed call means.
//!
//! In [`InstanceMode::Warm`] a slot keeps its instance across calls and recycles
//! it after `recycle-after` calls; in [`InstanceMode::Fresh`] every call gets a new
//! one. In both modes an instance that trapped, timed out or ran out of memory is
//! dropped at once, so the next call starts clean.

use std::time::Duration;

use wasmtime::UpdateDeadline;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::compat;
use super::http::HttpHooks;
use super::imports::HostState;
use super::limits::{DeadlineExceeded, Limiter};
use super::runtime::{Plugin, PluginInner};
use super::settings::InstanceMode;
use super::stderr::StderrTail;
use super::wit;

/// Why a call into a plugin failed (as opposed to the plugin reporting an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the plugin ran past its time limit of {0:?} and was stopped")]
    Timeout(Duration),
    #[error("the plugin ran out of memory: it tried to grow past its limit of {0} MiB")]
    OutOfMemory(u64),
    #[error("the plugin trapped: {0}")]
    Trap(String),
    #[error("the plugin could not be set up: {0}")]
    Setup(String),
    #[error("the plugin does not export `setpoint:reconciler/pruner`")]
    NoPruner,
    #[error("the plugin does not export `setpoint:reconciler/admission`")]
    NoAdmission,
    #[error("the plugin does not export `setpoint:reconciler/batch-reconciler`")]
    NoBatch,
    #[error("{0}")]
    Mismatch(String),
}

/// A round's call may take at most this many times one reconcile's time
/// limit: rounds are for reconciles that are quick; a round of slow ones that
/// runs past it is retried one key at a time, each with its own limit.
pub const ROUND_LIMIT_FACTOR: usize = 8;

/// One worker's instance slot.
pub struct Instance {
    plugin: Plugin,
    live: Option<Live>,
    /// How many times the last call reported drift (`objects.report-drift`).
    drifts: usize,
}

/// An instantiated component and its `Store`.
struct Live {
    store: wasmtime::Store<HostState>,
    reconciler: wit::Reconciler,
    pruner: Option<wit::Pruner>,
    admission: Option<wit::Admission>,
    batch: Option<wit::BatchReconciler>,
    calls: u64,
}

impl Instance {
    pub(super) fn new(plugin: Plugin) -> Self {
        Self {
            plugin,
            live: None,
            drifts: 0,
        }
    }

    /// How many times the last call reported drift (`objects.report-drift`),
    /// taken.
    pub fn take_drifts(&mut self) -> usize {
        std::mem::take(&mut self.drifts)
    }

    /// True if the plugin takes rounds (exports `batch-reconciler`).
    pub fn batches(&self) -> bool {
        self.plugin.can_batch()
    }

    /// True if the slot holds a live instance (for tests of recycling).
    pub fn is_warm(&self) -> bool {
        self.live.is_some()
    }

    /// Call `reconcile`.
    pub async fn reconcile(
        &mut self,
        request: &wit::Request,
    ) -> Result<Result<wit::Outcome, wit::Failure>, CallError> {
        let plugin = self.plugin.inner.clone();
        let live = self.live().await?;
        live.arm(&plugin, &request.key);
        let result = live
            .reconciler
            .call_reconcile(&mut live.store, request)
            .await;
        self.finish(result)
    }

    /// Call `reconcile-batch`, if the plugin exports `batch-reconciler`: one
    /// answer per request, in order. The call has the time limit of one
    /// reconcile per request.
    pub async fn reconcile_batch(
        &mut self,
        requests: &[wit::Request],
    ) -> Result<Vec<Result<wit::Outcome, wit::Failure>>, CallError> {
        if self.plugin.inner.batch.is_none() {
            return Err(CallError::NoBatch);
        }
        let plugin = self.plugin.inner.clone();
        let live = self.live().await?;
        live.arm_for(&plugin, "", requests.len());
        let batch = live.batch.clone().ok_or(CallError::NoBatch)?;
        let result = batch.call_reconcile_batch(&mut live.store, requests).await;
        self.finish(result)
    }

    /// Call `prune`, if the plugin exports it.
    pub async fn prune(
        &mut self,
        desired_keys: &[String],
    ) -> Result<Result<(), wit::ReconcileError>, CallError> {
        if self.plugin.inner.pruner.is_none() {
            return Err(CallError::NoPruner);
        }
        let plugin = self.plugin.inner.clone();
        let live = self.live().await?;
        live.arm(&plugin, "");
        let pruner = live.pruner.clone().ok_or(CallError::NoPruner)?;
        let result = pruner.call_prune(&mut live.store, desired_keys).await;
        self.finish(result)
    }

    /// Call `validate`, if the plugin exports `admission`.
    pub async fn validate(
        &mut self,
        object: &wit::Object,
    ) -> Result<Result<(), String>, CallError> {
        if self.plugin.inner.admission.is_none() {
            return Err(CallError::NoAdmission);
        }
        let plugin = self.plugin.inner.clone();
        let live = self.live().await?;
        live.arm(&plugin, "");
        let admission = live.admission.clone().ok_or(CallError::NoAdmission)?;
        let result = admission.call_validate(&mut live.store, object).await;
        self.finish(result)
    }

    async fn live(&mut self) -> Result<&mut Live, CallError> {
        if self.live.is_none() {
            self.live = Some(Live::start(&self.plugin.inner).await?);
        }
        Ok(self.live.as_mut().expect("just started"))
    }

    /// Count the call, and drop the instance if it failed or is due for recycling.
    fn finish<T>(&mut self, result: wasmtime::Result<T>) -> Result<T, CallError> {
        let settings = &self.plugin.inner.settings;
        let live = self.live.as_mut().expect("a call ran on it");
        live.calls += 1;
        self.drifts = std::mem::take(&mut live.store.data_mut().drifts);
        match result {
            Ok(value) => {
                if settings.instances == InstanceMode::Fresh || live.calls >= settings.recycle_after
                {
                    self.live = None;
                }
                Ok(value)
            }
            Err(e) => {
                let error = classify(&e, live.store.data(), &self.plugin.inner);
                tracing::debug!(plugin = %self.plugin.info().name, "instance dropped: {error}");
                self.live = None;
                Err(error)
            }
        }
    }
}

/// Call `describe` on a new instance of a plugin that is still loading.
pub(super) async fn describe(plugin: &PluginInner) -> Result<wit::Info, CallError> {
    let mut live = Live::start(plugin).await?;
    live.arm(plugin, "");
    let result = live.reconciler.call_describe(&mut live.store).await;
    result.map_err(|e| classify(&e, live.store.data(), plugin))
}

impl Live {
    async fn start(plugin: &PluginInner) -> Result<Live, CallError> {
        let settings = &plugin.settings;
        let mut wasi = WasiCtxBuilder::new();
        for dir in &settings.grants.dirs {
            std::fs::create_dir_all(&dir.host).map_err(|e| {
                CallError::Setup(format!("cannot create {}: {e}", dir.host.display()))
            })?;
            let perms = if dir.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| {
                    CallError::Setup(format!("cannot open {}: {e}", dir.host.display()))
                })?;
        }
        for (k, v) in &settings.grants.env {
            wasi.env(k, v);
        }
        // stderr is always kept (its tail explains traps); with the stdio
        // grant it is also copied to the host's.
        let stderr = StderrTail::new(settings.grants.stdio);
        if settings.grants.stdio {
            wasi.inherit_stdout();
        }
        wasi.stderr(stderr.clone());
        let state = HostState {
            wasi: wasi.build(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: HttpHooks {
                policy: plugin.http.clone(),
                host: plugin.host.clone(),
                denied: plugin.runtime.http_denied().clone(),
                call_ends: None,
            },
            table: ResourceTable::new(),
            limiter: Limiter::new(&settings.limits),
            host: plugin.host.clone(),
            key: String::new(),
            ticks_left: 0,
            drifts: 0,
            stderr,
        };
        let engine = plugin.runtime.engine();
        let mut store = wasmtime::Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut cx| {
            let state = cx.data_mut();
            if state.ticks_left == 0 {
                return Err(DeadlineExceeded.into());
            }
            state.ticks_left -= 1;
            // Between ticks, give the executor back to other tasks.
            Ok(UpdateDeadline::Yield(1))
        });
        // Instantiation runs guest code too (initializers): it gets the same limit.
        store.data_mut().ticks_left = plugin.runtime.ticks_for(settings.limits.max_reconcile_time);
        store.set_epoch_deadline(1);
        let setup = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            if let Some(mismatch) = signature_mismatch(&mut store, &instance, plugin) {
                return Ok(Err(CallError::Mismatch(mismatch)));
            }
            let reconciler = plugin.reconciler.load(&mut store, &instance)?;
            let pruner = match &plugin.pruner {
                Some(p) => Some(p.load(&mut store, &instance)?),
                None => None,
            };
            let admission = match &plugin.admission {
                Some(a) => Some(a.load(&mut store, &instance)?),
                None => None,
            };
            let batch = match &plugin.batch {
                Some(b) => Some(b.load(&mut store, &instance)?),
                None => None,
            };
            wasmtime::Result::Ok(Ok((reconciler, pruner, admission, batch)))
        };
        match setup.await {
            Ok(Err(mismatch)) => Err(mismatch),
            Ok(Ok((reconciler, pruner, admission, batch))) => Ok(Live {
                store,
                reconciler,
                pruner,
                admission,
                batch,
                calls: 0,
            }),
            Err(e) => Err(match classify(&e, store.data(), plugin) {
                CallError::Trap(m) => CallError::Setup(m),
                other => other,
            }),
        }
    }

    /// Reset the per-call limits before a call.
    fn arm(&mut self, plugin: &PluginInner, key: &str) {
        self.arm_for(plugin, key, 1);
    }

    /// Reset the per-call limits before a call that does the work of
    /// `reconciles` reconciles (a round): it gets that many times the time
    /// limit, at most [`ROUND_LIMIT_FACTOR`] times, so a key that hangs stalls
    /// its worker for a bounded time before the round is retried key by key.
    fn arm_for(&mut self, plugin: &PluginInner, key: &str, reconciles: usize) {
        let factor = reconciles.clamp(1, ROUND_LIMIT_FACTOR);
        let limit = plugin
            .settings
            .limits
            .max_reconcile_time
            .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX));
        let ticks = plugin.runtime.ticks_for(limit);
        let state = self.store.data_mut();
        if state.http_hooks.policy.is_some() {
            state.http_hooks.call_ends = Some(tokio::time::Instant::now() + limit);
        }
        state.ticks_left = ticks;
        state.limiter.memory_refused = false;
        state.key.clear();
        state.key.push_str(key);
        state.drifts = 0;
        state.stderr.clear();
        self.store.set_epoch_deadline(1);
    }
}

/// The first exported function whose type differs from the contract's, described
/// for the plugin's author; `None` if they all match (or are missing, which the
/// export indices already reported at load).
fn signature_mismatch(
    store: &mut wasmtime::Store<HostState>,
    instance: &wasmtime::component::Instance,
    plugin: &PluginInner,
) -> Option<String> {
    use wasmtime::component::Func;
    let func = |store: &mut wasmtime::Store<HostState>, iface: &str, name: &str| -> Option<Func> {
        let iface = instance.get_export_index(&mut *store, None, iface)?;
        let index = instance.get_export_index(&mut *store, Some(&iface), name)?;
        instance.get_func(&mut *store, index)
    };
    // Looked up semver-compatibly; named in messages as the component names them.
    let reconciler = &compat::export_name(&plugin.pre, plugin.runtime.engine(), "reconciler");
    let pruner = &compat::export_name(&plugin.pre, plugin.runtime.engine(), "pruner");
    let admission = &compat::export_name(&plugin.pre, plugin.runtime.engine(), "admission");
    let batch = &compat::export_name(&plugin.pre, plugin.runtime.engine(), "batch-reconciler");
    let wrong = |iface: &str, name: &str, e: wasmtime::Error| {
        Some(format!(
            "its export `{iface}` has a `{name}` of the wrong type ({e:#}); rebuild it against \
             this host's WIT"
        ))
    };
    if let Some(f) = func(store, reconciler, "describe")
        && let Err(e) = f.typed::<(), (wit::Info,)>(&*store)
    {
        return wrong(reconciler, "describe", e);
    }
    if let Some(f) = func(store, reconciler, "reconcile")
        && let Err(e) = f.typed::<(wit::Request,), (Result<wit::Outcome, wit::Failure>,)>(&*store)
    {
        return wrong(reconciler, "reconcile", e);
    }
    if let Some(f) = func(store, pruner, "prune")
        && let Err(e) = f.typed::<(Vec<String>,), (Result<(), wit::ReconcileError>,)>(&*store)
    {
        return wrong(pruner, "prune", e);
    }
    if let Some(f) = func(store, admission, "validate")
        && let Err(e) = f.typed::<(wit::Object,), (Result<(), String>,)>(&*store)
    {
        return wrong(admission, "validate", e);
    }
    if let Some(f) = func(store, batch, "reconcile-batch")
        && let Err(e) =
            f.typed::<(Vec<wit::Request>,), (Vec<Result<wit::Outcome, wit::Failure>>,)>(&*store)
    {
        return wrong(batch, "reconcile-batch", e);
    }
    None
}

/// Turn wasmtime's error into what happened, in the plugin author's terms.
fn classify(e: &wasmtime::Error, state: &HostState, plugin: &PluginInner) -> CallError {
    let limits = &plugin.settings.limits;
    if e.downcast_ref::<DeadlineExceeded>().is_some() {
        return CallError::Timeout(limits.max_reconcile_time);
    }
    if state.limiter.memory_refused {
        return CallError::OutOfMemory(limits.memory_mib);
    }
    let message = match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => e.to_string(),
    };
    CallError::Trap(state.stderr.explain(message))
}
