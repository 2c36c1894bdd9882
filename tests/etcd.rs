//! Replicas on etcd end to end: real `setpoint` daemons sharing one real etcd
//! (started by the test on loopback), driven over HTTP. Each daemon logs every
//! reconcile's start and end with its shard and term; the tests read those
//! logs to check that no object was reconciled by two replicas at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::etcd::TestEtcd;
use support::{apply_ok, eventually, http, plugin, setpoint};

const LIMIT: Duration = Duration::from_secs(120);
const SHARDS: u32 = 16;

/// One `setpoint run` replica; its log goes to a file.
struct Replica {
    name: String,
    child: Child,
    home: PathBuf,
    url: String,
}

impl Replica {
    fn start(home: &Path, etcd: &TestEtcd, name: &str) -> Self {
        Self::start_with_ttl(home, etcd, name, 2)
    }

    /// A replica whose lease lasts `ttl` seconds.
    fn start_with_ttl(home: &Path, etcd: &TestEtcd, name: &str, ttl: u64) -> Self {
        let home = home.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let config = home.join("setpoint.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[store]
backend = "etcd"
endpoints = ["{endpoint}"]
prefix = "/e2e/"
replica = "{name}"
ttl = "{ttl}s"
shards = {SHARDS}

[api]
listen = "127.0.0.1:0"

[[plugin]]
path = "{hello}"

[[plugin]]
path = "{hostile}"
"#,
                endpoint = etcd.endpoint,
                hello = plugin("hello").display(),
                hostile = plugin("hostile").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(home.join("log")).unwrap();
        let child = setpoint(&home.join("cache"))
            .env(
                "RUST_LOG",
                "info,setpoint::controller=debug,wasmtime=warn,cranelift=warn",
            )
            .args(["run", "--config", config.to_str().unwrap()])
            .current_dir(&home)
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut replica = Self {
            name: name.into(),
            child,
            home,
            url: String::new(),
        };
        eventually(&format!("{name} serves its API"), LIMIT, || {
            replica
                .log()
                .lines()
                .any(|l| l.contains("api listening on "))
        });
        let log = replica.log();
        let line = log
            .lines()
            .find(|l| l.contains("api listening on "))
            .unwrap();
        let rest = line.split("api listening on ").nth(1).unwrap();
        replica.url = rest.split_whitespace().next().unwrap().to_string();
        replica
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("log")).unwrap_or_default()
    }

    /// The shards this replica owns now (from `/v1/controllers`).
    fn shards(&self) -> BTreeSet<u32> {
        let answer = http("GET", &format!("{}/v1/controllers", self.url), &[], None);
        if answer.status != 200 {
            return BTreeSet::new();
        }
        let all = answer.json();
        let Some(first) = all.as_array().and_then(|a| a.first()) else {
            return BTreeSet::new();
        };
        match first["owns"]["owns"].as_str() {
            Some("shards") => first["owns"]["terms"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let text = http("GET", &format!("{}/metrics", self.url), &[], None).body;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every shard owned by exactly one of `replicas`.
fn split(replicas: &[&Replica]) -> bool {
    let mut seen = BTreeSet::new();
    for r in replicas {
        for s in r.shards() {
            if !seen.insert(s) {
                return false;
            }
        }
    }
    seen.len() == SHARDS as usize
}

/// Apply `count` objects of `kind` named `{prefix}{i}` with `spec`, 50 per
/// request (100 etcd operations: within its 128 per transaction).
fn apply_many(url: &str, kind: &str, prefix: &str, count: usize, spec: &str) {
    let names: Vec<usize> = (0..count).collect();
    for chunk in names.chunks(50) {
        let yaml: String = chunk
            .iter()
            .map(|i| format!("kind: {kind}\nmetadata: {{name: {prefix}{i}}}\nspec: {spec}\n---\n"))
            .collect();
        apply_ok(url, &yaml);
    }
}

fn wait_all(url: &str, kind: &str) {
    let answer = http(
        "GET",
        &format!("{url}/v1/wait?timeout=120s&kind={kind}"),
        &[],
        None,
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// One reconcile as a replica logged it.
#[derive(Debug)]
struct Interval {
    replica: String,
    shard: Option<u32>,
    term: Option<i64>,
    start: String,
    end: Option<String>,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    line[at..].split([' ', '}']).next()
}

/// Now, as the daemons' log lines write it.
fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// Every reconcile each replica logged, by object key. A reconcile that
/// started and never ended ends at its replica's death in `died`.
fn reconciles(
    replicas: &[&Replica],
    died: &HashMap<&str, String>,
) -> HashMap<String, Vec<Interval>> {
    let mut all: HashMap<String, Vec<Interval>> = HashMap::new();
    for r in replicas {
        let mut open: HashMap<String, Interval> = HashMap::new();
        for line in r.log().lines() {
            let started = line.ends_with("reconcile started");
            let ended = line.ends_with("reconcile ended");
            if !started && !ended {
                continue;
            }
            let time = line.split_whitespace().next().unwrap().to_string();
            let key = field(line, "key").unwrap().to_string();
            if started {
                open.insert(
                    key,
                    Interval {
                        replica: r.name.clone(),
                        shard: field(line, "shard").and_then(|s| s.parse().ok()),
                        term: field(line, "term").and_then(|s| s.parse().ok()),
                        start: time,
                        end: None,
                    },
                );
            } else if let Some(mut interval) = open.remove(&key) {
                interval.end = Some(time);
                all.entry(key).or_default().push(interval);
            }
        }
        // Started and never ended: the replica died in the middle.
        for (key, mut interval) in open {
            interval.end = died.get(r.name.as_str()).cloned();
            all.entry(key).or_default().push(interval);
        }
    }
    all
}

/// No key reconciled by two replicas at overlapping times (RFC 3339 times
/// of one clock compare as text).
fn assert_no_overlap(all: &HashMap<String, Vec<Interval>>) {
    for (key, intervals) in all {
        for a in intervals {
            for b in intervals {
                if a.replica == b.replica {
                    continue;
                }
                let a_end = a.end.as_deref().unwrap_or("9");
                let b_end = b.end.as_deref().unwrap_or("9");
                let overlap = a.start.as_str() < b_end && b.start.as_str() < a_end;
                assert!(
                    !overlap,
                    "{key} was reconciled by two replicas at once: {a:?} and {b:?}"
                );
            }
        }
    }
}

#[test]
fn three_replicas_share_ten_thousand_objects_without_reconciling_one_twice_at_once() {
    let etcd = TestEtcd::start();
    let home = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| Replica::start(home.path(), &etcd, n))
        .collect();
    let refs: Vec<&Replica> = replicas.iter().collect();
    eventually("the shards are split among three", LIMIT, || {
        split(&refs) && refs.iter().all(|r| !r.shards().is_empty())
    });
    // Writes go to any replica: spread them.
    for (i, r) in replicas.iter().enumerate() {
        apply_many(&r.url, "Greeting", &format!("g{i}-"), 3334, "{who: x}");
    }
    for r in &replicas {
        wait_all(&r.url, "Greeting");
    }
    let all = reconciles(&refs, &HashMap::new());
    assert_eq!(all.len(), 3 * 3334, "every object was reconciled");
    let mut by_replica: BTreeMap<&str, usize> = BTreeMap::new();
    for intervals in all.values() {
        for i in intervals {
            *by_replica.entry(i.replica.as_str()).or_default() += 1;
            assert!(
                i.shard.is_some() && i.term.is_some(),
                "logged with shard and term: {i:?}"
            );
        }
    }
    let cluster = http("GET", &format!("{}/v1/cluster", replicas[0].url), &[], None).json();
    assert_eq!(cluster["mode"], "shards");
    assert_eq!(cluster["members"], serde_json::json!(["r1", "r2", "r3"]));
    assert_eq!(
        cluster["owners"].as_object().unwrap().len(),
        SHARDS as usize,
        "{cluster}"
    );
    for r in &replicas {
        let share = by_replica.get(r.name.as_str()).copied().unwrap_or(0);
        assert!(
            share > 1000,
            "{} reconciled only {share}: {by_replica:?}",
            r.name
        );
    }
    assert_no_overlap(&all);
}

#[test]
fn a_replica_killed_under_load_hands_its_shards_over_after_its_ttl_and_nothing_is_lost() {
    let etcd = TestEtcd::start();
    let home = tempfile::tempdir().unwrap();
    let r1 = Replica::start(home.path(), &etcd, "r1");
    let r2 = Replica::start(home.path(), &etcd, "r2");
    let mut r3 = Replica::start(home.path(), &etcd, "r3");
    eventually("split among three", LIMIT, || {
        split(&[&r1, &r2, &r3]) && !r3.shards().is_empty()
    });
    // Slow work, so that r3 has some queued and in flight when it dies.
    apply_many(
        &r1.url,
        "Hostile",
        "slow-",
        60,
        "{mode: slow, delay-ms: 100}",
    );
    apply_many(&r1.url, "Greeting", "g-", 2000, "{who: x}");
    eventually("r3 is busy", LIMIT, || {
        r3.log().contains("reconcile started")
    });
    let killed = Instant::now();
    r3.kill9();
    let death = now();
    eventually("r1 and r2 hold every shard", LIMIT, || split(&[&r1, &r2]));
    let moved = killed.elapsed();
    eprintln!("kill -9: shards moved after {moved:?} (TTL 2 s)");
    assert!(moved < Duration::from_secs(10), "took {moved:?}");
    wait_all(&r1.url, "Greeting");
    wait_all(&r1.url, "Hostile");
    let died = HashMap::from([("r3", death)]);
    assert_no_overlap(&reconciles(&[&r1, &r2, &r3], &died));
}

#[test]
fn a_clean_stop_hands_the_shards_over_without_waiting_for_the_ttl() {
    let etcd = TestEtcd::start();
    let home = tempfile::tempdir().unwrap();
    // A long TTL, so that a handover that waited for it cannot pass.
    let r1 = Replica::start_with_ttl(home.path(), &etcd, "r1", 6);
    let mut r2 = Replica::start_with_ttl(home.path(), &etcd, "r2", 6);
    eventually("split among two", LIMIT, || {
        split(&[&r1, &r2]) && !r2.shards().is_empty()
    });
    let stopped = Instant::now();
    r2.signal("-INT");
    eventually("r1 holds every shard", LIMIT, || split(&[&r1]));
    let moved = stopped.elapsed();
    eprintln!("clean stop: shards moved after {moved:?}");
    assert!(
        moved < Duration::from_secs(3),
        "the handover waited for the 6 s TTL ({moved:?})"
    );
    r2.child.wait().unwrap();
    let r2_log = r2.log();
    assert!(r2_log.contains("left the cluster"), "{r2_log}");
}

#[test]
fn a_paused_replicas_late_writes_are_fenced_and_do_not_land() {
    let etcd = TestEtcd::start();
    let home = tempfile::tempdir().unwrap();
    let r1 = Replica::start(home.path(), &etcd, "r1");
    let r2 = Replica::start(home.path(), &etcd, "r2");
    eventually("split among two", LIMIT, || {
        split(&[&r1, &r2]) && !r2.shards().is_empty()
    });
    // Slow objects, so that r2 is in the middle of some when it is paused.
    apply_many(&r1.url, "Hostile", "p-", 40, "{mode: slow, delay-ms: 300}");
    eventually("r2 is reconciling", LIMIT, || {
        r2.log().contains("reconcile started")
    });
    r2.signal("-STOP");
    let paused = now();
    // The keys r2 is in the middle of: started, not ended.
    let in_flight: Vec<String> = reconciles(&[&r2], &HashMap::from([("r2", "9".to_string())]))
        .into_iter()
        .filter(|(_, intervals)| {
            intervals
                .iter()
                .any(|i| i.end.as_deref() == Some("9") && i.start < paused)
        })
        .map(|(key, _)| key)
        .collect();
    assert!(
        !in_flight.is_empty(),
        "r2 was paused in the middle of a reconcile"
    );
    // Past its TTL: r1 takes its shards and finishes everything.
    eventually("r1 holds every shard", LIMIT, || split(&[&r1]));
    wait_all(&r1.url, "Hostile");
    r2.signal("-CONT");
    // r2 finds its lease lost and cancels its calls in flight. If one ends
    // first, what it wrote must not land: with its fences gone (or etcd's
    // compare on the shard's term failing) the write is refused and counted,
    // or r1's newer status reaches r2 first and replaces it unwritten. r2
    // logs which.
    eventually("r2 knows it lost its lease", LIMIT, || {
        r2.log().contains("lease lost")
    });
    for key in &in_flight {
        eventually(
            &format!("r2's late reconcile of {key} is cancelled, refused or replaced"),
            LIMIT,
            || {
                r2.log().lines().any(|l| {
                    l.contains(&format!("key={key}"))
                        && (l.contains("reconcile cancelled")
                            || l.contains("fenced: not written")
                            || l.contains("replaced before it was written"))
                })
            },
        );
    }
    eprintln!(
        "fenced writes counted by the deposed replica: {}",
        r2.metric("setpoint_fenced_writes_total")
    );
}

#[test]
fn with_etcd_down_for_a_while_dispatch_pauses_and_nothing_acknowledged_is_lost() {
    let mut etcd = TestEtcd::start();
    let home = tempfile::tempdir().unwrap();
    let r1 = Replica::start(home.path(), &etcd, "r1");
    let r2 = Replica::start(home.path(), &etcd, "r2");
    eventually("split among two", LIMIT, || split(&[&r1, &r2]));
    apply_many(&r1.url, "Hostile", "o-", 40, "{mode: slow, delay-ms: 100}");
    etcd.stop();
    eventually("both stop owning", LIMIT, || {
        r1.shards().is_empty() && r2.shards().is_empty()
    });
    // A write while etcd is down is refused, not acknowledged.
    let refused = http(
        "POST",
        &format!("{}/v1/apply", r1.url),
        &[("Content-Type", "application/yaml")],
        Some("kind: Greeting\nmetadata: {name: during}\nspec: {who: x}\n"),
    );
    assert_ne!(refused.status, 200, "{}", refused.body);
    std::thread::sleep(Duration::from_secs(3));
    etcd.resume().unwrap();
    eventually("they own the shards again", LIMIT, || split(&[&r1, &r2]));
    wait_all(&r1.url, "Hostile");
    wait_all(&r2.url, "Hostile");
    let statuses = http(
        "GET",
        &format!("{}/v1/status?kind=Hostile", r2.url),
        &[],
        None,
    )
    .json();
    assert_eq!(statuses.as_array().unwrap().len(), 40);
}
