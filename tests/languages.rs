//! Plugins written in other languages, built from source by `cargo xtask
//! plugins`, running in the real daemon: a retry, a requeue-after and a status
//! write each.

use std::path::Path;
use std::time::Duration;

mod support;

use support::{Daemon, eventually, http, plugin};

/// A cold load compiles an 18 MB component: allow for it on a busy machine.
const LIMIT: Duration = Duration::from_secs(180);

fn start(home: &Path, component: &Path) -> (Daemon, String) {
    let config = format!(
        r#"
[store]
in-memory = true

[api]
listen = "127.0.0.1:0"

[[plugin]]
path = "{}"
workers = 2
[plugin.retry]
min-backoff = "10ms"
max-backoff = "50ms"
jitter = 0.0
"#,
        component.display()
    );
    let path = home.join("setpoint.toml");
    std::fs::write(&path, config).unwrap();
    let mut daemon = Daemon::start_in(home, &["--config", path.to_str().unwrap()]);
    let url = daemon.url();
    (daemon, url)
}

/// Apply the three objects and check what the engine did with each.
fn retry_requeue_and_status(url: &str, controller: &str) {
    let objects = "kind: Greeting\nmetadata: {name: plain}\nspec: {who: plain}\n---\n\
                   kind: Greeting\nmetadata: {name: retried}\nspec: {who: retried, fail_until_attempt: 2}\n---\n\
                   kind: Greeting\nmetadata: {name: requeued}\nspec: {who: requeued, requeue_after_ms: 100}\n";
    let applied = http(
        "POST",
        &format!("{url}/v1/apply"),
        &[("Content-Type", "application/yaml")],
        Some(objects),
    );
    assert_eq!(applied.status, 200, "{}", applied.body);
    let waited = http("GET", &format!("{url}/v1/wait?timeout=180s"), &[], None);
    assert_eq!(waited.status, 200, "{}", waited.body);

    let plain = http(
        "GET",
        &format!("{url}/v1/objects/Greeting/plain"),
        &[],
        None,
    )
    .json();
    assert_eq!(plain["status"]["greeting"], "Hello, plain!", "{plain}");
    let retried = http(
        "GET",
        &format!("{url}/v1/objects/Greeting/retried"),
        &[],
        None,
    )
    .json();
    assert_eq!(
        retried["status"]["greeting"], "Hello, retried!",
        "{retried}"
    );
    eventually(
        "the requeued object is reconciled again and again",
        LIMIT,
        || {
            let c = http("GET", &format!("{url}/v1/controllers"), &[], None).json();
            let c = &c[0];
            assert_eq!(c["name"], controller);
            // plain 1 + retried 1 + requeued at least 3.
            c["failures"] == 2 && c["successes"].as_u64().unwrap() >= 5
        },
    );
    let metrics = http("GET", &format!("{url}/metrics"), &[], None).body;
    let retries = format!("workqueue_retries_total{{controller=\"{controller}\"}} 2");
    assert!(metrics.contains(&retries), "{retries} in {metrics}");
}

#[test]
fn a_python_plugin_retries_requeues_and_writes_status_in_the_real_host() {
    let home = tempfile::tempdir().unwrap();
    let (mut daemon, url) = start(home.path(), &plugin("hello-py"));
    // An 18 MB component compiles for seconds on its first load: the log says so.
    daemon.wait_for("MB component: 1s so far (first load only");
    retry_requeue_and_status(&url, "hello-py");
    assert!(daemon.interrupt().success());
}

#[test]
fn a_javascript_plugin_retries_requeues_and_writes_status_in_the_real_host() {
    let home = tempfile::tempdir().unwrap();
    let (mut daemon, url) = start(home.path(), &plugin("hello-js"));
    retry_requeue_and_status(&url, "hello-js");
    assert!(daemon.interrupt().success());
}
