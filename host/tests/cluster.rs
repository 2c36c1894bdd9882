//! Leader election and shards across replicas, against a real etcd that the
//! test starts on loopback. Each "replica" here is a coordinator with its own
//! ownership view in this process; the end-to-end tests in `tests/etcd.rs` run
//! real daemons.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::TestEtcd;
use setpoint::etcd::shards::assign;
use setpoint::etcd::{Coordination, Etcd, Settings};
use setpoint::ownership::{Owned, Ownership};

const LIMIT: Duration = Duration::from_secs(20);

struct Replica {
    ownership: Ownership,
    coordination: Option<Coordination>,
    etcd: Etcd,
}

/// The lease TTL of the replicas here. Long enough that "before the TTL"
/// and "after the TTL" stay apart on a busy machine.
const TTL: Duration = Duration::from_secs(6);

fn replica(etcd: &TestEtcd, name: &str, shards: u32) -> Replica {
    let connection = Etcd::connect(Settings {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/test/".into(),
        replica: name.into(),
        ttl: TTL,
        shards,
        ..Settings::default()
    })
    .unwrap();
    let ownership = Ownership::leading(false);
    let coordination = Coordination::start(&connection, ownership.clone(), Arc::new(|| {}), None);
    Replica {
        ownership,
        coordination: Some(coordination),
        etcd: connection,
    }
}

fn shards_of(owned: &Owned) -> BTreeSet<u32> {
    match owned {
        Owned::Shards { terms, .. } => terms.keys().copied().collect(),
        Owned::All => [u32::MAX].into(),
        Owned::Nothing => BTreeSet::new(),
    }
}

async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// The shards are split among `replicas`, each held once, every one held.
fn split(replicas: &[&Replica], of: u32) -> bool {
    let mut seen = BTreeSet::new();
    for r in replicas {
        for s in shards_of(&r.ownership.get()) {
            if !seen.insert(s) {
                return false;
            }
        }
    }
    seen == (0..of).collect()
}

/// Every replica holds exactly the shards the rendezvous assignment gives it
/// among `names`: the split has converged, not just covered every shard for a
/// moment while a shard is still on its way to its owner.
fn settled(replicas: &[(&str, &Replica)], of: u32) -> bool {
    let names: Vec<String> = replicas.iter().map(|(n, _)| n.to_string()).collect();
    replicas.iter().all(|(name, r)| {
        let want: BTreeSet<u32> = (0..of)
            .filter(|s| assign(*s, &names).map(String::as_str) == Some(*name))
            .collect();
        shards_of(&r.ownership.get()) == want
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_split_the_shards_and_a_clean_stop_hands_over_without_waiting_for_the_ttl() {
    let etcd = TestEtcd::start();
    let a = replica(&etcd, "a", 16);
    let b = replica(&etcd, "b", 16);
    let mut c = replica(&etcd, "c", 16);
    // Wait for the converged split: a full cover can be transient (a holds a
    // shard that is on its way to c), and that shard would then "move" when c
    // stops, failing the check below for the wrong reason.
    until("the shards are split among three", LIMIT, || {
        split(&[&a, &b, &c], 16) && settled(&[("a", &a), ("b", &b), ("c", &c)], 16)
    })
    .await;
    for r in [&a, &b, &c] {
        assert!(
            !shards_of(&r.ownership.get()).is_empty(),
            "every replica gets a share"
        );
    }
    let before_a = shards_of(&a.ownership.get());
    let before_b = shards_of(&b.ownership.get());
    let stopped = Instant::now();
    c.coordination.take().unwrap().stop().await;
    assert_eq!(c.ownership.get(), Owned::Nothing);
    until("a and b hold everything", LIMIT, || split(&[&a, &b], 16)).await;
    let took = stopped.elapsed();
    assert!(
        took < TTL / 2,
        "the handover waited for the TTL ({took:?}): the stop did not release"
    );
    // Only c's shards moved.
    assert!(shards_of(&a.ownership.get()).is_superset(&before_a));
    assert!(shards_of(&b.ownership.get()).is_superset(&before_b));
    drop(c.etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_loses_its_shards_to_the_others_after_its_ttl() {
    let etcd = TestEtcd::start();
    let a = replica(&etcd, "a", 8);
    let mut b = replica(&etcd, "b", 8);
    until("split among two", LIMIT, || {
        split(&[&a, &b], 8) && !shards_of(&b.ownership.get()).is_empty()
    })
    .await;
    // A replica that dies without a word: nothing renews its lease.
    b.coordination.take().unwrap().abort();
    let started = Instant::now();
    until("a holds everything", LIMIT, || split(&[&a], 8)).await;
    assert!(
        started.elapsed() >= TTL / 2,
        "b's lease had to expire first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_the_next_leads_when_it_resigns() {
    let etcd = TestEtcd::start();
    let mut a = replica(&etcd, "a", 1);
    until("a leads", LIMIT, || a.ownership.get() == Owned::All).await;
    let b = replica(&etcd, "b", 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.ownership.get(), Owned::Nothing, "b waits while a leads");
    assert_eq!(
        a.coordination.as_ref().unwrap().status().owners["leader"],
        "a"
    );
    let stopped = Instant::now();
    a.coordination.take().unwrap().stop().await;
    assert_eq!(a.ownership.get(), Owned::Nothing);
    until("b leads", LIMIT, || b.ownership.get() == Owned::All).await;
    assert!(stopped.elapsed() < TTL / 2, "b did not wait for a's TTL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_etcd_owns_nothing_before_its_lease_expires_and_rejoins() {
    let mut etcd = TestEtcd::start();
    let a = replica(&etcd, "a", 4);
    until("a holds everything", LIMIT, || split(&[&a], 4)).await;
    etcd.stop();
    let cut = Instant::now();
    until("a stops owning", LIMIT, || {
        a.ownership.get() == Owned::Nothing
    })
    .await;
    let after = cut.elapsed();
    assert!(
        after < TTL,
        "dispatch must stop before the TTL ends ({after:?})"
    );
    etcd.resume().unwrap();
    until("a holds everything again", LIMIT, || split(&[&a], 4)).await;
}
