//! Hot swap under load, end to end: the real `setpoint` binary, the `swaptest`
//! plugin in two versions built from one source (target/plugins/swaptest.wasm,
//! 1.0.0, and swaptest_v2.wasm, 2.0.0), swapped back and forth over the HTTP
//! API while tens of thousands of keys are reconciled.
//!
//! Every call leaves a record in the plugin's key-value store (see
//! plugins/swaptest): the version that ran it, the instance, when it started
//! and ended, which call of its key it was, and whether it saw another call of
//! the same key running. After the daemon has stopped, the test reads every
//! record from the store file and checks them against the swaps' timeline.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod support;

use support::{Daemon, eventually, plugin};

const KEYS: usize = 50_000;
const BATCH: usize = 2_500;
/// Calls a `requeue` or `retry` key takes.
const CALLS: u64 = 3;
const WORKERS: usize = 4;
/// Calls the new version must have finished after each swap before the next
/// batch or swap (on top of the calls that may have been in flight).
const SERVED: u64 = 200;
const V1: &str = "1.0.0";
const V2: &str = "2.0.0";
const LIMIT: Duration = Duration::from_secs(300);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A GET whose answer may be large (ureq stops at 10 MB by default).
fn get_json(url: &str) -> serde_json::Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_string()
        .unwrap();
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn post(url: &str, body: &str) -> support::Http {
    support::http(
        "POST",
        url,
        &[("Content-Type", "application/json")],
        Some(body),
    )
}

/// Key `i`'s name, mode and the calls it takes.
fn key(i: usize) -> (String, &'static str, u64) {
    match i % 3 {
        0 => (format!("plain-{i}"), "plain", 1),
        1 => (format!("requeue-{i}"), "requeue", CALLS),
        _ => (format!("retry-{i}"), "retry", CALLS),
    }
}

/// The swaptest controller's finished calls (successes and failures).
fn finished(url: &str) -> u64 {
    let controllers = get_json(&format!("{url}/v1/controllers"));
    let c = controllers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "swaptest")
        .expect("a swaptest controller");
    c["successes"].as_u64().unwrap() + c["failures"].as_u64().unwrap()
}

/// One swap or rollback as the test saw it.
#[derive(Debug, Clone)]
struct Swap {
    /// The version it made active.
    version: String,
    /// Wall clock just before the request was sent, µs.
    sent_us: u64,
    /// The registry's `activated-at` for the new version, ms: taken after the
    /// controller switched, so the switch happened before `(activated_at + 1)`
    /// ms.
    activated_ms: u64,
}

impl Swap {
    /// From this µs on, the swap had surely taken effect.
    fn effective_us(&self) -> u64 {
        (self.activated_ms + 1) * 1000
    }
}

/// POST a swap (`Some(path)`) or a rollback (`None`) and record it.
fn swap(url: &str, to: Option<&Path>) -> Swap {
    let sent_us = now_us();
    let answer = match to {
        Some(path) => post(
            &format!("{url}/v1/plugins/swaptest/swap"),
            &serde_json::json!({ "path": path }).to_string(),
        ),
        None => post(&format!("{url}/v1/plugins/swaptest/rollback"), "{}"),
    };
    assert_eq!(answer.status, 200, "{}", answer.body);
    let view = answer.json();
    let active = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["active"] == true)
        .unwrap_or_else(|| panic!("no active version in {view}"));
    Swap {
        version: view["version"].as_str().unwrap().to_string(),
        sent_us,
        activated_ms: active["activated-at"].as_u64().unwrap(),
    }
}

/// One call, as the plugin recorded it.
#[derive(Debug, Clone)]
struct Call {
    key: String,
    version: String,
    instance: String,
    call: u64,
    start_us: u64,
    end_us: u64,
    overlaps: u64,
}

fn calls_in(store: &setpoint::store::Store) -> Vec<Call> {
    store
        .kv_keys("swaptest", "call/")
        .iter()
        .map(|k| {
            let value = store.kv_get("swaptest", k).unwrap();
            let r: serde_json::Value = serde_json::from_slice(&value).unwrap();
            let key = k
                .strip_prefix("call/")
                .and_then(|rest| rest.rsplit_once('/'))
                .unwrap()
                .0
                .to_string();
            Call {
                key,
                version: r["version"].as_str().unwrap().to_string(),
                instance: r["instance"].as_str().unwrap().to_string(),
                call: r["call"].as_u64().unwrap(),
                start_us: r["start_us"].as_u64().unwrap(),
                end_us: r["end_us"].as_u64().unwrap(),
                overlaps: r["overlaps"].as_u64().unwrap(),
            }
        })
        .collect()
}

#[test]
fn swaps_and_a_rollback_under_load_lose_no_key_double_no_run_and_route_new_work_to_the_new_version()
{
    let started = Instant::now();
    let home = tempfile::tempdir().unwrap();
    let (v1, v2) = (plugin("swaptest"), plugin("swaptest_v2"));
    let store_path = home.path().join("store.redb");
    // One key per call (`round-size = 1`): the check below counts the calls
    // an old instance starts after a swap, and a round in flight (which
    // finishes on the version it started on, like a lone call) starts one per
    // key. A worker takes the version once per round (see worker.rs).
    let config = format!(
        "[store]\npath = {store:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\nmax-body-bytes = 4194304\n\n\
         [[plugin]]\npath = {v1:?}\nworkers = {WORKERS}\nround-size = 1\n",
        store = store_path.display().to_string(),
        v1 = v1.display().to_string(),
    );
    let config_path = home.path().join("setpoint.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut d = Daemon::start_in(home.path(), &["--config", config_path.to_str().unwrap()]);
    let url = d.url();

    // Warm the compile cache for v2, so that the swaps under load do not
    // compile: swap to it and back before any object exists.
    swap(&url, Some(&v2));
    swap(&url, Some(&v1));

    // Batches of keys; after some of them a swap (six, back and forth) or the
    // rollback, each followed by enough calls on the new version.
    let batches = KEYS.div_ceil(BATCH);
    let mut plan: BTreeMap<usize, Option<&Path>> = BTreeMap::new();
    for (n, to) in [&v2, &v1, &v2, &v1, &v2, &v1].into_iter().enumerate() {
        plan.insert(1 + n * 2, Some(to.as_path()));
    }
    plan.insert(13, None); // the rollback, back to v2
    assert!(
        plan.keys().all(|b| *b < batches - 1),
        "swaps happen under load"
    );
    let mut expected: HashMap<String, u64> = HashMap::new();
    let mut swaps = Vec::new();
    for b in 0..batches {
        let objects: Vec<serde_json::Value> = (b * BATCH..((b + 1) * BATCH).min(KEYS))
            .map(|i| {
                let (name, mode, calls) = key(i);
                expected.insert(format!("Swap:{name}"), calls);
                serde_json::json!({
                    "kind": "Swap",
                    "metadata": {"name": name, "labels": {"batch": format!("b{b}")}},
                    "spec": {"mode": mode, "n": CALLS, "delay-ms": 20},
                })
            })
            .collect();
        let body = serde_json::Value::Array(objects).to_string();
        let applied = post(&format!("{url}/v1/apply"), &body);
        assert_eq!(applied.status, 200, "batch {b}: {}", applied.body);
        if let Some(to) = plan.get(&b) {
            let s = swap(&url, *to);
            // At most one call per worker that finishes from now on ran the
            // old version (it was in flight); the rest ran the new one.
            let before = finished(&url);
            eventually(
                &format!("{SERVED} calls on {} after the swap", s.version),
                LIMIT,
                || finished(&url) >= before + SERVED + WORKERS as u64,
            );
            swaps.push(s);
        }
    }
    let order: Vec<&str> = swaps.iter().map(|s| s.version.as_str()).collect();
    assert_eq!(
        order,
        [V2, V1, V2, V1, V2, V1, V2],
        "six swaps, then the rollback to v2"
    );
    let applied_by = started.elapsed();

    // Everything reconciled: the reconcile status of every key is done, and
    // every key's last call (the plugin's status says so) has run.
    let waited = support::http(
        "GET",
        &format!("{url}/v1/wait?kind=Swap&timeout=300s"),
        &[],
        None,
    );
    assert_eq!(waited.status, 200, "{}", waited.body);
    for b in 0..batches {
        eventually(
            &format!("every key of batch {b} ran its last call"),
            LIMIT,
            || {
                let list = get_json(&format!("{url}/v1/objects/Swap?selector=batch=b{b}"));
                list.as_array()
                    .unwrap()
                    .iter()
                    .all(|o| o["status"]["done"] == true)
            },
        );
    }
    let statuses = get_json(&format!("{url}/v1/status?kind=Swap"));
    let statuses = statuses.as_array().unwrap();
    assert_eq!(statuses.len(), KEYS);
    let not_done: Vec<_> = statuses.iter().filter(|s| s["phase"] != "done").collect();
    assert!(
        not_done.is_empty(),
        "not done: {:?}",
        &not_done[..not_done.len().min(5)]
    );
    // A key's last call writes its status before it returns: wait until no
    // call is left in flight before reading the controller's counters.
    let controller = || {
        get_json(&format!("{url}/v1/controllers"))
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "swaptest")
            .unwrap()
            .clone()
    };
    eventually("the controller is idle", LIMIT, || {
        let c = controller();
        c["in-flight"] == 0 && c["queue-depth"] == 0 && c["pending-timers"] == 0
    });
    let controller = controller();
    assert_eq!(controller["swaps"], 9, "two warm-up swaps, six, a rollback");
    assert_eq!(controller["plugin-version"], V2);
    let reconciled_by = started.elapsed();
    assert!(d.interrupt().success());

    let store = setpoint::store::Store::open(&store_path).unwrap();
    let calls = calls_in(&store);
    assert!(
        store.kv_keys("swaptest", "busy/").is_empty(),
        "a call left its mark: it never finished"
    );
    let overlaps = store.kv_keys("swaptest", "overlap/");
    let finished_calls =
        controller["successes"].as_u64().unwrap() + controller["failures"].as_u64().unwrap();
    let per_swap = check(&calls, &expected, &swaps, &overlaps, finished_calls);
    eprintln!(
        "{KEYS} keys, {} calls, {} swaps: applied and swapped in {:.1}s, all reconciled at {:.1}s; \
         per swap, (calls on the new version before the next swap, calls on the old one \
         after it took effect): {per_swap:?}",
        calls.len(),
        swaps.len(),
        applied_by.as_secs_f64(),
        reconciled_by.as_secs_f64()
    );
}

/// The assertions on what the plugin recorded. Returns, per swap, the calls
/// the new version served before the next swap and the calls on the old
/// version after the swap took effect (those in flight).
fn check(
    calls: &[Call],
    expected: &HashMap<String, u64>,
    swaps: &[Swap],
    overlaps: &[String],
    finished: u64,
) -> Vec<(u64, usize)> {
    let mut per_swap = Vec::new();
    // No key reconciled concurrently: no call saw another call's mark, and
    // each key's calls, in order, never overlap in time.
    assert!(
        overlaps.is_empty() && calls.iter().all(|c| c.overlaps == 0),
        "calls of one key ran concurrently: {:?}",
        &overlaps[..overlaps.len().min(5)]
    );
    let mut by_key: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in calls {
        by_key.entry(c.key.as_str()).or_default().push(c);
    }
    // No key lost, none run more than its workload implies: each key's calls
    // are exactly calls 0, 1, ... of its mode, one each, one after another.
    assert_eq!(by_key.len(), expected.len(), "every key was reconciled");
    for (key, want) in expected {
        let mut mine = by_key.remove(key.as_str()).unwrap_or_default();
        mine.sort_by_key(|c| c.start_us);
        let numbers: Vec<u64> = mine.iter().map(|c| c.call).collect();
        assert_eq!(
            numbers,
            (0..*want).collect::<Vec<_>>(),
            "{key}: calls {mine:#?}"
        );
        for pair in mine.windows(2) {
            assert!(
                pair[1].start_us >= pair[0].end_us,
                "{key}: a call started before the one before it ended: {pair:#?}"
            );
        }
    }
    let total: u64 = expected.values().sum();
    assert_eq!(
        calls.len() as u64,
        total,
        "exactly the calls the workload implies"
    );
    assert_eq!(
        finished, total,
        "the host counted as many calls as the plugin"
    );

    // Each call ran on exactly one version, and an instance is of one version.
    let mut instances: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in calls {
        assert!(c.version == V1 || c.version == V2, "{c:?}");
        instances.entry(c.instance.as_str()).or_default().push(c);
    }
    for (id, mine) in &mut instances {
        assert!(
            mine.iter().all(|c| c.version == mine[0].version),
            "instance {id} ran two versions"
        );
        mine.sort_by_key(|c| c.start_us);
    }

    // After each swap, only calls already in flight ran the old version: a
    // worker finishes its call on the old instance, and its next key goes to
    // the new version. So an instance that existed before a swap starts at
    // most one call once the swap is in effect (and no worker has more than
    // one such call), and the new version serves the calls after it.
    for (j, s) in swaps.iter().enumerate() {
        let until = swaps.get(j + 1).map_or(u64::MAX, |n| n.sent_us);
        let mut in_flight = 0;
        for (id, mine) in &instances {
            let existed = mine[0].start_us < s.sent_us;
            let after = mine
                .iter()
                .filter(|c| c.start_us >= s.effective_us())
                .count();
            if existed {
                assert!(
                    after <= 1,
                    "instance {id} ({}) started {after} calls after swap {j} to {} took effect",
                    mine[0].version,
                    s.version
                );
                in_flight += after;
            }
        }
        assert!(
            in_flight <= WORKERS,
            "{in_flight} calls on old instances after swap {j}: more than one per worker"
        );
        let stale: Vec<&Call> = calls
            .iter()
            .filter(|c| {
                c.version != s.version && c.start_us >= s.effective_us() && c.start_us < until
            })
            .collect();
        assert!(
            stale.len() <= WORKERS,
            "{} calls ran the old version after swap {j} to {} took effect: {:#?}",
            stale.len(),
            s.version,
            &stale[..stale.len().min(5)]
        );
        for c in &stale {
            let last = instances[c.instance.as_str()].last().unwrap();
            assert_eq!(
                (last.key.as_str(), last.start_us),
                (c.key.as_str(), c.start_us),
                "a call on the old version after swap {j} was not its instance's last"
            );
        }
        let served = calls
            .iter()
            .filter(|c| c.version == s.version && c.start_us >= s.sent_us && c.start_us < until)
            .count() as u64;
        assert!(
            served >= SERVED,
            "the new version served only {served} calls between swap {j} and the next"
        );
        per_swap.push((served, stale.len()));
    }
    per_swap
}
