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
    let written = home.path().join("files/motd");
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
    let kept = home.path().join("files/keep");
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
    // Slow objects on one worker: most are still pending when the process dies.
    let slow: String = (0..40)
        .map(|i| {
            format!(
                "kind: Hostile\nmetadata: {{name: s{i}}}\nspec: {{mode: slow, delay-ms: 25}}\n---\n"
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
    assert!(!home.path().join("files/from-a").exists());
    assert!(d.interrupt().success());
}

#[test]
fn the_cli_applies_gets_waits_for_and_deletes_through_the_api() {
    let home = tempfile::tempdir().unwrap();
    let (mut d, url) = daemon(home.path(), "", "");
    let cli = |args: &[&str]| {
        let output = setpoint(&home.path().join("cache"))
            .args(["--server", &url])
            .args(args)
            .output()
            .unwrap();
        let (out, err) = texts(&output);
        (output.status.success(), out, err)
    };
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
