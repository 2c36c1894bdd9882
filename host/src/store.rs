//! The desired-state store: objects, their reconcile status, plugin key-value data,
//! and a change feed.
//!
//! Guarantees:
//! - A spec change bumps `metadata.generation`; every write bumps
//!   `metadata.resourceVersion`. Re-applying an identical object changes nothing
//!   and emits no change.
//! - A delete only marks the object deleting; it is removed by [`Store::remove`]
//!   once its controller reconciled the delete (the host's finalizer).
//! - Every change is delivered to every watcher of its kind, in order, and none
//!   is dropped: watchers get an unbounded channel of keys, and the queue behind
//!   them deduplicates.
//!
//! This first store keeps everything in memory; the durable embedded store
//! replaces the inside of this type, not its interface.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::object::{Object, ObjectKey};

/// Why a key is being reconciled. Mirrors the WIT `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Deleted,
    Resynced,
}

/// One change to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: ObjectKey,
    pub action: Action,
}

/// Where an object stands with its controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Changed since it was last reconciled successfully.
    Pending,
    /// Reconciled successfully at `observed_generation`.
    Done,
    /// The last attempt failed; see `last_error`.
    Error,
}

/// The reconcile status every object has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileStatus {
    pub phase: Phase,
    pub last_error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub updated_at: u64,
    pub observed_generation: u64,
}

/// A write the store refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(ObjectKey),
    #[error("status for {key} is not valid JSON: {why}")]
    InvalidStatus { key: ObjectKey, why: String },
}

/// The desired-state store. Cheap to clone; clones share the same data.
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    // Hash maps: every reconcile looks objects up several times, and a B-tree
    // of `ObjectKey`s pays three string comparisons per level (see BENCHMARKS.md).
    objects: HashMap<ObjectKey, Object>,
    status: HashMap<ObjectKey, ReconcileStatus>,
    kv: BTreeMap<(String, String), Vec<u8>>,
    next_uid: u64,
    next_version: u64,
    watchers: Vec<Watcher>,
}

struct Watcher {
    kinds: Vec<String>,
    tx: mpsc::UnboundedSender<Change>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a
        // way later readers would misread, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Create or update an object from a manifest. Returns the stored object and
    /// the change it caused, or `None` if it was identical to what was stored.
    pub fn apply(&self, mut object: Object) -> (Object, Option<Action>) {
        let mut inner = self.lock();
        let key = object.key();
        let action = match inner.objects.get(&key) {
            None => {
                inner.next_uid += 1;
                object.metadata.uid = format!("{:016x}", inner.next_uid);
                object.metadata.generation = 1;
                object.metadata.deletion_timestamp = None;
                Action::Created
            }
            Some(old) => {
                let spec_changed = old.spec != object.spec;
                if !spec_changed && old.metadata.labels == object.metadata.labels {
                    return (old.clone(), None);
                }
                object.metadata.uid = old.metadata.uid.clone();
                object.metadata.generation = old.metadata.generation + u64::from(spec_changed);
                object.metadata.deletion_timestamp = old.metadata.deletion_timestamp;
                object.metadata.finalizers = old.metadata.finalizers.clone();
                object.status = old.status.clone();
                Action::Updated
            }
        };
        inner.next_version += 1;
        object.metadata.resource_version = inner.next_version;
        inner.objects.insert(key.clone(), object.clone());
        let generation = object.metadata.generation;
        inner.set_phase(&key, Phase::Pending, None, generation);
        inner.notify(&key, action);
        (object, Some(action))
    }

    /// One object, deleting or not.
    pub fn get(&self, key: &ObjectKey) -> Option<Object> {
        self.lock().objects.get(key).cloned()
    }

    /// Every object of `kind` whose labels include `selector`, in key order.
    pub fn list(&self, kind: &str, selector: &BTreeMap<String, String>) -> Vec<Object> {
        let mut objects: Vec<Object> = self
            .lock()
            .objects
            .values()
            .filter(|o| o.kind == kind && o.matches(selector))
            .cloned()
            .collect();
        objects.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        objects
    }

    /// Every key of `kind`, in order.
    pub fn keys(&self, kind: &str) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = self
            .lock()
            .objects
            .keys()
            .filter(|k| k.kind == kind)
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Replace an object's `status` with a JSON document.
    pub fn set_status(&self, key: &ObjectKey, status: &str) -> Result<(), StoreError> {
        let value: serde_json::Value =
            serde_json::from_str(status).map_err(|e| StoreError::InvalidStatus {
                key: key.clone(),
                why: e.to_string(),
            })?;
        let mut inner = self.lock();
        inner.next_version += 1;
        let version = inner.next_version;
        let object = inner
            .objects
            .get_mut(key)
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        object.status = Some(value);
        object.metadata.resource_version = version;
        Ok(())
    }

    /// Mark an object deleting. Its controller reconciles the delete, then calls
    /// [`Store::remove`]. Deleting an object twice is not an error.
    pub fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let object = inner
            .objects
            .get_mut(key)
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        if object.metadata.deletion_timestamp.is_none() {
            object.metadata.deletion_timestamp = Some(now_ms());
        }
        let generation = object.metadata.generation;
        inner.set_phase(key, Phase::Pending, None, generation);
        inner.notify(key, Action::Deleted);
        Ok(())
    }

    /// Remove a deleting object for good, once its delete was reconciled.
    /// Returns false if the object was not deleting (it was re-created since).
    pub fn remove(&self, key: &ObjectKey) -> bool {
        let mut inner = self.lock();
        match inner.objects.get(key) {
            Some(o) if o.is_deleting() => {
                inner.objects.remove(key);
                inner.status.remove(key);
                true
            }
            _ => false,
        }
    }

    /// An object's reconcile status.
    pub fn status(&self, key: &ObjectKey) -> Option<ReconcileStatus> {
        self.lock().status.get(key).cloned()
    }

    /// Record a successful reconcile of `generation`.
    pub fn mark_done(&self, key: &ObjectKey, generation: u64) {
        let mut inner = self.lock();
        if inner.objects.contains_key(key) {
            inner.set_phase(key, Phase::Done, None, generation);
        }
    }

    /// Record a failed reconcile.
    pub fn mark_error(&self, key: &ObjectKey, error: &str) {
        let mut inner = self.lock();
        let observed = inner.status.get(key).map_or(0, |s| s.observed_generation);
        if inner.objects.contains_key(key) {
            inner.set_phase(key, Phase::Error, Some(error.to_string()), observed);
        }
    }

    /// Receive every change to objects of `kinds` from now on.
    pub fn watch(&self, kinds: &[String]) -> mpsc::UnboundedReceiver<Change> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().watchers.push(Watcher {
            kinds: kinds.to_vec(),
            tx,
        });
        rx
    }

    /// A plugin's private value for `key`.
    pub fn kv_get(&self, plugin: &str, key: &str) -> Option<Vec<u8>> {
        self.lock()
            .kv
            .get(&(plugin.to_string(), key.to_string()))
            .cloned()
    }

    pub fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) {
        self.lock()
            .kv
            .insert((plugin.to_string(), key.to_string()), value);
    }

    pub fn kv_delete(&self, plugin: &str, key: &str) {
        self.lock()
            .kv
            .remove(&(plugin.to_string(), key.to_string()));
    }

    /// A plugin's keys starting with `prefix`, in order.
    pub fn kv_keys(&self, plugin: &str, prefix: &str) -> Vec<String> {
        let start = (plugin.to_string(), prefix.to_string());
        self.lock()
            .kv
            .range(start..)
            .take_while(|((p, k), _)| p == plugin && k.starts_with(prefix))
            .map(|((_, k), _)| k.clone())
            .collect()
    }
}

impl Inner {
    fn set_phase(&mut self, key: &ObjectKey, phase: Phase, error: Option<String>, generation: u64) {
        self.status.insert(
            key.clone(),
            ReconcileStatus {
                phase,
                last_error: error,
                updated_at: now_ms(),
                observed_generation: generation,
            },
        );
    }

    fn notify(&mut self, key: &ObjectKey, action: Action) {
        self.watchers.retain(|w| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(name: &str, content: &str) -> Object {
        Object::new("File", "", name, json!({ "content": content }))
    }

    #[test]
    fn apply_bumps_generation_only_when_the_spec_changes() {
        let store = Store::new();
        let (a, action) = store.apply(file("a", "1"));
        assert_eq!((a.metadata.generation, action), (1, Some(Action::Created)));
        let (a2, action) = store.apply(file("a", "1"));
        assert_eq!((a2.metadata.generation, action), (1, None));
        let (a3, action) = store.apply(file("a", "2"));
        assert_eq!((a3.metadata.generation, action), (2, Some(Action::Updated)));
        assert_eq!(a3.metadata.uid, a.metadata.uid);
        assert!(a3.metadata.resource_version > a.metadata.resource_version);
    }

    #[test]
    fn delete_marks_deleting_and_remove_finalizes() {
        let store = Store::new();
        let (a, _) = store.apply(file("a", "1"));
        store.delete(&a.key()).unwrap();
        assert!(store.get(&a.key()).unwrap().is_deleting());
        assert!(store.remove(&a.key()));
        assert_eq!(store.get(&a.key()), None);
        assert_eq!(store.delete(&a.key()), Err(StoreError::NotFound(a.key())));
    }

    #[test]
    fn watchers_get_changes_of_their_kinds_only() {
        let store = Store::new();
        let mut files = store.watch(&["File".to_string()]);
        store.apply(Object::new("Other", "", "x", json!({})));
        let (a, _) = store.apply(file("a", "1"));
        store.delete(&a.key()).unwrap();
        assert_eq!(files.try_recv().unwrap().action, Action::Created);
        assert_eq!(files.try_recv().unwrap().action, Action::Deleted);
        assert!(files.try_recv().is_err());
    }

    #[test]
    fn set_status_refuses_invalid_json_and_missing_objects() {
        let store = Store::new();
        let (a, _) = store.apply(file("a", "1"));
        assert!(matches!(
            store.set_status(&a.key(), "{not json"),
            Err(StoreError::InvalidStatus { .. })
        ));
        assert_eq!(store.get(&a.key()).unwrap().status, None);
        store.set_status(&a.key(), r#"{"ok":true}"#).unwrap();
        assert_eq!(
            store.get(&a.key()).unwrap().status,
            Some(json!({"ok": true}))
        );
        let missing = ObjectKey::new("File", "", "nope");
        assert_eq!(
            store.set_status(&missing, "{}"),
            Err(StoreError::NotFound(missing))
        );
    }

    #[test]
    fn kv_keys_are_private_to_each_plugin() {
        let store = Store::new();
        store.kv_set("p1", "a/1", b"x".to_vec());
        store.kv_set("p1", "a/2", b"y".to_vec());
        store.kv_set("p1", "b/1", b"z".to_vec());
        store.kv_set("p2", "a/3", b"w".to_vec());
        assert_eq!(store.kv_keys("p1", "a/"), vec!["a/1", "a/2"]);
        assert_eq!(store.kv_get("p2", "a/1"), None);
        store.kv_delete("p1", "a/1");
        assert_eq!(store.kv_keys("p1", ""), vec!["a/2", "b/1"]);
    }
}
