//! One reconcile through the host versus the same logic as a native function.
//!
//! Two cases, with the `bench` example plugin:
//! - `noop`: the plugin does nothing;
//! - `work`: decode a ~1 KB JSON spec, compute a placement, encode a status.
//!
//! Each runs natively (the plugin crate called as a Rust library, through the
//! same spec decoding and status encoding the SDK does in Wasm), through the host
//! on a warm instance, and through the host on a fresh instance per call. After
//! criterion's own report, a summary prints ns/op and each mode's ratio to native.
//!
//! Run with `cargo xtask bench` (it builds the plugin first).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use setpoint::config::{InstanceMode, PluginConfig, RuntimeConfig};
use setpoint::object::Object;
use setpoint::plugin::{Plugin, Runtime, object_to_wit, wit};
use setpoint::store::Store;
use setpoint_sdk::Reconciler;

const CASES: [(&str, &str); 2] = [("noop", "Noop"), ("work", "Work")];

fn spec(case: &str) -> serde_json::Value {
    match case {
        "noop" => serde_json::json!({}),
        _ => bench::sample_spec(),
    }
}

fn plugin_path() -> PathBuf {
    setpoint_bench::plugin_path("bench")
}

/// The native path: what the SDK does inside the component, minus the component.
fn native_reconcile(spec_json: &str) -> Option<String> {
    let host = setpoint_sdk::testing::FakeHost::new();
    let object = setpoint_sdk::Object {
        spec: serde_json::from_str(spec_json).unwrap(),
        ..setpoint_sdk::Object::new("Work", "w", serde_json::Value::Null)
    };
    let request = setpoint_sdk::decode_request(
        object.key(),
        setpoint_sdk::Action::Created,
        object,
        0,
        Default::default(),
    )
    .unwrap();
    let outcome = bench::Bench.reconcile(&host, request).unwrap();
    setpoint_sdk::encode_status(&outcome.status).unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(&RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let store = Store::new();
    let load = |mode: InstanceMode| -> Plugin {
        let settings = PluginConfig {
            instances: mode,
            recycle_after: u64::MAX,
            ..PluginConfig::default()
        };
        rt.block_on(runtime.load(&plugin_path(), settings, store.clone()))
            .unwrap()
    };
    let warm = load(InstanceMode::Warm);
    let fresh = load(InstanceMode::Fresh);

    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (case, kind) in CASES {
        let object = store
            .apply(Object::new(kind, "", case, spec(case)))
            .unwrap()
            .object;
        let request = wit::Request {
            key: object.key().to_string(),
            action: wit::Action::Created,
            object: object_to_wit(&object),
            attempt: 0,
            state: Vec::new(),
        };
        let spec_json = object.spec.to_string();
        let mut group = c.benchmark_group(format!("reconcile/{case}"));
        group.bench_function(BenchmarkId::from_parameter("native"), |b| {
            b.iter(|| native_reconcile(std::hint::black_box(&spec_json)))
        });
        for (mode, plugin) in [("warm", &warm), ("fresh", &fresh)] {
            let mut instance = plugin.instance();
            group.bench_function(BenchmarkId::from_parameter(mode), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let outcome = instance.reconcile(&request).await.unwrap().unwrap();
                            std::hint::black_box(outcome);
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.finish();
    }
    c.final_summary();
    summary();
}

/// ns/op for each case and mode from criterion's estimates, with ratios to native.
fn summary() {
    let dir = PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .into_os_string()
    }))
    .join("criterion");
    let estimate = |case: &str, mode: &str| -> Option<f64> {
        let path = dir.join(format!("reconcile_{case}/{mode}/new/estimates.json"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        json["median"]["point_estimate"].as_f64()
    };
    println!(
        "\n| case | native ns/op | warm ns/op | fresh ns/op | warm / native | fresh / native | fresh / warm |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (case, _) in CASES {
        let (Some(n), Some(w), Some(f)) = (
            estimate(case, "native"),
            estimate(case, "warm"),
            estimate(case, "fresh"),
        ) else {
            println!("| {case} | (not measured in this run) |");
            continue;
        };
        println!(
            "| {case} | {n:.0} | {w:.0} | {f:.0} | {:.1}× | {:.1}× | {:.1}× |",
            w / n,
            f / n,
            f / w
        );
    }
}
