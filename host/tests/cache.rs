//! The compile cache, observed from outside: a component is compiled once.

mod common;

use common::{plugin_path, runtime};
use setpoint::config::PluginConfig;
use setpoint::plugin::CacheOutcome;
use setpoint::store::Store;

#[tokio::test]
async fn loading_the_same_component_twice_compiles_it_once() {
    let cache = tempfile::tempdir().unwrap();
    let path = plugin_path("hello");
    let rt = runtime(&cache);
    let first = rt
        .load(&path, PluginConfig::default(), Store::new())
        .await
        .unwrap();
    let second = rt
        .load(&path, PluginConfig::default(), Store::new())
        .await
        .unwrap();
    assert_eq!(first.report().cache, CacheOutcome::Miss);
    assert_eq!(second.report().cache, CacheOutcome::Hit);
    assert_eq!(rt.cache().compiles(), 1);

    // A new runtime (as after a restart) with the same cache folder compiles nothing.
    drop(rt);
    let rt = runtime(&cache);
    let third = rt
        .load(&path, PluginConfig::default(), Store::new())
        .await
        .unwrap();
    assert_eq!(third.report().cache, CacheOutcome::Hit);
    assert_eq!(rt.cache().compiles(), 0);
    assert_eq!(third.report().sha256, first.report().sha256);
}

#[tokio::test]
async fn a_corrupt_cache_entry_is_recompiled_not_trusted() {
    let cache = tempfile::tempdir().unwrap();
    let path = plugin_path("hello");
    let rt = runtime(&cache);
    rt.load(&path, PluginConfig::default(), Store::new())
        .await
        .unwrap();
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not an artifact").unwrap();
    }
    let again = rt
        .load(&path, PluginConfig::default(), Store::new())
        .await
        .unwrap();
    assert_eq!(again.report().cache, CacheOutcome::Miss);
    assert_eq!(rt.cache().compiles(), 2);
    assert_eq!(again.info().name, "hello");
}
