//! The daemon end to end: the real `setpoint` binary, driven over HTTP by a real
//! client (and by its own CLI), with the real example plugins and a store on disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod support;

use support::{Daemon, Http, eventually, http, plugin, setpoint, texts};

const LIMIT: Duration = Duration::from_secs(60);

/// A configuration in `home`: hello, files (writing to home/files) and hostile
/// (one worker), the store in home/store.redb. `top` goes before the tables,
/// `api` into `[api]`.
fn config(home: &Path, top: &str, api: &str) -> PathBuf {
    let text = format!(
        r#"{top}
[store]
path = "{store}"

[api]
listen = "127.0.0.1:0"
{api}

[[plugin]]
path = "{hello}"

[[plugin]]
path = "{files}"
[plugin.grants]
dirs = [{{ host = "{data}", guest = "/data" }}]

[[plugin]]
path = "{hostile}"
workers = 1
"#,
        store = home.join("store.redb").display(),
        data = home.join("files").display(),
        hello = plugin("hello").display(),
        files = plugin("files").display(),
        hostile = plugin("hostile").display(),
    );
    let path = home.join("setpoint.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A daemon on `config(home, top, api)`.
fn daemon(home: &Path, top: &str, api: &str) -> (Daemon, String) {
    let config = config(home, top, api);
    let mut d = Daemon::start_in(home, &["--config", config.to_str().unwrap()]);
    let url = d.url();
    (d, url)
}

const YAML: (&str, &str) = ("Content-Type", "application/yaml");
const JSON: (&str, &str) = ("Content-Type", "application/json");

fn get(url: &str) -> Http {
    http("GET", url, &[], None)
}

fn apply(url: &str, yaml: &str) -> Http {
    http("POST", &format!("{url}/v1/apply"), &[YAML], Some(yaml))
}

fn wait(url: &str, query: &str) -> Http {
    get(&format!("{url}/v1/wait?timeout=60s&{query}"))
}

fn file(name: &str, content: &str) -> String {
    format!("kind: File\nmetadata:\n  name: {name}\nspec:\n  content: {content:?}\n---\n")
}

#[test]
fn apply_reconciles_to_done_and_delete_runs_the_finalizer_before_the_object_goes() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let answer = apply(&url, &file("motd", "hi\n"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()[0]["result"], "created");
    assert_eq!(wait(&url, "kind=File&name=motd").status, 200);

    let status = get(&format!("{url}/v1/objects/File/motd/status")).json();
    assert_eq!(status["phase"], "done", "{status}");
    assert_eq!(status["observedGeneration"], 1);
    let written = home.path().join("files/_default/motd");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "hi\n");
    let object = get(&format!("{url}/v1/objects/File/motd")).json();
    assert_eq!(object["metadata"]["finalizers"][0], "setpoint.dev/files");
    assert_eq!(
        object["status"]["bytes"], 3,
        "the plugin's status: {object}"
    );

    let yaml = http(
        "GET",
        &format!("{url}/v1/objects/File/motd"),
        &[("Accept", "application/yaml")],
        None,
    );
    assert!(
        yaml.body
            .starts_with("apiVersion: setpoint.dev/v1\nkind: File\n"),
        "{}",
        yaml.body
    );
    let plugins = get(&format!("{url}/v1/plugins")).json();
    let files = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "files")
        .unwrap();
    assert_eq!(files["kinds"][0], "File");
    assert_eq!(files["prune"], true);
    assert_eq!(files["sha256"].as_str().unwrap().len(), 64);

    let deleting = http("DELETE", &format!("{url}/v1/objects/File/motd"), &[], None);
    assert_eq!(deleting.status, 202, "{}", deleting.body);
    assert!(deleting.json()["metadata"]["deletionTimestamp"].is_u64());
    assert_eq!(wait(&url, "kind=File&name=motd").status, 200);
    let gone = get(&format!("{url}/v1/objects/File/motd"));
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert!(
        !written.exists(),
        "the plugin removed the file before the object went"
    );
    assert!(d.interrupt().success());
}

#[test]
fn a_full_reconciliation_prunes_a_stray_and_keeps_what_is_wanted() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    apply(&url, &file("keep", "k"));
    assert_eq!(wait(&url, "kind=File").status, 200);
    let stray = home.path().join("files/stray");
    std::fs::write(&stray, "nobody wants me").unwrap();
    let kept = home.path().join("files/_default/keep");
    std::fs::write(&kept, "edited behind Setpoint's back").unwrap();

    let report = http(
        "POST",
        &format!("{url}/v1/controllers/files/full-reconcile"),
        &[],
        None,
    );
    assert_eq!(report.status, 200, "{}", report.body);
    let report = report.json();
    assert_eq!(report["prune"]["result"], "done", "{report}");
    assert_eq!(report["desired"], 1);
    assert!(!stray.exists(), "the stray file was pruned");
    eventually(
        "the edited file is found out of sync and restored",
        LIMIT,
        || {
            let files = get(&format!("{url}/v1/controllers")).json();
            files[0]["out-of-sync"] == 1 && std::fs::read_to_string(&kept).unwrap() == "k"
        },
    );
    let metrics = get(&format!("{url}/metrics")).body;
    for line in [
        "setpoint_full_reconciliation_out_of_sync_total{controller=\"files\"} 1",
        "setpoint_full_reconciliations_total{controller=\"files\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    let missing = http(
        "POST",
        &format!("{url}/v1/controllers/nope/full-reconcile"),
        &[],
        None,
    );
    assert_eq!(missing.status, 404);
    assert!(
        missing.body.contains("running: files, hello, hostile"),
        "{}",
        missing.body
    );
    assert!(d.interrupt().success());
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_object_and_finishes_pending_work_after_restart() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    // Slow objects on one worker (6 s of work): most are still pending when
    // the process dies, however slowly the writer below gets its 20 writes
    // in (with 25 ms each, a busy CI machine once finished them all first).
    let slow: String = (0..40)
        .map(|i| {
            format!(
                "kind: Hostile\nmetadata: {{name: s{i}}}\nspec: {{mode: slow, delay-ms: 150}}\n---\n"
            )
        })
        .collect();
    assert_eq!(apply(&url, &slow).status, 200);
    for i in 0..5 {
        let deleting = http(
            "DELETE",
            &format!("{url}/v1/objects/Hostile/s{i}"),
            &[],
            None,
        );
        assert_eq!(deleting.status, 202, "{}", deleting.body);
    }
    // A writer applies one object per request while the daemon is killed.
    let writer = {
        let url = url.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let sent = agent
                    .post(format!("{url}/v1/apply"))
                    .header("Content-Type", "application/yaml")
                    .send(format!(
                        "kind: Greeting\nmetadata: {{name: g{i}}}\nspec: {{who: g{i}}}\n"
                    ));
                match sent {
                    Ok(r) if r.status() == 200 => acknowledged.push(format!("g{i}")),
                    _ => return acknowledged,
                }
            }
            unreachable!()
        })
    };
    eventually("the writer has written", LIMIT, || {
        let list = get(&format!("{url}/v1/objects/Greeting"));
        list.json().as_array().is_some_and(|a| a.len() >= 20)
    });
    let statuses = get(&format!("{url}/v1/status?kind=Hostile")).json();
    let pending = statuses
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["phase"] == "pending")
        .count();
    d.kill9();
    let acknowledged = writer.join().unwrap();
    assert!(pending > 0, "some Hostile objects were pending at the kill");
    assert!(acknowledged.len() >= 20);

    let (mut d, url) = daemon(home.path(), "", "");
    assert_eq!(
        wait(&url, "").status,
        200,
        "everything reconciled after the restart"
    );
    let greetings = get(&format!("{url}/v1/objects/Greeting")).json();
    let names: Vec<&str> = greetings
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    for name in &acknowledged {
        assert!(
            names.contains(&name.as_str()),
            "{name} was acknowledged and lost"
        );
    }
    let hostile = get(&format!("{url}/v1/objects/Hostile")).json();
    let names: Vec<&str> = hostile
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        35,
        "the 5 deletes finished, the rest stayed: {names:?}"
    );
    assert!(!names.contains(&"s0"));
    let all = get(&format!("{url}/v1/status")).json();
    assert!(
        all.as_array().unwrap().iter().all(|s| s["phase"] == "done"),
        "{all}"
    );
    assert!(d.interrupt().success());
}

#[test]
fn cloudevents_apply_delete_and_reconcile_in_binary_and_structured_mode() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let events = format!("{url}/v1/events");
    // Binary mode: attributes in ce-* headers, the object as the body.
    let binary = http(
        "POST",
        &events,
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/tests"),
            ("ce-type", "dev.setpoint.object.apply"),
            JSON,
        ],
        Some(r#"{"kind":"Greeting","metadata":{"name":"ce"},"spec":{"who":"events"}}"#),
    );
    assert_eq!(binary.status, 202, "{}", binary.body);
    assert_eq!(binary.json()["key"], "Greeting:ce");
    assert_eq!(wait(&url, "kind=Greeting&name=ce").status, 200);
    let object = get(&format!("{url}/v1/objects/Greeting/ce")).json();
    assert_eq!(object["status"]["greeting"], "Hello, events!");

    // Structured mode: the whole event as JSON.
    let reconcile = http(
        "POST",
        &events,
        &[("Content-Type", "application/cloudevents+json")],
        Some(
            r#"{"specversion":"1.0","id":"2","source":"/tests","type":"dev.setpoint.reconcile","subject":"Greeting:ce"}"#,
        ),
    );
    assert_eq!(reconcile.status, 202, "{}", reconcile.body);
    assert_eq!(reconcile.json()["result"], "queued");
    let delete = http(
        "POST",
        &events,
        &[("Content-Type", "application/cloudevents+json")],
        Some(
            r#"{"specversion":"1.0","id":"3","source":"/tests","type":"dev.setpoint.object.delete","subject":"Greeting:ce"}"#,
        ),
    );
    assert_eq!(delete.status, 202, "{}", delete.body);
    assert_eq!(wait(&url, "kind=Greeting&name=ce").status, 200);
    assert_eq!(get(&format!("{url}/v1/objects/Greeting/ce")).status, 404);

    // Not an event, and an event of a type nobody maps.
    let junk = http("POST", &events, &[JSON], Some(r#"{"hello":1}"#));
    assert_eq!(junk.status, 400);
    assert!(
        junk.json()["error"]
            .as_str()
            .unwrap()
            .contains("not a CloudEvent"),
        "{}",
        junk.body
    );
    let unknown = http(
        "POST",
        &events,
        &[("Content-Type", "application/cloudevents+json")],
        Some(r#"{"specversion":"1.0","id":"4","source":"/t","type":"com.example.nope"}"#),
    );
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.body.contains("dev.setpoint.object.apply"),
        "{}",
        unknown.body
    );
    assert!(d.interrupt().success());
}

#[test]
fn bad_input_gets_a_clear_4xx_and_nothing_is_stored_half_way() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "max-body-bytes = 4096");
    let error = |h: &Http| h.json()["error"].as_str().unwrap().to_string();

    let bad_yaml = apply(&url, "kind: File\nmetadata: [oops");
    assert_eq!(bad_yaml.status, 400);
    assert!(
        error(&bad_yaml).contains("not valid YAML"),
        "{}",
        bad_yaml.body
    );

    let bad_json = http(
        "POST",
        &format!("{url}/v1/apply"),
        &[JSON],
        Some("{\"kind\": "),
    );
    assert_eq!(bad_json.status, 400);
    assert!(
        error(&bad_json).contains("not valid JSON"),
        "{}",
        bad_json.body
    );

    let unknown_field = apply(&url, "kind: File\nmetadata: {name: a, nmae: b}\n");
    assert_eq!(unknown_field.status, 400);
    assert!(
        error(&unknown_field).contains("nmae"),
        "{}",
        unknown_field.body
    );

    let unknown_kind = apply(&url, "kind: Gizmo\nmetadata: {name: a}\n");
    assert_eq!(unknown_kind.status, 422);
    assert!(
        error(&unknown_kind).contains("File, Greeting, Hostile"),
        "{}",
        unknown_kind.body
    );

    // Names follow Kubernetes' grammar; a refusal states the rule and stores nothing.
    for (manifest, field, rule) in [
        (
            "kind: File\nmetadata: {name: '.'}\n",
            "metadata.name",
            "DNS-1123 subdomain",
        ),
        (
            "kind: File\nmetadata: {name: '..'}\n",
            "metadata.name",
            "DNS-1123 subdomain",
        ),
        (
            "kind: File\nmetadata: {name: My_File}\n",
            "metadata.name",
            "DNS-1123 subdomain",
        ),
        (
            "kind: File\nmetadata: {name: a, namespace: '..'}\n",
            "metadata.namespace",
            "DNS-1123 subdomain",
        ),
        (
            "kind: File\nmetadata: {name: a, labels: {'-team': x}}\n",
            "label key",
            "optional prefix",
        ),
        (
            "kind: File\nmetadata: {name: a, labels: {team: 'a b'}}\n",
            "value of label \"team\"",
            "at most 63",
        ),
    ] {
        let refused = apply(&url, manifest);
        assert_eq!(refused.status, 400, "{manifest}: {}", refused.body);
        let message = error(&refused);
        assert!(message.contains(field), "{manifest}: {message}");
        assert!(message.contains(rule), "{manifest}: {message}");
    }
    let long_name = apply(&url, &file(&"n".repeat(3000), "x"));
    assert_eq!(long_name.status, 400);
    assert!(
        error(&long_name).len() < 600,
        "quotes a long name shortened: {}",
        long_name.body
    );
    assert!(
        get(&format!("{url}/v1/objects/File"))
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );

    let huge = file("big", &"x".repeat(5000));
    let too_big = apply(&url, &huge);
    assert_eq!(too_big.status, 413);
    assert!(
        error(&too_big).contains("max-body-bytes"),
        "{}",
        too_big.body
    );

    // One good object and one of an unknown kind: neither is stored.
    let mixed = apply(
        &url,
        &format!("{}kind: Gizmo\nmetadata: {{name: g}}\n", file("half", "h")),
    );
    assert_eq!(mixed.status, 422);
    assert_eq!(get(&format!("{url}/v1/objects/File/half")).status, 404);

    // Optimistic concurrency on resourceVersion.
    // The plugin's status write bumps resourceVersion too: read it once the
    // object is reconciled, when nothing else writes it.
    assert_eq!(apply(&url, &file("a", "1")).status, 200);
    assert_eq!(wait(&url, "kind=File&name=a").status, 200);
    let version = get(&format!("{url}/v1/objects/File/a")).json()["metadata"]["resourceVersion"]
        .as_u64()
        .unwrap();
    let stale = format!(
        "kind: File\nmetadata: {{name: a, resourceVersion: {}}}\nspec: {{content: two}}\n",
        version + 100
    );
    let conflict = http(
        "PUT",
        &format!("{url}/v1/objects/File/a"),
        &[YAML],
        Some(&stale),
    );
    assert_eq!(conflict.status, 409);
    assert!(
        error(&conflict).contains("read it again"),
        "{}",
        conflict.body
    );
    let current = stale.replace(&(version + 100).to_string(), &version.to_string());
    let updated = http(
        "PUT",
        &format!("{url}/v1/objects/File/a"),
        &[YAML],
        Some(&current),
    );
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.json()["metadata"]["generation"], 2);
    let exists = http(
        "POST",
        &format!("{url}/v1/objects"),
        &[YAML],
        Some(&file("a", "1")),
    );
    assert_eq!(exists.status, 409);

    let no_route = get(&format!("{url}/v1/nothing"));
    assert_eq!(no_route.status, 404);
    assert!(error(&no_route).contains("no route GET /v1/nothing"));
    assert!(d.interrupt().success());
}

#[test]
fn watch_streams_applies_statuses_and_removals_as_server_sent_events() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let (tx, lines) = std::sync::mpsc::channel();
    {
        let url = url.clone();
        std::thread::spawn(move || {
            let mut response = ureq::get(format!("{url}/v1/watch?kind=Greeting"))
                .call()
                .unwrap();
            let reader = std::io::BufReader::new(response.body_mut().as_reader());
            for line in std::io::BufRead::lines(reader).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    // The watch is open once a change made after it shows up; apply until then.
    let mut seen = Vec::new();
    let next = |seen: &mut Vec<String>| {
        let line = lines.recv_timeout(LIMIT).expect("an event line");
        seen.push(line.clone());
        line
    };
    for attempt in 0.. {
        apply(
            &url,
            &format!("kind: Greeting\nmetadata: {{name: w{attempt}}}\nspec: {{who: w}}\n"),
        );
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                seen.push(line);
                break;
            }
            Err(_) => assert!(attempt < 100, "the watch never answered"),
        }
    }
    while !seen.iter().any(|l| l == "event: status") {
        next(&mut seen);
    }
    http(
        "DELETE",
        &format!("{url}/v1/objects/Greeting/w0"),
        &[],
        None,
    );
    while !seen.iter().any(|l| l == "event: removed") {
        next(&mut seen);
    }
    assert!(seen.iter().any(|l| l == "event: applied"), "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("data: ") && l.contains("\"phase\":\"done\"")),
        "{seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("\"kind\":\"File\"")),
        "filtered by kind"
    );
    assert!(d.interrupt().success());
}

#[test]
fn a_watched_manifest_folder_is_applied_on_change_and_a_removed_file_deletes_its_object() {
    let home = tempfile::tempdir().unwrap();
    let manifests = home.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("a.yaml"), file("from-a", "a")).unwrap();
    let top = format!("manifests = [\"{}\"]", manifests.display());
    let (mut d, url) = daemon(home.path(), &top, "");
    assert_eq!(wait(&url, "kind=File&name=from-a").status, 200);

    std::fs::write(
        manifests.join("b.json"),
        r#"{"kind":"File","metadata":{"name":"from-b"},"spec":{"content":"b"}}"#,
    )
    .unwrap();
    eventually("b.json is applied", LIMIT, || {
        get(&format!("{url}/v1/objects/File/from-b")).status == 200
    });
    std::fs::write(manifests.join("a.yaml"), file("from-a", "changed")).unwrap();
    eventually("a.yaml's change is applied", LIMIT, || {
        let o = get(&format!("{url}/v1/objects/File/from-a"));
        o.status == 200 && o.json()["metadata"]["generation"] == 2
    });
    std::fs::remove_file(manifests.join("a.yaml")).unwrap();
    eventually("from-a is deleted", LIMIT, || {
        get(&format!("{url}/v1/objects/File/from-a")).status == 404
    });
    assert!(!home.path().join("files/_default/from-a").exists());
    assert!(d.interrupt().success());
}

/// Run the CLI against the daemon at `url`: (success, stdout, stderr).
fn cli(home: &Path, url: &str, args: &[&str]) -> (bool, String, String) {
    let output = setpoint(&home.join("cache"))
        .args(["--server", url])
        .args(args)
        .output()
        .unwrap();
    let (out, err) = texts(&output);
    (output.status.success(), out, err)
}

/// One controller's status model, from `GET /v1/controllers`.
fn controller(url: &str, name: &str) -> serde_json::Value {
    get(&format!("{url}/v1/controllers"))
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no controller {name}"))
}

fn hostile(url: &str) -> serde_json::Value {
    controller(url, "hostile")
}

#[test]
fn a_forced_delete_removes_an_object_whose_finalizer_cannot_complete() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let cli = |args: &[&str]| cli(home.path(), &url, args);
    // `fail` fails every reconcile, the delete too: the finalizer never goes.
    let stuck = "kind: Hostile\nmetadata: {name: stuck}\nspec: {mode: fail}\n";
    assert_eq!(apply(&url, stuck).status, 200);
    let stuck_url = format!("{url}/v1/objects/Hostile/stuck");
    assert_eq!(http("DELETE", &stuck_url, &[], None).status, 202);
    eventually("the plugin failed a few times", LIMIT, || {
        hostile(&url)["failures"].as_u64().unwrap() >= 3
    });
    let object = get(&stuck_url).json();
    assert!(object["metadata"]["deletionTimestamp"].is_u64(), "{object}");

    let (ok, out, err) = cli(&["delete", "Hostile", "stuck", "--force"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "Hostile:stuck removed by force, dropping finalizers: setpoint.dev/hostile"
    );
    assert_eq!(get(&stuck_url).status, 404);
    assert_eq!(wait(&url, "kind=Hostile&name=stuck").status, 200);
    // Its controller forgets the key: no retry stays pending (and with
    // nothing queued or in flight, none can run later).
    eventually("the controller forgot the key", LIMIT, || {
        let c = hostile(&url);
        c["pending-timers"] == 0 && c["queue-depth"] == 0 && c["in-flight"] == 0
    });

    let line = d.wait_for("force-deleted");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("Hostile:stuck"), "{line}");
    assert!(line.contains("setpoint.dev/hostile"), "{line}");

    // Over the API: an object not even deleting yet; the answer lists what went.
    let ok = "kind: Hostile\nmetadata: {name: fine, namespace: team-a}\nspec: {mode: ok}\n";
    assert_eq!(apply(&url, ok).status, 200);
    let fine_url = format!("{url}/v1/objects/Hostile/fine?namespace=team-a");
    let forced = http("DELETE", &format!("{fine_url}&force=true"), &[], None);
    assert_eq!(forced.status, 200, "{}", forced.body);
    assert_eq!(
        forced.json(),
        serde_json::json!({
            "key": "Hostile:team-a/fine",
            "removed": true,
            "forced": true,
            "droppedFinalizers": ["setpoint.dev/hostile"],
        })
    );
    assert_eq!(get(&fine_url).status, 404);
    let again = http("DELETE", &format!("{fine_url}&force=true"), &[], None);
    assert_eq!(again.status, 404, "{}", again.body);
    assert!(
        again.json()["error"]
            .as_str()
            .unwrap()
            .contains("not found")
    );

    let metrics = get(&format!("{url}/metrics")).body;
    assert!(
        metrics.contains("setpoint_forced_deletes_total{kind=\"Hostile\"} 2\n"),
        "{metrics}"
    );
    assert!(d.interrupt().success());
}

#[test]
fn the_cli_applies_gets_waits_for_and_deletes_through_the_api() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let cli = |args: &[&str]| cli(home.path(), &url, args);
    let dir = home.path().join("objects");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("greetings.yaml"),
        "kind: Greeting\nmetadata: {name: cli, labels: {team: core}}\nspec: {who: CLI}\n",
    )
    .unwrap();
    std::fs::write(dir.join("file.yaml"), file("cli", "c")).unwrap();

    let (ok, out, err) = cli(&["apply", "-f", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("Greeting:cli created"), "{out}");
    assert!(out.contains("File:cli created"), "{out}");
    let (ok, out, err) = cli(&["wait", "--timeout", "60s"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "reconciled");
    let (ok, out, err) = cli(&["get", "Greeting", "-l", "team=core"]);
    assert!(ok, "{err}");
    assert!(out.contains("greeting: Hello, CLI!"), "{out}");
    let (ok, out, _) = cli(&["status", "Greeting", "cli"]);
    assert!(ok);
    assert!(
        out.contains("Greeting:cli") && out.contains("done"),
        "{out}"
    );
    let (ok, out, err) = cli(&["delete", "File", "cli", "--wait"]);
    assert!(ok, "{err}");
    assert!(out.contains("File:cli removed"), "{out}");

    let (ok, _, err) = cli(&["get", "Greeting", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("(404): object Greeting:nope not found"),
        "{err}"
    );
    let stopped = setpoint(&home.path().join("cache"))
        .args(["--server", "http://127.0.0.1:9", "status"])
        .output()
        .unwrap();
    let (_, err) = texts(&stopped);
    assert!(err.contains("Is `setpoint run` running there?"), "{err}");
    assert!(d.interrupt().success());
}

#[test]
fn admission_refuses_a_spec_that_does_not_fit_naming_the_field_and_stores_nothing() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let greeting = |name: &str, spec: &str| {
        format!("kind: Greeting\nmetadata:\n  name: {name}\nspec: {spec}\n---\n")
    };
    // A good one and a bad one in one apply: all or none.
    let both = greeting("good", "{who: readers}") + &greeting("bad", "{who: 5}");
    let answer = apply(&url, &both);
    assert_eq!(answer.status, 422, "{}", answer.body);
    let error = answer.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("Greeting:bad was refused by plugin hello"),
        "{error}"
    );
    assert!(
        error.contains("spec.who: invalid type: integer `5`"),
        "{error}"
    );
    assert!(error.contains("Nothing was stored"), "{error}");
    for name in ["good", "bad"] {
        assert_eq!(
            get(&format!("{url}/v1/objects/Greeting/{name}")).status,
            404
        );
    }
    // No spec at all: the missing field is named.
    let answer = http(
        "POST",
        &format!("{url}/v1/objects"),
        &[JSON],
        Some(r#"{"kind":"Greeting","metadata":{"name":"empty"}}"#),
    );
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert!(
        answer.body.contains("missing field `who`"),
        "{}",
        answer.body
    );
    // A fitting spec is admitted and reconciled.
    assert_eq!(apply(&url, &greeting("good", "{who: readers}")).status, 200);
    assert_eq!(wait(&url, "kind=Greeting&name=good").status, 200);
    assert!(d.interrupt().success());
}

#[test]
fn an_object_whose_spec_does_not_decode_can_still_be_deleted() {
    // Manifest folders do not go through admission: a spec written before the
    // plugin checked specs (or by hand) can still be stored.
    let home = tempfile::tempdir().unwrap();
    let manifests = home.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("bad.yaml"),
        "kind: Greeting\nmetadata:\n  name: bad\nspec: {who: 5}\n",
    )
    .unwrap();
    let top = format!("manifests = [\"{}\"]", manifests.display());
    let (mut d, url) = daemon(home.path(), &top, "");
    let status = format!("{url}/v1/objects/Greeting/bad/status");
    eventually("the bad spec fails for good", LIMIT, || {
        let s = get(&status);
        s.status == 200 && s.json()["phase"] == "error"
    });
    let last = get(&status).json()["lastError"].to_string();
    assert!(
        last.contains("spec.who"),
        "the error names the field: {last}"
    );
    let deleted = http(
        "DELETE",
        &format!("{url}/v1/objects/Greeting/bad"),
        &[],
        None,
    );
    assert!(deleted.status < 300, "{}", deleted.body);
    eventually(
        "the delete reached the plugin and the object is gone",
        LIMIT,
        || get(&format!("{url}/v1/objects/Greeting/bad")).status == 404,
    );
    assert!(d.interrupt().success());
}

#[test]
fn wait_fails_at_once_on_an_object_that_failed_for_good_and_still_waits_for_a_retry() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let cli = |args: &[&str]| {
        let started = std::time::Instant::now();
        let output = setpoint(&home.path().join("cache"))
            .args(["--server", &url])
            .args(args)
            .output()
            .unwrap();
        let (out, err) = texts(&output);
        (output.status.success(), out, err, started.elapsed())
    };
    // An unknown mode is a fatal error in `hostile`: never retried. `fail`
    // fails with a retry every time (giving up only after ~100 s of back-off).
    let objects = "kind: Hostile\nmetadata: {name: broken}\nspec: {mode: bogus}\n---\n\
                   kind: Hostile\nmetadata: {name: retrying}\nspec: {mode: fail}\n";
    assert_eq!(apply(&url, objects).status, 200);

    for args in [
        &["wait", "Hostile", "broken", "--timeout", "60s"][..],
        &["wait", "Hostile", "--timeout", "60s"],
        &["wait", "--timeout", "60s"],
    ] {
        let (ok, _, err, took) = cli(args);
        assert!(!ok, "{args:?}: {err}");
        assert!(
            took < Duration::from_secs(30),
            "{args:?} took {took:?}: {err}"
        );
        assert!(
            err.contains("1 object(s) failed and will not be retried"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("Hostile:broken: unknown mode \"bogus\""),
            "{args:?}: {err}"
        );
        assert!(!err.contains("Hostile:retrying"), "{args:?}: {err}");
    }
    // The object that will be retried is waited for, to the timeout.
    let (ok, _, err, took) = cli(&["wait", "Hostile", "retrying", "--timeout", "2s"]);
    assert!(!ok);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(err.contains("1 object(s) not reconciled after 2s"), "{err}");
    assert!(
        err.contains("Hostile:retrying: error (failing on purpose"),
        "{err}"
    );
    // --keep-waiting: so is the one that failed for good.
    let (ok, _, err, took) = cli(&[
        "wait",
        "Hostile",
        "broken",
        "--keep-waiting",
        "--timeout",
        "1s",
    ]);
    assert!(!ok);
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(err.contains("not reconciled after 1s"), "{err}");
    assert!(err.contains("Hostile:broken: error (unknown mode"), "{err}");
    let (ok, out, _, _) = cli(&["status", "Hostile"]);
    assert!(ok);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("Hostile:{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(line("broken").contains(" failed "), "{out}");
    assert!(line("retrying").contains(" error "), "{out}");

    // Over the API: 409 at once with the status, 504 with keepWaiting=true.
    let failed = wait(&url, "kind=Hostile&name=broken");
    assert_eq!(failed.status, 409, "{}", failed.body);
    let body = failed.json();
    assert_eq!(body["reconciled"], false);
    assert_eq!(body["failed"][0]["key"], "Hostile:broken");
    assert_eq!(body["failed"][0]["status"]["terminal"], true);
    assert_eq!(body["failed"][0]["status"]["phase"], "error");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("keepWaiting=true"), "{error}");
    let kept = get(&format!(
        "{url}/v1/wait?kind=Hostile&name=broken&keepWaiting=true&timeout=500ms"
    ));
    assert_eq!(kept.status, 504, "{}", kept.body);
    let retrying = get(&format!("{url}/v1/objects/Hostile/retrying/status")).json();
    assert_eq!(retrying["terminal"], false, "{retrying}");
    let bad = get(&format!("{url}/v1/wait?kind=Hostile&keepWaiting=yes"));
    assert_eq!(bad.status, 400, "{}", bad.body);

    // Fixed, it is reconciled, and the wait succeeds.
    let fixed = "kind: Hostile\nmetadata: {name: broken}\nspec: {mode: ok}\n";
    assert_eq!(apply(&url, fixed).status, 200);
    let (ok, out, err, _) = cli(&["wait", "Hostile", "broken", "--timeout", "60s"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "reconciled");
    assert!(d.interrupt().success());
}

#[test]
fn plugins_load_swap_roll_back_and_unload_at_runtime_and_a_broken_one_is_reported() {
    let home = tempfile::tempdir().unwrap();
    let path = config(home.path(), "", "");
    // A plugin of the wrong world in the configuration: reported, not fatal.
    let broken = support::root().join("tests/fixtures/wrong-world.wat");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[[plugin]]\npath = \"{}\"\nkinds = [\"Broken\"]\n",
        broken.display()
    ));
    std::fs::write(&path, text).unwrap();
    let mut d = support::Daemon::start_in(home.path(), &["--config", path.to_str().unwrap()]);
    let url = d.url();
    let cli = |args: &[&str]| cli(home.path(), &url, args);
    let (ok, out, err) = cli(&["plugin", "ls"]);
    assert!(ok, "{err}");
    let broken_line = out.lines().find(|l| l.starts_with("wrong-world")).unwrap();
    assert!(broken_line.contains("failed"), "{out}");
    assert!(broken_line.contains("it is not a Setpoint plugin"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("hello ") && l.contains("running")),
        "{out}"
    );
    // Its manifest declares its kinds: their objects are kept, pending, not
    // refused; a kind nobody declares still is.
    let waiting = "kind: Broken\nmetadata:\n  name: waits\nspec: {}\n";
    assert_eq!(apply(&url, waiting).status, 200);
    let status = get(&format!("{url}/v1/objects/Broken/waits/status")).json();
    assert_eq!(status["phase"], "pending", "{status}");
    let unknown = "kind: Nobody\nmetadata:\n  name: x\nspec: {}\n";
    assert_eq!(apply(&url, unknown).status, 422);

    // Greetings are served by the Rust hello.
    let greeting = "kind: Greeting\nmetadata:\n  name: swapped\nspec: {who: swaps}\n";
    assert_eq!(apply(&url, greeting).status, 200);
    assert_eq!(wait(&url, "kind=Greeting&name=swapped").status, 200);
    let rust_sha = get(&format!("{url}/v1/plugins/hello")).json()["sha256"].clone();

    // A swap to a version that fails leaves the running one and says why.
    let refused = http(
        "POST",
        &format!("{url}/v1/plugins/hello/swap"),
        &[JSON],
        Some(&format!("{{\"path\": \"{}\"}}", broken.display())),
    );
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.body.contains("it is not a Setpoint plugin"),
        "{}",
        refused.body
    );
    assert_eq!(
        get(&format!("{url}/v1/plugins/hello")).json()["sha256"],
        rust_sha
    );

    // Swap the Rust hello for the Python one: same controller, same kind.
    let py = plugin("hello-py");
    let (ok, out, err) = cli(&["plugin", "swap", "hello", py.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.starts_with("hello running:"), "{out}");
    let view = get(&format!("{url}/v1/plugins/hello")).json();
    assert_ne!(view["sha256"], rust_sha, "{view}");
    let changed = "kind: Greeting\nmetadata:\n  name: swapped\nspec: {who: python}\n";
    assert_eq!(apply(&url, changed).status, 200);
    assert_eq!(wait(&url, "kind=Greeting&name=swapped").status, 200);
    let object = get(&format!("{url}/v1/objects/Greeting/swapped")).json();
    assert_eq!(object["status"]["greeting"], "Hello, python!", "{object}");
    let hello = controller(&url, "hello");
    assert_eq!(hello["plugin-version"], view["version"], "{hello}");

    // And for the JavaScript one.
    let js = plugin("hello-js");
    let (ok, _, err) = cli(&["plugin", "swap", "hello", js.to_str().unwrap()]);
    assert!(ok, "{err}");
    let changed = "kind: Greeting\nmetadata:\n  name: swapped\nspec: {who: javascript}\n";
    assert_eq!(apply(&url, changed).status, 200);
    assert_eq!(wait(&url, "kind=Greeting&name=swapped").status, 200);
    let object = get(&format!("{url}/v1/objects/Greeting/swapped")).json();
    assert_eq!(
        object["status"]["greeting"], "Hello, javascript!",
        "{object}"
    );

    // Roll back to the Rust version, without recompiling.
    let prefix = &rust_sha.as_str().unwrap()[..12];
    let (ok, _, err) = cli(&["plugin", "rollback", "hello", "--to", prefix]);
    assert!(ok, "{err}");
    assert_eq!(
        get(&format!("{url}/v1/plugins/hello")).json()["sha256"],
        rust_sha
    );
    let (ok, out, _) = cli(&["plugin", "history", "hello"]);
    assert!(ok);
    let states: Vec<(&str, bool)> = out
        .lines()
        .skip(1)
        .map(|l| {
            let columns: Vec<&str> = l.split_whitespace().collect();
            (columns[2], columns.get(3) == Some(&"yes"))
        })
        .collect();
    // Rust (no longer kept compiled: three are), the refused swap, Python,
    // JavaScript, Rust again (active).
    assert_eq!(
        states,
        [
            ("forgotten", false),
            ("failed", false),
            ("loaded", false),
            ("loaded", false),
            ("loaded", true)
        ],
        "{out}"
    );
    let metrics = get(&format!("{url}/metrics")).body;
    let rust = rust_sha.as_str().unwrap();
    for line in [
        "setpoint_plugin_swaps_total{controller=\"hello\",result=\"swapped\"} 2".to_string(),
        "setpoint_plugin_swaps_total{controller=\"hello\",result=\"refused\"} 1".to_string(),
        "setpoint_plugin_rollbacks_total{controller=\"hello\"} 1".to_string(),
        "setpoint_plugin_load_failures_total{controller=\"wrong-world\"} 1".to_string(),
        format!(
            "setpoint_plugin_active_info{{controller=\"hello\",version=\"0.1.0\",sha256=\"{rust}\"}} 1"
        ),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    assert_eq!(
        metrics
            .matches("setpoint_plugin_active_info{controller=\"hello\"")
            .count(),
        1
    );
    let hello = controller(&url, "hello");
    assert_eq!(hello["plugin-sha256"], rust_sha, "{hello}");
    assert_eq!(hello["swaps"], 3, "{hello}");

    // Unload: the finalizer stays, so a delete waits until hello is back.
    let (ok, _, err) = cli(&["plugin", "unload", "hello"]);
    assert!(ok, "{err}");
    let deleted = http(
        "DELETE",
        &format!("{url}/v1/objects/Greeting/swapped"),
        &[],
        None,
    );
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    // Deleting, held by hello's finalizer, and no controller left to release
    // it: it stays until hello is back.
    let held = get(&format!("{url}/v1/objects/Greeting/swapped")).json();
    assert!(held["metadata"]["deletionTimestamp"].is_number(), "{held}");
    assert_eq!(
        held["metadata"]["finalizers"][0], "setpoint.dev/hello",
        "{held}"
    );
    assert!(
        !get(&format!("{url}/v1/controllers"))
            .body
            .contains("\"hello\""),
        "hello is unloaded"
    );
    let hello_wasm = plugin("hello");
    let (ok, _, err) = cli(&["plugin", "load", hello_wasm.to_str().unwrap()]);
    assert!(ok, "{err}");
    eventually(
        "the delete completes once hello is loaded again",
        LIMIT,
        || get(&format!("{url}/v1/objects/Greeting/swapped")).status == 404,
    );
    assert!(d.interrupt().success());
}

#[test]
fn a_watched_plugin_folder_loads_swaps_and_unloads_and_never_loads_a_half_written_file() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("plugins");
    std::fs::create_dir_all(&folder).unwrap();
    let top = format!("plugin-dir = \"{}\"", folder.display());
    // The configuration's own plugins run too; the folder's come in beside.
    let (mut d, url) = daemon(home.path(), &top, "");
    let view = |name: &str| get(&format!("{url}/v1/plugins/{name}"));

    // A new file is loaded: the Python hello, as a controller of its own.
    std::fs::copy(plugin("hello-py"), folder.join("greeter.wasm")).unwrap();
    eventually("hello-py is loaded from the folder", LIMIT, || {
        let v = view("hello-py");
        v.status == 200 && v.json()["state"] == "running"
    });
    let first = view("hello-py").json()["sha256"].clone();

    // Half a file, left there a while: refused, never loaded.
    let bytes = std::fs::read(plugin("legacy")).unwrap();
    let half = folder.join("legacy.wasm");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    eventually("the half file was tried and refused", LIMIT, || {
        let v = view("legacy");
        v.status == 200 && v.json()["state"] == "failed"
    });
    std::fs::write(&half, &bytes).unwrap();
    eventually("the whole file is loaded", LIMIT, || {
        view("legacy").json()["state"] == "running"
    });
    let history = view("legacy").json()["history"].clone();
    let states: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert!(
        states.iter().all(|s| *s == "failed" || *s == "loaded"),
        "{history}"
    );
    assert_eq!(states.last(), Some(&"loaded"), "{history}");

    // A changed file is swapped in for the plugin it loaded.
    let js = std::fs::read(plugin("hello-js")).unwrap();
    std::fs::write(folder.join("greeter.wasm"), js).unwrap();
    eventually("the changed file is swapped in", LIMIT, || {
        let v = view("hello-py").json();
        v["sha256"] != first && v["state"] == "running"
    });

    // A removed file's plugin is unloaded.
    std::fs::remove_file(folder.join("greeter.wasm")).unwrap();
    eventually("the removed file's plugin is unloaded", LIMIT, || {
        view("hello-py").json()["state"] == "unloaded"
    });
    assert!(d.interrupt().success());
}
