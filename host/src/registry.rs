//! The plugin registry: which plugins a running daemon has, in which versions.
//!
//! Per controller name, the registry keeps the versions tried, newest last:
//! loaded (with the compiled [`Plugin`], so a rollback recompiles nothing) or
//! failed (with the error), which one is active, and when. It loads, swaps,
//! rolls back and unloads through the [`Manager`].
//!
//! Guarantees (each tested):
//! - A plugin that fails to load is recorded with its error and shown; it
//!   never stops the daemon or the other plugins.
//! - A new version is validated completely (read, compiled, checked against
//!   the world and the package version, `describe()`d) before anything
//!   changes; one that fails never replaces the running one, and its error is
//!   kept in the history.
//! - A swap or rollback is atomic per controller and keeps every key's state
//!   (see [`Controller::swap`](crate::controller::Controller::swap)).
//! - The last [`RegistrySettings::keep`] loaded versions stay compiled, for
//!   instant rollback; older ones are forgotten (failed ones are kept in the
//!   history, without a plugin, up to twice as many entries).
//! - Unloading stops the controller after its work in flight. Its finalizer
//!   stays on the objects of its kinds: deleting one of them waits until the
//!   plugin is loaded again (or the object is deleted with `force`), so no
//!   delete is ever silently skipped.
//! - A controller keeps its name across versions: a swap may bring a plugin
//!   that calls itself otherwise in `describe()` (say, the Python `hello-py`
//!   for the Rust `hello`), as long as it reconciles the same kinds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::config::PluginConfig;
use crate::controller::{Manager, ManagerError};
use crate::plugin::{CacheOutcome, Plugin, Runtime};
use crate::store::{Store, now_ms};

/// How the registry keeps versions.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// Loaded versions kept compiled per plugin, the active one included.
    pub keep: usize,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self { keep: 3 }
    }
}

/// Why an operation was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Load(String),
    #[error("no plugin named {0:?} is loaded; `setpoint plugin ls` lists them")]
    NotFound(String),
    #[error("a plugin named {0:?} is already loaded: swap it instead")]
    Exists(String),
    #[error("{name} has no kept version {wanted}; kept: {kept}")]
    NoSuchVersion {
        name: String,
        wanted: String,
        kept: String,
    },
    #[error("{0}")]
    Manager(#[from] ManagerError),
}

/// One version of a plugin, as the registry saw it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionView {
    /// What `describe()` said, or empty if it never loaded.
    pub version: String,
    pub sha256: String,
    pub path: PathBuf,
    /// `loaded` (kept compiled), `failed`, or `forgotten` (loaded once, no
    /// longer kept).
    pub state: &'static str,
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub loaded_at: u64,
    pub activated_at: Option<u64>,
    pub active: bool,
}

/// A plugin as `GET /v1/plugins` shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PluginView {
    /// The controller's name.
    pub name: String,
    /// `running`, `failed` (no version ever loaded), or `unloaded`.
    pub state: &'static str,
    pub version: Option<String>,
    pub sha256: Option<String>,
    pub kinds: Vec<String>,
    pub path: Option<String>,
    pub cache: Option<CacheOutcome>,
    pub load_ms: Option<u64>,
    pub prune: bool,
    pub admission: bool,
    pub workers: Option<usize>,
    /// The newest error, if the newest attempt failed.
    pub error: Option<String>,
    pub history: Vec<VersionView>,
}

struct Version {
    view: VersionView,
    plugin: Option<Plugin>,
}

#[derive(Default)]
struct Entry {
    versions: Vec<Version>,
    running: bool,
}

/// The plugins of a daemon, by controller name.
pub struct Registry {
    runtime: Runtime,
    store: Store,
    manager: Arc<Manager>,
    settings: RegistrySettings,
    entries: Mutex<BTreeMap<String, Entry>>,
}

/// The name a plugin file goes by before (or without) its `describe()`.
pub fn name_of_path(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into(),
    )
}

impl Registry {
    pub fn new(
        runtime: Runtime,
        store: Store,
        manager: Arc<Manager>,
        settings: RegistrySettings,
    ) -> Self {
        Self {
            runtime,
            store,
            manager,
            settings,
            entries: Mutex::default(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Load and validate a version. The error is recorded under `name` (or
    /// the file's name) and returned.
    async fn validate(
        &self,
        name: Option<&str>,
        settings: &PluginConfig,
    ) -> Result<Plugin, RegistryError> {
        let path = settings.path.clone();
        let loaded = self
            .runtime
            .load(&path, settings.clone(), self.store.clone())
            .await;
        let metrics = self.manager.metrics();
        let outcome = match &loaded {
            Ok(p) if p.report().cache == CacheOutcome::Hit => "cached",
            Ok(_) => "compiled",
            Err(_) => "failed",
        };
        let label = match (name, &loaded) {
            (Some(n), _) => n.to_string(),
            (None, Ok(p)) => p.info().name.clone(),
            (None, Err(_)) => name_of_path(&path),
        };
        metrics.plugin_event(&metrics.plugin_loads, &label, outcome);
        match loaded {
            Ok(plugin) => Ok(plugin),
            Err(e) => {
                let error = e.to_string();
                tracing::error!(plugin = %label, "plugin not loaded: {error}");
                metrics.load_failed(&label);
                self.record(&label, failed(&path, &error));
                Err(RegistryError::Load(error))
            }
        }
    }

    fn record(&self, name: &str, version: Version) {
        let mut entries = self.entries();
        let entry = entries.entry(name.to_string()).or_default();
        if version.view.active {
            for v in &mut entry.versions {
                v.view.active = false;
            }
        }
        entry.versions.push(version);
        // Keep `keep` compiled loaded versions (the active one always).
        let mut loaded = 0;
        for v in entry.versions.iter_mut().rev() {
            if v.plugin.is_some() {
                loaded += 1;
                if loaded > self.settings.keep && !v.view.active {
                    v.plugin = None;
                    v.view.state = "forgotten";
                }
            }
        }
        let most = self.settings.keep.max(1) * 2 + 8;
        if entry.versions.len() > most {
            let drop = entry.versions.len() - most;
            let mut dropped = 0;
            entry.versions.retain(|v| {
                let go = dropped < drop && !v.view.active && v.plugin.is_none();
                dropped += usize::from(go);
                !go
            });
        }
    }

    /// Load a plugin that is not running yet: a new controller. A failure is
    /// recorded (shown by [`Registry::list`]) and returned.
    pub async fn load(&self, settings: PluginConfig) -> Result<PluginView, RegistryError> {
        let plugin = self.prepare(&settings).await?;
        self.start(plugin, &settings.path)
    }

    /// Validate a new plugin and register its finalizers, without starting
    /// it (see [`Registry::start`]).
    pub async fn prepare(&self, settings: &PluginConfig) -> Result<Plugin, RegistryError> {
        let plugin = self.validate(None, settings).await?;
        let name = plugin.info().name.clone();
        if self.entries().get(&name).is_some_and(|e| e.running) {
            return Err(RegistryError::Exists(name));
        }
        for kind in &plugin.info().kinds {
            self.store
                .register_finalizer(kind, &name)
                .map_err(|e| RegistryError::Load(e.to_string()))?;
        }
        Ok(plugin)
    }

    /// Start a controller for a [prepared](Registry::prepare) plugin from `path`.
    pub fn start(&self, plugin: Plugin, path: &Path) -> Result<PluginView, RegistryError> {
        let name = plugin.info().name.clone();
        self.manager.add(plugin.clone())?;
        self.record(&name, loaded(&plugin, true));
        // A file that failed under its file name before is this plugin now.
        let stem = name_of_path(path);
        if stem != name {
            self.entries().remove(&stem);
        }
        self.entries().get_mut(&name).expect("recorded").running = true;
        Ok(self.view(&name).expect("recorded"))
    }

    /// [Prepare](Registry::prepare) the plugins of a configuration at start:
    /// each one that fails is recorded and logged and left out.
    pub async fn prepare_all(&self, plugins: &[PluginConfig]) -> Vec<(Plugin, PathBuf)> {
        let mut prepared = Vec::new();
        for settings in plugins {
            if let Ok(plugin) = self.prepare(settings).await {
                prepared.push((plugin, settings.path.clone()));
            }
        }
        prepared
    }

    /// Swap the running plugin `name` for the component in `settings`: the new
    /// version is validated first; if it fails, `name` keeps its version and
    /// the error is returned and recorded.
    pub async fn swap(
        &self,
        name: &str,
        settings: PluginConfig,
    ) -> Result<PluginView, RegistryError> {
        if !self.entries().get(name).is_some_and(|e| e.running) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let plugin = match self.validate(Some(name), &settings).await {
            Ok(plugin) => plugin,
            Err(e) => {
                self.manager.metrics().swapped(name, "refused");
                return Err(e);
            }
        };
        if let Err(e) = self.manager.swap(name, plugin.clone()) {
            self.record(name, failed(&settings.path, &e.to_string()));
            self.manager.metrics().swapped(name, "refused");
            return Err(e.into());
        }
        self.manager.metrics().swapped(name, "swapped");
        self.record(name, loaded(&plugin, true));
        Ok(self.view(name).expect("recorded"))
    }

    /// Make an earlier kept version of `name` active again, without
    /// recompiling: `version`, or the newest kept one before the active one.
    pub fn rollback(&self, name: &str, version: Option<&str>) -> Result<PluginView, RegistryError> {
        let plugin = {
            let entries = self.entries();
            let entry = entries
                .get(name)
                .filter(|e| e.running)
                .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
            let active = entry.versions.iter().rposition(|v| v.view.active);
            let candidates = entry
                .versions
                .iter()
                .enumerate()
                .rev()
                .filter(|(i, v)| v.plugin.is_some() && Some(*i) != active);
            let mut chosen = None;
            for (i, v) in candidates {
                let older = active.is_none_or(|a| i < a);
                let wanted = match version {
                    Some(want) => v.view.version == want || v.view.sha256.starts_with(want),
                    None => older,
                };
                if wanted {
                    chosen = v.plugin.clone();
                    break;
                }
            }
            chosen.ok_or_else(|| RegistryError::NoSuchVersion {
                name: name.to_string(),
                wanted: version.unwrap_or("before the active one").to_string(),
                kept: entry
                    .versions
                    .iter()
                    .filter(|v| v.plugin.is_some())
                    .map(|v| format!("{} ({})", v.view.version, &v.view.sha256[..12]))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
        };
        self.manager.swap(name, plugin.clone())?;
        self.manager.metrics().swapped(name, "rolled-back");
        self.record(name, loaded(&plugin, true));
        Ok(self.view(name).expect("recorded"))
    }

    /// Stop the controller `name` after its work in flight. Its finalizer
    /// stays on its objects (see the module doc).
    pub async fn unload(&self, name: &str) -> Result<PluginView, RegistryError> {
        if !self.entries().get(name).is_some_and(|e| e.running) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        self.manager.remove_and_wait(name).await?;
        let mut entries = self.entries();
        let entry = entries.get_mut(name).expect("running");
        entry.running = false;
        for v in &mut entry.versions {
            v.view.active = false;
        }
        drop(entries);
        tracing::info!(plugin = %name, "unloaded; its finalizer stays on its objects");
        Ok(self.view(name).expect("recorded"))
    }

    /// One plugin's view.
    pub fn view(&self, name: &str) -> Option<PluginView> {
        let entries = self.entries();
        let entry = entries.get(name)?;
        let active = entry
            .versions
            .iter()
            .rev()
            .find(|v| v.view.active)
            .and_then(|v| v.plugin.clone());
        let newest_error = entry.versions.last().and_then(|v| v.view.error.clone());
        let state = if entry.running {
            "running"
        } else if entry.versions.iter().all(|v| v.view.state == "failed") {
            "failed"
        } else {
            "unloaded"
        };
        let p = active.as_ref();
        Some(PluginView {
            name: name.to_string(),
            state,
            version: p.map(|p| p.info().version.clone()),
            sha256: p.map(|p| p.report().sha256.clone()),
            kinds: p.map(|p| p.info().kinds.clone()).unwrap_or_default(),
            path: p.map(|p| p.report().path.display().to_string()),
            cache: p.map(|p| p.report().cache),
            load_ms: p.map(|p| p.report().took.as_millis() as u64),
            prune: p.is_some_and(|p| p.can_prune()),
            admission: p.is_some_and(|p| p.can_validate()),
            workers: p.map(|p| p.settings().workers),
            error: newest_error,
            history: entry.versions.iter().map(|v| v.view.clone()).collect(),
        })
    }

    /// Every plugin, by name.
    pub fn list(&self) -> Vec<PluginView> {
        let names: Vec<String> = self.entries().keys().cloned().collect();
        names.iter().filter_map(|n| self.view(n)).collect()
    }
}

fn loaded(plugin: &Plugin, active: bool) -> Version {
    let now = now_ms();
    Version {
        view: VersionView {
            version: plugin.info().version.clone(),
            sha256: plugin.report().sha256.clone(),
            path: plugin.report().path.clone(),
            state: "loaded",
            error: None,
            loaded_at: now,
            activated_at: active.then_some(now),
            active,
        },
        plugin: Some(plugin.clone()),
    }
}

fn failed(path: &Path, error: &str) -> Version {
    Version {
        view: VersionView {
            version: String::new(),
            sha256: String::new(),
            path: path.to_path_buf(),
            state: "failed",
            error: Some(error.to_string()),
            loaded_at: now_ms(),
            activated_at: None,
            active: false,
        },
        plugin: None,
    }
}
