//! Outgoing HTTP end to end: the real `setpoint` binary runs the `records`
//! example plugin (Rust, built with the SDK's `http` feature) against a real
//! HTTP API this test serves on loopback, with the grant in its configuration.
//!
//! - the granted host is reached: documents are created, and deleted with
//!   their objects;
//! - a request to another host fails inside the plugin, is counted in
//!   `setpoint_plugin_http_denied_total`, and never reaches that host;
//! - a 5xx is retried with back-off until the API answers;
//! - a request slower than the grant's timeout fails, and is retried.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

mod support;

use support::{Daemon, apply_ok, eventually, http, plugin};

const LIMIT: Duration = Duration::from_secs(60);

/// The size of a `/big/` answer: twice the grant's `max-response-bytes`.
const BIG: usize = 128 * 1024;

/// What the fake API has seen and holds.
#[derive(Default)]
struct Api {
    /// Documents by path.
    docs: BTreeMap<String, Vec<u8>>,
    /// Every request: `METHOD /path`.
    seen: Vec<String>,
    /// 503s still to answer for paths under `/flaky/`.
    flaky_left: u32,
}

type Shared = Arc<Mutex<Api>>;

/// `/records/...` keeps documents; `/flaky/...` answers 503 until
/// `flaky_left` runs out; `/slow/...` answers after 30 s, `/slowish/...`
/// after 0.9 s; `/big/...` and
/// `/chunked/...` answer `BIG` bytes, more than the grant's
/// `max-response-bytes`, with a content-length and without one.
async fn serve(
    State(api): State<Shared>,
    method: Method,
    UrlPath(path): UrlPath<String>,
    body: Bytes,
) -> Response {
    let path = format!("/{path}");
    {
        let mut api = api.lock().unwrap();
        api.seen.push(format!("{method} {path}"));
        if path.starts_with("/flaky/") && api.flaky_left > 0 {
            api.flaky_left -= 1;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    if path.starts_with("/slow/") {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    if path.starts_with("/slowish/") {
        // Each answer within the grant's 1 s timeout; two in a row are not
        // within the plugin's 1.5 s max-reconcile-time.
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    if path.starts_with("/big/") {
        return (StatusCode::OK, vec![b' '; BIG]).into_response();
    }
    if path.starts_with("/chunked/") {
        // No content-length: the limit is found while reading.
        let chunks = (0..BIG / 8192).map(|_| Ok::<_, std::io::Error>(vec![b' '; 8192]));
        return Body::from_stream(futures::stream::iter(chunks)).into_response();
    }
    let mut api = api.lock().unwrap();
    let answer = match method {
        Method::GET => match api.docs.get(&path) {
            Some(doc) => (StatusCode::OK, doc.clone()),
            None => (StatusCode::NOT_FOUND, Vec::new()),
        },
        Method::PUT => {
            api.docs.insert(path, body.to_vec());
            (StatusCode::OK, Vec::new())
        }
        Method::DELETE => match api.docs.remove(&path) {
            Some(_) => (StatusCode::NO_CONTENT, Vec::new()),
            None => (StatusCode::NOT_FOUND, Vec::new()),
        },
        _ => (StatusCode::METHOD_NOT_ALLOWED, Vec::new()),
    };
    answer.into_response()
}

/// A fake API on a free loopback port, stopped when dropped.
struct Server {
    api: Shared,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(flaky: u32) -> Server {
        let api: Shared = Arc::new(Mutex::new(Api {
            flaky_left: flaky,
            ..Api::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/{*path}", any(serve))
            .with_state(api.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Server {
            api,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.api.lock().unwrap().seen.clone()
    }

    fn doc(&self, path: &str) -> Option<serde_json::Value> {
        let api = self.api.lock().unwrap();
        api.docs
            .get(path)
            .map(|d| serde_json::from_slice(d).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A slow handler may still be sleeping: do not wait for it.
        drop(self.thread.take());
    }
}

/// A daemon running the plugin `name` (`records` or `records-py`), granted
/// HTTP to `granted` only.
fn daemon(home: &Path, name: &str, granted: &str) -> (Daemon, String) {
    let config = format!(
        r#"
[store]
path = "{store}"

[[plugin]]
path = "{records}"
limits = {{ max-reconcile-time = "1500ms" }}
[plugin.retry]
min-backoff = "50ms"
max-backoff = "200ms"
[plugin.capabilities.http]
hosts = ["{granted}"]

[grants.{name}]
http = {{ hosts = ["{granted}"], timeout = "1s", max-response-bytes = 65536 }}
"#,
        store = home.join("store.redb").display(),
        records = plugin(name).display(),
    );
    let path = home.join("setpoint.toml");
    std::fs::write(&path, config).unwrap();
    let mut d = Daemon::start_in(home, &["--config", path.to_str().unwrap()]);
    let url = d.url();
    (d, url)
}

fn apply(url: &str, name: &str, endpoint: &str, data: &str) {
    let yaml = format!(
        "kind: Record\nmetadata:\n  name: {name}\nspec:\n  endpoint: {endpoint}\n  data: {data}\n"
    );
    apply_ok(url, &yaml);
}

/// The object's reconcile status (`phase`, `lastError`, ...).
fn status(url: &str, name: &str) -> serde_json::Value {
    http(
        "GET",
        &format!("{url}/v1/objects/Record/{name}/status"),
        &[],
        None,
    )
    .json()
}

/// The value of a metric line starting with `prefix` (0 if absent).
fn metric(url: &str, prefix: &str) -> f64 {
    let text = http("GET", &format!("{url}/metrics"), &[], None).body;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Record `a` pushed to `api`: done, and the document is there.
fn the_granted_host_is_reached(url: &str, api: &Server) {
    apply(url, "a", &format!("{}/records", api.url()), "{v: 1}");
    eventually("record a is created", LIMIT, || {
        status(url, "a")["phase"] == "done"
    });
    assert_eq!(api.doc("/records/_/a"), Some(serde_json::json!({"v": 1})));
}

/// Record `elsewhere` pushed to `other`, which is not granted: it fails for
/// good inside the plugin, is counted, and never reaches `other`.
fn another_host_is_denied(url: &str, other: &Server, plugin: &str) {
    apply(
        url,
        "elsewhere",
        &format!("{}/records", other.url()),
        "{v: 1}",
    );
    eventually("the request to another host fails", LIMIT, || {
        status(url, "elsewhere")["phase"] == "error"
    });
    let failed = status(url, "elsewhere");
    let error = failed["lastError"].as_str().unwrap();
    assert!(error.contains("denied"), "{error}");
    assert!(error.contains(&other.url()), "{error}");
    assert_eq!(failed["terminal"], true, "denied is fatal: {failed}");
    assert!(other.seen().is_empty(), "{:?}", other.seen());
    let denied = format!("setpoint_plugin_http_denied_total{{plugin=\"{plugin}\"}}");
    assert!(metric(url, &denied) >= 1.0, "the denial is counted");
}

#[test]
fn records_reach_the_granted_host_only_with_retries_and_timeouts() {
    let home = tempfile::tempdir().unwrap();
    let api = Server::start(2);
    let other = Server::start(0);
    let (mut d, url) = daemon(home.path(), "records", &api.url());

    // Allowed: the document is created, and the status says so.
    the_granted_host_is_reached(&url, &api);
    let object = http("GET", &format!("{url}/v1/objects/Record/a"), &[], None).json();
    assert_eq!(object["status"]["remote"], "created", "{object}");

    // Another host: denied inside the plugin, counted, never reached.
    another_host_is_denied(&url, &other, "records");

    // 5xx: retried with back-off until the API answers (two 503s first).
    let retries = "workqueue_retries_total{controller=\"records\"}";
    let before = metric(&url, retries);
    apply(&url, "flaky", &format!("{}/flaky", api.url()), "{v: 2}");
    eventually("the flaky record is created", LIMIT, || {
        status(&url, "flaky")["phase"] == "done"
    });
    assert_eq!(api.doc("/flaky/_/flaky"), Some(serde_json::json!({"v": 2})));
    let flaky: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.contains("/flaky/"))
        .collect();
    assert_eq!(
        flaky,
        [
            "GET /flaky/_/flaky",
            "GET /flaky/_/flaky",
            "GET /flaky/_/flaky",
            "PUT /flaky/_/flaky"
        ],
        "two 503s, each retried"
    );
    assert!(
        metric(&url, retries) - before >= 2.0,
        "retries go through the back-off"
    );

    // Slower than the grant's 1 s timeout: fails as a timeout, and is retried.
    apply(&url, "slow", &format!("{}/slow", api.url()), "{v: 3}");
    eventually("the slow request times out twice", LIMIT, || {
        let s = status(&url, "slow");
        let slow = api.seen().iter().filter(|s| s.contains("/slow/")).count();
        s["phase"] == "error" && slow >= 2
    });
    let timed_out = status(&url, "slow");
    let error = timed_out["lastError"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(
        timed_out["terminal"], false,
        "a timeout is retried: {timed_out}"
    );

    // Requests in a row do not outlast the call: the GET takes 0.9 s, and the
    // PUT gets only what is left of the 1.5 s max-reconcile-time.
    apply(&url, "slowish", &format!("{}/slowish", api.url()), "{v: 5}");
    eventually(
        "the second request runs out of the call's time",
        LIMIT,
        || status(&url, "slowish")["phase"] == "error",
    );
    let error = status(&url, "slowish")["lastError"].to_string();
    assert!(error.contains("timed out"), "{error}");

    // A body past the grant's max-response-bytes fails, declared or not.
    for (name, path) in [("big", "big"), ("chunked", "chunked")] {
        apply(&url, name, &format!("{}/{path}", api.url()), "{v: 4}");
        eventually("the big answer is refused", LIMIT, || {
            status(&url, name)["phase"] == "error"
        });
        let too_big = status(&url, name);
        let error = too_big["lastError"].as_str().unwrap();
        assert!(
            error.contains("larger than the host allows"),
            "{name}: {error}"
        );
    }

    // Deleting the object deletes the document.
    let deleted = http("DELETE", &format!("{url}/v1/objects/Record/a"), &[], None);
    assert!(deleted.status < 300, "{}", deleted.body);
    eventually("record a's document is deleted", LIMIT, || {
        api.doc("/records/_/a").is_none()
    });
    d.interrupt();
}

#[test]
fn a_python_plugin_reaches_the_granted_host_only() {
    let home = tempfile::tempdir().unwrap();
    let api = Server::start(0);
    let other = Server::start(0);
    let (mut d, url) = daemon(home.path(), "records-py", &api.url());
    the_granted_host_is_reached(&url, &api);
    another_host_is_denied(&url, &other, "records-py");
    d.interrupt();
}

#[test]
fn a_plugin_importing_http_without_a_grant_is_refused_naming_it() {
    let home = tempfile::tempdir().unwrap();
    let config = format!(
        "[store]\npath = \"{}\"\n\n[[plugin]]\npath = \"{}\"\n",
        home.path().join("store.redb").display(),
        plugin("records").display(),
    );
    let path = home.path().join("setpoint.toml");
    std::fs::write(&path, config).unwrap();
    let mut d = Daemon::start_in(home.path(), &["--config", path.to_str().unwrap()]);
    let url = d.url();
    let plugins = http("GET", &format!("{url}/v1/plugins"), &[], None).json();
    let text = plugins.to_string();
    assert!(
        text.contains("wasi:http/outgoing-handler") && text.contains("[grants.records]"),
        "{text}"
    );
    d.interrupt();
}
