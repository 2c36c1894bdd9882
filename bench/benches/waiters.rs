//! Reconcile throughput while `GET /v1/wait` requests are open (issue 9,
//! defect 4): the `hello` plugin on warm instances, 2 workers, a store on disk
//! with its flusher (as the daemon runs), 32,000 distinct `Greeting` objects,
//! with 0, 1 and 100 `Store::wait` calls open for the whole run. The waiters
//! are what `setpoint wait` and `/v1/wait` hold: the single one waits for
//! everything; of the 100, a third wait for everything, a third for the kind
//! and a third for one key each (among the last to be reconciled).
//!
//! The baseline is the same run with no waiter, measured in the same process;
//! the runs are interleaved (0, 1, 100, 0, 1, 100, ...) and each figure is the
//! median of 5.
//!
//! ```sh
//! SETPOINT_PLUGIN_DIR=$PWD/target/plugins cargo bench -p setpoint-bench --bench waiters
//! ```
//!
//! `SETPOINT_BENCH_KEYS` changes the number of objects; a run stops after
//! `SETPOINT_BENCH_CAP` seconds (default 120) and reports the rate so far,
//! marked "capped", so that a slow store cannot hang the benchmark.

use std::time::{Duration, Instant};

use setpoint::config::RuntimeConfig;
use setpoint::object::{Object, ObjectKey};
use setpoint::plugin::Runtime;
use setpoint::store::{Phase, Store};
use setpoint_bench::HelloRig;

const WAITERS: [usize; 3] = [0, 1, 100];
const RUNS: usize = 5;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One run: reconciles done and how long they took (`capped` if it stopped early).
#[derive(Clone, Copy)]
struct Run {
    done: usize,
    took: Duration,
    capped: bool,
}

impl Run {
    fn rate(&self) -> f64 {
        self.done as f64 / self.took.as_secs_f64()
    }
}

/// Spawn `n` open waits on `store` (see the module doc for the mix).
fn open_waiters(store: &Store, keys: &[ObjectKey], n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let store = store.clone();
            let key = keys[keys.len() - 1 - (i % keys.len())].clone();
            tokio::spawn(async move {
                let timeout = Duration::from_secs(3600);
                let _ = match i % 3 {
                    0 => store.wait(None, &[], timeout).await,
                    1 => store.wait(None, &["Greeting".to_string()], timeout).await,
                    _ => store.wait(Some(&key), &[], timeout).await,
                };
            })
        })
        .collect()
}

fn run(rt: &tokio::runtime::Runtime, runtime: &Runtime, keys: usize, waiters: usize) -> Run {
    let cap = Duration::from_secs(env_number("SETPOINT_BENCH_CAP", 120));
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let objects: Vec<Object> = (0..keys)
            .map(|i| {
                let spec = serde_json::json!({ "who": format!("{i}") });
                Object::new("Greeting", "", &format!("g{i}"), spec)
            })
            .collect();
        // One durable commit per 1,000 objects, as `setpoint apply -f DIR` does.
        let names: Vec<ObjectKey> = objects
            .chunks(1000)
            .flat_map(|chunk| store.apply_all(chunk.to_vec()).unwrap())
            .map(|a| a.object.key())
            .collect();
        let mut rig = HelloRig::new(runtime, &store, 2, keys).await;
        let open = open_waiters(&store, &names, waiters);
        // Let every waiter make its first check before the clock starts.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        rig.start();
        let mut done = 0;
        let mut capped = false;
        while done < names.len() {
            match store.status(&names[done]).map(|s| s.phase) {
                Some(Phase::Done) => done += 1,
                Some(Phase::Error) => {
                    panic!("{} failed: {:?}", names[done], store.status(&names[done]))
                }
                _ if start.elapsed() > cap => {
                    capped = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        let took = start.elapsed();
        for w in &open {
            w.abort();
        }
        rig.stop().await;
        Run { done, took, capped }
    })
}

fn main() {
    let keys = env_number("SETPOINT_BENCH_KEYS", 32_000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(&config).unwrap();
    println!(
        "\n## Reconciles per second with open waits: `hello`, {keys} keys, 2 workers, \
         store on disk, median of {RUNS}\n"
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); WAITERS.len()];
    for round in 0..RUNS {
        for (i, &waiters) in WAITERS.iter().enumerate() {
            let r = run(&rt, &runtime, keys, waiters);
            eprintln!(
                "round {round}, {waiters} waiters: {} reconciles in {:.2} s = {:.0}/s{}",
                r.done,
                r.took.as_secs_f64(),
                r.rate(),
                if r.capped { " (capped)" } else { "" }
            );
            runs[i].push(r);
        }
    }
    let median = |runs: &mut Vec<Run>| {
        runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        runs[runs.len() / 2]
    };
    let medians: Vec<Run> = runs.iter_mut().map(median).collect();
    let base = medians[0].rate();
    println!("| open waits | reconciled | time | reconciles/s | vs no wait |");
    println!("|---:|---:|---:|---:|---:|");
    for (waiters, r) in WAITERS.iter().zip(&medians) {
        println!(
            "| {waiters} | {}{} | {:.2} s | {:.0} | {:.2}× |",
            r.done,
            if r.capped { " (capped)" } else { "" },
            r.took.as_secs_f64(),
            r.rate(),
            r.rate() / base
        );
    }
}
