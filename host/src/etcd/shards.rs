//! Shards held under leases, so that N replicas share the work.
//!
//! Each replica keeps one lease alive ([`Lease`]) and, under it, a membership
//! key `PREFIX/cluster/members/REPLICA`. Every replica watches the members and
//! the shard keys `PREFIX/cluster/shards/N` and computes the same assignment
//! by rendezvous hashing: shard `N` belongs to the live member with the highest
//! score for `(member, N)`. On a membership change only the shards whose
//! highest-scoring member changed move.
//!
//! Guarantees:
//! - A shard is taken only when its key does not exist (one transaction:
//!   `create_revision == 0`, then put under this replica's lease), so it is
//!   taken only after the previous holder released it or its lease expired.
//!   The key's creation revision is the term the shard is held under, and the
//!   fence of every write this replica makes about the shard's keys.
//! - A replica lets a shard go (because another member should have it, or at a
//!   clean stop) in this order: out of its ownership view, wait until no
//!   reconcile of the shard runs ([`Ownership::settled`]), run the
//!   before-release hook (the daemon flushes the store), delete the key. So no
//!   key is reconciled by two replicas at once.
//! - A lost lease (see [`lease`](super::lease)) empties the view at once; the
//!   replica then joins again under a new lease, with new terms.
//! - A clean stop revokes the lease after the handover steps, so every shard
//!   is free for the others at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio_util::sync::CancellationToken;

use super::lease::Lease;
use super::{BeforeRelease, CaughtUp, Cluster, Etcd, Fence, Fences, describe};
use crate::ownership::{Owned, Ownership};

/// The score of `member` for `shard` (highest wins): FNV-1a over both, then
/// a 64-bit finaliser so that close names spread.
fn score(member: &str, shard: u32) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for b in member.bytes().chain([0]).chain(shard.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The member `shard` belongs to among `members`.
pub fn assign<'a>(shard: u32, members: impl IntoIterator<Item = &'a String>) -> Option<&'a String> {
    members
        .into_iter()
        .max_by_key(|m| (score(m, shard), m.as_str()))
}

/// Who holds a shard: its name, the creation revision of the shard's key
/// (the term) and the lease the key is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Holder {
    pub(super) name: String,
    pub(super) term: i64,
    lease: i64,
}

/// What one replica sees of the cluster.
#[derive(Default)]
struct View {
    members: BTreeSet<String>,
    /// Shard → its holder: name, creation revision of its key, lease.
    holders: BTreeMap<u32, Holder>,
}

/// The keys this module writes.
struct Keys {
    members: String,
    shards: String,
    cluster: String,
}

impl Keys {
    fn new(etcd: &Etcd) -> Self {
        Self {
            members: etcd.key("cluster/members/"),
            shards: etcd.key("cluster/shards/"),
            cluster: etcd.key("cluster/"),
        }
    }

    fn shard(&self, n: u32) -> String {
        format!("{}{n}", self.shards)
    }
}

/// Hold this replica's share of the shards until `stop`, publishing it to
/// `ownership` and `fences`.
pub(super) async fn run(
    etcd: Etcd,
    ownership: Ownership,
    fences: Arc<Fences>,
    cluster: Arc<Cluster>,
    before_release: BeforeRelease,
    caught_up: Option<CaughtUp>,
    stop: CancellationToken,
) {
    let keys = Keys::new(&etcd);
    let settings = etcd.settings().clone();
    let mut backoff = Backoff::default();
    let mut previous: Option<Lease> = None;
    'term: while !stop.is_cancelled() {
        let term = super::next_term(&etcd, &mut previous, &mut backoff, &stop);
        let Some(lease) = term.after(&ownership, &fences, &before_release).await else {
            break;
        };
        let mut client = etcd.client();
        let member = format!("{}{}", keys.members, settings.replica);
        let joined = client
            .put(
                member.clone(),
                settings.replica.clone(),
                Some(PutOptions::new().with_lease(lease.id())),
            )
            .await;
        let joined_at = match joined {
            Ok(r) => r.header().map_or(0, |h| h.revision()),
            Err(e) => {
                tracing::warn!(replica = %settings.replica, "cannot join: {}", describe(&e));
                previous = Some(lease);
                backoff.wait(&stop).await;
                continue;
            }
        };
        // The membership key was just (re)written: its creation revision is
        // the fence for writes on behalf of the whole replica.
        let created = client
            .get(member.clone(), None)
            .await
            .ok()
            .and_then(|r| r.kvs().first().map(|kv| kv.create_revision()))
            .unwrap_or(joined_at);
        fences.set_replica(Some(Fence {
            key: member.clone(),
            revision: created,
        }));
        tracing::info!(replica = %settings.replica, lease = lease.id(), "joined the cluster");
        let _guard = super::drop_on_loss(&lease, &ownership, &fences);
        backoff = Backoff::default();
        let mut mine: BTreeMap<u32, i64> = BTreeMap::new();
        let ctx = Ctx {
            keys: &keys,
            me: &settings.replica,
            count: settings.shards,
            ttl: settings.ttl,
            ownership: &ownership,
            fences: &fences,
            before_release: &before_release,
            caught_up: caught_up.clone(),
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Sessions: list, then watch from just after the list; on a broken
        // or compacted watch, list again (the lease may still be fine).
        loop {
            let (mut view, revision) = match list(&mut client, &keys).await {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::warn!(replica = %settings.replica, "cannot list the cluster: {}", describe(&e));
                    tokio::select! {
                        _ = backoff.wait(&stop) => {}
                        _ = lease.lost() => {}
                    }
                    if stop.is_cancelled() || lease.is_lost() {
                        break;
                    }
                    continue;
                }
            };
            // What the list says we hold is what we hold (a shard we had may
            // have been lost with an earlier lease).
            mine.retain(|s, term| {
                view.holders.get(s).is_some_and(|h| {
                    h.name == settings.replica && h.term == *term && h.lease == lease.id()
                })
            });
            let watch = client
                .watch(
                    keys.cluster.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                )
                .await;
            let mut watch = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(replica = %settings.replica, "cannot watch the cluster: {}", describe(&e));
                    backoff.wait(&stop).await;
                    continue;
                }
            };
            loop {
                rebalance(&mut client, &ctx, &lease, &mut view, &mut mine).await;
                cluster.set(&view.members, &view.holders);
                tokio::select! {
                    // Try again what failed (a take or release etcd did not
                    // answer) even when the cluster is quiet.
                    _ = tick.tick() => {}
                    message = watch.message() => match message {
                        Ok(Some(answer)) if answer.compact_revision() == 0 && !answer.canceled() => {
                            for event in answer.events() {
                                let Some(kv) = event.kv() else { continue };
                                let key = String::from_utf8_lossy(kv.key()).into_owned();
                                let put = event.event_type() == EventType::Put;
                                view.apply(&keys, &key, put.then(|| holder(kv)));
                            }
                        }
                        Ok(Some(_)) | Ok(None) | Err(_) => break,
                    },
                    _ = lease.lost() => {
                        ownership.revoke();
                        fences.clear();
                        tracing::warn!(replica = %settings.replica, "lease lost: owning nothing until this replica joins again");
                        previous = Some(lease);
                        continue 'term;
                    }
                    _ = stop.cancelled() => {
                        leave(&etcd, &keys, lease, &mut mine, &ownership, &fences, &before_release).await;
                        return;
                    }
                }
            }
            if lease.is_lost() {
                ownership.revoke();
                fences.clear();
                previous = Some(lease);
                continue 'term;
            }
        }
        if stop.is_cancelled() {
            leave(
                &etcd,
                &keys,
                lease,
                &mut mine,
                &ownership,
                &fences,
                &before_release,
            )
            .await;
            return;
        }
        ownership.set(Owned::Nothing);
        fences.clear();
        previous = Some(lease);
    }
    ownership.set(Owned::Nothing);
    fences.clear();
}

impl View {
    /// Record a put (`Some(holder)`: value, creation revision, lease) or a
    /// delete of `key`.
    fn apply(&mut self, keys: &Keys, key: &str, put: Option<Holder>) {
        if let Some(name) = key.strip_prefix(&keys.members) {
            if put.is_some() {
                self.members.insert(name.to_string());
            } else {
                self.members.remove(name);
            }
        } else if let Some(n) = key.strip_prefix(&keys.shards).and_then(|n| n.parse().ok()) {
            match put {
                Some(holder) => {
                    self.holders.insert(n, holder);
                }
                None => {
                    self.holders.remove(&n);
                }
            }
        }
    }
}

fn holder(kv: &etcd_client::KeyValue) -> Holder {
    Holder {
        name: String::from_utf8_lossy(kv.value()).into_owned(),
        term: kv.create_revision(),
        lease: kv.lease(),
    }
}

async fn list(
    client: &mut etcd_client::Client,
    keys: &Keys,
) -> Result<(View, i64), etcd_client::Error> {
    let listed = client
        .get(keys.cluster.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut view = View::default();
    for kv in listed.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        view.apply(keys, &key, Some(holder(kv)));
    }
    Ok((view, revision))
}

/// What [`rebalance`] works with.
struct Ctx<'a> {
    keys: &'a Keys,
    me: &'a String,
    count: u32,
    ttl: Duration,
    ownership: &'a Ownership,
    fences: &'a Fences,
    before_release: &'a BeforeRelease,
    caught_up: Option<CaughtUp>,
}

/// Let go of the shards another member should have; take the free ones this
/// replica should have; publish the result. Never publishes once the lease
/// is lost.
async fn rebalance(
    client: &mut etcd_client::Client,
    ctx: &Ctx<'_>,
    lease: &Lease,
    view: &mut View,
    mine: &mut BTreeMap<u32, i64>,
) {
    let me = ctx.me;
    if lease.is_lost() {
        return;
    }
    let wanted: BTreeSet<u32> = (0..ctx.count)
        .filter(|s| assign(*s, view.members.iter().chain([me])) == Some(me))
        .collect();
    let mut taken_at = 0;
    // Keys held under this lease that `mine` does not know: a take whose
    // answer was lost (adopt it if wanted) or a release that failed (retry).
    let mut stale = Vec::new();
    for (shard, h) in &view.holders {
        if h.name == *me && h.lease == lease.id() && !mine.contains_key(shard) {
            if wanted.contains(shard) {
                mine.insert(*shard, h.term);
                taken_at = taken_at.max(h.term);
            } else {
                stale.push((*shard, h.term));
            }
        }
    }
    let leaving: Vec<u32> = mine
        .keys()
        .filter(|s| !wanted.contains(s))
        .copied()
        .collect();
    let mut releasing: Vec<(u32, i64)> = leaving.iter().map(|s| (*s, mine[s])).collect();
    if !leaving.is_empty() {
        for s in &leaving {
            mine.remove(s);
        }
        // Out of the view first (no new reconciles), but keep the fences
        // until the flush: the writes of the reconciles that finish now must
        // still land.
        ctx.ownership.set(view_of(ctx.count, mine));
        ctx.ownership.settled(Some(&leaving)).await;
        run_hook(ctx.before_release).await;
        ctx.fences.set_shards(ctx.count, fences_of(ctx.keys, mine));
    }
    releasing.extend(stale);
    for (shard, term) in releasing {
        let key = ctx.keys.shard(shard);
        let released = client
            .txn(
                Txn::new()
                    .when([Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        term,
                    )])
                    .and_then([TxnOp::delete(key, None)]),
            )
            .await;
        match released {
            Ok(_) => {
                view.holders.remove(&shard);
                tracing::info!(replica = %me, shard, term, "shard handed over");
            }
            Err(e) => tracing::warn!(
                replica = %me,
                shard,
                "cannot release the shard: {} (trying again)",
                describe(&e)
            ),
        }
    }
    for shard in wanted {
        if mine.contains_key(&shard) || view.holders.contains_key(&shard) {
            continue;
        }
        let key = ctx.keys.shard(shard);
        let taken = client
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key,
                        me.clone(),
                        Some(PutOptions::new().with_lease(lease.id())),
                    )]),
            )
            .await;
        match taken {
            Ok(answer) if answer.succeeded() => {
                let term = answer.header().map_or(0, |h| h.revision());
                mine.insert(shard, term);
                view.holders.insert(
                    shard,
                    Holder {
                        name: me.clone(),
                        term,
                        lease: lease.id(),
                    },
                );
                taken_at = taken_at.max(term);
                tracing::info!(replica = %me, shard, term, "shard taken");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(replica = %me, shard, "cannot take the shard: {} (trying again)", describe(&e))
            }
        }
    }
    // The previous owner flushed before it let go; reconcile nothing of the
    // new shards before this replica's copy of the store has seen that.
    if taken_at > 0
        && let Some(caught_up) = &ctx.caught_up
    {
        let mut caught_up = caught_up.clone();
        let waited = tokio::time::timeout(ctx.ttl, caught_up.wait_for(|r| *r >= taken_at)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(replica = %me, revision = taken_at, "the store has not caught up with etcd; owning the new shards anyway");
        }
    }
    if lease.is_lost() {
        return;
    }
    ctx.fences.set_shards(ctx.count, fences_of(ctx.keys, mine));
    ctx.ownership.set(view_of(ctx.count, mine));
}

/// The ownership view of holding `mine` of `count` shards.
fn view_of(count: u32, mine: &BTreeMap<u32, i64>) -> Owned {
    if mine.is_empty() {
        Owned::Nothing
    } else {
        Owned::Shards {
            of: count,
            terms: mine.clone(),
        }
    }
}

/// The fences of holding `mine`.
fn fences_of(keys: &Keys, mine: &BTreeMap<u32, i64>) -> BTreeMap<u32, Fence> {
    mine.iter()
        .map(|(s, term)| {
            (
                *s,
                Fence {
                    key: keys.shard(*s),
                    revision: *term,
                },
            )
        })
        .collect()
}

/// A clean stop: out of the view, reconciles settled, the hook, then revoke
/// the lease (every shard and the membership go in one step).
async fn leave(
    etcd: &Etcd,
    keys: &Keys,
    lease: Lease,
    mine: &mut BTreeMap<u32, i64>,
    ownership: &Ownership,
    fences: &Fences,
    before_release: &BeforeRelease,
) {
    let _ = keys;
    ownership.set(Owned::Nothing);
    ownership.settled(None).await;
    run_hook(before_release).await;
    fences.clear();
    mine.clear();
    match tokio::time::timeout(Duration::from_secs(2), lease.revoke(etcd.client())).await {
        Ok(Ok(())) => tracing::info!("left the cluster: shards released"),
        Ok(Err(e)) => tracing::warn!(
            "cannot revoke the lease: {} (it expires on its own)",
            describe(&e)
        ),
        Err(_) => {
            tracing::warn!("etcd did not answer the revoke in 2 s (the lease expires on its own)")
        }
    }
}

/// Run the (blocking) before-release hook off the runtime thread.
pub(super) async fn run_hook(hook: &BeforeRelease) {
    let hook = hook.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || hook()).await {
        tracing::error!("the before-release hook panicked: {e}");
    }
}

/// Waits between failed attempts: 100 ms, doubling to 2 s.
pub(super) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    pub(super) async fn wait(&mut self, stop: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(self.0) => {}
            _ = stop.cancelled() => {}
        }
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_shard_has_one_member_and_the_split_is_fair() {
        let three = members(&["a", "b", "c"]);
        let mut counts = BTreeMap::<&str, u32>::new();
        for shard in 0..300 {
            *counts.entry(assign(shard, &three).unwrap()).or_default() += 1;
        }
        for (member, n) in &counts {
            assert!((70..130).contains(n), "{member} got {n} of 300: {counts:?}");
        }
    }

    #[test]
    fn a_member_joining_or_leaving_moves_only_its_own_shards() {
        let three = members(&["a", "b", "c"]);
        let four = members(&["a", "b", "c", "d"]);
        for shard in 0..256 {
            let before = assign(shard, &three).unwrap();
            let after = assign(shard, &four).unwrap();
            assert!(
                after == before || after == "d",
                "shard {shard} moved from {before} to {after}"
            );
        }
        let two = members(&["a", "c"]);
        for shard in 0..256 {
            let before = assign(shard, &three).unwrap();
            if before != "b" {
                assert_eq!(assign(shard, &two).unwrap(), before);
            }
        }
        assert_eq!(assign(0, &Vec::<String>::new()), None);
    }
}
