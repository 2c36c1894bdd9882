//! The store over etcd, against a real etcd the test starts on loopback:
//! replicas see each other's writes, optimistic concurrency, fencing, etcd's
//! limits, and the watch's recovery from a compacted revision.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::TestEtcd;
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use setpoint::etcd::{Etcd, Fence, Fencing, Settings, Tls};
use setpoint::object::{Action, Object, ObjectKey};
use setpoint::store::{Backend, Commit, EtcdBackend, Phase, Store, StoreError};

const LIMIT: Duration = Duration::from_secs(10);

/// One fence for everything, set by the test.
#[derive(Default)]
struct Fixed(Mutex<Option<Fence>>);

impl Fencing for Fixed {
    fn for_key(&self, _: &ObjectKey) -> Option<Fence> {
        self.0.lock().unwrap().clone()
    }
    fn for_replica(&self) -> Option<Fence> {
        self.0.lock().unwrap().clone()
    }
}

fn connect(etcd: &TestEtcd, max_txn_ops: usize) -> Etcd {
    Etcd::connect(Settings {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/t/".into(),
        replica: "r".into(),
        max_txn_ops,
        ..Settings::default()
    })
    .unwrap()
}

/// A fence key created now: its creation revision is the term.
fn fence(etcd: &Etcd, name: &str) -> Fence {
    let key = etcd.key(name);
    let mut client = etcd.client();
    let k = key.clone();
    let revision = etcd.run(async move {
        client
            .put(k, "x", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision()
    });
    Fence { key, revision }
}

struct Replica {
    store: Store,
    fencing: Arc<Fixed>,
    fenced: Counter,
    etcd: Etcd,
}

fn replica(etcd: &TestEtcd) -> Replica {
    let connection = connect(etcd, 128);
    let fencing = Arc::new(Fixed::default());
    *fencing.0.lock().unwrap() = Some(fence(&connection, "cluster/f"));
    let fenced = Counter::default();
    let backend = EtcdBackend::new(connection.clone(), fencing.clone(), fenced.clone());
    Replica {
        store: Store::with_backend(backend).unwrap(),
        fencing,
        fenced,
        etcd: connection,
    }
}

fn object(name: &str, spec: serde_json::Value) -> Object {
    Object::new("Thing", "", name, spec)
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < LIMIT, "not within {LIMIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_see_each_others_writes_and_a_new_one_loads_everything() {
    let etcd = TestEtcd::start();
    let a = replica(&etcd);
    let b = replica(&etcd);
    let mut changes = b.store.watch(&["Thing".to_string()]);
    let key = a
        .store
        .apply(object("one", json!({"n": 1})))
        .unwrap()
        .object
        .key();
    until("b sees the object", || b.store.get(&key).is_some()).await;
    let change = changes.recv().await.unwrap();
    assert_eq!(
        (change.key.clone(), change.action),
        (key.clone(), Action::Created)
    );
    assert_eq!(b.store.get(&key), a.store.get(&key));
    assert_eq!(b.store.status(&key).unwrap().phase, Phase::Pending);

    // A status written behind reaches the other replica at the flush.
    a.store.mark_done(&key, 1).unwrap();
    a.store.kv_set("p", "k", b"v".to_vec()).unwrap();
    a.store.flush().unwrap();
    until("b sees the status and kv", || {
        b.store.status(&key).is_some_and(|s| s.phase == Phase::Done)
            && b.store.kv_get("p", "k").as_deref() == Some(&b"v"[..])
    })
    .await;

    // An update through b reaches a; b's own write is not applied twice.
    let mut updated = b.store.get(&key).unwrap();
    updated.spec = json!({"n": 2});
    updated.metadata.resource_version = 0;
    b.store.apply(updated).unwrap();
    until("a sees generation 2", || {
        a.store
            .get(&key)
            .is_some_and(|o| o.metadata.generation == 2)
    })
    .await;
    let change = changes.recv().await.unwrap();
    assert_eq!(change.action, Action::Updated);

    // A delete without finalizers removes it everywhere.
    a.store.delete(&key, None).unwrap();
    until("b sees it gone", || b.store.get(&key).is_none()).await;

    let c = replica(&etcd);
    assert_eq!(c.store.kv_get("p", "k").as_deref(), Some(&b"v"[..]));
    assert!(c.store.get(&key).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_based_on_an_old_revision_is_refused_and_stores_nothing() {
    let etcd = TestEtcd::start();
    let a = replica(&etcd);
    let key = a
        .store
        .apply(object("x", json!({"n": 1})))
        .unwrap()
        .object
        .key();
    // A backend that loaded before another replica's update: its row's base
    // revision is the old one.
    let connection = connect(&etcd, 128);
    let stale = EtcdBackend::new(connection, a.fencing.clone(), Counter::default());
    let loaded = stale.load().unwrap();
    let mut old = loaded.objects.into_iter().find(|o| o.key() == key).unwrap();
    let mut newer = old.clone();
    newer.spec = json!({"n": 2});
    newer.metadata.resource_version = 0;
    a.store.apply(newer).unwrap();
    old.spec = json!({"n": 3});
    let rows = [(key.clone(), Some(old))];
    let refused = stale.commit(&one_object(&rows, false));
    assert_eq!(refused, Err(StoreError::Stale(key.clone())));
    let reread = replica(&etcd);
    assert_eq!(reread.store.get(&key).unwrap().spec, json!({"n": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owners_writes_do_not_land_and_are_counted() {
    let etcd = TestEtcd::start();
    let a = replica(&etcd);
    let key = a.store.apply(object("f", json!({}))).unwrap().object.key();
    a.store.flush().unwrap();
    // Another replica took over: the fence key was created again.
    let deposed = a.fencing.0.lock().unwrap().clone().unwrap();
    let mut client = a.etcd.client();
    let fence_key = deposed.key.clone();
    a.etcd.run(async move {
        client.delete(fence_key.clone(), None).await.unwrap();
        client.put(fence_key, "someone else", None).await.unwrap();
    });
    // Written behind: dropped at the flush, counted.
    a.store.mark_done(&key, 1).unwrap();
    a.store.flush().unwrap();
    assert_eq!(a.fenced.get(), 1);
    let other = replica(&etcd);
    assert_eq!(
        other.store.status(&key).unwrap().phase,
        Phase::Pending,
        "the late write did not land"
    );
    // Required (the removal after the last finalizer): refused.
    let rows = [(key.clone(), None)];
    let backend = EtcdBackend::new(connect(&etcd, 128), a.fencing.clone(), Counter::default());
    backend.load().unwrap();
    let refused = backend.commit(&one_object(&rows, true));
    assert_eq!(refused, Err(StoreError::Fenced(key.clone())));
    assert!(replica(&etcd).store.get(&key).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_transaction_limits_refuse_big_writes_clearly_and_split_written_behind_ones() {
    let etcd = TestEtcd::start();
    let connection = connect(&etcd, 16);
    let fencing = Arc::new(Fixed::default());
    *fencing.0.lock().unwrap() = Some(fence(&connection, "cluster/f"));
    let store =
        Store::with_backend(EtcdBackend::new(connection, fencing, Counter::default())).unwrap();
    // 10 objects are 20 operations: more than 16 in one transaction.
    let many: Vec<Object> = (0..10)
        .map(|i| object(&format!("m{i}"), json!({})))
        .collect();
    let refused = store.apply_all(many).unwrap_err();
    assert!(matches!(refused, StoreError::TooLarge(_)), "{refused}");
    assert!(refused.to_string().contains("max-txn-ops"), "{refused}");
    assert!(
        store.list("Thing", &Default::default()).is_empty(),
        "nothing stored"
    );
    // 8 objects fit; 40 statuses written behind go in several transactions.
    let keys: Vec<ObjectKey> = (0..40)
        .map(|i| {
            store
                .apply(object(&format!("s{i}"), json!({})))
                .unwrap()
                .object
                .key()
        })
        .collect();
    for key in &keys {
        store.mark_done(key, 1).unwrap();
    }
    store.flush().unwrap();
    let other = replica(&etcd);
    for key in &keys {
        assert_eq!(other.store.status(key).unwrap().phase, Phase::Done, "{key}");
    }
    // One object over etcd's request size.
    let big = object("big", json!({"data": "x".repeat(2 * 1024 * 1024)}));
    let refused = store.apply(big).unwrap_err();
    assert!(
        refused.to_string().contains("max-request-bytes"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_space_is_an_error_that_says_what_to_do() {
    let etcd = TestEtcd::start_with(&["--quota-backend-bytes", "1048576"]);
    let a = replica(&etcd);
    let mut error = None;
    for i in 0..400 {
        let spec = json!({"data": "y".repeat(64 * 1024)});
        if let Err(e) = a.store.apply(object(&format!("q{i}"), spec)) {
            error = Some(e);
            break;
        }
    }
    let error = error.expect("a 1 MiB quota fills up").to_string();
    assert!(
        error.contains("out of space") && error.contains("defrag"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_resumes_from_a_compacted_revision_lists_again_and_carries_on() {
    let etcd = TestEtcd::start();
    let writer = replica(&etcd);
    let kept = writer
        .store
        .apply(object("kept", json!({"v": 1})))
        .unwrap()
        .object
        .key();
    let gone = writer
        .store
        .apply(object("gone", json!({})))
        .unwrap()
        .object
        .key();
    // A replica that loaded here and then fell behind.
    let connection = connect(&etcd, 128);
    let fencing = Arc::new(Fixed::default());
    let late = EtcdBackend::new(connection.clone(), fencing, Counter::default());
    assert_eq!(late.prefetch().unwrap(), 2);
    let mut changed = writer.store.get(&kept).unwrap();
    changed.spec = json!({"v": 2});
    changed.metadata.resource_version = 0;
    writer.store.apply(changed).unwrap();
    writer.store.delete(&gone, None).unwrap();
    let new = writer
        .store
        .apply(object("new", json!({})))
        .unwrap()
        .object
        .key();
    // Compact everything up to now: the late replica's resume revision is gone.
    let mut client = connection.client();
    connection.run(async move {
        let now = client
            .get("x", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        client.compact(now, None).await.unwrap();
    });
    let store = Store::with_backend(late).unwrap();
    // Only a new list can bring these: etcd refuses a watch from the
    // compacted revision.
    until("the late replica caught up", || {
        store.get(&kept).is_some_and(|o| o.spec == json!({"v": 2}))
            && store.get(&gone).is_none()
            && store.get(&new).is_some()
    })
    .await;
    // And it watches on from there.
    let after = writer
        .store
        .apply(object("after", json!({})))
        .unwrap()
        .object
        .key();
    until("it follows on", || store.get(&after).is_some()).await;
}

/// Run `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_works_with_its_ca_and_a_client_certificate_and_is_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=setpoint test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(d.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "client.key",
                "-out",
                "client.csr",
                "-subj",
                "/CN=setpoint",
            ],
        ]
        .concat(),
    );
    std::fs::write(d.join("client-ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
            "-extfile",
            "client-ext",
        ],
    );
    // etcd asks for a client certificate signed by the same CA.
    let etcd = TestEtcd::start_with(&[
        &format!("--cert-file={}", d.join("server.pem").display()),
        &format!("--key-file={}", d.join("server.key").display()),
        "--client-cert-auth",
        &format!("--trusted-ca-file={}", d.join("ca.pem").display()),
    ]);
    assert!(etcd.endpoint.starts_with("https://"));
    let settings = |tls: Option<Tls>| Settings {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/tls/".into(),
        tls,
        ..Settings::default()
    };
    let trusted = Etcd::connect(settings(Some(Tls {
        ca: Some(d.join("ca.pem")),
        cert: Some(d.join("client.pem")),
        key: Some(d.join("client.key")),
    })))
    .unwrap();
    let store = Store::with_backend(EtcdBackend::new(
        trusted,
        Arc::new(Fixed::default()),
        Counter::default(),
    ))
    .unwrap();
    let key = store
        .apply(object("secure", json!({})))
        .unwrap()
        .object
        .key();
    assert!(store.get(&key).is_some());
    let anonymous = Etcd::connect(settings(Some(Tls {
        ca: Some(d.join("ca.pem")),
        cert: None,
        key: None,
    })));
    assert!(
        anonymous.is_err(),
        "without a client certificate etcd refuses"
    );
    let plain = Etcd::connect(settings(None))
        .err()
        .expect("no TLS settings: refused")
        .to_string();
    assert!(
        plain.contains("cannot reach etcd at https://127.0.0.1"),
        "{plain}"
    );
    let missing = Etcd::connect(settings(Some(Tls {
        ca: Some(d.join("nope.pem")),
        cert: None,
        key: None,
    })))
    .err()
    .expect("a missing CA file is refused")
    .to_string();
    assert!(
        missing.contains("cannot read the etcd TLS CA") && missing.contains("nope.pem"),
        "{missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_authentication_takes_the_user_and_password_and_says_when_they_are_wrong() {
    let etcd = TestEtcd::start();
    let admin = connect(&etcd, 128);
    let mut client = admin.client();
    admin.run(async move {
        client.user_add("root", "rootpw", None).await.unwrap();
        client.user_grant_role("root", "root").await.unwrap();
        client.user_add("setpoint", "s3cret", None).await.unwrap();
        client.user_grant_role("setpoint", "root").await.unwrap();
        client.auth_enable().await.unwrap();
    });
    let settings = |password: &str| Settings {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/auth/".into(),
        user: Some(("setpoint".into(), password.into())),
        ..Settings::default()
    };
    let good = Etcd::connect(settings("s3cret")).unwrap();
    let store = Store::with_backend(EtcdBackend::new(
        good,
        Arc::new(Fixed::default()),
        Counter::default(),
    ))
    .unwrap();
    store.apply(object("authed", json!({}))).unwrap();
    let wrong = Etcd::connect(settings("guess"))
        .err()
        .expect("a wrong password is refused")
        .to_string();
    assert!(wrong.contains("check [store] user and password"), "{wrong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_reach_more_objects_than_one_transaction_takes_and_racing_replicas_agree() {
    let etcd = TestEtcd::start();
    let a = replica(&etcd);
    let b = replica(&etcd);
    // 200 objects: 100 transactions' worth of rows at the default limit.
    for chunk in (0..200).collect::<Vec<_>>().chunks(50) {
        let objects = chunk
            .iter()
            .map(|i| object(&format!("f{i}"), json!({})))
            .collect();
        a.store.apply_all(objects).unwrap();
    }
    until("b has them all", || b.store.keys("Thing").len() == 200).await;
    // Both replicas register the same controller at once.
    let (sa, sb) = (a.store.clone(), b.store.clone());
    let one = std::thread::spawn(move || sa.register_finalizer("Thing", "ctl"));
    let two = std::thread::spawn(move || sb.register_finalizer("Thing", "ctl"));
    one.join().unwrap().unwrap();
    two.join().unwrap().unwrap();
    let c = replica(&etcd);
    let objects = c.store.list("Thing", &Default::default());
    assert_eq!(objects.len(), 200);
    for o in objects {
        assert_eq!(o.metadata.finalizers, ["setpoint.dev/ctl"], "{}", o.key());
    }
}

/// A commit of `rows` (one object row, required), written as the owner of
/// its key or as a client.
fn one_object<'a>(rows: &'a [(ObjectKey, Option<Object>)], owner: bool) -> Commit<'a> {
    Commit {
        objects: rows,
        status: &[],
        kv: &[],
        next_uid: 0,
        next_version: 0,
        required: (1, 0),
        owner,
    }
}
