//! One plugin's table: a `[[plugin]]` in the daemon's configuration, or the
//! same keys in a manifest file beside the component (`NAME.toml` next to
//! `NAME.wasm`). Either is the plugin's manifest: its name, pins (version,
//! sha256, kinds), engine and instance settings, and the capabilities it asks
//! for. This module maps it onto what the layers below take: the registry's
//! [`PluginSpec`], with the runtime's [`Settings`] and the controller's
//! [`Engine`].
//!
//! Guarantees: a manifest file never grants itself anything (a `grants` key
//! in one is refused, saying where grants go); a table is checked (workers,
//! limits, back-off ...) before anything loads, naming the key that is wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::{Capabilities, Grants, InstanceMode, Limits, RuntimeConfig, ShutdownMode};
use crate::controller::Engine;
use crate::plugin::Settings;
use crate::queue::Backoff;
use crate::registry::{Expect, PluginSpec};

/// One plugin and the controller that runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginConfig {
    /// The component file, or an `oci://HOST/REPO:TAG` or
    /// `oci://HOST/REPO@sha256:DIGEST` reference to pull it from a registry.
    /// In a manifest file (`NAME.toml`), default: the `NAME.wasm` beside it.
    pub path: PathBuf,
    /// The controller's name (and its key-value store's). Default: what the
    /// plugin's `describe()` says.
    pub name: Option<String>,
    /// The version the plugin's `describe()` must give.
    pub version: Option<String>,
    /// The component's sha256 in hex: any other file is refused.
    pub sha256: Option<String>,
    /// The kinds it reconciles; its `describe()` must list the same. Objects
    /// of these kinds wait for the plugin if it fails to load, instead of
    /// being refused.
    pub kinds: Option<Vec<String>>,
    /// Workers reconciling keys in parallel.
    pub workers: usize,
    /// Warm (reused) or fresh (per call) instances.
    pub instances: InstanceMode,
    /// A warm instance is replaced after this many calls.
    pub recycle_after: u64,
    /// The most keys waiting at once; a full queue makes sources wait.
    pub queue_size: usize,
    /// The most keys one call reconciles, for a plugin that exports
    /// `batch-reconciler` (the Rust SDK's do). A round takes only the keys
    /// already queued for a worker, never waiting for more. 1 turns rounds off.
    pub round_size: usize,
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
    /// What the plugin asks for beyond the host API (directories, environment
    /// variables, stdio). Checked against the operator's grants: `[grants.NAME]`,
    /// else this table's `grants`. A plugin that asks for more is refused.
    pub capabilities: Option<Capabilities>,
    /// Capabilities granted beyond the host API. Nothing by default. Only the
    /// operator's configuration grants: a manifest file may not.
    pub grants: Grants,
}

impl Default for PluginConfig {
    fn default() -> Self {
        let engine = Engine::default();
        let settings = Settings::default();
        Self {
            path: PathBuf::new(),
            name: None,
            version: None,
            sha256: None,
            kinds: None,
            workers: engine.workers,
            instances: settings.instances,
            recycle_after: settings.recycle_after,
            queue_size: engine.queue_size,
            round_size: engine.round_size,
            delay_resolution: engine.delay_resolution,
            delay_capacity: engine.delay_capacity,
            shutdown: engine.shutdown,
            resync_interval: engine.resync_interval,
            full_reconcile_interval: engine.full_reconcile_interval,
            limits: settings.limits,
            retry: RetryConfig::default(),
            capabilities: None,
            grants: settings.grants,
        }
    }
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
        let engine = Engine::default();
        let (backoff, min_backoff, max_backoff, jitter) = match engine.backoff {
            Backoff::Exponential { min, max, jitter } => {
                (BackoffKind::Exponential, min, max, jitter)
            }
            Backoff::Linear { base, max } => (BackoffKind::Linear, base, max, 0.0),
        };
        Self {
            backoff,
            min_backoff,
            max_backoff,
            jitter,
            max_retries: engine.max_retries,
            dequeue_policy: engine.dequeue,
        }
    }
}

impl PluginConfig {
    /// Refuse settings that cannot work, saying which and why (`at` names
    /// the table in messages).
    pub fn check(&self, at: &str, runtime: &RuntimeConfig) -> anyhow::Result<()> {
        let p = self;
        if p.path.as_os_str().is_empty() {
            bail!("{at}: `path` is required: the component file to load");
        }
        if crate::oci::is_reference(&p.path) {
            let text = p.path.to_string_lossy();
            crate::oci::OciRef::parse(&text).map_err(|e| anyhow::anyhow!("{at}: `path`: {e}"))?;
        }
        if p.workers == 0 {
            bail!("{at}: `workers` must be at least 1");
        }
        if p.queue_size == 0 {
            bail!("{at}: `queue-size` must be at least 1");
        }
        if p.round_size == 0 {
            bail!("{at}: `round-size` must be at least 1 (1 reconciles one key per call)");
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
        if runtime.pooling && p.limits.memory_mib > runtime.max_memory_mib {
            bail!(
                "{at}: `limits.memory-mib` is {} but the instance pool allows at most {} \
                 (raise runtime.max-memory-mib)",
                p.limits.memory_mib,
                runtime.max_memory_mib
            );
        }
        if p.limits.max_reconcile_time < runtime.epoch_tick {
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
        if let Some(name) = &p.name {
            crate::object::check_name("name", name).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        }
        if let Some(sha) = &p.sha256
            && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!("{at}: `sha256` must be 64 hex digits (`sha256sum FILE` prints it)");
        }
        if p.kinds.as_ref().is_some_and(Vec::is_empty) {
            bail!("{at}: `kinds` is empty: list the kinds the plugin reconciles, or leave it out");
        }
        Ok(())
    }

    /// The controller's engine settings.
    pub fn engine(&self) -> Engine {
        let backoff = match self.retry.backoff {
            BackoffKind::Exponential => Backoff::Exponential {
                min: self.retry.min_backoff,
                max: self.retry.max_backoff,
                jitter: self.retry.jitter,
            },
            BackoffKind::Linear => Backoff::Linear {
                base: self.retry.min_backoff,
                max: self.retry.max_backoff,
            },
        };
        Engine {
            workers: self.workers,
            queue_size: self.queue_size,
            round_size: self.round_size,
            delay_resolution: self.delay_resolution,
            delay_capacity: self.delay_capacity,
            backoff,
            max_retries: self.retry.max_retries,
            dequeue: self.retry.dequeue_policy,
            shutdown: self.shutdown,
            resync_interval: self.resync_interval,
            full_reconcile_interval: self.full_reconcile_interval,
            stall_after: crate::controller::stall_after(self.limits.max_reconcile_time),
            ..Engine::default()
        }
    }

    /// The plugin runtime's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            name: self.name.clone(),
            instances: self.instances,
            recycle_after: self.recycle_after,
            limits: self.limits.clone(),
            grants: self.grants.clone(),
        }
    }

    /// What the registry loads: an inline `[[plugin]]` table, whose `grants`
    /// are the operator's.
    pub fn spec(&self) -> PluginSpec {
        PluginSpec {
            path: self.path.clone(),
            settings: self.settings(),
            engine: self.engine(),
            expect: Expect {
                name: self.name.clone(),
                sha256: self.sha256.clone(),
                version: self.version.clone(),
                kinds: self.kinds.clone(),
            },
            capabilities: self.capabilities.clone(),
            granted: Some(self.grants.clone()),
        }
    }

    /// Read a manifest file: a plugin table in a file of its own. Its `path`
    /// (relative to the file) defaults to the `.wasm` of the same name.
    pub fn read_manifest(file: &Path, runtime: &RuntimeConfig) -> anyhow::Result<PluginConfig> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read plugin manifest {}", file.display()))?;
        let mut manifest: PluginConfig = toml::from_str(&text)
            .with_context(|| format!("plugin manifest {} is invalid", file.display()))?;
        if manifest.grants != Grants::default() {
            bail!(
                "plugin manifest {} has `grants`, but a plugin cannot grant itself anything: \
                 ask in [capabilities]; the operator grants them in the daemon's \
                 configuration under [grants.NAME]",
                file.display()
            );
        }
        let base = file.parent().unwrap_or(Path::new("."));
        manifest.path = if manifest.path.as_os_str().is_empty() {
            file.with_extension("wasm")
        } else if crate::oci::is_reference(&manifest.path) {
            manifest.path
        } else {
            base.join(&manifest.path)
        };
        manifest.check(&format!("plugin manifest {}", file.display()), runtime)?;
        Ok(manifest)
    }

    /// A manifest file's spec: nothing granted but what the operator's
    /// `[grants.NAME]` holds.
    pub fn manifest_spec(&self) -> PluginSpec {
        PluginSpec {
            granted: None,
            ..self.spec()
        }
    }
}

impl From<PluginConfig> for Settings {
    fn from(c: PluginConfig) -> Self {
        c.settings()
    }
}

impl From<&PluginConfig> for Engine {
    fn from(c: &PluginConfig) -> Self {
        c.engine()
    }
}

/// Finds a component's manifest for the registry: the `[[plugin]]` table of
/// `plugins` naming the file, else a manifest file (`NAME.toml` beside
/// `NAME.wasm`, or the file itself if it is a `.toml`), else none.
pub fn resolver(plugins: Vec<PluginConfig>, runtime: RuntimeConfig) -> crate::registry::Resolver {
    Arc::new(move |path: &Path| {
        if let Some(table) = plugins.iter().find(|p| same_file(&p.path, path)) {
            return Ok(Some(table.spec()));
        }
        if crate::oci::is_reference(path) {
            // No manifest file beside a registry's component.
            return Ok(None);
        }
        let manifest = if path.extension().is_some_and(|e| e == "toml") {
            path.to_path_buf()
        } else {
            path.with_extension("toml")
        };
        if !manifest.is_file() {
            return Ok(None);
        }
        let table =
            PluginConfig::read_manifest(&manifest, &runtime).map_err(|e| format!("{e:#}"))?;
        Ok(Some(table.manifest_spec()))
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(a), Ok(b)) if a == b
        )
}
