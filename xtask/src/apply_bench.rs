//! `cargo xtask apply-bench`: acknowledged applies per second over HTTP into
//! one embedded daemon (target/release/setpoint, redb store, the `hello`
//! plugin reconciling what arrives), with group commit.
//!
//! For each number of concurrent clients, a fresh daemon in a temporary
//! folder; each client is a thread with its own connection sending
//! single-object `POST /v1/apply` requests back to back for `secs` seconds;
//! a request counts once its 200 arrived (the store answers after its commit
//! is durable). The baseline, measured in the same run, is one client: one
//! request in flight, so one fsync per request. A last case sends 50-object
//! requests from one client: one fsync per 50 objects, the batching a single
//! client can do itself.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{self, Client, Daemon};

pub struct Args {
    pub secs: u64,
    pub clients: Vec<usize>,
    pub build: bool,
}

/// One case's result.
struct Case {
    label: String,
    rate: f64,
    p50: Duration,
    p99: Duration,
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    let (bin, plugins) = daemon::prepare_profile(root, args.build, true, &["hello"])?;
    let hello = plugins.join("hello.wasm");
    let home = tempfile::Builder::new()
        .prefix("setpoint-apply-bench")
        .tempdir()?;
    let case = |name: &str, clients: usize, batch: usize| -> anyhow::Result<Case> {
        let dir = home.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "[store]\npath = {store:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[plugin]]\npath = {hello:?}\n",
            store = dir.join("store.redb").display().to_string(),
            hello = hello.display().to_string(),
        );
        let mut daemon = Daemon::start(root, &bin, &dir, &config)?;
        // One warm-up request: the connection and the first write are not measured.
        daemon::apply(&Client::new(&daemon.url), &daemon::greetings("warm", 0, 1))?;
        let load = daemon::apply_load(&daemon.url, clients, batch, Duration::from_secs(args.secs))?;
        daemon.check_alive()?;
        Ok(Case {
            label: if batch == 1 {
                format!(
                    "1 object each, {clients} concurrent client{}",
                    if clients == 1 { "" } else { "s" }
                )
            } else {
                format!("{batch} objects each, {clients} client")
            },
            rate: load.objects as f64 / load.took.as_secs_f64(),
            p50: daemon::quantile(&load.latencies, 0.5),
            p99: daemon::quantile(&load.latencies, 0.99),
        })
    };
    let started = Instant::now();
    let mut cases = Vec::new();
    for &clients in &args.clients {
        cases.push(case(&format!("single-{clients}"), clients, 1)?);
    }
    cases.push(case("batch-50", 1, 50)?);
    eprintln!(
        "xtask: apply-bench took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let baseline = cases
        .iter()
        .find(|c| c.label.ends_with(" 1 concurrent client"))
        .map_or(cases[0].rate, |c| c.rate);
    println!(
        "\n## Acknowledged applies over HTTP, one embedded daemon (redb), {} s per case\n",
        args.secs
    );
    println!("Machine: {}\n", daemon::machine());
    println!("| requests | objects/s | vs 1 client | request p50 | request p99 |");
    println!("|---|---:|---:|---:|---:|");
    for c in &cases {
        println!(
            "| {} | {:.0} | {:.2}× | {} | {} |",
            c.label,
            c.rate,
            c.rate / baseline,
            daemon::ms(c.p50),
            daemon::ms(c.p99)
        );
    }
    Ok(())
}
