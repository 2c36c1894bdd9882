//! Where the store keeps its data: the [`Backend`] seam under the in-memory
//! copy that serves every read.
//!
//! The store loads everything once ([`Backend::load`]) and from then on hands
//! each commit to the backend: desired-state writes at once, written-behind
//! status and key-value changes in batches. Reads never reach the backend, so
//! the WIT host calls stay synchronous whatever the backend is.
//!
//! Guarantee (every backend): a commit is all or nothing, durable when it
//! returns `Ok` (for the backends that are durable at all), and commits are
//! applied in the order they are made.

use super::{ReconcileStatus, StoreError};
use crate::object::{Object, ObjectKey};

/// One plugin key-value entry to write (`None`: remove it).
pub type KvRow = ((String, String), Option<Vec<u8>>);

/// Everything a backend holds, read at open.
#[derive(Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub status: Vec<(ObjectKey, ReconcileStatus)>,
    pub kv: Vec<((String, String), Vec<u8>)>,
    pub next_uid: u64,
    pub next_version: u64,
}

/// One commit: the rows that changed (`None`: removed) and the counters.
pub struct Commit<'a> {
    pub objects: &'a [(ObjectKey, Option<Object>)],
    pub status: &'a [(ObjectKey, Option<ReconcileStatus>)],
    pub kv: &'a [KvRow],
    pub next_uid: u64,
    pub next_version: u64,
    /// The first `required.0` object rows and `required.1` status rows are
    /// the write asked for now; the rest (and every kv row) were written
    /// behind by reconciles. A backend shared with other replicas may drop a
    /// written-behind row that another replica's write superseded or that
    /// this replica no longer owns; it must never drop a required one (it
    /// refuses the commit instead).
    pub required: (usize, usize),
    /// The required rows are written as the owner of their keys (a reconcile's
    /// result, such as the removal after the last finalizer), not as desired
    /// state from a client.
    pub owner: bool,
}

impl Commit<'_> {
    /// Whether object row `i` is written as the owner of its key.
    pub fn owner_object(&self, i: usize) -> bool {
        i >= self.required.0 || self.owner
    }

    /// Whether status row `i` is written as the owner of its key.
    pub fn owner_status(&self, i: usize) -> bool {
        i >= self.required.1 || self.owner
    }
}

/// A change another replica made, for [`Store`](super::Store)'s in-memory copy
/// (`None`: removed).
#[derive(Clone, Debug, PartialEq)]
pub enum Remote {
    Object(ObjectKey, Option<Box<Object>>),
    Status(ObjectKey, Option<ReconcileStatus>),
    Kv((String, String), Option<Vec<u8>>),
}

impl Remote {
    pub fn is_removal(&self) -> bool {
        matches!(
            self,
            Remote::Object(_, None) | Remote::Status(_, None) | Remote::Kv(_, None)
        )
    }
}

/// Where a backend delivers the changes others made. The store applies row
/// `i` only if `current(i)` holds once it has its lock and no commit of its
/// own is in flight (a backend answers false for a row its own newer commit
/// superseded meanwhile).
pub type Sink = Box<dyn Fn(Vec<Remote>, &dyn Fn(usize) -> bool) + Send + Sync>;

/// Durable storage for a [`Store`](super::Store).
pub trait Backend: Send + Sync + 'static {
    /// Everything stored.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Store `commit`: every required row or none (see [`Commit::required`]).
    fn commit(&self, commit: &Commit<'_>) -> Result<(), StoreError>;
    /// True if every written-behind row it is given is stored (or lost only
    /// with the process, and reloaded consistently). A backend that may drop
    /// one (see [`Commit::required`]) answers false: the in-memory copy may
    /// then differ from what is stored, so the store sends a write even when
    /// it changes nothing in memory.
    fn keeps_writes_behind(&self) -> bool {
        true
    }

    /// True if one commit may hold several clients' requests (group commit).
    /// A backend that may refuse a commit because of one request's rows (a
    /// lost compare) answers false, so that the refusal stays that request's.
    fn groups_writes(&self) -> bool {
        true
    }

    /// Deliver changes made by others (other replicas sharing the backend) to
    /// `sink` from now on. Backends only this process writes have none.
    fn follow(&self, sink: Sink) {
        drop(sink);
    }
}

/// Nothing stored: the in-memory copy is all there is (tests, one-off
/// commands).
pub struct Memory;

impl Backend for Memory {
    fn load(&self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }

    fn commit(&self, _: &Commit<'_>) -> Result<(), StoreError> {
        Ok(())
    }
}
