//! The `setpoint` command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DirGrant, PluginConfig};
use crate::controller::Manager;
use crate::leader::{AlwaysLeader, LeaderElector};
use crate::metrics::Metrics;
use crate::object::{Object, parse_all};
use crate::plugin::{PACKAGE, Runtime, SUPPORTED_VERSIONS, WORLD, object_to_wit, wit};
use crate::store::Store;

/// The example objects `setpoint run` applies when it runs without `--config`.
const EXAMPLE_OBJECTS: &str = include_str!("../../examples/objects.yaml");

/// Setpoint: a host for control loops written as WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "setpoint", version)]
pub struct Cli {
    /// More logs: -v for debug, -vv for trace. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. Without --config: the example plugins from
    /// $SETPOINT_PLUGIN_DIR (default target/plugins) and the example objects.
    Run {
        /// A TOML configuration file; every setting has a default.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Stop once every object is reconciled (for demos and scripts).
        #[arg(long)]
        once: bool,
        /// Serve the API here instead of the configured address (port 0: any).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Work with plugin files.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Reconcile one object with a plugin, once, and print the outcome.
    Reconcile {
        /// The plugin component.
        file: PathBuf,
        /// The object, as a YAML or JSON manifest.
        #[arg(long)]
        object: PathBuf,
        /// Why the reconcile happens.
        #[arg(long, value_enum, default_value_t = CliAction::Created)]
        action: CliAction,
        /// Grant a directory: HOST_DIR:GUEST_DIR (repeatable).
        #[arg(long = "dir", value_name = "HOST:GUEST")]
        dirs: Vec<String>,
        /// The time limit for the call.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a component, check it against the plugin world, and print describe().
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CliAction {
    Created,
    Updated,
    Deleted,
    Resynced,
}

/// Log to stderr; `-v` raises the level, `RUST_LOG` wins over both.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info,wasmtime=warn,cranelift=warn",
        1 => "debug,wasmtime=info,cranelift=warn",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run {
                config,
                once,
                listen,
            } => run(config.as_deref(), once, listen).await,
            Command::Plugin {
                command: PluginCommand::Inspect { file, json },
            } => inspect(&file, json).await,
            Command::Reconcile {
                file,
                object,
                action,
                dirs,
                timeout,
            } => reconcile(&file, &object, action, &dirs, timeout).await,
        }
    }
}

/// The configuration `setpoint run` uses without `--config`: the example plugins.
pub fn default_config() -> Config {
    let dir = std::env::var_os("SETPOINT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/plugins"));
    let files = PluginConfig {
        path: dir.join("files.wasm"),
        grants: crate::config::Grants {
            dirs: vec![DirGrant {
                host: PathBuf::from("target/demo/files"),
                guest: "/data".into(),
                read_only: false,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    Config {
        plugins: vec![
            PluginConfig {
                path: dir.join("hello.wasm"),
                ..Default::default()
            },
            files,
        ],
        ..Default::default()
    }
}

async fn run(
    config_path: Option<&Path>,
    once: bool,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let (mut config, examples) = match config_path {
        Some(path) => (Config::load(path)?, Vec::new()),
        None => {
            tracing::info!("no --config given: running the embedded example configuration");
            (default_config(), parse_all(EXAMPLE_OBJECTS)?)
        }
    };
    if let Some(listen) = listen {
        config.api.listen = listen;
        config.api.check()?;
    }
    let store = Store::new();
    let metrics = Arc::new(Metrics::new());
    let leader: Arc<dyn LeaderElector> = Arc::new(AlwaysLeader::default());
    let manager = Arc::new(Manager::new(store.clone(), leader, metrics.clone()));
    let runtime = Runtime::new(&config.runtime)?;
    let mut plugins = Vec::new();
    for settings in &config.plugins {
        let path = settings.path.clone();
        let loaded = runtime.load(&path, settings.clone(), store.clone()).await;
        let outcome = match &loaded {
            Ok(p) if p.report().cache == crate::plugin::CacheOutcome::Hit => "cached",
            Ok(_) => "compiled",
            Err(_) => "failed",
        };
        let name = loaded
            .as_ref()
            .map_or_else(|_| path.display().to_string(), |p| p.info().name.clone());
        metrics.plugin_event(&metrics.plugin_loads, &name, outcome);
        plugins.push(loaded.with_context(|| {
            if config_path.is_none() {
                "the example plugins are built by `cargo xtask plugins`".to_string()
            } else {
                format!("plugin {} did not load", path.display())
            }
        })?);
    }
    let mut objects = examples;
    for path in &config.manifests {
        objects.extend(read_manifests(path)?);
    }
    for object in objects {
        let (stored, _) = store.apply(object);
        tracing::info!(key = %stored.key(), generation = stored.metadata.generation, "applied");
    }

    let mut signals = ShutdownSignals::install()?;
    for plugin in plugins {
        manager.add(plugin)?;
    }
    let api_stop = CancellationToken::new();
    let api = if config.api.enabled {
        let (bound, task) = crate::api::serve(
            config.api.listen,
            config.api.token.clone(),
            manager.clone(),
            api_stop.clone(),
        )
        .await?;
        tracing::info!("api listening on http://{bound} (/metrics, /v1/controllers)");
        Some(task)
    } else {
        None
    };
    tracing::info!(
        controllers = manager.controllers().len(),
        "setpoint is running; press Ctrl-C to stop"
    );
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    loop {
        tokio::select! {
            _ = signals.recv() => {
                tracing::info!("shutting down: finishing reconciles in flight");
                break;
            }
            _ = report.tick() => log_status(&manager),
            _ = tokio::time::sleep(Duration::from_millis(50)), if once => {
                if all_settled(&manager, &store) {
                    tracing::info!("every object is reconciled");
                    break;
                }
            }
        }
    }
    log_status(&manager);
    manager.shutdown().await;
    api_stop.cancel();
    if let Some(api) = api {
        let _ = api.await;
    }
    Ok(())
}

fn all_settled(manager: &Manager, store: &Store) -> bool {
    manager.controllers().iter().all(|c| {
        let s = c.status();
        s.queue_depth == 0
            && s.in_flight == 0
            && c.plugin().info().kinds.iter().all(|kind| {
                store.keys(kind).iter().all(|k| {
                    store
                        .status(k)
                        .is_some_and(|s| s.phase != crate::store::Phase::Pending)
                })
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

/// SIGINT and SIGTERM, listened for from the moment this is made: a signal that
/// arrives before the daemon first waits for one is not lost (and does not kill
/// the process with the default action).
struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
    }
}

/// Every object in a manifest file, or in the `.yaml`/`.yml`/`.json` files of a folder.
pub fn read_manifests(path: &Path) -> anyhow::Result<Vec<Object>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)
            .with_context(|| format!("cannot read folder {}", path.display()))?
        {
            let p = entry?.path();
            if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read manifest {}", file.display()))?;
        objects.extend(
            parse_all(&text).with_context(|| format!("manifest {} is invalid", file.display()))?,
        );
    }
    Ok(objects)
}

async fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    let runtime = Runtime::new(&Default::default())?;
    let plugin = runtime
        .load(file, PluginConfig::default(), Store::new())
        .await?;
    let info = plugin.info();
    let report = plugin.report();
    if json {
        let value = serde_json::json!({
            "name": info.name,
            "version": info.version,
            "kinds": info.kinds,
            "resync-interval-ms": info.resync_interval,
            "world": WORLD,
            "package": format!("{PACKAGE}@0.1.0"),
            "prune": plugin.can_prune(),
            "sha256": report.sha256,
            "cache": report.cache,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("plugin:    {} {}", info.name, info.version);
    println!("kinds:     {}", info.kinds.join(", "));
    match info.resync_interval {
        Some(ms) => println!(
            "resync:    every {}",
            humantime::format_duration(Duration::from_millis(ms))
        ),
        None => println!("resync:    host default"),
    }
    println!("world:     {WORLD} (package {PACKAGE}, host supports {SUPPORTED_VERSIONS})");
    println!(
        "exports:   reconciler{}",
        if plugin.can_prune() { ", pruner" } else { "" }
    );
    println!("sha256:    {}", report.sha256);
    println!(
        "compiled:  {:?} in {}",
        report.cache,
        humantime::format_duration(Duration::from_millis(report.took.as_millis() as u64))
    );
    Ok(())
}

async fn reconcile(
    file: &Path,
    object_path: &Path,
    action: CliAction,
    dirs: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(object_path)
        .with_context(|| format!("cannot read {}", object_path.display()))?;
    let object = Object::parse(&text)
        .with_context(|| format!("{} is not a valid object", object_path.display()))?;
    let mut settings = PluginConfig::default();
    settings.limits.max_reconcile_time = timeout;
    for d in dirs {
        let Some((host, guest)) = d.split_once(':') else {
            bail!("--dir {d:?} must be HOST_DIR:GUEST_DIR, e.g. ./out:/data");
        };
        settings.grants.dirs.push(DirGrant {
            host: host.into(),
            guest: guest.into(),
            read_only: false,
        });
    }
    let store = Store::new();
    let (object, _) = store.apply(object);
    let runtime = Runtime::new(&Default::default())?;
    let plugin = runtime.load(file, settings, store.clone()).await?;
    let request = wit::Request {
        key: object.key().to_string(),
        action: match action {
            CliAction::Created => wit::Action::Created,
            CliAction::Updated => wit::Action::Updated,
            CliAction::Deleted => wit::Action::Deleted,
            CliAction::Resynced => wit::Action::Resynced,
        },
        object: object_to_wit(&object),
        attempt: 0,
        state: Vec::new(),
    };
    let result = plugin.reconcile_once(&request).await?;
    let status_written = store.get(&object.key()).and_then(|o| o.status);
    let printed = match result {
        Ok(outcome) => serde_json::json!({
            "result": "ok",
            "requeue-after-ms": outcome.requeue_after,
            "state": outcome.state.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "status": outcome.status.as_deref().map(json_or_text),
            "status-written": status_written,
        }),
        Err(failure) => {
            let (kind, message, delay) = match failure.error {
                wit::ReconcileError::Retry(m) => ("retry", m, None),
                wit::ReconcileError::RetryAfter(r) => ("retry-after", r.message, Some(r.delay)),
                wit::ReconcileError::Fatal(m) => ("fatal", m, None),
            };
            serde_json::json!({
                "result": "error",
                "error": kind,
                "message": message,
                "retry-after-ms": delay,
                "state": failure.state.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            })
        }
    };
    println!("{}", serde_json::to_string_pretty(&printed)?);
    Ok(())
}

fn json_or_text(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_string()))
}
