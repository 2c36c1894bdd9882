//! A controller: one plugin with its work queue, delay scheduler and workers; and
//! the [`Manager`] that runs many.
//!
//! Guarantees (each has a test named after it):
//! - Every object of the plugin's kinds is reconciled once at start, again on
//!   every change the store reports, and again from the store whenever this
//!   process regains leadership.
//! - A key is routed to one worker by the [`WorkerHasher`] (a negative answer
//!   drops it, counted); it is queued at most once and never reconciled by two
//!   workers at once (see [`WorkQueue`]).
//! - Workers dispatch only while this process leads; losing leadership stops
//!   dispatch at once, and reconciles in flight finish.
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
//!   object. Both run only while this process leads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{BackoffKind, PluginConfig, ShutdownMode};
use crate::leader::{LeaderElector, until_leading};
use crate::metrics::{ControllerMetrics, Metrics, ReconcileResult};
use crate::object::{Object, ObjectKey};
use crate::plugin::wit::{self, ReconcileError};
use crate::plugin::{CallError, Instance, Plugin, object_to_wit};
use crate::queue::{
    Added, Backoff, DequeuePolicy, EventRef, Fnv1a, QueueError, Timers, WorkQueue, WorkerHasher,
};
use crate::store::{Action, Change, FINALIZER_PREFIX, Store};

/// What a controller reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ControllerStatus {
    pub name: String,
    pub plugin_version: String,
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
    pub leader: bool,
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

/// How the engine treats one plugin's keys; read from [`PluginConfig`].
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
}

impl From<&PluginConfig> for Engine {
    fn from(c: &PluginConfig) -> Self {
        let backoff = match c.retry.backoff {
            BackoffKind::Exponential => Backoff::Exponential {
                min: c.retry.min_backoff,
                max: c.retry.max_backoff,
                jitter: c.retry.jitter,
            },
            BackoffKind::Linear => Backoff::Linear {
                base: c.retry.min_backoff,
                max: c.retry.max_backoff,
            },
        };
        Self {
            workers: c.workers,
            queue_size: c.queue_size,
            delay_resolution: c.delay_resolution,
            delay_capacity: c.delay_capacity,
            backoff,
            max_retries: c.retry.max_retries,
            dequeue: c.retry.dequeue_policy,
            shutdown: c.shutdown,
            hasher: Arc::new(Fnv1a),
            resync_interval: c.resync_interval,
            full_reconcile_interval: c.full_reconcile_interval,
        }
    }
}

/// One plugin with its queue, timers and workers.
pub struct Controller {
    plugin: Plugin,
    store: Store,
    engine: Engine,
    queue: WorkQueue<ObjectKey>,
    timers: Timers<ObjectKey>,
    keys: Mutex<HashMap<ObjectKey, KeyState>>,
    stats: Mutex<Stats>,
    leader: watch::Receiver<bool>,
    metrics: ControllerMetrics,
    /// The finalizer this controller holds on its objects.
    finalizer: String,
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
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Controller {
    /// A controller for `plugin`, with the engine settings from its configuration.
    pub fn new(
        plugin: Plugin,
        store: Store,
        leader: &dyn LeaderElector,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        let engine = Engine::from(plugin.settings());
        Self::with_engine(plugin, store, engine, leader, metrics)
    }

    /// A controller with explicit engine settings (e.g. a custom hasher).
    pub fn with_engine(
        plugin: Plugin,
        store: Store,
        engine: Engine,
        leader: &dyn LeaderElector,
        metrics: &Arc<Metrics>,
    ) -> Arc<Self> {
        let metrics = metrics.controller(&plugin.info().name);
        let finalizer = format!("{FINALIZER_PREFIX}{}", plugin.info().name);
        for kind in &plugin.info().kinds {
            if let Err(e) = store.register_finalizer(kind, &plugin.info().name) {
                tracing::error!(controller = %plugin.info().name, "cannot register the finalizer: {e}");
            }
        }
        Arc::new(Self {
            queue: WorkQueue::new(engine.workers, engine.queue_size),
            timers: Timers::new(engine.delay_resolution, engine.delay_capacity),
            plugin,
            store,
            engine,
            keys: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            leader: leader.subscribe(),
            metrics,
            finalizer,
        })
    }

    pub fn name(&self) -> &str {
        &self.plugin.info().name
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The status model: counters, last error and success, queue and timers.
    pub fn status(&self) -> ControllerStatus {
        let stats = self.stats();
        ControllerStatus {
            name: self.name().to_string(),
            plugin_version: self.plugin.info().version.clone(),
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
            leader: *self.leader.borrow(),
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
        let kinds = self.plugin.info().kinds.clone();
        // Watch first, then list: a change between the two is seen twice, never
        // missed, and the queue folds the duplicate.
        let mut changes = self.store.watch(&kinds);
        let mut tasks = tokio::task::JoinSet::new();
        let stop_taking = CancellationToken::new();
        for lane in 0..self.engine.workers {
            tasks.spawn(
                self.clone()
                    .worker(lane, shutdown.clone(), stop_taking.clone()),
            );
        }
        tasks.spawn(self.clone().fire_timers(shutdown.clone()));
        tasks.spawn(self.clone().follow_leadership(shutdown.clone()));
        let resync = self.engine.resync_interval.or_else(|| {
            self.plugin
                .info()
                .resync_interval
                .map(Duration::from_millis)
        });
        if let Some(every) = resync.filter(|d| !d.is_zero()) {
            let me = self.clone();
            tasks.spawn(periodically(every, shutdown.clone(), move || {
                let me = me.clone();
                async move {
                    if me.leading() {
                        tracing::debug!(controller = %me.name(), "periodic resync");
                        me.resync().await;
                    }
                }
            }));
        }
        if let Some(every) = self.engine.full_reconcile_interval.filter(|d| !d.is_zero()) {
            let me = self.clone();
            tasks.spawn(periodically(every, shutdown.clone(), move || {
                let me = me.clone();
                async move {
                    me.full_reconcile().await;
                }
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
        if !handed_back.is_empty() {
            tracing::info!(controller = %self.name(), keys = handed_back.len(), "handed back queued keys");
        }
        handed_back
    }

    /// Queue every object of this controller's kinds, as after a start or on
    /// regaining leadership.
    pub async fn resync(&self) {
        for kind in &self.plugin.info().kinds {
            for key in self.store.keys(kind) {
                {
                    let mut keys = self.keys();
                    let entry = keys.entry(key.clone()).or_default();
                    entry.pending.get_or_insert(Action::Resynced);
                }
                self.enqueue(key).await;
            }
        }
    }

    fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    /// Full reconciliation: call the plugin's `prune` with every key that should
    /// exist (objects not being deleted), then queue every object. A failed prune
    /// is reported and counted, and the reconciles still run.
    pub async fn full_reconcile(&self) -> FullReconciliation {
        if !self.leading() {
            return FullReconciliation {
                desired: 0,
                prune: PruneOutcome::NotLeading,
                queued: 0,
            };
        }
        let mut desired = Vec::new();
        let mut all = 0;
        for kind in &self.plugin.info().kinds {
            for object in self.store.list(kind, &Default::default()) {
                all += 1;
                if !object.is_deleting() {
                    desired.push(object.key().to_string());
                }
            }
        }
        {
            let mut keys = self.keys();
            for key in &desired {
                if let Ok(key) = key.parse::<ObjectKey>() {
                    keys.entry(key).or_default().full_round = true;
                }
            }
        }
        let prune = if self.plugin.can_prune() {
            let span = tracing::info_span!("prune", controller = %self.name(), version = %self.plugin.info().version);
            let _enter = span.enter();
            match self.plugin.instance().prune(&desired).await {
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

    async fn follow_leadership(self: Arc<Self>, shutdown: CancellationToken) {
        let mut leader = self.leader.clone();
        loop {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            let leading = *leader.borrow_and_update();
            if leading {
                tracing::info!(controller = %self.name(), "leading: resuming from the store");
                self.resync().await;
            } else {
                tracing::warn!(controller = %self.name(), "lost leadership: dispatch stopped");
            }
        }
    }

    /// React to one change from the store, following the dequeue policy when the
    /// key has a retry pending.
    async fn on_change(&self, change: Change) {
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
    pub fn trigger(&self, key: ObjectKey) -> Result<(), QueueError> {
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
        let mut instance = self.plugin.instance();
        let mut leader = self.leader.clone();
        // False once the elector is gone: its value can no longer change.
        let mut watching = true;
        loop {
            if !*leader.borrow_and_update() {
                // Not leading: take nothing. At shutdown there is nothing to drain.
                tokio::select! {
                    leading = until_leading(&mut leader) => if !leading { return },
                    _ = shutdown.cancelled() => return,
                }
            }
            let got = tokio::select! {
                biased;
                _ = stop_taking.cancelled() => return,
                changed = leader.changed(), if watching => {
                    watching = changed.is_ok();
                    continue;
                }
                got = self.queue.get(lane) => got,
            };
            let Some((key, timings)) = got else { return };
            self.metrics.waited(timings.waited);
            self.metrics.worker_busy(true);
            self.reconcile(&mut instance, &key).await;
            self.metrics.worker_busy(false);
            let worked = self.queue.done(&key);
            self.metrics.worked(worked);
        }
    }

    /// Reconcile one key and act on the result.
    pub async fn reconcile(&self, instance: &mut Instance, key: &ObjectKey) {
        let object = match self.store.get(key) {
            // Gone, or deleting with this controller's part already done.
            None => None,
            Some(o) if o.is_deleting() && !o.metadata.finalizers.contains(&self.finalizer) => None,
            Some(o) => Some(o),
        };
        let Some(object) = object else {
            self.keys().remove(key);
            return;
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
        let span = tracing::info_span!(
            "reconcile",
            controller = %self.name(),
            version = %self.plugin.info().version,
            key = %key,
            attempt,
        );
        let _enter = span.enter();
        let started = tokio::time::Instant::now();
        let result = instance.reconcile(&request).await;
        let took = started.elapsed();
        if instance.take_drift().is_some() && full_round {
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
                self.succeeded(key, &object, outcome);
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
                    CallError::Setup(_) | CallError::NoPruner | CallError::Mismatch(_) => {
                        ReconcileError::Fatal(e.to_string())
                    }
                    _ => ReconcileError::Retry(e.to_string()),
                };
                self.failed(key, event, error, state)
            }
        }
    }

    fn succeeded(&self, key: &ObjectKey, object: &Object, outcome: wit::Outcome) {
        {
            let mut stats = self.stats();
            stats.successes += 1;
            stats.last_success_at = Some(now_ms());
        }
        if object.is_deleting() {
            match self.store.finalize(key, &self.finalizer) {
                Ok(removed) => {
                    self.keys().remove(key);
                    self.timers.cancel(key);
                    tracing::info!(removed, "delete reconciled");
                }
                // Still deleting and still holding the finalizer: the next
                // resync (or restart) reconciles the delete again.
                Err(e) => tracing::error!("delete reconciled, but the finalizer stays: {e}"),
            }
            return;
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
    }

    fn failed(
        &self,
        key: &ObjectKey,
        event: EventRef,
        error: ReconcileError,
        state: Vec<(String, String)>,
    ) {
        let failures = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            entry.failures += 1;
            entry.state = state;
            entry.failures
        };
        let (message, delay) = match error {
            ReconcileError::Retry(m) => (m, Some(self.engine.backoff.delay(failures))),
            ReconcileError::RetryAfter(r) => (r.message, Some(Duration::from_millis(r.delay))),
            ReconcileError::Fatal(m) => (m, None),
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
        if let Err(e) = self.store.mark_error(key, &message) {
            tracing::error!("cannot record the failure: {e}");
        }
        let mut stats = self.stats();
        stats.failures += 1;
        stats.last_error = Some(message);
        stats.last_error_at = Some(now_ms());
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

/// Why the manager refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagerError {
    #[error("a controller named {0:?} is already running; replace it instead")]
    Exists(String),
    #[error("no controller named {0:?}")]
    NotFound(String),
}

struct Running {
    controller: Arc<Controller>,
    stop: CancellationToken,
    done: watch::Receiver<bool>,
}

/// Runs many controllers by name: add, replace, remove, wait for termination,
/// and report their status.
pub struct Manager {
    store: Store,
    leader: Arc<dyn LeaderElector>,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<String, Running>>,
}

impl Manager {
    pub fn new(store: Store, leader: Arc<dyn LeaderElector>, metrics: Arc<Metrics>) -> Self {
        let leading = *leader.subscribe().borrow();
        metrics.leader.set(i64::from(leading));
        Self {
            store,
            leader,
            metrics,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every kind some controller reconciles, with the controllers of each.
    pub fn kinds(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut kinds = std::collections::BTreeMap::<String, Vec<String>>::new();
        for c in self.controllers() {
            for kind in &c.plugin().info().kinds {
                kinds
                    .entry(kind.clone())
                    .or_default()
                    .push(c.name().to_string());
            }
        }
        kinds
    }

    /// The controllers of `kind`.
    pub fn controllers_of(&self, kind: &str) -> Vec<Arc<Controller>> {
        self.controllers()
            .into_iter()
            .filter(|c| c.plugin().info().kinds.iter().any(|k| k == kind))
            .collect()
    }

    /// Start a controller for `plugin`, named after it.
    pub fn add(&self, plugin: Plugin) -> Result<Arc<Controller>, ManagerError> {
        let engine = Engine::from(plugin.settings());
        self.add_with(plugin, engine)
    }

    /// Start a controller with explicit engine settings.
    pub fn add_with(
        &self,
        plugin: Plugin,
        engine: Engine,
    ) -> Result<Arc<Controller>, ManagerError> {
        let name = plugin.info().name.clone();
        let mut running = self.running();
        if running.contains_key(&name) {
            return Err(ManagerError::Exists(name));
        }
        let controller = Controller::with_engine(
            plugin,
            self.store.clone(),
            engine,
            self.leader.as_ref(),
            &self.metrics,
        );
        let stop = CancellationToken::new();
        let (done_tx, done) = watch::channel(false);
        tokio::spawn({
            let controller = controller.clone();
            let stop = stop.clone();
            async move {
                controller.run(stop).await;
                done_tx.send_replace(true);
            }
        });
        tracing::info!(controller = %name, "controller started");
        running.insert(
            name,
            Running {
                controller: controller.clone(),
                stop,
                done,
            },
        );
        Ok(controller)
    }

    /// Replace the controller of the same name: the old one stops (its work in
    /// flight finishes), then the new one starts with its counters at zero.
    pub async fn replace(&self, plugin: Plugin) -> Arc<Controller> {
        let name = plugin.info().name.clone();
        let _ = self.remove_and_wait(&name).await;
        self.add(plugin).expect("the old controller was removed")
    }

    /// Signal a controller to stop and forget it; it finishes in the background.
    pub fn remove(&self, name: &str) -> Result<(), ManagerError> {
        let running = self
            .running()
            .remove(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        running.stop.cancel();
        self.metrics.forget(name);
        tracing::info!(controller = %name, "controller removed");
        Ok(())
    }

    /// Stop a controller and wait until it has finished.
    pub async fn remove_and_wait(&self, name: &str) -> Result<(), ManagerError> {
        let mut done = self.termination(name)?;
        self.remove(name)?;
        let _ = done.wait_for(|d| *d).await;
        Ok(())
    }

    /// A receiver that turns true once the controller has terminated.
    pub fn termination(&self, name: &str) -> Result<watch::Receiver<bool>, ManagerError> {
        self.running()
            .get(name)
            .map(|r| r.done.clone())
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    /// Stop every controller and wait for all of them.
    pub async fn shutdown(&self) {
        let names: Vec<String> = self.running().keys().cloned().collect();
        for name in names {
            let _ = self.remove_and_wait(&name).await;
        }
    }

    pub fn controller(&self, name: &str) -> Option<Arc<Controller>> {
        self.running().get(name).map(|r| r.controller.clone())
    }

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        let mut all: Vec<_> = self
            .running()
            .values()
            .map(|r| r.controller.clone())
            .collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Every controller's status model, by name.
    pub fn status(&self) -> Vec<ControllerStatus> {
        self.controllers().iter().map(|c| c.status()).collect()
    }

    /// The metrics text, with the "now" gauges refreshed.
    pub fn encode_metrics(&self) -> String {
        let leading = *self.leader.subscribe().borrow();
        self.metrics.leader.set(i64::from(leading));
        for c in self.controllers() {
            c.refresh_metrics();
        }
        self.metrics.encode()
    }
}
