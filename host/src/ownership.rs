//! Ownership: which object keys this process may reconcile, now and as it
//! changes.
//!
//! An [`Ownership`] publishes an [`Owned`] view on a `watch` channel. The
//! single-process default owns everything ([`Owned::All`]); a leader lease owns
//! all or nothing; a shard map owns a part ([`Owned::Shards`]): a key belongs to
//! shard [`shard_of`] (a stable hash of the key modulo the shard count), and this
//! process owns the shards it holds a lease for, each with the term it holds it
//! under.
//!
//! Guarantees:
//! - [`shard_of`] depends on the key and the shard count only, so every replica
//!   agrees on which shard a key is in.
//! - Controllers read the view before they queue a key and again before they
//!   dispatch it, so a key whose shard this process lost is not reconciled
//!   here once the view says so (what is in flight finishes).
//! - Every change to the view is published; a subscriber sees the latest.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::object::ObjectKey;

/// What this process owns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "owns")]
pub enum Owned {
    /// Every key (a single process, or the leader).
    #[default]
    All,
    /// No key (not leading, or no shard held).
    Nothing,
    /// The keys of some shards of `of`, with the term each is held under (the
    /// lease key's creation revision, the fencing token).
    Shards { of: u32, terms: BTreeMap<u32, i64> },
}

impl Owned {
    /// Whether `key` is this process's to reconcile.
    pub fn owns(&self, key: &ObjectKey) -> bool {
        match self {
            Owned::All => true,
            Owned::Nothing => false,
            Owned::Shards { of, terms } => terms.contains_key(&shard_of(key, *of)),
        }
    }

    /// Whether any key at all is this process's.
    pub fn any(&self) -> bool {
        match self {
            Owned::All => true,
            Owned::Nothing => false,
            Owned::Shards { terms, .. } => !terms.is_empty(),
        }
    }

    /// Whether this view owns every key.
    pub fn all(&self) -> bool {
        match self {
            Owned::All => true,
            Owned::Nothing => false,
            Owned::Shards { of, terms } => terms.len() == *of as usize,
        }
    }

    /// Whether this view owns something `before` did not (a key to pick up
    /// from the store), or holds a shard under a newer term.
    pub fn gained_over(&self, before: &Owned) -> bool {
        match (before, self) {
            (_, Owned::Nothing) | (Owned::All, _) => false,
            (Owned::Nothing, now) => now.any(),
            (Owned::Shards { .. }, Owned::All) => true,
            (Owned::Shards { of: a, terms: was }, Owned::Shards { of: b, terms: now }) => {
                a != b || now.iter().any(|(shard, term)| was.get(shard) != Some(term))
            }
        }
    }

    /// The shard of `key` and the term it is held under, when this view is a
    /// shard map that owns it.
    pub fn term_of(&self, key: &ObjectKey) -> Option<(u32, i64)> {
        match self {
            Owned::Shards { of, terms } => {
                let shard = shard_of(key, *of);
                terms.get(&shard).map(|term| (shard, *term))
            }
            _ => None,
        }
    }
}

/// The shard of `key` among `count` (0 when `count` is 0 or 1): 64-bit FNV-1a
/// of `kind`, `namespace` and `name` (each followed by a 0 byte), modulo `count`.
pub fn shard_of(key: &ObjectKey, count: u32) -> u32 {
    if count <= 1 {
        return 0;
    }
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for part in [&key.kind, &key.namespace, &key.name] {
        for byte in part.bytes().chain([0]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (hash % u64::from(count)) as u32
}

/// A published ownership view. Clones share it.
#[derive(Clone)]
pub struct Ownership {
    tx: Arc<watch::Sender<Owned>>,
}

impl Default for Ownership {
    /// The single-process default: everything.
    fn default() -> Self {
        Self::new(Owned::All)
    }
}

impl Ownership {
    pub fn new(owned: Owned) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(owned)),
        }
    }

    /// All (`true`) or nothing (`false`), as a leader lease gives.
    pub fn leading(leading: bool) -> Self {
        Self::new(if leading { Owned::All } else { Owned::Nothing })
    }

    /// Replace the view (subscribers are told only if it changed).
    pub fn set(&self, owned: Owned) {
        self.tx.send_if_modified(|now| {
            if *now == owned {
                return false;
            }
            *now = owned;
            true
        });
    }

    /// Lead (own all) or not (own nothing).
    pub fn set_leading(&self, leading: bool) {
        self.set(if leading { Owned::All } else { Owned::Nothing });
    }

    /// The view now.
    pub fn get(&self) -> Owned {
        self.tx.borrow().clone()
    }

    /// Whether `key` is this process's now.
    pub fn owns(&self, key: &ObjectKey) -> bool {
        self.tx.borrow().owns(key)
    }

    /// A receiver of the view and its changes.
    pub fn subscribe(&self) -> watch::Receiver<Owned> {
        self.tx.subscribe()
    }
}

/// Wait until `owned` owns something. Returns false if the view's publisher is
/// gone (the process is shutting down).
pub async fn until_owning(owned: &mut watch::Receiver<Owned>) -> bool {
    owned.wait_for(Owned::any).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: "File".into(),
            namespace: String::new(),
            name: name.into(),
        }
    }

    fn shards(of: u32, mine: &[u32]) -> Owned {
        Owned::Shards {
            of,
            terms: mine.iter().map(|s| (*s, 7)).collect(),
        }
    }

    #[tokio::test]
    async fn a_subscriber_waits_until_something_is_owned() {
        let ownership = Ownership::leading(false);
        let mut rx = ownership.subscribe();
        assert!(!rx.borrow().any());
        let waiter = tokio::spawn(async move { until_owning(&mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        ownership.set(shards(4, &[2]));
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn the_default_owns_everything() {
        assert!(Ownership::default().owns(&key("a")));
        assert!(!Ownership::leading(false).owns(&key("a")));
    }

    #[test]
    fn shards_split_the_keys_evenly_and_stably() {
        let mut counts = [0_u32; 8];
        for i in 0..8000 {
            let k = key(&format!("object-{i}"));
            let shard = shard_of(&k, 8);
            assert_eq!(shard, shard_of(&k, 8));
            counts[shard as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven split: {counts:?}");
        }
        assert_eq!(shard_of(&key("x"), 1), 0);
        assert_eq!(shard_of(&key("x"), 0), 0);
    }

    #[test]
    fn a_shard_view_owns_exactly_the_keys_of_its_shards() {
        let view = shards(4, &[0, 3]);
        for i in 0..200 {
            let k = key(&format!("k{i}"));
            let shard = shard_of(&k, 4);
            assert_eq!(view.owns(&k), shard == 0 || shard == 3);
            assert_eq!(view.term_of(&k).is_some(), view.owns(&k));
        }
        assert!(view.any() && !view.all());
        assert!(shards(2, &[0, 1]).all());
    }

    #[test]
    fn gaining_is_a_new_shard_or_a_new_term() {
        assert!(shards(4, &[0, 1]).gained_over(&shards(4, &[0])));
        assert!(!shards(4, &[0]).gained_over(&shards(4, &[0, 1])));
        let mut newer = shards(4, &[0]);
        if let Owned::Shards { terms, .. } = &mut newer {
            terms.insert(0, 9);
        }
        assert!(newer.gained_over(&shards(4, &[0])));
        assert!(Owned::All.gained_over(&Owned::Nothing));
        assert!(!Owned::Nothing.gained_over(&Owned::All));
        assert!(!Owned::All.gained_over(&Owned::All));
    }

    #[test]
    fn setting_the_same_view_tells_nobody() {
        let ownership = Ownership::default();
        let mut rx = ownership.subscribe();
        rx.borrow_and_update();
        ownership.set(Owned::All);
        assert!(!rx.has_changed().unwrap());
        ownership.set(Owned::Nothing);
        assert!(rx.has_changed().unwrap());
    }
}
