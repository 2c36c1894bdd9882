//! The daemon: composes the process from a [`Config`].
//!
//! [`Daemon::start`] opens the store, loads the plugins, registers their
//! finalizers, applies the example objects and the manifest folders, starts a
//! controller per plugin (on threads of their own), the store's flusher, the
//! manifest watcher and the HTTP API. [`Daemon::run`] serves until its
//! shutdown token is cancelled (or, with `once`, until every object is
//! reconciled), then stops in one order: sources first (nothing new comes in),
//! controllers (reconciles in flight finish), the API, the flusher, and a last
//! flush of the store. `main` only parses arguments.
//!
//! Guarantees: finalizers are registered before any object is applied, and
//! controllers start after the examples and manifests are applied, so each
//! object is reconciled once at start (listed), not twice (listed and seen as
//! a change).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::config::StoreBackend;
use crate::controller::{KnownKinds, Manager};
use crate::etcd::{Coordination, Etcd};
use crate::metrics::Metrics;
use crate::object::Object;
use crate::ownership::Ownership;
use crate::plugin::Runtime;
use crate::registry::{Registry, RegistrySettings};
use crate::source::manifests::Manifests;
use crate::source::plugins::PluginFolder;
use crate::store::{EtcdBackend, Phase, Store};

/// A running daemon.
pub struct Daemon {
    /// With the etcd backend: this replica's part in the cluster.
    coordination: Option<Coordination>,
    store: Store,
    manager: Arc<Manager>,
    /// Where controllers run; dropped after them.
    _plugin_threads: PluginThreads,
    api: Option<(SocketAddr, JoinHandle<()>)>,
    api_stop: CancellationToken,
    sources: JoinSet<()>,
    sources_stop: CancellationToken,
    flusher: JoinHandle<()>,
    flush_stop: CancellationToken,
}

impl Daemon {
    /// Build the process from `config` and start it; `examples` are applied
    /// before the controllers start. Fails if the store cannot be opened, a
    /// plugin does not load, a manifest does not apply or the API cannot bind.
    pub async fn start(config: Config, examples: Vec<Object>) -> anyhow::Result<Daemon> {
        let metrics = Arc::new(Metrics::new());
        let ownership = Ownership::default();
        let (store, coordination) = match config.store.backend {
            StoreBackend::Etcd => {
                let settings = config.store.etcd(config.api.listen.port());
                let (store, coordination) = on_etcd(settings, &ownership, &metrics).await?;
                (store, Some(coordination))
            }
            StoreBackend::Redb => match config.store.path()? {
                Some(path) => {
                    let store = Store::open(&path)?;
                    tracing::info!(path = %path.display(), "store opened");
                    (store, None)
                }
                None => (Store::new(), None),
            },
        };
        // Controllers, and so every plugin call, run on threads of their own: a
        // busy plugin must not starve the API (or the store's flusher) of a core.
        let plugin_threads = PluginThreads::start(config.runtime.plugin_threads())?;
        let mut manager = Manager::new(store.clone(), ownership, metrics.clone())
            .run_controllers_on(plugin_threads.handle());
        if let Some(coordination) = &coordination {
            manager = manager.in_cluster(coordination.cluster());
        }
        let manager = Arc::new(manager);
        let runtime = Runtime::new(&config.runtime)?;
        metrics.register_http_denied(runtime.http_denied().clone());
        let registry = Arc::new(
            Registry::new(
                runtime,
                store.clone(),
                manager.clone(),
                RegistrySettings {
                    grants: config.grants.clone(),
                    trust: config.trust.policy()?,
                    oci_cache: config.runtime.oci_cache_dir(),
                    ..RegistrySettings::default()
                },
            )
            .with_resolver(crate::config::resolver(
                config.plugins.clone(),
                config.runtime.clone(),
            )),
        );
        // A plugin that does not load is recorded (GET /v1/plugins shows it)
        // and the others start.
        let specs: Vec<_> = config.plugins.iter().map(|p| p.spec()).collect();
        let prepared = registry.prepare_all(&specs).await;
        let failed = config.plugins.len() - prepared.len();
        if failed > 0 {
            tracing::warn!(
                failed,
                "some plugins did not load; `setpoint plugin ls` shows why"
            );
        }
        // Finalizers (registered by `prepare`) before objects, so every object
        // applied below is held for its controllers; controllers after, so
        // each starts from one list of the store instead of seeing these
        // applies twice (listed, and as changes).
        for object in examples {
            let applied = store.apply(object)?;
            tracing::info!(key = %applied.object.key(), generation = applied.object.metadata.generation, "applied");
        }
        let manifests = if config.manifests.is_empty() {
            None
        } else {
            let manifests = Manifests::new(
                config.manifests.clone(),
                store.clone(),
                registry.clone() as Arc<dyn KnownKinds>,
            );
            let report = manifests.sync();
            if let Some((file, why)) = report.errors.first() {
                bail!("manifest {} was not applied: {why}", file.display());
            }
            tracing::info!(
                applied = report.applied,
                deleted = report.deleted.len(),
                "manifests applied"
            );
            Some(manifests)
        };
        for (plugin, spec) in prepared {
            registry.start(plugin, &spec)?;
        }
        let flush_stop = CancellationToken::new();
        let flusher = tokio::spawn(
            store
                .clone()
                .flush_every(Duration::from_secs(1), flush_stop.clone()),
        );
        let sources_stop = CancellationToken::new();
        let mut sources = JoinSet::new();
        if let Some(manifests) = manifests.filter(|_| config.watch_manifests) {
            let stop = sources_stop.clone();
            sources.spawn(async move {
                if let Err(e) = manifests.watch(stop).await {
                    tracing::error!("the manifest watcher stopped: {e:#}");
                }
            });
        }
        if let Some(dir) = config.plugin_dir.clone() {
            let mut folder = PluginFolder::new(dir, registry.clone());
            if config.watch_plugins {
                let stop = sources_stop.clone();
                sources.spawn(async move {
                    if let Err(e) = folder.watch(stop).await {
                        tracing::error!("the plugin folder watcher stopped: {e:#}");
                    }
                });
            } else {
                folder.sync().await;
            }
        }
        let api_stop = CancellationToken::new();
        let api = if config.api.enabled {
            let (bound, task) = crate::api::serve_with(
                config.api.listen,
                config.api.token.clone(),
                config.api.max_body_bytes,
                manager.clone(),
                Some(registry.clone()),
                api_stop.clone(),
            )
            .await?;
            tracing::info!(
                "api listening on http://{bound} (/v1/objects, /v1/controllers, /metrics)"
            );
            Some((bound, task))
        } else {
            None
        };
        tracing::info!(
            controllers = manager.controllers().len(),
            "setpoint is running; press Ctrl-C to stop"
        );
        Ok(Daemon {
            coordination,
            store,
            manager,
            _plugin_threads: plugin_threads,
            api,
            api_stop,
            sources,
            sources_stop,
            flusher,
            flush_stop,
        })
    }

    /// The controllers.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where the API listens, if it is enabled.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|(addr, _)| *addr)
    }

    /// Serve until `shutdown` is cancelled, or with `once` until every object
    /// is reconciled; then stop everything in order (see the module doc).
    /// Logs each controller's status every 5 seconds.
    pub async fn run(mut self, shutdown: CancellationToken, once: bool) -> anyhow::Result<()> {
        let mut report = tokio::time::interval(Duration::from_secs(5));
        report.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    tracing::info!("shutting down: finishing reconciles in flight");
                    break;
                }
                _ = report.tick() => log_status(&self.manager),
                _ = tokio::time::sleep(Duration::from_millis(50)), if once => {
                    if all_settled(&self.manager, &self.store) {
                        tracing::info!("every object is reconciled");
                        break;
                    }
                }
            }
        }
        self.sources_stop.cancel();
        while self.sources.join_next().await.is_some() {}
        log_status(&self.manager);
        // Hand over first: the replica owns nothing from here (its workers
        // take no more keys), its reconciles in flight finish, the store is
        // flushed, and its lease is revoked so the others take over at once.
        if let Some(coordination) = self.coordination.take() {
            coordination.stop().await;
        }
        self.manager.shutdown().await;
        self.api_stop.cancel();
        if let Some((_, api)) = self.api.take() {
            let _ = api.await;
        }
        self.flush_stop.cancel();
        let _ = (&mut self.flusher).await;
        self.store.flush()?;
        Ok(())
    }
}

/// Connect to etcd, join the cluster and open the store on it. The store's
/// owner writes carry the fences of what `ownership` says this replica owns.
async fn on_etcd(
    settings: crate::etcd::Settings,
    ownership: &Ownership,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Store, Coordination)> {
    let replica = settings.replica.clone();
    let endpoints = settings.endpoints.join(", ");
    let etcd = tokio::task::spawn_blocking(move || Etcd::connect(settings)).await??;
    // The handover flushes the store; the store needs the coordinator's
    // fences: the hook finds the store once it is open.
    let opened: Arc<std::sync::OnceLock<Store>> = Arc::default();
    let hook = {
        let opened = opened.clone();
        Arc::new(move || {
            if let Some(store) = opened.get()
                && let Err(e) = store.flush()
            {
                tracing::error!("the store could not flush before a handover: {e}");
            }
        })
    };
    // The coordinator needs the store's progress, the store the
    // coordinator's fences: both are handed over through shared cells.
    let fences: Arc<crate::etcd::Fences> = Arc::default();
    let backend = EtcdBackend::new(etcd.clone(), fences.clone(), metrics.fenced_writes.clone());
    let coordination = Coordination::start_with(
        &etcd,
        ownership.clone(),
        hook,
        Some(backend.progress()),
        fences,
    );
    let store = match tokio::task::spawn_blocking(move || Store::with_backend(backend)).await? {
        Ok(store) => store,
        Err(e) => {
            coordination.stop().await;
            bail!("cannot load the store from etcd at {endpoints}: {e}");
        }
    };
    let _ = opened.set(store.clone());
    tracing::info!(%replica, %endpoints, "store opened on etcd");
    Ok((store, coordination))
}

/// True once no controller has work queued or in flight and no object of
/// their kinds is pending.
fn all_settled(manager: &Manager, store: &Store) -> bool {
    manager.controllers().iter().all(|c| {
        let s = c.status();
        s.queue_depth == 0
            && s.in_flight == 0
            && c.info().kinds.iter().all(|kind| {
                store
                    .keys(kind)
                    .iter()
                    .all(|k| store.status(k).is_some_and(|s| s.phase != Phase::Pending))
            })
    })
}

fn log_status(manager: &Manager) {
    for s in manager.status() {
        tracing::info!(
            controller = %s.name,
            successes = s.successes,
            failures = s.failures,
            given_up = s.given_up,
            queue_depth = s.queue_depth,
            in_flight = s.in_flight,
            timers = s.pending_timers,
            last_error = s.last_error.as_deref().unwrap_or("-"),
            "status"
        );
    }
}

/// The runtime controllers run on. Dropped without waiting (a runtime may not
/// be dropped, blocking, inside another): by the time the daemon is dropped,
/// every controller has finished, and on an early error none had started.
struct PluginThreads(Option<tokio::runtime::Runtime>);

impl PluginThreads {
    fn start(threads: usize) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("setpoint-plugins")
            .enable_all()
            .build()
            .context("cannot start the plugin threads")?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("alive until dropped")
            .handle()
            .clone()
    }
}

impl Drop for PluginThreads {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
