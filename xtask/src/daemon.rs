//! A `setpoint run` child process for the report-style tasks (`api-latency`,
//! `soak`, `swap-bench`): the debug (or release) binary on a temporary configuration, its log in a file,
//! and a plain blocking HTTP client for its API.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// target/debug/setpoint, built first unless `build` is false, and the plugin
/// components `plugins` (names without `.wasm`), built if any is missing.
pub fn prepare(root: &Path, build: bool, plugins: &[&str]) -> anyhow::Result<(PathBuf, PathBuf)> {
    prepare_profile(root, build, false, plugins)
}

/// [`prepare`], with target/release/setpoint (built with `--release`) when
/// `release` is true.
pub fn prepare_profile(
    root: &Path,
    build: bool,
    release: bool,
    plugins: &[&str],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (profile, flag) = if release {
        ("release", " --release")
    } else {
        ("debug", "")
    };
    if build {
        let mut cargo = Command::new(crate::cargo());
        cargo.args(["build", "--quiet", "-p", "setpoint"]);
        if release {
            cargo.arg("--release");
        }
        crate::run(&mut cargo)?;
    }
    let bin = root.join("target").join(profile).join("setpoint");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build -p setpoint{flag}` (or drop --no-build)",
            bin.display()
        );
    }
    let mut dir = root.join("target/plugins");
    if plugins
        .iter()
        .any(|p| !dir.join(format!("{p}.wasm")).exists())
    {
        dir = crate::build_plugins(root)?;
    }
    Ok((bin, dir))
}

/// A running `setpoint run --config FILE`. Killed when dropped.
pub struct Daemon {
    child: Child,
    /// Its stderr and stdout.
    pub log_path: PathBuf,
    /// The API's base URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Daemon {
    /// Write `config` to `home/setpoint.toml` and run the daemon on it, in `home`,
    /// with the compile cache in target/xtask-cache (shared between runs, so
    /// loads after the first are warm) and the default log level. Returns once
    /// the API listens.
    pub fn start(root: &Path, bin: &Path, home: &Path, config: &str) -> anyhow::Result<Self> {
        let config_path = home.join("setpoint.toml");
        std::fs::write(&config_path, config)?;
        let log_path = home.join("daemon.log");
        let log = File::create(&log_path)?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config_path)
            .current_dir(home)
            .env("XDG_CACHE_HOME", root.join("target/xtask-cache"))
            .env("XDG_DATA_HOME", home.join("data"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("SETPOINT_SERVER")
            .env_remove("SETPOINT_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut daemon = Self {
            child,
            log_path,
            url: String::new(),
        };
        let line = daemon.wait_for("api listening on ", Duration::from_secs(120))?;
        let rest = line.split("api listening on ").nth(1).unwrap_or_default();
        daemon.url = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait for a log line containing `needle`; fail if the daemon exits first.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited ({status}) before logging {needle:?}:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("no {needle:?} in the daemon's log after {limit:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fail if the daemon has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the daemon exited ({status}); the end of its log ({}):\n{}",
                self.log_path.display(),
                tail(&self.log(), 40)
            );
        }
        Ok(())
    }

    /// SIGINT, as Ctrl-C would, then wait up to `limit` for the process to end.
    /// Returns its exit status and how long it took.
    pub fn interrupt(&mut self, limit: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        if !sent.success() {
            bail!("kill -INT {} failed", self.child.id());
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the daemon did not exit within {limit:?} of SIGINT; the end of its log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A blocking HTTP client of the daemon's API, keeping its connection alive.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Not a global timeout: with one, ureq resolves the host on a new
            // thread for every request (so that it can time the lookup out),
            // which adds a thread spawn and two wake-ups to each latency.
            .timeout_recv_response(Some(Duration::from_secs(700)))
            .build()
            .into();
        Self {
            agent,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    /// One request; any status is returned with the body.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(ct) = content_type {
            request = request.header("Content-Type", ct);
        }
        let mut response = match body {
            Some(body) => self.agent.run(request.body(body.as_bytes().to_vec())?),
            None => self.agent.run(request.body(())?),
        }
        .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(512 * 1024 * 1024)
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        Ok((status, text))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.send("GET", path, None, None)
    }

    /// GET a path that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            bail!("GET {path}: {status} {}", cut(&body, 2000));
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
    }
}

/// At most `n` characters of `s`.
pub fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// The samples of one metric family in Prometheus text: label set → value.
pub fn metric(text: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l.to_string(), v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => (String::new(), v),
                None => continue,
            },
        };
        if let Ok(v) = value.split_whitespace().next().unwrap_or("").parse::<f64>() {
            out.insert(labels, v);
        }
    }
    out
}

/// CPU use so far, from the scheduler's own accounting
/// (`/proc/PID/task/TID/schedstat`: nanoseconds on a CPU and waiting in a run
/// queue for one), per thread name, of the daemon and of this process (the
/// client), and the whole machine's busy and total ticks (`/proc/stat`).
pub struct CpuSample {
    pub at: Instant,
    daemon: BTreeMap<String, (u64, u64)>,
    client: BTreeMap<String, (u64, u64)>,
    machine_busy: u64,
    machine_total: u64,
}

/// What threads used between two samples.
pub struct ThreadUse {
    /// CPU cores kept busy on average.
    pub cores: f64,
    /// Time spent runnable but waiting for a CPU, summed over the threads.
    pub waited: Duration,
}

/// (ns on a CPU, ns waiting for one) per thread name of process `pid`.
fn threads(pid: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let v: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let entry = out.entry(comm.trim().to_string()).or_insert((0, 0));
        entry.0 += v.first().copied().unwrap_or(0);
        entry.1 += v.get(1).copied().unwrap_or(0);
    }
    out
}

fn use_since(
    now: &BTreeMap<String, (u64, u64)>,
    then: &BTreeMap<String, (u64, u64)>,
    secs: f64,
    matches: impl Fn(&str) -> bool,
) -> ThreadUse {
    let (mut run, mut wait) = (0u64, 0u64);
    for (name, (r, w)) in now.iter().filter(|(name, _)| matches(name)) {
        let (r0, w0) = then.get(name).copied().unwrap_or((0, 0));
        run += r.saturating_sub(r0);
        wait += w.saturating_sub(w0);
    }
    ThreadUse {
        cores: run as f64 / 1e9 / secs.max(1e-9),
        waited: Duration::from_nanos(wait),
    }
}

impl CpuSample {
    pub fn take(pid: u32) -> Self {
        let daemon = threads(&pid.to_string());
        let client = threads("self");
        let (mut busy, mut total) = (0, 0);
        if let Ok(stat) = std::fs::read_to_string("/proc/stat")
            && let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu "))
        {
            let v: Vec<u64> = cpu
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest counted in user).
            total = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            busy = total - idle;
        }
        Self {
            at: Instant::now(),
            daemon,
            client,
            machine_busy: busy,
            machine_total: total,
        }
    }

    /// What the daemon's threads whose name `matches` used since `earlier`.
    pub fn daemon_since(&self, earlier: &Self, matches: impl Fn(&str) -> bool) -> ThreadUse {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        use_since(&self.daemon, &earlier.daemon, secs, matches)
    }

    /// What this process (the client) used since `earlier`.
    pub fn client_since(&self, earlier: &Self) -> ThreadUse {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        use_since(&self.client, &earlier.client, secs, |_| true)
    }

    /// Busy cores of the whole machine between `earlier` and this sample.
    pub fn machine_cores_since(&self, earlier: &Self) -> f64 {
        let total = self.machine_total.saturating_sub(earlier.machine_total) as f64;
        if total == 0.0 {
            return 0.0;
        }
        let busy = self.machine_busy.saturating_sub(earlier.machine_busy) as f64;
        busy / total * cores() as f64
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The machine, for a report: CPU model, cores, kernel.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{} cores, {model}, Linux {kernel}", cores())
}

/// The value at quantile `q` (0..=1) of sorted `v`, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `count` Greetings named `{prefix}{i}`, `start..start+count`, as a YAML stream.
pub fn greetings(prefix: &str, start: usize, count: usize) -> String {
    (start..start + count)
        .map(|i| {
            format!("kind: Greeting\nmetadata: {{name: {prefix}{i}}}\nspec: {{who: x}}\n---\n")
        })
        .collect()
}

/// `POST /v1/apply` of `yaml`; an error unless the answer is 200.
pub fn apply(client: &Client, yaml: &str) -> anyhow::Result<()> {
    let (status, answer) =
        client.send("POST", "/v1/apply", Some("application/yaml"), Some(yaml))?;
    if status != 200 {
        bail!("apply: {status} {}", cut(&answer, 500));
    }
    Ok(())
}

/// What [`apply_load`] measured.
pub struct Load {
    /// Objects acknowledged.
    pub objects: u64,
    pub took: Duration,
    /// Each request's latency, sorted.
    pub latencies: Vec<Duration>,
}

/// `clients` threads, each with its own connection, applying new Greetings of
/// `batch` objects per request to the daemon at `url`, back to back, for
/// `secs`. The first failed request stops every client and is the error.
pub fn apply_load(url: &str, clients: usize, batch: usize, secs: Duration) -> anyhow::Result<Load> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let objects = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = started + secs;
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let (objects, stop) = (&objects, &stop);
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let client = Client::new(url);
                    let mut latencies = Vec::new();
                    let mut i = 0;
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        let body = greetings(&format!("c{t}-"), i, batch);
                        let sent = Instant::now();
                        if let Err(e) = apply(&client, &body) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        latencies.push(sent.elapsed());
                        objects.fetch_add(batch as u64, Ordering::Relaxed);
                        i += batch;
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let took = started.elapsed();
    let mut latencies = Vec::new();
    for r in results {
        latencies.extend(r?);
    }
    latencies.sort_unstable();
    Ok(Load {
        objects: objects.load(Ordering::Relaxed),
        took,
        latencies,
    })
}
