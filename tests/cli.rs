//! The real `setpoint` binary with the real example plugins.
//!
//! Built as a test of the `setpoint` package (see host/Cargo.toml), so cargo
//! builds the binary it drives.

use std::process::Stdio;
use std::time::{Duration, Instant};

mod support;

use support::{Daemon, plugin, root, setpoint, texts};

/// Run `setpoint plugin inspect FILE` and return (success, stdout, stderr).
fn inspect(file: &std::path::Path) -> (bool, String, String) {
    let cache = tempfile::tempdir().unwrap();
    let output = setpoint(cache.path())
        .args(["plugin", "inspect"])
        .arg(file)
        .output()
        .unwrap();
    let (out, err) = texts(&output);
    (output.status.success(), out, err)
}

/// A refusal is short, says what was wrong, and has no backtrace.
fn assert_clear_refusal(file: &std::path::Path, expected: &str) {
    let (ok, _, err) = inspect(file);
    assert!(!ok, "inspect of {} should fail", file.display());
    let message: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(message.len(), 1, "one error paragraph: {err}");
    assert!(
        message[0].contains(expected),
        "expected {expected:?} in: {err}"
    );
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert!(err.lines().count() <= 3, "short: {err}");
}

#[test]
fn inspect_prints_what_a_real_plugin_describes() {
    let (ok, out, err) = inspect(&plugin("files"));
    assert!(ok, "{err}");
    assert!(out.contains("plugin:    files 0.1.0"), "{out}");
    assert!(out.contains("kinds:     File"), "{out}");
    assert!(
        out.contains("world:     setpoint:reconciler/plugin"),
        "{out}"
    );
    assert!(out.contains("exports:   reconciler, pruner"), "{out}");
}

#[test]
fn inspect_refuses_a_component_of_the_wrong_world() {
    let file = root().join("tests/fixtures/wrong-world.wat");
    assert_clear_refusal(&file, "it is not a Setpoint plugin");
    let (_, _, err) = inspect(&file);
    assert!(
        err.contains("exports `hello`"),
        "names what it found: {err}"
    );
}

#[test]
fn inspect_refuses_an_unsupported_package_version_by_name() {
    let file = root().join("tests/fixtures/future-version.wat");
    assert_clear_refusal(&file, "setpoint:reconciler@0.2.0");
    let (_, _, err) = inspect(&file);
    assert!(err.contains("supports setpoint:reconciler 0.1.x"), "{err}");
}

#[test]
fn inspect_names_a_missing_export_function() {
    let file = root().join("tests/fixtures/missing-reconcile.wat");
    assert_clear_refusal(&file, "does not have export `reconcile`");
}

#[test]
fn inspect_names_an_export_function_of_the_wrong_type() {
    let file = root().join("tests/fixtures/wrong-signature.wat");
    // Named as the component exports it (0.1.1), not as this host calls it.
    assert_clear_refusal(
        &file,
        "`setpoint:reconciler/reconciler@0.1.1` has a `describe` of the wrong type",
    );
}

#[test]
fn inspect_names_the_host_function_a_newer_component_imports() {
    let file = root().join("tests/fixtures/newer-import.wat");
    assert_clear_refusal(&file, "`frobnicate`");
    let (_, _, err) = inspect(&file);
    assert!(err.contains("setpoint:reconciler/clock@0.1.9"), "{err}");
}

#[test]
fn inspect_refuses_a_truncated_component() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(plugin("hello")).unwrap();
    let file = dir.path().join("truncated.wasm");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_clear_refusal(&file, "is not a valid component");
    let (_, _, err) = inspect(&file);
    assert!(err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn inspect_refuses_a_file_that_is_not_wasm() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.wasm");
    std::fs::write(&file, "these are not the bytes you are looking for\n").unwrap();
    assert_clear_refusal(&file, "is not a WebAssembly file");
}

#[test]
fn inspect_refuses_a_core_module() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("core.wasm");
    std::fs::write(&file, b"\0asm\x01\0\0\0").unwrap();
    assert_clear_refusal(&file, "is a core WebAssembly module, not a component");
}

#[test]
fn inspect_refuses_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_clear_refusal(&dir.path().join("nope.wasm"), "cannot read plugin");
    let (_, _, err) = inspect(&dir.path().join("nope.wasm"));
    assert_eq!(
        err.matches("os error 2").count(),
        1,
        "the OS error once: {err}"
    );
}

#[test]
fn run_names_a_missing_plugin_and_its_os_error_once_and_starts_anyway() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("setpoint.toml");
    std::fs::write(
        &config,
        "[store]\nin-memory = true\n[api]\nenabled = false\n[[plugin]]\npath = \"nope.wasm\"\n",
    )
    .unwrap();
    let output = setpoint(&home.path().join("cache"))
        .args(["run", "--once", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (_, err) = texts(&output);
    // A plugin that does not load is reported, and the daemon runs the rest.
    assert!(output.status.success(), "{err}");
    let message: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("plugin not loaded"))
        .collect();
    assert_eq!(message.len(), 1, "one error line: {err}");
    assert!(message[0].contains("cannot read plugin"), "{err}");
    assert_eq!(
        message[0].matches("nope.wasm").count(),
        1,
        "the path once: {err}"
    );
    assert_eq!(
        message[0].matches("os error 2").count(),
        1,
        "the OS error once: {err}"
    );
    assert!(err.contains("some plugins did not load"), "{err}");
}

/// `setpoint reconcile PLUGIN --object OBJECT`.
fn reconcile(
    cache: &std::path::Path,
    name: &str,
    object: &std::path::Path,
) -> std::process::Output {
    setpoint(cache)
        .arg("reconcile")
        .arg(plugin(name))
        .arg("--object")
        .arg(object)
        .output()
        .unwrap()
}

#[test]
fn reconcile_runs_one_reconcile_and_prints_the_outcome() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let object = data.path().join("motd.yaml");
    std::fs::write(
        &object,
        "kind: File\nmetadata:\n  name: motd\nspec:\n  content: hi\n",
    )
    .unwrap();
    let out_dir = data.path().join("out");
    let output = setpoint(cache.path())
        .arg("reconcile")
        .arg(plugin("files"))
        .arg("--object")
        .arg(&object)
        .arg("--dir")
        .arg(format!("{}:/data", out_dir.display()))
        .output()
        .unwrap();
    let (out, err) = texts(&output);
    assert!(output.status.success(), "{err}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["result"], "ok");
    assert_eq!(printed["phase"], "done");
    assert_eq!(
        printed["status-written"],
        serde_json::json!({"path": "/data/_default/motd", "bytes": 2})
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("_default/motd")).unwrap(),
        "hi"
    );
}

#[test]
fn reconcile_prints_a_plugin_error_with_its_kind() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let object = data.path().join("bad.yaml");
    std::fs::write(
        &object,
        "kind: File\nmetadata:\n  name: bad\nspec:\n  contents: typo\n",
    )
    .unwrap();
    let output = reconcile(cache.path(), "files", &object);
    let (out, err) = texts(&output);
    assert!(
        !output.status.success(),
        "a failed reconcile exits non-zero: {out}"
    );
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["result"], "error");
    assert_eq!(printed["error"], "fatal");
    assert_eq!(printed["phase"], "error");
    assert!(
        printed["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `contents`"),
        "{out}"
    );
    assert!(err.contains("the reconcile failed (fatal)"), "{err}");
}

#[test]
fn reconcile_classifies_a_trap_as_the_daemon_does_and_shows_the_panic() {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let object = data.path().join("trap.yaml");
    std::fs::write(
        &object,
        "kind: Hostile\nmetadata:\n  name: trap\nspec:\n  mode: trap\n",
    )
    .unwrap();
    let output = reconcile(cache.path(), "hostile", &object);
    let (out, err) = texts(&output);
    assert!(!output.status.success(), "{out}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    // A trap is retried by the daemon: the same class here.
    assert_eq!(printed["error"], "retry", "{out}");
    assert!(printed["retry-in-ms"].as_u64().is_some(), "{out}");
    let message = printed["message"].as_str().unwrap();
    assert!(
        message.contains("asked to trap"),
        "the panic's message: {message}"
    );
    assert!(err.contains("the reconcile failed (retry)"), "{err}");
}

#[test]
fn run_without_config_reconciles_the_examples() {
    let cache = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let output = setpoint(cache.path())
        .args(["run", "--once", "--listen", "127.0.0.1:0"])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let (_, err) = texts(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("every object is reconciled"), "{err}");
    let motd = cwd.path().join("target/demo/files/_default/motd");
    assert_eq!(
        std::fs::read_to_string(motd).unwrap(),
        "Welcome to Setpoint.\n"
    );
    assert!(err.contains("controller=hello successes=2"), "{err}");
}

#[test]
fn run_stops_cleanly_on_ctrl_c() {
    let mut daemon = Daemon::start(&[]);
    daemon.wait_for("setpoint is running");
    let status = daemon.interrupt();
    assert!(status.success(), "{status}: {:#?}", daemon.log);
}

#[test]
fn run_serves_controller_status_and_metrics_that_promtool_accepts() {
    let mut daemon = Daemon::start(&[]);
    let url = daemon.url();
    // Wait until both controllers have reconciled their examples.
    let deadline = Instant::now() + Duration::from_secs(60);
    let controllers = loop {
        let body = ureq::get(format!("{url}/v1/controllers"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let controllers: serde_json::Value = serde_json::from_str(&body).unwrap();
        let settled = controllers
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["successes"].as_u64() == Some(2));
        if settled {
            break controllers;
        }
        assert!(Instant::now() < deadline, "not settled: {controllers}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let names: Vec<&str> = controllers
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["files", "hello"]);
    assert_eq!(controllers[0]["failures"], 0);
    assert!(controllers[0]["last-success-at"].as_u64().is_some());

    let metrics = ureq::get(format!("{url}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    for line in [
        "reconcile_total{controller=\"hello\",result=\"success\"} 2",
        "workqueue_adds_total{controller=\"files\"} 2",
        "workqueue_depth{controller=\"hello\"} 0",
        "setpoint_leader 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    for name in [
        "workqueue_queue_duration_seconds",
        "workqueue_work_duration_seconds",
        "workqueue_unfinished_work_seconds",
        "workqueue_longest_running_processor_seconds",
        "workqueue_retries_total",
        "reconcile_errors_total",
        "reconcile_time_seconds",
        "active_workers",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} in:\n{metrics}"
        );
    }
    let openmetrics = ureq::get(format!("{url}/metrics"))
        .header("Accept", "application/openmetrics-text; version=1.0.0")
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        openmetrics.ends_with("# EOF\n"),
        "OpenMetrics when asked for"
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is missing: install Debian's `prometheus` package (cargo xtask test does)",
        );
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{metrics}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(daemon.interrupt().success());
}

/// Run `setpoint ARGS` in `dir`: (success, stdout, stderr).
fn run_in(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = setpoint(&dir.join("cache"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let (out, err) = texts(&output);
    (output.status.success(), out, err)
}

#[test]
fn keygen_sign_and_verify_and_a_daemon_that_requires_signatures() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let run = |args: &[&str]| run_in(dir, args);
    assert!(run(&["plugin", "keygen", "--out", "alice"]).0);
    assert!(run(&["plugin", "keygen", "--out", "mallory"]).0);
    let (ok, _, err) = run(&["plugin", "keygen", "--out", "alice"]);
    assert!(!ok && err.contains("alice.key exists"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("alice.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::copy(plugin("hello"), dir.join("hello.wasm")).unwrap();
    std::fs::write(
        dir.join("hello.toml"),
        "name = \"hello\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(&["plugin", "sign", "hello.wasm", "--key", "alice.key"]);
    assert!(ok, "{err}");
    assert!(out.contains("name \"hello\", version \"0.1.0\""), "{out}");
    let (ok, out, err) = run(&["plugin", "verify", "hello.wasm", "--key", "alice.pub"]);
    assert!(ok, "{err}");
    assert!(out.contains("signature verified, by alice.pub"), "{out}");
    let (ok, _, err) = run(&["plugin", "verify", "hello.wasm", "--key", "mallory.pub"]);
    assert!(!ok && err.contains("does not accept"), "{err}");
    // The manifest's version is covered: changing it breaks the signature.
    std::fs::write(
        dir.join("hello.toml"),
        "name = \"hello\"\nversion = \"0.1.1\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(&["plugin", "verify", "hello.wasm", "--key", "alice.pub"]);
    assert!(!ok && err.contains("does not match"), "{err}");
    std::fs::write(
        dir.join("hello.toml"),
        "name = \"hello\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();

    // A daemon that requires alice's signature: the signed hello runs, the
    // unsigned files is refused and reported, naming the check.
    std::fs::copy(plugin("files"), dir.join("files.wasm")).unwrap();
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        "[store]\nin-memory = true\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [trust]\nkeys = { alice = \"alice.pub\" }\nrequire-signature = true\n\
         [[plugin]]\npath = \"hello.wasm\"\nname = \"hello\"\nversion = \"0.1.0\"\n\
         [[plugin]]\npath = \"files.wasm\"\n",
    )
    .unwrap();
    let mut d = Daemon::start_in(dir, &["--config", config.to_str().unwrap()]);
    let url = d.url();
    let (ok, out, err) = run(&["--server", &url, "plugin", "ls"]);
    assert!(ok, "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(line("hello ").contains("running"), "{out}");
    assert!(line("files ").contains("failed"), "{out}");
    assert!(line("files ").contains("is not signed"), "{out}");
    assert!(d.interrupt().success());
}

#[test]
fn push_and_pull_through_a_real_registry_and_a_daemon_that_loads_oci_references() {
    let registry = support::oci::TestRegistry::start();
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let run = |args: &[&str]| run_in(dir, args);
    let field = |out: &str, name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(run(&["plugin", "keygen", "--out", "alice"]).0);
    std::fs::copy(plugin("hello"), dir.join("hello.wasm")).unwrap();
    assert!(run(&["plugin", "sign", "hello.wasm", "--key", "alice.key"]).0);

    let tag = registry.reference("plugins/hello:0.1.0");
    let (ok, out, err) = run(&["plugin", "push", "hello.wasm", &tag]);
    assert!(ok, "{err}");
    assert!(out.contains("with its signatures"), "{out}");
    let digest = field(&out, "digest: ");
    let pinned = field(&out, "pinned: ");
    assert_eq!(
        pinned,
        registry.reference(&format!("plugins/hello@{digest}"))
    );

    let (ok, out, err) = run(&["plugin", "pull", &tag, "--out", "pulled.wasm"]);
    assert!(ok, "{err}");
    assert!(out.contains("downloaded, signed"), "{out}");
    assert_eq!(field(&out, "pinned: "), pinned);
    assert_eq!(
        std::fs::read(dir.join("pulled.wasm")).unwrap(),
        std::fs::read(dir.join("hello.wasm")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("pulled.wasm.sig")).unwrap(),
        std::fs::read_to_string(dir.join("hello.wasm.sig")).unwrap()
    );
    let (ok, out, err) = run(&["plugin", "pull", &pinned]);
    assert!(ok, "{err}");
    assert!(out.contains("from the cache"), "{out}");
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(
        field(&out, "file: ").ends_with(&format!("setpoint/oci/sha256/{hex}.wasm")),
        "{out}"
    );
    let (ok, _, err) = run(&["plugin", "pull", "oci://host-only"]);
    assert!(!ok && err.contains("is not an OCI reference"), "{err}");
    let (ok, _, err) = run(&["plugin", "pull", &registry.reference("plugins/hello:nope")]);
    assert!(
        !ok && err.contains("has no such repository, tag or digest"),
        "{err}"
    );

    // A daemon that requires alice's signature loads hello from the registry
    // by its tag, refuses an unsigned one loaded over the API, and swaps to a
    // pinned reference.
    let files = registry.reference("plugins/files:0.1.0");
    assert!(run(&["plugin", "push", plugin("files").to_str().unwrap(), &files]).0);
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nin-memory = true\n[api]\nlisten = \"127.0.0.1:0\"\n\
             [trust]\nkeys = {{ alice = \"alice.pub\" }}\nrequire-signature = true\n\
             [[plugin]]\npath = \"{tag}\"\n"
        ),
    )
    .unwrap();
    let mut d = Daemon::start_in(dir, &["--config", config.to_str().unwrap()]);
    let url = d.url();
    let (ok, out, err) = run(&["--server", &url, "plugin", "ls"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("hello ") && l.contains("running")),
        "{out}"
    );
    let (ok, _, err) = run(&["--server", &url, "plugin", "load", &files]);
    assert!(!ok && err.contains("is not signed"), "{err}");
    let (ok, out, err) = run(&["--server", &url, "plugin", "swap", "hello", &pinned]);
    assert!(ok, "{err}");
    assert!(out.contains("hello running"), "{out}");
    assert!(out.contains(&format!("from {pinned}")), "{out}");
    let body = ureq::get(format!("{url}/v1/plugins/hello"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["source"], pinned.as_str(), "{view}");
    assert!(d.interrupt().success());
}
