//! The desired-state store: objects, their reconcile status, plugin key-value data,
//! and the change feeds that drive controllers and `/v1/watch`.
//!
//! It is embedded and durable: every write goes to a [redb] database (a single
//! file, ACID, crash-safe copy-on-write B-trees) before it is visible, and reads
//! are served from an in-memory copy loaded at open. [`Store::new`] gives the same
//! store over redb's in-memory backend, for tests and one-off commands.
//!
//! Guarantees:
//! - Writes of desired state (apply, create, update, delete, finalize) are
//!   committed with fsync before they return: once a caller is told "stored", a
//!   `kill -9` or power loss does not lose it. Several objects applied together
//!   are one transaction: all are stored or none is.
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
//! [redb]: https://docs.rs/redb

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::object::{Action, Object, ObjectKey, shorten};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Written-behind changes (status, kv) held in memory before a commit, at most.
pub const FLUSH_EVERY: usize = 1000;

/// The prefix of the finalizer each controller holds on the objects it reconciles.
pub const FINALIZER_PREFIX: &str = "setpoint.dev/";

/// One change to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: ObjectKey,
    pub action: Action,
}

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
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

macro_rules! storage_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.to_string())
            }
        }
    )*};
}
storage_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

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
    db: Database,
    inner: Mutex<Inner>,
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
    fn dirty(&self) -> usize {
        self.dirty_objects.len() + self.dirty_status.len() + self.dirty_kv.len()
    }
}

/// Where one key stands for [`Store::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settled {
    /// Done at its current generation, or gone.
    Reconciled,
    /// Not reconciled yet; it will be (a change, a retry) or may still be.
    Waiting,
    /// Not reconciled, and its last reconcile failed for good
    /// ([`ReconcileStatus::terminal`]): nothing will retry it.
    Failed,
}

/// What [`Store::wait`] selects: one key, or every key of some kinds (all
/// kinds if empty; sorted, no duplicates).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Selection {
    Key(ObjectKey),
    Kinds(Vec<String>),
}

impl Selection {
    fn new(key: Option<&ObjectKey>, kinds: &[String]) -> Self {
        match key {
            Some(key) => Selection::Key(key.clone()),
            None => {
                let mut kinds = kinds.to_vec();
                kinds.sort();
                kinds.dedup();
                Selection::Kinds(kinds)
            }
        }
    }

    fn has_kind(&self, kind: &str) -> bool {
        match self {
            Selection::Key(key) => key.kind == kind,
            Selection::Kinds(kinds) => kinds.is_empty() || kinds.iter().any(|k| k == kind),
        }
    }
}

/// One open [`Store::wait`].
struct Waiter {
    id: u64,
    selection: Selection,
    wake: Arc<tokio::sync::Notify>,
}

/// The keys that are not reconciled, kept by every change to an object or its
/// status (see [`Inner::refresh`]), so that an open [`Store::wait`] costs
/// nothing per change: waiters are woken only when what they wait for may have
/// happened (their key settled, a kind has nothing left to reconcile, or a key
/// failed for good), and then check a few counters. The list of what is not
/// reconciled is built only when a wait gives up.
#[derive(Default)]
struct Unsettled {
    /// Keys not reconciled, by kind; a kind with none is not in the map.
    waiting: HashMap<String, HashSet<ObjectKey>>,
    /// The keys of `waiting` that failed for good, by kind; likewise.
    failed: HashMap<String, HashSet<ObjectKey>>,
    waiting_total: usize,
    failed_total: usize,
    /// Open waits.
    waiters: Vec<Waiter>,
    /// The keys open waits wait for one by one, with how many wait for each.
    watched: HashMap<ObjectKey, usize>,
    next_waiter: u64,
}

/// What a wait found on a check.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Reconciled,
    Waiting,
    Failed,
}

impl Unsettled {
    fn get(&self, key: &ObjectKey) -> Settled {
        let in_set = |map: &HashMap<String, HashSet<ObjectKey>>| {
            map.get(&key.kind).is_some_and(|keys| keys.contains(key))
        };
        if !in_set(&self.waiting) {
            Settled::Reconciled
        } else if in_set(&self.failed) {
            Settled::Failed
        } else {
            Settled::Waiting
        }
    }

    /// Record that `key` now stands at `now`, and wake the waits that may be over.
    fn set(&mut self, key: &ObjectKey, now: Settled) {
        let was = self.get(key);
        if was == now {
            return;
        }
        if was == Settled::Failed {
            remove_key(&mut self.failed, key);
            self.failed_total -= 1;
        }
        match (was, now) {
            (Settled::Reconciled, _) => {
                add_key(&mut self.waiting, key);
                self.waiting_total += 1;
            }
            (_, Settled::Reconciled) => {
                remove_key(&mut self.waiting, key);
                self.waiting_total -= 1;
            }
            _ => {}
        }
        if now == Settled::Failed {
            add_key(&mut self.failed, key);
            self.failed_total += 1;
        }
        self.wake(key, now);
    }

    /// Wake the waits `key` settling at `now` may have ended. Getting more
    /// unreconciled ends no wait, and nothing is woken while keys of a kind are
    /// still waiting, unless one of them is watched alone or failed for good.
    fn wake(&self, key: &ObjectKey, now: Settled) {
        if self.waiters.is_empty() || now == Settled::Waiting {
            return;
        }
        let failed = now == Settled::Failed;
        let kind_clear = !self.waiting.contains_key(&key.kind);
        let watched = self.watched.contains_key(key);
        if !(failed || kind_clear || watched) {
            return;
        }
        for w in &self.waiters {
            let hit = match &w.selection {
                Selection::Key(k) => k == key,
                kinds => (failed || kind_clear) && kinds.has_kind(&key.kind),
            };
            if hit {
                w.wake.notify_one();
            }
        }
    }

    fn check(&self, selection: &Selection, keep_waiting: bool) -> Check {
        let (failed, waiting) = match selection {
            Selection::Key(key) => match self.get(key) {
                Settled::Reconciled => (false, false),
                Settled::Waiting => (false, true),
                Settled::Failed => (true, true),
            },
            Selection::Kinds(kinds) if kinds.is_empty() => {
                (self.failed_total > 0, self.waiting_total > 0)
            }
            Selection::Kinds(kinds) => (
                kinds.iter().any(|k| self.failed.contains_key(k)),
                kinds.iter().any(|k| self.waiting.contains_key(k)),
            ),
        };
        if failed && !keep_waiting {
            Check::Failed
        } else if waiting {
            Check::Waiting
        } else {
            Check::Reconciled
        }
    }

    /// The keys of `map` that `selection` selects, in order.
    fn selected(
        map: &HashMap<String, HashSet<ObjectKey>>,
        selection: &Selection,
    ) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = match selection {
            Selection::Key(key) => map
                .get(&key.kind)
                .filter(|keys| keys.contains(key))
                .map(|_| key.clone())
                .into_iter()
                .collect(),
            Selection::Kinds(_) => map
                .iter()
                .filter(|(kind, _)| selection.has_kind(kind))
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
        };
        keys.sort();
        keys
    }

    fn register(&mut self, selection: Selection, wake: Arc<tokio::sync::Notify>) -> u64 {
        self.next_waiter += 1;
        let id = self.next_waiter;
        if let Selection::Key(key) = &selection {
            *self.watched.entry(key.clone()).or_default() += 1;
        }
        self.waiters.push(Waiter {
            id,
            selection,
            wake,
        });
        id
    }

    fn unregister(&mut self, id: u64) {
        let Some(at) = self.waiters.iter().position(|w| w.id == id) else {
            return;
        };
        let waiter = self.waiters.swap_remove(at);
        if let Selection::Key(key) = waiter.selection
            && let Some(n) = self.watched.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                self.watched.remove(&key);
            }
        }
    }
}

fn add_key(map: &mut HashMap<String, HashSet<ObjectKey>>, key: &ObjectKey) {
    map.entry(key.kind.clone()).or_default().insert(key.clone());
}

fn remove_key(map: &mut HashMap<String, HashSet<ObjectKey>>, key: &ObjectKey) {
    if let Some(keys) = map.get_mut(&key.kind) {
        keys.remove(key);
        if keys.is_empty() {
            map.remove(&key.kind);
        }
    }
}

struct Watcher {
    kinds: Vec<String>,
    tx: mpsc::UnboundedSender<Change>,
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

/// One plugin key-value entry to write (`None`: remove it).
type KvRow = ((String, String), Option<Vec<u8>>);

/// A staged write: the tables to touch in one transaction.
#[derive(Default)]
struct Batch {
    objects: Vec<(ObjectKey, Option<Object>)>,
    status: Vec<(ObjectKey, Option<ReconcileStatus>)>,
}

impl Store {
    /// A store in memory (redb's in-memory backend): nothing survives the process.
    pub fn new() -> Self {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database always opens");
        Self::from_db(db).expect("an empty in-memory database always loads")
    }

    /// The durable store in `path`, created if missing. Everything stored is loaded.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the store's folder {}: {e}; set [store] path",
                    dir.display()
                )
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "the store {} is in use by another setpoint process; stop it, or give this \
                 one its own [store] path",
                path.display()
            ),
            e => anyhow::anyhow!(
                "cannot open the store {}: {e}; if the file is not a Setpoint store, move it \
                 away or set [store] path",
                path.display()
            ),
        })?;
        Self::from_db(db)
            .map_err(|e| anyhow::anyhow!("cannot load the store {}: {e}", path.display()))
    }

    fn from_db(db: Database) -> Result<Self, StoreError> {
        let mut inner = Inner::default();
        {
            // Create the tables, so a fresh file reads like an empty store.
            let txn = db.begin_write()?;
            txn.open_table(OBJECTS)?;
            txn.open_table(STATUS)?;
            txn.open_table(KV)?;
            txn.open_table(META)?;
            txn.commit()?;
        }
        let txn = db.begin_read()?;
        let corrupt = |what: &str, key: &str, e: serde_json::Error| {
            StoreError::Storage(format!("stored {what} {key} is unreadable: {e}"))
        };
        for entry in txn.open_table(OBJECTS)?.iter()? {
            let (k, v) = entry?;
            let object: Object =
                serde_json::from_slice(v.value()).map_err(|e| corrupt("object", k.value(), e))?;
            inner.objects.insert(object.key(), object);
        }
        for entry in txn.open_table(STATUS)?.iter()? {
            let (k, v) = entry?;
            let key: ObjectKey = k
                .value()
                .parse()
                .map_err(|e: String| StoreError::Storage(e))?;
            let status =
                serde_json::from_slice(v.value()).map_err(|e| corrupt("status", k.value(), e))?;
            inner.status.insert(key, status);
        }
        for entry in txn.open_table(KV)?.iter()? {
            let (k, v) = entry?;
            let (plugin, key) = k.value();
            inner
                .kv
                .insert((plugin.to_string(), key.to_string()), v.value().to_vec());
        }
        let meta = txn.open_table(META)?;
        inner.next_uid = meta.get("next_uid")?.map_or(0, |v| v.value());
        inner.next_version = meta.get("next_version")?.map_or(0, |v| v.value());
        drop(meta);
        drop(txn);
        let keys: Vec<ObjectKey> = inner.objects.keys().cloned().collect();
        for key in &keys {
            inner.refresh(key);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                inner: Mutex::new(inner),
                commit_order: Mutex::new(()),
                flush_wanted: tokio::sync::Notify::new(),
                feed: broadcast::channel(4096).0,
            }),
        })
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
        self.write_txn(&objects, &status, &kv, inner.next_uid, inner.next_version)?;
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

    fn write_txn(
        &self,
        objects: &[(ObjectKey, Option<Object>)],
        status: &[(ObjectKey, Option<ReconcileStatus>)],
        kv: &[KvRow],
        next_uid: u64,
        next_version: u64,
    ) -> Result<(), StoreError> {
        let txn = self.shared.db.begin_write()?;
        {
            put_json(&mut txn.open_table(OBJECTS)?, objects)?;
            put_json(&mut txn.open_table(STATUS)?, status)?;
            let mut table = txn.open_table(KV)?;
            for ((plugin, key), value) in kv {
                let key = (plugin.as_str(), key.as_str());
                match value {
                    Some(v) => table.insert(key, v.as_slice())?,
                    None => table.remove(key)?,
                };
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("next_uid", next_uid)?;
            meta.insert("next_version", next_version)?;
        }
        txn.commit()?;
        Ok(())
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
        let result = self.write_txn(&objects, &status, &kv, uid, version);
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
        let mut inner = self.lock();
        let list = inner.finalizers.entry(kind.to_string()).or_default();
        if !list.contains(&finalizer) {
            list.push(finalizer.clone());
        }
        let mut batch = Batch::default();
        for object in inner.objects.values() {
            if object.kind == kind
                && !object.is_deleting()
                && !object.metadata.finalizers.contains(&finalizer)
            {
                let mut object = object.clone();
                object.metadata.finalizers.push(finalizer.clone());
                batch.objects.push((object.key(), Some(object)));
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

    /// Create or update one object from a manifest.
    pub fn apply(&self, object: Object) -> Result<Applied, StoreError> {
        Ok(self
            .apply_all(vec![object])?
            .pop()
            .expect("one object in, one out"))
    }

    /// Create or update several objects in one transaction: if any of them is
    /// refused (a conflict, a deleting object), none is stored.
    ///
    /// Host-owned metadata in a manifest (uid, generation, deletionTimestamp,
    /// status) is ignored; a non-zero `resourceVersion` is a precondition.
    pub fn apply_all(&self, objects: Vec<Object>) -> Result<Vec<Applied>, StoreError> {
        self.write(objects, |_, _| Ok(()))
    }

    /// Create an object that must not exist yet.
    pub fn create(&self, object: Object) -> Result<Applied, StoreError> {
        let mut out = self.write(vec![object], |key, old| match old {
            Some(_) => Err(StoreError::AlreadyExists(key.clone())),
            None => Ok(()),
        })?;
        Ok(out.pop().expect("one object in, one out"))
    }

    /// Update an object that must exist.
    pub fn update(&self, object: Object) -> Result<Applied, StoreError> {
        let mut out = self.write(vec![object], |key, old| match old {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound(key.clone())),
        })?;
        Ok(out.pop().expect("one object in, one out"))
    }

    fn write(
        &self,
        objects: Vec<Object>,
        check: impl Fn(&ObjectKey, Option<&Object>) -> Result<(), StoreError>,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut inner = self.lock();
        let mut next_uid = inner.next_uid;
        let mut next_version = inner.next_version;
        let mut batch = Batch::default();
        let mut applied = Vec::with_capacity(objects.len());
        // Later objects in one request see the earlier ones.
        let mut staged: HashMap<ObjectKey, Object> = HashMap::new();
        for mut object in objects {
            let key = object.key();
            let old = staged.get(&key).or_else(|| inner.objects.get(&key));
            check(&key, old)?;
            let given = object.metadata.resource_version;
            let stored = old.map_or(0, |o| o.metadata.resource_version);
            if given != 0 && given != stored {
                return Err(StoreError::Conflict { key, given, stored });
            }
            object.status = None;
            object.metadata.deletion_timestamp = None;
            // The host's finalizers are the host's; the rest are the manifest's.
            object
                .metadata
                .finalizers
                .retain(|f| !f.starts_with(FINALIZER_PREFIX));
            let action = match old {
                None => {
                    next_uid += 1;
                    object.metadata.uid = format!("{next_uid:016x}");
                    object.metadata.generation = 1;
                    if let Some(host) = inner.finalizers.get(&key.kind) {
                        object.metadata.finalizers.extend(host.iter().cloned());
                    }
                    Action::Created
                }
                Some(old) if old.is_deleting() => return Err(StoreError::Deleting(key)),
                Some(old) => {
                    let spec_changed = old.spec != object.spec;
                    let host: Vec<String> = old
                        .metadata
                        .finalizers
                        .iter()
                        .filter(|f| f.starts_with(FINALIZER_PREFIX))
                        .cloned()
                        .collect();
                    object.metadata.finalizers.extend(host);
                    object.metadata.uid = old.metadata.uid.clone();
                    object.metadata.generation = old.metadata.generation + u64::from(spec_changed);
                    object.status = old.status.clone();
                    object.metadata.resource_version = old.metadata.resource_version;
                    if !spec_changed
                        && old.metadata.labels == object.metadata.labels
                        && old.metadata.finalizers == object.metadata.finalizers
                        && old.api_version == object.api_version
                    {
                        applied.push(Applied {
                            object: old.clone(),
                            action: None,
                        });
                        continue;
                    }
                    Action::Updated
                }
            };
            next_version += 1;
            object.metadata.resource_version = next_version;
            staged.insert(key.clone(), object.clone());
            batch.objects.push((key.clone(), Some(object.clone())));
            batch
                .status
                .push((key, Some(pending(object.metadata.generation))));
            applied.push(Applied {
                object,
                action: Some(action),
            });
        }
        if batch.objects.is_empty() {
            return Ok(applied);
        }
        let (saved_uid, saved_version) = (inner.next_uid, inner.next_version);
        inner.next_uid = next_uid;
        inner.next_version = next_version;
        if let Err(e) = self.commit(&mut inner, &batch) {
            inner.next_uid = saved_uid;
            inner.next_version = saved_version;
            return Err(e);
        }
        for (key, object) in batch.objects {
            inner.objects.insert(key, object.expect("staged above"));
        }
        for (key, status) in batch.status {
            inner
                .status
                .insert(key.clone(), status.expect("staged above"));
            inner.refresh(&key);
        }
        for a in &applied {
            if let Some(action) = a.action {
                self.announce_applied(&mut inner, &a.object, action);
            }
        }
        Ok(applied)
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
        let mut object = inner
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        if object.status.as_ref() == Some(&value) {
            return Ok(());
        }
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
        let mut object = inner
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
        if object.is_deleting() {
            return Ok(Some(object));
        }
        if object.metadata.finalizers.is_empty() {
            self.remove_locked(&mut inner, key)?;
            return Ok(None);
        }
        inner.next_version += 1;
        object.metadata.deletion_timestamp = Some(now_ms());
        object.metadata.resource_version = inner.next_version;
        let status = pending(object.metadata.generation);
        let batch = Batch {
            objects: vec![(key.clone(), Some(object.clone()))],
            status: vec![(key.clone(), Some(status.clone()))],
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
            self.remove_locked(&mut inner, key)?;
            return Ok(true);
        }
        inner.next_version += 1;
        object.metadata.resource_version = inner.next_version;
        let batch = Batch {
            objects: vec![(key.clone(), Some(object.clone()))],
            status: Vec::new(),
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
        let object = inner
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
        self.remove_locked(&mut inner, key)?;
        self.notify_watchers(&mut inner, key, Action::Deleted);
        tracing::warn!(
            key = %key,
            finalizers = ?object.metadata.finalizers,
            "force-deleted: removed without waiting for its finalizers"
        );
        Ok(object)
    }

    fn remove_locked(&self, inner: &mut Inner, key: &ObjectKey) -> Result<(), StoreError> {
        let batch = Batch {
            objects: vec![(key.clone(), None)],
            status: vec![(key.clone(), None)],
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
        let observed = generation
            .or_else(|| inner.status.get(key).map(|s| s.observed_generation))
            .unwrap_or(0);
        let status = ReconcileStatus {
            phase,
            last_error: error,
            updated_at: now_ms(),
            observed_generation: observed,
            terminal: terminal && phase == Phase::Error,
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

    /// Wait until every object selected is reconciled (see
    /// [`is_reconciled`](Self::is_reconciled)): one object (`key`), or every object
    /// of `kinds` (all kinds if empty). Objects in error that will be retried
    /// are waited for; one that failed for good ([`mark_failed`](Self::mark_failed))
    /// ends the wait at once with [`WaitError::Failed`], naming every selected
    /// object in that state. On timeout, [`WaitError::TimedOut`] names the
    /// objects still not reconciled, with their status.
    pub async fn wait(
        &self,
        key: Option<&ObjectKey>,
        kinds: &[String],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        self.wait_with(key, kinds, timeout, false).await
    }

    /// [`wait`](Self::wait); with `keep_waiting`, objects that failed for good
    /// are waited for like any other (until the timeout, or until a change
    /// reconciles them).
    ///
    /// An open wait costs nothing per change: the store keeps the set of keys
    /// not reconciled as it changes, and wakes a wait only when its key
    /// settles, a kind it waits for has nothing left, or a key failed for good.
    pub async fn wait_with(
        &self,
        key: Option<&ObjectKey>,
        kinds: &[String],
        timeout: Duration,
        keep_waiting: bool,
    ) -> Result<(), WaitError> {
        /// Unregisters the wait however it ends (a dropped HTTP request too).
        struct Registered<'a> {
            store: &'a Store,
            id: u64,
        }
        impl Drop for Registered<'_> {
            fn drop(&mut self) {
                self.store.lock().unsettled.unregister(self.id);
            }
        }

        let deadline = tokio::time::Instant::now() + timeout;
        let selection = Selection::new(key, kinds);
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut registered = None;
        loop {
            {
                let mut inner = self.lock();
                match inner.unsettled.check(&selection, keep_waiting) {
                    Check::Reconciled => return Ok(()),
                    Check::Failed => return Err(WaitError::Failed(inner.failed(&selection))),
                    Check::Waiting => {}
                }
                if registered.is_none() {
                    // Under the same lock as the check: no change slips between.
                    let id = inner.unsettled.register(selection.clone(), wake.clone());
                    registered = Some(Registered { store: self, id });
                }
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let inner = self.lock();
        match inner.unsettled.check(&selection, keep_waiting) {
            Check::Reconciled => Ok(()),
            Check::Failed => Err(WaitError::Failed(inner.failed(&selection))),
            Check::Waiting => Err(WaitError::TimedOut(inner.waiting(&selection))),
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

    /// The `/v1/watch` feed: every object change, removal and status change from
    /// now on. A listener that falls more than 4096 events behind is told so by
    /// [`broadcast::error::RecvError::Lagged`].
    pub fn feed(&self) -> broadcast::Receiver<WatchEvent> {
        self.shared.feed.subscribe()
    }

    /// A plugin's private value for `key`.
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

    /// Send an event to `/v1/watch` listeners; built only if there are any
    /// (the reconcile path would otherwise clone every object it touches).
    fn publish(&self, event: impl FnOnce() -> WatchEvent) {
        if self.shared.feed.receiver_count() > 0 {
            let _ = self.shared.feed.send(event());
        }
    }

    fn announce_applied(&self, inner: &mut Inner, object: &Object, action: Action) {
        self.notify_watchers(inner, &object.key(), action);
        self.publish(|| WatchEvent::Applied {
            action,
            object: object.clone(),
        });
    }

    /// Send one change to every watcher of its kind, dropping closed watchers.
    fn notify_watchers(&self, inner: &mut Inner, key: &ObjectKey, action: Action) {
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

/// Write rows keyed by object key as JSON, removing those that are `None`.
fn put_json<T: Serialize>(
    table: &mut redb::Table<&str, &[u8]>,
    rows: &[(ObjectKey, Option<T>)],
) -> Result<(), StoreError> {
    for (key, value) in rows {
        let key = key.to_string();
        match value {
            Some(v) => {
                let bytes = serde_json::to_vec(v).expect("stored rows serialize");
                table.insert(key.as_str(), bytes.as_slice())?;
            }
            None => {
                table.remove(key.as_str())?;
            }
        }
    }
    Ok(())
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

impl Inner {
    fn reconciled(&self, key: &ObjectKey) -> bool {
        match (self.objects.get(key), self.status.get(key)) {
            (None, _) => true,
            (Some(o), _) if o.is_deleting() => false,
            (Some(o), Some(s)) => {
                s.phase == Phase::Done && s.observed_generation >= o.metadata.generation
            }
            (Some(_), None) => false,
        }
    }

    /// Where `key` stands now, from the objects and statuses themselves.
    fn settled(&self, key: &ObjectKey) -> Settled {
        if self.reconciled(key) {
            Settled::Reconciled
        } else if self
            .status
            .get(key)
            .is_some_and(|s| s.phase == Phase::Error && s.terminal)
        {
            Settled::Failed
        } else {
            Settled::Waiting
        }
    }

    /// Bring [`Unsettled`] up to date after `key`'s object or status changed.
    /// Every change to either calls this under the store's lock.
    fn refresh(&mut self, key: &ObjectKey) {
        let now = self.settled(key);
        self.unsettled.set(key, now);
    }

    /// The selected keys that failed for good, with their status, in order.
    fn failed(&self, selection: &Selection) -> Vec<(ObjectKey, ReconcileStatus)> {
        Unsettled::selected(&self.unsettled.failed, selection)
            .into_iter()
            .filter_map(|k| {
                let status = self.status.get(&k).cloned()?;
                Some((k, status))
            })
            .collect()
    }

    /// The selected keys not reconciled, with their status, in order.
    fn waiting(&self, selection: &Selection) -> Vec<(ObjectKey, Option<ReconcileStatus>)> {
        Unsettled::selected(&self.unsettled.waiting, selection)
            .into_iter()
            .map(|k| {
                let status = self.status.get(&k).cloned();
                (k, status)
            })
            .collect()
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

    #[test]
    fn a_forced_delete_removes_an_object_its_finalizers_still_hold_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (a, b) = {
            let store = Store::open(&path).unwrap();
            store.register_finalizer("File", "files").unwrap();
            let a = store.apply(file("a", "1")).unwrap().object;
            let b = store.apply(file("b", "1")).unwrap().object;
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
            let store = Store::open(&path).unwrap();
            store.register_finalizer("File", "files").unwrap();
            let a = store.apply(file("a", "1")).unwrap().object;
            let b = store.apply(file("b", "1")).unwrap().object;
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

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_every_object_is_reconciled_or_names_the_rest() {
        let store = Store::new();
        let a = store.apply(file("a", "1")).unwrap().object;
        let b = store.apply(file("b", "1")).unwrap().object;
        store.mark_done(&a.key(), 1).unwrap();
        store.mark_error(&b.key(), "disk full").unwrap();
        let Err(WaitError::TimedOut(waiting)) = store.wait(None, &[], Duration::from_secs(1)).await
        else {
            panic!("b is in error, to be retried: waited for until the timeout");
        };
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].0, b.key());
        assert_eq!(
            waiting[0].1.as_ref().unwrap().last_error.as_deref(),
            Some("disk full")
        );
        assert_eq!(
            store.wait(Some(&a.key()), &[], Duration::ZERO).await,
            Ok(())
        );
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait(None, &[], Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        store.mark_done(&b.key(), 1).unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_stops_at_once_on_an_object_that_failed_for_good_unless_told_to_keep_waiting() {
        let store = Store::new();
        let [a, b, c] = ["a", "b", "c"].map(|n| store.apply(file(n, "1")).unwrap().object.key());
        let other = store
            .apply(Object::new("Other", "", "d", json!({})))
            .unwrap()
            .object
            .key();
        store.mark_error(&a, "try again").unwrap();
        store.mark_failed(&b, "spec.content: invalid type").unwrap();
        store.mark_done(&c, 1).unwrap();
        let status = store.status(&b).unwrap();
        assert!(status.terminal && status.phase == Phase::Error);
        assert!(!store.status(&a).unwrap().terminal);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["terminal"], true, "{json}");

        let started = tokio::time::Instant::now();
        let failed = store.wait(None, &[], Duration::from_secs(60)).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "at once, not after the timeout"
        );
        let Err(WaitError::Failed(failed)) = failed else {
            panic!("{failed:?}")
        };
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, b);
        assert_eq!(
            failed[0].1.last_error.as_deref(),
            Some("spec.content: invalid type")
        );
        let of_kind = store
            .wait(None, &["File".into()], Duration::from_secs(60))
            .await;
        assert!(
            matches!(of_kind, Err(WaitError::Failed(ref f)) if f.len() == 1),
            "{of_kind:?}"
        );
        let one = store.wait(Some(&b), &[], Duration::from_secs(60)).await;
        assert!(matches!(one, Err(WaitError::Failed(_))), "{one:?}");
        // An error to be retried is waited for; so is a failure elsewhere.
        assert_eq!(
            store.wait(Some(&a), &[], Duration::from_secs(1)).await,
            Err(WaitError::TimedOut(vec![(a.clone(), store.status(&a))]))
        );
        assert_eq!(
            store
                .wait(None, &["Other".into()], Duration::from_secs(1))
                .await,
            Err(WaitError::TimedOut(vec![(
                other.clone(),
                store.status(&other)
            )]))
        );
        // Told to keep waiting: the failed object is one more to wait for.
        let Err(WaitError::TimedOut(waiting)) = store
            .wait_with(None, &[], Duration::from_secs(1), true)
            .await
        else {
            panic!("keeps waiting until the timeout")
        };
        let keys: Vec<_> = waiting.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![a.clone(), b.clone(), other.clone()]);

        // An open wait stops when a key fails for good while it waits...
        let waiter = {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move { store.wait(Some(&a), &[], Duration::from_secs(600)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        store
            .mark_failed(&a, "gave up after 11 attempts: no")
            .unwrap();
        let Err(WaitError::Failed(failed)) = waiter.await.unwrap() else {
            panic!("a failed for good")
        };
        assert_eq!(
            failed[0].1.last_error.as_deref(),
            Some("gave up after 11 attempts: no")
        );
        // ...and one kept waiting ends when the failed objects are changed and done.
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait_with(None, &["File".into()], Duration::from_secs(600), true)
                    .await
            })
        };
        tokio::task::yield_now().await;
        store.apply(file("b", "2")).unwrap();
        assert!(!store.status(&b).unwrap().terminal, "a change clears it");
        store.mark_done(&b, 2).unwrap();
        store.mark_done(&a, 1).unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(
            store.lock().unsettled.waiters.is_empty(),
            "every wait unregistered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_wait_is_woken_only_when_it_may_be_over_and_unregisters_when_dropped() {
        let store = Store::new();
        let files: Vec<_> = (0..3)
            .map(|i| {
                store
                    .apply(file(&format!("f{i}"), "1"))
                    .unwrap()
                    .object
                    .key()
            })
            .collect();
        let other = store
            .apply(Object::new("Other", "", "o", json!({})))
            .unwrap()
            .object
            .key();
        let spawn = |key: Option<ObjectKey>, kinds: Vec<String>| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .wait(key.as_ref(), &kinds, Duration::from_secs(600))
                    .await
            })
        };
        let all = spawn(None, vec![]);
        let of_files = spawn(None, vec!["File".into()]);
        let first = spawn(Some(files[0].clone()), vec![]);
        tokio::task::yield_now().await;
        assert_eq!(store.lock().unsettled.waiters.len(), 3);
        store.mark_done(&files[0], 1).unwrap();
        assert_eq!(first.await.unwrap(), Ok(()));
        store.mark_done(&files[1], 1).unwrap();
        store.mark_done(&other, 1).unwrap();
        tokio::task::yield_now().await;
        assert!(!all.is_finished() && !of_files.is_finished());
        store.mark_done(&files[2], 1).unwrap();
        assert_eq!(of_files.await.unwrap(), Ok(()));
        assert_eq!(all.await.unwrap(), Ok(()));
        // A wait dropped half way (an HTTP client gone) leaves nothing behind.
        store.apply(file("f0", "2")).unwrap();
        let dropped = spawn(Some(files[0].clone()), vec![]);
        tokio::task::yield_now().await;
        assert_eq!(store.lock().unsettled.waiters.len(), 1);
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        let inner = store.lock();
        assert!(inner.unsettled.waiters.is_empty() && inner.unsettled.watched.is_empty());
    }

    /// What `wait` computed before the bookkeeping: a scan of every object.
    fn full_scan(
        inner: &Inner,
        key: Option<&ObjectKey>,
        kinds: &[String],
    ) -> Vec<(ObjectKey, Option<ReconcileStatus>)> {
        let mut out: Vec<_> = match key {
            Some(key) => (!inner.reconciled(key))
                .then(|| (key.clone(), inner.status.get(key).cloned()))
                .into_iter()
                .collect(),
            None => inner
                .objects
                .keys()
                .filter(|k| kinds.is_empty() || kinds.contains(&k.kind))
                .filter(|k| !inner.reconciled(k))
                .map(|k| (k.clone(), inner.status.get(k).cloned()))
                .collect(),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The bookkeeping agrees with a full scan, for every selection a wait can make.
    fn assert_bookkeeping_matches_a_full_scan(store: &Store, universe: &[ObjectKey], what: &str) {
        let inner = store.lock();
        let u = &inner.unsettled;
        let sizes = |m: &HashMap<String, HashSet<ObjectKey>>| {
            assert!(
                m.values().all(|keys| !keys.is_empty()),
                "{what}: empty sets are removed"
            );
            m.values().map(HashSet::len).sum::<usize>()
        };
        assert_eq!(u.waiting_total, sizes(&u.waiting), "{what}");
        assert_eq!(u.failed_total, sizes(&u.failed), "{what}");
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut selections: Vec<(Option<&ObjectKey>, Vec<String>)> = vec![
            (None, vec![]),
            (None, kinds(&["File"])),
            (None, kinds(&["Other"])),
            (None, kinds(&["Other", "File", "Other"])),
            (None, kinds(&["Nothing"])),
        ];
        selections.extend(universe.iter().map(|k| (Some(k), vec![])));
        for (key, kinds) in selections {
            let selection = Selection::new(key, &kinds);
            let scan = full_scan(&inner, key, &kinds);
            assert_eq!(inner.waiting(&selection), scan, "{what}: {selection:?}");
            let failed: Vec<_> = scan
                .iter()
                .filter_map(|(k, s)| {
                    s.clone()
                        .filter(|s| s.phase == Phase::Error && s.terminal)
                        .map(|s| (k.clone(), s))
                })
                .collect();
            assert_eq!(inner.failed(&selection), failed, "{what}: {selection:?}");
            let expected = if !failed.is_empty() {
                Check::Failed
            } else if scan.is_empty() {
                Check::Reconciled
            } else {
                Check::Waiting
            };
            assert_eq!(
                u.check(&selection, false),
                expected,
                "{what}: {selection:?}"
            );
            let kept = if scan.is_empty() {
                Check::Reconciled
            } else {
                Check::Waiting
            };
            assert_eq!(u.check(&selection, true), kept, "{what}: {selection:?}");
        }
    }

    #[test]
    fn the_unreconciled_bookkeeping_equals_a_full_scan_after_any_sequence_of_changes() {
        let universe: Vec<ObjectKey> = ["File", "Other"]
            .iter()
            .flat_map(|kind| {
                ["", "team"].iter().flat_map(move |ns| {
                    ["a", "b", "c"]
                        .iter()
                        .map(move |n| ObjectKey::new(kind, ns, n))
                })
            })
            .collect();
        for seed in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store.redb");
            let store = Store::open(&path).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            if rng.bool() {
                store.register_finalizer("File", "files").unwrap();
            }
            for step in 0..250 {
                let key = &universe[rng.usize(..universe.len())];
                let op = rng.u8(..12);
                let generation = rng.u64(0..4);
                let spec = json!({ "content": rng.u8(..3) });
                let object = || Object::new(&key.kind, &key.namespace, &key.name, spec.clone());
                // Refusals (a deleting or missing object) are part of the game.
                let _ = match op {
                    0..=2 => store.apply(object()).map(drop),
                    3 => store.delete(key, None).map(drop),
                    4 => store.finalize(key, "setpoint.dev/files").map(drop),
                    5 => store.force_delete(key, None).map(drop),
                    6 => store.register_finalizer(&key.kind, "other").map(drop),
                    7 | 8 => store.mark_done(key, generation),
                    9 => store.mark_error(key, "retry"),
                    10 => store.mark_failed(key, "for good"),
                    _ => store.set_status(key, r#"{"x":1}"#),
                };
                let what = format!("seed {seed}, step {step}, op {op} on {key}");
                assert_bookkeeping_matches_a_full_scan(&store, &universe, &what);
            }
            // Rebuilt from the file at open, it agrees too.
            store.flush().unwrap();
            drop(store);
            let store = Store::open(&path).unwrap();
            assert_bookkeeping_matches_a_full_scan(
                &store,
                &universe,
                &format!("seed {seed}, reopened"),
            );
        }
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
