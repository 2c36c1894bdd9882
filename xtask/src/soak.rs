//! `cargo xtask soak`: writers against a real daemon for a while, then check it
//! settles with nothing lost and nothing panicked (issue 9's acceptance: "a soak
//! of at least 2 minutes with 4 writers against 3,000+ objects at the default
//! log level ends with every object done and no worker panic").
//!
//! The daemon is target/debug/setpoint at its default log level, with `hello`
//! (kind `Greeting`) and `files` (kind `File`, granted a temporary folder as
//! `/data`), its store in a temporary folder. The objects are `objects` names,
//! half `File`s and half `Greeting`s, one in five in namespace `team-a`. All are
//! created first; then `writers` threads, each with its own client, do until
//! the time is up, on objects picked at random: single applies in JSON (60 %)
//! and in YAML (15 %), batches of 10 in one apply as a JSON array or a YAML
//! stream (15 %), and deletes (10 %; the next apply of the name re-creates it).
//! An apply refused with 409 because the object is still being deleted is
//! counted, not an error; any other refusal fails the soak.
//!
//! Then: `GET /v1/wait` until everything is reconciled (the time to settle), a
//! top-up apply re-creating the names deleted last, and another wait; then every
//! object must be `done` at its current generation, every `File`'s file must
//! hold its spec's content (and no other file be left), every `Greeting`'s
//! status must greet its spec's `who`, `setpoint_worker_panics_total` must be 0
//! for every controller, `/readyz` 200, and SIGINT must stop the daemon cleanly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::daemon::{self, Client, Daemon};

pub struct Args {
    pub secs: u64,
    pub objects: usize,
    pub writers: usize,
    pub seed: Option<u64>,
    pub build: bool,
}

/// One of the soak's object names.
struct Name {
    kind: &'static str,
    namespace: &'static str,
    name: String,
}

fn name(i: usize) -> Name {
    let namespace = if i.is_multiple_of(5) { "team-a" } else { "" };
    if i.is_multiple_of(2) {
        Name {
            kind: "File",
            namespace,
            name: format!("file-{i:05}"),
        }
    } else {
        Name {
            kind: "Greeting",
            namespace,
            name: format!("greeting.{i:05}"),
        }
    }
}

impl Name {
    /// `Kind:name` or `Kind:namespace/name`, as the API writes keys.
    fn key(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}:{}", self.kind, self.name)
        } else {
            format!("{}:{}/{}", self.kind, self.namespace, self.name)
        }
    }

    /// The manifest with `tag` in its spec.
    fn manifest(&self, tag: &str) -> Value {
        let mut metadata = json!({ "name": self.name, "labels": { "soak": "yes" } });
        if !self.namespace.is_empty() {
            metadata["namespace"] = json!(self.namespace);
        }
        let spec = match self.kind {
            "File" => json!({ "content": format!("{tag}\n") }),
            _ => json!({ "who": tag }),
        };
        json!({ "kind": self.kind, "metadata": metadata, "spec": spec })
    }

    /// The same manifest as a YAML document (block style).
    fn yaml(&self, tag: &str) -> String {
        let mut doc = format!(
            "kind: {}\nmetadata:\n  name: {}\n  labels:\n    soak: \"yes\"\n",
            self.kind, self.name
        );
        if !self.namespace.is_empty() {
            doc.push_str(&format!("  namespace: {}\n", self.namespace));
        }
        match self.kind {
            "File" => doc.push_str(&format!("spec:\n  content: |\n    {tag}\n")),
            _ => doc.push_str(&format!("spec:\n  who: {tag}\n")),
        }
        doc
    }

    fn path(&self) -> String {
        format!(
            "/v1/objects/{}/{}{}",
            self.kind,
            self.name,
            if self.namespace.is_empty() {
                String::new()
            } else {
                format!("?namespace={}", self.namespace)
            }
        )
    }
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    objects_written: AtomicU64,
    json_applies: AtomicU64,
    yaml_applies: AtomicU64,
    batches: AtomicU64,
    deletes: AtomicU64,
    deletes_of_absent: AtomicU64,
    refused_deleting: AtomicU64,
    errors: AtomicU64,
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    let (bin, plugins) = daemon::prepare(root, args.build, &["hello", "files"])?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let home = tempfile::Builder::new().prefix("setpoint-soak").tempdir()?;
    let files = home.path().join("files");
    std::fs::create_dir_all(&files)?;
    let config = format!(
        "[store]\npath = {store:?}\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n\
         [[plugin]]\npath = {hello:?}\n\n\
         [[plugin]]\npath = {files_wasm:?}\n\n\
         [plugin.grants]\ndirs = [{{ host = {files:?}, guest = \"/data\", read-only = false }}]\n",
        store = home.path().join("store.redb").display().to_string(),
        hello = plugins.join("hello.wasm").display().to_string(),
        files_wasm = plugins.join("files.wasm").display().to_string(),
        files = files.display().to_string(),
    );
    let mut daemon = Daemon::start(root, &bin, home.path(), &config)?;
    eprintln!(
        "xtask: soak: daemon pid {} on {}, home {}, seed {seed}",
        daemon.pid(),
        daemon.url,
        home.path().display()
    );
    let client = Client::new(&daemon.url);
    let result = soak(&mut daemon, &client, &args, seed, &files);
    if let Err(e) = &result {
        let kept = home.keep();
        eprintln!(
            "xtask: soak FAILED: {e:#}\nxtask: the daemon's home (log, store, files) is kept in {}",
            kept.display()
        );
    }
    result
}

fn soak(
    daemon: &mut Daemon,
    client: &Client,
    args: &Args,
    seed: u64,
    files: &Path,
) -> anyhow::Result<()> {
    let n = args.objects;
    // Every name exists at the start.
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<Value> = chunk.iter().map(|&i| name(i).manifest("initial")).collect();
        apply_json(client, &Value::Array(batch))?;
    }
    eprintln!(
        "xtask: soak: {n} objects created in {:.1} s; {} writers for {} s",
        started.elapsed().as_secs_f64(),
        args.writers,
        args.secs
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let writing = Instant::now();
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let client = Client::new(&daemon.url);
        let counts = counts.clone();
        let stop = stop.clone();
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(31).wrapping_add(w as u64));
        writers.push(std::thread::spawn(move || {
            writer(w, &client, &mut rng, n, deadline, &stop, &counts)
        }));
    }
    let mut last_report = Instant::now();
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = daemon.check_alive() {
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                let _ = w.join();
            }
            return Err(e);
        }
        if last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            eprintln!(
                "xtask: soak: {:>4.0} s: {} requests, {} object writes, {} deletes, {} refused (deleting), {} errors",
                writing.elapsed().as_secs_f64(),
                counts.requests.load(Ordering::Relaxed),
                counts.objects_written.load(Ordering::Relaxed),
                counts.deletes.load(Ordering::Relaxed),
                counts.refused_deleting.load(Ordering::Relaxed),
                counts.errors.load(Ordering::Relaxed),
            );
        }
    }
    let mut latencies = Vec::new();
    let mut first_errors = Vec::new();
    for w in writers {
        let (l, e) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))?;
        latencies.extend(l);
        first_errors.extend(e);
    }
    let wrote_for = writing.elapsed();
    latencies.sort_unstable();
    let errors = counts.errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!(
            "{errors} requests failed unexpectedly; the first ones:\n{}",
            first_errors.join("\n")
        );
    }

    // Settle.
    let settling = Instant::now();
    wait_all(client)?;
    let settled_in = settling.elapsed();
    let status = client.get_json("/v1/status")?;
    let present: BTreeSet<String> = status
        .as_array()
        .context("/v1/status is not a list")?
        .iter()
        .filter_map(|s| s["key"].as_str().map(String::from))
        .collect();
    let live_after_writing = present.len();
    let missing: Vec<usize> = (0..n)
        .filter(|&i| !present.contains(&name(i).key()))
        .collect();
    let topped_up = missing.len();
    for chunk in missing.chunks(500) {
        let batch: Vec<Value> = chunk.iter().map(|&i| name(i).manifest("top-up")).collect();
        apply_json(client, &Value::Array(batch))?;
    }
    let topping = Instant::now();
    wait_all(client)?;
    let topped_up_in = topping.elapsed();

    // Every object done at its current generation, with what its spec asks for.
    let status = client.get_json("/v1/status")?;
    let status = status.as_array().context("/v1/status is not a list")?;
    let mut observed = BTreeMap::new();
    let mut not_done = Vec::new();
    for s in status {
        let key = s["key"].as_str().unwrap_or_default().to_string();
        if s["phase"] != "done" {
            not_done.push(s.to_string());
        }
        observed.insert(key, s["observedGeneration"].as_u64().unwrap_or(0));
    }
    if !not_done.is_empty() {
        bail!(
            "{} objects are not done after /v1/wait said so: {}",
            not_done.len(),
            not_done[..not_done.len().min(20)].join("\n")
        );
    }
    let mut problems = Vec::new();
    let mut objects = 0;
    let mut file_objects = 0;
    for kind in ["File", "Greeting"] {
        for namespace in ["", "team-a"] {
            let list = client.get_json(&format!("/v1/objects/{kind}?namespace={namespace}"))?;
            for object in list.as_array().context("a list of objects")? {
                objects += 1;
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                let key = if namespace.is_empty() {
                    format!("{kind}:{name}")
                } else {
                    format!("{kind}:{namespace}/{name}")
                };
                let generation = object["metadata"]["generation"].as_u64().unwrap_or(0);
                if object["metadata"]["deletionTimestamp"].is_number() {
                    problems.push(format!("{key} is still deleting"));
                }
                if observed.get(&key) != Some(&generation) {
                    problems.push(format!(
                        "{key}: generation {generation}, observed {:?}",
                        observed.get(&key)
                    ));
                }
                match kind {
                    "File" => {
                        file_objects += 1;
                        let folder = if namespace.is_empty() {
                            "_default"
                        } else {
                            namespace
                        };
                        let path = files.join(folder).join(name);
                        let want = object["spec"]["content"].as_str().unwrap_or_default();
                        match std::fs::read_to_string(&path) {
                            Ok(got) if got == want => {}
                            Ok(got) => problems.push(format!(
                                "{key}: {} holds {got:?}, the spec says {want:?}",
                                path.display()
                            )),
                            Err(e) => problems.push(format!("{key}: {}: {e}", path.display())),
                        }
                    }
                    _ => {
                        let want = format!(
                            "Hello, {}!",
                            object["spec"]["who"].as_str().unwrap_or_default()
                        );
                        if object["status"]["greeting"].as_str() != Some(want.as_str()) {
                            problems.push(format!(
                                "{key}: status {}, the spec wants {want:?}",
                                object["status"]
                            ));
                        }
                    }
                }
            }
        }
    }
    let files_on_disk = count_files(files);
    if files_on_disk != file_objects {
        problems.push(format!(
            "{files_on_disk} files on disk for {file_objects} File objects"
        ));
    }
    if objects != n || status.len() != n {
        problems.push(format!(
            "{objects} objects listed and {} statuses, not {n}",
            status.len()
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{} problems after settling:\n{}",
            problems.len(),
            problems[..problems.len().min(30)].join("\n")
        );
    }

    // No worker panicked; the daemon is ready; what it did.
    let controllers: Vec<String> = client
        .get_json("/v1/controllers")?
        .as_array()
        .context("a list of controllers")?
        .iter()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let (_, metrics) = client.get("/metrics")?;
    let panics = daemon::metric(&metrics, "setpoint_worker_panics_total");
    for c in &controllers {
        let label = format!("controller=\"{c}\"");
        match panics.get(&label) {
            Some(0.0) => {}
            Some(&v) => bail!("setpoint_worker_panics_total{{{label}}} is {v}"),
            None => bail!("/metrics has no setpoint_worker_panics_total{{{label}}}"),
        }
    }
    let reconciles = daemon::metric(&metrics, "reconcile_total");
    let errors = daemon::metric(&metrics, "reconcile_errors_total");
    let given_up = daemon::metric(&metrics, "reconcile_given_up_total");
    let (ready, ready_body) = client.get("/readyz")?;
    if ready != 200 {
        bail!("/readyz answered {ready}: {ready_body}");
    }

    // A clean stop.
    let (exit, stop_took) = daemon.interrupt(Duration::from_secs(60))?;
    let log = daemon.log();
    if !exit.success() {
        bail!(
            "the daemon exited with {exit} after SIGINT:\n{}",
            daemon::tail(&log, 40)
        );
    }
    if !log.contains("shutting down") {
        bail!("the daemon exited without logging \"shutting down\"");
    }
    let level_count = |level: &str| log.lines().filter(|l| l.contains(level)).count();
    let panicked = log.lines().filter(|l| l.contains("panick")).count();
    if panicked > 0 {
        bail!(
            "the log mentions a panic:\n{}",
            log.lines()
                .filter(|l| l.contains("panick"))
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!();
    println!(
        "Soak: {} writers for {:.0} s against {n} objects ({}; seed {seed})",
        args.writers,
        wrote_for.as_secs_f64(),
        daemon::machine()
    );
    println!();
    println!(
        "- requests: {} ({:.0}/s): {} JSON applies, {} YAML applies, {} batches of 10, {} deletes ({} of absent objects)",
        c(&counts.requests),
        c(&counts.requests) as f64 / wrote_for.as_secs_f64(),
        c(&counts.json_applies),
        c(&counts.yaml_applies),
        c(&counts.batches),
        c(&counts.deletes),
        c(&counts.deletes_of_absent),
    );
    println!(
        "- object writes acknowledged: {} ({:.0}/s); applies refused because the object was still deleting: {}; unexpected errors: 0",
        c(&counts.objects_written),
        c(&counts.objects_written) as f64 / wrote_for.as_secs_f64(),
        c(&counts.refused_deleting),
    );
    println!(
        "- request latency: p50 {} ms, p99 {} ms, max {} ms",
        daemon::ms(daemon::quantile(&latencies, 0.5)),
        daemon::ms(daemon::quantile(&latencies, 0.99)),
        daemon::ms(*latencies.last().unwrap_or(&Duration::ZERO)),
    );
    println!(
        "- settled {:.2} s after the writers stopped ({live_after_writing} objects live); \
         {topped_up} deleted names re-created, settled in {:.2} s",
        settled_in.as_secs_f64(),
        topped_up_in.as_secs_f64(),
    );
    println!(
        "- at the end: {objects} objects, all done at their current generation; {file_objects} files, each with its spec's content; every greeting matches its spec"
    );
    for controller in &controllers {
        let of = |m: &BTreeMap<String, f64>| -> f64 {
            m.iter()
                .filter(|(l, _)| l.contains(&format!("controller=\"{controller}\"")))
                .map(|(_, v)| v)
                .sum()
        };
        let mean_ms = |family: &str| {
            let sum = of(&daemon::metric(&metrics, &format!("{family}_sum")));
            let count = of(&daemon::metric(&metrics, &format!("{family}_count")));
            sum / count.max(1.0) * 1e3
        };
        println!(
            "- {controller}: {} reconciles ({} errors, {} given up), 0 worker panics; \
             mean reconcile {:.2} ms, mean time queued {:.2} ms",
            of(&reconciles),
            of(&errors),
            of(&given_up),
            mean_ms("reconcile_time_seconds"),
            mean_ms("workqueue_queue_duration_seconds"),
        );
    }
    println!(
        "- /readyz 200; SIGINT: clean exit ({exit}) in {:.2} s; log: {} lines ({} WARN, {} ERROR, 0 panics)",
        stop_took.as_secs_f64(),
        log.lines().count(),
        level_count(" WARN "),
        level_count(" ERROR "),
    );
    Ok(())
}

/// One writer until `deadline`: its request latencies and its first errors.
fn writer(
    w: usize,
    client: &Client,
    rng: &mut fastrand::Rng,
    n: usize,
    deadline: Instant,
    stop: &AtomicBool,
    counts: &Counts,
) -> (Vec<Duration>, Vec<String>) {
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    let mut op = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        op += 1;
        let tag = format!("w{w}-{op}-{}", rng.u32(..));
        let roll = rng.u32(0..100);
        let started = Instant::now();
        let (what, result, written) = if roll < 60 {
            counts.json_applies.fetch_add(1, Ordering::Relaxed);
            let body = name(rng.usize(0..n)).manifest(&tag).to_string();
            (
                "apply (JSON)",
                client.send("POST", "/v1/apply", Some("application/json"), Some(&body)),
                1,
            )
        } else if roll < 75 {
            counts.yaml_applies.fetch_add(1, Ordering::Relaxed);
            let body = name(rng.usize(0..n)).yaml(&tag);
            (
                "apply (YAML)",
                client.send("POST", "/v1/apply", Some("application/yaml"), Some(&body)),
                1,
            )
        } else if roll < 90 {
            counts.batches.fetch_add(1, Ordering::Relaxed);
            let mut picked = BTreeSet::new();
            while picked.len() < 10.min(n) {
                picked.insert(rng.usize(0..n));
            }
            if rng.bool() {
                let body: Vec<Value> = picked.iter().map(|&i| name(i).manifest(&tag)).collect();
                (
                    "batch apply (JSON)",
                    client.send(
                        "POST",
                        "/v1/apply",
                        Some("application/json"),
                        Some(&Value::Array(body).to_string()),
                    ),
                    picked.len() as u64,
                )
            } else {
                let docs: Vec<String> = picked.iter().map(|&i| name(i).yaml(&tag)).collect();
                (
                    "batch apply (YAML)",
                    client.send(
                        "POST",
                        "/v1/apply",
                        Some("application/yaml"),
                        Some(&docs.join("---\n")),
                    ),
                    picked.len() as u64,
                )
            }
        } else {
            counts.deletes.fetch_add(1, Ordering::Relaxed);
            let target = name(rng.usize(0..n));
            (
                "delete",
                client.send("DELETE", &target.path(), None, None),
                0,
            )
        };
        latencies.push(started.elapsed());
        counts.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok((200..=202, _)) => {
                counts.objects_written.fetch_add(written, Ordering::Relaxed);
            }
            Ok((404, _)) if what == "delete" => {
                counts.deletes_of_absent.fetch_add(1, Ordering::Relaxed);
            }
            Ok((409, body)) if what != "delete" && body.contains("is being deleted") => {
                counts.refused_deleting.fetch_add(1, Ordering::Relaxed);
            }
            Ok((status, body)) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                if errors.len() < 5 {
                    errors.push(format!(
                        "writer {w}: {what}: {status} {}",
                        daemon::cut(&body, 300)
                    ));
                }
            }
            Err(e) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                if errors.len() < 5 {
                    errors.push(format!("writer {w}: {what}: {e:#}"));
                }
            }
        }
    }
    (latencies, errors)
}

fn apply_json(client: &Client, body: &Value) -> anyhow::Result<()> {
    let (status, answer) = client.send(
        "POST",
        "/v1/apply",
        Some("application/json"),
        Some(&body.to_string()),
    )?;
    if status != 200 {
        bail!("POST /v1/apply: {status} {}", daemon::cut(&answer, 500));
    }
    Ok(())
}

/// `GET /v1/wait` for everything; fails with what is still waiting.
fn wait_all(client: &Client) -> anyhow::Result<()> {
    let (status, body) = client.get("/v1/wait?timeout=300s")?;
    if status != 200 {
        bail!(
            "GET /v1/wait?timeout=300s: {status}: {}",
            daemon::cut(&body, 4000)
        );
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                count += 1;
            }
        }
    }
    count
}
