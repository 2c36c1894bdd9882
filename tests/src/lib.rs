//! Helpers for end-to-end tests: find (or build) the real `setpoint` binary and
//! the example plugins, and run commands with a timeout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `setpoint` binary of this build, built once per test run if needed.
pub fn setpoint_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "setpoint", "--bin", "setpoint"])
            .current_dir(root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p setpoint failed");
        // Test executables live in target/<profile>/deps; the binary one level up.
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("setpoint");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// The folder of example plugin components.
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("SETPOINT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/plugins"))
}

/// One example plugin; fails with what to do if it was not built.
pub fn plugin(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask plugins` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// A `setpoint` command with its own compile cache in `cache`.
pub fn setpoint(cache: &Path) -> Command {
    let mut cmd = Command::new(setpoint_bin());
    cmd.env("XDG_CACHE_HOME", cache)
        .env("SETPOINT_PLUGIN_DIR", plugin_dir())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// stdout and stderr of a finished command, as text.
pub fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
