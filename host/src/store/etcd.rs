//! The shared backend: etcd, for replicas that share one desired state.
//!
//! Layout under the configured prefix: `objects/KEY` and `status/KEY` (JSON,
//! `KEY` as in `Kind:namespace/name`), `kv/PLUGIN/KEY` (the plugin's bytes).
//! The coordination keys (`cluster/`) are [`crate::etcd`]'s.
//!
//! Guarantees:
//! - Every commit is one etcd transaction per chunk, with optimistic
//!   concurrency: each row compares its key's `mod_revision` with the one the
//!   in-memory copy is based on. A required row (a client's write, see
//!   [`Commit::required`]) that lost the race refuses the whole commit
//!   ([`StoreError::Stale`]); a written-behind row that lost it is dropped, and
//!   the newer value arrives through the watch.
//! - Every row written as an owner also compares the creation revision of the
//!   fence [`Fencing`] names (the shard's or leader's key, or the replica's
//!   membership for plugin key-value data). A replica that lost ownership —
//!   even one that does not know it yet, such as a paused process — cannot
//!   land such a write: it is refused or dropped, logged, and counted in
//!   `setpoint_fenced_writes_total`.
//! - Changes made by other replicas come from an etcd watch that resumes from
//!   the last revision it saw. When etcd answers that this revision was
//!   compacted, the backend lists everything again, hands the differences to
//!   the store, and watches on from the list's revision.
//! - etcd's limits are kept: a commit whose required rows need more than
//!   `max-txn-ops` operations or `max-request-bytes` is refused with a message
//!   saying so; written-behind rows are spread over several transactions.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use prometheus_client::metrics::counter::Counter;

use super::StoreError;
use super::backend::{Backend, Commit, Loaded, Remote, Sink};
use crate::etcd::{Etcd, Fence, Fencing, describe};
use crate::object::{Object, ObjectKey};

/// Changes for the store, and the revision the store has caught up to once
/// it took them in.
type Batch = (Vec<(Remote, String, i64)>, i64);

/// Rows per page when listing everything.
const PAGE: i64 = 1000;

/// A store's data in etcd.
pub struct EtcdBackend {
    etcd: Etcd,
    fencing: Arc<dyn Fencing>,
    /// etcd key → the revision the in-memory copy of it is based on:
    /// positive, its `mod_revision`; negative, deleted at that revision.
    revs: Arc<Mutex<HashMap<String, i64>>>,
    /// The revision of the initial list: the watch starts after it.
    loaded_at: Mutex<i64>,
    /// The revision up to which the store has taken in every change.
    progress: Arc<tokio::sync::watch::Sender<i64>>,
    /// A list taken ahead of [`Backend::load`] by [`EtcdBackend::prefetch`].
    prefetched: Mutex<Option<Loaded>>,
    fenced: Counter,
    stop: tokio_util::sync::CancellationToken,
}

/// One row of a commit, ready for etcd.
#[derive(Clone)]
struct Row {
    /// The object (or `kv:PLUGIN/KEY`) it is about, for messages.
    about: ObjectKey,
    key: String,
    value: Option<Vec<u8>>,
    base: i64,
    required: bool,
    fence: Option<Fence>,
}

impl EtcdBackend {
    /// A backend on `etcd`; owner writes carry the fences `fencing` names,
    /// and refused ones are counted in `fenced`.
    pub fn new(etcd: Etcd, fencing: Arc<dyn Fencing>, fenced: Counter) -> Self {
        Self {
            etcd,
            fencing,
            revs: Arc::default(),
            loaded_at: Mutex::new(0),
            prefetched: Mutex::new(None),
            progress: Arc::new(tokio::sync::watch::Sender::new(0)),
            fenced,
            stop: tokio_util::sync::CancellationToken::new(),
        }
    }

    fn revs(&self) -> MutexGuard<'_, HashMap<String, i64>> {
        self.revs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn object_key(&self, key: &ObjectKey) -> String {
        self.etcd.key(&format!("objects/{key}"))
    }

    fn status_key(&self, key: &ObjectKey) -> String {
        self.etcd.key(&format!("status/{key}"))
    }

    fn kv_key(&self, plugin: &str, key: &str) -> String {
        self.etcd.key(&format!("kv/{plugin}/{key}"))
    }

    /// The rows of `commit`, in order: required ones first.
    fn rows(&self, commit: &Commit<'_>) -> Result<Vec<Row>, StoreError> {
        let revs = self.revs();
        let base = |key: &str| revs.get(key).copied().unwrap_or(0).max(0);
        let mut rows = Vec::new();
        let mut push = |key: String,
                        value: Option<Vec<u8>>,
                        required: bool,
                        fence: Option<Option<Fence>>,
                        object: &ObjectKey| {
            // `fence`: None = not an owner write; Some(None) = an owner write
            // this replica may no longer make.
            let fence = match fence {
                None => None,
                Some(Some(f)) => Some(f),
                Some(None) if required => {
                    self.fenced.inc();
                    return Err(StoreError::Fenced(object.clone()));
                }
                Some(None) => {
                    self.fenced.inc();
                    tracing::warn!(key = %object, "fenced: not written, this replica no longer owns it");
                    return Ok(());
                }
            };
            let base = base(&key);
            rows.push(Row {
                about: object.clone(),
                key,
                value,
                base,
                required,
                fence,
            });
            Ok(())
        };
        for (i, (key, object)) in commit.objects.iter().enumerate() {
            let value = object.as_ref().map(json).transpose()?;
            let fence = commit.owner_object(i).then(|| self.fencing.for_key(key));
            push(
                self.object_key(key),
                value,
                i < commit.required.0,
                fence,
                key,
            )?;
        }
        for (i, (key, status)) in commit.status.iter().enumerate() {
            let value = status.as_ref().map(json).transpose()?;
            let fence = commit.owner_status(i).then(|| self.fencing.for_key(key));
            push(
                self.status_key(key),
                value,
                i < commit.required.1,
                fence,
                key,
            )?;
        }
        for ((plugin, key), value) in commit.kv {
            let fence = Some(self.fencing.for_replica());
            let object = ObjectKey::new("kv", plugin, key);
            push(
                self.kv_key(plugin, key),
                value.clone(),
                false,
                fence,
                &object,
            )?;
        }
        Ok(rows)
    }

    /// Split `rows` (required first) into transactions within etcd's limits.
    fn chunks(&self, rows: Vec<Row>) -> Result<Vec<Vec<Row>>, StoreError> {
        let settings = self.etcd.settings();
        let (max_ops, max_bytes) = (settings.max_txn_ops.max(1), settings.max_request_bytes);
        let size = |r: &Row| {
            64 + 2 * r.key.len()
                + r.value.as_ref().map_or(0, Vec::len)
                + r.fence.as_ref().map_or(0, |f| f.key.len() + 16)
        };
        let required: Vec<&Row> = rows.iter().filter(|r| r.required).collect();
        let required_ops = required.len() + fences(required.iter().copied()).len();
        let required_bytes: usize = required.iter().map(|r| size(r)).sum();
        if required_ops > max_ops {
            return Err(StoreError::TooLarge(format!(
                "this write needs {required_ops} etcd operations in one transaction, and etcd \
                 takes at most {max_ops} (its --max-txn-ops; [store] max-txn-ops): write fewer \
                 objects at once (an object is two operations)"
            )));
        }
        if required_bytes > max_bytes {
            return Err(StoreError::TooLarge(format!(
                "this write is about {} KiB, and etcd takes at most {} KiB per request (its \
                 --max-request-bytes; [store] max-request-bytes): write fewer or smaller objects \
                 at once",
                required_bytes / 1024,
                max_bytes / 1024
            )));
        }
        // Written-behind rows first, in as many transactions as they need;
        // the required rows last, in one. If a transaction fails, the commit
        // fails with nothing required stored: the caller keeps every row
        // pending, and rows already stored are stored again harmlessly.
        let (required, behind): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.required);
        let mut chunks: Vec<Vec<Row>> = Vec::new();
        let mut current: Vec<Row> = Vec::new();
        let mut bytes = 0;
        for row in behind {
            let row_bytes = size(&row);
            if row_bytes > max_bytes {
                // It can never be written: keeping it would fail every commit.
                tracing::error!(
                    key = %row.about,
                    bytes = row_bytes,
                    "not written: larger than etcd takes in one request (--max-request-bytes)"
                );
                continue;
            }
            let ops = current.len() + 1 + fences(current.iter().chain([&row])).len();
            if !current.is_empty() && (ops > max_ops || bytes + row_bytes > max_bytes) {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += row_bytes;
            current.push(row);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        if !required.is_empty() {
            chunks.push(required);
        }
        Ok(chunks)
    }

    /// Everything under the prefix (but the coordination keys), at one
    /// revision, a page at a time.
    async fn list_all(etcd: &Etcd) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
        let mut client = etcd.client();
        let prefix = etcd.key("");
        let end = prefix_end(&prefix);
        let mut from = prefix.clone().into_bytes();
        let mut revision = 0;
        let mut all = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = client.get(from.clone(), Some(options)).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let kvs = page.kvs();
            let more = page.more();
            if let Some(last) = kvs.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            all.extend(kvs.iter().cloned());
            if !more || kvs.is_empty() {
                return Ok((all, revision));
            }
        }
    }
}

fn json(value: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Storage(e.to_string()))
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The distinct fences of `rows`.
fn fences<'a>(rows: impl Iterator<Item = &'a Row>) -> Vec<Fence> {
    let mut all: Vec<Fence> = rows.filter_map(|r| r.fence.clone()).collect();
    all.sort_by(|a, b| (&a.key, a.revision).cmp(&(&b.key, b.revision)));
    all.dedup();
    all
}

/// What an etcd key under the prefix is, for the store.
fn decode(prefix: &str, key: &[u8], value: Option<&[u8]>) -> Option<Result<Remote, StoreError>> {
    let key = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Storage(format!("etcd key {prefix}{key}: not a valid {what}: {e}"))
    };
    if let Some(object) = key.strip_prefix("objects/") {
        let object_key: ObjectKey = match object.parse() {
            Ok(k) => k,
            Err(e) => return Some(Err(bad("object key", &e))),
        };
        let value = match value.map(serde_json::from_slice::<Box<Object>>).transpose() {
            Ok(v) => v,
            Err(e) => return Some(Err(bad("object", &e))),
        };
        return Some(Ok(Remote::Object(object_key, value)));
    }
    if let Some(object) = key.strip_prefix("status/") {
        let object_key: ObjectKey = match object.parse() {
            Ok(k) => k,
            Err(e) => return Some(Err(bad("object key", &e))),
        };
        let value = match value.map(serde_json::from_slice).transpose() {
            Ok(v) => v,
            Err(e) => return Some(Err(bad("status", &e))),
        };
        return Some(Ok(Remote::Status(object_key, value)));
    }
    if let Some(rest) = key.strip_prefix("kv/") {
        let (plugin, k) = rest.split_once('/')?;
        return Some(Ok(Remote::Kv(
            (plugin.into(), k.into()),
            value.map(<[u8]>::to_vec),
        )));
    }
    None
}

fn storage(e: etcd_client::Error) -> StoreError {
    StoreError::Storage(format!("etcd: {}", describe(&e)))
}

impl EtcdBackend {
    /// The etcd revision up to which the store on this backend has taken in
    /// every change (its own and other replicas').
    pub fn progress(&self) -> crate::etcd::CaughtUp {
        self.progress.subscribe()
    }

    /// List everything now; the store later built on this backend starts
    /// from this list and follows the changes made since its revision (as a
    /// replica that fell behind resumes). Returns how many objects it holds.
    pub fn prefetch(&self) -> Result<usize, StoreError> {
        let loaded = self.list()?;
        let objects = loaded.objects.len();
        *self.prefetched.lock().unwrap_or_else(|e| e.into_inner()) = Some(loaded);
        Ok(objects)
    }

    fn list(&self) -> Result<Loaded, StoreError> {
        let etcd = self.etcd.clone();
        let (kvs, revision) = self
            .etcd
            .run(async move { Self::list_all(&etcd).await })
            .map_err(storage)?;
        let prefix = self.etcd.key("");
        let mut loaded = Loaded::default();
        let mut revs = self.revs();
        for kv in &kvs {
            let row = match decode(&prefix, kv.key(), Some(kv.value())) {
                None => continue,
                Some(Ok(row)) => row,
                Some(Err(e)) => {
                    tracing::warn!("skipped from etcd: {e}");
                    continue;
                }
            };
            revs.insert(
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            );
            match row {
                Remote::Object(_, Some(object)) => {
                    let object = *object;
                    loaded.next_version = loaded.next_version.max(object.metadata.resource_version);
                    loaded.objects.push(object);
                }
                Remote::Status(key, Some(status)) => loaded.status.push((key, status)),
                Remote::Kv(key, Some(value)) => loaded.kv.push((key, value)),
                _ => {}
            }
        }
        // Replicas count uids from random bases, so two never hand out the
        // same one (resource versions are per object: compared in etcd).
        loaded.next_uid = fastrand::u64(..(1 << 48)) << 12;
        *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = revision;
        self.progress.send_replace(revision);
        Ok(loaded)
    }
}

impl Backend for EtcdBackend {
    /// A written-behind row that lost a race or was fenced is dropped.
    fn keeps_writes_behind(&self) -> bool {
        false
    }

    /// A required row that lost its compare refuses the commit
    /// ([`StoreError::Stale`]): grouped, it would refuse other clients'
    /// writes too. etcd's own transactions take one request each.
    fn groups_writes(&self) -> bool {
        false
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        match self
            .prefetched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(loaded) => Ok(loaded),
            None => self.list(),
        }
    }

    fn commit(&self, commit: &Commit<'_>) -> Result<(), StoreError> {
        let rows = self.rows(commit)?;
        if rows.is_empty() {
            return Ok(());
        }
        for chunk in self.chunks(rows)? {
            let (etcd, revs, fenced) = (self.etcd.clone(), self.revs.clone(), self.fenced.clone());
            self.etcd
                .run(async move { commit_chunk(&etcd, &revs, &fenced, chunk).await })?;
        }
        Ok(())
    }

    fn follow(&self, sink: Sink) {
        let from = *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) + 1;
        let (tx, rx) = std::sync::mpsc::channel::<Batch>();
        let progress = self.progress.clone();
        let revs = self.revs.clone();
        // The store's lock is taken on a thread of its own, never on the
        // etcd runtime's (a commit holding that lock waits on the runtime).
        let spawned = std::thread::Builder::new()
            .name("setpoint-etcd-absorb".into())
            .spawn(move || {
                for (batch, through) in rx {
                    let (rows, at): (Vec<Remote>, Vec<(String, i64)>) = batch
                        .into_iter()
                        .map(|(row, key, rev)| {
                            let signed = if row.is_removal() { -rev } else { rev };
                            (row, (key, signed))
                        })
                        .unzip();
                    sink(rows, &|i| {
                        let (key, rev) = &at[i];
                        let mut revs = revs.lock().unwrap_or_else(|e| e.into_inner());
                        // Newer than what memory holds (and not superseded by
                        // this replica's own commit since): take it.
                        if revs.get(key).is_some_and(|known| known.abs() >= rev.abs()) {
                            return false;
                        }
                        revs.insert(key.clone(), *rev);
                        true
                    });
                    progress.send_if_modified(|at| {
                        let newer = through > *at;
                        *at = (*at).max(through);
                        newer
                    });
                }
            });
        if let Err(e) = spawned {
            tracing::error!(
                "cannot start the etcd follower thread: {e}; changes by other replicas will not be seen"
            );
            return;
        }
        let (etcd, revs, stop) = (self.etcd.clone(), self.revs.clone(), self.stop.clone());
        self.etcd.runtime().spawn(async move {
            let run = std::panic::AssertUnwindSafe(watch(etcd, revs, from, tx, stop));
            if let Err(panic) = futures::FutureExt::catch_unwind(run).await {
                let why = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
                tracing::error!("the etcd store watch panicked: {why}; changes by other replicas are no longer seen");
            }
        });
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Commit one chunk; drop written-behind rows that lose their compare and try
/// again; refuse if a required row loses.
async fn commit_chunk(
    etcd: &Etcd,
    revs: &Mutex<HashMap<String, i64>>,
    fenced: &Counter,
    mut rows: Vec<Row>,
) -> Result<(), StoreError> {
    let mut client = etcd.client();
    loop {
        if rows.is_empty() {
            return Ok(());
        }
        let guards = fences(rows.iter());
        let mut compares: Vec<Compare> = rows
            .iter()
            .map(|r| Compare::mod_revision(r.key.clone(), CompareOp::Equal, r.base))
            .collect();
        compares.extend(
            guards
                .iter()
                .map(|f| Compare::create_revision(f.key.clone(), CompareOp::Equal, f.revision)),
        );
        let ops: Vec<TxnOp> = rows
            .iter()
            .map(|r| match &r.value {
                Some(v) => TxnOp::put(r.key.clone(), v.clone(), None),
                None => TxnOp::delete(r.key.clone(), None),
            })
            .collect();
        // On failure, read back what was compared, to tell which row lost.
        let mut reads: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
        reads.extend(guards.iter().map(|f| f.key.clone()));
        let txn = Txn::new().when(compares).and_then(ops).or_else(
            reads
                .iter()
                .map(|k| TxnOp::get(k.clone(), None))
                .collect::<Vec<_>>(),
        );
        let answer = client.txn(txn).await.map_err(storage)?;
        if answer.succeeded() {
            let revision = answer.header().map_or(0, |h| h.revision());
            let mut revs = revs.lock().unwrap_or_else(|e| e.into_inner());
            for row in &rows {
                let at = if row.value.is_some() {
                    revision
                } else {
                    -revision
                };
                revs.insert(row.key.clone(), at);
            }
            return Ok(());
        }
        let mut now: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (key, read) in reads.iter().zip(answer.op_responses()) {
            let (created, modified) = match read {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map_or((0, 0), |kv| (kv.create_revision(), kv.mod_revision())),
                _ => (0, 0),
            };
            now.insert(key.clone(), (created, modified));
        }
        let lost_fences: Vec<&Fence> = guards
            .iter()
            .filter(|f| now.get(&f.key).map(|(c, _)| *c) != Some(f.revision))
            .collect();
        let before = rows.len();
        let mut refused = None;
        rows.retain(|r| {
            let fenced_out = r.fence.as_ref().is_some_and(|f| lost_fences.contains(&f));
            let raced = now.get(&r.key).map(|(_, m)| *m) != Some(r.base);
            if !(fenced_out || raced) {
                return true;
            }
            if fenced_out {
                fenced.inc();
                tracing::warn!(key = %r.about, etcd = %r.key, "fenced: not written, another replica owns it now");
            } else {
                tracing::debug!(key = %r.about, etcd = %r.key, "not written: another replica changed it first");
            }
            if r.required && refused.is_none() {
                refused = Some(if fenced_out {
                    StoreError::Fenced(r.about.clone())
                } else {
                    StoreError::Stale(r.about.clone())
                });
            }
            false
        });
        if let Some(refused) = refused {
            return Err(refused);
        }
        if rows.len() == before {
            return Err(StoreError::Storage(
                "etcd refused the transaction, and no compare failed on reading back; try again"
                    .into(),
            ));
        }
    }
}

/// Follow the prefix from `from` until `stop`, sending others' changes to
/// the store's thread; list again when the revision was compacted.
async fn watch(
    etcd: Etcd,
    revs: Arc<Mutex<HashMap<String, i64>>>,
    mut from: i64,
    tx: std::sync::mpsc::Sender<Batch>,
    stop: tokio_util::sync::CancellationToken,
) {
    let prefix = etcd.key("");
    let mut wait = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let mut client = etcd.client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let stream = tokio::select! {
            s = client.watch(prefix.clone(), Some(options)) => s,
            _ = stop.cancelled() => return,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch etcd: {}; trying again", describe(&e));
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = stop.cancelled() => return,
            };
            let answer = match message {
                Ok(Some(answer)) => answer,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(
                        "the etcd watch broke: {}; resuming from revision {from}",
                        describe(&e)
                    );
                    break;
                }
            };
            wait = Duration::from_millis(100);
            if answer.compact_revision() > 0 {
                tracing::warn!(
                    compacted = answer.compact_revision(),
                    "etcd compacted revision {from} away: listing everything again"
                );
                match relist(&etcd, &revs, &prefix, &tx).await {
                    Ok(at) => from = at + 1,
                    Err(e) => tracing::warn!("cannot list etcd: {}; trying again", describe(&e)),
                }
                break;
            }
            if answer.canceled() {
                break;
            }
            let mut batch = Vec::new();
            {
                let known = revs.lock().unwrap_or_else(|e| e.into_inner());
                for event in answer.events() {
                    let Some(kv) = event.kv() else { continue };
                    let rev = kv.mod_revision();
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    if known.get(&key).is_some_and(|k| k.abs() >= rev) {
                        continue; // this replica's own write, or older
                    }
                    let value = (event.event_type() == EventType::Put).then(|| kv.value());
                    match decode(&prefix, kv.key(), value) {
                        Some(Ok(row)) => batch.push((row, key, rev)),
                        Some(Err(e)) => tracing::warn!("skipped from etcd: {e}"),
                        None => {}
                    }
                }
            }
            // Resume after the last event seen: a header's revision can be
            // ahead of the events sent so far (catching up, or "created").
            let Some(last) = answer
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max()
            else {
                continue;
            };
            from = from.max(last + 1);
            // Sent even when empty (only this replica's own writes, or the
            // coordination keys): the store has then caught up to `last`.
            if tx.send((batch, last)).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// List everything and send what differs from what memory is based on;
/// returns the list's revision.
async fn relist(
    etcd: &Etcd,
    revs: &Mutex<HashMap<String, i64>>,
    prefix: &str,
    tx: &std::sync::mpsc::Sender<Batch>,
) -> Result<i64, etcd_client::Error> {
    let (kvs, revision) = EtcdBackend::list_all(etcd).await?;
    let mut batch = Vec::new();
    let mut listed = std::collections::HashSet::new();
    {
        let known = revs.lock().unwrap_or_else(|e| e.into_inner());
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            listed.insert(key.clone());
            if known
                .get(&key)
                .is_some_and(|k| k.abs() >= kv.mod_revision())
            {
                continue;
            }
            if let Some(Ok(row)) = decode(prefix, kv.key(), Some(kv.value())) {
                batch.push((row, key, kv.mod_revision()));
            }
        }
        for (key, rev) in known.iter() {
            if *rev > 0
                && !listed.contains(key)
                && let Some(Ok(row)) = decode(prefix, key.as_bytes(), None)
            {
                batch.push((row, key.clone(), revision));
            }
        }
    }
    let _ = tx.send((batch, revision));
    Ok(revision)
}
