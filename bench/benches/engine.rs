//! The engine's benchmarks:
//!
//! 1. **Work queue** add/get/done throughput, single-threaded and on a
//!    2-thread runtime, against a bare `tokio::sync::mpsc` channel (no dedup,
//!    no bookkeeping) as the baseline.
//! 2. **Delay scheduler** against tokio-util's `DelayQueue` and kube-runtime's
//!    `scheduler`: criterion times inserting 100k timers that are already due
//!    and firing them all; then a report of 1M timers spread over 2 s on the
//!    real clock (insert rate, memory growth, p50/p99 lateness, median of 3).
//! 3. **End to end**: reconciles per second through a controller with the
//!    `hello` plugin on warm instances, 100k distinct keys
//!    (`SETPOINT_BENCH_KEYS`), against calling the same plugin in a plain loop
//!    on one warm instance: the first reconcile of every object (each writes a
//!    status), then a resync of all of them where nothing changes (nothing is
//!    written), one call per key (round size 1) and in rounds of 256.
//!
//! Run with `cargo xtask bench` (it builds the plugins first).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use setpoint::config::{PluginConfig, RuntimeConfig};
use setpoint::controller::{DEFAULT_ROUND_SIZE, Manager};
use setpoint::metrics::Metrics;
use setpoint::object::Object;
use setpoint::ownership::Ownership;
use setpoint::plugin::{Runtime, object_to_wit, wit};
use setpoint::queue::{Timers, WorkQueue};
use setpoint::store::{Phase, Store};
use setpoint_bench::{Counting, allocated, median_of, percentile, plugin_path};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: Counting = Counting;

const QUEUE_KEYS: u64 = 100_000;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn two_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Add every key, take it, finish it: one lane, one task.
async fn queue_single(n: u64) {
    let q = WorkQueue::new(1, n as usize);
    for k in 0..n {
        q.try_add(k, 0).unwrap();
    }
    while let Some((k, _)) = q.try_get(0) {
        q.done(&k);
    }
}

async fn channel_single(n: u64) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for k in 0..n {
        tx.send(k).unwrap();
    }
    drop(tx);
    while let Some(k) = rx.recv().await {
        std::hint::black_box(k);
    }
}

/// Two producers add disjoint keys to two lanes; two workers take and finish them.
async fn queue_parallel(n: u64) {
    let q = Arc::new(WorkQueue::new(2, 1024));
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..2u64 {
        let q = q.clone();
        tasks.spawn(async move {
            for k in (p..n).step_by(2) {
                q.add(k, p as usize).await.unwrap();
            }
        });
    }
    for lane in 0..2usize {
        let q = q.clone();
        tasks.spawn(async move {
            let mut taken = 0;
            while taken < n / 2 {
                let (k, _) = q.get(lane).await.unwrap();
                q.done(&k);
                taken += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn channel_parallel(n: u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..2u64 {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        tasks.spawn(async move {
            for k in (p..n).step_by(2) {
                tx.send(k).await.unwrap();
            }
        });
        tasks.spawn(async move {
            while let Some(k) = rx.recv().await {
                std::hint::black_box(k);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn bench_queue(c: &mut Criterion) {
    let single = current_thread();
    let multi = two_threads();
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(QUEUE_KEYS));
    g.bench_function("workqueue/1-thread", |b| {
        b.iter(|| single.block_on(queue_single(QUEUE_KEYS)))
    });
    g.bench_function("mpsc/1-thread", |b| {
        b.iter(|| single.block_on(channel_single(QUEUE_KEYS)))
    });
    g.bench_function("workqueue/2-threads", |b| {
        b.iter(|| multi.block_on(queue_parallel(QUEUE_KEYS)))
    });
    g.bench_function("mpsc/2-threads", |b| {
        b.iter(|| multi.block_on(channel_parallel(QUEUE_KEYS)))
    });
    g.finish();
}

/// The three schedulers under one interface: insert everything, then collect
/// each key with the time it fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sched {
    Setpoint,
    DelayQueue,
    KubeRuntime,
}

impl Sched {
    const ALL: [Sched; 3] = [Sched::Setpoint, Sched::DelayQueue, Sched::KubeRuntime];

    fn name(self) -> &'static str {
        match self {
            Sched::Setpoint => "setpoint",
            Sched::DelayQueue => "tokio-util DelayQueue",
            Sched::KubeRuntime => "kube-runtime scheduler",
        }
    }
}

/// One run: insert `deadlines.len()` timers, fire them all. Returns how long
/// inserting took, the bytes allocated after inserting, and each key's lateness.
async fn run_scheduler(
    sched: Sched,
    deadlines: &[tokio::time::Instant],
) -> (Duration, usize, Vec<Duration>) {
    let n = deadlines.len();
    let before = allocated();
    let mut late = Vec::with_capacity(n);
    match sched {
        Sched::Setpoint => {
            let timers = Timers::new(Duration::from_millis(1), n);
            let start = Instant::now();
            for (k, at) in deadlines.iter().enumerate() {
                timers.schedule_at(k as u64, *at).unwrap();
            }
            let inserted = start.elapsed();
            let memory = allocated().saturating_sub(before);
            while late.len() < n {
                let due = timers.expired().await;
                let now = tokio::time::Instant::now();
                late.extend(
                    due.iter()
                        .map(|&k| now.saturating_duration_since(deadlines[k as usize])),
                );
            }
            (inserted, memory, late)
        }
        Sched::DelayQueue => {
            let mut q = tokio_util::time::DelayQueue::with_capacity(n);
            let start = Instant::now();
            for (k, at) in deadlines.iter().enumerate() {
                q.insert_at(k as u64, *at);
            }
            let inserted = start.elapsed();
            let memory = allocated().saturating_sub(before);
            while let Some(expired) = q.next().await {
                let now = tokio::time::Instant::now();
                late.push(now.saturating_duration_since(deadlines[expired.into_inner() as usize]));
            }
            (inserted, memory, late)
        }
        Sched::KubeRuntime => {
            let requests = futures::stream::iter(deadlines.iter().enumerate().map(|(k, at)| {
                kube_runtime::scheduler::ScheduleRequest {
                    message: k as u64,
                    run_at: *at,
                }
            }))
            .chain(futures::stream::pending());
            let mut s = std::pin::pin!(kube_runtime::scheduler(requests));
            // The scheduler takes in every ready request on its first poll.
            let start = Instant::now();
            let first = futures::poll!(s.next());
            let inserted = start.elapsed();
            let memory = allocated().saturating_sub(before);
            if let std::task::Poll::Ready(Some(k)) = first {
                late.push(
                    tokio::time::Instant::now().saturating_duration_since(deadlines[k as usize]),
                );
            }
            while late.len() < n {
                let k = s.next().await.expect("the request stream never ends");
                let now = tokio::time::Instant::now();
                late.push(now.saturating_duration_since(deadlines[k as usize]));
            }
            (inserted, memory, late)
        }
    }
}

fn bench_scheduler(c: &mut Criterion) {
    let rt = current_thread();
    let n = 100_000;
    let mut g = c.benchmark_group("scheduler/insert-and-fire-100k-due");
    g.throughput(Throughput::Elements(n as u64));
    for sched in Sched::ALL {
        g.bench_function(BenchmarkId::from_parameter(sched.name()), |b| {
            b.iter(|| {
                rt.block_on(async {
                    // Every deadline is already due: this times the work, not the wait.
                    let now = tokio::time::Instant::now();
                    let deadlines: Vec<_> = (0..n)
                        .map(|i| now - Duration::from_micros(i as u64 % 1000))
                        .collect();
                    run_scheduler(sched, &deadlines).await
                })
            })
        });
    }
    g.finish();
}

/// 1M timers spread evenly over 2 s starting 1 s from now (past the insert
/// backlog), on the real clock.
fn scheduler_report() {
    let rt = current_thread();
    let n = 1_000_000usize;
    println!("\n## Delay scheduler: 1M timers over 2 s, real clock, median of 3 runs\n");
    println!(
        "| scheduler | inserts/s | memory | bytes/timer | p50 late | p99 late | inserts vs setpoint | memory vs setpoint |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut baseline: Option<(f64, f64)> = None;
    for sched in Sched::ALL {
        let (inserted, memory, p50, p99) = median_of(
            3,
            || {
                rt.block_on(async {
                    let start = tokio::time::Instant::now() + Duration::from_secs(1);
                    let mut order: Vec<usize> = (0..n).collect();
                    fastrand::Rng::with_seed(7).shuffle(&mut order);
                    let deadlines: Vec<_> = order
                        .iter()
                        .map(|&i| start + Duration::from_nanos(2_000_000_000 * i as u64 / n as u64))
                        .collect();
                    let (inserted, memory, mut late) = run_scheduler(sched, &deadlines).await;
                    let p50 = percentile(&mut late, 50.0);
                    let p99 = percentile(&mut late, 99.0);
                    (inserted, memory, p50, p99)
                })
            },
            |r| r.0,
        );
        let rate = n as f64 / inserted.as_secs_f64();
        let (base_rate, base_mem) = *baseline.get_or_insert((rate, memory as f64));
        println!(
            "| {} | {:.1}M/s | {:.0} MB | {:.0} | {:.1} ms | {:.1} ms | {:.2}× | {:.2}× |",
            sched.name(),
            rate / 1e6,
            memory as f64 / 1e6,
            memory as f64 / n as f64,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            rate / base_rate,
            memory as f64 / base_mem,
        );
    }
}

/// Store `n` distinct `Greeting` objects and return them (1,000 to a commit:
/// setting up an on-disk store is not what is timed).
fn greetings(store: &Store, n: usize) -> Vec<Object> {
    let object = |i: usize| {
        let spec = serde_json::json!({ "who": format!("{i}") });
        Object::new("Greeting", "", &format!("g{i}"), spec)
    };
    (0..n)
        .step_by(1000)
        .flat_map(|from| {
            store
                .apply_all((from..(from + 1000).min(n)).map(object).collect())
                .expect("the store accepts every object")
        })
        .map(|applied| applied.object)
        .collect()
}

/// A count from the environment variable `name` (`_` separators allowed),
/// else `default`.
fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// One engine configuration of the end-to-end report.
#[derive(Clone, Copy)]
struct Rig {
    workers: usize,
    on_disk: bool,
    /// [`setpoint::config::PluginConfig::round_size`]: 1 calls the plugin once
    /// per key.
    round_size: usize,
}

impl Rig {
    fn label(self) -> String {
        format!(
            "engine, {} worker{}, {}, {}",
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            if self.on_disk {
                "store on disk"
            } else {
                "store in memory"
            },
            match self.round_size {
                1 => "single calls (round size 1)".to_string(),
                n => format!("rounds (round size {n})"),
            },
        )
    }

    /// One run on a fresh store of `keys` objects: how long until every object
    /// is reconciled for the first time (each writes a status), then how long a
    /// resync of all of them takes, where nothing changes (nothing is written).
    ///
    /// `hello` is run as the daemon runs it (like [`setpoint_bench::HelloRig`],
    /// with this round size): a manager, and a flusher committing
    /// written-behind changes every second.
    async fn run(self, runtime: &Runtime, keys: usize) -> (Duration, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let store = if self.on_disk {
            Store::open(&dir.path().join("store.redb")).unwrap()
        } else {
            Store::new()
        };
        let names: Vec<_> = greetings(&store, keys).iter().map(Object::key).collect();
        let settings = PluginConfig {
            workers: self.workers,
            queue_size: keys,
            round_size: self.round_size,
            ..PluginConfig::default()
        };
        let engine = settings.engine();
        let plugin = runtime
            .load(&plugin_path("hello"), settings, store.clone())
            .await
            .unwrap();
        let manager = Manager::new(
            store.clone(),
            Ownership::default(),
            Arc::new(Metrics::new()),
        );
        let stop = CancellationToken::new();
        let flusher = tokio::spawn(
            store
                .clone()
                .flush_every(Duration::from_secs(1), stop.clone()),
        );

        // First reconcile: the controller lists the store at start.
        let start = Instant::now();
        let controller = manager.add(plugin, engine).unwrap();
        let mut remaining = names.as_slice();
        while let Some(k) = remaining.first() {
            match store.status(k).map(|s| s.phase) {
                Some(Phase::Done) => remaining = &remaining[1..],
                Some(Phase::Error) => panic!("{k} failed: {:?}", store.status(k)),
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        let first = start.elapsed();

        // Let it settle: nothing queued, nothing in flight.
        let settled = loop {
            let s = controller.status();
            if s.queue_depth == 0 && s.in_flight == 0 {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_eq!(settled.failures, 0, "{settled:?}");

        // Resync: every key queued again (action `resynced`). Statuses stay
        // Done, so the end is told by the success count: every key once more,
        // and nothing left queued or in flight.
        let start = Instant::now();
        controller.resync().await;
        let resynced = loop {
            let s = controller.status();
            assert_eq!(s.failures, 0, "{s:?}");
            if s.successes >= settled.successes + keys as u64
                && s.queue_depth == 0
                && s.in_flight == 0
            {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let resync = start.elapsed();
        assert_eq!(
            resynced.successes,
            settled.successes + keys as u64,
            "a resync reconciles every key exactly once"
        );
        for k in &names {
            assert_eq!(store.status(k).map(|s| s.phase), Some(Phase::Done), "{k}");
        }

        manager.shutdown().await;
        stop.cancel();
        flusher.await.unwrap();
        (first, resync)
    }
}

/// Reconciles per second with `hello` (`SETPOINT_BENCH_KEYS` keys, default
/// 100k) through the engine, one call per key and in rounds, on a first
/// reconcile and on a resync where nothing changes; and in a plain loop on one
/// warm instance, the baseline.
fn end_to_end_report() {
    let rt = two_threads();
    let keys = env_number("SETPOINT_BENCH_KEYS", 100_000);
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(&config).unwrap();
    println!(
        "\n## End to end: `hello`, {keys} distinct keys, warm instances, 2 threads, median of 3\n"
    );
    let direct = median_of(
        3,
        || {
            rt.block_on(async {
                let store = Store::new();
                let objects = greetings(&store, keys);
                let plugin = runtime
                    .load(
                        &plugin_path("hello"),
                        PluginConfig::default(),
                        store.clone(),
                    )
                    .await
                    .unwrap();
                let mut instance = plugin.instance();
                let start = Instant::now();
                for o in &objects {
                    let request = wit::Request {
                        key: o.key().to_string(),
                        action: wit::Action::Created,
                        object: object_to_wit(o),
                        attempt: 0,
                        state: Vec::new(),
                    };
                    let outcome = instance.reconcile(&request).await.unwrap().unwrap();
                    store
                        .set_status(&o.key(), outcome.status.as_deref().unwrap())
                        .unwrap();
                }
                start.elapsed()
            })
        },
        |d| *d,
    );
    let rigs = [
        Rig {
            workers: 1,
            on_disk: false,
            round_size: DEFAULT_ROUND_SIZE,
        },
        Rig {
            workers: 2,
            on_disk: false,
            round_size: DEFAULT_ROUND_SIZE,
        },
        Rig {
            workers: 2,
            on_disk: true,
            round_size: 1,
        },
        Rig {
            workers: 2,
            on_disk: true,
            round_size: DEFAULT_ROUND_SIZE,
        },
    ];
    // The median of each figure on its own (the first reconcile and the
    // resync of one run need not be the median of both).
    let measured: Vec<(Rig, Duration, Duration)> = rigs
        .into_iter()
        .map(|rig| {
            let (mut first, mut resync): (Vec<_>, Vec<_>) =
                (0..3).map(|_| rt.block_on(rig.run(&runtime, keys))).unzip();
            (
                rig,
                percentile(&mut first, 50.0),
                percentile(&mut resync, 50.0),
            )
        })
        .collect();
    let rate = |d: Duration| keys as f64 / d.as_secs_f64();
    let row = |path: &str, took: Duration| {
        println!(
            "| {path} | {:.2} s | {:.0} | {:.2}× |",
            took.as_secs_f64(),
            rate(took),
            rate(took) / rate(direct)
        );
    };
    println!("| path | time | reconciles/s | vs direct loop |");
    println!("|---|---:|---:|---:|");
    row("direct loop, 1 instance, writes each status", direct);
    for (rig, first, _) in &measured {
        row(
            &format!("{}: first reconcile, each writes a status", rig.label()),
            *first,
        );
    }
    for (rig, _, resync) in &measured {
        row(
            &format!("{}: resync, nothing changes", rig.label()),
            *resync,
        );
    }
}

/// Store writes per second: durable applies one by one and in batches, and the
/// reconcile path's non-durable status writes, on disk and in memory.
fn store_report() {
    let n = 2_000;
    println!("\n## Store writes, {n} objects, median of 3\n");
    let object = |i: usize| {
        Object::new(
            "Greeting",
            "",
            &format!("g{i}"),
            serde_json::json!({ "who": format!("{i}") }),
        )
    };
    let run = |on_disk: bool, what: &str| {
        median_of(
            3,
            || {
                let dir = tempfile::tempdir().unwrap();
                let store = if on_disk {
                    Store::open(&dir.path().join("store.redb")).unwrap()
                } else {
                    Store::new()
                };
                let start = Instant::now();
                match what {
                    "apply" => (0..n).for_each(|i| {
                        store.apply(object(i)).unwrap();
                    }),
                    "batch" => (0..n).step_by(100).for_each(|i| {
                        store.apply_all((i..i + 100).map(object).collect()).unwrap();
                    }),
                    _ => {
                        store.apply_all((0..n).map(object).collect()).unwrap();
                        let keys: Vec<_> = (0..n).map(|i| object(i).key()).collect();
                        let start = Instant::now();
                        for k in &keys {
                            store.mark_done(k, 1).unwrap();
                        }
                        return start.elapsed();
                    }
                }
                start.elapsed()
            },
            |d| *d,
        )
    };
    println!("| write | on disk | in memory | disk vs memory |");
    println!("|---|---:|---:|---:|");
    for (what, label) in [
        ("apply", "apply one object per commit (fsync)"),
        ("batch", "apply 100 objects per commit (fsync)"),
        ("status", "reconcile status, no fsync"),
    ] {
        let disk = run(true, what);
        let memory = run(false, what);
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "| {label} | {:.0}/s | {:.0}/s | {:.2}× |",
            rate(disk),
            rate(memory),
            rate(disk) / rate(memory)
        );
    }
}

fn main() {
    // SETPOINT_BENCH_ONLY=reports skips criterion and prints the reports;
    // =end-to-end or =store prints only that one.
    match std::env::var("SETPOINT_BENCH_ONLY").as_deref() {
        Ok("reports") => {
            scheduler_report();
            store_report();
            end_to_end_report();
            return;
        }
        Ok("store") => {
            store_report();
            return;
        }
        Ok("end-to-end") => {
            end_to_end_report();
            return;
        }
        _ => {}
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    bench_queue(&mut c);
    bench_scheduler(&mut c);
    c.final_summary();
    scheduler_report();
    store_report();
    end_to_end_report();
}
