//! Load cost per language: a cold load (compile, then write the cache) against a
//! warm one (a new `Runtime` on the same cache, as after a restart: deserialize
//! only), for the same `hello` plugin in Rust, Python and JavaScript.
//!
//! Time is the wall time of `Runtime::load` (compile or deserialize, link,
//! pre-instantiate, `describe()`); memory is the peak resident set growth
//! during the load, from /proc/self/status (VmHWM, reset before each load
//! through /proc/self/clear_refs). Median of 3.
//!
//! `cargo bench -p setpoint-bench --bench load` (after `cargo xtask plugins`).

use std::time::{Duration, Instant};

use setpoint::config::{PluginConfig, RuntimeConfig};
use setpoint::plugin::Runtime;
use setpoint::store::Store;
use setpoint_bench::{median_of, plugin_path};

/// A field of /proc/self/status, in bytes.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("the field is there")
        * 1024
}

/// One load on a new runtime over `cache`: (time, peak RSS growth).
fn load(rt: &tokio::runtime::Runtime, name: &str, cache: &std::path::Path) -> (Duration, u64) {
    let config = RuntimeConfig {
        cache_dir: Some(cache.to_path_buf()),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(&config).unwrap();
    // Reset the peak to the current resident set.
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
    let before = status_kib("VmRSS:");
    let start = Instant::now();
    let plugin = rt
        .block_on(runtime.load(&plugin_path(name), PluginConfig::default(), Store::new()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let took = start.elapsed();
    let peak = status_kib("VmHWM:").saturating_sub(before);
    drop(plugin);
    (took, peak)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("\n## Load: cold (compile) vs warm (cache hit on a new runtime), median of 3\n");
    println!(
        "| plugin | size | cold | cold peak RSS | warm | warm peak RSS | warm vs cold time | warm vs cold RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, language) in [
        ("hello", "Rust"),
        ("hello-py", "Python"),
        ("hello-js", "JavaScript"),
    ] {
        let size = std::fs::metadata(plugin_path(name)).unwrap().len();
        let cold = median_of(
            3,
            || {
                let cache = tempfile::tempdir().unwrap();
                load(&rt, name, cache.path())
            },
            |(d, _)| *d,
        );
        let cache = tempfile::tempdir().unwrap();
        load(&rt, name, cache.path());
        let warm = median_of(3, || load(&rt, name, cache.path()), |(d, _)| *d);
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "| {name} ({language}) | {:.1} MB | {:.2} s | {:.0} MB | {:.3} s | {:.0} MB | {:.4}× | {:.2}× |",
            mb(size),
            cold.0.as_secs_f64(),
            mb(cold.1),
            warm.0.as_secs_f64(),
            mb(warm.1),
            warm.0.as_secs_f64() / cold.0.as_secs_f64(),
            warm.1 as f64 / cold.1.max(1) as f64,
        );
    }
}
