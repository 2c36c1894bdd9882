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
//! - A reconcile runs under a [`Hold`] taken with [`Ownership::hold`], which
//!   checks the view and counts the hold in one step; [`Ownership::settled`]
//!   waits until no hold is left on the shards given. So a replica handing a
//!   shard over first takes it out of its view, then waits for `settled`, and
//!   only then lets it go: no key is reconciled by two replicas at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

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
    holds: Arc<Holds>,
    /// Bumped by [`Ownership::revoke`].
    revoked: Arc<watch::Sender<u64>>,
}

/// Reconciles running now, by the shard their key is in (0 when the view is
/// not a shard map).
#[derive(Default)]
struct Holds {
    running: Mutex<HashMap<u32, usize>>,
    released: tokio::sync::Notify,
}

impl Holds {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, usize>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Proof that a reconcile of an owned key is running; dropping it ends it.
pub struct Hold {
    holds: Arc<Holds>,
    shard: u32,
    revoked: watch::Receiver<u64>,
}

impl Hold {
    /// Resolves if ownership is revoked while this hold lasts (a lost lease):
    /// the reconcile must stop now, before another replica may start it.
    pub async fn revoked(&mut self) {
        let _ = self.revoked.changed().await;
        if self.revoked.has_changed().is_err() {
            // The publisher is gone (shutting down): never revoked.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut running = self.holds.lock();
        if let Some(n) = running.get_mut(&self.shard) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.shard);
            }
        }
        drop(running);
        self.holds.released.notify_waiters();
    }
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
            holds: Arc::default(),
            revoked: Arc::new(watch::Sender::new(0)),
        }
    }

    /// All (`true`) or nothing (`false`), as a leader lease gives.
    pub fn leading(leading: bool) -> Self {
        Self::new(if leading { Owned::All } else { Owned::Nothing })
    }

    /// Replace the view (subscribers are told only if it changed). No hold
    /// taken after this returns sees the old view.
    pub fn set(&self, owned: Owned) {
        let _holds = self.holds.lock();
        self.tx.send_if_modified(|now| {
            if *now == owned {
                return false;
            }
            *now = owned;
            true
        });
    }

    /// Own nothing, at once and without a handover: the lease this process
    /// owned under is lost, and another replica may take its keys as soon as
    /// etcd expires it. Reconciles in flight are told to stop
    /// ([`Hold::revoked`]).
    pub fn revoke(&self) {
        self.set(Owned::Nothing);
        self.revoked.send_modify(|n| *n += 1);
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

    /// Start a reconcile of `key`: `None` if this process does not own it.
    pub fn hold(&self, key: &ObjectKey) -> Option<Hold> {
        let mut running = self.holds.lock();
        let shard = match &*self.tx.borrow() {
            Owned::All => 0,
            Owned::Nothing => return None,
            Owned::Shards { of, terms } => {
                let shard = shard_of(key, *of);
                if !terms.contains_key(&shard) {
                    return None;
                }
                shard
            }
        };
        *running.entry(shard).or_default() += 1;
        let mut revoked = self.revoked.subscribe();
        revoked.borrow_and_update();
        Some(Hold {
            holds: self.holds.clone(),
            shard,
            revoked,
        })
    }

    /// Wait until no reconcile holds any of `shards` (every shard if `None`).
    pub async fn settled(&self, shards: Option<&[u32]>) {
        loop {
            let released = self.holds.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let busy = {
                let running = self.holds.lock();
                match shards {
                    None => !running.is_empty(),
                    Some(list) => list.iter().any(|s| running.contains_key(s)),
                }
            };
            if !busy {
                return;
            }
            released.await;
        }
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

    #[tokio::test]
    async fn settled_waits_for_the_holds_on_the_shards_asked_for_only() {
        let ownership = Ownership::new(shards(2, &[0, 1]));
        let in_shard = |n: u32| {
            (0..)
                .map(|i| key(&format!("k{i}")))
                .find(|k| shard_of(k, 2) == n)
                .unwrap()
        };
        let (a, b) = (in_shard(0), in_shard(1));
        let on_zero = ownership.hold(&a).unwrap();
        let _on_one = ownership.hold(&b).unwrap();
        // Shard 1 is busy, but only shard 0 is asked about.
        ownership.set(shards(2, &[1]));
        assert!(
            ownership.hold(&a).is_none(),
            "no new hold once the view says so"
        );
        let waiter = tokio::spawn({
            let ownership = ownership.clone();
            async move { ownership.settled(Some(&[0])).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a reconcile of shard 0 still runs");
        drop(on_zero);
        waiter.await.unwrap();
        let all = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            ownership.settled(None),
        );
        assert!(all.await.is_err(), "shard 1 is still held");
    }

    #[tokio::test]
    async fn a_revoke_tells_every_hold_and_a_handover_does_not() {
        let ownership = Ownership::new(shards(2, &[0, 1]));
        let mut hold = ownership.hold(&key("a")).unwrap();
        ownership.set(shards(2, &[]));
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(20), hold.revoked());
        assert!(quiet.await.is_err(), "a handover lets the reconcile finish");
        ownership.set(Owned::All);
        let mut hold = ownership.hold(&key("b")).unwrap();
        ownership.revoke();
        hold.revoked().await;
        assert_eq!(ownership.get(), Owned::Nothing);
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
