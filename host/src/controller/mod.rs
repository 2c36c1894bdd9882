//! A controller: one plugin with its work queue, delay scheduler and workers; and
//! the [`Manager`] that runs many.
//!
//! Guarantees (each has a test named after it):
//! - Every object of the plugin's kinds is reconciled once at start, again on
//!   every change the store reports, and again from the store whenever this
//!   process gains ownership of it (see [`Ownership`]).
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
mod manager;
mod reconciler;
mod supervise;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use admission::AdmissionError;
pub use manager::{KnownKinds, Manager, ManagerError};
pub use reconciler::{
    BoxFuture, FnReconciler, PruneCall, ReconcileCall, Reconciler, Slot, ValidateCall,
};
use supervise::{panic_message, supervised};

use crate::metrics::{ControllerMetrics, Metrics, ReconcileResult};
use crate::object::{Action, Object, ObjectKey};
use crate::ownership::{Owned, Ownership, until_owning};
use crate::plugin::wit::{self, ReconcileError};
use crate::plugin::{CallError, Plugin, object_to_wit};
use crate::queue::{
    Added, Backoff, DequeuePolicy, EventRef, Fnv1a, QueueError, Timers, WorkQueue, WorkerHasher,
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

/// Per-key memory between attempts.
#[derive(Default)]
struct KeyState {
    failures: u32,
    state: Vec<(String, String)>,
    /// The change not yet reconciled, if any.
    pending: Option<Action>,
    /// The event a scheduled retry is for, while one is scheduled.
    retry: Option<EventRef>,
    /// Queued by a full reconciliation and not reconciled since: drift the
    /// plugin reports on this key's next call counts as out of sync.
    full_round: bool,
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
    /// with 10 % jitter, ten retries, drain at shutdown, no periodic resync.
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
        }
    }
}

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
        self.resync().await;
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
                    self.resync_kinds(&added).await;
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
                self.enqueue(key).await;
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
            .get(&change.key)
            .map_or(0, |o| o.metadata.generation);
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
        self.enqueue(change.key).await;
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

    /// Route a key to its worker and queue it, waiting while the queue is full.
    async fn enqueue(&self, key: ObjectKey) {
        let Some(lane) = self.lane(&key) else {
            return;
        };
        match self.queue.add(key, lane).await {
            Ok(Added::Queued) => self.metrics.added(),
            Ok(Added::Folded) | Err(QueueError::ShutDown) => {}
            Err(QueueError::Full(_)) => unreachable!("add waits for room"),
        }
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
                self.enqueue(key).await;
            }
        }
    }

    async fn worker(
        self: Arc<Self>,
        lane: usize,
        shutdown: CancellationToken,
        stop_taking: CancellationToken,
    ) {
        let _alive = Alive::new(&self.workers_alive);
        let mut active = self.active();
        let mut slot = active.reconciler.slot();
        let mut owned = self.owned.clone();
        // False once the publisher is gone: the view can no longer change.
        let mut watching = true;
        loop {
            if !owned.borrow_and_update().any() {
                // Owning nothing: take nothing. At shutdown there is nothing to drain.
                tokio::select! {
                    owning = until_owning(&mut owned) => if !owning { return },
                    _ = shutdown.cancelled() => return,
                }
            }
            let got = tokio::select! {
                biased;
                _ = stop_taking.cancelled() => return,
                changed = owned.changed(), if watching => {
                    watching = changed.is_ok();
                    continue;
                }
                got = self.queue.get(lane) => got,
            };
            let Some((key, timings)) = got else { return };
            self.made_progress();
            // Queued while this process owned it, and owned by another since:
            // the other replica reconciles it, from the store. The hold lasts
            // until the reconcile is settled, so a handover waits for it.
            let Some(mut hold) = self.ownership.hold(&key) else {
                self.forget(&key);
                self.queue.done(&key);
                continue;
            };
            // A swap since the last key: this key runs on the new version (the
            // old slot, and its warm instance, go).
            let now = self.active();
            if now.generation != active.generation {
                active = now;
                slot = active.reconciler.slot();
            }
            // A swap dropped its kind: nothing here reconciles it any more.
            if !active.reconciler.info().kinds.contains(&key.kind) {
                self.forget(&key);
                self.queue.done(&key);
                continue;
            }
            self.metrics.waited(timings.waited);
            self.metrics.worker_busy(true);
            // A panic in the call or in settling its result fails this key (it
            // is retried with back-off), never the worker, and never leaves the
            // key in flight.
            let version = &active.reconciler.info().version;
            let finished = {
                let call = AssertUnwindSafe(self.reconcile_on(version, slot.as_mut(), &key));
                tokio::select! {
                    biased;
                    result = call.catch_unwind() => Some(result),
                    // The lease is lost: another replica may take the key
                    // once etcd expires it. Stop now (the local deadline
                    // leaves a margin before that can happen).
                    _ = hold.revoked() => None,
                }
            };
            match finished {
                Some(Ok(_)) => {}
                Some(Err(panic)) => {
                    slot = active.reconciler.slot();
                    self.panicked(&key, &panic_message(panic.as_ref()));
                }
                None => {
                    // The call was dropped mid-way: its instance cannot be
                    // trusted, so the next key gets a fresh one.
                    slot = active.reconciler.slot();
                    self.forget(&key);
                    tracing::warn!(controller = %self.name(), %key, "reconcile cancelled: this replica lost its lease");
                }
            }
            drop(hold);
            self.metrics.worker_busy(false);
            let worked = self.queue.done(&key);
            self.metrics.worked(worked);
            self.made_progress();
        }
    }

    /// Drop what this controller remembers of `key`, and any retry it has
    /// scheduled: it is no longer this controller's to reconcile.
    fn forget(&self, key: &ObjectKey) {
        if self.keys().remove(key).is_some_and(|k| k.retry.is_some()) {
            self.timers.cancel(key);
        }
    }

    /// A reconcile of `key` panicked: log it with the key, count it, and
    /// retry the key with back-off like any failed call.
    fn panicked(&self, key: &ObjectKey, message: &str) {
        let span = tracing::error_span!("reconcile", controller = %self.name(), key = %key);
        span.in_scope(|| {
            tracing::error!("the worker panicked while reconciling: {message}");
            self.metrics.worker_panicked();
            let event = EventRef {
                action: Action::Resynced,
                generation: self.store.get(key).map_or(0, |o| o.metadata.generation),
            };
            let state = self
                .keys()
                .get(key)
                .map(|k| k.state.clone())
                .unwrap_or_default();
            let error = ReconcileError::Retry(format!("the host panicked: {message}"));
            self.failed(key, event, error, state);
        });
    }

    /// Reconcile one key and act on the result, inside a span that names the
    /// controller, the plugin version and the key (entered only while the call
    /// is polled, so concurrent reconciles never share one).
    pub async fn reconcile(&self, slot: &mut dyn Slot, key: &ObjectKey) -> Settled {
        let version = self.info().version;
        self.reconcile_on(&version, slot, key).await
    }

    /// [`reconcile`](Self::reconcile) with a slot of version `version`.
    async fn reconcile_on(&self, version: &str, slot: &mut dyn Slot, key: &ObjectKey) -> Settled {
        let span = tracing::info_span!(
            "reconcile",
            controller = %self.name(),
            version = %version,
            key = %key,
            shard = tracing::field::Empty,
            term = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        // Replicas sharing the work: which shard, held under which term.
        let term = self.owned.borrow().term_of(key);
        if let Some((shard, term)) = term {
            span.record("shard", shard);
            span.record("term", term);
        }
        async {
            tracing::debug!("reconcile started");
            let settled = self.reconcile_in_span(slot, key).await;
            tracing::debug!("reconcile ended");
            settled
        }
        .instrument(span)
        .await
    }

    async fn reconcile_in_span(&self, slot: &mut dyn Slot, key: &ObjectKey) -> Settled {
        let object = match self.store.get(key) {
            // Gone, or deleting with this controller's part already done.
            None => None,
            Some(o) if o.is_deleting() && !o.metadata.finalizers.contains(&self.finalizer) => None,
            Some(o) => Some(o),
        };
        let Some(object) = object else {
            self.keys().remove(key);
            return Settled::Gone;
        };
        let (action, attempt, state, full_round) = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            let action = if object.is_deleting() {
                Action::Deleted
            } else {
                entry.pending.take().unwrap_or(Action::Resynced)
            };
            let full_round = std::mem::take(&mut entry.full_round);
            (action, entry.failures, entry.state.clone(), full_round)
        };
        let request = wit::Request {
            key: key.to_string(),
            action: to_wit_action(action),
            object: object_to_wit(&object),
            attempt,
            state,
        };
        tracing::Span::current().record("attempt", attempt);
        let started = tokio::time::Instant::now();
        let result = slot.reconcile(&request).await;
        let took = started.elapsed();
        if slot.take_drift().is_some() && full_round {
            self.stats().out_of_sync += 1;
            self.metrics.out_of_sync();
        }
        let event = EventRef {
            action,
            generation: object.metadata.generation,
        };
        match result {
            Ok(Ok(outcome)) => {
                if let Some(status) = &outcome.status
                    && let Err(e) = self.store.set_status(key, status)
                {
                    let error = format!("the plugin returned a bad status: {e}");
                    self.metrics.reconciled(ReconcileResult::Error, took);
                    return self.failed(key, event, ReconcileError::Fatal(error), outcome.state);
                }
                let result = if outcome.requeue_after.is_some() {
                    ReconcileResult::Requeue
                } else {
                    ReconcileResult::Success
                };
                self.metrics.reconciled(result, took);
                self.succeeded(key, &object, outcome)
            }
            Ok(Err(failure)) => {
                self.metrics.reconciled(ReconcileResult::Error, took);
                self.failed(key, event, failure.error, failure.state)
            }
            Err(e) => {
                self.metrics.reconciled(ReconcileResult::Error, took);
                let outcome = match &e {
                    CallError::Timeout(_) => "timeout",
                    CallError::OutOfMemory(_) => "out-of-memory",
                    CallError::Trap(_) => "trap",
                    _ => "setup",
                };
                let all = self.metrics.all();
                all.plugin_event(&all.plugin_failures, self.name(), outcome);
                let state = self
                    .keys()
                    .get(key)
                    .map(|k| k.state.clone())
                    .unwrap_or_default();
                let error = match e {
                    CallError::Setup(_)
                    | CallError::NoPruner
                    | CallError::NoAdmission
                    | CallError::Mismatch(_) => ReconcileError::Fatal(e.to_string()),
                    _ => ReconcileError::Retry(e.to_string()),
                };
                self.failed(key, event, error, state)
            }
        }
    }

    fn succeeded(&self, key: &ObjectKey, object: &Object, outcome: wit::Outcome) -> Settled {
        let done = Settled::Done {
            requeue_after_ms: outcome.requeue_after,
            state: outcome.state.iter().cloned().collect(),
            removed: false,
        };
        {
            let mut stats = self.stats();
            stats.successes += 1;
            stats.last_success_at = Some(now_ms());
        }
        if object.is_deleting() {
            return match self.store.finalize(key, &self.finalizer) {
                Ok(removed) => {
                    self.keys().remove(key);
                    self.timers.cancel(key);
                    tracing::info!(removed, "delete reconciled");
                    match done {
                        Settled::Done { state, .. } => Settled::Done {
                            requeue_after_ms: None,
                            state,
                            removed,
                        },
                        other => other,
                    }
                }
                // Still deleting and still holding the finalizer: the next
                // resync (or restart) reconciles the delete again.
                Err(e) => {
                    let message = format!("delete reconciled, but the finalizer stays: {e}");
                    tracing::error!("{message}");
                    Settled::Failed {
                        error: "retry",
                        message,
                        retry_in_ms: None,
                        state: BTreeMap::new(),
                    }
                }
            };
        }
        {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            entry.failures = 0;
            entry.state = outcome.state;
            // A retry still pending (the key ran early, e.g. on a resync) is moot.
            if entry.retry.take().is_some() {
                self.timers.cancel(key);
            }
        }
        if let Err(e) = self.store.mark_done(key, object.metadata.generation) {
            tracing::error!("cannot record the success: {e}");
        }
        match outcome.requeue_after {
            Some(ms) => {
                tracing::info!(requeue_after_ms = ms, "reconciled");
                self.schedule(key, Duration::from_millis(ms), None);
            }
            None => tracing::info!("reconciled"),
        }
        done
    }

    fn failed(
        &self,
        key: &ObjectKey,
        event: EventRef,
        error: ReconcileError,
        state: Vec<(String, String)>,
    ) -> Settled {
        let state_shown: BTreeMap<String, String> = state.iter().cloned().collect();
        let failures = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            entry.failures += 1;
            entry.state = state;
            entry.failures
        };
        let error_class = match &error {
            ReconcileError::Retry(_) => "retry",
            ReconcileError::RetryAfter(_) => "retry-after",
            ReconcileError::Fatal(_) => "fatal",
        };
        let (message, delay) = match error {
            ReconcileError::Retry(m) => (m, Some(self.engine.backoff.delay(failures))),
            ReconcileError::RetryAfter(r) => (r.message, Some(Duration::from_millis(r.delay))),
            ReconcileError::Fatal(m) => (m, None),
        };
        let retry_in = delay.filter(|_| failures <= self.engine.max_retries);
        let class = match (&error_class, delay, retry_in) {
            (_, Some(_), None) => "gave-up",
            (class, _, _) => class,
        };
        let message = match delay {
            Some(delay) if failures <= self.engine.max_retries => {
                tracing::warn!(retry_in = ?delay, "reconcile failed: {message}");
                self.metrics.retried();
                self.schedule(key, delay, Some(event));
                message
            }
            Some(_) => {
                let message = format!("gave up after {failures} attempts: {message}");
                tracing::error!("{message}");
                self.stats().given_up += 1;
                self.metrics.given_up();
                message
            }
            None => {
                tracing::error!("reconcile failed for good: {message}");
                message
            }
        };
        // With a retry scheduled the error is for now; a fatal error, or giving
        // up, is for good, and `setpoint wait` stops at once on it.
        let recorded = if retry_in.is_some() {
            self.store.mark_error(key, &message)
        } else {
            self.store.mark_failed(key, &message)
        };
        if let Err(e) = recorded {
            tracing::error!("cannot record the failure: {e}");
        }
        let mut stats = self.stats();
        stats.failures += 1;
        stats.last_error = Some(message.clone());
        stats.last_error_at = Some(now_ms());
        Settled::Failed {
            error: class,
            message,
            retry_in_ms: retry_in.map(|d| d.as_millis() as u64),
            state: state_shown,
        }
    }

    /// Reconcile `key` now, as a worker would, for `action` (a deleting
    /// object is always reconciled as `deleted`): one-off calls such as
    /// `setpoint reconcile` take the daemon's path through this.
    pub async fn reconcile_now(
        &self,
        slot: &mut dyn Slot,
        key: &ObjectKey,
        action: Action,
    ) -> Settled {
        self.keys().entry(key.clone()).or_default().pending = Some(action);
        self.reconcile(slot, key).await
    }

    /// Put `key` on the delay scheduler; `retry` says which event it retries.
    fn schedule(&self, key: &ObjectKey, delay: Duration, retry: Option<EventRef>) {
        match self.timers.schedule_after(key.clone(), delay) {
            Ok(_) => {
                if let Some(entry) = self.keys().get_mut(key) {
                    entry.retry = retry.or(entry.retry);
                }
            }
            Err(full) => {
                // Not dropped silently: the status says so, and the next change
                // or resync brings the key back.
                tracing::error!(%key, "cannot schedule: {full}");
                let _ = self
                    .store
                    .mark_error(key, &format!("not rescheduled: {full}"));
            }
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

/// What became of one reconcile, as the controller settled it: the same
/// classification the daemon's workers act on (and `setpoint reconcile` prints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum Settled {
    /// Nothing to reconcile: the object is gone, or its delete was done here.
    Gone,
    /// The plugin succeeded; `removed` if that finished a delete.
    #[serde(rename = "ok", rename_all = "kebab-case")]
    Done {
        requeue_after_ms: Option<u64>,
        state: BTreeMap<String, String>,
        removed: bool,
    },
    /// The call or the plugin failed. `error` is `retry`, `retry-after`,
    /// `fatal` or `gave-up`; `retry-in-ms` when a retry is scheduled.
    #[serde(rename = "error", rename_all = "kebab-case")]
    Failed {
        error: &'static str,
        message: String,
        retry_in_ms: Option<u64>,
        state: BTreeMap<String, String>,
    },
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

/// Fold a new change into the one not yet reconciled.
fn merge(pending: Option<Action>, new: Action) -> Action {
    match (pending, new) {
        (_, Action::Deleted) => Action::Deleted,
        (Some(Action::Created), _) => Action::Created,
        (Some(Action::Updated), Action::Resynced) => Action::Updated,
        (_, new) => new,
    }
}

fn to_wit_action(action: Action) -> wit::Action {
    match action {
        Action::Created => wit::Action::Created,
        Action::Updated => wit::Action::Updated,
        Action::Deleted => wit::Action::Deleted,
        Action::Resynced => wit::Action::Resynced,
    }
}
