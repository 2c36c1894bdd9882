//! The daemon's configuration, read from TOML. Every setting has a default, so an
//! empty file (or none at all) is the embedded single-node configuration.
//!
//! Durations are written the human way: `"250ms"`, `"5s"`, `"2m"`. Sizes are in
//! MiB. Unknown keys are refused with the key's name, so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Engine-wide settings: compile cache, epoch tick, instance pool.
    pub runtime: RuntimeConfig,
    /// The plugins to run, one controller each.
    #[serde(rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    /// Manifests (files or directories of `.yaml`/`.yml`/`.json`) applied at start.
    pub manifests: Vec<PathBuf>,
    /// Watch the `manifests` paths: a changed file is applied again, and the
    /// objects of a removed file (or of a document removed from one) are deleted.
    pub watch_manifests: bool,
    /// A folder of plugin components (`*.wasm`), each loaded with default
    /// settings as a controller of its own.
    pub plugin_dir: Option<PathBuf>,
    /// Watch `plugin-dir`: a new component is loaded, a changed one swapped
    /// in, a removed one unloaded.
    pub watch_plugins: bool,
    /// The HTTP admin API.
    pub api: ApiConfig,
    /// The embedded desired-state store.
    pub store: StoreConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            runtime: RuntimeConfig::default(),
            plugins: Vec::new(),
            manifests: Vec::new(),
            watch_manifests: true,
            plugin_dir: None,
            watch_plugins: true,
            api: ApiConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

/// Where the desired state lives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// The store file (redb). Default: `$XDG_DATA_HOME/setpoint/store.redb`, or
    /// `~/.local/share/setpoint/store.redb`.
    pub path: Option<PathBuf>,
    /// Keep the store in memory only: nothing survives a restart.
    pub in_memory: bool,
}

impl StoreConfig {
    /// The store file in effect, or `None` for an in-memory store.
    pub fn path(&self) -> anyhow::Result<Option<PathBuf>> {
        if self.in_memory {
            return Ok(None);
        }
        if let Some(path) = &self.path {
            return Ok(Some(path.clone()));
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .context(
                "neither XDG_DATA_HOME nor HOME is set, so the store has no default place: \
                 set [store] path",
            )?;
        Ok(Some(base.join("setpoint").join("store.redb")))
    }
}

/// The HTTP admin API and `/metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiConfig {
    /// Where to listen; port 0 picks a free port (the log says which).
    pub listen: std::net::SocketAddr,
    /// Serve the API at all.
    pub enabled: bool,
    /// A bearer token every request but `/healthz` and `/readyz` must carry
    /// (`Authorization: Bearer <token>`). Required when `listen` is not a
    /// loopback address.
    pub token: Option<String>,
    /// The largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
}

impl ApiConfig {
    /// Refuse an API reachable from other machines without a token.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.token.as_deref() == Some("") {
            bail!("api.token is empty: set a secret, or remove the key");
        }
        if self.enabled && !self.listen.ip().is_loopback() && self.token.is_none() {
            bail!(
                "api.listen is {}, which other machines can reach: set api.token (a bearer \
                 token clients must send) or listen on 127.0.0.1",
                self.listen
            );
        }
        Ok(())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7171)),
            enabled: true,
            token: None,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Settings shared by every plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeConfig {
    /// Where compiled components are cached. Default: `$XDG_CACHE_HOME/setpoint`
    /// or `~/.cache/setpoint`. Set `cache = false` to compile on every load.
    pub cache_dir: Option<PathBuf>,
    /// Cache compiled components on disk.
    pub cache: bool,
    /// How often the engine's epoch advances: the granularity of time limits.
    #[serde(with = "humantime_serde")]
    pub epoch_tick: Duration,
    /// Use wasmtime's pooling allocator (fast instantiation, memory reserved up
    /// front). With `false`, instances are allocated on demand.
    pub pooling: bool,
    /// The most instances alive at once across all plugins (pooling only).
    pub max_instances: u32,
    /// The largest memory limit any plugin may be given, in MiB (pooling only).
    pub max_memory_mib: u64,
    /// Threads that run controllers and so every plugin call, apart from the
    /// threads that serve the API and the store. 0 (the default): one fewer
    /// than the machine has cores, and at least one, so busy plugins always
    /// leave a core to the API.
    pub plugin_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache: true,
            epoch_tick: Duration::from_millis(10),
            pooling: true,
            max_instances: 256,
            max_memory_mib: 1024,
            plugin_threads: 0,
        }
    }
}

impl RuntimeConfig {
    /// The plugin threads in effect (see [`RuntimeConfig::plugin_threads`]).
    pub fn plugin_threads(&self) -> usize {
        if self.plugin_threads > 0 {
            return self.plugin_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }

    /// The cache directory in effect, if caching is on.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.cache {
            return None;
        }
        if let Some(dir) = &self.cache_dir {
            return Some(dir.clone());
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("setpoint").join("components"))
    }
}

/// How a worker gets the instance it calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// Each worker keeps a warm instance and reuses it, recycling it after a trap,
    /// a timeout, or `recycle-after` calls. About 1 µs per call.
    #[default]
    Warm,
    /// A fresh instance for every call: nothing survives between reconciles.
    /// About 35–50 µs per call.
    Fresh,
}

/// One plugin and the controller that runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginConfig {
    /// The component file.
    pub path: PathBuf,
    /// Workers reconciling keys in parallel.
    pub workers: usize,
    /// Warm (reused) or fresh (per call) instances.
    pub instances: InstanceMode,
    /// A warm instance is replaced after this many calls.
    pub recycle_after: u64,
    /// The most keys waiting at once; a full queue makes sources wait.
    pub queue_size: usize,
    /// Requeue and retry deadlines are rounded up to this step.
    #[serde(with = "humantime_serde")]
    pub delay_resolution: Duration,
    /// The most keys waiting on a delay (requeue or retry) at once.
    pub delay_capacity: usize,
    /// At shutdown: reconcile what is queued first (`drain`), or stop at once and
    /// leave it pending in the store (`hand-back`). Work in flight always finishes.
    pub shutdown: ShutdownMode,
    /// Reconcile every object again at this interval even when nothing changed.
    /// Default: what the plugin's `describe()` asks for, else never.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Option<Duration>,
    /// Run a full reconciliation at this interval: `prune` with the keys that
    /// should exist, then every object. Default: never (on demand only, through
    /// `POST /v1/controllers/<name>/full-reconcile`).
    #[serde(with = "humantime_serde")]
    pub full_reconcile_interval: Option<Duration>,
    /// Per-call and per-instance limits.
    pub limits: Limits,
    /// Retry back-off for failed reconciles.
    pub retry: RetryConfig,
    /// Capabilities granted beyond the host API. Nothing by default.
    pub grants: Grants,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            workers: 2,
            instances: InstanceMode::Warm,
            recycle_after: 10_000,
            queue_size: 10_000,
            delay_resolution: Duration::from_millis(10),
            delay_capacity: 1_000_000,
            shutdown: ShutdownMode::Drain,
            resync_interval: None,
            full_reconcile_interval: None,
            limits: Limits::default(),
            retry: RetryConfig::default(),
            grants: Grants::default(),
        }
    }
}

/// Limits on one plugin's instances and calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Linear memory per instance, in MiB. A call that grows past it fails.
    pub memory_mib: u64,
    /// The longest one call may run; past it the call is stopped and fails.
    #[serde(with = "humantime_serde")]
    pub max_reconcile_time: Duration,
    /// Tables per instance.
    pub tables: u32,
    /// Elements per table.
    pub table_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 128,
            max_reconcile_time: Duration::from_secs(5),
            tables: 20,
            table_elements: 100_000,
        }
    }
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

/// The shape of the back-off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackoffKind {
    /// `min-backoff * 2^(failures-1)`, capped at `max-backoff`, with jitter.
    #[default]
    Exponential,
    /// `min-backoff * failures`, capped at `max-backoff`.
    Linear,
}

/// Retries of failed reconciles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetryConfig {
    pub backoff: BackoffKind,
    /// The first delay (the step, for linear back-off).
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    /// The largest delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// The largest fraction (0.0–1.0) of an exponential delay taken off at random.
    pub jitter: f64,
    /// Give a key up after this many failed attempts in a row.
    pub max_retries: u32,
    /// Whether a new event replaces a pending retry.
    pub dequeue_policy: crate::queue::DequeuePolicy,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            backoff: BackoffKind::Exponential,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
            jitter: 0.1,
            max_retries: 10,
            dequeue_policy: crate::queue::DequeuePolicy::Opinionated,
        }
    }
}

/// Capabilities an operator grants a plugin. The default grants nothing: no
/// files, no environment, no network, no stdio.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    /// Host directories the plugin may use.
    pub dirs: Vec<DirGrant>,
    /// Environment variables the plugin sees.
    pub env: BTreeMap<String, String>,
    /// Let the plugin's stdout and stderr through to the host's.
    pub stdio: bool,
}

/// One preopened directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirGrant {
    /// The directory on the host. It is created if missing.
    pub host: PathBuf,
    /// Where the plugin sees it, e.g. `/data`.
    pub guest: String,
    /// Grant read access only.
    #[serde(default)]
    pub read_only: bool,
}

impl Config {
    /// Read and check a configuration file. Relative paths in it are taken
    /// relative to the file's folder.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let mut config = Self::parse(&text)
            .with_context(|| format!("configuration file {} is invalid", path.display()))?;
        if let Some(base) = path.parent() {
            config.resolve_relative_to(base);
        }
        Ok(config)
    }

    /// Parse and check configuration text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Config = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    fn resolve_relative_to(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(dir) = &mut self.runtime.cache_dir {
            fix(dir);
        }
        if let Some(path) = &mut self.store.path {
            fix(path);
        }
        self.manifests.iter_mut().for_each(fix);
        if let Some(dir) = &mut self.plugin_dir {
            fix(dir);
        }
        for plugin in &mut self.plugins {
            fix(&mut plugin.path);
            plugin.grants.dirs.iter_mut().for_each(|d| fix(&mut d.host));
        }
    }

    /// Refuse settings that cannot work, saying which and why.
    pub fn check(&self) -> anyhow::Result<()> {
        self.api.check()?;
        if self.api.max_body_bytes == 0 {
            bail!("api.max-body-bytes must be at least 1");
        }
        if self.runtime.epoch_tick.is_zero() {
            bail!("runtime.epoch-tick must be more than 0");
        }
        for (i, p) in self.plugins.iter().enumerate() {
            let at = format!("plugin #{} ({})", i + 1, p.path.display());
            if p.path.as_os_str().is_empty() {
                bail!("{at}: `path` is required: the component file to load");
            }
            if p.workers == 0 {
                bail!("{at}: `workers` must be at least 1");
            }
            if p.queue_size == 0 {
                bail!("{at}: `queue-size` must be at least 1");
            }
            if p.delay_resolution.is_zero() {
                bail!("{at}: `delay-resolution` must be more than 0");
            }
            if !(0.0..=1.0).contains(&p.retry.jitter) {
                bail!("{at}: `retry.jitter` must be between 0.0 and 1.0");
            }
            if p.recycle_after == 0 {
                bail!("{at}: `recycle-after` must be at least 1");
            }
            if p.limits.memory_mib == 0 {
                bail!("{at}: `limits.memory-mib` must be at least 1");
            }
            if self.runtime.pooling && p.limits.memory_mib > self.runtime.max_memory_mib {
                bail!(
                    "{at}: `limits.memory-mib` is {} but the instance pool allows at most {} \
                     (raise runtime.max-memory-mib)",
                    p.limits.memory_mib,
                    self.runtime.max_memory_mib
                );
            }
            if p.limits.max_reconcile_time < self.runtime.epoch_tick {
                bail!("{at}: `limits.max-reconcile-time` is shorter than runtime.epoch-tick");
            }
            if p.retry.min_backoff > p.retry.max_backoff {
                bail!("{at}: `retry.min-backoff` is larger than `retry.max-backoff`");
            }
            for d in &p.grants.dirs {
                if !d.guest.starts_with('/') {
                    bail!(
                        "{at}: granted guest path {:?} must be absolute, e.g. /data",
                        d.guest
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default_configuration() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn durations_and_grants_parse() {
        let c = Config::parse(
            r#"
            [[plugin]]
            path = "files.wasm"
            instances = "fresh"
            limits = { max-reconcile-time = "250ms", memory-mib = 32 }
            grants.dirs = [{ host = "out", guest = "/data" }]
            "#,
        )
        .unwrap();
        let p = &c.plugins[0];
        assert_eq!(p.instances, InstanceMode::Fresh);
        assert_eq!(p.limits.max_reconcile_time, Duration::from_millis(250));
        assert_eq!(p.limits.memory_mib, 32);
        assert_eq!(p.grants.dirs[0].guest, "/data");
    }

    #[test]
    fn the_readme_configuration_reference_parses_and_means_what_it_says() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Configuration reference")
            .nth(1)
            .expect("the README has a configuration reference");
        let toml = section
            .split("```toml\n")
            .nth(1)
            .and_then(|t| t.split("```").next())
            .expect("with a toml block");
        let c = Config::parse(toml).unwrap();
        assert!(c.watch_manifests);
        assert!(!c.store.in_memory);
        assert_eq!(c.api.max_body_bytes, 1024 * 1024);
        assert_eq!(c.plugins[0].retry.max_retries, 10);
    }

    #[test]
    fn the_store_defaults_to_the_data_folder_and_can_stay_in_memory() {
        let c = Config::parse("[store]\nin-memory = true\n").unwrap();
        assert_eq!(c.store.path().unwrap(), None);
        let c = Config::parse("[store]\npath = \"/tmp/x.redb\"\n").unwrap();
        assert_eq!(c.store.path().unwrap(), Some(PathBuf::from("/tmp/x.redb")));
        let c = Config::parse(
            "[[plugin]]\npath = \"a.wasm\"\nresync-interval = \"10m\"\nfull-reconcile-interval = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(c.plugins[0].resync_interval, Some(Duration::from_secs(600)));
        assert_eq!(
            c.plugins[0].full_reconcile_interval,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[runtime]\nepoch-tik = \"1ms\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("epoch-tik"), "{err:#}");
    }

    #[test]
    fn an_api_reachable_from_other_machines_needs_a_token() {
        let err = Config::parse("[api]\nlisten = \"0.0.0.0:7171\"\n").unwrap_err();
        assert!(err.to_string().contains("api.token"), "{err}");
        Config::parse("[api]\nlisten = \"0.0.0.0:7171\"\ntoken = \"s3cret\"\n").unwrap();
        Config::parse("[api]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    }

    #[test]
    fn impossible_settings_are_refused_with_the_reason() {
        let err = Config::parse("[[plugin]]\npath = \"a.wasm\"\nworkers = 0\n").unwrap_err();
        assert!(err.to_string().contains("workers"), "{err}");
        let err = Config::parse("[[plugin]]\nworkers = 1\n").unwrap_err();
        assert!(err.to_string().contains("path"), "{err}");
    }
}
