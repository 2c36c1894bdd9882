//! A controller: one plugin with its work queue, delay scheduler and workers; and
//! the [`Manager`] that runs many.
//!
//! Guarantees (each has a test named after it):
//! - Every object of the plugin's kinds is reconciled once at start, again on
//!   every change the store reports, and again from the store whenever this
//!   process gains ownership of it (see [`Ownership`]).
//! - Changes are queued first, retries and requeues that are due next, and
//!   sweeps (the start-up resync, periodic resyncs, full reconciliations,
//!   ownership gained) last, with a fairness cycle so none starves (see
//!   [`Priority`]); a sweep never holds up the change loop.
//! - A key is routed to one worker by the [`WorkerHasher`] (a negative answer
//!   drops it, counted); it is queued at most once and never reconciled by two
//!   workers at once (see [`WorkQueue`]).
//! - Only keys this process owns are queued and dispatched: a key is checked
//!   when it is queued and again when a worker takes it, so losing ownership
//!   stops its dispatch at once and a key queued before the loss is dropped,
//!   not reconciled. In a handover, reconciles in flight finish (the handover
//!   waits for them); when ownership is revoked (a lost lease) they are
//!   cancelled and their instance discarded.
//! - A successful reconcile marks the object done at the generation it saw; for a
//!   deleting object it removes the object (the host's finalizer).
//! - `requeue-after` and retries go through the delay scheduler, where the
//!   earliest deadline for a key wins. A `retry` error waits the back-off;
//!   `retry-after` the plugin's delay; `fatal` is not retried. A failed call
//!   (trap, timeout, out of memory) counts as a `retry`. After `max-retries`
//!   failures in a row the key is given up: its status shows the last error, a
//!   metric counts it, and its next change brings it back.
//! - A new event for a key with a pending retry follows the [`DequeuePolicy`]:
//!   it replaces the retry (and resets the failure count), or waits for it.
//! - The state a plugin returns, with an outcome or an error, is handed back on
//!   its next call for that key.
//! - The controller holds a finalizer (`setpoint.dev/<name>`) on every object of
//!   its kinds; a deleted object is removed only after this controller (and any
//!   other of the same kind) reconciled its delete successfully.
//! - Every `resync-interval`, every object is queued again (action `resynced`).
//!   Every `full-reconcile-interval`, and on demand, a full reconciliation calls
//!   the plugin's `prune` with every key that should exist, then queues every
//!   object. Both cover only the keys this process owns; `prune` runs only
//!   where every key is owned or shard 0 is (it is handed every desired key:
//!   its contract is "everything that should exist").

mod admission;
mod keys;
mod manager;
mod reconcile;
mod reconciler;
mod supervise;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use admission::AdmissionError;
use keys::{KeyState, merge};
pub use manager::{KnownKinds, Manager, ManagerError};
pub use reconcile::Settled;
pub use reconciler::{
    BatchCall, BoxFuture, FnReconciler, PruneCall, ReconcileCall, Reconciler, Slot, ValidateCall,
};
use supervise::supervised;

use crate::metrics::{ControllerMetrics, Metrics};
use crate::object::{Action, ObjectKey};
use crate::ownership::{Owned, Ownership};
use crate::plugin::Plugin;
use crate::plugin::wit::{self, ReconcileError};
use crate::queue::{
    Added, Backoff, DequeuePolicy, EventRef, Fnv1a, Priority, QueueError, Timers, WorkQueue,
    WorkerHasher,
};
use crate::store::{Change, Store, finalizer_of, now_ms};

/// What a controller reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ControllerStatus {
    pub name: String,
    pub plugin_version: String,
    /// The active component's sha256 (for a loaded plugin).
    pub plugin_sha256: Option<String>,
    /// When the active version became active, ms since the Unix epoch.
    pub activated_at: u64,
    /// Swaps and rollbacks since the controller started.
    pub swaps: u64,
    pub successes: u64,
    pub failures: u64,
    pub given_up: u64,
    pub dropped: u64,
    /// Objects a full reconciliation found out of line with their desired state.
    pub out_of_sync: u64,
    pub last_error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub last_error_at: Option<u64>,
    pub last_success_at: Option<u64>,
    pub queue_depth: usize,
    pub in_flight: usize,
    pub pending_timers: usize,
    /// Whether this process owns every key (leads).
    pub leader: bool,
    /// What this process owns: all, nothing, or shards with their terms.
    pub owns: Owned,
}

#[derive(Default)]
struct Stats {
    successes: u64,
    failures: u64,
    given_up: u64,
    dropped: u64,
    out_of_sync: u64,
    last_error: Option<String>,
    last_error_at: Option<u64>,
    last_success_at: Option<u64>,
}

/// How the engine treats one plugin's keys (its workers, queue, delays and
/// retries). The configuration maps its `[[plugin]]` tables onto it.
#[derive(Clone)]
pub struct Engine {
    pub workers: usize,
    pub queue_size: usize,
    pub delay_resolution: Duration,
    pub delay_capacity: usize,
    pub backoff: Backoff,
    pub max_retries: u32,
    pub dequeue: DequeuePolicy,
    pub shutdown: ShutdownMode,
    pub hasher: Arc<dyn WorkerHasher>,
    /// Queue every object again at this interval.
    pub resync_interval: Option<Duration>,
    /// Run a full reconciliation at this interval.
    pub full_reconcile_interval: Option<Duration>,
    /// A leading controller with work outstanding that neither starts nor
    /// finishes a reconcile for this long is reported as stalled by
    /// [`Controller::health`] (and so by `/readyz`).
    pub stall_after: Duration,
    /// The most keys a worker reconciles in one call, when the plugin takes
    /// rounds (exports `batch-reconciler`). A round takes only keys already
    /// queued on the worker's lane: it never waits for more.
    pub round_size: usize,
}

/// What a controller does at shutdown with keys still queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMode {
    /// Reconcile every queued key, then stop.
    #[default]
    Drain,
    /// Stop taking keys at once; queued keys stay pending for the next start.
    HandBack,
}

impl Default for Engine {
    /// Two workers, room for 10,000 queued keys and a million delayed ones
    /// (10 ms apart at best), exponential back-off from 100 ms to a minute
    /// with 10 % jitter, ten retries, drain at shutdown, no periodic resync,
    /// rounds of [`DEFAULT_ROUND_SIZE`] keys.
    fn default() -> Self {
        Self {
            workers: 2,
            queue_size: 10_000,
            delay_resolution: Duration::from_millis(10),
            delay_capacity: 1_000_000,
            backoff: Backoff::Exponential {
                min: Duration::from_millis(100),
                max: Duration::from_secs(60),
                jitter: 0.1,
            },
            max_retries: 10,
            dequeue: DequeuePolicy::Opinionated,
            shutdown: ShutdownMode::Drain,
            hasher: Arc::new(Fnv1a),
            resync_interval: None,
            full_reconcile_interval: None,
            stall_after: stall_after(crate::plugin::Limits::default().max_reconcile_time),
            round_size: DEFAULT_ROUND_SIZE,
        }
    }
}

/// Keys per round by default: Cilium statedb's reconciler suggests rounds of
/// 100 to 1000; a round of 256 already makes the call's own cost per key small,
/// and keeps a round's time (and its time limit) short.
pub const DEFAULT_ROUND_SIZE: usize = 256;

/// How long a controller may go without progress before it counts as stalled:
/// twice the longest a call may take, and at least a minute.
pub fn stall_after(max_reconcile_time: Duration) -> Duration {
    (max_reconcile_time * 2).max(Duration::from_secs(60))
}

/// One plugin with its queue, timers and workers.
pub struct Controller {
    /// Fixed for the controller's life, whatever version is active.
    name: String,
    /// The active version; replaced by [`Controller::swap`].
    active: std::sync::RwLock<Active>,
    store: Store,
    engine: Engine,
    queue: WorkQueue<ObjectKey>,
    timers: Timers<ObjectKey>,
    keys: Mutex<HashMap<ObjectKey, KeyState>>,
    stats: Mutex<Stats>,
    ownership: Ownership,
    owned: watch::Receiver<Owned>,
    metrics: ControllerMetrics,
    /// The finalizer this controller holds on its objects.
    finalizer: String,
    /// True from the start of [`Controller::run`] until shutdown.
    running: AtomicBool,
    /// Worker loops running now.
    workers_alive: AtomicUsize,
    /// When a worker last took or finished a key.
    progress: Mutex<tokio::time::Instant>,
    /// The slot admission checks run on, made at the first check, with the
    /// generation of the version it was made from.
    admission: tokio::sync::Mutex<Option<(u64, Box<dyn Slot>)>>,
    /// Kinds a swap added, for the run loop to watch and list.
    added_kinds: Mutex<Vec<String>>,
    kinds_changed: tokio::sync::Notify,
}

/// The version a controller dispatches to, and a number bumped at each swap.
#[derive(Clone)]
struct Active {
    reconciler: Arc<dyn Reconciler>,
    generation: u64,
    /// Milliseconds since the Unix epoch.
    activated_at: u64,
}

/// Why [`Controller::trigger`] queued nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Another replica reconciles the key.
    #[error(
        "this replica does not own the key (shard {shard}); send the event to the replica \
         that owns shard {shard} (`owns` in each replica's /v1/controllers)"
    )]
    NotOwned { shard: u32 },
}

/// What a full reconciliation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FullReconciliation {
    /// The keys that should exist, handed to `prune`.
    pub desired: usize,
    /// What became of the prune.
    pub prune: PruneOutcome,
    /// Objects queued for a reconcile afterwards.
    pub queued: usize,
}

/// The prune step of a full reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result", content = "message")]
pub enum PruneOutcome {
    /// `prune` succeeded.
    Done,
    /// The plugin does not export `pruner`; only the reconciles ran.
    NotExported,
    /// `prune` failed; it is not retried until the next full reconciliation.
    Failed(String),
    /// This process does not lead: nothing ran.
    NotLeading,
    /// Another replica (the owner of shard 0) runs `prune`; only this
    /// process's reconciles ran.
    NotHere,
}

impl Controller {
    /// A controller for `plugin` with `engine` settings.
    pub fn new(
        plugin: Plugin,
        store: Store,
        engine: Engine,
        ownership: &Ownership,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_reconciler(Arc::new(plugin), store, engine, ownership, metrics)
    }

    /// A controller for any [`Reconciler`] (e.g. a closure, in tests).
    pub fn with_reconciler(
        reconciler: Arc<dyn Reconciler>,
        store: Store,
        engine: Engine,
        ownership: &Ownership,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        let info = reconciler.info();
        let metrics = metrics.controller(&info.name);
        metrics.activated(&info.version, &sha256_of(reconciler.as_ref()));
        let finalizer = finalizer_of(&info.name);
        for kind in &info.kinds {
            if let Err(e) = store.register_finalizer(kind, &info.name) {
                tracing::error!(controller = %info.name, "cannot register the finalizer: {e}");
            }
        }
        Arc::new(Self {
            queue: WorkQueue::new(engine.workers, engine.queue_size),
            timers: Timers::new(engine.delay_resolution, engine.delay_capacity),
            name: info.name.clone(),
            active: std::sync::RwLock::new(Active {
                reconciler: reconciler.clone(),
                generation: 0,
                activated_at: now_ms(),
            }),
            store,
            engine,
            keys: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            owned: ownership.subscribe(),
            ownership: ownership.clone(),
            metrics,
            finalizer,
            running: AtomicBool::new(false),
            workers_alive: AtomicUsize::new(0),
            progress: Mutex::new(tokio::time::Instant::now()),
            admission: tokio::sync::Mutex::new(None),
            added_kinds: Mutex::new(Vec::new()),
            kinds_changed: tokio::sync::Notify::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its engine settings.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What the active version said about itself.
    pub fn info(&self) -> wit::Info {
        self.reconciler().info().clone()
    }

    /// The loaded plugin this controller runs now, if it runs one.
    pub fn plugin(&self) -> Option<Plugin> {
        self.reconciler().plugin().cloned()
    }

    /// The active version.
    pub fn reconciler(&self) -> Arc<dyn Reconciler> {
        self.active().reconciler
    }

    fn active(&self) -> Active {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Make `new` the active version, atomically: every key a worker takes
    /// from now on runs on it, reconciles in flight finish on the old one, and
    /// everything the controller keeps per key (state, failure counts, pending
    /// requeues and retries, the queue) carries over untouched.
    ///
    /// If `new` reconciles other kinds, the objects of added kinds are watched
    /// and queued (their finalizer must already be registered), and keys of
    /// dropped kinds are forgotten: their timers cancelled, their queued
    /// entries skipped. Their objects keep this controller's finalizer.
    pub fn swap(&self, new: Arc<dyn Reconciler>) {
        let (added, dropped) = {
            let mut active = self.active.write().unwrap_or_else(|e| e.into_inner());
            let old = active.reconciler.info().kinds.clone();
            let kinds = &new.info().kinds;
            let added: Vec<String> = kinds.iter().filter(|k| !old.contains(k)).cloned().collect();
            let dropped: Vec<String> = old.into_iter().filter(|k| !kinds.contains(k)).collect();
            tracing::info!(
                controller = %self.name,
                from = %active.reconciler.info().version,
                to = %new.info().version,
                ?added,
                ?dropped,
                "swapped"
            );
            self.metrics
                .activated(&new.info().version, &sha256_of(new.as_ref()));
            active.reconciler = new;
            active.generation += 1;
            active.activated_at = now_ms();
            (added, dropped)
        };
        if !dropped.is_empty() {
            let mut keys = self.keys();
            keys.retain(|key, _| {
                let keep = !dropped.contains(&key.kind);
                if !keep {
                    self.timers.cancel(key);
                }
                keep
            });
        }
        if !added.is_empty() {
            self.added_kinds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(added);
            self.kinds_changed.notify_one();
        }
    }

    /// `Err` naming what is wrong if this controller cannot make progress: its
    /// workers are gone, or it leads, has work outstanding, and no worker has
    /// started or finished a reconcile for [`Engine::stall_after`].
    pub fn health(&self) -> Result<(), String> {
        if !self.running.load(Ordering::SeqCst) {
            return Ok(());
        }
        let alive = self.workers_alive.load(Ordering::SeqCst);
        if alive < self.engine.workers {
            return Err(format!(
                "controller {}: {alive} of {} workers are running",
                self.name(),
                self.engine.workers
            ));
        }
        let outstanding = self.queue.len() + self.queue.in_flight();
        let idle = self.progress().elapsed();
        if self.owned.borrow().any() && outstanding > 0 && idle >= self.engine.stall_after {
            return Err(format!(
                "controller {}: {outstanding} keys outstanding and no reconcile started or \
                 finished for {}s (see its workers' log lines and `/v1/controllers`)",
                self.name(),
                idle.as_secs()
            ));
        }
        Ok(())
    }

    fn progress(&self) -> MutexGuard<'_, tokio::time::Instant> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn made_progress(&self) {
        *self.progress() = tokio::time::Instant::now();
    }

    /// The status model: counters, last error and success, queue and timers.
    pub fn status(&self) -> ControllerStatus {
        let stats = self.stats();
        let active = self.active();
        ControllerStatus {
            name: self.name().to_string(),
            plugin_version: active.reconciler.info().version.clone(),
            plugin_sha256: active
                .reconciler
                .plugin()
                .map(|p| p.report().sha256.clone()),
            activated_at: active.activated_at,
            swaps: active.generation,
            successes: stats.successes,
            failures: stats.failures,
            given_up: stats.given_up,
            dropped: stats.dropped,
            out_of_sync: stats.out_of_sync,
            last_error: stats.last_error.clone(),
            last_error_at: stats.last_error_at,
            last_success_at: stats.last_success_at,
            queue_depth: self.queue.len(),
            in_flight: self.queue.in_flight(),
            pending_timers: self.timers.len(),
            leader: self.owned.borrow().all(),
            owns: self.owned.borrow().clone(),
        }
    }

    /// Set the metrics that describe "now"; called before metrics are encoded.
    pub fn refresh_metrics(&self) {
        let (unfinished, longest) = self.queue.unfinished();
        self.metrics.set_now(self.queue.len(), unfinished, longest);
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<ObjectKey, KeyState>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run until `shutdown` is cancelled. Then, per the configured
    /// [`ShutdownMode`], either drain the queue or hand back what is queued; work
    /// in flight always finishes. Returns the keys handed back.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Vec<ObjectKey> {
        let kinds = self.info().kinds.clone();
        self.running.store(true, Ordering::SeqCst);
        // Watch first, then list: a change between the two is seen twice, never
        // missed, and the queue folds the duplicate.
        let mut changes = self.store.watch(&kinds);
        let mut tasks = tokio::task::JoinSet::new();
        let stop_taking = CancellationToken::new();
        for lane in 0..self.engine.workers {
            let (me, shutdown, stop_taking) = (self.clone(), shutdown.clone(), stop_taking.clone());
            tasks.spawn(supervised(self.clone(), "worker", move || {
                me.clone()
                    .worker(lane, shutdown.clone(), stop_taking.clone())
            }));
        }
        let (me, stop) = (self.clone(), shutdown.clone());
        tasks.spawn(supervised(self.clone(), "timers", move || {
            me.clone().fire_timers(stop.clone())
        }));
        let (me, stop) = (self.clone(), shutdown.clone());
        tasks.spawn(supervised(self.clone(), "ownership", move || {
            me.clone().follow_ownership(stop.clone())
        }));
        let resync = self
            .engine
            .resync_interval
            .or_else(|| self.info().resync_interval.map(Duration::from_millis));
        if let Some(every) = resync.filter(|d| !d.is_zero()) {
            let (me, stop) = (self.clone(), shutdown.clone());
            tasks.spawn(supervised(self.clone(), "resync", move || {
                let me = me.clone();
                periodically(every, stop.clone(), move || {
                    let me = me.clone();
                    async move {
                        if me.owned.borrow().any() {
                            tracing::debug!(controller = %me.name(), "periodic resync");
                            me.resync().await;
                        }
                    }
                })
            }));
        }
        if let Some(every) = self.engine.full_reconcile_interval.filter(|d| !d.is_zero()) {
            let (me, stop) = (self.clone(), shutdown.clone());
            tasks.spawn(supervised(self.clone(), "full-reconciliation", move || {
                let me = me.clone();
                periodically(every, stop.clone(), move || {
                    let me = me.clone();
                    async move {
                        me.full_reconcile().await;
                    }
                })
            }));
        }
        // Close the queue the moment shutdown is asked for: a source waiting for
        // room in a full queue (with no leader to drain it) must not hold it up.
        tasks.spawn({
            let me = self.clone();
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                me.queue.shutdown();
            }
        });
        // The start-up resync runs beside the change loop: queueing a million
        // objects (waiting for room as the workers make it) must not hold up a
        // live change behind it. The change is queued ahead of the sweep.
        let me = self.clone();
        tasks.spawn(supervised(self.clone(), "start-up resync", move || {
            let me = me.clone();
            async move { me.resync().await }
        }));
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Some(change) => self.on_change(change).await,
                    None => break,
                },
                _ = self.kinds_changed.notified() => {
                    // A swap changed the kinds: watch the new set first, then
                    // list what was added (as at start).
                    changes = self.store.watch(&self.info().kinds);
                    let added = std::mem::take(
                        &mut *self.added_kinds.lock().unwrap_or_else(|e| e.into_inner()),
                    );
                    // Beside the change loop, like the start-up resync.
                    let me = self.clone();
                    tasks.spawn(supervised(self.clone(), "resync of added kinds", move || {
                        let (me, added) = (me.clone(), added.clone());
                        async move { me.resync_kinds(&added).await }
                    }));
                }
                _ = shutdown.cancelled() => break,
            }
        }
        self.queue.shutdown();
        let handed_back = match self.engine.shutdown {
            ShutdownMode::Drain => Vec::new(),
            ShutdownMode::HandBack => {
                stop_taking.cancel();
                self.queue.hand_back()
            }
        };
        while tasks.join_next().await.is_some() {}
        self.running.store(false, Ordering::SeqCst);
        if !handed_back.is_empty() {
            tracing::info!(controller = %self.name(), keys = handed_back.len(), "handed back queued keys");
        }
        handed_back
    }

    /// Queue every object of this controller's kinds that this process owns, as
    /// after a start or on gaining ownership.
    pub async fn resync(&self) {
        self.resync_kinds(&self.info().kinds).await;
    }

    async fn resync_kinds(&self, kinds: &[String]) {
        for kind in kinds {
            for key in self.store.keys(kind) {
                if !self.owned.borrow().owns(&key) {
                    continue;
                }
                {
                    let mut keys = self.keys();
                    let entry = keys.entry(key.clone()).or_default();
                    entry.pending.get_or_insert(Action::Resynced);
                }
                if !self.enqueue(key, Priority::Sweep).await {
                    return;
                }
            }
        }
    }

    /// Full reconciliation: call the plugin's `prune` with every key that should
    /// exist (objects not being deleted), then queue every object this process
    /// owns. A failed prune is reported and counted, and the reconciles still
    /// run.
    ///
    /// With a shard map, `prune` runs only on the owner of shard 0, still with
    /// every desired key: handed only its own shards' keys, a plugin's prune
    /// would remove what the other replicas reconcile.
    pub async fn full_reconcile(&self) -> FullReconciliation {
        let owned = self.owned.borrow().clone();
        if !owned.any() {
            return FullReconciliation {
                desired: 0,
                prune: PruneOutcome::NotLeading,
                queued: 0,
            };
        }
        let mut desired = Vec::new();
        let mut all = 0;
        let mut mine = Vec::new();
        for kind in &self.info().kinds {
            for object in self.store.list(kind, &Default::default()) {
                let key = object.key();
                if owned.owns(&key) {
                    all += 1;
                    if !object.is_deleting() {
                        mine.push(key.clone());
                    }
                }
                if !object.is_deleting() {
                    desired.push(key.to_string());
                }
            }
        }
        {
            let mut keys = self.keys();
            for key in mine {
                keys.entry(key).or_default().full_round = true;
            }
        }
        let prunes_here = match &owned {
            Owned::Shards { terms, .. } => terms.contains_key(&0),
            _ => true,
        };
        let reconciler = self.reconciler();
        let prune = if !prunes_here {
            PruneOutcome::NotHere
        } else if reconciler.can_prune() {
            let span = tracing::info_span!("prune", controller = %self.name(), version = %reconciler.info().version);
            let mut slot = reconciler.slot();
            match slot.prune(&desired).instrument(span).await {
                Ok(Ok(())) => PruneOutcome::Done,
                Ok(Err(e)) => PruneOutcome::Failed(match e {
                    ReconcileError::Retry(m) | ReconcileError::Fatal(m) => m,
                    ReconcileError::RetryAfter(r) => r.message,
                }),
                Err(e) => PruneOutcome::Failed(e.to_string()),
            }
        } else {
            PruneOutcome::NotExported
        };
        if let PruneOutcome::Failed(why) = &prune {
            tracing::warn!(controller = %self.name(), "prune failed: {why}");
        }
        self.metrics
            .full_reconciliation(matches!(prune, PruneOutcome::Failed(_)));
        self.resync().await;
        tracing::info!(controller = %self.name(), desired = desired.len(), ?prune, "full reconciliation");
        FullReconciliation {
            desired: desired.len(),
            prune,
            queued: all,
        }
    }

    /// On every change of ownership: queue from the store what was gained; log
    /// what was lost (its keys are dropped when a worker takes them).
    async fn follow_ownership(self: Arc<Self>, shutdown: CancellationToken) {
        let mut owned = self.owned.clone();
        let mut before = owned.borrow_and_update().clone();
        loop {
            tokio::select! {
                changed = owned.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            let now = owned.borrow_and_update().clone();
            if now.gained_over(&before) {
                tracing::info!(controller = %self.name(), owns = ?now, "ownership gained: resuming from the store");
                self.resync().await;
            } else if !now.any() {
                tracing::warn!(controller = %self.name(), "ownership lost: dispatch stopped");
            } else {
                tracing::info!(controller = %self.name(), owns = ?now, "ownership shrank");
            }
            before = now;
        }
    }

    /// React to one change from the store, following the dequeue policy when the
    /// key has a retry pending.
    async fn on_change(&self, change: Change) {
        if !self.owned.borrow().owns(&change.key) {
            // Another replica's; what this one remembers of it is stale.
            self.forget(&change.key);
            return;
        }
        let generation = self
            .store
            .read(&change.key, |o| o.metadata.generation)
            .unwrap_or(0);
        let new = EventRef {
            action: change.action,
            generation,
        };
        {
            let mut keys = self.keys();
            let entry = keys.entry(change.key.clone()).or_default();
            entry.pending = Some(merge(entry.pending, change.action));
            if let Some(retry) = entry.retry {
                if !self.engine.dequeue.replaces(new, retry) {
                    // The retry stays; it will see the object as it is then.
                    return;
                }
                self.timers.cancel(&change.key);
                entry.retry = None;
            }
            // A change starts the count afresh: a given-up key comes back.
            entry.failures = 0;
        }
        self.enqueue(change.key, Priority::Live).await;
    }

    /// Queue one key now (a `resynced` reconcile), without waiting for room: a
    /// full queue answers [`QueueError::Full`]. For sources that must push back
    /// on their caller, such as the HTTP API.
    /// A key this process does not own answers [`TriggerError::NotOwned`].
    pub fn trigger(&self, key: ObjectKey) -> Result<(), TriggerError> {
        let owned = self.owned.borrow().clone();
        if !owned.owns(&key) {
            let shard = match owned {
                Owned::Shards { of, .. } => crate::ownership::shard_of(&key, of),
                _ => 0,
            };
            return Err(TriggerError::NotOwned { shard });
        }
        let Some(lane) = self.lane(&key) else {
            return Ok(());
        };
        self.keys()
            .entry(key.clone())
            .or_default()
            .pending
            .get_or_insert(Action::Resynced);
        if let Added::Queued = self.queue.try_add(key, lane)? {
            self.metrics.added();
        }
        Ok(())
    }

    /// The worker lane of `key`, or `None` if the hasher drops it (counted).
    fn lane(&self, key: &ObjectKey) -> Option<usize> {
        let lane = self
            .engine
            .hasher
            .route(&key.to_string(), self.queue.lane_count());
        let lane = usize::try_from(lane).ok();
        if lane.is_none() {
            tracing::debug!(controller = %self.name(), %key, "the worker hasher dropped the key");
            self.stats().dropped += 1;
            self.metrics.dropped();
        }
        lane
    }

    /// Route a key to its worker and queue it at `priority`, waiting while
    /// the queue is full. False once the queue is shut down.
    async fn enqueue(&self, key: ObjectKey, priority: Priority) -> bool {
        let Some(lane) = self.lane(&key) else {
            return true;
        };
        match self.queue.add_at(key, lane, priority).await {
            Ok(Added::Queued) => self.metrics.added(),
            Ok(Added::Folded) => {}
            Err(QueueError::ShutDown) => return false,
            Err(QueueError::Full(_)) => unreachable!("add waits for room"),
        }
        true
    }

    async fn fire_timers(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let due = tokio::select! {
                due = self.timers.expired() => due,
                _ = shutdown.cancelled() => return,
            };
            for key in due {
                if let Some(entry) = self.keys().get_mut(&key) {
                    entry.retry = None;
                }
                self.enqueue(key, Priority::Due).await;
            }
        }
    }

    /// Drop what this controller remembers of `key`, and any retry it has
    /// scheduled: it is no longer this controller's to reconcile.
    fn forget(&self, key: &ObjectKey) {
        if self.keys().remove(key).is_some_and(|k| k.retry.is_some()) {
            self.timers.cancel(key);
        }
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name())
            .finish()
    }
}

/// The component's sha256, for a loaded plugin; empty otherwise.
fn sha256_of(reconciler: &dyn Reconciler) -> String {
    reconciler
        .plugin()
        .map(|p| p.report().sha256.clone())
        .unwrap_or_default()
}

/// Counts a worker loop as alive while it exists.
struct Alive<'a>(&'a AtomicUsize);

impl<'a> Alive<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Call `tick` every `every` (the first time one `every` from now) until `shutdown`.
async fn periodically<F, Fut>(every: Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => tick().await,
            _ = shutdown.cancelled() => return,
        }
    }
}
