//! A controller's workers: each takes keys from its lane of the queue and
//! reconciles them, alone or in rounds.
//!
//! Guarantees (tested in `tests.rs`):
//! - A worker takes keys only while this process owns something, and
//!   reconciles a key only while it holds it ([`Ownership::hold`]); a key
//!   owned elsewhere by the time it is taken is dropped, not reconciled.
//! - When the slot batches ([`Slot::batches`]), a worker takes what is already
//!   queued on its lane, up to [`Engine::round_size`](super::Engine) keys, and
//!   calls them in one round. A round never waits for keys to arrive: a key
//!   waits at most for the round in flight on its lane.
//! - Every per-key rule is the same in a round: each key is prepared and
//!   settled on its own (see `reconcile`).
//! - A failed round (trap, timeout, out of memory, or a wrong number of
//!   answers) blames no key: its keys are called again one at a time, so a
//!   poison key fails alone. A key whose last call failed is called alone
//!   until one succeeds (a change does not reset this), so it cannot fail a
//!   round again. A round's time limit is one reconcile's per key, at most
//!   eight times one reconcile's.
//! - A panic while reconciling a key fails that key (retried with back-off),
//!   never the worker or the round's other keys; a panic in a round's call
//!   is a failed round. A revoked hold (a lost lease) cancels the call and
//!   discards the slot.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::reconcile::Prepared;
use super::supervise::panic_message;
use super::{Active, Alive, Controller, Slot};
use crate::object::ObjectKey;
use crate::ownership::until_owning;
use crate::plugin::wit;
use crate::queue::Timings;

impl Controller {
    pub(super) async fn worker(
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
            let Some(first) = got else { return };
            self.made_progress();
            // A swap since the last key: this key runs on the new version (the
            // old slot, and its warm instance, go).
            let now = self.active();
            if now.generation != active.generation {
                active = now;
                slot = active.reconciler.slot();
            }
            let mut taken = vec![first];
            if slot.batches() {
                while taken.len() < self.engine.round_size.max(1) {
                    match self.queue.try_get(lane) {
                        Some(more) => taken.push(more),
                        None => break,
                    }
                }
            }
            let keys: Vec<ObjectKey> = taken.iter().map(|(key, _)| key.clone()).collect();
            let round = AssertUnwindSafe(self.round(&active, &mut slot, taken));
            if let Err(panic) = round.catch_unwind().await {
                // Something outside a key's call panicked (e.g. while failing
                // a key): no key of the round may stay in flight. `done` is
                // harmless for the keys already done.
                slot = active.reconciler.slot();
                self.metrics.worker_panicked();
                self.metrics.worker_busy(false);
                tracing::error!(
                    controller = %self.name(),
                    keys = keys.len(),
                    "the worker panicked outside a reconcile: {}",
                    panic_message(panic.as_ref())
                );
                for key in &keys {
                    self.queue.done(key);
                }
            }
        }
    }

    /// Reconcile the keys a worker took, holding each while it runs.
    async fn round(
        &self,
        active: &Active,
        slot: &mut Box<dyn Slot>,
        taken: Vec<(ObjectKey, Timings)>,
    ) {
        let mut holds = Vec::with_capacity(taken.len());
        let mut keys = Vec::with_capacity(taken.len());
        for (key, timings) in taken {
            // Queued while this process owned it, and owned by another since:
            // the other replica reconciles it, from the store. The hold lasts
            // until the key is settled, so a handover waits for it.
            let Some(hold) = self.ownership.hold(&key) else {
                self.forget(&key);
                self.queue.done(&key);
                continue;
            };
            // A swap dropped its kind: nothing here reconciles it any more.
            if !active.reconciler.info().kinds.contains(&key.kind) {
                self.forget(&key);
                self.queue.done(&key);
                continue;
            }
            self.metrics.waited(timings.waited);
            holds.push(hold);
            keys.push(key);
        }
        let Some(first_hold) = holds.first_mut() else {
            return;
        };
        self.metrics.worker_busy(true);
        // A panic is caught around each key's call (see `call_round`); one
        // anywhere else fails the keys not yet settled (they are retried with
        // back-off), never the worker, and never leaves a key in flight.
        let mut settled = vec![false; keys.len()];
        let finished = {
            let call = AssertUnwindSafe(self.call_round(active, slot, &keys, &mut settled));
            tokio::select! {
                biased;
                result = call.catch_unwind() => Some(result),
                // The lease is lost: another replica may take these keys once
                // etcd expires it. Stop now (the local deadline leaves a margin
                // before that can happen).
                _ = first_hold.revoked() => None,
            }
        };
        let unsettled = keys
            .iter()
            .zip(&settled)
            .filter(|(_, s)| !**s)
            .map(|(k, _)| k);
        match finished {
            Some(Ok(())) => {}
            Some(Err(panic)) => {
                *slot = active.reconciler.slot();
                let message = panic_message(panic.as_ref());
                for key in unsettled {
                    self.panicked(key, &message);
                }
            }
            None => {
                // The call was dropped mid-way: its instance cannot be
                // trusted, so the next key gets a fresh one.
                *slot = active.reconciler.slot();
                for key in unsettled {
                    self.forget(key);
                    tracing::warn!(controller = %self.name(), %key, "reconcile cancelled: this replica lost its lease");
                }
            }
        }
        drop(holds);
        self.metrics.worker_busy(false);
        for key in &keys {
            let worked = self.queue.done(key);
            self.metrics.worked(worked);
        }
        self.made_progress();
    }

    /// Call and settle `keys`: one call for the round when the slot batches
    /// and more than one key can go in it, else one call per key. `settled[i]`
    /// is set once `keys[i]` is. A panic fails only the key it happened for
    /// (a panic in a round's call blames no key, as any failed round); the
    /// slot is replaced after one.
    async fn call_round(
        &self,
        active: &Active,
        slot: &mut Box<dyn Slot>,
        keys: &[ObjectKey],
        settled: &mut [bool],
    ) {
        let version = &active.reconciler.info().version;
        if !slot.batches() {
            for (i, key) in keys.iter().enumerate() {
                let call = AssertUnwindSafe(self.reconcile_on(version, slot.as_mut(), key));
                if let Err(panic) = call.catch_unwind().await {
                    *slot = active.reconciler.slot();
                    self.panicked(key, &panic_message(panic.as_ref()));
                }
                settled[i] = true;
            }
            return;
        }
        let mut batch = Vec::with_capacity(keys.len());
        let mut requests = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            match self.prepare(version, key) {
                Err(_gone) => settled[i] = true,
                Ok((prepared, request)) => {
                    batch.push((i, prepared));
                    requests.push(request);
                }
            }
        }
        // A key whose last call failed goes alone: if it is what failed a
        // round, it cannot fail another.
        let mut i = 0;
        while i < batch.len() {
            if batch.len() > 1 && !batch[i].1.alone() {
                i += 1;
                continue;
            }
            let (at, prepared) = batch.remove(i);
            let request = requests.remove(i);
            self.alone(active, slot, prepared, request).await;
            settled[at] = true;
        }
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let span = tracing::info_span!("reconcile-round", controller = %self.name(), version = %version, keys = n);
        let started = tokio::time::Instant::now();
        let call = AssertUnwindSafe(slot.reconcile_batch(&requests).instrument(span));
        let answers = call.catch_unwind().await;
        let took = started.elapsed() / n as u32;
        let mut drifts = slot.take_drifts();
        let why = match answers {
            Ok(Ok(answers)) if answers.len() == n => {
                for ((at, prepared), answer) in batch.into_iter().zip(answers) {
                    // A round's drift reports are not tied to keys: each counts
                    // one of the keys a full reconciliation queued.
                    let drifted = prepared.full_round() && drifts > 0;
                    drifts -= usize::from(drifted);
                    let key = prepared.key().clone();
                    let settle =
                        AssertUnwindSafe(|| self.settle(prepared, Ok(answer), took, drifted));
                    if let Err(panic) = std::panic::catch_unwind(settle) {
                        self.panicked(&key, &panic_message(panic.as_ref()));
                    }
                    settled[at] = true;
                }
                return;
            }
            Ok(Ok(answers)) => format!(
                "the plugin answered {} results for {n} requests",
                answers.len()
            ),
            Ok(Err(e)) => {
                self.call_failed(&e);
                e.to_string()
            }
            Err(panic) => {
                *slot = active.reconciler.slot();
                self.metrics.worker_panicked();
                format!("the host panicked: {}", panic_message(panic.as_ref()))
            }
        };
        tracing::warn!(controller = %self.name(), keys = n, "a round failed ({why}); its keys are reconciled one at a time");
        for ((at, prepared), request) in batch.into_iter().zip(requests) {
            self.alone(active, slot, prepared, request).await;
            settled[at] = true;
        }
    }

    /// Call one prepared key alone and settle it; a panic fails the key (it
    /// is retried with back-off) and replaces the slot.
    async fn alone(
        &self,
        active: &Active,
        slot: &mut Box<dyn Slot>,
        prepared: Prepared,
        request: wit::Request,
    ) {
        let key = prepared.key().clone();
        let call = AssertUnwindSafe(self.call_alone(slot.as_mut(), prepared, request));
        if let Err(panic) = call.catch_unwind().await {
            *slot = active.reconciler.slot();
            self.panicked(&key, &panic_message(panic.as_ref()));
        }
    }
}
