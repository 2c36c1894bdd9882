//! The engine with real plugins: every semantic of DESIGN.md's "Engine semantics"
//! that needs a controller, on tokio's paused clock where time matters.
//!
//! Tests that watch a plugin while it runs use a multi-threaded runtime: a plugin
//! busy in Wasm yields to the executor at every epoch tick, but a single-threaded
//! executor polls its timers only every few dozen task polls, so the test's own
//! polling would see the plugin late.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{granting_data, load, runtime, wait_until};
use serde_json::json;
use setpoint::config::{PluginConfig, ShutdownMode};
use setpoint::controller::{Controller, ControllerStatus, Engine, Manager, ManagerError};
use setpoint::metrics::Metrics;
use setpoint::object::{Object, ObjectKey};
use setpoint::ownership::Ownership;
use setpoint::plugin::{Plugin, Runtime};
use setpoint::store::{Phase, Store};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

/// A runtime, a store, metrics, a hand-driven ownership view and a manager.
struct Rig {
    _cache: tempfile::TempDir,
    rt: Runtime,
    store: Store,
    metrics: Arc<Metrics>,
    ownership: Ownership,
    manager: Manager,
}

impl Rig {
    fn new(leading: bool) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let rt = runtime(&cache);
        let store = Store::new();
        let metrics = Arc::new(Metrics::new());
        let ownership = Ownership::leading(leading);
        let manager = Manager::new(store.clone(), ownership.clone(), metrics.clone());
        Self {
            _cache: cache,
            rt,
            store,
            metrics,
            ownership,
            manager,
        }
    }

    /// The plugin, and the engine settings its table asks for. The example
    /// plugins take rounds (the Rust SDK exports `batch-reconciler`); with
    /// `SETPOINT_TEST_SINGLE_CALLS` set (`cargo xtask test` runs these tests
    /// both ways) every key gets a call of its own.
    async fn plugin(&self, name: &str, settings: PluginConfig) -> (Plugin, Engine) {
        let mut engine = settings.engine();
        if std::env::var_os("SETPOINT_TEST_SINGLE_CALLS").is_some() {
            engine.round_size = 1;
        }
        (load(&self.rt, name, settings, &self.store).await, engine)
    }

    fn apply(&self, kind: &str, name: &str, spec: serde_json::Value) -> ObjectKey {
        self.store
            .apply(Object::new(kind, "", name, spec))
            .unwrap()
            .object
            .key()
    }

    fn phase(&self, key: &ObjectKey) -> Option<Phase> {
        self.store.status(key).map(|s| s.phase)
    }
}

/// How long after the controller's status first meets `first` it meets `second`.
async fn time_between(
    controller: &Controller,
    first: impl Fn(&ControllerStatus) -> bool,
    second: impl Fn(&ControllerStatus) -> bool,
) -> Duration {
    wait_until("the first event", LIMIT, || first(&controller.status())).await;
    let at = tokio::time::Instant::now();
    wait_until("the second event", LIMIT, || second(&controller.status())).await;
    at.elapsed()
}

fn hostile(max_retries: u32, min_backoff: Duration) -> PluginConfig {
    let mut s = PluginConfig::default();
    s.limits.max_reconcile_time = Duration::from_millis(500);
    s.limits.memory_mib = 32;
    s.retry.max_retries = max_retries;
    s.retry.min_backoff = min_backoff;
    s.retry.max_backoff = min_backoff * 100;
    s.retry.jitter = 0.0;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reconciles_every_object_and_every_change() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig.plugin("hello", PluginConfig::default()).await;
    let keys: Vec<ObjectKey> = ["a", "b", "c"]
        .iter()
        .map(|n| rig.apply("Greeting", n, json!({"who": n})))
        .collect();
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    wait_until("every greeting is done", LIMIT, || {
        keys.iter().all(|k| rig.phase(k) == Some(Phase::Done))
    })
    .await;
    let a = rig.store.get(&keys[0]).unwrap();
    assert_eq!(a.status.unwrap()["greeting"], "Hello, a!");

    rig.apply("Greeting", "a", json!({"who": "again"}));
    wait_until("the change is reconciled", LIMIT, || {
        rig.store
            .status(&keys[0])
            .is_some_and(|s| s.phase == Phase::Done && s.observed_generation == 2)
    })
    .await;
    assert_eq!(
        rig.store.get(&keys[0]).unwrap().status.unwrap()["greeting"],
        "Hello, again!"
    );
    let status = controller.status();
    assert_eq!((status.successes, status.failures), (4, 0));
    assert!(status.last_success_at.is_some());
    rig.manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reconciles_a_key_changed_during_its_reconcile_again_after_it() {
    let rig = Rig::new(true);
    let mut settings = hostile(0, Duration::from_secs(1));
    settings.workers = 4;
    let (plugin, engine) = rig.plugin("hostile", settings).await;
    let key = rig.apply("Hostile", "s", json!({"mode": "slow", "delay-ms": 300}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    wait_until("the slow reconcile is in flight", LIMIT, || {
        controller.status().in_flight == 1
    })
    .await;
    rig.apply("Hostile", "s", json!({"mode": "slow", "delay-ms": 301}));
    assert_eq!(
        controller.status().in_flight,
        1,
        "not handed to a second worker"
    );
    wait_until("generation 2 is reconciled", LIMIT, || {
        rig.store
            .status(&key)
            .is_some_and(|s| s.phase == Phase::Done && s.observed_generation == 2)
    })
    .await;
    assert_eq!(controller.status().successes, 2);
    rig.manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_removes_a_deleted_object_only_after_its_delete_is_reconciled() {
    let rig = Rig::new(true);
    let data = tempfile::tempdir().unwrap();
    let (plugin, engine) = rig.plugin("files", granting_data(data.path())).await;
    let motd = rig.apply("File", "motd", json!({"content": "hi"}));
    rig.manager.add(plugin, engine.clone()).unwrap();
    let file = data.path().join("_default/motd");
    wait_until("the file is written", LIMIT, || file.exists()).await;

    rig.store.delete(&motd, None).unwrap();
    wait_until("the object is gone", LIMIT, || {
        rig.store.get(&motd).is_none()
    })
    .await;
    assert!(
        !file.exists(),
        "the delete was reconciled before the object went"
    );
    rig.manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_fail_alone_while_the_other_keys_are_served() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(0, Duration::from_secs(1)))
        .await;
    let bad: Vec<(ObjectKey, &str)> = [
        ("loop", "time limit"),
        ("oom", "out of memory"),
        ("trap", "asked to trap"),
    ]
    .iter()
    .map(|(mode, why)| (rig.apply("Hostile", mode, json!({"mode": mode})), *why))
    .collect();
    let good: Vec<ObjectKey> = (0..5)
        .map(|i| rig.apply("Hostile", &format!("ok{i}"), json!({"mode": "ok"})))
        .collect();
    rig.manager.add(plugin, engine.clone()).unwrap();
    wait_until("every key settled", LIMIT, || {
        good.iter().all(|k| rig.phase(k) == Some(Phase::Done))
            && bad.iter().all(|(k, _)| rig.phase(k) == Some(Phase::Error))
    })
    .await;
    for (key, why) in &bad {
        let error = rig.store.status(key).unwrap().last_error.unwrap();
        assert!(error.contains(why), "{key}: {error}");
    }
    // One failed call each. In rounds, a round that hit one of them failed
    // too (then each key went alone), and counts once more: at most one more
    // per worker.
    let text = rig.manager.encode_metrics();
    let most = if engine.round_size > 1 {
        1 + engine.workers
    } else {
        1
    };
    for outcome in ["timeout", "out-of-memory", "trap"] {
        let line = format!(
            "setpoint_plugin_call_failures_total{{plugin=\"hostile\",outcome=\"{outcome}\"}} "
        );
        let calls: usize = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} in:\n{text}"))
            .parse()
            .unwrap();
        assert!((1..=most).contains(&calls), "{line}{calls} in:\n{text}");
    }
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_hand_back_state_and_give_up_after_max_retries() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(3, Duration::from_secs(1)))
        .await;
    let key = rig.apply("Hostile", "f", json!({"mode": "fail"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let start = tokio::time::Instant::now();
    wait_until("the key is given up", Duration::from_secs(60), || {
        controller.status().given_up == 1
    })
    .await;
    // Back-off 1 s, 2 s, 4 s between the four attempts.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_secs(7) && elapsed < Duration::from_secs(8),
        "{elapsed:?}"
    );
    let error = rig.store.status(&key).unwrap().last_error.unwrap();
    assert!(error.starts_with("gave up after 4 attempts"), "{error}");
    assert!(
        error.contains("(attempt 3, 3 failures in state)"),
        "attempts are numbered 0..=3 and each failure's state reaches the next: {error}"
    );
    let status = controller.status();
    assert_eq!(status.failures, 4);
    assert_eq!(status.last_error.as_deref(), Some(error.as_str()));
    assert!(status.last_error_at.is_some());
    assert_eq!(status.pending_timers, 0, "a given-up key is not scheduled");
    let text = rig.manager.encode_metrics();
    assert!(
        text.contains("reconcile_given_up_total{controller=\"hostile\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("workqueue_retries_total{controller=\"hostile\"} 3"),
        "{text}"
    );

    // A change brings a given-up key back.
    rig.apply("Hostile", "f", json!({"mode": "ok"}));
    wait_until("the fixed key is done", Duration::from_secs(60), || {
        rig.phase(&key) == Some(Phase::Done)
    })
    .await;
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_retried_requeue_followed_by_success_forgets_the_failures() {
    // client-go's "rate-limited requeue, then forget": after a success the next
    // failure backs off from the minimum again, not from where it left off.
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(10, Duration::from_secs(1)))
        .await;
    rig.apply("Hostile", "f", json!({"mode": "flaky", "delay-ms": 10_000}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let start = tokio::time::Instant::now();
    let mut events = Vec::new();
    for (failures, successes) in [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3)] {
        wait_until("the next attempt", Duration::from_secs(60), || {
            let s = controller.status();
            (s.failures, s.successes) == (failures, successes)
        })
        .await;
        events.push(start.elapsed().as_secs());
    }
    // fail at 0 s, retried after 1 s, requeued after 10 s: fail at 11 s, and
    // the retry waits 1 s again (not 2 s), and so on.
    assert_eq!(events, [0, 1, 11, 12, 22, 23]);
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_from_the_plugin_overrides_the_back_off() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(5, Duration::from_secs(3600)))
        .await;
    rig.apply(
        "Hostile",
        "r",
        json!({"mode": "retry-after", "delay-ms": 2000}),
    );
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let gap = time_between(&controller, |s| s.failures == 1, |s| s.failures == 2).await;
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_secs(3),
        "{gap:?}"
    );
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_fatal_error_is_not_retried() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(5, Duration::from_millis(10)))
        .await;
    let key = rig.apply("Hostile", "x", json!({"mode": "no-such-mode"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    wait_until("the attempt", LIMIT, || controller.status().failures == 1).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(controller.status().failures, 1);
    assert_eq!(controller.status().pending_timers, 0);
    let error = rig.store.status(&key).unwrap().last_error.unwrap();
    assert!(error.contains("unknown mode"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn requeue_after_reconciles_the_key_again_after_the_delay() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig.plugin("hostile", PluginConfig::default()).await;
    rig.apply("Hostile", "r", json!({"mode": "requeue", "delay-ms": 1000}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let gap = time_between(&controller, |s| s.successes == 1, |s| s.successes == 2).await;
    assert!(
        gap >= Duration::from_secs(1) && gap < Duration::from_millis(1100),
        "{gap:?}"
    );
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn dequeue_policy_keeps_a_retry_for_the_same_generation_and_replaces_it_for_a_newer_one() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(5, Duration::from_secs(600)))
        .await;
    let key = rig.apply("Hostile", "d", json!({"mode": "fail"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    wait_until("the first failure", LIMIT, || {
        controller.status().failures == 1
    })
    .await;
    assert_eq!(controller.status().pending_timers, 1);

    // A label change: an update of the same generation. The retry stays.
    let mut relabelled = Object::new("Hostile", "", "d", json!({"mode": "fail"}));
    relabelled.metadata.labels.insert("team".into(), "x".into());
    rig.store.apply(relabelled).unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        controller.status().failures,
        1,
        "the event waited for the retry"
    );
    assert_eq!(controller.status().pending_timers, 1);

    // A spec change: a newer generation. It replaces the retry and runs now.
    rig.apply("Hostile", "d", json!({"mode": "ok"}));
    wait_until("the new generation is done", LIMIT, || {
        rig.phase(&key) == Some(Phase::Done)
    })
    .await;
    assert!(tokio::time::Instant::now().elapsed() < Duration::from_secs(600));
    assert_eq!(
        controller.status().pending_timers,
        0,
        "the retry was cancelled"
    );
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn dispatch_waits_for_leadership_stops_when_it_is_lost_and_resumes_from_the_store() {
    let rig = Rig::new(false);
    let (plugin, engine) = rig.plugin("hello", PluginConfig::default()).await;
    let a = rig.apply("Greeting", "a", json!({"who": "a"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        controller.status().successes,
        0,
        "a follower dispatches nothing"
    );
    assert_eq!(rig.phase(&a), Some(Phase::Pending));

    rig.ownership.set_leading(true);
    wait_until("the leader reconciles", LIMIT, || {
        rig.phase(&a) == Some(Phase::Done)
    })
    .await;

    rig.ownership.set_leading(false);
    tokio::task::yield_now().await;
    let b = rig.apply("Greeting", "b", json!({"who": "b"}));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        rig.phase(&b),
        Some(Phase::Pending),
        "dispatch stopped at once"
    );

    rig.ownership.set_leading(true);
    wait_until("dispatch resumes", LIMIT, || {
        rig.phase(&b) == Some(Phase::Done)
    })
    .await;
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_negative_hasher_answer_drops_the_key_and_counts_it() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig.plugin("hello", PluginConfig::default()).await;
    let mut engine = engine;
    engine.hasher = Arc::new(|key: &str, _count: usize| if key.ends_with("drop") { -1 } else { 0 });
    let kept = rig.apply("Greeting", "keep", json!({"who": "k"}));
    let dropped = rig.apply("Greeting", "drop", json!({"who": "d"}));
    let controller = rig.manager.add(plugin, engine).unwrap();
    wait_until("the kept key is done", LIMIT, || {
        rig.phase(&kept) == Some(Phase::Done)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rig.phase(&dropped), Some(Phase::Pending));
    assert_eq!(controller.status().dropped, 1);
    let text = rig.manager.encode_metrics();
    assert!(
        text.contains("workqueue_dropped_total{controller=\"hello\"} 1"),
        "{text}"
    );
    rig.manager.shutdown().await;
}

/// One worker, three slow keys; stop the controller while the first is in flight.
/// Returns the keys and what `run` handed back.
async fn stop_during_the_first_of_three(
    rig: &Rig,
    mode: ShutdownMode,
) -> (Vec<ObjectKey>, Vec<ObjectKey>) {
    let mut settings = hostile(0, Duration::from_secs(1));
    settings.workers = 1;
    settings.shutdown = mode;
    // One key per call: the keys not taken yet are what shutdown drains or
    // hands back (a round in flight, like a key, always finishes).
    settings.round_size = 1;
    let (plugin, engine) = rig.plugin("hostile", settings).await;
    let keys: Vec<ObjectKey> = (0..3)
        .map(|i| {
            rig.apply(
                "Hostile",
                &format!("s{i}"),
                json!({"mode": "slow", "delay-ms": 200}),
            )
        })
        .collect();
    let controller = Controller::new(
        plugin,
        rig.store.clone(),
        engine,
        &rig.ownership,
        &rig.metrics,
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(controller.clone().run(stop.clone()));
    wait_until("one key in flight", LIMIT, || {
        controller.status().in_flight == 1
    })
    .await;
    stop.cancel();
    let handed_back = run.await.unwrap();
    (keys, handed_back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_queued_keys_after_the_one_in_flight() {
    let rig = Rig::new(true);
    let (keys, handed_back) = stop_during_the_first_of_three(&rig, ShutdownMode::Drain).await;
    assert!(handed_back.is_empty());
    assert!(keys.iter().all(|k| rig.phase(k) == Some(Phase::Done)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_hand_back_finishes_the_key_in_flight_and_returns_the_rest() {
    let rig = Rig::new(true);
    let (keys, handed_back) = stop_during_the_first_of_three(&rig, ShutdownMode::HandBack).await;
    let done: Vec<_> = keys
        .iter()
        .filter(|k| rig.phase(k) == Some(Phase::Done))
        .collect();
    assert_eq!(done.len(), 1, "the key in flight finished");
    assert_eq!(handed_back.len(), 2, "{handed_back:?}");
    assert!(
        handed_back
            .iter()
            .all(|k| rig.phase(k) == Some(Phase::Pending))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_adds_replaces_removes_and_reports_termination() {
    let rig = Rig::new(true);
    let (hello, engine) = rig.plugin("hello", PluginConfig::default()).await;
    let key = rig.apply("Greeting", "a", json!({"who": "a"}));
    let first = rig.manager.add(hello.clone(), engine.clone()).unwrap();
    assert_eq!(
        rig.manager.add(hello.clone(), engine.clone()).unwrap_err(),
        ManagerError::Exists("hello".into())
    );
    wait_until("reconciled", LIMIT, || first.status().successes == 1).await;

    let mut terminated = rig.manager.termination("hello").unwrap();
    let second = rig
        .manager
        .replace(hello.clone(), engine.clone())
        .await
        .unwrap();
    assert!(
        *terminated.borrow_and_update(),
        "the old controller ended first"
    );
    wait_until("the replacement resynced", LIMIT, || {
        second.status().successes == 1
    })
    .await;
    assert_eq!(
        second.status().successes,
        1,
        "counters start again from zero"
    );
    assert_eq!(rig.phase(&key), Some(Phase::Done));
    assert_eq!(rig.manager.status().len(), 1);

    rig.manager.remove_and_wait("hello").await.unwrap();
    assert!(rig.manager.status().is_empty());
    assert_eq!(
        rig.manager.remove("hello"),
        Err(ManagerError::NotFound("hello".into()))
    );
    assert!(
        !rig.manager
            .encode_metrics()
            .contains("controller=\"hello\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_remove_and_wait_lets_the_reconcile_in_flight_finish() {
    let rig = Rig::new(true);
    let (plugin, engine) = rig
        .plugin("hostile", hostile(0, Duration::from_secs(1)))
        .await;
    let key = rig.apply("Hostile", "s", json!({"mode": "slow", "delay-ms": 300}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    wait_until("in flight", LIMIT, || controller.status().in_flight == 1).await;
    rig.manager.remove_and_wait("hostile").await.unwrap();
    assert_eq!(rig.phase(&key), Some(Phase::Done));
    assert_eq!(controller.status().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn resync_interval_reconciles_every_object_again_while_nothing_changes() {
    let rig = Rig::new(true);
    let settings = PluginConfig {
        resync_interval: Some(Duration::from_secs(20)),
        ..PluginConfig::default()
    };
    let (plugin, engine) = rig.plugin("hello", settings).await;
    rig.apply("Greeting", "a", json!({"who": "a"}));
    rig.apply("Greeting", "b", json!({"who": "b"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let gap = time_between(&controller, |s| s.successes == 2, |s| s.successes == 4).await;
    assert!(
        gap >= Duration::from_secs(19) && gap <= Duration::from_secs(21),
        "{gap:?}"
    );
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn periodic_resync_and_full_reconciliation_wait_for_leadership() {
    let rig = Rig::new(false);
    let settings = PluginConfig {
        resync_interval: Some(Duration::from_secs(10)),
        full_reconcile_interval: Some(Duration::from_secs(10)),
        ..PluginConfig::default()
    };
    let (plugin, engine) = rig.plugin("hello", settings).await;
    rig.apply("Greeting", "a", json!({"who": "a"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(controller.status().successes, 0);
    assert_eq!(
        controller.full_reconcile().await.prune,
        setpoint::controller::PruneOutcome::NotLeading
    );
    assert!(
        rig.manager
            .encode_metrics()
            .contains("setpoint_full_reconciliations_total{controller=\"hello\"} 0")
    );
    rig.manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_reconciliation_at_its_interval_prunes_then_reconciles_every_object() {
    let rig = Rig::new(true);
    let data = tempfile::tempdir().unwrap();
    let mut settings = granting_data(data.path());
    settings.full_reconcile_interval = Some(Duration::from_millis(200));
    let (plugin, engine) = rig.plugin("files", settings).await;
    rig.apply("File", "keep", json!({"content": "k"}));
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let kept = data.path().join("_default/keep");
    wait_until("the file is written", LIMIT, || kept.exists()).await;
    std::fs::write(data.path().join("stray"), "x").unwrap();
    std::fs::write(&kept, "edited").unwrap();
    wait_until("the stray is pruned and the edit undone", LIMIT, || {
        !data.path().join("stray").exists()
            && std::fs::read_to_string(&kept).is_ok_and(|c| c == "k")
    })
    .await;
    wait_until("the edit is counted as out of sync", LIMIT, || {
        controller.status().out_of_sync == 1
    })
    .await;
    rig.manager.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn trigger_queues_a_key_and_answers_queue_full_instead_of_waiting() {
    let rig = Rig::new(true);
    let settings = PluginConfig {
        queue_size: 1,
        ..PluginConfig::default()
    };
    let (plugin, engine) = rig.plugin("hello", settings).await;
    let a = rig.apply("Greeting", "a", json!({"who": "a"}));
    let b = rig.apply("Greeting", "b", json!({"who": "b"}));
    let controller = Controller::new(
        plugin,
        rig.store.clone(),
        engine,
        &rig.ownership,
        &rig.metrics,
    );
    // Not running, so nothing drains the queue and nothing else fills it.
    controller.trigger(a.clone()).unwrap();
    controller.trigger(a).unwrap();
    assert_eq!(
        controller.status().queue_depth,
        1,
        "a key is queued at most once"
    );
    let full = controller.trigger(b).unwrap_err();
    assert!(full.to_string().contains("full"), "{full}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_of_one_kind_both_reconcile_a_delete_before_the_object_goes() {
    let rig = Rig::new(true);
    let data = tempfile::tempdir().unwrap();
    let (files, engine) = rig.plugin("files", granting_data(data.path())).await;
    let key = rig.apply("File", "motd", json!({"content": "hi"}));
    rig.manager.add(files, engine).unwrap();
    // A second holder of the kind: the store's finalizer list is per controller.
    rig.store.register_finalizer("File", "audit").unwrap();
    let file = data.path().join("_default/motd");
    wait_until("the file is written", LIMIT, || file.exists()).await;
    rig.store.delete(&key, None).unwrap();
    // The plugin removes the file during its call; the host drops its
    // finalizer after the call returns: wait for the second.
    wait_until("files did its part", LIMIT, || {
        rig.store
            .get(&key)
            .is_some_and(|o| o.metadata.finalizers == ["setpoint.dev/audit"])
    })
    .await;
    assert!(!file.exists());
    let object = rig.store.get(&key).expect("audit still holds it");
    assert_eq!(object.metadata.finalizers, vec!["setpoint.dev/audit"]);
    assert!(rig.store.finalize(&key, "setpoint.dev/audit").unwrap());
    assert!(rig.store.get(&key).is_none());
    rig.manager.shutdown().await;
}

#[tokio::test]
async fn a_component_of_an_older_minor_loads_is_admitted_and_reconciles() {
    // `legacy` is built from the frozen 0.1.1 WIT: no `admission` export, and
    // imports at 0.1.1.
    let rig = Rig::new(true);
    let (plugin, engine) = rig.plugin("legacy", PluginConfig::default()).await;
    assert!(!plugin.can_validate());
    assert!(!plugin.can_prune());
    assert_eq!(plugin.info().kinds, ["Legacy"]);
    let controller = rig.manager.add(plugin, engine.clone()).unwrap();
    let object = Object::new("Legacy", "", "old", json!({"anything": ["goes", 1]}));
    assert_eq!(
        rig.manager.admit(std::slice::from_ref(&object)).await,
        Ok(())
    );
    let key = rig.store.apply(object).unwrap().object.key();
    wait_until("reconciled", LIMIT, || rig.phase(&key) == Some(Phase::Done)).await;
    assert_eq!(
        rig.store.get(&key).unwrap().status,
        Some(json!({"seen": 1}))
    );
    assert_eq!(controller.status().failures, 0);
    rig.manager.shutdown().await;
}
