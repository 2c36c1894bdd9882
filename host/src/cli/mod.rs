//! The `setpoint` command line.

mod oci;
mod sign;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, query};
use crate::config::{Config, DirGrant, PluginConfig};
use crate::controller::{Controller, Settled};
use crate::daemon::Daemon;
use crate::metrics::Metrics;
use crate::object::{Action, Object, parse_all};
use crate::ownership::Ownership;
use crate::plugin::{CONTRACT_VERSION, PACKAGE, Runtime, SUPPORTED_VERSIONS, WORLD};
use crate::store::Store;

/// The example objects `setpoint run` applies when it runs without `--config`.
const EXAMPLE_OBJECTS: &str = include_str!("../../../examples/objects.yaml");

/// Setpoint: a host for control loops written as WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "setpoint", version)]
pub struct Cli {
    /// More logs: -v for debug, -vv for trace. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The API of the daemon to talk to (apply, get, delete, status, wait).
    #[arg(
        long,
        global = true,
        env = "SETPOINT_SERVER",
        default_value = "http://127.0.0.1:7171"
    )]
    pub server: String,
    /// The API's bearer token, if it needs one.
    #[arg(long, global = true, env = "SETPOINT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. Without --config: the example plugins from
    /// $SETPOINT_PLUGIN_DIR (default target/plugins) and the example objects,
    /// with the store in target/demo/store.redb.
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
        /// Keep the store in this file instead of the configured one.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Scaffold a plugin project that builds and passes its own test as it is.
    New {
        /// The plugin's language.
        #[arg(long, value_enum)]
        lang: crate::scaffold::Lang,
        /// The plugin's name (lower-case, '-'); its kind is the CamelCase of it.
        name: String,
        /// Where to create the project's folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Create or update the objects in manifest files or folders, all or none.
    Apply {
        /// A YAML/JSON manifest, or a folder of them (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Print objects of a kind, or one object, as YAML (or JSON).
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short, long, default_value = "")]
        namespace: String,
        /// Only objects with these labels: app=web,tier=db.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Print JSON instead of YAML.
        #[arg(long)]
        json: bool,
    },
    /// Delete an object: it is removed once its plugin has reconciled the delete.
    Delete {
        kind: String,
        name: String,
        #[arg(short, long, default_value = "")]
        namespace: String,
        /// Wait until it is gone.
        #[arg(long)]
        wait: bool,
        /// Remove it now, dropping the finalizers that hold it (for an object
        /// whose plugin cannot finish the delete); prints the ones dropped.
        #[arg(long)]
        force: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print reconcile status: of one object, of a kind, or of everything.
    Status {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, default_value = "")]
        namespace: String,
    },
    /// Wait until objects are reconciled: one, a kind, or everything. Fails at
    /// once naming the objects that failed for good (a fatal error, or given
    /// up after the last retry) and their errors; after --timeout naming what
    /// is not reconciled.
    Wait {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, default_value = "")]
        namespace: String,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Wait for objects that failed for good too (until --timeout, or
        /// until a change reconciles them), instead of failing at once.
        #[arg(long)]
        keep_waiting: bool,
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
    /// List the daemon's plugins: running, failed (with the error), unloaded.
    Ls,
    /// Load a new plugin into the running daemon (a new controller).
    Load {
        /// The component, as the daemon's file system sees it, or an
        /// `oci://HOST/REPO:TAG` (or `@sha256:DIGEST`) reference the daemon pulls.
        path: PathBuf,
    },
    /// Stop a plugin's controller after its work in flight. Its finalizer stays
    /// on its objects: their deletes wait until it is loaded again.
    Unload { name: String },
    /// Swap a running plugin for another version, keeping every key's state.
    Swap {
        name: String,
        /// The new component, as the daemon's file system sees it, or an
        /// `oci://` reference the daemon pulls.
        path: PathBuf,
    },
    /// Go back to a kept earlier version, without recompiling.
    Rollback {
        name: String,
        /// The version (or a sha256 prefix); default: the one before the active one.
        #[arg(long)]
        to: Option<String>,
    },
    /// A plugin's versions: loaded, failed, active.
    History { name: String },
    /// Make a signing key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        #[arg(long, default_value = "setpoint")]
        out: PathBuf,
    },
    /// Sign a component into FILE.sig: its sha256 with its manifest's name and
    /// version (NAME.toml beside it), as the daemon's trust policy checks it.
    Sign {
        file: PathBuf,
        /// The secret key (from `setpoint plugin keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The name to sign instead of the manifest's (e.g. a `[[plugin]]` table's).
        #[arg(long)]
        name: Option<String>,
        /// The version to sign instead of the manifest's.
        #[arg(long = "plugin-version")]
        version: Option<String>,
    },
    /// Push a component (with FILE.sig, if it is signed) to an OCI registry;
    /// prints the manifest digest and the reference pinned to it.
    Push {
        file: PathBuf,
        /// Where to: oci://HOST[:PORT]/REPO:TAG.
        reference: String,
    },
    /// Pull a component (and its signatures) from an OCI registry into the
    /// local cache, by digest; prints where it is.
    Pull {
        /// oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST].
        reference: String,
        /// Also copy it here (and its signatures to OUT.sig).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check FILE.sig against public keys: succeeds if one of them signed it.
    Verify {
        file: PathBuf,
        /// A public key file; repeat for several.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "plugin-version")]
        version: Option<String>,
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
                store,
            } => run(config.as_deref(), once, listen, store).await,
            Command::Plugin {
                command: PluginCommand::Inspect { file, json },
            } => inspect(&file, json).await,
            Command::Plugin {
                command: PluginCommand::Keygen { out },
            } => sign::keygen(&out),
            Command::Plugin {
                command:
                    PluginCommand::Sign {
                        file,
                        key,
                        name,
                        version,
                    },
            } => sign::sign(&file, &key, name, version),
            Command::Plugin {
                command:
                    PluginCommand::Verify {
                        file,
                        keys,
                        name,
                        version,
                    },
            } => sign::verify(&file, &keys, name, version),
            Command::Plugin {
                command: PluginCommand::Push { file, reference },
            } => oci::push(&file, &reference).await,
            Command::Plugin {
                command: PluginCommand::Pull { reference, out },
            } => oci::pull(&reference, out.as_deref()).await,
            Command::Plugin { command } => {
                let client = Client::new(&self.server, self.token);
                tokio::task::spawn_blocking(move || plugin_command(&client, command)).await?
            }
            Command::Reconcile {
                file,
                object,
                action,
                dirs,
                timeout,
            } => reconcile(&file, &object, action, &dirs, timeout).await,
            Command::New { lang, name, dir } => {
                let project = crate::scaffold::create(&dir, &name, lang)?;
                println!("{}", crate::scaffold::next_steps(&project, lang));
                Ok(())
            }
            command => {
                let client = Client::new(&self.server, self.token);
                tokio::task::spawn_blocking(move || talk(&client, command)).await?
            }
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
        // The demo keeps its state beside its files, not in the user's data folder.
        store: crate::config::StoreConfig {
            path: Some(PathBuf::from("target/demo/store.redb")),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn run(
    config_path: Option<&Path>,
    once: bool,
    listen: Option<std::net::SocketAddr>,
    store_path: Option<PathBuf>,
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
    if let Some(path) = store_path {
        config.store.path = Some(path);
        config.store.in_memory = false;
    }
    if config_path.is_none()
        && let Some(missing) = config.plugins.iter().find(|p| !p.path.exists())
    {
        bail!(
            "{} is missing: the example plugins are built by `cargo xtask plugins` (or set \
             SETPOINT_PLUGIN_DIR to where they are)",
            missing.path.display()
        );
    }
    // Listening from the start: a signal during start-up is not lost.
    let mut signals = ShutdownSignals::install()?;
    let daemon = Daemon::start(config, examples).await?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signals.recv().await;
        stop.cancel();
    });
    daemon.run(shutdown, once).await
}

/// A `setpoint plugin` command against the daemon's registry.
fn plugin_command(client: &Client, command: PluginCommand) -> anyhow::Result<()> {
    let json =
        |value: serde_json::Value| Some(("application/json", value.to_string().into_bytes()));
    // A file as the daemon sees it; an `oci://` reference as it is.
    let absolute = |path: &Path| {
        if crate::oci::is_reference(path) {
            return path.to_path_buf();
        }
        std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
    };
    let view = match command {
        PluginCommand::Inspect { .. }
        | PluginCommand::Keygen { .. }
        | PluginCommand::Sign { .. }
        | PluginCommand::Verify { .. }
        | PluginCommand::Push { .. }
        | PluginCommand::Pull { .. } => unreachable!("these run locally"),
        PluginCommand::Ls => {
            let all = client.call("GET", "/v1/plugins", None)?.json()?;
            println!(
                "{:<16} {:<9} {:<10} {:<14} {:<20} ERROR",
                "NAME", "STATE", "VERSION", "SHA256", "KINDS"
            );
            for p in all.as_array().into_iter().flatten() {
                let text = |k: &str| p[k].as_str().unwrap_or("-").to_string();
                let kinds: Vec<&str> = p["kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str())
                    .collect();
                let sha = text("sha256");
                println!(
                    "{:<16} {:<9} {:<10} {:<14} {:<20} {}",
                    text("name"),
                    text("state"),
                    text("version"),
                    &sha[..sha.len().min(12)],
                    if kinds.is_empty() {
                        "-".to_string()
                    } else {
                        kinds.join(",")
                    },
                    text("error"),
                );
            }
            return Ok(());
        }
        PluginCommand::Load { path } => {
            let body = serde_json::json!({"path": absolute(&path)});
            client.call("POST", "/v1/plugins", json(body))?.json()?
        }
        PluginCommand::Unload { name } => client
            .call("DELETE", &format!("/v1/plugins/{name}"), None)?
            .json()?,
        PluginCommand::Swap { name, path } => {
            let body = serde_json::json!({"path": absolute(&path)});
            client
                .call("POST", &format!("/v1/plugins/{name}/swap"), json(body))?
                .json()?
        }
        PluginCommand::Rollback { name, to } => {
            let body = serde_json::json!({"to": to});
            client
                .call("POST", &format!("/v1/plugins/{name}/rollback"), json(body))?
                .json()?
        }
        PluginCommand::History { name } => {
            let view = client
                .call("GET", &format!("/v1/plugins/{name}"), None)?
                .json()?;
            println!(
                "{:<10} {:<14} {:<10} {:<7} ERROR",
                "VERSION", "SHA256", "STATE", "ACTIVE"
            );
            for v in view["history"].as_array().into_iter().flatten() {
                let sha = v["sha256"].as_str().unwrap_or("");
                println!(
                    "{:<10} {:<14} {:<10} {:<7} {}",
                    v["version"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .unwrap_or("-"),
                    if sha.is_empty() {
                        "-"
                    } else {
                        &sha[..sha.len().min(12)]
                    },
                    v["state"].as_str().unwrap_or("-"),
                    if v["active"] == true { "yes" } else { "" },
                    v["error"].as_str().unwrap_or(""),
                );
            }
            return Ok(());
        }
    };
    println!(
        "{} {}: {} {} ({})",
        view["name"].as_str().unwrap_or("?"),
        view["state"].as_str().unwrap_or("?"),
        view["version"].as_str().unwrap_or("-"),
        view["sha256"]
            .as_str()
            .map_or("-", |s| &s[..s.len().min(12)]),
        view["kinds"]
            .as_array()
            .map(|k| k
                .iter()
                .filter_map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default(),
    );
    if let Some(source) = view["source"].as_str() {
        println!("from {source}");
    }
    Ok(())
}

/// Run one client command against the daemon's API.
fn talk(client: &Client, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Apply { files } => {
            let mut objects = Vec::new();
            for path in &files {
                objects.extend(read_manifests(path)?);
            }
            if objects.is_empty() {
                bail!("no objects in {}: nothing to apply", show_paths(&files));
            }
            let body = serde_json::to_vec(&objects)?;
            let answer = client.call("POST", "/v1/apply", Some(("application/json", body)))?;
            for line in answer.json()?.as_array().into_iter().flatten() {
                println!(
                    "{} {}",
                    line["key"].as_str().unwrap_or("?"),
                    line["result"].as_str().unwrap_or("?")
                );
            }
        }
        Command::Get {
            kind,
            name,
            namespace,
            selector,
            json,
        } => {
            let path = match &name {
                Some(name) => format!(
                    "/v1/objects/{kind}/{name}{}",
                    query(&[(
                        "namespace",
                        Some(&namespace)
                            .filter(|n| !n.is_empty())
                            .map(|s| s.as_str())
                    )])
                ),
                None => format!(
                    "/v1/objects/{kind}{}",
                    query(&[
                        (
                            "namespace",
                            Some(namespace.as_str()).filter(|n| !n.is_empty())
                        ),
                        ("selector", selector.as_deref()),
                    ])
                ),
            };
            let value = client.call("GET", &path, None)?.json()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", serde_yaml_ng::to_string(&value)?);
            }
        }
        Command::Delete {
            kind,
            name,
            namespace,
            wait,
            force,
            timeout,
        } => {
            let ns = Some(namespace.as_str()).filter(|n| !n.is_empty());
            let path = format!(
                "/v1/objects/{kind}/{name}{}",
                query(&[("namespace", ns), ("force", force.then_some("true"))])
            );
            let answer = client.call("DELETE", &path, None)?;
            let key = crate::object::ObjectKey::new(&kind, &namespace, &name);
            if force {
                let dropped: Vec<String> = answer.json()?["droppedFinalizers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect();
                if dropped.is_empty() {
                    println!("{key} removed by force; no finalizer held it");
                } else {
                    println!(
                        "{key} removed by force, dropping finalizers: {}",
                        dropped.join(", ")
                    );
                }
            } else if answer.status == 200 {
                println!("{key} removed");
            } else {
                println!("{key} deleting");
                if wait {
                    wait_for(client, Some(&kind), Some(&name), &namespace, timeout, false)?;
                    println!("{key} removed");
                }
            }
        }
        Command::Status {
            kind,
            name,
            namespace,
        } => {
            let lines = match (&kind, &name) {
                (Some(kind), Some(name)) => {
                    let ns = Some(namespace.as_str()).filter(|n| !n.is_empty());
                    let path = format!(
                        "/v1/objects/{kind}/{name}/status{}",
                        query(&[("namespace", ns)])
                    );
                    vec![client.call("GET", &path, None)?.json()?]
                }
                _ => {
                    let path = format!("/v1/status{}", query(&[("kind", kind.as_deref())]));
                    let all = client.call("GET", &path, None)?.json()?;
                    all.as_array().cloned().unwrap_or_default()
                }
            };
            println!(
                "{:<40} {:<8} {:>10}  LAST ERROR",
                "KEY", "PHASE", "OBSERVED"
            );
            for s in lines {
                // An error that will not be retried shows as `failed`.
                let phase = match s["terminal"].as_bool() {
                    Some(true) => "failed",
                    _ => s["phase"].as_str().unwrap_or("?"),
                };
                println!(
                    "{:<40} {:<8} {:>10}  {}",
                    s["key"].as_str().unwrap_or("?"),
                    phase,
                    s["observedGeneration"].to_string(),
                    s["lastError"].as_str().unwrap_or("-")
                );
            }
        }
        Command::Wait {
            kind,
            name,
            namespace,
            timeout,
            keep_waiting,
        } => {
            wait_for(
                client,
                kind.as_deref(),
                name.as_deref(),
                &namespace,
                timeout,
                keep_waiting,
            )?;
            println!("reconciled");
        }
        Command::Run { .. }
        | Command::Plugin { .. }
        | Command::Reconcile { .. }
        | Command::New { .. } => {
            unreachable!("run, plugin, reconcile and new do not talk to a daemon")
        }
    }
    Ok(())
}

/// `GET /v1/wait`, failing with what failed for good (unless `keep_waiting`)
/// or is still waiting.
fn wait_for(
    client: &Client,
    kind: Option<&str>,
    name: Option<&str>,
    namespace: &str,
    timeout: Duration,
    keep_waiting: bool,
) -> anyhow::Result<()> {
    let timeout_text = format!("{}ms", timeout.as_millis());
    let path = format!(
        "/v1/wait{}",
        query(&[
            ("kind", kind),
            ("name", name),
            ("namespace", Some(namespace).filter(|n| !n.is_empty())),
            ("timeout", Some(&timeout_text)),
            ("keepWaiting", keep_waiting.then_some("true")),
        ])
    );
    let answer = client.send("GET", &path, None)?;
    if answer.status == 200 {
        return Ok(());
    }
    let value = answer.json()?;
    if let Some(failed) = value["failed"].as_array() {
        let mut message = format!(
            "{} object(s) failed and will not be retried (fix them, or wait with \
             --keep-waiting):",
            failed.len()
        );
        for f in failed {
            message.push_str(&format!(
                "\n  {}: {}",
                f["key"].as_str().unwrap_or("?"),
                f["status"]["lastError"].as_str().unwrap_or("failed")
            ));
        }
        bail!("{message}");
    }
    let Some(waiting) = value["waiting"].as_array() else {
        bail!(
            "the API refused ({}): {}",
            answer.status,
            value["error"].as_str().unwrap_or(&answer.body)
        );
    };
    let mut message = value["error"]
        .as_str()
        .unwrap_or("not reconciled")
        .to_string();
    for w in waiting {
        let status = &w["status"];
        message.push_str(&format!(
            "\n  {}: {}{}",
            w["key"].as_str().unwrap_or("?"),
            status["phase"].as_str().unwrap_or("no status"),
            status["lastError"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
    }
    bail!("{message}")
}

fn show_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
    let files = crate::source::manifests::manifest_files(path)
        .with_context(|| format!("cannot read folder {}", path.display()))?;
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
            "package": format!("{PACKAGE}@{CONTRACT_VERSION}"),
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
    let runtime = Runtime::new(&Default::default())?;
    let engine = settings.engine();
    let plugin = runtime.load(file, settings, store.clone()).await?;
    // The daemon's path: a controller (which holds its finalizer on the
    // object), one worker's slot, and the same settling of the result.
    let controller = Controller::new(
        plugin.clone(),
        store.clone(),
        engine,
        &Ownership::default(),
        &Arc::new(Metrics::new()),
    );
    let object = store.apply(object)?.object;
    let key = object.key();
    let action = match action {
        CliAction::Created => Action::Created,
        CliAction::Updated => Action::Updated,
        CliAction::Resynced => Action::Resynced,
        CliAction::Deleted => {
            store.delete(&key, None)?;
            Action::Deleted
        }
    };
    let mut slot = crate::controller::Reconciler::slot(&plugin);
    let settled = controller.reconcile_now(slot.as_mut(), &key, action).await;
    let stored = store.get(&key);
    let mut printed = serde_json::to_value(&settled)?;
    printed["status-written"] = stored
        .as_ref()
        .and_then(|o| o.status.clone())
        .unwrap_or(serde_json::Value::Null);
    if let Some(status) = store.status(&key) {
        printed["phase"] = serde_json::to_value(status.phase)?;
    }
    println!("{}", serde_json::to_string_pretty(&printed)?);
    match settled {
        Settled::Failed { error, message, .. } => {
            bail!("the reconcile failed ({error}): {message}")
        }
        Settled::Done { .. } | Settled::Gone => Ok(()),
    }
}
