//! Event sources beyond the store's own change feed and the HTTP API (which
//! lives in [`crate::api`], CloudEvents included).
//!
//! - [`manifests`]: a watched set of manifest files and folders.
//! - [`plugins`]: a watched folder of plugin components.

pub mod manifests;
pub mod plugins;

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Wait for the next burst of events on `events` to end: the first event,
/// then until none has come for `quiet`. `false` once `events` is closed or
/// `shutdown` is cancelled, when the watcher should stop. A watcher reads its
/// files once per burst, so a file written in many steps is read once, after
/// the last.
pub async fn next_burst<T>(
    events: &mut UnboundedReceiver<T>,
    quiet: Duration,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        event = events.recv() => if event.is_none() { return false },
        _ = shutdown.cancelled() => return false,
    }
    loop {
        tokio::select! {
            more = tokio::time::timeout(quiet, events.recv()) => match more {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            },
            _ = shutdown.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_ends_only_after_a_quiet_spell() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let quiet = Duration::from_millis(300);
        let sender = tokio::spawn(async move {
            for _ in 0..5 {
                tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Keep the channel open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        let start = tokio::time::Instant::now();
        assert!(next_burst(&mut rx, quiet, &stop).await);
        // The last event came at 800 ms; the burst ends 300 ms later.
        assert_eq!(start.elapsed(), Duration::from_millis(1100));
        stop.cancel();
        assert!(!next_burst(&mut rx, quiet, &stop).await);
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_stops_the_watcher() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        drop(tx);
        assert!(!next_burst(&mut rx, Duration::from_millis(1), &CancellationToken::new()).await);
    }
}
