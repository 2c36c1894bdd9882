//! Leader gating: only the process that leads dispatches work.
//!
//! A [`LeaderElector`] publishes leadership as a `watch` channel of `bool`.
//! Controllers read it before every dispatch and stop taking keys the moment it
//! turns false (work already in flight finishes); when it turns true again they
//! resume from the store. [`AlwaysLeader`] is the single-process default;
//! [`ManualLeader`] is driven by hand (tests, or an operator). The etcd lease
//! elector implements the same trait.

use tokio::sync::watch;

/// Tells whether this process leads, now and as it changes.
pub trait LeaderElector: Send + Sync {
    /// A receiver of the current leadership and its changes.
    fn subscribe(&self) -> watch::Receiver<bool>;
}

/// The single-process default: always the leader.
pub struct AlwaysLeader {
    tx: watch::Sender<bool>,
}

impl Default for AlwaysLeader {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(true),
        }
    }
}

impl LeaderElector for AlwaysLeader {
    fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// Leadership set by hand.
pub struct ManualLeader {
    tx: watch::Sender<bool>,
}

impl ManualLeader {
    /// Starts leading if `leading`.
    pub fn new(leading: bool) -> Self {
        Self {
            tx: watch::Sender::new(leading),
        }
    }

    /// Gain (`true`) or lose (`false`) leadership.
    pub fn set(&self, leading: bool) {
        self.tx.send_replace(leading);
    }

    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }
}

impl LeaderElector for ManualLeader {
    fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// Wait until `leader` says this process leads. Returns false if the elector is
/// gone (the process is shutting down).
pub async fn until_leading(leader: &mut watch::Receiver<bool>) -> bool {
    leader.wait_for(|leading| *leading).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_leader_publishes_changes_to_subscribers() {
        let elector = ManualLeader::new(false);
        let mut rx = elector.subscribe();
        assert!(!*rx.borrow());
        let waiter = tokio::spawn(async move { until_leading(&mut rx).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        elector.set(true);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn always_leader_leads() {
        assert!(*AlwaysLeader::default().subscribe().borrow());
    }
}
