//! The sandbox, with real components: limits, isolation, and no ambient authority.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{granting_data, load, runtime};
use serde_json::json;
use setpoint::config::{DirGrant, InstanceMode, PluginConfig};
use setpoint::object::Object;
use setpoint::plugin::{CallError, Instance, object_to_wit, wit};
use setpoint::store::Store;

fn hostile_settings() -> PluginConfig {
    let mut settings = PluginConfig::default();
    settings.limits.max_reconcile_time = Duration::from_millis(200);
    settings.limits.memory_mib = 32;
    settings
}

fn request(store: &Store, kind: &str, name: &str, spec: serde_json::Value) -> wit::Request {
    let object = store
        .apply(Object::new(kind, "", name, spec))
        .unwrap()
        .object;
    wit::Request {
        key: object.key().to_string(),
        action: wit::Action::Created,
        object: object_to_wit(&object),
        attempt: 0,
        state: Vec::new(),
    }
}

async fn status_of(instance: &mut Instance, req: &wit::Request) -> serde_json::Value {
    let outcome = instance
        .reconcile(req)
        .await
        .expect("the call succeeds")
        .unwrap_or_else(|f| panic!("the plugin failed: {:?}", f.error));
    serde_json::from_str(outcome.status.as_deref().expect("a status")).unwrap()
}

#[tokio::test]
async fn sandbox_stops_an_endless_loop_at_the_deadline_and_serves_the_next_call() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "hostile", hostile_settings(), &store).await;
    let mut instance = plugin.instance();
    let endless = request(&store, "Hostile", "loop", json!({"mode": "loop"}));
    let result = instance.reconcile(&endless).await;
    assert_eq!(
        result.unwrap_err(),
        CallError::Timeout(Duration::from_millis(200))
    );
    assert!(!instance.is_warm(), "the timed-out instance is thrown away");
    let ok = request(&store, "Hostile", "ok", json!({"mode": "ok"}));
    assert_eq!(status_of(&mut instance, &ok).await["mode"], "ok");
}

#[tokio::test]
async fn sandbox_fails_only_the_call_that_allocates_past_the_memory_limit() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "hostile", hostile_settings(), &store).await;
    let mut instance = plugin.instance();
    let ok = request(&store, "Hostile", "ok", json!({"mode": "ok"}));
    status_of(&mut instance, &ok).await;
    let greedy = request(&store, "Hostile", "oom", json!({"mode": "oom"}));
    assert_eq!(
        instance.reconcile(&greedy).await.unwrap_err(),
        CallError::OutOfMemory(32)
    );
    assert_eq!(status_of(&mut instance, &ok).await["mode"], "ok");
}

#[tokio::test]
async fn sandbox_contains_a_trap_to_its_call() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "hostile", hostile_settings(), &store).await;
    let mut instance = plugin.instance();
    let trap = request(&store, "Hostile", "trap", json!({"mode": "trap"}));
    // stdio is not granted, and the panic's message still reaches the error.
    assert!(!hostile_settings().grants.stdio);
    let Err(CallError::Trap(why)) = instance.reconcile(&trap).await else {
        panic!("a panic in the plugin is a trap");
    };
    assert!(why.contains("unreachable"), "{why}");
    assert!(
        why.contains("the plugin's stderr ended with:") && why.contains("asked to trap"),
        "{why}"
    );
    let ok = request(&store, "Hostile", "ok", json!({"mode": "ok"}));
    assert_eq!(status_of(&mut instance, &ok).await["mode"], "ok");
}

#[tokio::test]
async fn sandbox_grants_no_files_or_environment_by_default() {
    // The host process itself has both, so anything the plugin saw would leak.
    assert!(std::env::vars().next().is_some());
    assert!(std::path::Path::new("/etc/passwd").exists());
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "hostile", hostile_settings(), &store).await;
    let snoop = request(&store, "Hostile", "snoop", json!({"mode": "snoop"}));
    let status = status_of(&mut plugin.instance(), &snoop).await;
    assert_eq!(status["env"], json!([]), "{status}");
    assert_eq!(status["read"], json!([]), "{status}");
}

#[tokio::test]
async fn sandbox_grants_exactly_what_the_configuration_lists() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("x"), "x").unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let mut settings = hostile_settings();
    settings.grants.env = BTreeMap::from([("GRANTED".to_string(), "yes".to_string())]);
    settings.grants.dirs.push(DirGrant {
        host: data.path().to_path_buf(),
        guest: "/data".into(),
        read_only: true,
    });
    let plugin = load(&rt, "hostile", settings, &store).await;
    let snoop = request(&store, "Hostile", "snoop", json!({"mode": "snoop"}));
    let status = status_of(&mut plugin.instance(), &snoop).await;
    assert_eq!(status["env"], json!(["GRANTED"]), "{status}");
    assert_eq!(
        status["read"],
        json!([]),
        "/data is a directory, not a file: {status}"
    );
}

#[tokio::test]
async fn warm_instances_are_reused_until_recycled_and_fresh_ones_are_not() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let ok = request(&store, "Hostile", "ok", json!({"mode": "ok"}));

    let mut warm = hostile_settings();
    warm.recycle_after = 2;
    let plugin = load(&rt, "hostile", warm, &store).await;
    let mut instance = plugin.instance();
    status_of(&mut instance, &ok).await;
    assert!(instance.is_warm(), "kept after one call");
    status_of(&mut instance, &ok).await;
    assert!(!instance.is_warm(), "recycled after recycle-after calls");

    let mut fresh = hostile_settings();
    fresh.instances = InstanceMode::Fresh;
    let plugin = load(&rt, "hostile", fresh, &store).await;
    let mut instance = plugin.instance();
    status_of(&mut instance, &ok).await;
    assert!(
        !instance.is_warm(),
        "a fresh instance is dropped after its call"
    );
}

#[tokio::test]
async fn files_plugin_writes_into_its_granted_directory_and_prunes_strays() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let rt = runtime(&cache);
    let store = Store::new();
    let plugin = load(&rt, "files", granting_data(data.path()), &store).await;
    assert!(plugin.can_prune());
    let mut instance = plugin.instance();
    let motd = request(&store, "File", "motd", json!({"content": "hello\n"}));
    let status = status_of(&mut instance, &motd).await;
    assert_eq!(status, json!({"path": "/data/_default/motd", "bytes": 6}));
    assert_eq!(
        std::fs::read_to_string(data.path().join("_default/motd")).unwrap(),
        "hello\n"
    );

    std::fs::write(data.path().join("stray"), "x").unwrap();
    instance
        .prune(&["File:motd".to_string()])
        .await
        .unwrap()
        .unwrap();
    assert!(data.path().join("_default/motd").exists());
    assert!(!data.path().join("stray").exists());
}
