//! The engine, the linker and loading: from a component file to a [`Plugin`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::{CacheOutcome, CompileCache, sha256_hex};
use super::compat;
use super::http::{DeniedCounter, HttpPolicy, imports_outgoing_http};
use super::imports::{HostContext, HostState};
use super::instance::{self, CallError, Instance};
use super::settings::{Grants, RuntimeConfig, Settings};
use super::wit;
use crate::store::Store;

/// Why a file could not become a plugin. Each message is one paragraph that says
/// what was wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The OS error is in the message, so it is not also the error's source
    // (which `{:#}` would print a second time).
    #[error("cannot read plugin {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path} is not a WebAssembly file: it does not start with the `\\0asm` magic bytes. \
         A plugin is a component built for wasm32-wasip2 (e.g. `cargo xtask plugins`)"
    )]
    NotWasm { path: PathBuf },
    #[error(
        "{path} is a core WebAssembly module, not a component. Build it for the \
         wasm32-wasip2 target, or wrap it with `wasm-tools component new`"
    )]
    CoreModule { path: PathBuf },
    #[error(
        "{path} is not a valid component: {reason}. The file may be truncated or corrupt; \
         rebuild the plugin"
    )]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} cannot be loaded: {reason}")]
    Incompatible { path: PathBuf, reason: String },
    #[error(
        "{path} imports `{import}`, which this host does not provide. A plugin may import \
         only the setpoint:reconciler host interfaces and WASI 0.2"
    )]
    MissingImport { path: PathBuf, import: String },
    #[error(
        "{path} imports `{function}` from `{import}`, which this host does not provide: it \
         implements {package}@{version}, and the plugin was built against a newer 0.1.x. Run \
         a newer Setpoint, or rebuild the plugin against this host's WIT"
    )]
    MissingFunction {
        path: PathBuf,
        import: String,
        function: String,
        package: &'static str,
        version: &'static str,
    },
    #[error("{path} loaded, but its describe() failed: {reason}")]
    Describe { path: PathBuf, reason: String },
    #[error("plugin {path}: {reason}")]
    Setup { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    NotGranted { path: PathBuf, reason: String },
}

/// What one load did: which component, and whether it was compiled.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReport {
    pub path: PathBuf,
    pub sha256: String,
    pub cache: CacheOutcome,
    #[serde(with = "humantime_serde")]
    pub took: Duration,
    /// The name `describe()` gave, which [`Settings::name`] may override.
    pub described_as: String,
}

/// The wasmtime engine, linker and compile cache. One per process; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    cache: CompileCache,
    epoch_tick: Duration,
    http_denied: DeniedCounter,
    _ticker: EpochTicker,
}

/// Advances the engine's epoch every tick on a thread of its own, until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("setpoint-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Runtime {
    /// Build the engine and linker for `config`.
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Self> {
        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true).epoch_interruption(true);
        if config.pooling {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(config.max_instances)
                .total_core_instances(config.max_instances.saturating_mul(8))
                .total_memories(config.max_instances.saturating_mul(2))
                .total_tables(config.max_instances.saturating_mul(8))
                .total_stacks(config.max_instances)
                .max_memory_size((config.max_memory_mib as usize).saturating_mul(1 << 20));
            wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&wasm)
            .map_err(anyhow::Error::from)
            .context("cannot configure the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Linked for every plugin; only a granted one may import it, and its
        // requests pass the allow-list (see `plugin::http`).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        wit::PluginWithBatch::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        let cache = CompileCache::new(&engine, config.cache_dir());
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick);
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache,
                epoch_tick: config.epoch_tick,
                http_denied: DeniedCounter::default(),
                _ticker: ticker,
            }),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The compile cache, e.g. to count compilations.
    pub fn cache(&self) -> &CompileCache {
        &self.inner.cache
    }

    /// Outgoing HTTP requests refused by the allow-list, by plugin: the
    /// daemon exports it as `setpoint_plugin_http_denied_total`.
    pub fn http_denied(&self) -> &DeniedCounter {
        &self.inner.http_denied
    }

    /// Epoch ticks a call of `limit` gets (at least one).
    pub(super) fn ticks_for(&self, limit: Duration) -> u64 {
        let tick = self.inner.epoch_tick.as_nanos().max(1);
        (limit.as_nanos().div_ceil(tick) as u64).max(1)
    }

    /// Load a component file as a plugin backed by `store`, refusing it if
    /// it imports a capability its settings do not grant.
    pub async fn load(
        &self,
        path: &Path,
        settings: impl Into<Settings>,
        store: Store,
    ) -> Result<Plugin, LoadError> {
        let bytes = self.read(path).await?;
        let plugin = self.load_bytes(path, bytes, settings.into(), store).await?;
        plugin
            .check_granted()
            .map_err(|reason| LoadError::NotGranted {
                path: path.to_path_buf(),
                reason,
            })?;
        Ok(plugin)
    }

    /// A component file's bytes, or why it cannot be read.
    pub async fn read(&self, path: &Path) -> Result<Vec<u8>, LoadError> {
        tokio::fs::read(path)
            .await
            .map_err(|error| LoadError::Read {
                path: path.to_path_buf(),
                error,
            })
    }

    /// Load a component from memory; `path` names it in messages. Its
    /// imports are not held to its grants yet: the caller grants and checks
    /// ([`Plugin::with_grants`], [`Plugin::check_granted`]).
    pub async fn load_bytes(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        settings: Settings,
        store: Store,
    ) -> Result<Plugin, LoadError> {
        let started = Instant::now();
        let path = path.to_path_buf();
        check_header(&path, &bytes)?;
        let sha256 = sha256_hex(&bytes);
        let runtime = self.clone();
        let digest = sha256.clone();
        let megabytes = bytes.len() as f64 / 1e6;
        // Compiling a large component takes seconds of CPU: keep it off the executor,
        // and say what is going on while it runs (a cache hit ends before the first word).
        let task = tokio::task::spawn_blocking(move || {
            runtime
                .inner
                .cache
                .get_or_compile(&runtime.inner.engine, &bytes, &digest)
        });
        tokio::pin!(task);
        let every = Duration::from_secs(2);
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), every);
        let compiled = loop {
            tokio::select! {
                done = &mut task => break done.expect("the compile task does not panic"),
                _ = progress.tick() => tracing::info!(
                    path = %path.display(),
                    "compiling a {megabytes:.1} MB component: {}s so far (first load only; \
                     the compiled form is cached)",
                    started.elapsed().as_secs()
                ),
            }
        };
        let (component, cache) = compiled.map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: root_cause(&e),
        })?;
        compat::check(&component, &self.inner.engine).map_err(|m| LoadError::Incompatible {
            path: path.clone(),
            reason: m.to_string(),
        })?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| link_error(&path, &e))?;
        let reconciler =
            wit::ReconcilerIndices::new(&pre).map_err(|e| LoadError::Incompatible {
                path: path.clone(),
                reason: format!(
                    "its `setpoint:reconciler/reconciler` export does not match this host's: {}",
                    root_cause(&e)
                ),
            })?;
        let imports_http = imports_outgoing_http(&component, &self.inner.engine);
        let http = http_policy(&settings).map_err(|reason| LoadError::Setup {
            path: path.clone(),
            reason,
        })?;
        let pruner = wit::PrunerIndices::new(&pre).ok();
        let admission = wit::AdmissionIndices::new(&pre).ok();
        let batch = wit::BatchReconcilerIndices::new(&pre).ok();
        let report = LoadReport {
            path: path.clone(),
            sha256,
            cache,
            took: Duration::ZERO,
            described_as: String::new(),
        };
        let mut plugin = PluginInner {
            runtime: self.clone(),
            pre,
            reconciler,
            pruner,
            admission,
            batch,
            imports_http,
            http,
            settings,
            info: wit::Info {
                name: String::new(),
                version: String::new(),
                kinds: Vec::new(),
                resync_interval: None,
            },
            host: Arc::new(HostContext {
                plugin: String::new(),
                version: String::new(),
                store: store.clone(),
            }),
            report,
        };
        let info = instance::describe(&plugin).await.map_err(|e| match e {
            CallError::Mismatch(reason) => LoadError::Incompatible {
                path: path.clone(),
                reason,
            },
            e => LoadError::Describe {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
        if info.name.is_empty() || info.kinds.is_empty() {
            return Err(LoadError::Describe {
                path,
                reason: "it must give a non-empty `name` and at least one kind in `kinds`".into(),
            });
        }
        let mut info = info;
        plugin.report.described_as = info.name.clone();
        if let Some(name) = &plugin.settings.name {
            info.name = name.clone();
        }
        plugin.host = Arc::new(HostContext {
            plugin: info.name.clone(),
            version: info.version.clone(),
            store,
        });
        plugin.info = info;
        plugin.report.took = started.elapsed();
        tracing::info!(
            plugin = %plugin.info.name,
            version = %plugin.info.version,
            path = %path.display(),
            cache = ?plugin.report.cache,
            took = ?plugin.report.took,
            "plugin loaded"
        );
        Ok(Plugin {
            inner: Arc::new(plugin),
        })
    }
}

/// The HTTP policy `settings` grant, if any.
fn http_policy(settings: &Settings) -> Result<Option<Arc<HttpPolicy>>, String> {
    let Some(grant) = &settings.grants.http else {
        return Ok(None);
    };
    let policy = HttpPolicy::new(grant, settings.limits.max_reconcile_time)
        .map_err(|e| format!("its HTTP grant is invalid: {e}"))?;
    Ok(Some(Arc::new(policy)))
}

/// Refuse files that are not components before handing them to the compiler, so
/// the common mistakes get a specific message.
fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.starts_with(b"\0asm") && bytes.len() >= 8 {
        // Bytes 4..8: a core module is version 1, layer 0; a component has layer 1.
        if bytes[6..8] == [0, 0] {
            return Err(LoadError::CoreModule {
                path: path.to_path_buf(),
            });
        }
        return Ok(());
    }
    // The WebAssembly text format is accepted too (handy for small fixtures).
    match std::str::from_utf8(bytes).map(wat_form) {
        Ok(Some("component")) => Ok(()),
        Ok(Some("module")) => Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        }),
        _ => Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        }),
    }
}

/// `component` or `module` if `text` looks like WebAssembly text of that form:
/// its first token after `;;` comments and whitespace is `(component` or `(module`.
fn wat_form(text: &str) -> Option<&'static str> {
    let code = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with(";;"))?;
    ["component", "module"].into_iter().find(|form| {
        code.strip_prefix('(')
            .is_some_and(|rest| rest.starts_with(form))
    })
}

/// The innermost message of an error chain: what actually went wrong, without the
/// layers of context or a backtrace.
fn root_cause(e: &wasmtime::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

fn link_error(path: &Path, e: &wasmtime::Error) -> LoadError {
    let text = format!("{e:#}");
    // wasmtime: "component imports instance `x`, but a matching implementation
    // was not found in the linker" (or `function`, `resource` ...).
    if let Some(import) = text
        .split("component imports ")
        .nth(1)
        .and_then(|rest| rest.split('`').nth(1))
    {
        // A known interface at a newer minor: wasmtime names the function it
        // lacks further down the chain ("... export `f` ...").
        let after = text.split_once(import).map_or("", |(_, rest)| rest);
        if import.starts_with(&format!("{}/", super::compat::PACKAGE))
            && let Some(function) = after
                .split("export `")
                .nth(1)
                .and_then(|r| r.split('`').next())
        {
            return LoadError::MissingFunction {
                path: path.to_path_buf(),
                import: import.to_string(),
                function: function.to_string(),
                package: super::compat::PACKAGE,
                version: super::compat::CONTRACT_VERSION,
            };
        }
        return LoadError::MissingImport {
            path: path.to_path_buf(),
            import: import.to_string(),
        };
    }
    LoadError::Incompatible {
        path: path.to_path_buf(),
        reason: format!("its imports do not match this host's: {}", root_cause(e)),
    }
}

/// A loaded plugin: a compiled, pre-instantiated component and what it said
/// about itself. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub(super) inner: Arc<PluginInner>,
}

pub(super) struct PluginInner {
    pub(super) runtime: Runtime,
    pub(super) pre: InstancePre<HostState>,
    pub(super) reconciler: wit::ReconcilerIndices,
    pub(super) pruner: Option<wit::PrunerIndices>,
    pub(super) admission: Option<wit::AdmissionIndices>,
    /// Set if the component exports `batch-reconciler` (0.1.3).
    pub(super) batch: Option<wit::BatchReconcilerIndices>,
    /// The component imports `wasi:http/outgoing-handler`.
    pub(super) imports_http: bool,
    /// Where its HTTP requests may go; `None`: nowhere.
    pub(super) http: Option<Arc<HttpPolicy>>,
    pub(super) settings: Settings,
    pub(super) info: wit::Info,
    pub(super) host: Arc<HostContext>,
    pub(super) report: LoadReport,
}

impl Plugin {
    /// What the plugin said about itself at load time.
    pub fn info(&self) -> &wit::Info {
        &self.inner.info
    }

    /// How this plugin was loaded.
    pub fn report(&self) -> &LoadReport {
        &self.inner.report
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// This plugin with other grants (e.g. those its manifest asked for, once
    /// the operator's configuration is checked), sharing the compiled code.
    /// `Err` if the component imports a capability `grants` leave out.
    pub fn with_grants(&self, grants: Grants) -> Result<Plugin, String> {
        let inner = &self.inner;
        let settings = Settings {
            grants,
            ..inner.settings.clone()
        };
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                runtime: inner.runtime.clone(),
                pre: inner.pre.clone(),
                reconciler: inner.reconciler.clone(),
                pruner: inner.pruner.clone(),
                admission: inner.admission.clone(),
                batch: inner.batch.clone(),
                imports_http: inner.imports_http,
                http: http_policy(&settings)?,
                settings,
                info: inner.info.clone(),
                host: inner.host.clone(),
                report: inner.report.clone(),
            }),
        };
        plugin.check_granted()?;
        Ok(plugin)
    }

    /// `Err` naming the capability if the component imports one its grants
    /// leave out (today: `wasi:http/outgoing-handler` without an HTTP grant).
    pub fn check_granted(&self) -> Result<(), String> {
        let inner = &self.inner;
        if inner.imports_http && inner.settings.grants.http.is_none() {
            let name = &inner.info.name;
            return Err(format!(
                "plugin {name} imports wasi:http/outgoing-handler (outgoing HTTP), which is not \
                 granted: list the hosts it calls in its manifest's [capabilities.http] \
                 (hosts = [...]) and grant them in the daemon's configuration under \
                 [grants.{name}] (http = {{ hosts = [...] }})"
            ));
        }
        Ok(())
    }

    /// True if `other` is this very load (a clone of it), not another load
    /// of the same file.
    pub fn is_same_load(&self, other: &Plugin) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// True if the component exports `pruner`.
    pub fn can_prune(&self) -> bool {
        self.inner.pruner.is_some()
    }

    /// True if the component exports `admission` (checks objects before they
    /// are stored).
    pub fn can_validate(&self) -> bool {
        self.inner.admission.is_some()
    }

    /// True if the component exports `batch-reconciler` (takes a round of
    /// reconciles in one call; WIT 0.1.3).
    pub fn can_batch(&self) -> bool {
        self.inner.batch.is_some()
    }

    /// A new instance slot for one worker. It instantiates lazily on first call.
    pub fn instance(&self) -> Instance {
        Instance::new(self.clone())
    }

    /// One reconcile on a fresh instance: for one-off calls such as the
    /// `setpoint reconcile` command.
    pub async fn reconcile_once(
        &self,
        request: &wit::Request,
    ) -> Result<Result<wit::Outcome, wit::Failure>, CallError> {
        self.instance().reconcile(request).await
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.info.name)
            .field("version", &self.inner.info.version)
            .field("path", &self.inner.report.path)
            .finish()
    }
}
