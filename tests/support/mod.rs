//! Helpers for end-to-end tests: the real `setpoint` binary of this build and the
//! example plugins.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
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

/// A `setpoint` command (the binary cargo built for these tests) with its own
/// compile cache in `cache`.
pub fn setpoint(cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_setpoint"));
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
