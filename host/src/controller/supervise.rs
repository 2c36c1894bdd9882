//! Supervision of a controller's tasks.
//!
//! Guarantees: a panic in any of a controller's tasks (a worker loop, the
//! timers, the leadership follower, the periodic resync or full
//! reconciliation) is caught, logged with the controller and the task,
//! counted in `setpoint_worker_panics_total{controller}`, and the task is
//! started again after a short pause; it never silently stops work. A panic
//! inside one reconcile is handled closer still, by the worker (the key is
//! retried with back-off and the worker carries on).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use super::Controller;

/// How long a task that panicked waits before it starts again, so a task that
/// panics at once every time cannot spin.
pub const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// Run the task `start` makes until it returns; start it again whenever it
/// panics.
pub async fn supervised<F, Fut>(controller: Arc<Controller>, task: &'static str, start: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        match AssertUnwindSafe(start()).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                tracing::error!(
                    controller = %controller.name(),
                    task,
                    "a controller task panicked; starting it again: {message}"
                );
                controller.metrics.worker_panicked();
                tokio::time::sleep(RESTART_PAUSE).await;
            }
        }
    }
}

/// The message a panic was raised with, if it has one.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
