//! One reconcile in three steps: [`Controller::prepare`] → a call → [`Controller::settle`].
//!
//! `prepare` reads the object and what the controller remembers of the key
//! into a request (or finds nothing to do); the call goes to a [`Slot`], one
//! request at a time or a round of them at once (see `worker`); `settle` acts
//! on the answer: status, success or failure, retries and back-off, the
//! key's state, finalizers. Every rule lives in prepare and settle, so a key
//! is treated the same whether it was called alone or in a round.
//!
//! Guarantees (tested in `tests.rs`, both with single calls and in rounds):
//! - A key is settled exactly once per prepare: as done, failed (retried,
//!   given up or fatal) or gone.
//! - A successful reconcile marks the object done at the generation it saw;
//!   for a deleting object it removes this controller's finalizer.
//! - A failed call (trap, timeout, out of memory) is a `retry`; a setup or
//!   contract error is `fatal`.
//! - Each key has its own span (`reconcile`, with controller, version, key,
//!   attempt, and shard and term when replicas share the work); everything
//!   logged while settling it is inside that span.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::Instrument;

use super::{Controller, Slot};
use crate::metrics::ReconcileResult;
use crate::object::{Action, ObjectKey};
use crate::ownership::Owned;
use crate::plugin::wit::{self, ReconcileError};
use crate::plugin::{CallError, object_to_wit};
use crate::queue::EventRef;
use crate::store::now_ms;

use super::reconciler::ReconcileCall;

/// What a controller needs to call the plugin for one key and settle it.
pub(super) struct Prepared {
    key: ObjectKey,
    /// The key's span: the call for a lone key runs in it, and settling does.
    span: tracing::Span,
    generation: u64,
    deleting: bool,
    action: Action,
    full_round: bool,
    alone: bool,
}

/// What became of one reconcile, as the controller settled it: the same
/// classification the daemon's workers act on (and `setpoint reconcile` prints).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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

impl Prepared {
    pub(super) fn key(&self) -> &ObjectKey {
        &self.key
    }

    /// Queued by a full reconciliation and not reconciled since.
    pub(super) fn full_round(&self) -> bool {
        self.full_round
    }

    /// Its last call failed: it goes alone, not in a round.
    pub(super) fn alone(&self) -> bool {
        self.alone
    }
}

impl Controller {
    /// Reconcile one key and act on the result, inside a span that names the
    /// controller, the plugin version and the key (entered only while the call
    /// is polled, so concurrent reconciles never share one).
    pub async fn reconcile(&self, slot: &mut dyn Slot, key: &ObjectKey) -> Settled {
        let version = self.info().version;
        self.reconcile_on(&version, slot, key).await
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

    /// [`reconcile`](Self::reconcile) with a slot of version `version`: one
    /// key, prepared, called alone and settled.
    pub(super) async fn reconcile_on(
        &self,
        version: &str,
        slot: &mut dyn Slot,
        key: &ObjectKey,
    ) -> Settled {
        match self.prepare(version, key) {
            Ok((prepared, request)) => self.call_alone(slot, prepared, request).await,
            Err(gone) => gone,
        }
    }

    /// Call the plugin for one prepared key, in its span, and settle it.
    pub(super) async fn call_alone(
        &self,
        slot: &mut dyn Slot,
        prepared: Prepared,
        request: wit::Request,
    ) -> Settled {
        let started = tokio::time::Instant::now();
        let result = slot
            .reconcile(&request)
            .instrument(prepared.span.clone())
            .await;
        let took = started.elapsed();
        let drifted = slot.take_drifts() > 0;
        self.settle(prepared, result, took, drifted)
    }

    /// Read `key`'s object and memory into a request for version `version`;
    /// `Err(Settled::Gone)` if there is nothing to reconcile (the object is
    /// gone, or deleting with this controller's part already done).
    pub(super) fn prepare(
        &self,
        version: &str,
        key: &ObjectKey,
    ) -> Result<(Prepared, wit::Request), Settled> {
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
        {
            let owned = self.owned.borrow();
            if let Owned::Shards { .. } = &*owned
                && let Some((shard, term)) = owned.term_of(key)
            {
                span.record("shard", shard);
                span.record("term", term);
            }
        }
        // The request's copy of the object is made in place: the store's
        // copy is not cloned first.
        let object = self.store.read(key, |o| {
            let done_here = o.is_deleting() && !o.metadata.finalizers.contains(&self.finalizer);
            (!done_here).then(|| object_to_wit(o))
        });
        let Some(object) = object.flatten() else {
            // Gone, or deleting with this controller's part already done.
            self.keys().remove(key);
            return Err(Settled::Gone);
        };
        let (action, attempt, state, full_round, alone) = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_default();
            let action = if object.deleting {
                Action::Deleted
            } else {
                entry.pending.take().unwrap_or(Action::Resynced)
            };
            let full_round = std::mem::take(&mut entry.full_round);
            let state = entry.state.clone();
            (action, entry.failures, state, full_round, entry.alone)
        };
        span.record("attempt", attempt);
        span.in_scope(|| tracing::debug!("reconcile started"));
        let prepared = Prepared {
            key: key.clone(),
            span,
            generation: object.generation,
            deleting: object.deleting,
            action,
            full_round,
            alone,
        };
        let request = wit::Request {
            key: key.to_string(),
            action: to_wit_action(action),
            object,
            attempt,
            state,
        };
        Ok((prepared, request))
    }

    /// Act on what the call for `prepared` gave, in the key's span. `took` is
    /// the call's share of the time; `drifted` if the plugin reported drift for
    /// this key (counted as out of sync when a full reconciliation queued it).
    pub(super) fn settle(
        &self,
        prepared: Prepared,
        result: ReconcileCall,
        took: Duration,
        drifted: bool,
    ) -> Settled {
        let span = prepared.span.clone();
        let settled = span.in_scope(|| {
            let settled = self.settle_in_span(prepared, result, took, drifted);
            tracing::debug!("reconcile ended");
            settled
        });
        // A long round is progress key by key, not only at its end.
        self.made_progress();
        settled
    }

    fn settle_in_span(
        &self,
        prepared: Prepared,
        result: ReconcileCall,
        took: Duration,
        drifted: bool,
    ) -> Settled {
        let key = &prepared.key;
        if drifted && prepared.full_round {
            self.stats().out_of_sync += 1;
            self.metrics.out_of_sync();
        }
        let event = EventRef {
            action: prepared.action,
            generation: prepared.generation,
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
                self.succeeded(key, &prepared, outcome)
            }
            Ok(Err(failure)) => {
                self.metrics.reconciled(ReconcileResult::Error, took);
                self.failed(key, event, failure.error, failure.state)
            }
            Err(e) => {
                self.metrics.reconciled(ReconcileResult::Error, took);
                self.call_failed(&e);
                let state = self.state_of(key);
                self.failed(key, event, error_of(e), state)
            }
        }
    }

    /// Count a failed call (trap, timeout, out of memory, setup) by its kind.
    pub(super) fn call_failed(&self, e: &CallError) {
        let outcome = match e {
            CallError::Timeout(_) => "timeout",
            CallError::OutOfMemory(_) => "out-of-memory",
            CallError::Trap(_) => "trap",
            _ => "setup",
        };
        let all = self.metrics.all();
        all.plugin_event(&all.plugin_failures, self.name(), outcome);
    }

    /// The state the plugin last returned for `key`.
    fn state_of(&self, key: &ObjectKey) -> Vec<(String, String)> {
        self.keys()
            .get(key)
            .map(|k| k.state.clone())
            .unwrap_or_default()
    }

    fn succeeded(&self, key: &ObjectKey, prepared: &Prepared, outcome: wit::Outcome) -> Settled {
        let state: BTreeMap<String, String> = outcome.state.iter().cloned().collect();
        {
            let mut stats = self.stats();
            stats.successes += 1;
            stats.last_success_at = Some(now_ms());
        }
        if prepared.deleting {
            return match self.store.finalize(key, &self.finalizer) {
                Ok(removed) => {
                    self.keys().remove(key);
                    self.timers.cancel(key);
                    tracing::info!(removed, "delete reconciled");
                    Settled::Done {
                        requeue_after_ms: None,
                        state,
                        removed,
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
            entry.alone = false;
            entry.state = outcome.state;
            // A retry still pending (the key ran early, e.g. on a resync) is moot.
            if entry.retry.take().is_some() {
                self.timers.cancel(key);
            }
        }
        if let Err(e) = self.store.mark_done(key, prepared.generation) {
            tracing::error!("cannot record the success: {e}");
        }
        match outcome.requeue_after {
            Some(ms) => {
                tracing::info!(requeue_after_ms = ms, "reconciled");
                self.schedule(key, Duration::from_millis(ms), None);
            }
            None => tracing::info!("reconciled"),
        }
        Settled::Done {
            requeue_after_ms: outcome.requeue_after,
            state,
            removed: false,
        }
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
            entry.alone = true;
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

    /// A reconcile of `key` panicked: log it with the key, count it, and
    /// retry the key with back-off like any failed call.
    pub(super) fn panicked(&self, key: &ObjectKey, message: &str) {
        let span = tracing::error_span!("reconcile", controller = %self.name(), key = %key);
        span.in_scope(|| {
            tracing::error!("the worker panicked while reconciling: {message}");
            self.metrics.worker_panicked();
            let event = EventRef {
                action: Action::Resynced,
                generation: self.store.read(key, |o| o.metadata.generation).unwrap_or(0),
            };
            let state = self.state_of(key);
            let error = ReconcileError::Retry(format!("the host panicked: {message}"));
            self.failed(key, event, error, state);
        });
    }

    /// Put `key` on the delay scheduler; `retry` says which event it retries.
    pub(super) fn schedule(&self, key: &ObjectKey, delay: Duration, retry: Option<EventRef>) {
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

/// The reconcile error a failed call counts as: a broken contract or setup is
/// fatal (retrying cannot help), anything else (trap, timeout, memory) a retry.
fn error_of(e: CallError) -> ReconcileError {
    match e {
        CallError::Setup(_)
        | CallError::NoPruner
        | CallError::NoAdmission
        | CallError::NoBatch
        | CallError::Mismatch(_) => ReconcileError::Fatal(e.to_string()),
        _ => ReconcileError::Retry(e.to_string()),
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
