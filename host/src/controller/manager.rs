//! The [`Manager`]: runs many controllers by name, and answers for all of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{AdmissionError, Controller, ControllerStatus, Engine, Reconciler};
use crate::metrics::Metrics;
use crate::object::Object;
use crate::ownership::Ownership;
use crate::plugin::Plugin;
use crate::store::Store;

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
    ownership: Ownership,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<String, Running>>,
    /// With replicas on etcd: who is in the cluster and holds what.
    cluster: Option<Arc<crate::etcd::Cluster>>,
    /// Where controllers (and so plugin calls) run; the caller's runtime if
    /// `None`. See [`Manager::run_controllers_on`].
    runtime: Option<tokio::runtime::Handle>,
}

impl Manager {
    /// A manager whose controllers reconcile what `ownership` says this process
    /// owns.
    pub fn new(store: Store, ownership: Ownership, metrics: Arc<Metrics>) -> Self {
        metrics.leader.set(i64::from(ownership.get().all()));
        Self {
            store,
            ownership,
            metrics,
            running: Mutex::new(HashMap::new()),
            cluster: None,
            runtime: None,
        }
    }

    /// Report `cluster` (replicas on etcd) as this process's cluster.
    pub fn in_cluster(mut self, cluster: Arc<crate::etcd::Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The cluster this process is a replica of, if any.
    pub fn cluster(&self) -> Option<&crate::etcd::Cluster> {
        self.cluster.as_deref()
    }

    /// Run every controller added from now on, with its workers and so every
    /// plugin call, on `runtime` instead of the caller's. The daemon gives
    /// controllers a runtime of their own so that busy plugins cannot starve
    /// the HTTP API's threads.
    pub fn run_controllers_on(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// The runtime controllers run on.
    pub fn controller_runtime(&self) -> tokio::runtime::Handle {
        self.runtime
            .clone()
            .unwrap_or_else(tokio::runtime::Handle::current)
    }

    /// Ask every controller of each object's kind whether it may be stored
    /// (see [`Controller::admit`]); the first refusal, if any. The checks run
    /// on the controllers' runtime.
    pub async fn admit(&self, objects: &[Object]) -> Result<(), AdmissionError> {
        for object in objects {
            for controller in self.controllers_of(&object.kind) {
                let plugin = controller.name().to_string();
                let copy = object.clone();
                let check = self
                    .controller_runtime()
                    .spawn(async move { controller.admit(&copy).await });
                match check.await {
                    Ok(result) => result?,
                    // A panic in the host's side of the check, caught by the task.
                    Err(e) => {
                        return Err(AdmissionError::Failed {
                            key: object.key().to_string(),
                            plugin,
                            error: format!("the check stopped: {e}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// One line per controller that cannot make progress (see
    /// [`Controller::health`]); empty when all can.
    pub fn health(&self) -> Vec<String> {
        self.controllers()
            .iter()
            .filter_map(|c| c.health().err())
            .collect()
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
    pub fn kinds_running(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut kinds = std::collections::BTreeMap::<String, Vec<String>>::new();
        for c in self.controllers() {
            for kind in &c.info().kinds {
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
            .filter(|c| c.info().kinds.iter().any(|k| k == kind))
            .collect()
    }

    /// Start a controller for `plugin`, named after it, with `engine` settings.
    pub fn add(&self, plugin: Plugin, engine: Engine) -> Result<Arc<Controller>, ManagerError> {
        self.add_reconciler(Arc::new(plugin), engine)
    }

    /// Start a controller for any [`Reconciler`] (e.g. a closure, in tests).
    pub fn add_reconciler(
        &self,
        reconciler: Arc<dyn Reconciler>,
        engine: Engine,
    ) -> Result<Arc<Controller>, ManagerError> {
        let name = reconciler.info().name.clone();
        let mut running = self.running();
        if running.contains_key(&name) {
            return Err(ManagerError::Exists(name));
        }
        let controller = Controller::with_reconciler(
            reconciler,
            self.store.clone(),
            engine,
            &self.ownership,
            &self.metrics,
        );
        let stop = CancellationToken::new();
        let (done_tx, done) = watch::channel(false);
        self.controller_runtime().spawn({
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
    pub async fn replace(
        &self,
        plugin: Plugin,
        engine: Engine,
    ) -> Result<Arc<Controller>, ManagerError> {
        let name = plugin.info().name.clone();
        let _ = self.remove_and_wait(&name).await;
        self.add(plugin, engine)
    }

    /// Swap the plugin of the running controller `name` for `plugin`, keeping
    /// its queue and everything it keeps per key (see [`Controller::swap`]).
    pub fn swap(&self, name: &str, plugin: Plugin) -> Result<Arc<Controller>, ManagerError> {
        let controller = self
            .controller(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        controller.swap(Arc::new(plugin));
        Ok(controller)
    }

    /// Signal a controller to stop and forget it; it finishes in the background.
    pub fn remove(&self, name: &str) -> Result<(), ManagerError> {
        let running = self
            .running()
            .remove(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        running.stop.cancel();
        running.controller.metrics.deactivated();
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
        let owned = self.ownership.get();
        self.metrics.leader.set(i64::from(owned.all()));
        let shards = match &owned {
            crate::ownership::Owned::Shards { terms, .. } => terms.len(),
            _ => 0,
        };
        self.metrics.owned_shards.set(shards as i64);
        for c in self.controllers() {
            c.refresh_metrics();
        }
        self.metrics.encode()
    }
}

/// The kinds some plugin stands for, by kind, with the names of its plugins:
/// what sources and the API accept objects of.
pub trait KnownKinds: Send + Sync {
    fn kinds(&self) -> std::collections::BTreeMap<String, Vec<String>>;
}

impl KnownKinds for Manager {
    fn kinds(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.kinds_running()
    }
}

/// A fixed set of kinds (e.g. in tests), each with no plugin named.
impl KnownKinds for std::collections::BTreeSet<String> {
    fn kinds(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.iter().map(|k| (k.clone(), Vec::new())).collect()
    }
}
