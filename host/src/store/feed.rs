//! The store's change feeds: each controller's unbounded channel of changed
//! keys ([`Store::watch`]) and the `/v1/watch` broadcast ([`Store::feed`]).
//!
//! Guarantee: every change is delivered to every watcher of its kind, in
//! order, and none is dropped (the queue behind a controller's channel
//! deduplicates); `/v1/watch` listeners get a bounded broadcast and are told
//! when they fall behind. Events for the broadcast are built only while
//! someone listens.

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::{Inner, ReconcileStatus, Store};
use crate::object::{Action, Object, ObjectKey};

/// One change to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: ObjectKey,
    pub action: Action,
}

/// One event of the `/v1/watch` feed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatchEvent {
    /// An object was created or changed (including being marked deleting).
    Applied { action: Action, object: Object },
    /// An object was removed for good.
    Removed { key: String },
    /// An object's reconcile status changed.
    Status {
        key: String,
        status: ReconcileStatus,
    },
}

impl WatchEvent {
    /// The kind of the object the event is about.
    pub fn kind(&self) -> &str {
        match self {
            WatchEvent::Applied { object, .. } => &object.kind,
            WatchEvent::Removed { key } | WatchEvent::Status { key, .. } => {
                key.split_once(':').map_or("", |(k, _)| k)
            }
        }
    }
}

/// One controller's channel, for the kinds it reconciles.
pub(super) struct Watcher {
    kinds: Vec<String>,
    tx: mpsc::UnboundedSender<Change>,
}

impl Store {
    /// Receive every change to objects of `kinds` from now on.
    pub fn watch(&self, kinds: &[String]) -> mpsc::UnboundedReceiver<Change> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().watchers.push(Watcher {
            kinds: kinds.to_vec(),
            tx,
        });
        rx
    }

    /// The `/v1/watch` feed: every object change, removal and status change from
    /// now on. A listener that falls more than 4096 events behind is told so by
    /// [`broadcast::error::RecvError::Lagged`].
    pub fn feed(&self) -> broadcast::Receiver<WatchEvent> {
        self.shared.feed.subscribe()
    }

    /// Send an event to `/v1/watch` listeners; built only if there are any
    /// (the reconcile path would otherwise clone every object it touches).
    pub(super) fn publish(&self, event: impl FnOnce() -> WatchEvent) {
        if self.shared.feed.receiver_count() > 0 {
            let _ = self.shared.feed.send(event());
        }
    }

    pub(super) fn announce_applied(&self, inner: &mut Inner, object: &Object, action: Action) {
        self.notify_watchers(inner, &object.key(), action);
        self.publish(|| WatchEvent::Applied {
            action,
            object: object.clone(),
        });
    }

    /// Send one change to every watcher of its kind, dropping closed watchers.
    pub(super) fn notify_watchers(&self, inner: &mut Inner, key: &ObjectKey, action: Action) {
        inner.watchers.retain(|w| {
            if !w.kinds.contains(&key.kind) {
                return !w.tx.is_closed();
            }
            w.tx.send(Change {
                key: key.clone(),
                action,
            })
            .is_ok()
        });
    }
}
