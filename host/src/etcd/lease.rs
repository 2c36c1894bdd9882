//! An etcd lease kept alive by hand, with a local deadline.
//!
//! The Rust client has no session: this module sends a keep-alive every
//! TTL/3 and keeps a local deadline of *send time + TTL − margin* (margin:
//! TTL/4) from the last answer. The lease counts as lost — and
//! [`Lease::lost`] resolves — when etcd answers `ttl == 0` (it expired), when
//! the keep-alive stream cannot be reopened before the deadline, or when the
//! deadline passes. Because the deadline is measured from the *send* time of a
//! keep-alive the server answered, it falls before the server can expire the
//! lease: a replica that cannot renew stops on its own first.
//!
//! A lost lease is never used again: its holder grants a new one (a new term).

use std::time::Duration;

use etcd_client::Client;
use futures::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant;

/// A granted lease and the task keeping it alive.
pub struct Lease {
    id: i64,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Grant a lease of `ttl` (whole seconds, at least 1) and start keeping it
    /// alive on the current runtime.
    pub async fn grant(mut client: Client, ttl: Duration) -> Result<Self, etcd_client::Error> {
        let secs = ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let granted = client.lease_grant(secs, None).await?;
        let id = granted.id();
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        let (tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(async move {
            let run = std::panic::AssertUnwindSafe(keep_alive(client, id, ttl, sent, &tx));
            if let Err(panic) = run.catch_unwind().await {
                let why = super::panic_text(panic.as_ref());
                tracing::error!(
                    lease = id,
                    "the lease keeper panicked: {why}; the lease counts as lost"
                );
            }
            tx.send_replace(true);
        });
        Ok(Self {
            id,
            ttl,
            lost,
            keeper,
        })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost (see the module doc).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    /// A receiver that turns true when the lease is lost.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stop keeping it alive and revoke it, so that every key attached to it
    /// goes at once (a clean stop hands over in milliseconds).
    pub async fn revoke(self, mut client: Client) -> Result<(), etcd_client::Error> {
        self.keeper.abort();
        client.lease_revoke(self.id).await.map(|_| ())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// The next lease of a replica's coordinator: revoke the lost one
/// (`previous`) if etcd answers, so its keys go now and not after its TTL;
/// then grant a new one, trying again with back-off. `None` once `stop` is
/// cancelled.
pub(super) async fn next(
    etcd: &super::Etcd,
    previous: &mut Option<Lease>,
    backoff: &mut super::shards::Backoff,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<Lease> {
    if let Some(old) = previous.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), old.revoke(etcd.client())).await;
    }
    loop {
        let granted = tokio::select! {
            lease = Lease::grant(etcd.client(), etcd.settings().ttl) => lease,
            _ = stop.cancelled() => return None,
        };
        match granted {
            Ok(lease) => return Some(lease),
            Err(e) => {
                let replica = &etcd.settings().replica;
                tracing::warn!(%replica, "cannot get a lease from etcd: {}", super::describe(&e));
                backoff.wait(stop).await;
                if stop.is_cancelled() {
                    return None;
                }
            }
        }
    }
}

/// The margin kept between the local deadline and the server's expiry.
fn margin(ttl: Duration) -> Duration {
    ttl / 4
}

async fn keep_alive(
    mut client: Client,
    id: i64,
    ttl: Duration,
    granted_at: Instant,
    lost: &watch::Sender<bool>,
) {
    let mut deadline = granted_at + ttl - margin(ttl);
    let every = ttl / 3;
    let mut stream = None;
    loop {
        let sent = Instant::now();
        let answer = tokio::select! {
            answer = renew(&mut client, id, &mut stream) => answer,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(lease = id, "no keep-alive answer before the local deadline: the lease is lost");
                break;
            }
        };
        match answer {
            Ok(0) => {
                tracing::warn!(lease = id, "etcd says the lease expired");
                break;
            }
            Ok(secs) => {
                deadline = sent + Duration::from_secs(secs as u64) - margin(ttl);
            }
            Err(e) => {
                tracing::debug!(
                    lease = id,
                    "keep-alive failed ({}); trying again",
                    super::describe(&e)
                );
                stream = None;
                // Try again soon, but never past the deadline.
                let retry = (Instant::now() + Duration::from_millis(100)).min(deadline);
                tokio::time::sleep_until(retry).await;
                if Instant::now() >= deadline {
                    tracing::warn!(
                        lease = id,
                        "could not renew the lease before its local deadline: the lease is lost"
                    );
                    break;
                }
                continue;
            }
        }
        tokio::time::sleep_until((sent + every).min(deadline)).await;
    }
    lost.send_replace(true);
}

type Keeper = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Send one keep-alive on `stream` (opening it if needed) and return the TTL
/// etcd answered.
async fn renew(
    client: &mut Client,
    id: i64,
    stream: &mut Option<Keeper>,
) -> Result<i64, etcd_client::Error> {
    if stream.is_none() {
        *stream = Some(client.lease_keep_alive(id).await?);
    }
    let (keeper, answers) = stream.as_mut().expect("opened above");
    keeper.keep_alive().await?;
    match answers.message().await? {
        Some(answer) => Ok(answer.ttl()),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "the keep-alive stream closed".into(),
        )),
    }
}
