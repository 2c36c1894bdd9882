//! Build orchestration: `cargo xtask <task>`.
//!
//! - `plugins`: build every example plugin from source into `target/plugins/`.
//! - `test`: build the plugins, then run every test (host, SDK, plugins, end to end).
//! - `demo`: build the plugins, then run the daemon on its embedded default.
//! - `bench`: build the plugins, then run the benchmarks.
//! - `api-latency`: the API's latency while plugin calls keep cores busy
//!   (target/debug/setpoint with the `hostile` plugin; see BENCHMARKS.md).
//! - `soak`: writers against a daemon for a while, then check that it settles
//!   with every object done and no worker panic (see BENCHMARKS.md).
//! - `swap-bench`: hot-swap latency (to the first reconcile on the new version)
//!   and reconcile throughput during back-to-back swaps (target/release/setpoint
//!   with the `swaptest` plugins; see BENCHMARKS.md).
//! - `etcd-bench`: replicas sharing work through a real etcd: failover time,
//!   reconcile rate with 1-3 replicas, apply throughput, each against a
//!   baseline (target/release/setpoint with `hello`; see BENCHMARKS.md).
//!
//! Each task installs what it is missing. For plugins that means a wasm32-wasip2
//! toolchain: rustup's target where rustup can download it, otherwise Debian's
//! rustc-web with `-Zbuild-std` (see README, "Toolchains"); for the Python
//! plugins under plugins/python/, componentize-py in a venv (target/python-venv);
//! for the JavaScript plugins under plugins/js/, componentize-js from npm
//! (target/js-tools).

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod api_latency;
mod apply_bench;
mod daemon;
mod etcd_bench;
mod soak;
mod swap_bench;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the example plugins into target/plugins/.
    Plugins,
    /// Build the plugins and run the whole test suite.
    Test {
        /// Extra arguments for `cargo test` on the host workspace.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the plugins and run `setpoint run` on the embedded default.
    Demo {
        /// Stop once every example object is reconciled.
        #[arg(long)]
        once: bool,
    },
    /// Build the plugins and run the criterion benchmarks.
    Bench {
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Time /healthz and /v1/controllers while N plugin calls loop (hostile).
    ApiLatency {
        /// Sequential requests per endpoint and N.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// The numbers of CPU-bound reconciles to measure with (0 is always measured).
        #[arg(long, value_delimiter = ',', default_value = "0,2,4")]
        busy: Vec<usize>,
        /// `[runtime] plugin-threads` settings, one daemon each; 0 is the
        /// default (cores - 1). Default: 0 and the core count.
        #[arg(long, value_delimiter = ',')]
        plugin_threads: Vec<usize>,
        /// Use target/debug/setpoint as it is instead of building it first.
        #[arg(long)]
        no_build: bool,
    },
    /// Writers against a daemon, then check it settles with nothing lost.
    Soak {
        /// How long the writers write.
        #[arg(long, default_value_t = 120)]
        secs: u64,
        /// How many object names (half File, half Greeting).
        #[arg(long, default_value_t = 3000)]
        objects: usize,
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Seed of the writers' choices (default: the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Use target/debug/setpoint as it is instead of building it first.
        #[arg(long)]
        no_build: bool,
    },
    /// Hot-swap latency and reconcile throughput during swaps (swaptest plugins).
    SwapBench {
        /// Latency samples per case (each case: Rust swap, swap to Python, rollback).
        #[arg(long, default_value_t = 100)]
        swaps: usize,
        /// Objects reconciled in each throughput round.
        #[arg(long, default_value_t = 20000)]
        objects: usize,
        /// Throughput rounds, each once without swaps and once per pause.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Pauses in ms between swaps for the rounds with swaps (0: back to back).
        #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
        pauses: Vec<u64>,
        /// Run target/debug/setpoint instead of target/release/setpoint.
        #[arg(long)]
        debug: bool,
        /// Use the binary as it is instead of building it first.
        #[arg(long)]
        no_build: bool,
    },
    /// Acknowledged single-object applies/s over HTTP with concurrent clients
    /// (group commit), into one embedded daemon.
    ApplyBench {
        /// Seconds per case.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Concurrent single-object clients, one case each (1 is the baseline).
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        clients: Vec<usize>,
        /// Use target/release/setpoint as it is instead of building it first.
        #[arg(long)]
        no_build: bool,
    },
    /// Replicas on a real etcd: failover, reconcile rate, apply throughput.
    EtcdBench {
        /// SIGKILLs of one of three replicas (failover samples).
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// SIGINTs (clean stops) of one of three replicas.
        #[arg(long, default_value_t = 10)]
        stops: usize,
        /// Greetings per reconcile-rate run (1, 2, 3 replicas and embedded).
        #[arg(long, default_value_t = 20000)]
        objects: usize,
        /// Reconcile-rate runs of each setup (every other one in reverse order).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per apply-throughput case.
        #[arg(long, default_value_t = 5)]
        apply_secs: u64,
        /// Concurrent clients of the single-object apply case.
        #[arg(long, default_value_t = 10)]
        threads: usize,
        /// Use target/release/setpoint as it is instead of building it first.
        #[arg(long)]
        no_build: bool,
    },
}

/// The toolchain that builds wasm32-wasip2 components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    /// rustup's own wasm32-wasip2 target.
    Rustup,
    /// Debian's rustc-web, rebuilding the standard library with -Zbuild-std.
    DebianBuildStd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Plugins => {
            build_plugins(&root)?;
        }
        Task::Test { args } => {
            let plugins = build_plugins(&root)?;
            // The metrics test checks /metrics with promtool, from Debian's prometheus.
            if !succeeds_within(
                Command::new("promtool").arg("--version"),
                Duration::from_secs(30),
            ) {
                eprintln!("xtask: installing Debian's prometheus package for promtool");
                apt_install(&["prometheus"])?;
            }
            // The OCI tests push to and pull from a real registry: Debian's
            // docker-registry (distribution 2.8), which they start themselves.
            if !Path::new("/usr/bin/docker-registry").exists() {
                eprintln!("xtask: installing Debian's docker-registry package for the OCI tests");
                apt_install(&["docker-registry"])?;
            }
            // The replica tests run against a real etcd (Debian's etcd-server
            // 3.4), which they start themselves.
            if !Path::new("/usr/bin/etcd").exists() {
                eprintln!("xtask: installing Debian's etcd-server package for the replica tests");
                apt_install(&["etcd-server"])?;
            }
            ensure_protoc()?;
            // The Python and JavaScript SDKs' own unit tests.
            run(Command::new(python3())
                .args(["-m", "unittest", "-v"])
                .current_dir(root.join("sdk/python"))
                .env("PYTHONDONTWRITEBYTECODE", "1"))?;
            run(Command::new("node")
                .args(["--test", "sdk.test.mjs"])
                .current_dir(root.join("sdk/js")))?;
            // The Python plugins' unit tests, in plain CPython against the SDK's FakeHost.
            for dir in python_plugins(&root)? {
                run(Command::new(python3())
                    .args(["-m", "unittest", "-v"])
                    .current_dir(&dir)
                    .env("PYTHONPATH", root.join("sdk/python"))
                    .env("PYTHONDONTWRITEBYTECODE", "1"))?;
            }
            // The JavaScript plugins' unit tests, in plain Node against the SDK's FakeHost.
            for dir in guest_plugins(&root, "js", "app.js")? {
                let mut tests = Vec::new();
                for entry in std::fs::read_dir(&dir)? {
                    let path = entry?.path();
                    if path.to_string_lossy().ends_with(".test.mjs") {
                        tests.push(path);
                    }
                }
                tests.sort();
                run(Command::new("node")
                    .arg("--test")
                    .args(&tests)
                    .current_dir(&dir))?;
            }
            // The plugins' own unit tests, natively, against the SDK's fake host.
            run(Command::new(cargo())
                .args([
                    "test",
                    "--manifest-path",
                    "plugins/Cargo.toml",
                    "--target-dir",
                ])
                .arg(root.join("target/plugins-native")))?;
            // The benchmark crate is left out: it pulls in kube-runtime, k8s-openapi
            // and criterion, which no test needs.
            run(Command::new(cargo())
                .args(["test", "--workspace", "--exclude", "setpoint-bench"])
                .args(&args)
                .env("SETPOINT_PLUGIN_DIR", &plugins))?;
            // The controller's tests ran with rounds (plugins that export
            // `batch-reconciler`); once more with one call per key.
            for target in [
                &["--lib", "controller::"][..],
                &["--test", "controller"][..],
            ] {
                run(Command::new(cargo())
                    .args(["test", "-p", "setpoint"])
                    .args(target)
                    .env("SETPOINT_TEST_SINGLE_CALLS", "1")
                    .env("SETPOINT_PLUGIN_DIR", &plugins))?;
            }
        }
        Task::Demo { once } => {
            let plugins = build_plugins(&root)?;
            ensure_protoc()?;
            let mut cmd = Command::new(cargo());
            cmd.args(["run", "-p", "setpoint", "--", "run"]);
            if once {
                cmd.arg("--once");
            }
            run(cmd.env("SETPOINT_PLUGIN_DIR", &plugins))?;
        }
        Task::Bench { args } => {
            let plugins = build_plugins(&root)?;
            ensure_protoc()?;
            run(Command::new(cargo())
                .args(["bench", "-p", "setpoint-bench"])
                .args(&args)
                .env("SETPOINT_PLUGIN_DIR", &plugins))?;
        }
        Task::ApiLatency {
            requests,
            busy,
            plugin_threads,
            no_build,
        } => {
            let plugin_threads = if plugin_threads.is_empty() {
                vec![0, daemon::cores()]
            } else {
                plugin_threads
            };
            api_latency::run(
                &root,
                api_latency::Args {
                    requests,
                    busy,
                    plugin_threads,
                    build: !no_build,
                },
            )?;
        }
        Task::Soak {
            secs,
            objects,
            writers,
            seed,
            no_build,
        } => {
            soak::run(
                &root,
                soak::Args {
                    secs,
                    objects,
                    writers,
                    seed,
                    build: !no_build,
                },
            )?;
        }
        Task::SwapBench {
            swaps,
            objects,
            rounds,
            pauses,
            debug,
            no_build,
        } => {
            swap_bench::run(
                &root,
                swap_bench::Args {
                    swaps,
                    objects,
                    rounds,
                    pauses,
                    debug,
                    build: !no_build,
                },
            )?;
        }
        Task::ApplyBench {
            secs,
            clients,
            no_build,
        } => {
            apply_bench::run(
                &root,
                apply_bench::Args {
                    secs,
                    clients,
                    build: !no_build,
                },
            )?;
        }
        Task::EtcdBench {
            kills,
            stops,
            objects,
            rounds,
            apply_secs,
            threads,
            no_build,
        } => {
            etcd_bench::run(
                &root,
                etcd_bench::Args {
                    kills,
                    stops,
                    objects,
                    rounds,
                    apply_secs,
                    threads,
                    build: !no_build,
                },
            )?;
        }
    }
    Ok(())
}

/// The componentize-py release the Python plugins are built with.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

fn python3() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Every Python plugin: a folder under plugins/python/ with an app.py.
fn python_plugins(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    guest_plugins(root, "python", "app.py")
}

/// The folders under plugins/LANG/ that hold an `entry` file.
fn guest_plugins(root: &Path, lang: &str, entry: &str) -> anyhow::Result<Vec<PathBuf>> {
    let base = root.join("plugins").join(lang);
    let mut dirs = Vec::new();
    if base.is_dir() {
        for item in std::fs::read_dir(&base)? {
            let dir = item?.path();
            if dir.join(entry).is_file() {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// The componentize-js release the JavaScript plugins are built with.
const COMPONENTIZE_JS: &str = "0.23.0";

/// target/js-tools with componentize-js installed from npm, and the SDK's build
/// script beside it (so that its import resolves to that node_modules).
fn js_tools(root: &Path) -> anyhow::Result<PathBuf> {
    let tools = root.join("target/js-tools");
    std::fs::create_dir_all(&tools)?;
    std::fs::copy(root.join("sdk/js/build.mjs"), tools.join("build.mjs"))?;
    if tools
        .join("node_modules/@bytecodealliance/componentize-js/package.json")
        .exists()
    {
        return Ok(tools);
    }
    std::fs::write(
        tools.join("package.json"),
        format!(
            "{{\"name\": \"setpoint-js-tools\", \"private\": true, \"type\": \"module\", \
             \"dependencies\": {{\"@bytecodealliance/componentize-js\": \"{COMPONENTIZE_JS}\"}}}}\n"
        ),
    )?;
    eprintln!(
        "xtask: installing componentize-js {COMPONENTIZE_JS} into {}",
        tools.display()
    );
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&tools))
    .context("JavaScript plugins need Node.js and npm (Debian: nodejs npm)")?;
    Ok(tools)
}

/// Build each JavaScript plugin (entry app.js) into `out/<folder>-js.wasm`,
/// skipping those already newer than their sources, the SDK and the WIT.
fn build_js_plugins(root: &Path, out: &Path) -> anyhow::Result<usize> {
    let dirs = guest_plugins(root, "js", "app.js")?;
    if dirs.is_empty() {
        return Ok(0);
    }
    let tools = js_tools(root)?;
    for dir in &dirs {
        let name = dir.file_name().expect("a folder").to_string_lossy();
        let wasm = out.join(format!("{name}-js.wasm"));
        let inputs = [dir.clone(), root.join("sdk/js"), root.join("wit")];
        let built = wasm.metadata().and_then(|m| m.modified()).ok();
        if built.is_some_and(|b| b > newest(&inputs)) {
            continue;
        }
        eprintln!("xtask: building {} with componentize-js", wasm.display());
        // componentize-js wants the WIT folder under the current directory.
        run(Command::new("node")
            .arg(tools.join("build.mjs"))
            .arg(dir.join("app.js"))
            .arg(&wasm)
            .arg("plugin-with-admission")
            .current_dir(root))?;
    }
    Ok(dirs.len())
}

/// componentize-py in target/python-venv, installed from PyPI if missing.
fn componentize_py(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/python-venv");
    let tool = venv.join("bin/componentize-py");
    if tool.exists() {
        return Ok(tool);
    }
    let version = Command::new(python3())
        .args(["-c", "import sys; print(sys.version_info >= (3, 11))"])
        .output()
        .context("Python plugins need python3 (3.11 or newer) on PATH, or $PYTHON")?;
    if String::from_utf8_lossy(&version.stdout).trim() != "True" {
        bail!(
            "Python plugins need Python 3.11 or newer (componentize-py's bindings use \
             typing.Self); set $PYTHON to one"
        );
    }
    eprintln!(
        "xtask: installing {COMPONENTIZE_PY} into {}",
        venv.display()
    );
    run(Command::new(python3()).args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", COMPONENTIZE_PY]))?;
    Ok(tool)
}

/// Newest modification time of the files under `paths`.
fn newest(paths: &[PathBuf]) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = p.metadata().and_then(|m| m.modified()) {
            newest = newest.max(m);
        }
    }
    newest
}

/// Build each Python plugin with componentize-py into `out/<folder>-py.wasm`,
/// skipping those already newer than their sources, the SDK and the WIT.
fn build_python_plugins(root: &Path, out: &Path) -> anyhow::Result<usize> {
    let dirs = python_plugins(root)?;
    if dirs.is_empty() {
        return Ok(0);
    }
    let tool = componentize_py(root)?;
    for dir in &dirs {
        let name = dir.file_name().expect("a folder").to_string_lossy();
        let wasm = out.join(format!("{name}-py.wasm"));
        let inputs = [dir.clone(), root.join("sdk/python"), root.join("wit")];
        let built = wasm.metadata().and_then(|m| m.modified()).ok();
        if built.is_some_and(|b| b > newest(&inputs)) {
            continue;
        }
        eprintln!("xtask: building {} with componentize-py", wasm.display());
        // A plugin that sends HTTP names the plugin-with-http world in a
        // `wit-world` file: the SDK's http-wit, with wasi:http.
        let (wit, world) = match std::fs::read_to_string(dir.join("wit-world")) {
            Ok(world) => (root.join("sdk/python/http-wit"), world.trim().to_string()),
            Err(_) => (root.join("wit"), "plugin-with-admission".to_string()),
        };
        run(Command::new(&tool)
            .arg("-d")
            .arg(wit)
            .args(["-w", &world, "componentize", "app", "-p"])
            .arg(dir)
            .arg("-p")
            .arg(root.join("sdk/python"))
            .arg("-o")
            .arg(&wasm)
            .env("PYTHONDONTWRITEBYTECODE", "1"))?;
    }
    Ok(dirs.len())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed with {status}", cmd.get_program());
    }
    Ok(())
}

/// Run a command, killing it if it outlives `limit` (rustup hangs, rather than
/// fails, when its download server is half-reachable).
fn succeeds_within(cmd: &mut Command, limit: Duration) -> bool {
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                eprintln!(
                    "xtask: {:?} did not finish in {limit:?}; giving up on it",
                    cmd.get_program()
                );
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Build every plugin crate under plugins/ and copy the components to
/// target/plugins/. Returns that folder.
fn build_plugins(root: &Path) -> anyhow::Result<PathBuf> {
    let toolchain = choose_toolchain()?;
    // One target directory per toolchain: they cannot share build artifacts.
    let target_dir = root.join(match toolchain {
        Toolchain::Rustup => "target/wasm-rustup",
        Toolchain::DebianBuildStd => "target/wasm-debian",
    });
    let mut cmd;
    match toolchain {
        Toolchain::Rustup => {
            eprintln!("xtask: building plugins with rustup's wasm32-wasip2 target");
            cmd = Command::new(cargo());
        }
        Toolchain::DebianBuildStd => {
            eprintln!(
                "xtask: building plugins with Debian's rustc-web and -Zbuild-std \
                 (rustup's wasm32-wasip2 target is not installed and cannot be downloaded here, or SETPOINT_WASM_TOOLCHAIN=debian)"
            );
            cmd = Command::new("/usr/bin/cargo");
            // Debian's cargo must find Debian's rustc, not rustup's proxy.
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("/usr/bin:{path}"))
                .env_remove("RUSTC")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env("RUSTC_BOOTSTRAP", "1")
                .env("RUSTFLAGS", "-L native=/usr/lib/wasm32-wasi")
                .args(["-Zbuild-std=std,panic_abort"]);
        }
    }
    cmd.current_dir(root.join("plugins"))
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The `build` subcommand must come before `-Z` flags' arguments: reorder.
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut ordered = Command::new(cmd.get_program());
    ordered.current_dir(root.join("plugins"));
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => ordered.env(k, v),
            None => ordered.env_remove(k),
        };
    }
    let (zflags, rest): (Vec<_>, Vec<_>) = args
        .into_iter()
        .partition(|a| a.to_string_lossy().starts_with("-Z"));
    ordered.args(&rest[..1]).args(zflags).args(&rest[1..]);
    run(&mut ordered)?;

    let out = root.join("target/plugins");
    std::fs::create_dir_all(&out)?;
    let built = target_dir.join("wasm32-wasip2/release");
    let mut count = 0;
    for entry in std::fs::read_dir(&built)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path.file_name().expect("a file");
            std::fs::copy(&path, out.join(name))?;
            count += 1;
        }
    }
    count += build_python_plugins(root, &out)?;
    count += build_js_plugins(root, &out)?;
    let how = match toolchain {
        Toolchain::Rustup => "rustup wasm32-wasip2",
        Toolchain::DebianBuildStd => "Debian rustc-web + -Zbuild-std",
    };
    eprintln!(
        "xtask: {count} plugin components in {} (toolchain: {how})",
        out.display()
    );
    Ok(out)
}

/// rustup's target if it is installed or can be downloaded; otherwise Debian's
/// toolchain, installed with apt if missing. `SETPOINT_WASM_TOOLCHAIN=rustup` or
/// `=debian` forces a choice.
fn choose_toolchain() -> anyhow::Result<Toolchain> {
    let forced = std::env::var("SETPOINT_WASM_TOOLCHAIN").ok();
    if forced.as_deref() != Some("debian") {
        if rustup_has_target() {
            return Ok(Toolchain::Rustup);
        }
        if forced.as_deref() == Some("rustup") || rustup_server_reachable() {
            eprintln!("xtask: installing rustup's wasm32-wasip2 target");
            if succeeds_within(
                Command::new("rustup").args(["target", "add", "wasm32-wasip2"]),
                Duration::from_secs(180),
            ) && rustup_has_target()
            {
                return Ok(Toolchain::Rustup);
            }
            if forced.as_deref() == Some("rustup") {
                bail!("`rustup target add wasm32-wasip2` failed");
            }
        }
    }
    ensure_debian_toolchain()?;
    Ok(Toolchain::DebianBuildStd)
}

fn rustup_has_target() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        })
}

/// rustup downloads targets from static.rust-lang.org; `rustup target add` hangs
/// rather than fails where that is unreachable, so probe it first.
fn rustup_server_reachable() -> bool {
    let Ok(mut addrs) = ("static.rust-lang.org", 443).to_socket_addrs() else {
        return false;
    };
    addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok())
}

/// The Debian packages the -Zbuild-std route needs, and the file each provides.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "rust-web-src",
        "/usr/lib/rustlib/src/rust/library/Cargo.lock",
    ),
    ("lld-22", "/usr/bin/wasm-ld-22"),
    ("wasi-libc", "/usr/lib/wasm32-wasi/libc.a"),
];

fn ensure_debian_toolchain() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    apt_install(&missing).context(
        "cannot install the Debian toolchain for plugins; install rustup's wasm32-wasip2 \
         target instead (`rustup target add wasm32-wasip2`)",
    )
}

/// `apt-get install`, through sudo when not root.
/// The host's etcd client (etcd-client, over tonic) compiles etcd's protocol
/// files at build time with `protoc`: install Debian's protobuf-compiler if it
/// is missing.
fn ensure_protoc() -> anyhow::Result<()> {
    if std::env::var_os("PROTOC").is_some()
        || succeeds_within(
            Command::new("protoc").arg("--version"),
            Duration::from_secs(30),
        )
    {
        return Ok(());
    }
    eprintln!("xtask: installing Debian's protobuf-compiler (protoc) to build the etcd client");
    apt_install(&["protobuf-compiler"])
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| {
        let mut cmd = if is_root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq"]);
    install.args(packages);
    run(&mut install).with_context(|| format!("cannot install Debian's {}", packages.join(" ")))
}
