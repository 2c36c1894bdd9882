//! The plugin registry with the real example plugins: manifests (pins,
//! capabilities, names), the refusals that leave a running version serving,
//! and a plugin that fails to load keeping its declared kinds pending.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{plugin_path, runtime, wait_until};

const LIMIT: Duration = Duration::from_secs(60);
use serde_json::json;
use setpoint::config::{PluginConfig, RuntimeConfig, resolver};
use setpoint::controller::Manager;
use setpoint::metrics::Metrics;
use setpoint::object::{Object, ObjectKey};
use setpoint::ownership::Ownership;
use setpoint::plugin::{Capabilities, DirGrant, DirRequest, Grants, HttpCapability, HttpGrant};
use setpoint::registry::{PluginSpec, Registry, RegistrySettings};
use setpoint::store::{Phase, Store, finalizer_of};
use setpoint::trust::{Policy, Rule, SecretKey, Signed, signature_path};

struct Rig {
    _cache: tempfile::TempDir,
    store: Store,
    registry: Registry,
}

fn new_rig(grants: BTreeMap<String, Grants>) -> Rig {
    new_rig_with(grants, Policy::default())
}

fn new_rig_with(grants: BTreeMap<String, Grants>, trust: Policy) -> Rig {
    let cache = tempfile::tempdir().unwrap();
    let store = Store::new();
    let manager = Arc::new(Manager::new(
        store.clone(),
        Ownership::default(),
        Arc::new(Metrics::new()),
    ));
    let registry = Registry::new(
        runtime(&cache),
        store.clone(),
        manager,
        RegistrySettings {
            grants,
            trust,
            oci_cache: cache.path().join("oci"),
            ..RegistrySettings::default()
        },
    )
    .with_resolver(resolver(Vec::new(), RuntimeConfig::default()));
    Rig {
        _cache: cache,
        store,
        registry,
    }
}

impl Rig {
    fn greet(&self, name: &str, who: &str) -> ObjectKey {
        let object = Object::new("Greeting", "", name, json!({ "who": who }));
        self.store.apply(object).unwrap().object.key()
    }

    async fn greeted(&self, key: &ObjectKey, who: &str) {
        let greeting = format!("Hello, {who}!");
        wait_until("the greeting is reconciled", LIMIT, || {
            self.store
                .get(key)
                .is_some_and(|o| o.status.is_some_and(|s| s["greeting"] == greeting.as_str()))
        })
        .await;
    }

    async fn shutdown(&self) {
        self.registry.manager().shutdown().await;
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn sha256_of(path: &Path) -> String {
    setpoint::plugin::sha256_hex(&std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_check_refuses_the_swap_and_the_running_version_keeps_serving() {
    let rig = new_rig(BTreeMap::new());
    let hello = plugin_path("hello");
    rig.registry.load(PluginSpec::new(&hello)).await.unwrap();
    let serving = sha256_of(&hello);
    let py = plugin_path("hello-py");
    let mut trapping = PluginSpec::new(plugin_path("hostile"));
    trapping
        .settings
        .grants
        .env
        .insert("HOSTILE_DESCRIBE".into(), "trap".into());
    let cases = [
        (
            PluginSpec {
                expect: setpoint::registry::Expect {
                    sha256: Some("0".repeat(64)),
                    ..Default::default()
                },
                ..PluginSpec::new(&py)
            },
            "but its manifest pins",
        ),
        (
            PluginSpec::new(fixture("wrong-world.wat")),
            "it is not a Setpoint plugin",
        ),
        (PluginSpec::new(fixture("future-version.wat")), "0.2.0"),
        (trapping, "describe() trapped on purpose"),
        (
            PluginSpec {
                capabilities: Some(Capabilities {
                    env: vec!["REGION".into()],
                    ..Capabilities::default()
                }),
                ..PluginSpec::new(&py)
            },
            "asks for environment variable REGION, which is not granted",
        ),
        (
            PluginSpec {
                expect: setpoint::registry::Expect {
                    version: Some("9.9.9".into()),
                    ..Default::default()
                },
                ..PluginSpec::new(&py)
            },
            "but its manifest says 9.9.9",
        ),
    ];
    for (i, (spec, says)) in cases.into_iter().enumerate() {
        let err = rig.registry.swap("hello", spec).await.unwrap_err();
        assert!(err.to_string().contains(says), "case {i}: {err}");
        let view = rig.registry.view("hello").unwrap();
        assert_eq!(view.sha256.as_deref(), Some(serving.as_str()), "case {i}");
        assert_eq!(view.history.last().unwrap().state, "failed", "case {i}");
        let who = format!("case-{i}");
        let key = rig.greet(&who, &who);
        rig.greeted(&key, &who).await;
    }
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_to_other_kinds_holds_the_added_ones_and_keeps_the_dropped_ones_finalizer() {
    let rig = new_rig(BTreeMap::new());
    rig.registry
        .load(PluginSpec::new(plugin_path("hello")))
        .await
        .unwrap();
    let greeting = rig.greet("before", "before");
    rig.greeted(&greeting, "before").await;
    // An object of a kind only the next version reconciles, stored first.
    let noop = Object::new("Noop", "", "n", json!({}));
    let noop = rig.store.apply(noop).unwrap().object.key();

    // `bench` reconciles Noop and Work, not Greeting, under the name hello.
    let view = rig
        .registry
        .swap("hello", PluginSpec::new(plugin_path("bench")))
        .await
        .unwrap();
    let mut kinds = view.kinds.clone();
    kinds.sort();
    assert_eq!(kinds, ["Noop", "Work"]);
    wait_until("the object of the added kind is reconciled", LIMIT, || {
        rig.store
            .status(&noop)
            .is_some_and(|s| s.phase == Phase::Done)
    })
    .await;
    let held = Object::new("Work", "", "w", json!({ "services": [] }));
    let held = rig.store.apply(held).unwrap().object;
    assert!(held.metadata.finalizers.contains(&finalizer_of("hello")));
    assert!(!rig.registry.kinds().contains_key("Greeting"));

    // The dropped kind's object keeps the finalizer: its delete waits.
    rig.store.delete(&greeting, None).unwrap();
    let deleting = rig.store.get(&greeting).expect("held");
    assert!(
        deleting
            .metadata
            .finalizers
            .contains(&finalizer_of("hello"))
    );
    // Swapping back takes Greeting up again and finishes the delete.
    rig.registry
        .swap("hello", PluginSpec::new(plugin_path("hello")))
        .await
        .unwrap();
    wait_until("the delete completes", LIMIT, || {
        rig.store.get(&greeting).is_none()
    })
    .await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_back_to_a_kept_version_reuses_it_unless_its_settings_changed() {
    let rig = new_rig(BTreeMap::new());
    let hello = plugin_path("hello");
    rig.registry.load(PluginSpec::new(&hello)).await.unwrap();
    let active = || {
        rig.registry
            .manager()
            .controller("hello")
            .unwrap()
            .plugin()
            .unwrap()
    };
    let first = active();
    rig.registry
        .swap("hello", PluginSpec::new(plugin_path("hello-py")))
        .await
        .unwrap();
    assert!(!active().is_same_load(&first));
    rig.registry
        .swap("hello", PluginSpec::new(&hello))
        .await
        .unwrap();
    assert!(active().is_same_load(&first), "the kept load is reused");
    // Other limits: a new load.
    let mut tighter = PluginSpec::new(&hello);
    tighter.settings.limits.max_reconcile_time = Duration::from_secs(1);
    rig.registry.swap("hello", tighter).await.unwrap();
    assert!(!active().is_same_load(&first));
    assert_eq!(
        active().settings().limits.max_reconcile_time,
        Duration::from_secs(1)
    );
    let key = rig.greet("after", "after");
    rig.greeted(&key, "after").await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_importing_wasi_http_loads_only_with_an_http_grant() {
    // No manifest, no grant: refused at load, naming the import.
    let rig = new_rig(BTreeMap::new());
    let err = rig
        .registry
        .load(PluginSpec::new(plugin_path("records")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("imports wasi:http/outgoing-handler"), "{err}");
    assert!(err.contains("[grants.records]"), "{err}");
    assert!(rig.registry.manager().controller("records").is_none());
    // Asked for in the manifest, but the operator grants another host.
    let spec = PluginSpec {
        capabilities: Some(Capabilities {
            http: Some(HttpCapability {
                hosts: vec!["http://127.0.0.1:8080".into()],
            }),
            ..Capabilities::default()
        }),
        ..PluginSpec::new(plugin_path("records"))
    };
    rig.shutdown().await;
    let elsewhere = Grants {
        http: Some(HttpGrant {
            hosts: vec!["api.example.com".into()],
            ..HttpGrant::default()
        }),
        ..Grants::default()
    };
    let rig = new_rig(BTreeMap::from([("records".to_string(), elsewhere)]));
    let err = rig
        .registry
        .load(spec.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("outgoing HTTP to http://127.0.0.1:8080, which is not granted"),
        "{err}"
    );
    rig.shutdown().await;
    // Granted (by a wider pattern): it runs with exactly the hosts it asked for.
    let wider = Grants {
        http: Some(HttpGrant {
            hosts: vec!["127.0.0.1".into()],
            ..HttpGrant::default()
        }),
        ..Grants::default()
    };
    let rig = new_rig(BTreeMap::from([("records".to_string(), wider)]));
    let view = rig.registry.load(spec).await.unwrap();
    assert_eq!(view.state, "running");
    let plugin = rig
        .registry
        .manager()
        .controller("records")
        .unwrap()
        .plugin()
        .unwrap();
    let http = plugin.settings().grants.http.clone().unwrap();
    assert_eq!(http.hosts, ["http://127.0.0.1:8080"]);
    // Plugins that do not import it load as before, with no grant.
    rig.registry
        .load(PluginSpec::new(plugin_path("hello")))
        .await
        .unwrap();
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_gets_only_the_capabilities_it_asks_for_and_the_operator_grants() {
    let data = tempfile::tempdir().unwrap();
    let operator = Grants {
        dirs: vec![DirGrant {
            host: data.path().to_path_buf(),
            guest: "/data".into(),
            read_only: false,
        }],
        env: BTreeMap::from([("UNASKED".to_string(), "x".to_string())]),
        stdio: false,
        http: None,
    };
    let asks = Capabilities {
        dirs: vec![DirRequest {
            guest: "/data".into(),
            read_only: false,
        }],
        ..Capabilities::default()
    };
    // Not granted: refused, naming the directory; nothing runs.
    let rig = new_rig(BTreeMap::new());
    let spec = PluginSpec {
        capabilities: Some(asks.clone()),
        ..PluginSpec::new(plugin_path("files"))
    };
    let err = rig.registry.load(spec.clone()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("asks for directory /data, which is not granted"),
        "{err}"
    );
    assert!(err.to_string().contains("[grants.files]"), "{err}");
    assert!(rig.registry.manager().controller("files").is_none());
    rig.shutdown().await;

    // Granted: it runs with the directory it asked for, and nothing else.
    let granted = new_rig(BTreeMap::from([("files".to_string(), operator)]));
    let view = granted.registry.load(spec).await.unwrap();
    assert_eq!(view.state, "running");
    let plugin = granted
        .registry
        .manager()
        .controller("files")
        .unwrap()
        .plugin()
        .unwrap();
    assert_eq!(plugin.settings().grants.dirs.len(), 1);
    assert!(plugin.settings().grants.env.is_empty());
    let object = Object::new("File", "", "note", json!({ "content": "granted" }));
    let key = granted.store.apply(object).unwrap().object.key();
    wait_until("the file is written", LIMIT, || {
        granted
            .store
            .status(&key)
            .is_some_and(|s| s.phase == Phase::Done)
    })
    .await;
    let written = std::fs::read_to_string(data.path().join("_default/note")).unwrap();
    assert_eq!(written, "granted");
    granted.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_fails_to_load_keeps_its_objects_pending_until_a_version_loads() {
    let rig = new_rig(BTreeMap::new());
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("greeter.wasm");
    std::fs::write(&broken, b"\0asm\x0d\0\x01\0truncated").unwrap();
    let manifest = "name = \"greeter\"\nkinds = [\"Greeting\"]\n";
    std::fs::write(dir.path().join("greeter.toml"), manifest).unwrap();
    let err = rig.registry.load_path(&broken).await.unwrap_err();
    assert!(err.to_string().contains("not a valid component"), "{err}");
    let view = rig.registry.view("greeter").unwrap();
    assert_eq!(view.state, "failed");
    assert_eq!(view.kinds, ["Greeting"]);
    assert_eq!(rig.registry.kinds()["Greeting"], ["greeter"]);
    // Its object is accepted, held by its finalizer, and waits.
    let key = rig.greet("early", "early");
    let object = rig.store.get(&key).unwrap();
    assert!(
        object
            .metadata
            .finalizers
            .contains(&finalizer_of("greeter"))
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rig.store.status(&key).unwrap().phase, Phase::Pending);

    // The real component under the same manifest: the name is the
    // manifest's (so is its key-value store), and the waiting object is done.
    std::fs::copy(plugin_path("hello"), &broken).unwrap();
    let view = rig.registry.load_path(&broken).await.unwrap();
    assert_eq!(view.name, "greeter");
    rig.greeted(&key, "early").await;
    let controller = rig.registry.manager().controller("greeter").unwrap();
    assert_eq!(controller.plugin().unwrap().report().described_as, "hello");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_file_pins_its_component_and_may_not_grant_itself_anything() {
    let rig = new_rig(BTreeMap::new());
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hello.wasm");
    std::fs::copy(plugin_path("hello"), &wasm).unwrap();
    let toml = dir.path().join("hello.toml");
    let write = |text: &str| std::fs::write(&toml, text).unwrap();

    write("grants.env = { A = \"b\" }\n");
    let err = rig.registry.load_path(&wasm).await.unwrap_err();
    assert!(err.to_string().contains("cannot grant itself"), "{err}");

    write("kinds = [\"Other\"]\n");
    let err = rig.registry.load_path(&wasm).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("but its manifest says [\"Other\"]"),
        "{err}"
    );

    write("sha256 = \"abc\"\n");
    let err = rig.registry.load_path(&wasm).await.unwrap_err();
    assert!(err.to_string().contains("64 hex digits"), "{err}");

    write("wrokers = 3\n");
    let err = rig.registry.load_path(&wasm).await.unwrap_err();
    assert!(err.to_string().contains("wrokers"), "{err}");
    assert!(rig.registry.manager().controllers().is_empty());

    let sha = sha256_of(&wasm);
    write(&format!(
        "sha256 = \"{sha}\"\nkinds = [\"Greeting\"]\nworkers = 3\n[limits]\nmax-reconcile-time = \"2s\"\n"
    ));
    let view = rig.registry.load_path(&wasm).await.unwrap();
    assert_eq!(view.workers, Some(3));
    let plugin = rig
        .registry
        .manager()
        .controller("hello")
        .unwrap()
        .plugin()
        .unwrap();
    assert_eq!(
        plugin.settings().limits.max_reconcile_time,
        Duration::from_secs(2)
    );
    let key = rig.greet("pinned", "pinned");
    rig.greeted(&key, "pinned").await;
    rig.shutdown().await;
}

#[test]
fn a_config_table_is_an_inline_manifest() {
    let table: PluginConfig = toml::from_str(
        "path = \"x.wasm\"\nname = \"greeter\"\nkinds = [\"Greeting\"]\n[capabilities]\nenv = [\"A\"]\n",
    )
    .unwrap();
    let spec = table.spec();
    assert_eq!(spec.settings.name.as_deref(), Some("greeter"));
    assert_eq!(spec.expect.kinds, Some(vec!["Greeting".to_string()]));
    assert_eq!(spec.capabilities.unwrap().env, ["A"]);
    assert_eq!(spec.granted, Some(Grants::default()));
}

/// `file` signed by `key` (no manifest: empty name and version).
fn sign(file: &Path, key: &SecretKey) {
    let signed = Signed {
        sha256: sha256_of(file),
        name: String::new(),
        version: String::new(),
    };
    std::fs::write(signature_path(file), key.sign(&signed) + "\n").unwrap();
}

/// A policy that requires every plugin to be signed by `publisher`.
fn requiring(publisher: &SecretKey) -> Policy {
    Policy {
        keys: [("publisher".to_string(), publisher.public())].into(),
        rule: Rule {
            require_signature: true,
            ..Rule::default()
        },
        plugins: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_before_load_and_swap() {
    let publisher = SecretKey::generate().unwrap();
    let stranger = SecretKey::generate().unwrap();
    let rig = new_rig_with(BTreeMap::new(), requiring(&publisher));
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let to = dir.path().join(format!("{name}.wasm"));
        std::fs::copy(plugin_path(name), &to).unwrap();
        to
    };

    // Signed by the trusted key: loads.
    let hello = copy("hello");
    sign(&hello, &publisher);
    rig.registry.load(PluginSpec::new(&hello)).await.unwrap();
    let serving = sha256_of(&hello);

    // One flipped byte in a signed component: refused, naming the key.
    let py = copy("hello-py");
    sign(&py, &publisher);
    let mut bytes = std::fs::read(&py).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&py, &bytes).unwrap();
    let err = rig
        .registry
        .swap("hello", PluginSpec::new(&py))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert!(err.to_string().contains("publisher"), "{err}");

    // Signed by a key the policy does not trust: refused, naming the key id.
    let js = copy("hello-js");
    sign(&js, &stranger);
    let err = rig
        .registry
        .swap("hello", PluginSpec::new(&js))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not accept"), "{err}");
    assert!(err.to_string().contains(&stranger.public().id()), "{err}");

    // Unsigned: refused, and the old version keeps serving.
    std::fs::remove_file(signature_path(&js)).unwrap();
    let err = rig
        .registry
        .swap("hello", PluginSpec::new(&js))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not signed"), "{err}");
    assert!(
        err.to_string().contains(&publisher.public().id()),
        "the keys tried are named: {err}"
    );
    let view = rig.registry.view("hello").unwrap();
    assert_eq!(view.sha256.as_deref(), Some(serving.as_str()));
    let key = rig.greet("still", "still");
    rig.greeted(&key, "still").await;

    // Once signed by the trusted key, the swap goes through.
    sign(&js, &publisher);
    rig.registry
        .swap("hello", PluginSpec::new(&js))
        .await
        .unwrap();
    rig.shutdown().await;
}

// Plugins from an OCI registry: a real one (Debian's docker-registry), started
// per test on a loopback port.

use common::oci::TestRegistry;
use setpoint::oci::{Cache, OciRef};

/// `oci-wasm`'s client (the one `wkg` uses), over plain HTTP.
fn oci_wasm_client() -> oci_wasm::WasmClient {
    oci_wasm::WasmClient::new(oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    }))
}

/// Push `file` (and `FILE.sig`, if any) to `reference`: the pinned reference.
async fn push(file: &Path, reference: &str) -> OciRef {
    let to = OciRef::parse(reference).unwrap();
    setpoint::oci::push(file, &to)
        .await
        .unwrap_or_else(|e| panic!("push {}: {e}", file.display()))
        .pinned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_component_pulls_by_tag_and_by_digest_byte_for_byte() {
    let registry = TestRegistry::start();
    let hello = plugin_path("hello");
    let tag = registry.reference("plugins/hello:v1");
    let pushed = setpoint::oci::push(&hello, &OciRef::parse(&tag).unwrap())
        .await
        .unwrap();
    assert!(!pushed.signed);
    assert_eq!(
        pushed.pinned.to_string(),
        registry.reference(&format!("plugins/hello@{}", pushed.digest))
    );
    let original = std::fs::read(&hello).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let by_tag = Cache::new(dir.path().join("a"))
        .pull(&OciRef::parse(&tag).unwrap())
        .await
        .unwrap();
    assert_eq!(by_tag.digest, pushed.digest);
    assert_eq!(by_tag.pinned, pushed.pinned);
    assert!(!by_tag.cached && !by_tag.signed);
    assert_eq!(std::fs::read(&by_tag.path).unwrap(), original);
    let hex = pushed.digest.strip_prefix("sha256:").unwrap();
    assert!(by_tag.path.ends_with(format!("sha256/{hex}.wasm")));

    let cache = Cache::new(dir.path().join("b"));
    let by_digest = cache.pull(&pushed.pinned).await.unwrap();
    assert!(!by_digest.cached);
    assert_eq!(std::fs::read(&by_digest.path).unwrap(), original);

    // A digest reference that is cached needs no network: the registry is gone.
    drop(registry);
    let again = cache.pull(&pushed.pinned).await.unwrap();
    assert!(again.cached);
    assert_eq!(again.path, by_digest.path);
    // A damaged cached copy is not used: it is pulled again (and here the
    // registry cannot be reached, which the error says).
    std::fs::write(&by_digest.path, b"tampered").unwrap();
    let err = cache.pull(&pushed.pinned).await.unwrap_err();
    assert!(err.contains("cannot be reached"), "{err}");
    // A tag always asks the registry what it names now.
    let err = cache.pull(&OciRef::parse(&tag).unwrap()).await.unwrap_err();
    assert!(err.contains("cannot be reached"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_loads_from_a_registry_reconciles_and_records_the_pinned_reference() {
    let registry = TestRegistry::start();
    let pinned = push(
        &plugin_path("hello"),
        &registry.reference("plugins/hello:v1"),
    )
    .await;
    let rig = new_rig(BTreeMap::new());
    let view = rig
        .registry
        .load(PluginSpec::new(registry.reference("plugins/hello:v1")))
        .await
        .unwrap();
    assert_eq!(view.name, "hello");
    assert_eq!(view.source.as_deref(), Some(pinned.to_string().as_str()));
    assert_eq!(
        view.history[0].source.as_deref(),
        Some(pinned.to_string().as_str())
    );
    assert_eq!(
        view.sha256.as_deref(),
        Some(sha256_of(&plugin_path("hello")).as_str())
    );
    let key = rig.greet("oci", "registry");
    rig.greeted(&key, "registry").await;

    // The tag moves to another build: a swap to the tag takes the new one,
    // and the view says which digest each version came from.
    let moved = push(
        &plugin_path("hello-py"),
        &registry.reference("plugins/hello:v1"),
    )
    .await;
    assert_ne!(moved, pinned);
    let view = rig
        .registry
        .swap(
            "hello",
            PluginSpec::new(registry.reference("plugins/hello:v1")),
        )
        .await
        .unwrap();
    assert_eq!(view.source.as_deref(), Some(moved.to_string().as_str()));
    // The first build, by its pinned reference, still loads: the same bytes.
    let view = rig
        .registry
        .swap("hello", PluginSpec::new(pinned.to_string()))
        .await
        .unwrap();
    assert_eq!(view.source.as_deref(), Some(pinned.to_string().as_str()));
    rig.greeted(&rig.greet("again", "again"), "again").await;
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_that_does_not_resolve_is_refused_saying_why() {
    let registry = TestRegistry::start();
    let v1 = push(
        &plugin_path("hello"),
        &registry.reference("plugins/hello:v1"),
    )
    .await;
    let v2 = push(
        &plugin_path("hello-py"),
        &registry.reference("plugins/hello:v2"),
    )
    .await;
    let rig = new_rig(BTreeMap::new());
    let v2_digest = v2.digest.clone().unwrap();
    let absent = format!("sha256:{}", "0".repeat(64));
    let cases = [
        // The tag names v1, the pin says v2: both digests are named.
        (
            registry.reference(&format!("plugins/hello:v1@{v2_digest}")),
            vec![
                "is pinned to".to_string(),
                v2_digest.clone(),
                v1.digest.clone().unwrap(),
            ],
        ),
        (
            registry.reference(&format!("plugins/hello@{absent}")),
            vec!["has no such repository, tag or digest".to_string()],
        ),
        (
            registry.reference("plugins/hello:v9"),
            vec!["has no such repository, tag or digest".to_string()],
        ),
        (
            // Nothing listens on port 9 of loopback.
            "oci://127.0.0.1:9/plugins/hello:v1".to_string(),
            vec!["cannot be reached".to_string()],
        ),
        (
            registry.reference("plugins/Hello:v1"),
            vec!["lower-case".to_string()],
        ),
    ];
    for (reference, expected) in cases {
        let err = rig
            .registry
            .load(PluginSpec::new(&reference))
            .await
            .unwrap_err()
            .to_string();
        for want in expected {
            assert!(err.contains(&want), "{reference}: {err}");
        }
    }
    // A manifest's sha256 pin holds for a pulled component as for a file.
    let pinned_elsewhere = PluginSpec {
        expect: setpoint::registry::Expect {
            sha256: Some("0".repeat(64)),
            ..Default::default()
        },
        ..PluginSpec::new(v1.to_string())
    };
    let err = rig.registry.load(pinned_elsewhere).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "{v1} has sha256 {}",
            sha256_of(&plugin_path("hello"))
        )),
        "{err}"
    );
    assert!(rig.registry.view("hello").unwrap().error.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_travel_with_the_artifact_and_the_trust_policy_applies() {
    let registry = TestRegistry::start();
    let publisher = SecretKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signed = dir.path().join("hello.wasm");
    std::fs::copy(plugin_path("hello"), &signed).unwrap();
    sign(&signed, &publisher);
    let signed_ref = push(&signed, &registry.reference("plugins/hello:signed")).await;
    let unsigned_ref = push(
        &plugin_path("hello-py"),
        &registry.reference("plugins/hello:unsigned"),
    )
    .await;

    let rig = new_rig_with(BTreeMap::new(), requiring(&publisher));
    let view = rig
        .registry
        .load(PluginSpec::new(registry.reference("plugins/hello:signed")))
        .await
        .unwrap();
    assert_eq!(
        view.source.as_deref(),
        Some(signed_ref.to_string().as_str())
    );
    // The signature is beside the cached file, exactly as pushed.
    let cached = view.path.unwrap();
    assert_eq!(
        std::fs::read_to_string(signature_path(Path::new(&cached))).unwrap(),
        std::fs::read_to_string(signature_path(&signed)).unwrap()
    );
    let err = rig
        .registry
        .swap("hello", PluginSpec::new(unsigned_ref.to_string()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not signed"), "{err}");
    rig.greeted(&rig.greet("signed", "signed"), "signed").await;
    rig.shutdown().await;

    // Other tools read the artifact: oci-wasm's own pull (what wkg uses)
    // takes it, signature and all, and gets the component's bytes.
    let client = oci_wasm_client();
    let image: oci_client::Reference = format!("{}/plugins/hello:signed", registry.host)
        .parse()
        .unwrap();
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    let (manifest, config, digest) = client
        .pull_manifest_and_config(&image, &auth)
        .await
        .unwrap();
    assert_eq!(Some(digest), signed_ref.digest);
    assert_eq!(config.os, "wasip2");
    assert!(
        manifest.annotations.unwrap()[setpoint::oci::SIGNATURE_ANNOTATION]
            .contains(&publisher.public().id())
    );
    let data = client.pull(&image, &auth).await.unwrap();
    assert_eq!(data.layers[0].data, std::fs::read(&signed).unwrap());

    // Why an annotation and not a second layer: oci-wasm refuses an artifact
    // with one more layer, so wkg could not pull a signed plugin.
    let (config, layer) = oci_wasm::WasmConfig::from_component(&signed, None)
        .await
        .unwrap();
    let signature = oci_client::client::ImageLayer::new(
        std::fs::read(signature_path(&signed)).unwrap(),
        "application/vnd.setpoint.signature.v1".into(),
        None,
    );
    let layers = [layer, signature];
    let config = oci_wasm::ToConfig::to_config(&config).unwrap();
    let mut manifest = oci_client::manifest::OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(oci_wasm::WASM_MANIFEST_MEDIA_TYPE.into());
    let two: oci_client::Reference = format!("{}/plugins/hello:two-layers", registry.host)
        .parse()
        .unwrap();
    let plain: &oci_client::Client = client.as_ref();
    plain
        .push(&two, &layers, config, &auth, Some(manifest))
        .await
        .unwrap();
    let Err(err) = client.pull(&two, &auth).await else {
        panic!("oci-wasm pulled a two-layer artifact");
    };
    assert!(err.to_string().contains("signature"), "{err}");
    let err = client
        .pull_manifest_and_config(&two, &auth)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exactly one layer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_pushed_by_oci_wasm_loads_from_its_reference() {
    let registry = TestRegistry::start();
    let client = oci_wasm_client();
    let image: oci_client::Reference = format!("{}/other/hello:1.0.0", registry.host)
        .parse()
        .unwrap();
    let (config, layer) = oci_wasm::WasmConfig::from_component(plugin_path("hello"), None)
        .await
        .unwrap();
    client
        .push(
            &image,
            &oci_client::secrets::RegistryAuth::Anonymous,
            layer,
            config,
            None,
        )
        .await
        .unwrap();
    let rig = new_rig(BTreeMap::new());
    rig.registry
        .load(PluginSpec::new(registry.reference("other/hello:1.0.0")))
        .await
        .unwrap();
    rig.greeted(&rig.greet("wkg", "wkg"), "wkg").await;
    rig.shutdown().await;
}
