//! Shared pieces of Setpoint's benchmarks: a counting allocator for memory
//! figures, the example plugins' location, percentiles, and the `hello`
//! controller as the daemon runs it ([`HelloRig`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The system allocator, counting the bytes currently allocated.
pub struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is only bookkeeping and does not affect the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's, passed through.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's, passed through.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's, passed through.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// Bytes allocated right now (with [`Counting`] as the global allocator).
pub fn allocated() -> usize {
    ALLOCATED.load(Ordering::Relaxed)
}

/// The folder of example plugin components built by `cargo xtask plugins`.
pub fn plugin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("SETPOINT_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask bench`",
        path.display()
    );
    path
}

/// The `p`-th percentile (0–100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// The median of three or more runs of `f`.
pub fn median_of<T: Clone, K: PartialOrd>(
    runs: usize,
    mut f: impl FnMut() -> T,
    key: impl Fn(&T) -> K,
) -> T {
    let mut all: Vec<T> = (0..runs).map(|_| f()).collect();
    all.sort_by(|a, b| key(a).partial_cmp(&key(b)).expect("comparable"));
    all[all.len() / 2].clone()
}

/// The `hello` plugin's controller on a store, as the daemon runs it: a
/// manager, and a flusher committing written-behind changes off the
/// reconcile path. [`HelloRig::start`] starts the controller (so a benchmark
/// can start its clock first); [`HelloRig::stop`] stops both.
pub struct HelloRig {
    pub manager: setpoint::controller::Manager,
    controller: Option<(setpoint::plugin::Plugin, setpoint::controller::Engine)>,
    stop: tokio_util::sync::CancellationToken,
    flusher: tokio::task::JoinHandle<()>,
}

impl HelloRig {
    /// Load `hello` with `workers` and room for `queue_size` keys.
    pub async fn new(
        runtime: &setpoint::plugin::Runtime,
        store: &setpoint::store::Store,
        workers: usize,
        queue_size: usize,
    ) -> Self {
        let settings = setpoint::config::PluginConfig {
            workers,
            queue_size,
            ..Default::default()
        };
        let engine = settings.engine();
        let plugin = runtime
            .load(&plugin_path("hello"), settings, store.clone())
            .await
            .unwrap();
        let manager = setpoint::controller::Manager::new(
            store.clone(),
            setpoint::ownership::Ownership::default(),
            std::sync::Arc::new(setpoint::metrics::Metrics::new()),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let flusher = tokio::spawn(
            store
                .clone()
                .flush_every(Duration::from_secs(1), stop.clone()),
        );
        Self {
            manager,
            controller: Some((plugin, engine)),
            stop,
            flusher,
        }
    }

    /// Start the controller: it lists the store and reconciles.
    pub fn start(&mut self) {
        let (plugin, engine) = self.controller.take().expect("started once");
        self.manager.add(plugin, engine).unwrap();
    }

    /// Stop the controller, then the flusher.
    pub async fn stop(self) {
        self.manager.shutdown().await;
        self.stop.cancel();
        self.flusher.await.unwrap();
    }
}
