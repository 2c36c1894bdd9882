//! `cargo xtask swap-bench`: what a hot swap costs, measured on a real daemon
//! (target/release/setpoint by default; `--debug` for target/debug) with the
//! `swaptest` plugin: swaptest.wasm (Rust, 1.0.0), swaptest_v2.wasm (the same
//! source as 2.0.0) and swaptest-py.wasm (the same plugin in Python,
//! py-1.0.0). All three reconcile kind `Swap` under the controller name
//! `swaptest`, and each call writes the status `{version, started-us}` (the
//! plugin's wall clock when the call began, µs).
//!
//! **Swap latency**: from sending `POST /v1/plugins/swaptest/swap` to the start
//! of the first reconcile served by the new version. As soon as the swap
//! answers, the client asks for a reconcile of the object `Swap:lat` (a
//! CloudEvent `dev.setpoint.reconcile`: a queue add, no disk write) and polls
//! the object until its status names the new version; the latency is that
//! status's `started-us` minus the wall clock just before the swap was sent.
//! It includes the swap's validation (read the file, sha256, deserialize from
//! the compile cache, instantiate, `describe()`), the reconcile request, the
//! queue, and a new instance of the new version on the worker. The compile
//! cache is warm (one swap to every version first), and each case starts with
//! 4 unmeasured swaps of its own:
//! - Rust: swaps back and forth between swaptest 1.0.0 and 2.0.0;
//! - Python: swaps from the Rust 1.0.0 to swaptest-py (the samples), each
//!   followed by a swap back to Rust (reported too, as Python → Rust);
//! - rollback: `POST /v1/plugins/swaptest/rollback` back and forth between the
//!   two Rust versions, which the registry keeps compiled (no file read).
//!
//! **Throughput during swaps**: `objects` `Swap` objects (plain, no key-value
//! records) are stored and reconciled first. Then each run queues all of them
//! again with `POST /v1/controllers/swaptest/full-reconcile` and times until
//! the controller has finished that many calls. Runs come in pairs, back to
//! back: one without swaps, and one while another thread swaps back and forth
//! between the two Rust versions, waiting a `--pauses` value after each swap
//! (0: back to back, as fast as the API answers); `rounds` pairs per pause.
//! The ratio is taken within each pair (the machine's speed drifts over a
//! run), and the median over the pairs is reported. Each run also checks that
//! the controller finished exactly as many calls as were queued (no call lost
//! or repeated because of a swap), and samples the CPU use of the daemon's
//! threads and of this process, so that a missed target can be explained.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::daemon::{self, Client, CpuSample, Daemon, ThreadUse};

pub struct Args {
    /// Latency samples per case.
    pub swaps: usize,
    /// Objects reconciled per throughput round.
    pub objects: usize,
    /// Throughput rounds, each without and with swaps.
    pub rounds: usize,
    /// Pauses between swaps in the rounds with swaps (0: back to back).
    pub pauses: Vec<u64>,
    /// target/debug/setpoint instead of target/release/setpoint.
    pub debug: bool,
    pub build: bool,
}

const TARGET_P99_RUST: Duration = Duration::from_millis(10);
const TARGET_RATIO: f64 = 0.9;
/// Unmeasured swaps at the start of each latency case.
const WARMUP: usize = 4;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A swap (`Some(path)`) or a rollback (`None`).
type Move<'a> = Option<&'a Path>;

/// One latency sample.
struct Sample {
    /// Swap sent → first reconcile on the new version started.
    latency: Duration,
    /// Swap sent → swap answered.
    api: Duration,
}

struct Case {
    name: &'static str,
    samples: Vec<Sample>,
    /// Whether the p99 target applies to this case.
    target: Option<Duration>,
}

struct Round {
    /// Runs are made in pairs: one without swaps and one with.
    pair: usize,
    /// The pause between swaps; `None`: no swaps.
    pause: Option<Duration>,
    calls: u64,
    took: Duration,
    swaps_done: u64,
    plugin: ThreadUse,
    other: ThreadUse,
    /// This process: the swapping thread and the polling.
    client: ThreadUse,
    machine_cores: f64,
}

impl Round {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    let plugins = ["swaptest", "swaptest_v2", "swaptest-py"];
    let (bin, dir) = daemon::prepare_profile(root, args.build, !args.debug, &plugins)?;
    let v1 = dir.join("swaptest.wasm");
    let v2 = dir.join("swaptest_v2.wasm");
    let py = dir.join("swaptest-py.wasm");
    let home = tempfile::Builder::new()
        .prefix("setpoint-swap-bench")
        .tempdir()?;
    let config = format!(
        "[store]\npath = {store:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\nmax-body-bytes = 16777216\n\n\
         [[plugin]]\npath = {v1:?}\n",
        store = home.path().join("store.redb").display().to_string(),
        v1 = v1.display().to_string(),
    );
    let mut daemon = Daemon::start(root, &bin, home.path(), &config)?;
    eprintln!(
        "xtask: daemon pid {} on {} ({})",
        daemon.pid(),
        daemon.url,
        bin.display()
    );
    let client = Client::new(&daemon.url);

    // Every version once, so that the compile cache holds each of them.
    for (path, version) in [(&v2, "2.0.0"), (&py, "py-1.0.0"), (&v1, "1.0.0")] {
        let started = Instant::now();
        swap(&client, Some(path), version)?;
        eprintln!(
            "xtask: warm-up swap to {version} took {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    apply(
        &client,
        &[json!({"kind": "Swap", "metadata": {"name": "lat"}, "spec": {"record": false}})],
    )?;
    wait(&client)?;

    let mut cases = Vec::new();
    let mut rust = Vec::new();
    for i in 0..WARMUP + args.swaps {
        let (path, version) = if i % 2 == 0 {
            (&v2, "2.0.0")
        } else {
            (&v1, "1.0.0")
        };
        let sample = measure(&client, Some(path), version)?;
        if i >= WARMUP {
            rust.push(sample);
        }
    }
    swap(&client, Some(&v1), "1.0.0")?;
    let (mut to_py, mut from_py) = (Vec::new(), Vec::new());
    for i in 0..WARMUP / 2 + args.swaps {
        let there = measure(&client, Some(&py), "py-1.0.0")?;
        let back = measure(&client, Some(&v1), "1.0.0")?;
        if i >= WARMUP / 2 {
            to_py.push(there);
            from_py.push(back);
        }
    }
    swap(&client, Some(&v2), "2.0.0")?;
    let mut rollbacks = Vec::new();
    for i in 0..WARMUP + args.swaps {
        let version = if i % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let sample = measure(&client, None, version)?;
        if i >= WARMUP {
            rollbacks.push(sample);
        }
    }
    cases.push(Case {
        name: "Rust → Rust (swaptest 1.0.0 ↔ 2.0.0), swap",
        samples: rust,
        target: Some(TARGET_P99_RUST),
    });
    cases.push(Case {
        name: "Rust → Python (swaptest → swaptest-py), swap",
        samples: to_py,
        target: None,
    });
    cases.push(Case {
        name: "Python → Rust (swaptest-py → swaptest), swap",
        samples: from_py,
        target: None,
    });
    cases.push(Case {
        name: "Rust ↔ Rust, rollback (kept compiled)",
        samples: rollbacks,
        target: None,
    });
    daemon.check_alive()?;

    // Throughput: the objects, reconciled once before the rounds.
    swap(&client, Some(&v1), "1.0.0")?;
    let names: Vec<Value> = (0..args.objects)
        .map(|i| {
            json!({"kind": "Swap", "metadata": {"name": format!("tp-{i:06}")},
                   "spec": {"record": false}})
        })
        .collect();
    for chunk in names.chunks(5000) {
        apply(&client, chunk)?;
    }
    wait(&client)?;
    settle(&client)?;
    let mut rounds = Vec::new();
    // Pairs of runs, one without swaps and one with, back to back (which
    // goes first alternates), so that a drift in the machine's speed over
    // the run (seen here: the same run twice as slow a minute later) falls
    // on both runs of a pair; the ratio is taken within each pair.
    for round in 0..args.rounds {
        let mut pauses = args.pauses.clone();
        let turn = round % pauses.len().max(1);
        pauses.rotate_left(turn);
        for (i, ms) in pauses.into_iter().enumerate() {
            let pause = Some(Duration::from_millis(ms));
            let order = if (round + i) % 2 == 0 {
                [None, pause]
            } else {
                [pause, None]
            };
            for p in order {
                let mut r = throughput(&client, daemon.pid(), p, (&v1, &v2))?;
                r.pair = rounds.len() / 2;
                eprintln!(
                    "xtask: round {round}, {}: {} calls in {:.2} s = {:.0}/s, {} swaps",
                    swaps_label(p),
                    r.calls,
                    r.took.as_secs_f64(),
                    r.rate(),
                    r.swaps_done
                );
                rounds.push(r);
                daemon.check_alive()?;
            }
        }
    }
    let (status, took) = daemon.interrupt(Duration::from_secs(60))?;
    if !status.success() {
        bail!("the daemon exited with {status} after {took:?}");
    }
    print_report(&cases, &rounds, &args, &bin);
    Ok(())
}

fn apply(client: &Client, objects: &[Value]) -> anyhow::Result<()> {
    let body = Value::Array(objects.to_vec()).to_string();
    let (status, answer) =
        client.send("POST", "/v1/apply", Some("application/json"), Some(&body))?;
    if status != 200 {
        bail!("apply: {status} {}", daemon::cut(&answer, 500));
    }
    Ok(())
}

fn wait(client: &Client) -> anyhow::Result<()> {
    let (status, answer) = client.get("/v1/wait?kind=Swap&timeout=600s")?;
    if status != 200 {
        bail!("wait: {status} {}", daemon::cut(&answer, 1000));
    }
    Ok(())
}

/// Swap (or roll back) and check that `version` is now active.
fn swap(client: &Client, to: Move, version: &str) -> anyhow::Result<()> {
    let (status, answer) = match to {
        Some(path) => client.send(
            "POST",
            "/v1/plugins/swaptest/swap",
            Some("application/json"),
            Some(&json!({ "path": path }).to_string()),
        )?,
        None => client.send(
            "POST",
            "/v1/plugins/swaptest/rollback",
            Some("application/json"),
            Some("{}"),
        )?,
    };
    if status != 200 {
        bail!("swap to {version}: {status} {answer}");
    }
    let view: Value = serde_json::from_str(&answer)?;
    if view["version"] != version {
        bail!("swapped to {} instead of {version}", view["version"]);
    }
    Ok(())
}

/// One latency sample: swap, ask for a reconcile of `Swap:lat`, and wait
/// until the new version has run it.
fn measure(client: &Client, to: Move, version: &str) -> anyhow::Result<Sample> {
    let sent_us = now_us();
    let started = Instant::now();
    swap(client, to, version)?;
    let api = started.elapsed();
    let event = json!({"specversion": "1.0", "id": format!("lat-{sent_us}"),
                       "source": "/xtask/swap-bench", "type": "dev.setpoint.reconcile",
                       "subject": "Swap:lat"});
    let (status, answer) = client.send(
        "POST",
        "/v1/events",
        Some("application/cloudevents+json"),
        Some(&event.to_string()),
    )?;
    if status != 202 {
        bail!("reconcile event: {status} {answer}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let object = client.get_json("/v1/objects/Swap/lat")?;
        let s = &object["status"];
        let began = s["started-us"].as_u64().unwrap_or(0);
        if s["version"] == version && began >= sent_us {
            return Ok(Sample {
                latency: Duration::from_micros(began - sent_us),
                api,
            });
        }
        if Instant::now() > deadline {
            bail!("no reconcile on {version} within 30 s of the swap: {object}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// (finished calls, queue depth + in flight + pending timers) of swaptest.
fn progress(client: &Client) -> anyhow::Result<(u64, u64)> {
    let controllers = client.get_json("/v1/controllers")?;
    let c = controllers
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "swaptest"))
        .context("no swaptest controller in /v1/controllers")?;
    let n = |f: &str| c[f].as_u64().unwrap_or(0);
    Ok((
        n("successes") + n("failures"),
        n("queue-depth") + n("in-flight") + n("pending-timers"),
    ))
}

/// Wait until the controller has nothing queued, in flight or scheduled.
fn settle(client: &Client) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (finished, outstanding) = progress(client)?;
        if outstanding == 0 {
            return Ok(finished);
        }
        if Instant::now() > deadline {
            bail!("the swaptest controller did not settle: {outstanding} keys outstanding");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One throughput round: queue every object again, and time until that many
/// calls have finished; with a `pause`, swap back and forth meanwhile, waiting
/// that long after each swap.
fn throughput(
    client: &Client,
    pid: u32,
    pause: Option<Duration>,
    (v1, v2): (&PathBuf, &PathBuf),
) -> anyhow::Result<Round> {
    let before = settle(client)?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let swapper = pause.map(|pause| {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        let (v1, v2) = (v1.clone(), v2.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            while !stop.load(Ordering::SeqCst) {
                let n = done.load(Ordering::SeqCst);
                let (path, version) = if n % 2 == 0 {
                    (&v2, "2.0.0")
                } else {
                    (&v1, "1.0.0")
                };
                swap(&client, Some(path), version)?;
                done.fetch_add(1, Ordering::SeqCst);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            Ok(())
        })
    });
    let cpu_before = CpuSample::take(pid);
    let started = Instant::now();
    let (status, answer) = client.send(
        "POST",
        "/v1/controllers/swaptest/full-reconcile",
        None,
        None,
    )?;
    if status != 200 {
        bail!("full-reconcile: {status} {answer}");
    }
    let queued = serde_json::from_str::<Value>(&answer)?["queued"]
        .as_u64()
        .context("full-reconcile answered no `queued`")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let took = loop {
        let (finished, _) = progress(client)?;
        if finished >= before + queued {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {queued} calls finished in 600 s",
                finished - before
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let cpu_after = CpuSample::take(pid);
    stop.store(true, Ordering::SeqCst);
    if let Some(swapper) = swapper {
        swapper
            .join()
            .map_err(|_| anyhow::anyhow!("the swapping thread panicked"))??;
    }
    let after = settle(client)?;
    if after != before + queued {
        bail!(
            "{} calls finished for {queued} queued keys ({}): a call was lost or repeated",
            after - before,
            swaps_label(pause)
        );
    }
    let is_plugin = |t: &str| t.starts_with("setpoint-plugin");
    Ok(Round {
        pair: 0,
        pause,
        calls: queued,
        took,
        swaps_done: done.load(Ordering::SeqCst),
        plugin: cpu_after.daemon_since(&cpu_before, is_plugin),
        other: cpu_after.daemon_since(&cpu_before, |t| !is_plugin(t)),
        client: cpu_after.client_since(&cpu_before),
        machine_cores: cpu_after.machine_cores_since(&cpu_before),
    })
}

fn swaps_label(pause: Option<Duration>) -> String {
    match pause {
        None => "no swaps".into(),
        Some(p) if p.is_zero() => "back-to-back swaps".into(),
        Some(p) => format!("a swap every {} ms + the swap's own time", p.as_millis()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_report(cases: &[Case], rounds: &[Round], args: &Args, bin: &Path) {
    println!();
    println!(
        "Swap latency: swap sent → first reconcile on the new version started ({}; {}; {} samples per case)",
        daemon::machine(),
        bin.display(),
        args.swaps
    );
    println!();
    println!(
        "| case | samples | p50 ms | p99 ms | max ms | mean ms | swap answered p50 ms | swap answered p99 ms | p99 ≤ 10 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for case in cases {
        let mut latency: Vec<Duration> = case.samples.iter().map(|s| s.latency).collect();
        let mut api: Vec<Duration> = case.samples.iter().map(|s| s.api).collect();
        let mean = latency.iter().sum::<Duration>() / latency.len().max(1) as u32;
        latency.sort_unstable();
        api.sort_unstable();
        let p99 = daemon::quantile(&latency, 0.99);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            case.name,
            latency.len(),
            daemon::ms(daemon::quantile(&latency, 0.50)),
            daemon::ms(p99),
            daemon::ms(*latency.last().unwrap_or(&Duration::ZERO)),
            daemon::ms(mean),
            daemon::ms(daemon::quantile(&api, 0.50)),
            daemon::ms(daemon::quantile(&api, 0.99)),
            match case.target {
                Some(t) if p99 <= t => "yes",
                Some(_) => "**no**",
                None => "-",
            }
        );
    }
    println!();
    println!(
        "Throughput: {} objects queued by a full reconciliation per run; runs in pairs, one without swaps and one with swaps at a pause, back to back",
        args.objects
    );
    println!();
    println!(
        "| pair | swaps | calls | seconds | calls/s | vs its pair without swaps | swaps done | swaps/s | plugin threads' cores | other daemon threads' cores | client cores | machine busy cores |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let partner = |r: &Round| -> f64 {
        rounds
            .iter()
            .find(|b| b.pair == r.pair && b.pause.is_none())
            .unwrap_or(r)
            .rate()
    };
    for r in rounds {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2}× | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.pair,
            swaps_label(r.pause),
            r.calls,
            r.took.as_secs_f64(),
            r.rate(),
            r.rate() / partner(r).max(1e-9),
            r.swaps_done,
            r.swaps_done as f64 / r.took.as_secs_f64().max(1e-9),
            r.plugin.cores,
            r.other.cores,
            r.client.cores,
            r.machine_cores
        );
    }
    println!();
    for ms in &args.pauses {
        let pause = Some(Duration::from_millis(*ms));
        let with: Vec<&Round> = rounds.iter().filter(|r| r.pause == pause).collect();
        let ratios: Vec<f64> = with
            .iter()
            .map(|r| r.rate() / partner(r).max(1e-9))
            .collect();
        let ratio = median(ratios.clone());
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "{}: median ratio to its pair without swaps {ratio:.2}× (range {lo:.2}–{hi:.2}, {} pairs; target ≥ {TARGET_RATIO}×: {}); median {:.0} swaps/s",
            swaps_label(pause),
            ratios.len(),
            if ratio >= TARGET_RATIO {
                "yes"
            } else {
                "**no**"
            },
            median(
                with.iter()
                    .map(|r| r.swaps_done as f64 / r.took.as_secs_f64().max(1e-9))
                    .collect()
            )
        );
    }
}
