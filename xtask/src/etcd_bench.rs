//! `cargo xtask etcd-bench`: Setpoint replicas sharing work through a real
//! etcd, measured on target/release/setpoint with the `hello` plugin (kind
//! `Greeting`). etcd is Debian's etcd-server (`/usr/bin/etcd`), started here
//! on free loopback ports with its data in a temporary folder, a fresh one
//! per measurement, and killed at the end (as are the replicas) even when the
//! benchmark fails. Every replica uses `ttl = "2s"` and `shards = 16`.
//!
//! **Failover**: three replicas; `kills` times, one of them (in turn) is killed
//! with SIGKILL, and `stops` times one is stopped cleanly with SIGINT (kills
//! and stops alternate). The time is from the signal until the two survivors'
//! `GET /v1/controllers` together show every shard, each held once (polled
//! every ~10 ms). After each, the stopped replica is started again and the
//! next one waits until the shards are split among all three again, plus a
//! random pause of up to one keep-alive period (TTL/3), so that the kills do
//! not fall at the same point of the lease's keep-alive cycle. The baseline
//! is etcd's own expiry of a lease of the same TTL, measured on the same etcd
//! (leases granted through its JSON gateway and never kept alive: grant →
//! `/v3/lease/timetolive` says it is gone); the ratio to the TTL is given too.
//!
//! **Reconcile rate**: for 1, 2 and 3 replicas on a fresh etcd, and for one
//! daemon on the embedded redb store (the single-process default), `rounds`
//! times (every other round in reverse order): start them, wait until the
//! shards are split, then apply `objects` Greetings, 50 per request (100 etcd
//! operations, within etcd's 128 per transaction), from one client, the
//! requests going round-robin to the replicas, and wait (`GET /v1/wait` on
//! every replica) until every Greeting is done. The rate is objects / (first
//! apply sent → the last replica's wait answered); the apply alone, the
//! moment the replicas together had finished one call per object, and the
//! wait's tail after it are reported too. Then the same objects are
//! reconciled again with no apply running: `POST
//! /v1/controllers/hello/full-reconcile` on every replica (each queues the
//! keys of its shards), timed until the replicas together finished that many
//! calls. The baseline is one replica on etcd of the same round. The CPU use
//! of etcd, of each replica (by thread: plugin, etcd client, watch absorber)
//! and of this process over each phase, the time their threads waited for a
//! CPU, and etcd's own counters (transactions, raft proposals, WAL fsyncs)
//! are reported so that a missed scaling can be explained.
//!
//! **Apply throughput**: objects per second acknowledged by `POST /v1/apply`
//! for `apply_secs` seconds, into one replica on etcd and into one embedded
//! daemon (a fresh one for each case): (a) single-object requests from
//! `threads` concurrent clients, (b) 50-object requests from one client. The
//! daemon reconciles what it receives meanwhile, as it would in use. The
//! baseline is the embedded daemon under the same load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::daemon::{self, Client, CpuSample, Daemon};

pub struct Args {
    /// SIGKILLs of one of three replicas.
    pub kills: usize,
    /// SIGINTs (clean stops) of one of three replicas.
    pub stops: usize,
    /// Greetings per reconcile-rate run.
    pub objects: usize,
    /// Reconcile-rate runs of each setup.
    pub rounds: usize,
    /// Seconds per apply-throughput case.
    pub apply_secs: u64,
    /// Concurrent clients of the single-object apply case.
    pub threads: usize,
    pub build: bool,
}

const ETCD: &str = "/usr/bin/etcd";
const TTL: Duration = Duration::from_secs(2);
const SHARDS: usize = 16;
/// Objects per apply request: 2 etcd operations each, within etcd's 128.
const BATCH: usize = 50;
/// How long a replica may take to start, the shards to split, a failover.
const LIMIT: Duration = Duration::from_secs(60);

/// What every measurement needs.
struct Ctx {
    root: PathBuf,
    bin: PathBuf,
    hello: PathBuf,
    home: PathBuf,
    /// USER_HZ, the unit of /proc/PID/stat's CPU times.
    ticks: f64,
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    if !Path::new(ETCD).exists() {
        eprintln!("xtask: installing Debian's etcd-server package for {ETCD}");
        crate::apt_install(&["etcd-server"])?;
    }
    if args.build {
        crate::ensure_protoc()?;
    }
    let (bin, plugins) = daemon::prepare_profile(root, args.build, true, &["hello"])?;
    let home = tempfile::Builder::new()
        .prefix("setpoint-etcd-bench")
        .tempdir()?;
    let ticks = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let ctx = Ctx {
        root: root.to_path_buf(),
        bin,
        hello: plugins.join("hello.wasm"),
        home: home.path().to_path_buf(),
        ticks,
    };
    let started = Instant::now();
    let result = bench(&ctx, &args);
    match result {
        Ok(report) => {
            eprintln!(
                "xtask: etcd-bench took {:.0} s",
                started.elapsed().as_secs_f64()
            );
            println!("{report}");
            Ok(())
        }
        Err(e) => {
            let kept = home.keep();
            eprintln!(
                "xtask: etcd-bench FAILED: {e:#}\nxtask: the logs of etcd and the replicas are kept in {}",
                kept.display()
            );
            Err(e)
        }
    }
}

fn bench(ctx: &Ctx, args: &Args) -> anyhow::Result<String> {
    let failover = failover(ctx, args)?;
    let mut rates = Vec::new();
    for round in 0..args.rounds {
        // Every other round in the opposite order, so that a drift in the
        // machine's speed does not favour one setup.
        let mut order = [1, 2, 3, 0];
        if round % 2 == 1 {
            order.reverse();
        }
        for replicas in order {
            let r = reconcile_run(ctx, replicas, round, args.objects)?;
            eprintln!(
                "xtask: round {round}, {}: {} objects done in {:.2} s (apply {:.2} s) = {:.0}/s; \
                 full reconciliation {:.0} calls/s",
                r.label(),
                r.objects,
                r.done.as_secs_f64(),
                r.applied.as_secs_f64(),
                r.rate(),
                r.full_rate()
            );
            rates.push(r);
        }
    }
    let mut applies = Vec::new();
    for batch in [1, BATCH] {
        for on_etcd in [true, false] {
            let clients = if batch == 1 { args.threads } else { 1 };
            let r = apply_run(ctx, on_etcd, batch, clients, args.apply_secs)?;
            eprintln!(
                "xtask: apply {} × {batch}-object requests into {}: {:.0} objects/s",
                clients,
                if on_etcd { "etcd" } else { "redb" },
                r.rate()
            );
            applies.push(r);
        }
    }
    Ok(report(ctx, args, &failover, &rates, &applies))
}

// ---------------------------------------------------------------------------
// etcd and replicas

/// A running etcd on loopback, its data and log under a folder of its own.
/// Killed when dropped.
struct Etcd {
    endpoint: String,
    child: Child,
    dir: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Etcd {
    /// Start one in `dir` and wait until `/health` says it is healthy.
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut last = String::new();
        // A port found free may be taken before etcd binds it: try again.
        for attempt in 0..3 {
            let dir = dir.join(format!("etcd-{attempt}"));
            std::fs::create_dir_all(&dir)?;
            let client = format!("http://127.0.0.1:{}", free_port()?);
            let peer = format!("http://127.0.0.1:{}", free_port()?);
            let log = std::fs::File::create(dir.join("etcd.log"))?;
            let child = Command::new(ETCD)
                .args(["--name", "t", "--data-dir"])
                .arg(dir.join("data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("t={peer}")])
                .args(["--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot run {ETCD}"))?;
            let mut etcd = Self {
                endpoint: client,
                child,
                dir,
            };
            match etcd.wait_healthy() {
                Ok(()) => return Ok(etcd),
                Err(e) => last = format!("{e:#}"),
            }
        }
        bail!("etcd did not start: {last}")
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = Client::new(&self.endpoint);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("etcd exited ({status}):\n{}", self.log());
            }
            if let Ok((200, body)) = client.get("/health")
                && body.contains("\"true\"")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}/health did not answer healthy in 30 s:\n{}",
                    self.endpoint,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        daemon::tail(
            &std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default(),
            30,
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its Prometheus metrics now.
    fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = Client::new(&self.endpoint).get("/metrics")?;
        if status != 200 {
            bail!("etcd's /metrics: {status}");
        }
        Ok(body)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd_config(ctx: &Ctx, endpoint: &str, replica: &str) -> String {
    format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [{endpoint:?}]\nprefix = \"/bench/\"\n\
         replica = {replica:?}\nttl = \"{ttl}s\"\nshards = {SHARDS}\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\n[[plugin]]\npath = {hello:?}\n",
        ttl = TTL.as_secs(),
        hello = ctx.hello.display().to_string(),
    )
}

fn redb_config(ctx: &Ctx, home: &Path) -> String {
    format!(
        "[store]\npath = {store:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[plugin]]\npath = {hello:?}\n",
        store = home.join("store.redb").display().to_string(),
        hello = ctx.hello.display().to_string(),
    )
}

/// A replica `name` on etcd, its home (config, log) in `dir/name`.
fn start_replica(ctx: &Ctx, dir: &Path, etcd: &Etcd, name: &str) -> anyhow::Result<Daemon> {
    let home = dir.join(name);
    std::fs::create_dir_all(&home)?;
    Daemon::start(
        &ctx.root,
        &ctx.bin,
        &home,
        &etcd_config(ctx, &etcd.endpoint, name),
    )
    .with_context(|| {
        format!(
            "replica {name} did not start (its home: {})",
            home.display()
        )
    })
}

/// The shards a replica owns now, from its first controller's `owns`.
fn owned(client: &Client) -> anyhow::Result<BTreeSet<u32>> {
    let controllers = client.get_json("/v1/controllers")?;
    let owns = &controllers
        .as_array()
        .and_then(|a| a.first())
        .context("/v1/controllers lists no controller")?["owns"];
    Ok(match owns["owns"].as_str() {
        Some("shards") => owns["terms"]
            .as_object()
            .map(|t| t.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default(),
        Some("all") => (0..SHARDS as u32).collect(),
        _ => BTreeSet::new(),
    })
}

/// Whether every shard is held by exactly one of `clients`, and (if
/// `everyone`) each holds at least one. An unanswered request counts as no.
fn split(clients: &[&Client], everyone: bool) -> bool {
    let mut seen = BTreeSet::new();
    for c in clients {
        let Ok(shards) = owned(c) else {
            return false;
        };
        if everyone && shards.is_empty() {
            return false;
        }
        for s in shards {
            if !seen.insert(s) {
                return false;
            }
        }
    }
    seen.len() == SHARDS
}

/// Poll `split` every ~10 ms until it holds; the time it took. Fails after
/// [`LIMIT`] or if one of `replicas` exits.
fn until_split(
    replicas: &mut [&mut Daemon],
    clients: &[&Client],
    everyone: bool,
    what: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if split(clients, everyone) {
            return Ok(started.elapsed());
        }
        for r in replicas.iter_mut() {
            r.check_alive()?;
        }
        if started.elapsed() > LIMIT {
            let views: Vec<String> = clients
                .iter()
                .map(|c| format!("{:?}", owned(c).map_err(|e| e.to_string())))
                .collect();
            bail!(
                "{what}: not within {LIMIT:?}; shards owned: {}",
                views.join(" / ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter of process `pid` (`Z`: exited, not yet waited for), or
/// `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().next()?.chars().next()
}

/// CPU seconds used so far by process `pid`, its exited threads included.
fn cpu_secs(pid: u32, ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // After the command: state (field 3) ... utime (14), stime (15).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (n(11) + n(12)) / ticks
}

// ---------------------------------------------------------------------------
// Failover

struct Failover {
    /// Signal → survivors own every shard, for SIGKILL.
    kills: Vec<Duration>,
    /// The same for SIGINT.
    stops: Vec<Duration>,
    /// SIGINT → the process exited.
    stop_exits: Vec<Duration>,
    /// Restarted replica's process spawned → the shards split among three.
    rejoins: Vec<Duration>,
    /// etcd's own time to expire a lease of the same TTL: grant → the lease
    /// is gone (`/v3/lease/timetolive` answers TTL -1), no keep-alive sent.
    lease_expiry: Vec<Duration>,
    /// Time per poll round (two `/v1/controllers` requests), median.
    poll: Duration,
}

fn failover(ctx: &Ctx, args: &Args) -> anyhow::Result<Failover> {
    let dir = ctx.home.join("failover");
    let etcd = Etcd::start(&dir)?;
    let names = ["r1", "r2", "r3"];
    let mut replicas: Vec<Option<Daemon>> = Vec::new();
    for name in names {
        replicas.push(Some(start_replica(ctx, &dir, &etcd, name)?));
    }
    let mut clients: Vec<Client> = replicas
        .iter()
        .map(|r| Client::new(&r.as_ref().expect("started").url))
        .collect();
    {
        let mut all: Vec<&mut Daemon> = replicas.iter_mut().flatten().collect();
        let refs: Vec<&Client> = clients.iter().collect();
        until_split(&mut all, &refs, true, "the shards split among three")?;
    }
    let mut out = Failover {
        kills: Vec::new(),
        stops: Vec::new(),
        stop_exits: Vec::new(),
        rejoins: Vec::new(),
        lease_expiry: lease_expiry(&etcd, args.kills.max(1))?,
        poll: Duration::ZERO,
    };
    let mut polls = Vec::new();
    let total = args.kills + args.stops;
    let (mut kills, mut stops) = (0, 0);
    for i in 0..total {
        // Alternate, until one kind has had its count.
        let kill = if kills == args.kills {
            false
        } else if stops == args.stops {
            true
        } else {
            i % 2 == 0
        };
        let victim = i % names.len();
        // Somewhere in the lease's keep-alive cycle (every TTL/3).
        std::thread::sleep(Duration::from_millis(fastrand::u64(
            0..TTL.as_millis() as u64 / 3,
        )));
        let survivors: Vec<usize> = (0..names.len()).filter(|&j| j != victim).collect();
        let pid = replicas[victim].as_ref().expect("running").pid();
        let signalled = Instant::now();
        if kill {
            // Daemon's drop is a SIGKILL, then a wait.
            drop(replicas[victim].take());
        } else {
            let sent = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()?;
            if !sent.success() {
                bail!("kill -INT {pid} failed");
            }
        }
        let took = {
            let mut alive: Vec<&mut Daemon> = Vec::new();
            for (j, r) in replicas.iter_mut().enumerate() {
                if j != victim
                    && let Some(r) = r.as_mut()
                {
                    alive.push(r);
                }
            }
            let refs: Vec<&Client> = survivors.iter().map(|&j| &clients[j]).collect();
            let mut polled = 0u32;
            loop {
                let round = Instant::now();
                let done = split(&refs, false);
                polls.push(round.elapsed());
                polled += 1;
                if done {
                    break signalled.elapsed();
                }
                for r in alive.iter_mut() {
                    r.check_alive()?;
                }
                if signalled.elapsed() > LIMIT {
                    bail!(
                        "after {} of {}, the survivors did not own every shard within {LIMIT:?} ({polled} polls)",
                        if kill { "SIGKILL" } else { "SIGINT" },
                        names[victim]
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        if kill {
            out.kills.push(took);
            kills += 1;
        } else {
            // Wait for the process to end on its own.
            let exited = loop {
                if proc_state(pid).is_none_or(|s| s == 'Z') {
                    break signalled.elapsed();
                }
                if signalled.elapsed() > LIMIT {
                    bail!(
                        "{} did not exit within {LIMIT:?} of SIGINT:\n{}",
                        names[victim],
                        daemon::tail(&replicas[victim].as_ref().expect("running").log(), 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let log = replicas[victim].as_ref().expect("running").log();
            if !log.contains("left the cluster") {
                bail!(
                    "{} exited after SIGINT without `left the cluster` in its log:\n{}",
                    names[victim],
                    daemon::tail(&log, 40)
                );
            }
            drop(replicas[victim].take());
            out.stops.push(took);
            out.stop_exits.push(exited);
            stops += 1;
        }
        eprintln!(
            "xtask: failover {}/{total}: {} of {}: survivors own every shard after {} ms",
            i + 1,
            if kill { "SIGKILL" } else { "SIGINT" },
            names[victim],
            daemon::ms(took)
        );
        // Back to three.
        let spawned = Instant::now();
        let restarted = start_replica(ctx, &dir, &etcd, names[victim])?;
        clients[victim] = Client::new(&restarted.url);
        replicas[victim] = Some(restarted);
        let mut all: Vec<&mut Daemon> = replicas.iter_mut().flatten().collect();
        let refs: Vec<&Client> = clients.iter().collect();
        until_split(
            &mut all,
            &refs,
            true,
            &format!(
                "the shards split among three after {} rejoined",
                names[victim]
            ),
        )?;
        out.rejoins.push(spawned.elapsed());
    }
    polls.sort_unstable();
    out.poll = daemon::quantile(&polls, 0.5);
    for r in replicas.iter_mut().flatten() {
        r.check_alive()?;
    }
    Ok(out)
}

/// `samples` leases of [`TTL`] granted on `etcd` (concurrently, at random
/// offsets within half a second) and never kept alive: grant answered → etcd
/// reports the lease gone, polled every ~10 ms through its JSON gateway.
fn lease_expiry(etcd: &Etcd, samples: usize) -> anyhow::Result<Vec<Duration>> {
    let results: Vec<anyhow::Result<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..samples)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<Duration> {
                    std::thread::sleep(Duration::from_millis(fastrand::u64(0..500)));
                    let client = Client::new(&etcd.endpoint);
                    let body = format!("{{\"TTL\": {}}}", TTL.as_secs());
                    let (status, answer) = client.send(
                        "POST",
                        "/v3/lease/grant",
                        Some("application/json"),
                        Some(&body),
                    )?;
                    let granted = Instant::now();
                    if status != 200 {
                        bail!("etcd lease grant: {status} {answer}");
                    }
                    let answer: serde_json::Value = serde_json::from_str(&answer)?;
                    let id = answer["ID"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| answer["ID"].as_i64().map(|i| i.to_string()))
                        .with_context(|| format!("etcd lease grant answered no ID: {answer}"))?;
                    let body = format!("{{\"ID\": {id}}}");
                    loop {
                        let (status, answer) = client.send(
                            "POST",
                            "/v3/lease/timetolive",
                            Some("application/json"),
                            Some(&body),
                        )?;
                        if status != 200 {
                            bail!("etcd lease timetolive: {status} {answer}");
                        }
                        let answer: serde_json::Value = serde_json::from_str(&answer)?;
                        let ttl = answer["TTL"]
                            .as_str()
                            .and_then(|t| t.parse::<i64>().ok())
                            .or_else(|| answer["TTL"].as_i64())
                            .unwrap_or(0);
                        if ttl < 0 {
                            return Ok(granted.elapsed());
                        }
                        if granted.elapsed() > LIMIT {
                            bail!("etcd did not expire a {TTL:?} lease within {LIMIT:?}");
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a lease thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::new();
    for r in results {
        out.push(r?);
    }
    out.sort_unstable();
    Ok(out)
}

// ---------------------------------------------------------------------------
// CPU and etcd counters over a run

/// A sample of what the processes of a run have used so far.
struct Usage {
    at: Instant,
    /// etcd's CPU seconds, and its threads.
    etcd: f64,
    etcd_threads: Option<CpuSample>,
    /// Each replica's CPU seconds, and its threads.
    replicas: Vec<(f64, CpuSample)>,
    /// This process's CPU seconds.
    client: f64,
    /// etcd's metrics text.
    etcd_metrics: String,
}

impl Usage {
    fn take(ctx: &Ctx, etcd: Option<&Etcd>, replicas: &[Daemon]) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            etcd: etcd.map_or(0.0, |e| cpu_secs(e.pid(), ctx.ticks)),
            etcd_threads: etcd.map(|e| CpuSample::take(e.pid())),
            replicas: replicas
                .iter()
                .map(|r| (cpu_secs(r.pid(), ctx.ticks), CpuSample::take(r.pid())))
                .collect(),
            client: cpu_secs(std::process::id(), ctx.ticks),
            etcd_metrics: match etcd {
                Some(e) => e.metrics()?,
                None => String::new(),
            },
        })
    }
}

/// What one replica used, in cores.
struct ReplicaUse {
    /// The whole process.
    total: f64,
    /// Its plugin thread (`setpoint-plugins`).
    plugin: f64,
    /// Its etcd client's runtime thread (`setpoint-etcd`).
    client: f64,
    /// Its thread applying what etcd's watch sends (`setpoint-etcd-absorb`).
    absorb: f64,
}

/// What a run used, in cores (CPU seconds per second of the run).
#[derive(Default)]
struct Used {
    secs: f64,
    etcd: f64,
    /// Seconds etcd's threads spent runnable, waiting for a CPU.
    etcd_waited: f64,
    replicas: Vec<ReplicaUse>,
    /// Seconds the replicas' threads spent runnable, waiting for a CPU.
    replicas_waited: f64,
    client: f64,
    machine: f64,
    /// etcd's counters over the run.
    txns: f64,
    puts: f64,
    ranges: f64,
    proposals: f64,
    fsyncs: f64,
    fsync_secs: f64,
    commits: f64,
    commit_secs: f64,
}

fn counter(text: &str, name: &str) -> f64 {
    daemon::metric(text, name).values().sum()
}

fn used(before: &Usage, after: &Usage) -> Used {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let mut u = Used {
        secs,
        etcd: (after.etcd - before.etcd) / secs,
        client: (after.client - before.client) / secs,
        ..Used::default()
    };
    for ((a, sa), (b, sb)) in after.replicas.iter().zip(&before.replicas) {
        u.replicas_waited += sa.daemon_since(sb, |_| true).waited.as_secs_f64();
        u.replicas.push(ReplicaUse {
            total: (a - b) / secs,
            plugin: sa
                .daemon_since(sb, |t| t.starts_with("setpoint-plugin"))
                .cores,
            client: sa.daemon_since(sb, |t| t == "setpoint-etcd").cores,
            absorb: sa.daemon_since(sb, |t| t == "setpoint-etcd-a").cores,
        });
    }
    if let (Some(ea), Some(eb)) = (&after.etcd_threads, &before.etcd_threads) {
        u.etcd_waited = ea.daemon_since(eb, |_| true).waited.as_secs_f64();
    }
    if let (Some((_, sa)), Some((_, sb))) = (after.replicas.first(), before.replicas.first()) {
        u.machine = sa.machine_cores_since(sb);
    }
    let d = |name: &str| counter(&after.etcd_metrics, name) - counter(&before.etcd_metrics, name);
    u.txns = d("etcd_mvcc_txn_total");
    u.puts = d("etcd_mvcc_put_total");
    u.ranges = d("etcd_mvcc_range_total");
    u.proposals = d("etcd_server_proposals_committed_total");
    u.fsyncs = d("etcd_disk_wal_fsync_duration_seconds_count");
    u.fsync_secs = d("etcd_disk_wal_fsync_duration_seconds_sum");
    u.commits = d("etcd_disk_backend_commit_duration_seconds_count");
    u.commit_secs = d("etcd_disk_backend_commit_duration_seconds_sum");
    u
}

impl Used {
    fn replicas_total(&self) -> f64 {
        self.replicas.iter().map(|r| r.total).sum()
    }

    fn plugin_total(&self) -> f64 {
        self.replicas.iter().map(|r| r.plugin).sum()
    }

    fn client_total(&self) -> f64 {
        self.replicas.iter().map(|r| r.client).sum()
    }

    fn absorb_total(&self) -> f64 {
        self.replicas.iter().map(|r| r.absorb).sum()
    }

    fn per_replica(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("{:.2}", r.total))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

// ---------------------------------------------------------------------------
// Reconcile rate

struct RateRun {
    /// 0: one embedded (redb) daemon.
    replicas: usize,
    /// 0-based round of this setup.
    round: usize,
    objects: usize,
    /// First apply sent → last apply answered.
    applied: Duration,
    /// First apply sent → the replicas together finished `objects` calls.
    reconciled: Duration,
    /// First apply sent → every replica's wait answered.
    done: Duration,
    /// Reconcile calls finished (all replicas) when the last apply answered.
    calls_at_applied: u64,
    /// Reconcile calls finished by each replica in the apply phase.
    calls: Vec<u64>,
    used: Used,
    /// The full reconciliation of the same objects afterwards: calls, time.
    full_calls: u64,
    full_took: Duration,
    full_used: Used,
}

impl RateRun {
    fn rate(&self) -> f64 {
        self.objects as f64 / self.done.as_secs_f64().max(1e-9)
    }

    fn full_rate(&self) -> f64 {
        self.full_calls as f64 / self.full_took.as_secs_f64().max(1e-9)
    }

    fn label(&self) -> String {
        match self.replicas {
            0 => "1 embedded daemon (redb)".into(),
            1 => "1 replica on etcd".into(),
            n => format!("{n} replicas on etcd"),
        }
    }
}

/// Reconcile calls finished so far by the replica behind `client`.
fn calls(client: &Client) -> anyhow::Result<u64> {
    let controllers = client.get_json("/v1/controllers")?;
    Ok(controllers
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["successes"].as_u64().unwrap_or(0) + c["failures"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0))
}

fn all_calls(clients: &[Client]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for c in clients {
        sum += calls(c)?;
    }
    Ok(sum)
}

/// Poll the replicas' finished calls every ~5 ms until they reach `target`
/// or `stop` is set; the time from `started` when they did.
fn watch_calls(
    clients: &[Client],
    target: u64,
    started: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Duration>> {
    while !stop.load(Ordering::Relaxed) {
        if all_calls(clients)? >= target {
            return Ok(Some(started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(None)
}

fn reconcile_run(
    ctx: &Ctx,
    replicas: usize,
    round: usize,
    objects: usize,
) -> anyhow::Result<RateRun> {
    let dir = ctx.home.join(format!("rate-{replicas}-{round}"));
    std::fs::create_dir_all(&dir)?;
    let etcd = if replicas > 0 {
        Some(Etcd::start(&dir)?)
    } else {
        None
    };
    let mut daemons = Vec::new();
    match &etcd {
        Some(etcd) => {
            for i in 1..=replicas {
                daemons.push(start_replica(ctx, &dir, etcd, &format!("r{i}"))?);
            }
        }
        None => {
            let home = dir.join("redb");
            std::fs::create_dir_all(&home)?;
            daemons.push(Daemon::start(
                &ctx.root,
                &ctx.bin,
                &home,
                &redb_config(ctx, &home),
            )?);
        }
    }
    let clients: Vec<Client> = daemons.iter().map(|d| Client::new(&d.url)).collect();
    {
        let mut all: Vec<&mut Daemon> = daemons.iter_mut().collect();
        let refs: Vec<&Client> = clients.iter().collect();
        until_split(&mut all, &refs, true, "the shards split")?;
    }

    // Apply, and wait until every replica sees every object done.
    let before = Usage::take(ctx, etcd.as_ref(), &daemons)?;
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let (applied, calls_at_applied, done, reconciled) = std::thread::scope(
        |s| -> anyhow::Result<(Duration, u64, Duration, Option<Duration>)> {
            let watcher = {
                let (watch_clients, stop) = (clients.clone(), &stop);
                s.spawn(move || watch_calls(&watch_clients, objects as u64, started, stop))
            };
            let run = || -> anyhow::Result<(Duration, u64, Duration)> {
                for (n, start) in (0..objects).step_by(BATCH).enumerate() {
                    let count = BATCH.min(objects - start);
                    daemon::apply(
                        &clients[n % clients.len()],
                        &daemon::greetings("g", start, count),
                    )?;
                }
                let applied = started.elapsed();
                let calls_at_applied = all_calls(&clients)?;
                for (c, d) in clients.iter().zip(&daemons) {
                    let (status, answer) = c.get("/v1/wait?timeout=300s&kind=Greeting")?;
                    if status != 200 {
                        bail!("wait on {}: {status} {}", d.url, daemon::cut(&answer, 1000));
                    }
                }
                Ok((applied, calls_at_applied, started.elapsed()))
            };
            let result = run();
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            let (applied, at_applied, done) = result?;
            // The calls may lag the waits by a poll: give the watcher a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !watcher.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            let reconciled = watcher
                .join()
                .map_err(|_| anyhow::anyhow!("the watching thread panicked"))??;
            Ok((applied, at_applied, done, reconciled))
        },
    )?;
    let after = Usage::take(ctx, etcd.as_ref(), &daemons)?;
    let reconciled = reconciled.context("the replicas did not finish a call per object")?;
    // Every object is there and done, as the first replica sees it.
    let statuses = clients[0].get_json("/v1/status?kind=Greeting")?;
    let seen = statuses.as_array().map_or(0, |a| a.len());
    if seen != objects {
        bail!("{seen} Greetings have a status after the wait, not {objects}");
    }
    let mut per = Vec::new();
    for c in &clients {
        per.push(calls(c)?);
    }

    // Then reconcile them all again (a full reconciliation on every
    // replica: each queues the keys of its shards), with no apply running.
    // First let the written-behind statuses flush (every second).
    std::thread::sleep(Duration::from_millis(1500));
    let controller = clients[0].get_json("/v1/controllers")?[0]["name"]
        .as_str()
        .context("/v1/controllers: no controller name")?
        .to_string();
    let base = all_calls(&clients)?;
    let before_full = Usage::take(ctx, etcd.as_ref(), &daemons)?;
    let full_started = Instant::now();
    let mut queued = 0;
    for c in &clients {
        let (status, answer) = c.send(
            "POST",
            &format!("/v1/controllers/{controller}/full-reconcile"),
            None,
            None,
        )?;
        if status != 200 {
            bail!("full-reconcile: {status} {answer}");
        }
        queued += serde_json::from_str::<serde_json::Value>(&answer)?["queued"]
            .as_u64()
            .context("full-reconcile answered no `queued`")?;
    }
    if queued != objects as u64 {
        bail!("the full reconciliations queued {queued} keys, not {objects}");
    }
    let full_took = loop {
        if all_calls(&clients)? >= base + queued {
            break full_started.elapsed();
        }
        if full_started.elapsed() > Duration::from_secs(300) {
            bail!("the full reconciliation did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let after_full = Usage::take(ctx, etcd.as_ref(), &daemons)?;
    for d in daemons.iter_mut() {
        d.check_alive()?;
    }
    Ok(RateRun {
        replicas,
        round,
        objects,
        applied,
        reconciled,
        done,
        calls_at_applied,
        calls: per,
        used: used(&before, &after),
        full_calls: queued,
        full_took,
        full_used: used(&before_full, &after_full),
    })
}

// ---------------------------------------------------------------------------
// Apply throughput

struct ApplyRun {
    on_etcd: bool,
    batch: usize,
    clients: usize,
    objects: u64,
    took: Duration,
    /// Request latencies, sorted.
    latencies: Vec<Duration>,
    used: Used,
}

impl ApplyRun {
    fn rate(&self) -> f64 {
        self.objects as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

fn apply_run(
    ctx: &Ctx,
    on_etcd: bool,
    batch: usize,
    clients: usize,
    secs: u64,
) -> anyhow::Result<ApplyRun> {
    let dir = ctx.home.join(format!(
        "apply-{}-{batch}",
        if on_etcd { "etcd" } else { "redb" }
    ));
    std::fs::create_dir_all(&dir)?;
    let etcd = if on_etcd {
        Some(Etcd::start(&dir)?)
    } else {
        None
    };
    let mut daemon = match &etcd {
        Some(etcd) => start_replica(ctx, &dir, etcd, "r1")?,
        None => {
            let home = dir.join("redb");
            std::fs::create_dir_all(&home)?;
            Daemon::start(&ctx.root, &ctx.bin, &home, &redb_config(ctx, &home))?
        }
    };
    {
        let client = Client::new(&daemon.url);
        until_split(&mut [&mut daemon], &[&client], true, "the replica owns")?;
        // One warm-up request, so that the connection and the first write
        // are not in the measurement.
        daemon::apply(&client, &daemon::greetings("warm", 0, 1))?;
    }
    let before = Usage::take(ctx, etcd.as_ref(), std::slice::from_ref(&daemon))?;
    let load = daemon::apply_load(&daemon.url, clients, batch, Duration::from_secs(secs))?;
    let after = Usage::take(ctx, etcd.as_ref(), std::slice::from_ref(&daemon))?;
    daemon.check_alive()?;
    Ok(ApplyRun {
        on_etcd,
        batch,
        clients,
        objects: load.objects,
        took: load.took,
        latencies: load.latencies,
        used: used(&before, &after),
    })
}

// ---------------------------------------------------------------------------
// Report

fn report(
    ctx: &Ctx,
    args: &Args,
    failover: &Failover,
    rates: &[RateRun],
    applies: &[ApplyRun],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "\n## etcd-bench ({}; {}; etcd {}; ttl {} s, {SHARDS} shards; plugin hello)\n",
        daemon::machine(),
        ctx.bin.display(),
        etcd_version(),
        TTL.as_secs()
    );

    // Failover.
    let ttl_ms = TTL.as_secs_f64() * 1e3;
    let lease = daemon::quantile(&failover.lease_expiry, 0.5);
    let lease_ms = lease.as_secs_f64() * 1e3;
    let _ = writeln!(
        w,
        "### Failover: signal → the two survivors own all {SHARDS} shards (3 replicas, idle; polled every ~10 ms, a poll round takes {} ms)\n",
        daemon::ms(failover.poll)
    );
    let _ = writeln!(
        w,
        "Baseline: etcd itself expires a {} s lease that gets no keep-alive {} ms (p50; min {}, max {}, {} samples) after granting it.\n",
        TTL.as_secs(),
        daemon::ms(lease),
        daemon::ms(failover.lease_expiry.first().copied().unwrap_or_default()),
        daemon::ms(failover.lease_expiry.last().copied().unwrap_or_default()),
        failover.lease_expiry.len()
    );
    let _ = writeln!(
        w,
        "| stop | samples | p50 ms | max ms | min ms | p50 / etcd's lease expiry (p50) | max / etcd's lease expiry (p50) | p50 / TTL | max / TTL |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, samples) in [
        ("kill -9 (SIGKILL)", &failover.kills),
        ("clean stop (SIGINT)", &failover.stops),
    ] {
        let mut s = samples.clone();
        s.sort_unstable();
        let p50 = daemon::quantile(&s, 0.5);
        let max = s.last().copied().unwrap_or_default();
        let min = s.first().copied().unwrap_or_default();
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            s.len(),
            daemon::ms(p50),
            daemon::ms(max),
            daemon::ms(min),
            p50.as_secs_f64() * 1e3 / lease_ms.max(1e-9),
            max.as_secs_f64() * 1e3 / lease_ms.max(1e-9),
            p50.as_secs_f64() * 1e3 / ttl_ms,
            max.as_secs_f64() * 1e3 / ttl_ms
        );
    }
    let samples = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut exits = failover.stop_exits.clone();
    exits.sort_unstable();
    let mut rejoins = failover.rejoins.clone();
    rejoins.sort_unstable();
    let _ = writeln!(
        w,
        "\nkill -9 samples (ms, in order): {}\nclean stop samples (ms, in order): {}\n\
         SIGINT → process exited: p50 {} ms, max {} ms. A restarted replica spawned → shards split among three again: p50 {} ms, max {} ms.\n",
        samples(&failover.kills),
        samples(&failover.stops),
        daemon::ms(daemon::quantile(&exits, 0.5)),
        daemon::ms(exits.last().copied().unwrap_or_default()),
        daemon::ms(daemon::quantile(&rejoins, 0.5)),
        daemon::ms(rejoins.last().copied().unwrap_or_default()),
    );

    // Reconcile rate.
    let partner = |r: &RateRun, rate: fn(&RateRun) -> f64| -> f64 {
        let base = rates
            .iter()
            .find(|b| b.replicas == 1 && b.round == r.round)
            .map_or(1.0, rate);
        rate(r) / base.max(1e-9)
    };
    let _ = writeln!(
        w,
        "### Reconcile rate: {} Greetings ({} round(s) per setup, each on a fresh etcd / store)\n",
        args.objects, args.rounds
    );
    let _ = writeln!(
        w,
        "Apply → all done: the Greetings applied {BATCH} per request by one client, round-robin over the replicas, \
         until `GET /v1/wait` answered on every replica; objects / that time. Full reconciliation: then \
         `POST /v1/controllers/hello/full-reconcile` on every replica (each queues its shards' keys), \
         until the replicas together finished that many calls, with no apply running.\n"
    );
    let _ = writeln!(
        w,
        "| setup | apply → all done, objects/s (median) | vs 1 replica on etcd (median of rounds) | full reconciliation, calls/s (median) | vs 1 replica on etcd (median of rounds) |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|");
    for replicas in [1, 2, 3, 0] {
        let runs: Vec<&RateRun> = rates.iter().filter(|r| r.replicas == replicas).collect();
        let Some(first) = runs.first() else {
            continue;
        };
        let m = |f: &dyn Fn(&RateRun) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let _ = writeln!(
            w,
            "| {} | {:.0} | {:.2}× | {:.0} | {:.2}× |",
            first.label(),
            m(&|r| r.rate()),
            m(&|r| partner(r, RateRun::rate)),
            m(&|r| r.full_rate()),
            m(&|r| partner(r, RateRun::full_rate)),
        );
    }
    let _ = writeln!(w, "\nApply → all done, each run:\n");
    let _ = writeln!(
        w,
        "| round | setup | objects/s | vs 1 replica, same round | apply s | apply objects/s | calls finished when the apply ended | calls finished ≥ N, s | waits answered, s | calls per replica | etcd cores | replicas' cores | plugin threads' cores | watch-absorb threads' cores | replicas' run-queue wait s | client cores | machine busy cores |"
    );
    let _ = writeln!(
        w,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rates {
        let u = &r.used;
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.2}× | {:.2} | {:.0} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} ({}) | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} |",
            r.round,
            r.label(),
            r.rate(),
            partner(r, RateRun::rate),
            r.applied.as_secs_f64(),
            r.objects as f64 / r.applied.as_secs_f64().max(1e-9),
            r.calls_at_applied,
            r.reconciled.as_secs_f64(),
            r.done.as_secs_f64(),
            r.calls
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" / "),
            u.etcd,
            u.replicas_total(),
            u.per_replica(),
            u.plugin_total(),
            u.absorb_total(),
            u.replicas_waited,
            u.client,
            u.machine
        );
    }
    let _ = writeln!(w, "\nFull reconciliation, each run:\n");
    let _ = writeln!(
        w,
        "| round | setup | calls/s | vs 1 replica, same round | s | etcd cores | etcd run-queue wait s | replicas' cores | plugin threads' cores | etcd client runtime threads' cores | watch-absorb threads' cores | replicas' other threads' cores | replicas' run-queue wait s | client cores | machine busy cores |"
    );
    let _ = writeln!(
        w,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rates {
        let u = &r.full_used;
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.2}× | {:.2} | {:.2} | {:.2} | {:.2} ({}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.round,
            r.label(),
            r.full_rate(),
            partner(r, RateRun::full_rate),
            r.full_took.as_secs_f64(),
            u.etcd,
            u.etcd_waited,
            u.replicas_total(),
            u.per_replica(),
            u.plugin_total(),
            u.client_total(),
            u.absorb_total(),
            u.replicas_total() - u.plugin_total() - u.client_total() - u.absorb_total(),
            u.replicas_waited,
            u.client,
            u.machine
        );
    }
    let _ = writeln!(
        w,
        "\netcd's counters over each run on etcd (per second of the phase; per object = / {}):\n",
        args.objects
    );
    let _ = writeln!(
        w,
        "| round | setup | phase | txns/s | puts/s | etcd_mvcc_range_total/s | raft proposals/s | txns per object | puts per object | WAL fsyncs/s | mean fsync ms | fsync busy | backend commits/s | mean commit ms |"
    );
    let _ = writeln!(
        w,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rates.iter().filter(|r| r.replicas > 0) {
        for (phase, u) in [
            ("apply → done", &r.used),
            ("full reconciliation", &r.full_used),
        ] {
            let n = r.objects as f64;
            let _ = writeln!(
                w,
                "| {} | {} | {phase} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} % | {:.1} | {:.2} |",
                r.round,
                r.label(),
                u.txns / u.secs,
                u.puts / u.secs,
                u.ranges / u.secs,
                u.proposals / u.secs,
                u.txns / n,
                u.puts / n,
                u.fsyncs / u.secs,
                u.fsync_secs * 1e3 / u.fsyncs.max(1.0),
                u.fsync_secs / u.secs * 100.0,
                u.commits / u.secs,
                u.commit_secs * 1e3 / u.commits.max(1.0),
            );
        }
    }

    // Apply throughput.
    let _ = writeln!(
        w,
        "\n### Apply throughput: objects/s acknowledged by POST /v1/apply over {} s (one daemon, reconciling meanwhile)\n",
        args.apply_secs
    );
    let _ = writeln!(
        w,
        "| requests | store | objects/s | etcd / redb | requests | p50 ms | p99 ms | etcd cores | daemon cores | plugin thread cores | client cores | machine busy cores | etcd txns/s | WAL fsyncs/s |"
    );
    let _ = writeln!(
        w,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in applies {
        let partner = applies
            .iter()
            .find(|b| !b.on_etcd && b.batch == r.batch && b.clients == r.clients)
            .map_or(1.0, |b| b.rate());
        let u = &r.used;
        let _ = writeln!(
            w,
            "| {} client(s) × {}-object | {} | {:.0} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
            r.clients,
            r.batch,
            if r.on_etcd { "etcd" } else { "redb" },
            r.rate(),
            if r.on_etcd {
                format!("{:.2}×", r.rate() / partner.max(1e-9))
            } else {
                "1.00× (baseline)".into()
            },
            r.latencies.len(),
            daemon::ms(daemon::quantile(&r.latencies, 0.5)),
            daemon::ms(daemon::quantile(&r.latencies, 0.99)),
            u.etcd,
            u.replicas_total(),
            u.plugin_total(),
            u.client,
            u.machine,
            u.txns / u.secs,
            u.fsyncs / u.secs,
        );
    }
    out
}

fn etcd_version() -> String {
    Command::new(ETCD)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version:").trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
