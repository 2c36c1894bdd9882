//! The seam between a controller and what it calls.
//!
//! A controller calls a [`Reconciler`]; each of its workers holds one [`Slot`]
//! from it and calls `reconcile` (and a full reconciliation `prune`) through
//! that slot. A loaded [`Plugin`] is a reconciler whose slots are Wasm
//! instances; [`FnReconciler`] is one made of a closure, so the controller's
//! rules (retries, panics, spans, finalizers) can be tested without Wasm, as
//! kube-runtime tests its `applier` with closures.
//!
//! A slot is the unit of isolation: after a call panics, the controller throws
//! the slot away and asks for a new one.
//!
//! A slot that [`batches`](Slot::batches) takes a round of requests in one
//! call ([`Slot::reconcile_batch`]): a plugin that exports `batch-reconciler`
//! (WIT 0.1.3), or an [`FnReconciler`] made with [`FnReconciler::batching`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::plugin::wit::{self, ReconcileError};
use crate::plugin::{CallError, Instance, Plugin};

/// A boxed future, as the slot's methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one `reconcile` call gives: the plugin's answer, or why the call failed.
pub type ReconcileCall = Result<Result<wit::Outcome, wit::Failure>, CallError>;

/// What one call for a round gives: one answer per request, in order, or why
/// the whole call failed.
pub type BatchCall = Result<Vec<Result<wit::Outcome, wit::Failure>>, CallError>;

/// What one `prune` call gives.
pub type PruneCall = Result<Result<(), ReconcileError>, CallError>;

/// What one `validate` call gives.
pub type ValidateCall = Result<Result<(), String>, CallError>;

/// What a controller reconciles with.
pub trait Reconciler: Send + Sync + 'static {
    /// Who it is and which kinds it reconciles.
    fn info(&self) -> &wit::Info;

    /// True if [`Slot::prune`] does something.
    fn can_prune(&self) -> bool {
        false
    }

    /// True if [`Slot::validate`] checks objects (the plugin exports
    /// `admission`).
    fn can_validate(&self) -> bool {
        false
    }

    /// A new slot for one worker (or one full reconciliation).
    fn slot(&self) -> Box<dyn Slot>;

    /// The loaded plugin behind this reconciler, if it is one.
    fn plugin(&self) -> Option<&Plugin> {
        None
    }
}

/// One worker's handle on a reconciler.
pub trait Slot: Send {
    /// Reconcile one request.
    fn reconcile<'a>(&'a mut self, request: &'a wit::Request) -> BoxFuture<'a, ReconcileCall>;

    /// True if [`Slot::reconcile_batch`] takes a round in one call; the
    /// controller then hands it rounds.
    fn batches(&self) -> bool {
        false
    }

    /// Reconcile a round of requests in one call: one answer per request, in
    /// order.
    fn reconcile_batch<'a>(&'a mut self, requests: &'a [wit::Request]) -> BoxFuture<'a, BatchCall> {
        let _ = requests;
        Box::pin(async { Err(CallError::NoBatch) })
    }

    /// Remove what none of `desired` wants.
    fn prune<'a>(&'a mut self, desired: &'a [String]) -> BoxFuture<'a, PruneCall> {
        let _ = desired;
        Box::pin(async { Err(CallError::NoPruner) })
    }

    /// Check an object before it is stored: `Ok(Err(why))` refuses it.
    fn validate<'a>(&'a mut self, object: &'a wit::Object) -> BoxFuture<'a, ValidateCall> {
        let _ = object;
        Box::pin(async { Err(CallError::NoAdmission) })
    }

    /// How many times the last call reported drift, taken.
    fn take_drifts(&mut self) -> usize {
        0
    }
}

impl Reconciler for Plugin {
    fn info(&self) -> &wit::Info {
        Plugin::info(self)
    }

    fn can_prune(&self) -> bool {
        Plugin::can_prune(self)
    }

    fn can_validate(&self) -> bool {
        Plugin::can_validate(self)
    }

    fn slot(&self) -> Box<dyn Slot> {
        Box::new(self.instance())
    }

    fn plugin(&self) -> Option<&Plugin> {
        Some(self)
    }
}

impl Slot for Instance {
    fn reconcile<'a>(&'a mut self, request: &'a wit::Request) -> BoxFuture<'a, ReconcileCall> {
        Box::pin(Instance::reconcile(self, request))
    }

    fn prune<'a>(&'a mut self, desired: &'a [String]) -> BoxFuture<'a, PruneCall> {
        Box::pin(Instance::prune(self, desired))
    }

    fn validate<'a>(&'a mut self, object: &'a wit::Object) -> BoxFuture<'a, ValidateCall> {
        Box::pin(Instance::validate(self, object))
    }

    fn batches(&self) -> bool {
        Instance::batches(self)
    }

    fn reconcile_batch<'a>(&'a mut self, requests: &'a [wit::Request]) -> BoxFuture<'a, BatchCall> {
        Box::pin(Instance::reconcile_batch(self, requests))
    }

    fn take_drifts(&mut self) -> usize {
        Instance::take_drifts(self)
    }
}

/// A reconciler made of a closure from request to answer. It cannot prune.
pub struct FnReconciler<F> {
    info: wit::Info,
    call: Arc<F>,
    /// Rounds of requests in one call, each answered by the closure in turn.
    batching: bool,
}

impl<F, Fut> FnReconciler<F>
where
    F: Fn(wit::Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ReconcileCall> + Send + 'static,
{
    /// A reconciler named `name` (version 0.0.0) for `kinds` that answers
    /// with `call`.
    pub fn new(name: &str, kinds: &[&str], call: F) -> Arc<Self> {
        Self::versioned(name, "0.0.0", kinds, call)
    }

    /// As [`FnReconciler::new`], at `version`.
    pub fn versioned(name: &str, version: &str, kinds: &[&str], call: F) -> Arc<Self> {
        Arc::new(Self {
            info: wit::Info {
                name: name.to_string(),
                version: version.to_string(),
                kinds: kinds.iter().map(|k| k.to_string()).collect(),
                resync_interval: None,
            },
            call: Arc::new(call),
            batching: false,
        })
    }

    /// This reconciler, taking rounds if `on`: the controller then hands its
    /// slots rounds of requests ([`Slot::reconcile_batch`]), which the closure
    /// answers one by one. Controller tests run both ways.
    ///
    /// # Panics
    /// If the reconciler is already shared (call this before handing it out).
    pub fn in_rounds(mut self: Arc<Self>, on: bool) -> Arc<Self> {
        Arc::get_mut(&mut self)
            .expect("in_rounds is called before the reconciler is shared")
            .batching = on;
        self
    }
}

impl<F, Fut> Reconciler for FnReconciler<F>
where
    F: Fn(wit::Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ReconcileCall> + Send + 'static,
{
    fn info(&self) -> &wit::Info {
        &self.info
    }

    fn slot(&self) -> Box<dyn Slot> {
        Box::new(FnSlot {
            call: self.call.clone(),
            batching: self.batching,
        })
    }
}

struct FnSlot<F> {
    call: Arc<F>,
    batching: bool,
}

impl<F, Fut> Slot for FnSlot<F>
where
    F: Fn(wit::Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ReconcileCall> + Send + 'static,
{
    fn reconcile<'a>(&'a mut self, request: &'a wit::Request) -> BoxFuture<'a, ReconcileCall> {
        Box::pin((self.call)(request.clone()))
    }

    fn batches(&self) -> bool {
        self.batching
    }

    fn reconcile_batch<'a>(&'a mut self, requests: &'a [wit::Request]) -> BoxFuture<'a, BatchCall> {
        Box::pin(async move {
            let mut answers = Vec::with_capacity(requests.len());
            for request in requests {
                answers.push((self.call)(request.clone()).await?);
            }
            Ok(answers)
        })
    }
}
