//! One leader owns every key: etcd's election API under this replica's lease.
//!
//! Each replica keeps a lease alive and campaigns for `PREFIX/cluster/leader`
//! with it. The campaign returns once this replica's candidate key is the
//! oldest: it then owns everything ([`Owned::All`]), and the key's creation
//! revision is its term and the fence of every owner write.
//!
//! Guarantees:
//! - A lost lease empties the view at once (before etcd can expire the lease,
//!   see [`lease`](super::lease)); the replica campaigns again under a new one.
//! - A clean stop takes the view away, waits until no reconcile runs, runs the
//!   before-release hook, resigns and revokes the lease: the next candidate
//!   leads within milliseconds.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::ResignOptions;
use tokio_util::sync::CancellationToken;

use super::lease::Lease;
use super::shards::{Backoff, run_hook};
use super::{BeforeRelease, CaughtUp, Cluster, Etcd, Fence, Fences, describe, drop_on_loss};
use crate::ownership::{Owned, Ownership};

pub(super) async fn run(
    etcd: Etcd,
    ownership: Ownership,
    fences: Arc<Fences>,
    cluster: Arc<Cluster>,
    before_release: BeforeRelease,
    caught_up: Option<CaughtUp>,
    stop: CancellationToken,
) {
    let name = etcd.key("cluster/leader");
    let settings = etcd.settings().clone();
    let replica = settings.replica.clone();
    let mut backoff = Backoff::default();
    let mut previous: Option<Lease> = None;
    'term: while !stop.is_cancelled() {
        let term = super::next_term(&etcd, &mut previous, &mut backoff, &stop);
        let Some(lease) = term.after(&ownership, &fences, &before_release).await else {
            break;
        };
        let _guard = drop_on_loss(&lease, &ownership, &fences);
        // Campaigns wait without a timeout: a cancelled campaign is resigned
        // by etcd, and a retry could race that resignation.
        let mut client = etcd.waiting_client();
        let leader = loop {
            tokio::select! {
                answer = client.campaign(name.clone(), replica.clone(), lease.id()) => match answer {
                    Ok(answer) => match answer.leader() {
                        Some(key) => break key.clone(),
                        None => continue,
                    },
                    // etcd unreachable, or another failure: campaign again.
                    Err(e) => {
                        tracing::debug!(%replica, "campaign: {}", describe(&e));
                        if let Ok(answer) = etcd.client().leader(name.clone()).await {
                            let leader = answer.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                            cluster.set_leader(leader);
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = stop.cancelled() => {}
                        }
                        if lease.is_lost() {
                            previous = Some(lease);
                            continue 'term;
                        }
                    }
                },
                _ = lease.lost() => {
                    previous = Some(lease);
                    continue 'term;
                }
                _ = stop.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), lease.revoke(etcd.client())).await;
                    return;
                }
            }
        };
        backoff = Backoff::default();
        let term = leader.rev();
        // The previous leader flushed before it resigned: see that first.
        if let Some(caught_up) = &caught_up {
            let mut caught_up = caught_up.clone();
            let waited =
                tokio::time::timeout(settings.ttl, caught_up.wait_for(|r| *r >= term)).await;
            if !matches!(waited, Ok(Ok(_))) {
                tracing::warn!(%replica, "the store has not caught up with etcd; leading anyway");
            }
        }
        if lease.is_lost() {
            previous = Some(lease);
            continue;
        }
        fences.set_leader(Some(Fence {
            key: String::from_utf8_lossy(leader.key()).into_owned(),
            revision: term,
        }));
        ownership.set(Owned::All);
        cluster.set_leader(Some(replica.clone()));
        tracing::info!(%replica, term, "leading");
        tokio::select! {
            _ = lease.lost() => {
                ownership.revoke();
                fences.clear();
                cluster.set_leader(None);
                tracing::warn!(%replica, "lease lost: no longer leading");
                previous = Some(lease);
            }
            _ = stop.cancelled() => {
                ownership.set(Owned::Nothing);
                ownership.settled(None).await;
                run_hook(&before_release).await;
                fences.clear();
                let resign = client.resign(Some(ResignOptions::new().with_leader(leader)));
                let _ = tokio::time::timeout(Duration::from_secs(2), resign).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), lease.revoke(etcd.client())).await;
                tracing::info!(%replica, "resigned");
                return;
            }
        }
    }
    ownership.set(Owned::Nothing);
    fences.clear();
}
