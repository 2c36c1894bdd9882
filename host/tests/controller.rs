//! The minimal engine with real plugins: reconcile, status, deletes, retries,
//! requeues, and hostile keys failing alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{granting_data, load, runtime, wait_until};
use serde_json::json;
use setpoint::config::PluginConfig;
use setpoint::controller::Controller;
use setpoint::object::{Object, ObjectKey};
use setpoint::store::{Phase, Store};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

fn start(controller: &Arc<Controller>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let task = tokio::spawn(controller.clone().run(token.clone()));
    (token, task)
}

fn phase(store: &Store, key: &ObjectKey) -> Option<Phase> {
    store.status(key).map(|s| s.phase)
}

#[tokio::test]
async fn controller_reconciles_every_object_and_every_change() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "hello", PluginConfig::default(), &store).await;
    let keys: Vec<ObjectKey> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            store
                .apply(Object::new("Greeting", "", n, json!({"who": n})))
                .0
                .key()
        })
        .collect();
    let controller = Controller::new(plugin, store.clone());
    let (stop, task) = start(&controller);
    wait_until("every greeting is done", LIMIT, || {
        keys.iter().all(|k| phase(&store, k) == Some(Phase::Done))
    })
    .await;
    let a = store.get(&keys[0]).unwrap();
    assert_eq!(a.status.unwrap()["greeting"], "Hello, a!");

    store.apply(Object::new("Greeting", "", "a", json!({"who": "again"})));
    wait_until("the change is reconciled", LIMIT, || {
        store
            .status(&keys[0])
            .is_some_and(|s| s.phase == Phase::Done && s.observed_generation == 2)
    })
    .await;
    assert_eq!(
        store.get(&keys[0]).unwrap().status.unwrap()["greeting"],
        "Hello, again!"
    );
    stop.cancel();
    task.await.unwrap();
    assert_eq!(controller.status().successes, 4);
    assert_eq!(controller.status().failures, 0);
}

#[tokio::test]
async fn controller_removes_a_deleted_object_only_after_its_delete_is_reconciled() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "files", granting_data(data.path()), &store).await;
    let (motd, _) = store.apply(Object::new("File", "", "motd", json!({"content": "hi"})));
    let controller = Controller::new(plugin, store.clone());
    let (stop, task) = start(&controller);
    let file = data.path().join("motd");
    wait_until("the file is written", LIMIT, || file.exists()).await;

    store.delete(&motd.key()).unwrap();
    wait_until("the object is gone", LIMIT, || {
        store.get(&motd.key()).is_none()
    })
    .await;
    assert!(
        !file.exists(),
        "the delete was reconciled before the object went"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn hostile_keys_fail_alone_while_the_other_keys_are_served() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let mut settings = PluginConfig::default();
    settings.limits.max_reconcile_time = Duration::from_millis(200);
    settings.limits.memory_mib = 32;
    settings.retry.max_retries = 0;
    let plugin = load(&rt, "hostile", settings, &store).await;
    let bad: Vec<(ObjectKey, &str)> = [
        ("loop", "time limit"),
        ("oom", "out of memory"),
        ("trap", "trapped"),
    ]
    .iter()
    .map(|(mode, why)| {
        (
            store
                .apply(Object::new("Hostile", "", mode, json!({"mode": mode})))
                .0
                .key(),
            *why,
        )
    })
    .collect();
    let good: Vec<ObjectKey> = (0..5)
        .map(|i| {
            store
                .apply(Object::new(
                    "Hostile",
                    "",
                    &format!("ok{i}"),
                    json!({"mode": "ok"}),
                ))
                .0
                .key()
        })
        .collect();
    let controller = Controller::new(plugin, store.clone());
    let (stop, task) = start(&controller);
    wait_until("every key settled", LIMIT, || {
        good.iter().all(|k| phase(&store, k) == Some(Phase::Done))
            && bad
                .iter()
                .all(|(k, _)| phase(&store, k) == Some(Phase::Error))
    })
    .await;
    for (key, why) in &bad {
        let error = store.status(key).unwrap().last_error.unwrap();
        assert!(error.contains(why), "{key}: {error}");
    }
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_hand_back_state_and_give_up_after_max_retries() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let mut settings = PluginConfig::default();
    settings.retry.max_retries = 3;
    settings.retry.min_backoff = Duration::from_secs(1);
    settings.retry.max_backoff = Duration::from_secs(10);
    let plugin = load(&rt, "hostile", settings, &store).await;
    let (obj, _) = store.apply(Object::new("Hostile", "", "f", json!({"mode": "fail"})));
    let controller = Controller::new(plugin, store.clone());
    let (stop, task) = start(&controller);
    wait_until("the key is given up", Duration::from_secs(60), || {
        controller.status().given_up == 1
    })
    .await;
    let error = store.status(&obj.key()).unwrap().last_error.unwrap();
    assert!(error.starts_with("gave up after 4 attempts"), "{error}");
    assert!(
        error.contains("(attempt 3, 3 failures in state)"),
        "attempts are numbered 0..=3 and the state of each failure is handed to the next: {error}"
    );
    assert_eq!(controller.status().failures, 4);

    // A change brings a given-up key back.
    store.apply(Object::new("Hostile", "", "f", json!({"mode": "ok"})));
    wait_until("the fixed key is done", Duration::from_secs(60), || {
        phase(&store, &obj.key()) == Some(Phase::Done)
    })
    .await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn requeue_after_reconciles_the_key_again_after_the_delay() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "hostile", PluginConfig::default(), &store).await;
    store.apply(Object::new(
        "Hostile",
        "",
        "r",
        json!({"mode": "requeue", "delay-ms": 1000}),
    ));
    let controller = Controller::new(plugin, store.clone());
    let (stop, task) = start(&controller);
    wait_until("the first reconcile", LIMIT, || {
        controller.status().successes == 1
    })
    .await;
    let first = tokio::time::Instant::now();
    wait_until("the requeued reconcile", LIMIT, || {
        controller.status().successes == 2
    })
    .await;
    assert!(
        first.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        first.elapsed()
    );
    stop.cancel();
    task.await.unwrap();
}
