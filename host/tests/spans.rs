//! Log lines inside reconciles carry their own key, under concurrency.
//!
//! In a test binary of its own: tracing caches per call site whether anyone
//! listens, and tests of other modules running on other threads without this
//! subscriber would make that cache say "no one" for the reconcile span.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use setpoint::config::PluginConfig;
use setpoint::controller::{Engine, FnReconciler, Manager, ReconcileCall};
use setpoint::metrics::Metrics;
use setpoint::object::Object;
use setpoint::ownership::Ownership;
use setpoint::plugin::wit;
use setpoint::store::Store;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

fn done() -> ReconcileCall {
    Ok(Ok(wit::Outcome {
        requeue_after: None,
        state: Vec::new(),
        status: None,
    }))
}

/// One event: its `expect` field, and the keys of the spans it was logged in.
type Seen = (Option<String>, Vec<String>);

/// Records, for every event, its `expect` field and the `key` of every span it
/// was logged in.
#[derive(Clone, Default)]
struct KeysInScope {
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct SpanKey(String);

struct FieldValue(&'static str, Option<String>);

impl Visit for FieldValue {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.0 {
            self.1 = Some(format!("{value:?}"));
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for KeysInScope {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut key = FieldValue("key", None);
        attrs.record(&mut key);
        if let (Some(key), Some(span)) = (key.1, ctx.span(id)) {
            span.extensions_mut().insert(SpanKey(key));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut expect = FieldValue("expect", None);
        event.record(&mut expect);
        let keys = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .filter_map(|span| span.extensions().get::<SpanKey>().map(|k| k.0.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.seen.lock().unwrap().push((expect.1, keys));
    }
}

#[tokio::test(start_paused = true)]
async fn every_log_line_inside_a_reconcile_carries_exactly_its_own_key() {
    let layer = KeysInScope::default();
    let _guard = tracing_subscriber::registry()
        .with(layer.clone())
        .set_default();
    let store = Store::new();
    let manager = Manager::new(
        store.clone(),
        Ownership::leading(true),
        Arc::new(Metrics::new()),
    );
    let attempts = Arc::new(AtomicU32::new(0));
    for (name, kind) in [("one", "Left"), ("two", "Right")] {
        let attempts = attempts.clone();
        let reconciler = FnReconciler::new(name, &[kind], move |request: wit::Request| {
            let attempts = attempts.clone();
            async move {
                for step in 0..3 {
                    tracing::info!(expect = %request.key, step, "inside the plugin");
                    // Hand the thread to the other controllers' workers.
                    tokio::task::yield_now().await;
                }
                // A failure now and then, so retries and their logs interleave too.
                if attempts.fetch_add(1, Ordering::Relaxed).is_multiple_of(5) {
                    return Ok(Err(wit::Failure {
                        error: wit::ReconcileError::Retry("again".into()),
                        state: Vec::new(),
                    }));
                }
                done()
            }
        });
        let engine = Engine {
            workers: 3,
            ..Engine::from(&PluginConfig::default())
        };
        manager.add_reconciler(reconciler, engine).unwrap();
    }
    for i in 0..20 {
        for (kind, name) in [("Left", format!("l{i}")), ("Right", format!("r{i}"))] {
            store
                .apply(Object::new(kind, "", &name, serde_json::json!({})))
                .unwrap();
        }
    }
    let waited = store.wait(None, &[], Duration::from_secs(600)).await;
    assert_eq!(waited, Ok(()));
    manager.shutdown().await;
    let seen = layer.seen.lock().unwrap();
    let mut inside = 0;
    for (expect, keys) in seen.iter() {
        if let Some(expect) = expect {
            inside += 1;
            assert_eq!(keys, &vec![expect.clone()], "a plugin's log line");
        } else {
            assert!(keys.len() <= 1, "a host log line in spans of {keys:?}");
        }
    }
    assert!(
        inside >= 40 * 3,
        "only {inside} log lines from inside reconciles"
    );
}
