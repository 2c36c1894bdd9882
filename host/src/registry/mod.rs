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
//!   for the Rust `hello`). Its name, and so its key-value store, is its
//!   manifest's or configuration's `name`, else what `describe()` says.
//! - A version whose manifest ([`PluginSpec`]) pins a sha256, a version or
//!   kinds it does not have, or asks for a capability the operator did not
//!   grant ([`RegistrySettings::grants`]), is refused, naming what differs.
//! - A version the trust policy ([`RegistrySettings::trust`]) does not accept
//!   (unsigned, changed after signing, or signed by keys it does not take) is
//!   refused before it is compiled, naming the check and the keys tried.
//! - The kinds a plugin that failed to load declares in its manifest stay
//!   known ([`Registry::kinds`]): their objects are accepted and wait,
//!   pending, held by its finalizer, until a version loads.
//! - A swap may change the kinds: finalizers are registered for added kinds
//!   before the switch and their objects queued; dropped kinds are treated as
//!   an unload of those kinds (their finalizer stays, see above).
//! - A spec whose path is an `oci://` reference is pulled into the cache
//!   [`RegistrySettings::oci_cache`] first (or found there, see
//!   [`crate::oci`]); from then on it is checked and loaded exactly as a local
//!   file, its signatures being the ones that came with it. The version
//!   records the reference pinned to the manifest digest (`source`), so a tag
//!   that moves later does not change what it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::controller::{KnownKinds, Manager, ManagerError};
use crate::oci::OciRef;
use crate::plugin::{CacheOutcome, Grants, Plugin, Runtime, Settings};
use crate::store::{Store, now_ms};
use crate::trust::{Policy, Signed, signature_path};

mod spec;

pub use spec::{Expect, GrantTable, PluginSpec};

/// Finds the manifest of a component file: `Ok(None)` if it has none.
pub type Resolver = Arc<dyn Fn(&Path) -> Result<Option<PluginSpec>, String> + Send + Sync>;

/// How the registry keeps versions.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// Loaded versions kept compiled per plugin, the active one included.
    pub keep: usize,
    /// What the operator grants each plugin, by name: what a manifest's
    /// capabilities are checked against.
    pub grants: GrantTable,
    /// Whose signatures a component needs before it loads.
    pub trust: Policy,
    /// Where components pulled from OCI registries are cached.
    pub oci_cache: PathBuf,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            keep: 3,
            grants: GrantTable::new(),
            trust: Policy::default(),
            oci_cache: crate::plugin::RuntimeConfig::default().oci_cache_dir(),
        }
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
    /// Where it came from, if from a registry: the reference pinned to the
    /// manifest digest, `oci://HOST/REPO@sha256:...`.
    pub source: Option<String>,
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
    /// The active version's pinned `oci://` reference, if from a registry.
    pub source: Option<String>,
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
    /// The kinds its manifest declares, known even if no version loaded.
    declared: Vec<String>,
}

/// The plugins of a daemon, by controller name.
pub struct Registry {
    runtime: Runtime,
    store: Store,
    manager: Arc<Manager>,
    settings: RegistrySettings,
    resolve: Resolver,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Pulled component files, with the pinned reference each came from.
    pulled: Mutex<BTreeMap<PathBuf, String>>,
}

/// The name a plugin file (or `oci://` reference: its repository's last
/// part) goes by before (or without) its `describe()`.
pub fn name_of_path(path: &Path) -> String {
    if let Some(reference) = path.to_str().and_then(|p| OciRef::parse(p).ok()) {
        return reference.name().to_string();
    }
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
            resolve: Arc::new(|_| Ok(None)),
            entries: Mutex::default(),
            pulled: Mutex::default(),
        }
    }

    /// Find components' manifests with `resolve` (see [`Registry::load_path`]).
    pub fn with_resolver(mut self, resolve: Resolver) -> Self {
        self.resolve = resolve;
        self
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Load and validate a version against its spec. The error is recorded
    /// under `name` (or the spec's name, or the file's) and returned.
    async fn validate(
        &self,
        name: Option<&str>,
        spec: &PluginSpec,
    ) -> Result<Plugin, RegistryError> {
        let label = name
            .map(str::to_string)
            .or_else(|| spec.settings.name.clone())
            .unwrap_or_else(|| name_of_path(&spec.path));
        let loaded = self.load_checked(name, spec).await;
        let metrics = self.manager.metrics();
        let outcome = match &loaded {
            Ok(p) if p.report().cache == CacheOutcome::Hit => "cached",
            Ok(_) => "compiled",
            Err(_) => "failed",
        };
        let label = match &loaded {
            Ok(p) if name.is_none() => p.info().name.clone(),
            _ => label,
        };
        metrics.plugin_event(&metrics.plugin_loads, &label, outcome);
        match loaded {
            Ok(plugin) => Ok(plugin),
            Err(error) => {
                tracing::error!(plugin = %label, "plugin not loaded: {error}");
                metrics.load_failed(&label);
                self.record(&label, failed(&spec.path, &error));
                let declared = spec.expect.kinds.clone().unwrap_or_default();
                let running = {
                    let mut entries = self.entries();
                    let entry = entries.entry(label.clone()).or_default();
                    if !declared.is_empty() {
                        entry.declared = declared.clone();
                    }
                    entry.running
                };
                if !running {
                    // Its objects wait for it, held by its finalizer.
                    for kind in &declared {
                        if let Err(e) = self.store.register_finalizer(kind, &label) {
                            tracing::error!(plugin = %label, "cannot register the finalizer: {e}");
                        }
                    }
                }
                Err(RegistryError::Load(error))
            }
        }
    }

    /// Fetch (pull an `oci://` reference into the cache), read, pin-check,
    /// trust-check, load, and hold to the spec: the plugin with the grants it
    /// is to run with.
    /// A version of the running `name` kept compiled, loaded from the same
    /// file, bytes and settings: swapping back to it needs no compile,
    /// deserialization or `describe()`, as a rollback.
    async fn load_checked(&self, name: Option<&str>, spec: &PluginSpec) -> Result<Plugin, String> {
        let path = &self.fetch(&spec.path).await?;
        let bytes = self.runtime.read(path).await.map_err(|e| e.to_string())?;
        let sha256 = crate::plugin::sha256_hex(&bytes);
        // Named as the spec names it: the file, or the `oci://` reference.
        spec.expect.check_sha256(&spec.path, &sha256)?;
        let signed = Signed {
            sha256: sha256.clone(),
            name: spec.expect.name.clone().unwrap_or_default(),
            version: spec.expect.version.clone().unwrap_or_default(),
        };
        let signatures = tokio::fs::read_to_string(signature_path(path)).await.ok();
        let under = name
            .map(str::to_string)
            .or_else(|| spec.settings.name.clone())
            .unwrap_or_else(|| name_of_path(&spec.path));
        self.settings
            .trust
            .check(&under, &signed, signatures.as_deref())?;
        let mut settings = spec.settings.clone();
        if spec.capabilities.is_some() {
            // Nothing until the request is checked against the grants.
            settings.grants = Grants::default();
        }
        let kept = name.and_then(|name| {
            self.kept(name, path, &sha256, &settings, spec.capabilities.is_some())
        });
        let plugin = match kept {
            Some(plugin) => plugin,
            None => self
                .runtime
                .load_bytes(path, bytes, settings, self.store.clone())
                .await
                .map_err(|e| e.to_string())?,
        };
        spec.expect.check(&plugin)?;
        let Some(asked) = &spec.capabilities else {
            plugin.check_granted()?;
            return Ok(plugin);
        };
        let name = &plugin.info().name;
        let offered = self.settings.grants.get(name).or(spec.granted.as_ref());
        let grants = asked.granted_by(name, offered)?;
        plugin.with_grants(grants)
    }

    /// The file to load for `path`: itself, or for an `oci://` reference the
    /// component pulled into the cache (or found there).
    async fn fetch(&self, path: &Path) -> Result<PathBuf, String> {
        if !crate::oci::is_reference(path) {
            return Ok(path.to_path_buf());
        }
        let reference = OciRef::parse(&path.to_string_lossy())?;
        let pulled = crate::oci::Cache::new(&self.settings.oci_cache)
            .pull(&reference)
            .await?;
        tracing::info!(
            %reference,
            pinned = %pulled.pinned,
            cached = pulled.cached,
            signed = pulled.signed,
            "pulled"
        );
        self.pulled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pulled.path.clone(), pulled.pinned.to_string());
        Ok(pulled.path)
    }

    /// The pinned reference a loaded file was pulled from, if it was.
    fn source(&self, plugin: &Plugin) -> Option<String> {
        let pulled = self.pulled.lock().unwrap_or_else(|e| e.into_inner());
        pulled.get(&plugin.report().path).cloned()
    }

    fn kept(
        &self,
        name: &str,
        path: &Path,
        sha256: &str,
        settings: &Settings,
        regrant: bool,
    ) -> Option<Plugin> {
        let entries = self.entries();
        entries.get(name)?.versions.iter().rev().find_map(|v| {
            let p = v.plugin.as_ref()?;
            let mut loaded_with = p.settings().clone();
            // Every version kept under `name` runs under that name.
            loaded_with.name = settings.name.clone();
            if regrant {
                // Granted after loading, from the capabilities asked for.
                loaded_with.grants = Grants::default();
            }
            let same = p.report().sha256 == sha256 && p.report().path == path;
            (same && p.info().name == name && loaded_with == *settings).then(|| p.clone())
        })
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
    pub async fn load(&self, spec: PluginSpec) -> Result<PluginView, RegistryError> {
        let plugin = self.prepare(&spec).await?;
        self.start(plugin, &spec)
    }

    /// [Load](Registry::load) the component at `path` with its manifest (see
    /// [`Registry::with_resolver`]), or with default settings if it has none.
    pub async fn load_path(&self, path: &Path) -> Result<PluginView, RegistryError> {
        let spec = self.resolve(path)?.unwrap_or_else(|| PluginSpec::new(path));
        self.load(spec).await
    }

    fn resolve(&self, path: &Path) -> Result<Option<PluginSpec>, RegistryError> {
        (self.resolve)(path).map_err(|e| {
            let label = name_of_path(path);
            self.manager.metrics().load_failed(&label);
            self.record(&label, failed(path, &e));
            RegistryError::Load(e)
        })
    }

    /// Validate a new plugin and register its finalizers, without starting
    /// it (see [`Registry::start`]).
    pub async fn prepare(&self, spec: &PluginSpec) -> Result<Plugin, RegistryError> {
        let plugin = self.validate(None, spec).await?;
        let name = plugin.info().name.clone();
        if self.entries().get(&name).is_some_and(|e| e.running) {
            return Err(RegistryError::Exists(name));
        }
        for kind in &plugin.info().kinds {
            self.store
                .register_finalizer(kind, &name)
                .map_err(|e| RegistryError::Load(e.to_string()))?;
        }
        // Known from now on: objects applied before it starts are kept.
        self.entries().entry(name).or_default().declared = plugin.info().kinds.clone();
        Ok(plugin)
    }

    /// Start a controller for a [prepared](Registry::prepare) plugin.
    pub fn start(&self, plugin: Plugin, spec: &PluginSpec) -> Result<PluginView, RegistryError> {
        let name = plugin.info().name.clone();
        self.manager.add(plugin.clone(), spec.engine.clone())?;
        self.record(&name, self.loaded(&plugin));
        // A file that failed under its file name before is this plugin now.
        let stem = name_of_path(&spec.path);
        if stem != name {
            self.entries().remove(&stem);
        }
        self.entries().get_mut(&name).expect("recorded").running = true;
        Ok(self.view(&name).expect("recorded"))
    }

    /// [Prepare](Registry::prepare) the plugins of a configuration at start:
    /// each one that fails is recorded and logged and left out.
    pub async fn prepare_all(&self, specs: &[PluginSpec]) -> Vec<(Plugin, PluginSpec)> {
        let mut prepared = Vec::new();
        for spec in specs {
            if let Ok(plugin) = self.prepare(spec).await {
                prepared.push((plugin, spec.clone()));
            }
        }
        prepared
    }

    /// Swap in the component at `path` for the running plugin `name`, with
    /// its manifest if it has one, else with the running version's settings.
    pub async fn swap_path(&self, name: &str, path: &Path) -> Result<PluginView, RegistryError> {
        let spec = match self.resolve(path)? {
            Some(spec) => spec,
            None => {
                let running = self
                    .manager
                    .controller(name)
                    .and_then(|c| c.plugin())
                    .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
                PluginSpec {
                    settings: running.settings().clone(),
                    ..PluginSpec::new(path)
                }
            }
        };
        self.swap(name, spec).await
    }

    /// Swap the running plugin `name` for the component in `spec`: the new
    /// version is validated first; if it fails, `name` keeps its version and
    /// the error is returned and recorded. The controller keeps its engine
    /// settings and its name.
    pub async fn swap(
        &self,
        name: &str,
        mut spec: PluginSpec,
    ) -> Result<PluginView, RegistryError> {
        if !self.entries().get(name).is_some_and(|e| e.running) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let refused = |e: RegistryError| {
            self.manager.metrics().swapped(name, "refused");
            Err(e)
        };
        if let Some(other) = spec.settings.name.as_deref().filter(|n| *n != name) {
            let e = format!(
                "the manifest of {} names plugin {other}, not {name}: swap it into {other}, or \
                 fix the manifest's `name`",
                spec.path.display()
            );
            self.record(name, failed(&spec.path, &e));
            return refused(RegistryError::Load(e));
        }
        spec.settings.name = Some(name.to_string());
        let plugin = match self.validate(Some(name), &spec).await {
            Ok(plugin) => plugin,
            Err(e) => return refused(e),
        };
        if let Err(e) = self.activate(name, &plugin, "swapped") {
            self.record(name, failed(&spec.path, &e.to_string()));
            return refused(e);
        }
        Ok(self.view(name).expect("recorded"))
    }

    /// Make `plugin` the active version of the running `name`: hold the
    /// objects of kinds it adds, switch, count it as `result`, record it.
    fn activate(&self, name: &str, plugin: &Plugin, result: &str) -> Result<(), RegistryError> {
        let old = self
            .manager
            .controller(name)
            .map(|c| c.info().kinds)
            .unwrap_or_default();
        for kind in plugin.info().kinds.iter().filter(|k| !old.contains(k)) {
            self.store.register_finalizer(kind, name).map_err(|e| {
                RegistryError::Load(format!("cannot hold objects of kind {kind}: {e}"))
            })?;
        }
        self.manager.swap(name, plugin.clone())?;
        self.manager.metrics().swapped(name, result);
        self.record(name, self.loaded(plugin));
        if let Some(entry) = self.entries().get_mut(name) {
            entry.declared = plugin.info().kinds.clone();
        }
        Ok(())
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
        self.activate(name, &plugin, "rolled-back")?;
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
        entry.declared.clear();
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
            kinds: p.map_or_else(|| entry.declared.clone(), |p| p.info().kinds.clone()),
            path: p.map(|p| p.report().path.display().to_string()),
            source: p.and_then(|p| self.source(p)),
            cache: p.map(|p| p.report().cache),
            load_ms: p.map(|p| p.report().took.as_millis() as u64),
            prune: p.is_some_and(|p| p.can_prune()),
            admission: p.is_some_and(|p| p.can_validate()),
            workers: entry
                .running
                .then(|| self.manager.controller(name).map(|c| c.engine().workers))
                .flatten(),
            error: newest_error,
            history: entry.versions.iter().map(|v| v.view.clone()).collect(),
        })
    }

    /// Every kind a running or starting plugin reconciles or a plugin that
    /// failed to load declares, with the plugins of each. An unloaded
    /// plugin's kinds are not (unless another plugin reconciles them).
    pub fn kinds(&self) -> BTreeMap<String, Vec<String>> {
        let mut kinds = self.manager.kinds_running();
        for (name, entry) in self.entries().iter() {
            {
                for kind in &entry.declared {
                    let names = kinds.entry(kind.clone()).or_default();
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
            }
        }
        kinds
    }

    /// Every plugin, by name.
    pub fn list(&self) -> Vec<PluginView> {
        let names: Vec<String> = self.entries().keys().cloned().collect();
        names.iter().filter_map(|n| self.view(n)).collect()
    }
}

impl Registry {
    /// The active version `plugin`, just loaded.
    fn loaded(&self, plugin: &Plugin) -> Version {
        let now = now_ms();
        Version {
            view: VersionView {
                version: plugin.info().version.clone(),
                sha256: plugin.report().sha256.clone(),
                path: plugin.report().path.clone(),
                source: self.source(plugin),
                state: "loaded",
                error: None,
                loaded_at: now,
                activated_at: Some(now),
                active: true,
            },
            plugin: Some(plugin.clone()),
        }
    }
}

fn failed(path: &Path, error: &str) -> Version {
    Version {
        view: VersionView {
            version: String::new(),
            sha256: String::new(),
            path: path.to_path_buf(),
            source: None,
            state: "failed",
            error: Some(error.to_string()),
            loaded_at: now_ms(),
            activated_at: None,
            active: false,
        },
        plugin: None,
    }
}

impl KnownKinds for Registry {
    fn kinds(&self) -> BTreeMap<String, Vec<String>> {
        Registry::kinds(self)
    }
}
