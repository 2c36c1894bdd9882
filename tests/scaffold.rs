//! `setpoint new`: each language's project builds with its real toolchain,
//! passes its own unit test, and reconciles its example object in the real host.
//! The toolchains are the ones `cargo xtask plugins` installs (target/python-venv,
//! target/js-tools, a wasm32-wasip2 Rust).

use std::path::{Path, PathBuf};
use std::process::Command;

mod support;

use support::{root, setpoint, texts};

/// Run a command in `dir`; fail the test with its output if it fails.
fn run(dir: &Path, cmd: &mut Command) {
    let output = cmd.current_dir(dir).output().unwrap_or_else(|e| {
        panic!("cannot start {:?}: {e}", cmd.get_program());
    });
    let (out, err) = texts(&output);
    assert!(output.status.success(), "{cmd:?} failed:\n{out}\n{err}");
}

/// `setpoint new --lang LANG NAME` in a fresh folder; returns the project.
fn new(home: &Path, lang: &str, name: &str) -> PathBuf {
    let output = setpoint(&home.join("cache"))
        .args(["new", "--lang", lang, name, "--dir"])
        .arg(home)
        .output()
        .unwrap();
    let (out, err) = texts(&output);
    assert!(output.status.success(), "{err}");
    assert!(out.contains("next:"), "{out}");
    home.join(name)
}

/// `setpoint reconcile COMPONENT --object example.yaml` greets the example.
fn reconciles_its_example(home: &Path, project: &Path, component: &Path) {
    let output = setpoint(&home.join("cache"))
        .arg("reconcile")
        .arg(component)
        .arg("--object")
        .arg(project.join("example.yaml"))
        .output()
        .unwrap();
    let (out, err) = texts(&output);
    assert!(output.status.success(), "{err}");
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["result"], "ok", "{out}");
    assert_eq!(
        result["status-written"]["greeting"], "Hello, world!",
        "{out}"
    );
}

#[test]
fn a_new_python_plugin_tests_builds_and_runs() {
    let home = tempfile::tempdir().unwrap();
    let project = new(home.path(), "python", "greeter-py");
    run(
        &project,
        Command::new("python3")
            .args(["-m", "unittest"])
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    );
    let tool = root().join("target/python-venv/bin/componentize-py");
    assert!(
        tool.exists(),
        "{} is missing: run `cargo xtask plugins`",
        tool.display()
    );
    run(
        &project,
        Command::new(tool).args([
            "-d",
            "wit",
            "-w",
            "plugin-with-admission",
            "componentize",
            "app",
            "-p",
            ".",
            "-o",
            "out.wasm",
        ]),
    );
    reconciles_its_example(home.path(), &project, &project.join("out.wasm"));
}

#[test]
fn a_new_javascript_plugin_tests_builds_and_runs() {
    let home = tempfile::tempdir().unwrap();
    let project = new(home.path(), "js", "greeter-js");
    // The packages `npm install` would fetch, from the copy xtask installed.
    let modules = root().join("target/js-tools/node_modules");
    assert!(
        modules.exists(),
        "{} is missing: run `cargo xtask plugins`",
        modules.display()
    );
    std::os::unix::fs::symlink(&modules, project.join("node_modules")).unwrap();
    run(&project, Command::new("npm").args(["test"]));
    run(&project, Command::new("npm").args(["run", "build"]));
    reconciles_its_example(home.path(), &project, &project.join("greeter-js.wasm"));
}

#[test]
fn a_new_rust_plugin_tests_builds_and_runs() {
    let home = tempfile::tempdir().unwrap();
    let project = new(home.path(), "rust", "greeter-rs");
    // One warm target folder for every run of this test.
    let target = root().join("target/scaffold-test");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        &project,
        Command::new(&cargo)
            .arg("test")
            .env("CARGO_TARGET_DIR", &target),
    );
    let rustup_target = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        });
    let mut build = if rustup_target {
        let mut c = Command::new(&cargo);
        c.args(["build", "--release", "--target", "wasm32-wasip2"]);
        c
    } else {
        // The route `cargo xtask plugins` takes where rustup cannot download the
        // target: Debian's rustc-web rebuilding std (see README, Toolchains).
        let mut c = Command::new("/usr/bin/cargo");
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("/usr/bin:{path}"))
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTFLAGS", "-L native=/usr/lib/wasm32-wasi")
            .args([
                "build",
                "-Zbuild-std=std,panic_abort",
                "--release",
                "--target",
                "wasm32-wasip2",
            ]);
        c
    };
    run(&project, build.env("CARGO_TARGET_DIR", &target));
    let component = target.join("wasm32-wasip2/release/greeter_rs.wasm");
    reconciles_its_example(home.path(), &project, &component);
}
