//! Prometheus metrics, with controller-runtime's names where they apply, labelled
//! by controller, plus the host's own (plugin loads, traps, timeouts, leadership).
//!
//! [`Metrics`] owns the registry; [`Metrics::controller`] gives one controller its
//! handle. Gauges that describe "now" (queue depth, unfinished work, the longest
//! running reconcile) are set by the controllers when the registry is encoded, so
//! a scrape always sees current values. [`Metrics::forget`] drops a controller's
//! series when it is replaced or removed, so its counters start from zero.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_counters_with_total_in_prometheus_text() {
        let metrics = Arc::new(Metrics::new());
        let c = metrics.controller("files");
        c.added();
        c.reconciled(ReconcileResult::Success, Duration::from_millis(3));
        let open = metrics.encode();
        assert!(open.ends_with("# EOF\n"));
        assert!(open.contains("# TYPE workqueue_adds counter"));
        let text = to_prometheus_text(&open);
        assert!(
            text.contains("# TYPE workqueue_adds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP workqueue_adds_total Keys added"),
            "{text}"
        );
        assert!(
            text.contains("workqueue_adds_total{controller=\"files\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE workqueue_depth gauge\n"), "{text}");
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn forced_deletes_are_counted_by_kind() {
        let metrics = Metrics::new();
        metrics.forced_delete("File");
        metrics.forced_delete("File");
        metrics.forced_delete("Greeting");
        let text = to_prometheus_text(&metrics.encode());
        assert!(
            text.contains("# TYPE setpoint_forced_deletes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("setpoint_forced_deletes_total{kind=\"File\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("setpoint_forced_deletes_total{kind=\"Greeting\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn metrics_forget_drops_a_controllers_series() {
        let metrics = Arc::new(Metrics::new());
        metrics.controller("a").added();
        metrics.controller("b").added();
        metrics.forget("a");
        let text = metrics.encode();
        assert!(!text.contains("controller=\"a\""), "{text}");
        assert!(text.contains("controller=\"b\""), "{text}");
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActiveLabel {
    pub controller: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SwapLabel {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
    pub outcome: String,
}

/// The values of `reconcile_total`'s `result` label.
const RESULTS: [&str; 3] = ["success", "requeue", "error"];

type Seconds = Family<ControllerLabel, Histogram, fn() -> Histogram>;
type FloatGauge = Family<ControllerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn seconds_histogram() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

/// Every metric the host exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub depth: Family<ControllerLabel, Gauge>,
    pub adds: Family<ControllerLabel, Counter>,
    pub retries: Family<ControllerLabel, Counter>,
    pub dropped: Family<ControllerLabel, Counter>,
    pub queue_duration: Seconds,
    pub work_duration: Seconds,
    pub unfinished: FloatGauge,
    pub longest_running: FloatGauge,
    pub reconciles: Family<ResultLabel, Counter>,
    pub errors: Family<ControllerLabel, Counter>,
    pub given_up: Family<ControllerLabel, Counter>,
    pub reconcile_time: Seconds,
    pub active_workers: Family<ControllerLabel, Gauge>,
    pub plugin_loads: Family<PluginLabel, Counter>,
    pub plugin_failures: Family<PluginLabel, Counter>,
    pub plugin_swaps: Family<SwapLabel, Counter>,
    pub plugin_rollbacks: Family<ControllerLabel, Counter>,
    pub plugin_load_failures: Family<ControllerLabel, Counter>,
    pub plugin_active: Family<ActiveLabel, Gauge>,
    pub forced_deletes: Family<KindLabel, Counter>,
    pub leader: Gauge,
    /// Shards this replica holds (replicas on etcd).
    pub owned_shards: Gauge,
    /// Owner writes refused because this replica no longer owned the key.
    pub fenced_writes: Counter,
    pub full_reconciliations: Family<ControllerLabel, Counter>,
    pub prune_errors: Family<ControllerLabel, Counter>,
    pub out_of_sync: Family<ControllerLabel, Counter>,
    pub worker_panics: Family<ControllerLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Mutex::new(Registry::default()),
            depth: Family::default(),
            adds: Family::default(),
            retries: Family::default(),
            dropped: Family::default(),
            queue_duration: Family::new_with_constructor(seconds_histogram),
            work_duration: Family::new_with_constructor(seconds_histogram),
            unfinished: Family::default(),
            longest_running: Family::default(),
            reconciles: Family::default(),
            errors: Family::default(),
            given_up: Family::default(),
            reconcile_time: Family::new_with_constructor(seconds_histogram),
            active_workers: Family::default(),
            plugin_loads: Family::default(),
            plugin_failures: Family::default(),
            plugin_swaps: Family::default(),
            plugin_rollbacks: Family::default(),
            plugin_load_failures: Family::default(),
            plugin_active: Family::default(),
            forced_deletes: Family::default(),
            leader: Gauge::default(),
            owned_shards: Gauge::default(),
            fenced_writes: Counter::default(),
            full_reconciliations: Family::default(),
            prune_errors: Family::default(),
            out_of_sync: Family::default(),
            worker_panics: Family::default(),
        };
        let r = &mut registry;
        r.register(
            "workqueue_depth",
            "Keys waiting in the work queue",
            m.depth.clone(),
        );
        r.register(
            "workqueue_adds",
            "Keys added to the work queue",
            m.adds.clone(),
        );
        r.register("workqueue_retries", "Retries scheduled", m.retries.clone());
        r.register(
            "workqueue_dropped",
            "Keys the worker hasher dropped",
            m.dropped.clone(),
        );
        r.register(
            "workqueue_queue_duration_seconds",
            "How long a key waited in the queue before a worker took it",
            m.queue_duration.clone(),
        );
        r.register(
            "workqueue_work_duration_seconds",
            "How long a worker processed a key",
            m.work_duration.clone(),
        );
        r.register(
            "workqueue_unfinished_work_seconds",
            "Seconds of work in progress not yet observed by work_duration",
            m.unfinished.clone(),
        );
        r.register(
            "workqueue_longest_running_processor_seconds",
            "How long the longest running reconcile has been running",
            m.longest_running.clone(),
        );
        r.register(
            "reconcile",
            "Reconciles by result (success, requeue, error)",
            m.reconciles.clone(),
        );
        r.register("reconcile_errors", "Failed reconciles", m.errors.clone());
        r.register(
            "reconcile_given_up",
            "Keys given up after max-retries failures in a row",
            m.given_up.clone(),
        );
        r.register(
            "reconcile_time_seconds",
            "How long one reconcile call took",
            m.reconcile_time.clone(),
        );
        r.register(
            "active_workers",
            "Workers reconciling right now",
            m.active_workers.clone(),
        );
        r.register(
            "setpoint_plugin_loads",
            "Plugin loads by outcome (compiled, cached, failed)",
            m.plugin_loads.clone(),
        );
        r.register(
            "setpoint_plugin_call_failures",
            "Plugin calls that failed by trap, timeout or out of memory",
            m.plugin_failures.clone(),
        );
        r.register(
            "setpoint_plugin_swaps",
            "Swaps and rollbacks of a controller's plugin, by result (swapped, rolled-back, refused)",
            m.plugin_swaps.clone(),
        );
        r.register(
            "setpoint_plugin_rollbacks",
            "Rollbacks of a controller's plugin to a kept earlier version",
            m.plugin_rollbacks.clone(),
        );
        r.register(
            "setpoint_plugin_load_failures",
            "Plugin versions that failed to load (at start, load or swap)",
            m.plugin_load_failures.clone(),
        );
        r.register(
            "setpoint_plugin_active_info",
            "The active plugin version of each controller (always 1)",
            m.plugin_active.clone(),
        );
        r.register(
            "setpoint_forced_deletes",
            "Objects removed by a forced delete, without waiting for their finalizers",
            m.forced_deletes.clone(),
        );
        r.register(
            "setpoint_leader",
            "1 while this process owns every key (the single-process default, or the leader), else 0",
            m.leader.clone(),
        );
        r.register(
            "setpoint_owned_shards",
            "Shards this replica holds (replicas sharing the work through etcd)",
            m.owned_shards.clone(),
        );
        r.register(
            "setpoint_fenced_writes",
            "Writes refused because this replica no longer owned their key (a late write of a deposed owner)",
            m.fenced_writes.clone(),
        );
        r.register(
            "setpoint_full_reconciliations",
            "Full reconciliations started (prune, then every object)",
            m.full_reconciliations.clone(),
        );
        r.register(
            "setpoint_worker_panics",
            "Panics caught in a controller's workers and tasks (each key is retried, each task restarted)",
            m.worker_panics.clone(),
        );
        r.register(
            "setpoint_prune_errors",
            "Full reconciliations whose prune failed",
            m.prune_errors.clone(),
        );
        r.register(
            "setpoint_full_reconciliation_out_of_sync",
            "Objects a full reconciliation found out of line with their desired state",
            m.out_of_sync.clone(),
        );
        *m.registry.lock().expect("fresh lock") = registry;
        m
    }

    /// A handle for one controller's series, each created at zero so a scrape
    /// shows every metric from the start. The handle holds the series
    /// themselves, so recording is an atomic update with no lookup.
    pub fn controller(self: &Arc<Self>, name: &str) -> ControllerMetrics {
        let label = ControllerLabel {
            controller: name.to_string(),
        };
        let result = |result: &str| {
            self.reconciles
                .get_or_create(&ResultLabel {
                    controller: name.to_string(),
                    result: result.to_string(),
                })
                .clone()
        };
        ControllerMetrics {
            depth: self.depth.get_or_create(&label).clone(),
            adds: self.adds.get_or_create(&label).clone(),
            retries: self.retries.get_or_create(&label).clone(),
            dropped: self.dropped.get_or_create(&label).clone(),
            queue_duration: self.queue_duration.get_or_create(&label).clone(),
            work_duration: self.work_duration.get_or_create(&label).clone(),
            unfinished: self.unfinished.get_or_create(&label).clone(),
            longest_running: self.longest_running.get_or_create(&label).clone(),
            errors: self.errors.get_or_create(&label).clone(),
            given_up: self.given_up.get_or_create(&label).clone(),
            reconcile_time: self.reconcile_time.get_or_create(&label).clone(),
            active_workers: self.active_workers.get_or_create(&label).clone(),
            full_reconciliations: self.full_reconciliations.get_or_create(&label).clone(),
            prune_errors: self.prune_errors.get_or_create(&label).clone(),
            out_of_sync: self.out_of_sync.get_or_create(&label).clone(),
            worker_panics: self.worker_panics.get_or_create(&label).clone(),
            active: Arc::default(),
            name: name.to_string(),
            success: result("success"),
            requeue: result("requeue"),
            error: result("error"),
            metrics: self.clone(),
        }
    }

    /// Drop every series of `controller`.
    pub fn forget(&self, controller: &str) {
        let label = ControllerLabel {
            controller: controller.to_string(),
        };
        self.depth.remove(&label);
        self.adds.remove(&label);
        self.retries.remove(&label);
        self.dropped.remove(&label);
        self.queue_duration.remove(&label);
        self.work_duration.remove(&label);
        self.unfinished.remove(&label);
        self.longest_running.remove(&label);
        self.errors.remove(&label);
        self.given_up.remove(&label);
        self.reconcile_time.remove(&label);
        self.active_workers.remove(&label);
        self.full_reconciliations.remove(&label);
        self.prune_errors.remove(&label);
        self.out_of_sync.remove(&label);
        self.worker_panics.remove(&label);
        for result in RESULTS {
            self.reconciles.remove(&ResultLabel {
                controller: controller.to_string(),
                result: result.to_string(),
            });
        }
    }

    /// Count a plugin load or call failure.
    /// A swap or rollback of `controller`'s plugin: `swapped`, `rolled-back`
    /// or `refused`.
    /// A plugin version failed to load (at start, or for a load or swap).
    pub fn load_failed(&self, plugin: &str) {
        self.plugin_load_failures
            .get_or_create(&ControllerLabel {
                controller: plugin.to_string(),
            })
            .inc();
    }

    pub fn swapped(&self, controller: &str, result: &str) {
        if result == "rolled-back" {
            self.plugin_rollbacks
                .get_or_create(&ControllerLabel {
                    controller: controller.to_string(),
                })
                .inc();
        }
        self.plugin_swaps
            .get_or_create(&SwapLabel {
                controller: controller.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn plugin_event(&self, family: &Family<PluginLabel, Counter>, plugin: &str, outcome: &str) {
        family
            .get_or_create(&PluginLabel {
                plugin: plugin.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Count an object of `kind` removed by a forced delete.
    pub fn forced_delete(&self, kind: &str) {
        self.forced_deletes
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Export the plugin runtime's count of refused outgoing HTTP requests
    /// as `setpoint_plugin_http_denied_total{plugin}`.
    pub fn register_http_denied(&self, denied: crate::plugin::http::DeniedCounter) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(
                "setpoint_plugin_http_denied",
                "Outgoing HTTP requests refused because their host is not granted",
                denied,
            );
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Rewrite OpenMetrics text as Prometheus text format 0.0.4, for scrapers and
/// tools (such as `promtool check metrics`) that do not speak OpenMetrics: a
/// counter family is named with its `_total` suffix, and the `# UNIT` and `# EOF`
/// lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match header {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// One controller's series.
#[derive(Clone)]
pub struct ControllerMetrics {
    metrics: Arc<Metrics>,
    name: String,
    depth: Gauge,
    adds: Counter,
    retries: Counter,
    dropped: Counter,
    queue_duration: Histogram,
    work_duration: Histogram,
    unfinished: Gauge<f64, std::sync::atomic::AtomicU64>,
    longest_running: Gauge<f64, std::sync::atomic::AtomicU64>,
    errors: Counter,
    given_up: Counter,
    reconcile_time: Histogram,
    active_workers: Gauge,
    full_reconciliations: Counter,
    prune_errors: Counter,
    out_of_sync: Counter,
    worker_panics: Counter,
    /// The labels of this controller's `setpoint_plugin_active_info` series.
    active: Arc<Mutex<Option<ActiveLabel>>>,
    success: Counter,
    requeue: Counter,
    error: Counter,
}

impl ControllerMetrics {
    pub fn all(&self) -> &Metrics {
        &self.metrics
    }

    pub fn added(&self) {
        self.adds.inc();
    }

    pub fn dropped(&self) {
        self.dropped.inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    /// A full reconciliation started; `prune_failed` if its prune did.
    pub fn full_reconciliation(&self, prune_failed: bool) {
        self.full_reconciliations.inc();
        if prune_failed {
            self.prune_errors.inc();
        }
    }

    pub fn out_of_sync(&self) {
        self.out_of_sync.inc();
    }

    /// `version` (with the component's `sha256`) is the active plugin now:
    /// `setpoint_plugin_active_info` shows it (and no longer the one before).
    pub fn activated(&self, version: &str, sha256: &str) {
        let label = ActiveLabel {
            controller: self.name.clone(),
            version: version.to_string(),
            sha256: sha256.to_string(),
        };
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = active.take() {
            self.metrics.plugin_active.remove(&old);
        }
        self.metrics.plugin_active.get_or_create(&label).set(1);
        *active = Some(label);
    }

    /// The controller is gone: drop its `setpoint_plugin_active_info` series.
    pub fn deactivated(&self) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = active.take() {
            self.metrics.plugin_active.remove(&old);
        }
    }

    /// A panic in one of the controller's tasks was caught.
    pub fn worker_panicked(&self) {
        self.worker_panics.inc();
    }

    pub fn given_up(&self) {
        self.given_up.inc();
    }

    pub fn waited(&self, d: Duration) {
        self.queue_duration.observe(d.as_secs_f64());
    }

    pub fn worked(&self, d: Duration) {
        self.work_duration.observe(d.as_secs_f64());
    }

    /// One reconcile call: its result and how long it took.
    pub fn reconciled(&self, result: ReconcileResult, took: Duration) {
        match result {
            ReconcileResult::Success => self.success.inc(),
            ReconcileResult::Requeue => self.requeue.inc(),
            ReconcileResult::Error => {
                self.errors.inc();
                self.error.inc()
            }
        };
        self.reconcile_time.observe(took.as_secs_f64());
    }

    pub fn worker_busy(&self, busy: bool) {
        if busy {
            self.active_workers.inc()
        } else {
            self.active_workers.dec()
        };
    }

    /// Set the gauges that describe "now".
    pub fn set_now(&self, depth: usize, unfinished: Duration, longest: Duration) {
        self.depth.set(depth as i64);
        self.unfinished.set(unfinished.as_secs_f64());
        self.longest_running.set(longest.as_secs_f64());
    }
}

/// The `result` label of `reconcile_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileResult {
    Success,
    Requeue,
    Error,
}
