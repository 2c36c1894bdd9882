//! `cargo xtask api-latency`: how much CPU-bound plugin calls slow the HTTP API.
//!
//! For each `[runtime] plugin-threads` setting asked for, one daemon
//! (target/debug/setpoint) runs the `hostile` plugin with as many workers as the
//! largest N, a one-hour `max-reconcile-time`, its store in a temporary folder
//! and its API on 127.0.0.1:0. Then, for N = 0 and each N asked for, N `Hostile`
//! objects in `mode: loop` (a guest loop that never returns: N reconciles stay
//! CPU-bound until the time limit) are applied, the task waits until the
//! controller has all N in flight, and times `requests` sequential GETs of each
//! endpoint with one kept-alive client. Ratios are against N = 0 of the same
//! daemon. CPU use of the daemon's threads and of the whole machine is sampled
//! over each measurement, so a missed target can be told apart from a loaded
//! machine.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::daemon::{self, Client, CpuSample, Daemon, ThreadUse};

pub struct Args {
    pub requests: usize,
    pub busy: Vec<usize>,
    /// `[runtime] plugin-threads` values; 0 is the daemon's default (cores - 1).
    pub plugin_threads: Vec<usize>,
    pub build: bool,
}

const ENDPOINTS: [&str; 2] = ["/healthz", "/v1/controllers"];
const TARGET_P99: Duration = Duration::from_millis(20);

struct Row {
    threads: String,
    busy: usize,
    endpoint: &'static str,
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
    /// The daemon's plugin threads (`setpoint-plugins`).
    plugin: ThreadUse,
    /// The daemon's other threads: the API's runtime, the epoch ticker, ...
    other: ThreadUse,
    /// This process, the client.
    client: ThreadUse,
    machine_cores: f64,
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    let (bin, plugins) = daemon::prepare(root, args.build, &["hostile"])?;
    let mut busy = args.busy.clone();
    busy.push(0);
    busy.sort_unstable();
    busy.dedup();
    let workers = busy.last().copied().unwrap_or(0).max(1);
    let mut rows = Vec::new();
    for &threads in &args.plugin_threads {
        let home = tempfile::Builder::new()
            .prefix("setpoint-api-latency")
            .tempdir()?;
        let config = format!(
            "[store]\npath = {store:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n\
             [runtime]\nplugin-threads = {threads}\n\n\
             [[plugin]]\npath = {plugin:?}\nworkers = {workers}\n\n\
             [plugin.limits]\nmax-reconcile-time = \"1h\"\n",
            store = home.path().join("store.redb").display().to_string(),
            plugin = plugins.join("hostile.wasm").display().to_string(),
        );
        let mut daemon = Daemon::start(root, &bin, home.path(), &config)?;
        let label = if threads == 0 {
            format!("default ({})", (daemon::cores() - 1).max(1))
        } else {
            threads.to_string()
        };
        eprintln!(
            "xtask: daemon pid {} on {} with plugin-threads = {label}",
            daemon.pid(),
            daemon.url
        );
        let client = Client::new(&daemon.url);
        // Warm up: connections, allocator, first-touch of the routes.
        for endpoint in ENDPOINTS {
            for _ in 0..200 {
                client.get(endpoint)?;
            }
        }
        let mut applied = 0;
        for &n in &busy {
            if n > applied {
                let objects: Vec<String> = (applied..n)
                    .map(|i| {
                        format!(
                            r#"{{"kind":"Hostile","metadata":{{"name":"busy-{i}"}},"spec":{{"mode":"loop"}}}}"#
                        )
                    })
                    .collect();
                let body = format!("[{}]", objects.join(","));
                let (status, answer) =
                    client.send("POST", "/v1/apply", Some("application/json"), Some(&body))?;
                if status != 200 {
                    bail!("applying the busy objects: {status} {answer}");
                }
                applied = n;
            }
            wait_in_flight(&client, n)?;
            // Let the loops reach steady state before timing.
            std::thread::sleep(Duration::from_millis(500));
            daemon.check_alive()?;
            for endpoint in ENDPOINTS {
                let before = CpuSample::take(daemon.pid());
                let mut times = Vec::with_capacity(args.requests);
                for _ in 0..args.requests {
                    let started = Instant::now();
                    let (status, _) = client.get(endpoint)?;
                    times.push(started.elapsed());
                    if status != 200 {
                        bail!("GET {endpoint}: {status}");
                    }
                }
                let after = CpuSample::take(daemon.pid());
                let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
                times.sort_unstable();
                let is_plugin = |t: &str| t.starts_with("setpoint-plugin");
                let row = Row {
                    threads: label.clone(),
                    busy: n,
                    endpoint,
                    p50: daemon::quantile(&times, 0.50),
                    p99: daemon::quantile(&times, 0.99),
                    max: *times.last().unwrap_or(&Duration::ZERO),
                    mean,
                    plugin: after.daemon_since(&before, is_plugin),
                    other: after.daemon_since(&before, |t| !is_plugin(t)),
                    client: after.client_since(&before),
                    machine_cores: after.machine_cores_since(&before),
                };
                eprintln!(
                    "xtask: plugin-threads {label}, N = {n}, {endpoint}: p50 {} ms, p99 {} ms, \
                     max {} ms; daemon: plugin threads {:.2} cores, other {:.2} cores \
                     (waited {:.1} ms for a CPU); client {:.2} cores (waited {:.1} ms); \
                     machine {:.2} cores busy",
                    daemon::ms(row.p50),
                    daemon::ms(row.p99),
                    daemon::ms(row.max),
                    row.plugin.cores,
                    row.other.cores,
                    row.other.waited.as_secs_f64() * 1e3,
                    row.client.cores,
                    row.client.waited.as_secs_f64() * 1e3,
                    row.machine_cores,
                );
                rows.push(row);
            }
            // The loops must still be running: a timeout or a trap would make
            // this a measurement of something else.
            wait_in_flight(&client, n)?;
        }
        drop(daemon); // SIGKILL: the loops would hold a graceful stop for an hour.
    }
    print_table(&rows, args.requests);
    Ok(())
}

/// Wait until the `hostile` controller has exactly `n` reconciles in flight.
fn wait_in_flight(client: &Client, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let controllers = client.get_json("/v1/controllers")?;
        let in_flight = controllers
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "hostile"))
            .and_then(|c| c["in-flight"].as_u64())
            .context("no hostile controller in /v1/controllers")?;
        if in_flight == n as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the hostile controller has {in_flight} reconciles in flight, not {n}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_table(rows: &[Row], requests: usize) {
    println!();
    println!(
        "API latency under CPU-bound plugin calls ({}; {requests} sequential requests per row)",
        daemon::machine()
    );
    println!();
    println!(
        "| plugin threads | busy | endpoint | p50 ms | p99 ms | max ms | mean ms | p50 vs N=0 | p99 vs N=0 | p99 ≤ 20 ms \
         | plugin threads' cores | other daemon threads' cores | their CPU wait µs/req | client cores | client CPU wait µs/req | machine busy cores |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let per_request = |d: Duration| d.as_secs_f64() * 1e6 / requests.max(1) as f64;
    for row in rows {
        let base = rows
            .iter()
            .find(|b| b.threads == row.threads && b.endpoint == row.endpoint && b.busy == 0);
        let ratio = |f: fn(&Row) -> Duration| {
            base.map_or("-".to_string(), |b| {
                format!(
                    "{:.2}×",
                    f(row).as_secs_f64() / f(b).as_secs_f64().max(1e-9)
                )
            })
        };
        println!(
            "| {} | {} | `{}` | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |",
            row.threads,
            row.busy,
            row.endpoint,
            daemon::ms(row.p50),
            daemon::ms(row.p99),
            daemon::ms(row.max),
            daemon::ms(row.mean),
            ratio(|r| r.p50),
            ratio(|r| r.p99),
            if row.p99 <= TARGET_P99 {
                "yes"
            } else {
                "**no**"
            },
            row.plugin.cores,
            row.other.cores,
            per_request(row.other.waited),
            row.client.cores,
            per_request(row.client.waited),
            row.machine_cores,
        );
    }
}
