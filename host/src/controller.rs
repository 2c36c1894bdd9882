//! A controller: one plugin, its work queue and its workers.
//!
//! Guarantees:
//! - Every object of the plugin's kinds is reconciled once at start, and again on
//!   every change the store reports (`created`, `updated`, `deleted`).
//! - A key is never reconciled by two workers at once (see [`WorkQueue`]).
//! - A successful reconcile marks the object done at the generation it saw; for a
//!   deleting object it removes the object (the host's finalizer).
//! - `requeue-after` queues the key again after the delay. A `retry` error queues
//!   it after the back-off; `retry-after` after the plugin's delay; `fatal` not at
//!   all. After `max-retries` failures in a row the key is given up until its next
//!   change. A failed call (trap, timeout, out of memory) counts as a `retry`.
//! - The state a plugin returns, with an outcome or an error, is handed back on
//!   its next call for that key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::object::ObjectKey;
use crate::plugin::wit::{self, ReconcileError};
use crate::plugin::{CallError, Instance, Plugin};
use crate::queue::{Backoff, WorkQueue};
use crate::store::{Action, Store};

/// Counters a controller keeps about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ControllerStatus {
    pub name: String,
    pub successes: u64,
    pub failures: u64,
    pub given_up: u64,
    pub queue_depth: usize,
    pub in_flight: usize,
}

/// Per-key memory between attempts.
#[derive(Default)]
struct KeyState {
    failures: u32,
    state: Vec<(String, String)>,
    /// The change not yet reconciled, if any.
    pending: Option<Action>,
}

/// One plugin with its queue and workers.
pub struct Controller {
    plugin: Plugin,
    store: Store,
    queue: Arc<WorkQueue<ObjectKey>>,
    keys: Mutex<HashMap<ObjectKey, KeyState>>,
    backoff: Backoff,
    successes: AtomicU64,
    failures: AtomicU64,
    given_up: AtomicU64,
}

impl Controller {
    pub fn new(plugin: Plugin, store: Store) -> Arc<Self> {
        let backoff = Backoff::from(&plugin.settings().retry);
        Arc::new(Self {
            plugin,
            store,
            queue: Arc::new(WorkQueue::new()),
            keys: Mutex::new(HashMap::new()),
            backoff,
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            given_up: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.plugin.info().name
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    pub fn status(&self) -> ControllerStatus {
        ControllerStatus {
            name: self.name().to_string(),
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            given_up: self.given_up.load(Ordering::Relaxed),
            queue_depth: self.queue.len(),
            in_flight: self.queue.in_flight(),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, KeyState>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run until `shutdown` is cancelled. Work in flight then finishes; work still
    /// queued stays in the store as pending, for the next start.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let kinds = self.plugin.info().kinds.clone();
        // Watch first, then list: a change between the two is seen twice, never
        // missed, and the queue folds the duplicate.
        let mut changes = self.store.watch(&kinds);
        for kind in &kinds {
            for key in self.store.keys(kind) {
                self.enqueue(key, Action::Created);
            }
        }
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.plugin.settings().workers {
            workers.spawn(self.clone().worker(shutdown.clone()));
        }
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Some(c) => self.enqueue(c.key, c.action),
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
        self.queue.shutdown();
        while workers.join_next().await.is_some() {}
    }

    fn enqueue(&self, key: ObjectKey, action: Action) {
        {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            // A change resets the failure count: a given-up key comes back.
            entry.failures = 0;
            entry.pending = Some(match (entry.pending, action) {
                (_, Action::Deleted) => Action::Deleted,
                (Some(Action::Created), _) => Action::Created,
                (_, a) => a,
            });
        }
        self.queue.add(key);
    }

    async fn worker(self: Arc<Self>, shutdown: CancellationToken) {
        let mut instance = self.plugin.instance();
        loop {
            let key = tokio::select! {
                key = self.queue.get() => key,
                _ = shutdown.cancelled() => None,
            };
            let Some(key) = key else { break };
            self.reconcile(&mut instance, &key).await;
            self.queue.done(&key);
        }
    }

    /// Reconcile one key and act on the result.
    pub async fn reconcile(&self, instance: &mut Instance, key: &ObjectKey) {
        let Some(object) = self.store.get(key) else {
            self.keys().remove(key);
            return;
        };
        let (action, attempt, state) = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            let action = if object.is_deleting() {
                Action::Deleted
            } else {
                entry.pending.take().unwrap_or(Action::Resynced)
            };
            (action, entry.failures, entry.state.clone())
        };
        let request = wit::Request {
            key: key.to_string(),
            action: to_wit_action(action),
            object: crate::plugin::object_to_wit(&object),
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
        let result = instance.reconcile(&request).await;
        match result {
            Ok(Ok(outcome)) => {
                if let Some(status) = &outcome.status
                    && let Err(e) = self.store.set_status(key, status)
                {
                    let error = format!("the plugin returned a bad status: {e}");
                    return self.failed(key, ReconcileError::Fatal(error), outcome.state);
                }
                self.succeeded(key, &object, outcome);
            }
            Ok(Err(failure)) => self.failed(key, failure.error, failure.state),
            Err(e) => {
                let state = self
                    .keys()
                    .get(key)
                    .map(|k| k.state.clone())
                    .unwrap_or_default();
                let error = match e {
                    CallError::Setup(_) | CallError::NoPruner => {
                        ReconcileError::Fatal(e.to_string())
                    }
                    _ => ReconcileError::Retry(e.to_string()),
                };
                self.failed(key, error, state)
            }
        }
    }

    fn succeeded(&self, key: &ObjectKey, object: &crate::object::Object, outcome: wit::Outcome) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        if object.is_deleting() {
            self.store.remove(key);
            self.keys().remove(key);
            tracing::info!("deleted");
            return;
        }
        {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            entry.failures = 0;
            entry.state = outcome.state;
        }
        self.store.mark_done(key, object.metadata.generation);
        match outcome.requeue_after {
            Some(ms) => {
                tracing::info!(requeue_after_ms = ms, "reconciled");
                self.queue.add_after(key.clone(), Duration::from_millis(ms));
            }
            None => tracing::info!("reconciled"),
        }
    }

    fn failed(&self, key: &ObjectKey, error: ReconcileError, state: Vec<(String, String)>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let max_retries = self.plugin.settings().retry.max_retries;
        let failures = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            entry.failures += 1;
            entry.state = state;
            entry.failures
        };
        let (message, delay) = match error {
            ReconcileError::Retry(m) => (m, Some(self.backoff.delay(failures))),
            ReconcileError::RetryAfter(r) => (r.message, Some(Duration::from_millis(r.delay))),
            ReconcileError::Fatal(m) => (m, None),
        };
        match delay {
            Some(delay) if failures <= max_retries => {
                tracing::warn!(retry_in = ?delay, "reconcile failed: {message}");
                self.store.mark_error(key, &message);
                self.queue.add_after(key.clone(), delay);
            }
            Some(_) => {
                self.given_up.fetch_add(1, Ordering::Relaxed);
                let message = format!("gave up after {failures} attempts: {message}");
                tracing::error!("{message}");
                self.store.mark_error(key, &message);
            }
            None => {
                tracing::error!("reconcile failed for good: {message}");
                self.store.mark_error(key, &message);
            }
        }
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
