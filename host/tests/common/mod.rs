//! Helpers for tests that load the real example plugins.

#![allow(dead_code)]

pub mod etcd;
pub mod oci;

use std::path::PathBuf;
use std::time::Duration;

use setpoint::config::{DirGrant, PluginConfig, RuntimeConfig};
use setpoint::plugin::{Plugin, Runtime};
use setpoint::store::Store;

/// The folder `cargo xtask plugins` builds the example components into.
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("SETPOINT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"))
}

/// The path of one example plugin; fails the test with what to do if it is missing.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the example plugins with `cargo xtask plugins` \
         (`cargo xtask test` does it for you)",
        path.display()
    );
    path
}

/// A runtime with its own compile cache in a temporary folder.
pub fn runtime(cache: &tempfile::TempDir) -> Runtime {
    Runtime::new(&RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        epoch_tick: Duration::from_millis(5),
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

/// Default settings that grant `dir` as the plugin's `/data`.
pub fn granting_data(dir: &std::path::Path) -> PluginConfig {
    let mut settings = PluginConfig::default();
    settings.grants.dirs.push(DirGrant {
        host: dir.to_path_buf(),
        guest: "/data".into(),
        read_only: false,
    });
    settings
}

/// Load an example plugin with `settings`.
pub async fn load(runtime: &Runtime, name: &str, settings: PluginConfig, store: &Store) -> Plugin {
    runtime
        .load(&plugin_path(name), settings, store.clone())
        .await
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// Wait until `condition` holds, polling; panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
