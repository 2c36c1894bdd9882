//! The desired-state store: objects, their reconcile status, plugin key-value data,
//! and the change feeds that drive controllers and `/v1/watch`.
//!
//! It is embedded and durable: every write goes to a [redb] database (a single
//! file, ACID, crash-safe copy-on-write B-trees) before it is visible, and reads
//! are served from an in-memory copy loaded at open. [`Store::new`] gives the same
//! store over the [`Memory`] backend (nothing written anywhere), for tests and
//! one-off commands.
//!
//! Guarantees:
//! - Writes of desired state (apply, create, update, delete, finalize) are
//!   committed with fsync before they return: once a caller is told "stored", a
//!   `kill -9` or power loss does not lose it. Several objects applied together
//!   are one transaction: all are stored or none is. Concurrent applies share
//!   a transaction (group commit, see [`apply`]), each still all or nothing.
//! - Reconcile status, the status a plugin writes and plugin key-value data are
//!   written behind: they change the in-memory copy at once and reach the disk
//!   with the next commit, which is at the latest [`FLUSH_EVERY`] such writes
//!   later, at every write of desired state, at every [`Store::flush`] (the
//!   daemon flushes every second) and at shutdown. The reconcile path never
//!   waits for a transaction. After a crash the newest of them may be lost,
//!   which costs one more reconcile of an object that is resynced at start anyway.
//! - Every commit is durable (fsync); there are no half-durable commits.
//! - A spec change bumps `metadata.generation`; every write bumps
//!   `metadata.resourceVersion`. A write that names a `resourceVersion` other
//!   than the stored one is refused as a conflict. Re-applying an identical
//!   object changes nothing and emits no change.
//! - A delete only marks the object deleting (`deletionTimestamp`). It is
//!   removed once every finalizer is gone: each controller of its kind holds one
//!   (`setpoint.dev/<controller>`, added when the object is stored) and drops it
//!   after reconciling the delete. This holds across restarts, because the
//!   deleting mark and the finalizers are stored like the rest of the object.
//!   [`Store::force_delete`] is the way out when a finalizer can never be
//!   dropped: it removes the object at once, finalizers and all.
//! - Every change is delivered to every watcher of its kind, in order, and none
//!   is dropped: controllers get an unbounded channel of keys (the queue behind
//!   it deduplicates). `/v1/watch` listeners get a bounded broadcast and are told
//!   when they fall behind.
//!
//!
//! Layout: this module keeps the [`Store`] facade and the object rules;
//! [`apply`] the client writes and [`group`] how they commit together;
//! [`feed`] the change feeds, `wait` what [`Store::wait`] needs, [`backend`]
//! the seam to where the data lives, with [`Redb`] (durable) and [`Memory`].
//!
//! [redb]: https://docs.rs/redb

mod apply;
mod backend;
mod etcd;
mod feed;
mod group;
mod redb;
mod remote;
mod wait;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use self::backend::{Backend, Commit, KvRow, Loaded, Memory, Remote, Sink};
pub use self::etcd::EtcdBackend;
use self::feed::Watcher;
pub use self::feed::{Change, WatchEvent};
pub use self::redb::Redb;
use self::wait::Unsettled;
use crate::object::{Action, Object, ObjectKey, shorten};

/// Written-behind changes (status, kv) held in memory before a commit, at most.
pub const FLUSH_EVERY: usize = 1000;

/// The prefix of the finalizer each controller holds on the objects it reconciles.
pub const FINALIZER_PREFIX: &str = "setpoint.dev/";

/// Where an object stands with its controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Changed since it was last reconciled successfully.
    Pending,
    /// Reconciled successfully at `observed_generation`.
    Done,
    /// The last attempt failed; see `last_error`, and `terminal` for whether
    /// it will be retried.
    Error,
}

/// The reconcile status every object has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileStatus {
    pub phase: Phase,
    pub last_error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub updated_at: u64,
    /// The generation last reconciled successfully.
    pub observed_generation: u64,
    /// With phase `error`: the failure is for good (a fatal error, or given up
    /// after the last retry), so no retry is scheduled; the object is
    /// reconciled again only when it changes (or on a resync). `false` for an
    /// error that will be retried, and for every other phase.
    #[serde(default)]
    pub terminal: bool,
}

/// Why [`Store::wait`] returned before everything it waited for was reconciled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The timeout passed: the selected objects still not reconciled, in key
    /// order, with their reconcile status.
    TimedOut(Vec<(ObjectKey, Option<ReconcileStatus>)>),
    /// Selected objects failed for good (a fatal error, or given up after the
    /// last retry; `terminal` in their status): nothing will retry them until
    /// they change. In key order, with their status and its `last_error`.
    Failed(Vec<(ObjectKey, ReconcileStatus)>),
}

/// A write the store refused. Nothing of a refused write is stored.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("object {} not found", shorten(&.0.to_string()))]
    NotFound(ObjectKey),
    #[error("object {0} already exists; update it instead (PUT, or `setpoint apply`)")]
    AlreadyExists(ObjectKey),
    #[error(
        "conflict on {key}: the request names resourceVersion {given}, but the stored \
         object is at {stored}; read it again and retry on top of that version"
    )]
    Conflict {
        key: ObjectKey,
        given: u64,
        stored: u64,
    },
    #[error(
        "object {0} is being deleted; wait until it is gone (`setpoint wait`) before \
         applying it again"
    )]
    Deleting(ObjectKey),
    #[error("status for {key} is not valid JSON: {why}")]
    InvalidStatus { key: ObjectKey, why: String },
    #[error("the store could not write: {0}")]
    Storage(String),
    #[error(
        "object {} was changed by another replica meanwhile; read it again and retry",
        shorten(&.0.to_string())
    )]
    Stale(ObjectKey),
    #[error(
        "not written: this replica no longer owns {} (another replica reconciles it now)",
        shorten(&.0.to_string())
    )]
    Fenced(ObjectKey),
    #[error("{0}")]
    TooLarge(String),
}

/// What one applied object became.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The object as stored.
    pub object: Object,
    /// The change it caused, or `None` if it was identical to what was stored.
    pub action: Option<Action>,
}

/// The desired-state store. Cheap to clone; clones share the same data.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Box<dyn Backend>,
    inner: Mutex<Inner>,
    /// Client writes waiting to be committed together (see [`apply`]).
    writes: group::Group<apply::Request, apply::Answer>,
    /// Held from reading a commit's contents until it is committed.
    commit_order: Mutex<()>,
    /// Wakes [`Store::flush_every`] when many changes are pending.
    flush_wanted: tokio::sync::Notify,
    feed: broadcast::Sender<WatchEvent>,
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
    /// The finalizers each kind's objects get: one per controller of the kind.
    finalizers: HashMap<String, Vec<String>>,
    watchers: Vec<Watcher>,
    /// Written behind: changed in memory, not yet committed.
    dirty_objects: HashSet<ObjectKey>,
    dirty_status: HashSet<ObjectKey>,
    dirty_kv: HashSet<(String, String)>,
    /// What [`Store::wait`] needs, kept up to date by every change.
    unsettled: Unsettled,
}

impl Inner {
    /// The stored object at `key`, if `resource_version` (0 or `None`: any)
    /// is the one stored.
    fn current(
        &self,
        key: &ObjectKey,
        resource_version: Option<u64>,
    ) -> Result<Object, StoreError> {
        let object = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        if let Some(given) = resource_version.filter(|v| *v != 0)
            && given != object.metadata.resource_version
        {
            return Err(StoreError::Conflict {
                key: key.clone(),
                given,
                stored: object.metadata.resource_version,
            });
        }
        Ok(object)
    }

    fn dirty(&self) -> usize {
        self.dirty_objects.len() + self.dirty_status.len() + self.dirty_kv.len()
    }
}

/// Milliseconds since the Unix epoch.
/// The finalizer controller `controller` holds on the objects of its kinds.
pub fn finalizer_of(controller: &str) -> String {
    format!("{FINALIZER_PREFIX}{controller}")
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// A staged write: the tables to touch in one transaction.
#[derive(Default)]
struct Batch {
    objects: Vec<(ObjectKey, Option<Object>)>,
    status: Vec<(ObjectKey, Option<ReconcileStatus>)>,
    /// Written as the owner of the keys (see [`Commit::owner`]).
    owner: bool,
}

impl Store {
    /// A store in memory: nothing survives the process.
    pub fn new() -> Self {
        Self::with_backend(Memory).expect("an empty in-memory store always loads")
    }

    /// The durable store in `path` (a redb file), created if missing.
    /// Everything stored is loaded.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let backend = Redb::open(path)?;
        Self::with_backend(backend)
            .map_err(|e| anyhow::anyhow!("cannot load the store {}: {e}", path.display()))
    }

    /// A store over `backend`, loaded from it.
    pub fn with_backend(backend: impl Backend) -> Result<Self, StoreError> {
        let loaded = backend.load()?;
        let mut inner = Inner::default();
        for object in loaded.objects {
            inner.objects.insert(object.key(), object);
        }
        inner.status.extend(loaded.status);
        inner.kv.extend(loaded.kv);
        inner.next_uid = loaded.next_uid;
        inner.next_version = loaded.next_version;
        let keys: Vec<ObjectKey> = inner.objects.keys().cloned().collect();
        for key in &keys {
            inner.refresh(key);
        }
        let store = Self {
            shared: Arc::new(Shared {
                backend: Box::new(backend),
                inner: Mutex::new(inner),
                writes: group::Group::default(),
                commit_order: Mutex::new(()),
                flush_wanted: tokio::sync::Notify::new(),
                feed: broadcast::channel(4096).0,
            }),
        };
        let weak = Arc::downgrade(&store.shared);
        store.shared.backend.follow(Box::new(move |rows, current| {
            if let Some(shared) = weak.upgrade() {
                Store { shared }.absorb(rows, current);
            }
        }));
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every write reaches the database before the maps, under this lock; a
        // panic in between leaves the maps behind the disk, never ahead of it.
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commit `batch`, everything written behind and the counters, in one
    /// durable transaction, holding the store's lock (for writes of desired
    /// state). On failure nothing of `batch` is applied and the written-behind
    /// changes stay pending.
    fn commit(&self, inner: &mut Inner, batch: &Batch) -> Result<(), StoreError> {
        let _order = self.commit_order();
        let mut objects = batch.objects.clone();
        let in_batch: HashSet<&ObjectKey> = batch.objects.iter().map(|(k, _)| k).collect();
        objects.extend(
            inner
                .dirty_objects
                .iter()
                .filter(|k| !in_batch.contains(k))
                .map(|k| (k.clone(), inner.objects.get(k).cloned())),
        );
        let mut status = batch.status.clone();
        let in_batch: HashSet<&ObjectKey> = batch.status.iter().map(|(k, _)| k).collect();
        status.extend(
            inner
                .dirty_status
                .iter()
                .filter(|k| !in_batch.contains(k))
                .map(|k| (k.clone(), inner.status.get(k).cloned())),
        );
        let kv: Vec<_> = inner
            .dirty_kv
            .iter()
            .map(|k| (k.clone(), inner.kv.get(k).cloned()))
            .collect();
        self.shared.backend.commit(&Commit {
            objects: &objects,
            status: &status,
            kv: &kv,
            next_uid: inner.next_uid,
            next_version: inner.next_version,
            required: (batch.objects.len(), batch.status.len()),
            owner: batch.owner,
        })?;
        inner.dirty_objects.clear();
        inner.dirty_status.clear();
        inner.dirty_kv.clear();
        Ok(())
    }

    /// Commits happen in the order their contents were read from memory: a
    /// committer takes this lock before it lets go of the store's lock.
    fn commit_order(&self) -> MutexGuard<'_, ()> {
        self.shared
            .commit_order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// After a write behind: wake the flusher once enough are pending, and
    /// commit right here only if it falls far behind (or none runs).
    fn written_behind(&self, inner: MutexGuard<'_, Inner>) -> Result<(), StoreError> {
        let dirty = inner.dirty();
        if dirty >= 10 * FLUSH_EVERY {
            return self.flush_locked(inner);
        }
        if dirty >= FLUSH_EVERY {
            self.shared.flush_wanted.notify_one();
        }
        Ok(())
    }

    /// Commit every change written behind so far. The store's lock is held
    /// only while the changes are copied out, not during the transaction.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_locked(self.lock())
    }

    fn flush_locked(&self, mut inner: MutexGuard<'_, Inner>) -> Result<(), StoreError> {
        if inner.dirty() == 0 {
            return Ok(());
        }
        let inner_ref = &mut *inner;
        let objects = rows(&mut inner_ref.dirty_objects, &inner_ref.objects);
        let status = rows(&mut inner_ref.dirty_status, &inner_ref.status);
        let kv = rows(&mut inner_ref.dirty_kv, &inner_ref.kv);
        let (uid, version) = (inner.next_uid, inner.next_version);
        let order = self.commit_order();
        drop(inner);
        let result = self.shared.backend.commit(&Commit {
            objects: &objects,
            status: &status,
            kv: &kv,
            next_uid: uid,
            next_version: version,
            required: (0, 0),
            owner: true,
        });
        drop(order);
        if result.is_err() {
            // Still pending: memory has their newest values, the next commit writes them.
            let mut inner = self.lock();
            inner
                .dirty_objects
                .extend(objects.into_iter().map(|(k, _)| k));
            inner
                .dirty_status
                .extend(status.into_iter().map(|(k, _)| k));
            inner.dirty_kv.extend(kv.into_iter().map(|(k, _)| k));
        }
        result
    }

    /// [`flush`](Self::flush) every `period`, and whenever [`FLUSH_EVERY`]
    /// changes are pending, until `shutdown`; then once more.
    pub async fn flush_every(
        self,
        period: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = self.shared.flush_wanted.notified() => false,
                _ = shutdown.cancelled() => true,
            };
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("the store could not flush: {e}"),
                Err(e) => tracing::error!("the store's flush panicked: {e}"),
            }
            if stop {
                return;
            }
        }
    }

    /// Objects of `kind` get the finalizer `setpoint.dev/<controller>` from now
    /// on, so that `controller` sees their deletes. Objects already stored get
    /// it too (one durable commit).
    pub fn register_finalizer(&self, kind: &str, controller: &str) -> Result<(), StoreError> {
        let finalizer = finalizer_of(controller);
        {
            let mut inner = self.lock();
            let list = inner.finalizers.entry(kind.to_string()).or_default();
            if !list.contains(&finalizer) {
                list.push(finalizer.clone());
            }
        }
        // In rounds of at most 50 objects (a shared backend limits a
        // transaction). Another replica adding the same finalizer at the same
        // time makes a round stale: its change arrives, and the round is
        // tried again with the objects that still lack it.
        let lacking: Vec<ObjectKey> = {
            let inner = self.lock();
            let mut keys: Vec<ObjectKey> = inner
                .objects
                .values()
                .filter(|o| o.kind == kind && lacks(o, &finalizer))
                .map(Object::key)
                .collect();
            keys.sort();
            keys
        };
        let mut rounds: Vec<&[ObjectKey]> = lacking.chunks(50).rev().collect();
        let mut stale = 0;
        while let Some(round) = rounds.pop() {
            match self.add_finalizer(round, &finalizer) {
                Ok(()) => {}
                Err(StoreError::TooLarge(_)) if round.len() > 1 => {
                    let (a, b) = round.split_at(round.len() / 2);
                    rounds.extend([b, a]);
                }
                Err(StoreError::Stale(_)) if stale < 100 => {
                    stale += 1;
                    std::thread::sleep(Duration::from_millis(50));
                    rounds.push(round);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Add `finalizer` to those of `keys` that lack it, in one commit.
    fn add_finalizer(&self, keys: &[ObjectKey], finalizer: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let mut batch = Batch::default();
        for key in keys {
            if let Some(object) = inner.objects.get(key).filter(|o| lacks(o, finalizer)) {
                let mut object = object.clone();
                object.metadata.finalizers.push(finalizer.to_string());
                batch.objects.push((key.clone(), Some(object)));
            }
        }
        if batch.objects.is_empty() {
            return Ok(());
        }
        for (_, object) in &mut batch.objects {
            inner.next_version += 1;
            if let Some(o) = object {
                o.metadata.resource_version = inner.next_version;
            }
        }
        self.commit(&mut inner, &batch)?;
        for (key, object) in batch.objects {
            inner
                .objects
                .insert(key.clone(), object.expect("staged above"));
            inner.refresh(&key);
        }
        Ok(())
    }

    /// One object, deleting or not.
    pub fn get(&self, key: &ObjectKey) -> Option<Object> {
        self.lock().objects.get(key).cloned()
    }

    /// What `read` makes of the object at `key`, read in place under the
    /// store's lock (no copy of the object); `None` if there is none. Keep
    /// `read` short: every other reader and writer waits for it.
    pub fn read<R>(&self, key: &ObjectKey, read: impl FnOnce(&Object) -> R) -> Option<R> {
        self.lock().objects.get(key).map(read)
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
        let current = inner
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        if current.status.as_ref() == Some(&value) && self.shared.backend.keeps_writes_behind() {
            return Ok(());
        }
        let mut object = current.clone();
        inner.next_version += 1;
        object.status = Some(value);
        object.metadata.resource_version = inner.next_version;
        // Neither generation nor deletion nor reconcile status changed: no
        // `refresh`, waits are not concerned.
        inner.objects.insert(key.clone(), object.clone());
        inner.dirty_objects.insert(key.clone());
        self.publish(|| WatchEvent::Applied {
            action: Action::Updated,
            object,
        });
        self.written_behind(inner)
    }

    /// Mark an object deleting, if `resource_version` (when given) still matches.
    /// Its controllers reconcile the delete and then [`finalize`](Self::finalize)
    /// it; an object without finalizers is removed at once. Deleting an object
    /// twice is not an error. Returns the object as it is now (`None` if removed).
    pub fn delete(
        &self,
        key: &ObjectKey,
        resource_version: Option<u64>,
    ) -> Result<Option<Object>, StoreError> {
        let mut inner = self.lock();
        let mut object = inner.current(key, resource_version)?;
        if object.is_deleting() {
            return Ok(Some(object));
        }
        if object.metadata.finalizers.is_empty() {
            self.remove_locked(&mut inner, key, false)?;
            return Ok(None);
        }
        inner.next_version += 1;
        object.metadata.deletion_timestamp = Some(now_ms());
        object.metadata.resource_version = inner.next_version;
        let status = pending(object.metadata.generation);
        let batch = Batch {
            objects: vec![(key.clone(), Some(object.clone()))],
            status: vec![(key.clone(), Some(status.clone()))],
            owner: false,
        };
        self.commit(&mut inner, &batch)?;
        inner.objects.insert(key.clone(), object.clone());
        inner.status.insert(key.clone(), status);
        inner.refresh(key);
        self.announce_applied(&mut inner, &object, Action::Deleted);
        Ok(Some(object))
    }

    /// Drop `finalizer` from a deleting object; once none is left the object is
    /// removed for good. Returns true if the object is gone. A no-op (false) for
    /// an object that is not deleting: it was re-created since.
    pub fn finalize(&self, key: &ObjectKey, finalizer: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(mut object) = inner.objects.get(key).filter(|o| o.is_deleting()).cloned() else {
            return Ok(false);
        };
        object.metadata.finalizers.retain(|f| f != finalizer);
        if object.metadata.finalizers.is_empty() {
            self.remove_locked(&mut inner, key, true)?;
            return Ok(true);
        }
        inner.next_version += 1;
        object.metadata.resource_version = inner.next_version;
        let batch = Batch {
            objects: vec![(key.clone(), Some(object.clone()))],
            status: Vec::new(),
            owner: true,
        };
        self.commit(&mut inner, &batch)?;
        inner.objects.insert(key.clone(), object);
        inner.refresh(key);
        Ok(false)
    }

    /// Remove an object now, whatever finalizers still hold it: for an object
    /// whose finalizers cannot complete (its plugin fails the delete for ever,
    /// or is no longer loaded). `resource_version`, when given and non-zero,
    /// must still match. One durable transaction; watchers of the kind get a
    /// [`Action::Deleted`] change (their controllers find the key gone and forget
    /// it) and the feed a [`WatchEvent::Removed`], as for any removal. Logged as
    /// a warning naming the finalizers dropped. Returns the object as it was:
    /// its `metadata.finalizers` are the ones dropped.
    pub fn force_delete(
        &self,
        key: &ObjectKey,
        resource_version: Option<u64>,
    ) -> Result<Object, StoreError> {
        let mut inner = self.lock();
        let object = inner.current(key, resource_version)?;
        self.remove_locked(&mut inner, key, false)?;
        self.notify_watchers(&mut inner, key, Action::Deleted);
        tracing::warn!(
            key = %key,
            finalizers = ?object.metadata.finalizers,
            "force-deleted: removed without waiting for its finalizers"
        );
        Ok(object)
    }

    /// Remove `key` for good, as its owner (`owner`: after the last
    /// finalizer) or as a client's request.
    fn remove_locked(
        &self,
        inner: &mut Inner,
        key: &ObjectKey,
        owner: bool,
    ) -> Result<(), StoreError> {
        let batch = Batch {
            objects: vec![(key.clone(), None)],
            status: vec![(key.clone(), None)],
            owner,
        };
        self.commit(inner, &batch)?;
        inner.objects.remove(key);
        inner.status.remove(key);
        inner.refresh(key);
        self.publish(|| WatchEvent::Removed {
            key: key.to_string(),
        });
        Ok(())
    }

    /// An object's reconcile status.
    pub fn status(&self, key: &ObjectKey) -> Option<ReconcileStatus> {
        self.lock().status.get(key).cloned()
    }

    /// Every object's reconcile status, for the kinds given (all if empty), in key order.
    pub fn statuses(&self, kinds: &[String]) -> Vec<(ObjectKey, ReconcileStatus)> {
        let mut all: Vec<_> = self
            .lock()
            .status
            .iter()
            .filter(|(k, _)| kinds.is_empty() || kinds.contains(&k.kind))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Record a successful reconcile of `generation`.
    pub fn mark_done(&self, key: &ObjectKey, generation: u64) -> Result<(), StoreError> {
        self.set_phase(key, Phase::Done, None, Some(generation))
    }

    /// Record a failed reconcile that will be retried (its controller
    /// scheduled a retry, or a later change or resync brings the key back).
    pub fn mark_error(&self, key: &ObjectKey, error: &str) -> Result<(), StoreError> {
        self.set_phase(key, Phase::Error, Some(error.to_string()), None)
    }

    /// Record a reconcile that failed for good: a fatal error, or given up
    /// after the last retry. No retry is scheduled, so [`wait`](Self::wait)
    /// stops at once on it (the status says `terminal`).
    pub fn mark_failed(&self, key: &ObjectKey, error: &str) -> Result<(), StoreError> {
        self.set_phase_terminal(key, Phase::Error, Some(error.to_string()), None, true)
    }

    fn set_phase(
        &self,
        key: &ObjectKey,
        phase: Phase,
        error: Option<String>,
        generation: Option<u64>,
    ) -> Result<(), StoreError> {
        self.set_phase_terminal(key, phase, error, generation, false)
    }

    fn set_phase_terminal(
        &self,
        key: &ObjectKey,
        phase: Phase,
        error: Option<String>,
        generation: Option<u64>,
        terminal: bool,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(object) = inner.objects.get(key) else {
            return Ok(());
        };
        // A success at an older generation than the object's is not "done":
        // the newer spec is still to be reconciled.
        let phase = match (phase, generation) {
            (Phase::Done, Some(g)) if g < object.metadata.generation => Phase::Pending,
            (phase, _) => phase,
        };
        let before = inner.status.get(key);
        let observed = generation
            .or_else(|| before.map(|s| s.observed_generation))
            .unwrap_or(0);
        let terminal = terminal && phase == Phase::Error;
        // The same status again (a resync that found nothing to do): nothing
        // to write, nobody to tell. (Unless the backend may have dropped the
        // last write of it.)
        if let Some(before) = before
            && self.shared.backend.keeps_writes_behind()
            && before.phase == phase
            && before.last_error == error
            && before.observed_generation == observed
            && before.terminal == terminal
        {
            return Ok(());
        }
        let status = ReconcileStatus {
            phase,
            last_error: error,
            updated_at: now_ms(),
            observed_generation: observed,
            terminal,
        };
        inner.status.insert(key.clone(), status.clone());
        inner.dirty_status.insert(key.clone());
        inner.refresh(key);
        self.publish(|| WatchEvent::Status {
            key: key.to_string(),
            status,
        });
        self.written_behind(inner)
    }

    /// True if the object is reconciled: done at its current generation, or, if
    /// it was deleted, gone.
    pub fn is_reconciled(&self, key: &ObjectKey) -> bool {
        let inner = self.lock();
        inner.reconciled(key)
    }

    pub fn kv_get(&self, plugin: &str, key: &str) -> Option<Vec<u8>> {
        self.lock()
            .kv
            .get(&(plugin.to_string(), key.to_string()))
            .cloned()
    }

    /// Set a plugin's private value (written behind; see the module doc).
    pub fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.kv_write(plugin, key, Some(value))
    }

    pub fn kv_delete(&self, plugin: &str, key: &str) -> Result<(), StoreError> {
        self.kv_write(plugin, key, None)
    }

    fn kv_write(&self, plugin: &str, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let k = (plugin.to_string(), key.to_string());
        match value {
            Some(v) => inner.kv.insert(k.clone(), v),
            None => inner.kv.remove(&k),
        };
        inner.dirty_kv.insert(k);
        self.written_behind(inner)
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

/// Whether `object` should get `finalizer` and has not: not deleting, and
/// without it.
fn lacks(object: &Object, finalizer: &str) -> bool {
    !object.is_deleting() && !object.metadata.finalizers.iter().any(|f| f == finalizer)
}

/// Take the `dirty` keys with their current values in `from` (`None`: removed).
fn rows<K: Clone + Eq + std::hash::Hash, V: Clone>(
    dirty: &mut HashSet<K>,
    from: &impl Lookup<K, V>,
) -> Vec<(K, Option<V>)> {
    std::mem::take(dirty)
        .into_iter()
        .map(|k| {
            let v = from.lookup(&k);
            (k, v)
        })
        .collect()
}

/// A map a dirty key is looked up in: the object and status hash maps, the kv B-tree.
trait Lookup<K, V> {
    fn lookup(&self, key: &K) -> Option<V>;
}

impl<K: Eq + std::hash::Hash, V: Clone> Lookup<K, V> for HashMap<K, V> {
    fn lookup(&self, key: &K) -> Option<V> {
        self.get(key).cloned()
    }
}

impl<K: Ord, V: Clone> Lookup<K, V> for BTreeMap<K, V> {
    fn lookup(&self, key: &K) -> Option<V> {
        self.get(key).cloned()
    }
}

fn pending(generation: u64) -> ReconcileStatus {
    ReconcileStatus {
        phase: Phase::Pending,
        last_error: None,
        updated_at: now_ms(),
        observed_generation: generation.saturating_sub(1),
        terminal: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn file(name: &str, content: &str) -> Object {
        Object::new("File", "", name, json!({ "content": content }))
    }

    #[test]
    fn apply_bumps_generation_only_when_the_spec_changes() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap();
        assert_eq!(
            (a.object.metadata.generation, a.action),
            (1, Some(Action::Created))
        );
        let a2 = store.apply(file("a", "1")).unwrap();
        assert_eq!((a2.object.metadata.generation, a2.action), (1, None));
        let a3 = store.apply(file("a", "2")).unwrap();
        assert_eq!(
            (a3.object.metadata.generation, a3.action),
            (2, Some(Action::Updated))
        );
        assert_eq!(a3.object.metadata.uid, a.object.metadata.uid);
        assert!(a3.object.metadata.resource_version > a.object.metadata.resource_version);
        let mut relabelled = file("a", "2");
        relabelled.metadata.labels.insert("x".into(), "y".into());
        let a4 = store.apply(relabelled).unwrap();
        assert_eq!(
            (a4.object.metadata.generation, a4.action),
            (2, Some(Action::Updated))
        );
    }

    #[test]
    fn a_write_naming_a_stale_resource_version_is_a_conflict_and_stores_nothing() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        let mut stale = file("a", "2");
        stale.metadata.resource_version = a.metadata.resource_version + 7;
        let err = store.update(stale).unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("read it again"), "{err}");
        assert_eq!(store.get(&a.key()).unwrap(), a);
        let mut current = file("a", "2");
        current.metadata.resource_version = a.metadata.resource_version;
        assert_eq!(store.update(current).unwrap().object.metadata.generation, 2);
    }

    #[test]
    fn create_refuses_an_existing_object_and_update_a_missing_one() {
        let store = Store::new();
        store.create(file("a", "1")).unwrap();
        assert!(matches!(
            store.create(file("a", "1")),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            store.update(file("b", "1")),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn apply_all_stores_every_object_or_none() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        let mut stale = file("a", "2");
        stale.metadata.resource_version = 999;
        let err = store
            .apply_all(vec![file("b", "1"), stale, file("c", "1")])
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
        assert_eq!(store.keys("File"), vec![a.key()]);
        let all = store
            .apply_all(vec![file("b", "1"), file("c", "1")])
            .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(store.keys("File").len(), 3);
    }

    #[test]
    fn delete_waits_for_every_finalizer_before_removing() {
        let store = Store::new();
        store.register_finalizer("File", "files").unwrap();
        store.register_finalizer("File", "audit").unwrap();
        let a = store.apply(file("a", "1")).unwrap().object;
        assert_eq!(
            a.metadata.finalizers,
            vec!["setpoint.dev/files", "setpoint.dev/audit"]
        );
        let deleting = store.delete(&a.key(), None).unwrap().unwrap();
        assert!(deleting.is_deleting());
        assert!(!store.finalize(&a.key(), "setpoint.dev/files").unwrap());
        assert!(store.get(&a.key()).unwrap().is_deleting());
        assert!(store.finalize(&a.key(), "setpoint.dev/audit").unwrap());
        assert_eq!(store.get(&a.key()), None);
        assert_eq!(store.status(&a.key()), None);
        assert!(matches!(
            store.delete(&a.key(), None),
            Err(StoreError::NotFound(_))
        ));
    }

    /// A store in `path` whose `File`s are held by `files`, with files a and b.
    fn two_files_in(path: &Path) -> (Store, Object, Object) {
        let store = Store::open(path).unwrap();
        store.register_finalizer("File", "files").unwrap();
        let a = store.apply(file("a", "1")).unwrap().object;
        let b = store.apply(file("b", "1")).unwrap().object;
        (store, a, b)
    }

    #[test]
    fn a_forced_delete_removes_an_object_its_finalizers_still_hold_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (a, b) = {
            let (store, a, b) = two_files_in(&path);
            store.delete(&a.key(), None).unwrap();
            let mut changes = store.watch(&["File".to_string()]);
            let mut feed = store.feed();

            // A stale resourceVersion is a conflict, and removes nothing.
            let stale = a.metadata.resource_version;
            assert!(matches!(
                store.force_delete(&a.key(), Some(stale)),
                Err(StoreError::Conflict { .. })
            ));
            assert!(store.get(&a.key()).is_some());

            let removed = store.force_delete(&a.key(), None).unwrap();
            assert_eq!(removed.metadata.finalizers, vec!["setpoint.dev/files"]);
            assert_eq!(store.get(&a.key()), None);
            assert_eq!(store.status(&a.key()), None);
            assert!(store.is_reconciled(&a.key()), "waiters see it gone");
            // Controllers hear of it, so they forget the key; so does the feed.
            assert_eq!(
                changes.try_recv().unwrap(),
                Change {
                    key: a.key(),
                    action: Action::Deleted
                }
            );
            assert_eq!(
                feed.try_recv().unwrap(),
                WatchEvent::Removed {
                    key: "File:a".into()
                }
            );
            // An object that is not deleting yet goes as well.
            let removed = store.force_delete(&b.key(), None).unwrap();
            assert!(!removed.is_deleting());
            assert_eq!(
                store.force_delete(&b.key(), None),
                Err(StoreError::NotFound(b.key()))
            );
            (a, b)
        };
        // Durable: nothing comes back after a reopen, without a flush.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get(&a.key()), None);
        assert_eq!(store.get(&b.key()), None);
        assert_eq!(store.status(&a.key()), None);
    }

    #[test]
    fn an_object_without_finalizers_is_removed_at_once() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        assert_eq!(store.delete(&a.key(), None).unwrap(), None);
        assert_eq!(store.get(&a.key()), None);
    }

    #[test]
    fn applying_a_deleting_object_is_refused_until_it_is_gone() {
        let store = Store::new();
        store.register_finalizer("File", "files").unwrap();
        let a = store.apply(file("a", "1")).unwrap().object;
        store.delete(&a.key(), None).unwrap();
        let err = store.apply(file("a", "2")).unwrap_err();
        assert_eq!(err, StoreError::Deleting(a.key()));
    }

    #[test]
    fn registering_a_finalizer_adds_it_to_objects_already_stored() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        assert!(a.metadata.finalizers.is_empty());
        store.register_finalizer("File", "files").unwrap();
        assert_eq!(
            store.get(&a.key()).unwrap().metadata.finalizers,
            vec!["setpoint.dev/files"]
        );
    }

    #[test]
    fn everything_survives_a_reopen_of_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (a, b) = {
            let (store, a, b) = two_files_in(&path);
            store.delete(&b.key(), None).unwrap();
            store.mark_done(&a.key(), 1).unwrap();
            store.kv_set("files", "k", b"v".to_vec()).unwrap();
            store.flush().unwrap();
            (a, b)
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get(&a.key()).unwrap(), a);
        assert!(store.get(&b.key()).unwrap().is_deleting());
        assert_eq!(store.status(&a.key()).unwrap().phase, Phase::Done);
        assert_eq!(store.kv_get("files", "k"), Some(b"v".to_vec()));
        // Counters carry on: no uid or resourceVersion is handed out twice.
        let c = store.apply(file("c", "1")).unwrap().object;
        assert!(c.metadata.resource_version > b.metadata.resource_version);
        assert_ne!(c.metadata.uid, a.metadata.uid);
        assert_ne!(c.metadata.uid, b.metadata.uid);
    }

    #[test]
    fn a_reconcile_that_changes_nothing_writes_nothing() {
        let store = Store::new();
        let key = store.apply(file("a", "1")).unwrap().object.key();
        store.mark_done(&key, 1).unwrap();
        store.set_status(&key, r#"{"ok":true}"#).unwrap();
        store.flush().unwrap();
        let before = (store.status(&key).unwrap(), store.get(&key).unwrap());
        // The same outcome again, as a resync would bring it: nothing to write.
        store.mark_done(&key, 1).unwrap();
        store.set_status(&key, r#"{"ok": true}"#).unwrap();
        store.mark_error(&key, "boom").unwrap();
        assert_eq!(store.lock().dirty(), 1, "only the changed phase is written");
        store.flush().unwrap();
        store.mark_error(&key, "boom").unwrap();
        assert_eq!(store.lock().dirty(), 0);
        assert_eq!(store.get(&key).unwrap(), before.1);
        assert_ne!(store.status(&key).unwrap().phase, before.0.phase);
    }

    #[test]
    fn written_behind_changes_reach_the_disk_at_a_flush_or_the_next_durable_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let reopen = |path: &Path| Store::open(path).unwrap();
        let a = {
            let store = reopen(&path);
            let a = store.apply(file("a", "1")).unwrap().object;
            store.mark_done(&a.key(), 1).unwrap();
            store.kv_set("p", "k", b"v".to_vec()).unwrap();
            // Dropped without a flush: like a crash, the writes behind are lost.
            a
        };
        {
            let store = reopen(&path);
            assert_eq!(store.status(&a.key()).unwrap().phase, Phase::Pending);
            assert_eq!(store.kv_get("p", "k"), None);
            store.mark_done(&a.key(), 1).unwrap();
            store.flush().unwrap();
            store.kv_set("p", "k", b"v".to_vec()).unwrap();
            store.apply(file("b", "1")).unwrap();
        }
        let store = reopen(&path);
        assert_eq!(store.status(&a.key()).unwrap().phase, Phase::Done);
        assert_eq!(
            store.kv_get("p", "k"),
            Some(b"v".to_vec()),
            "carried by the apply"
        );
    }

    #[test]
    fn a_second_process_on_the_same_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path)
            .err()
            .expect("the file is in use")
            .to_string();
        assert!(err.contains("in use by another setpoint process"), "{err}");
    }

    #[test]
    fn watchers_get_changes_of_their_kinds_only() {
        let store = Store::new();
        store.register_finalizer("File", "files").unwrap();
        let mut files = store.watch(&["File".to_string()]);
        store
            .apply(Object::new("Other", "", "x", json!({})))
            .unwrap();
        let a = store.apply(file("a", "1")).unwrap().object;
        store.delete(&a.key(), None).unwrap();
        assert_eq!(files.try_recv().unwrap().action, Action::Created);
        assert_eq!(files.try_recv().unwrap().action, Action::Deleted);
        assert!(files.try_recv().is_err());
    }

    #[test]
    fn the_feed_reports_applies_statuses_and_removals() {
        let store = Store::new();
        let mut feed = store.feed();
        let a = store.apply(file("a", "1")).unwrap().object;
        store.mark_done(&a.key(), 1).unwrap();
        store.delete(&a.key(), None).unwrap();
        let events: Vec<WatchEvent> = std::iter::from_fn(|| feed.try_recv().ok()).collect();
        assert!(matches!(
            &events[0],
            WatchEvent::Applied {
                action: Action::Created,
                ..
            }
        ));
        assert!(
            matches!(&events[1], WatchEvent::Status { status, .. } if status.phase == Phase::Done)
        );
        assert_eq!(
            events[2],
            WatchEvent::Removed {
                key: "File:a".into()
            }
        );
    }

    #[test]
    fn set_status_refuses_invalid_json_and_missing_objects() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
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
    fn done_at_an_older_generation_is_still_pending() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        store.apply(file("a", "2")).unwrap();
        store.mark_done(&a.key(), 1).unwrap();
        assert_eq!(store.status(&a.key()).unwrap().phase, Phase::Pending);
        assert!(!store.is_reconciled(&a.key()));
        store.mark_done(&a.key(), 2).unwrap();
        assert!(store.is_reconciled(&a.key()));
    }

    #[test]
    fn kv_keys_are_private_to_each_plugin() {
        let store = Store::new();
        store.kv_set("p1", "a/1", b"x".to_vec()).unwrap();
        store.kv_set("p1", "a/2", b"y".to_vec()).unwrap();
        store.kv_set("p1", "b/1", b"z".to_vec()).unwrap();
        store.kv_set("p2", "a/3", b"w".to_vec()).unwrap();
        assert_eq!(store.kv_keys("p1", "a/"), vec!["a/1", "a/2"]);
        assert_eq!(store.kv_get("p2", "a/1"), None);
        store.kv_delete("p1", "a/1").unwrap();
        assert_eq!(store.kv_keys("p1", ""), vec!["a/2", "b/1"]);
    }
}
