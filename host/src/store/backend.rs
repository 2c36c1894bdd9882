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
}

/// Durable storage for a [`Store`](super::Store).
pub trait Backend: Send + Sync + 'static {
    /// Everything stored.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Store `commit`, all of it or none.
    fn commit(&self, commit: &Commit<'_>) -> Result<(), StoreError>;
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
