//! Changes other replicas made, applied to the in-memory copy.
//!
//! Guarantees:
//! - A change is applied under the store's lock and its commit order, so it
//!   never lands between a commit's read of memory and the commit itself. It
//!   waits for a flush in flight without holding the store's lock, so reads
//!   and reconciles go on meanwhile.
//! - A change another replica committed wins over one this replica has not
//!   committed yet (written behind): the pending one is dropped.
//! - Watchers hear of a remote change as of a local one: a new object is
//!   `created`, a new generation `updated`, a deletion mark `deleted`, a
//!   removal `deleted` plus a `removed` event; a change to an object's
//!   plugin-written status only reaches `/v1/watch`.

use super::Store;
use super::backend::Remote;
use super::feed::WatchEvent;
use crate::object::Action;

impl Store {
    /// Apply `rows` (the backend's [`Sink`](super::Sink)): row `i` only if
    /// `current(i)` still holds now.
    pub(super) fn absorb(&self, rows: Vec<Remote>, current: &dyn Fn(usize) -> bool) {
        // Never hold the store's lock while a flush's transaction is in
        // flight (it holds the commit order without the store's lock, for as
        // long as etcd takes): wait for it outside, then try again.
        let (mut inner, _order) = loop {
            let inner = self.lock();
            match self.shared.commit_order.try_lock() {
                Ok(order) => break (inner, order),
                Err(std::sync::TryLockError::Poisoned(e)) => break (inner, e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    drop(inner);
                    drop(self.commit_order());
                }
            }
        };
        for (i, row) in rows.into_iter().enumerate() {
            if !current(i) {
                continue;
            }
            match row {
                Remote::Object(key, Some(object)) => {
                    let object = *object;
                    if inner.dirty_objects.remove(&key) {
                        replaced(&key);
                    }
                    inner.next_version = inner.next_version.max(object.metadata.resource_version);
                    let action = match inner.objects.get(&key) {
                        Some(old) if *old == object => continue,
                        None => Some(Action::Created),
                        Some(old) if object.is_deleting() && !old.is_deleting() => {
                            Some(Action::Deleted)
                        }
                        Some(old)
                            if old.metadata.generation != object.metadata.generation
                                || old.metadata.labels != object.metadata.labels
                                || old.metadata.finalizers != object.metadata.finalizers =>
                        {
                            Some(Action::Updated)
                        }
                        Some(_) => None,
                    };
                    inner.objects.insert(key.clone(), object.clone());
                    inner.refresh(&key);
                    match action {
                        Some(action) => self.announce_applied(&mut inner, &object, action),
                        None => self.publish(|| WatchEvent::Applied {
                            action: Action::Updated,
                            object,
                        }),
                    }
                }
                Remote::Object(key, None) => {
                    inner.dirty_objects.remove(&key);
                    if inner.objects.remove(&key).is_some() {
                        inner.refresh(&key);
                        self.notify_watchers(&mut inner, &key, Action::Deleted);
                        self.publish(|| WatchEvent::Removed {
                            key: key.to_string(),
                        });
                    }
                }
                Remote::Status(key, status) => {
                    if inner.dirty_status.remove(&key) {
                        replaced(&key);
                    }
                    if inner.status.get(&key) == status.as_ref() {
                        continue;
                    }
                    match status {
                        Some(status) => {
                            inner.status.insert(key.clone(), status.clone());
                            inner.refresh(&key);
                            self.publish(|| WatchEvent::Status {
                                key: key.to_string(),
                                status,
                            });
                        }
                        None => {
                            inner.status.remove(&key);
                            inner.refresh(&key);
                        }
                    }
                }
                Remote::Kv(key, value) => {
                    inner.dirty_kv.remove(&key);
                    match value {
                        Some(v) => inner.kv.insert(key, v),
                        None => inner.kv.remove(&key),
                    };
                }
            }
        }
    }
}

/// A change written behind here lost to one another replica committed.
fn replaced(key: &crate::object::ObjectKey) {
    tracing::info!(%key, "replaced before it was written: another replica committed a change to it first");
}
