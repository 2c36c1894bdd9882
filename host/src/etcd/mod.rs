//! etcd: the connection several replicas share, and the coordination built on
//! it: a lease kept alive with a local deadline ([`lease`]), leader election
//! through etcd's election API ([`election`]), and shards held under leases
//! ([`shards`]). Both publish what this replica owns as an
//! [`Ownership`](crate::ownership::Ownership) view and answer the fencing
//! question ([`Fencing`]) the etcd store backend asks for every write it
//! makes as an owner.
//!
//! Guarantees:
//! - The client runs on a runtime thread of its own ([`Etcd::run`] blocks the
//!   calling thread until the answer comes, never a runtime's), so the store
//!   can stay synchronous.
//! - etcd's refusals come back as [`describe`]d errors that say what to do.

pub mod election;
pub mod lease;
pub mod shards;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::object::ObjectKey;
use crate::ownership::Ownership;

/// How to reach etcd, and the limits to keep to.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `http://host:port` (or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// Every key this cluster of replicas writes starts with it (e.g.
    /// `/setpoint/`).
    pub prefix: String,
    /// This replica's name: unique among the replicas sharing `prefix`.
    pub replica: String,
    /// The lease TTL: how long a dead replica keeps what it owned.
    pub ttl: Duration,
    /// Shards of the key space; 1 means one leader owns everything.
    pub shards: u32,
    /// etcd's `--max-txn-ops` (128 by default).
    pub max_txn_ops: usize,
    /// etcd's `--max-request-bytes` (1.5 MiB by default).
    pub max_request_bytes: usize,
    pub tls: Option<Tls>,
    pub user: Option<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/setpoint/".into(),
            replica: String::new(),
            ttl: Duration::from_secs(10),
            shards: 1,
            max_txn_ops: 128,
            max_request_bytes: 1536 * 1024,
            tls: None,
            user: None,
        }
    }
}

/// TLS to etcd: the CA that signed its certificate, and a client certificate
/// when etcd asks for one.
#[derive(Clone, Debug, PartialEq)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A connection to etcd with the runtime thread it runs on. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    /// The same endpoints without a request timeout, for calls that wait by
    /// design (an election campaign: cancelling one makes etcd resign it).
    waiting: Client,
    runtime: tokio::runtime::Handle,
    settings: Arc<Settings>,
    /// Ends the runtime thread when the last clone goes.
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl Etcd {
    /// Connect (waiting at most 5 s for a first answer).
    pub fn connect(settings: Settings) -> anyhow::Result<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("setpoint-etcd".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the etcd runtime thread did not start"))??;
        let options = connect_options(&settings)?;
        let waiting = connect_options(&settings)?.with_timeout(Duration::from_secs(24 * 3600));
        let endpoints = settings.endpoints.clone();
        let (client, waiting) = block(&runtime, async move {
            let mut client = Client::connect(&endpoints, Some(options)).await?;
            // Connecting is lazy: ask something, so a wrong address fails here.
            client.status().await?;
            let waiting = Client::connect(&endpoints, Some(waiting)).await?;
            Ok::<_, etcd_client::Error>((client, waiting))
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach etcd at {}: {}",
                settings.endpoints.join(", "),
                describe(&e)
            )
        })?;
        Ok(Self {
            client,
            waiting,
            runtime,
            settings: Arc::new(settings),
            _stop: Arc::new(stop),
        })
    }

    /// A client handle (cheap: clones share one connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client whose calls may wait as long as they need (no timeout).
    pub fn waiting_client(&self) -> Client {
        self.waiting.clone()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The runtime the client and this replica's coordination tasks run on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Run `work` on the etcd runtime and block this thread for its answer.
    /// Safe to call from inside another runtime's task: only this thread
    /// waits (as for a disk write).
    pub fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        block(&self.runtime, work)
    }

    /// `prefix` + `rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.settings.prefix)
    }
}

fn block<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv()
        .expect("the etcd runtime thread ended while a request was in flight")
}

fn connect_options(settings: &Settings) -> anyhow::Result<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some((user, password)) = &settings.user {
        options = options.with_user(user, password);
    }
    if let Some(tls) = &settings.tls {
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read the etcd TLS {what} {}: {e}", path.display())
            })
        };
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            t = t.ca_certificate(Certificate::from_pem(read("CA", ca)?));
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                t = t.identity(Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => anyhow::bail!("etcd TLS needs both `cert` and `key`, or neither"),
        }
        options = options.with_tls(t);
    }
    Ok(options)
}

/// What etcd's refusal means, and what to do about it.
pub fn describe(e: &etcd_client::Error) -> String {
    let text = e.to_string();
    if text.contains("database space exceeded") {
        return "etcd is out of space (its --quota-backend-bytes): compact and defragment it \
                (`etcdctl compact`, `etcdctl defrag`, then `etcdctl alarm disarm`), or raise \
                the quota"
            .into();
    }
    if text.contains("request is too large") {
        return "the request is larger than etcd accepts (--max-request-bytes, 1.5 MiB by \
                default): write fewer or smaller objects at once"
            .into();
    }
    if text.contains("too many operations in txn") {
        return "the transaction has more operations than etcd accepts (--max-txn-ops, 128 by \
                default): write fewer objects at once, or raise it and [store] max-txn-ops"
            .into();
    }
    if text.contains("authentication failed") || text.contains("user name is empty") {
        return format!("{text}: check [store] user and password");
    }
    text
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The compare a write made as an owner carries: etcd `key` must still have
/// been created at `revision` (the term this replica holds it under).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    pub key: String,
    pub revision: i64,
}

/// Which fence guards a write, or `None` when this replica does not own it
/// (then the write must not land).
pub trait Fencing: Send + Sync {
    /// For a write about one object (its status, its removal).
    fn for_key(&self, key: &ObjectKey) -> Option<Fence>;
    /// For a write on behalf of this replica as a whole (plugin key-value
    /// data): its membership while it is alive.
    fn for_replica(&self) -> Option<Fence>;
}

/// The etcd revision up to which this replica's store has taken in every
/// change (see [`EtcdBackend`](crate::store::EtcdBackend)): a coordinator
/// waits for it to pass the revision at which it took a shard (or the lead)
/// before reconciling any of its keys, so it sees the previous owner's last
/// writes first.
pub type CaughtUp = tokio::sync::watch::Receiver<i64>;

/// Runs before a replica lets go of what it owned, once its reconciles have
/// settled: the daemon flushes the store's written-behind changes here, so
/// the next owner reads them.
pub type BeforeRelease = Arc<dyn Fn() + Send + Sync>;

/// The fences of what this replica owns now, kept by its coordinator.
#[derive(Default)]
pub struct Fences {
    state: std::sync::Mutex<FenceState>,
}

#[derive(Default)]
struct FenceState {
    replica: Option<Fence>,
    leader: Option<Fence>,
    of: u32,
    shards: std::collections::BTreeMap<u32, Fence>,
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_replica(&self, fence: Option<Fence>) {
        self.lock().replica = fence;
    }

    fn set_leader(&self, fence: Option<Fence>) {
        self.lock().leader = fence;
    }

    fn set_shards(&self, of: u32, shards: std::collections::BTreeMap<u32, Fence>) {
        let mut state = self.lock();
        state.of = of;
        state.shards = shards;
    }

    /// Nothing is owned any more: every owner write is refused.
    fn clear(&self) {
        *self.lock() = FenceState::default();
    }
}

impl Fencing for Fences {
    fn for_key(&self, key: &ObjectKey) -> Option<Fence> {
        let state = self.lock();
        if let Some(leader) = &state.leader {
            return Some(leader.clone());
        }
        state
            .shards
            .get(&crate::ownership::shard_of(key, state.of))
            .cloned()
    }

    fn for_replica(&self) -> Option<Fence> {
        let state = self.lock();
        state.leader.clone().or_else(|| state.replica.clone())
    }
}

/// Who is in the cluster and who holds what, as this replica last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterStatus {
    /// This replica's name.
    pub replica: String,
    /// `leader` (one lease owns everything) or `shards`.
    pub mode: String,
    pub members: Vec<String>,
    /// Shard (or `leader`) → the replica holding it.
    pub owners: std::collections::BTreeMap<String, String>,
}

/// The shared, updated [`ClusterStatus`].
#[derive(Default)]
pub struct Cluster {
    status: std::sync::Mutex<ClusterStatus>,
}

impl Cluster {
    fn set(
        &self,
        members: &std::collections::BTreeSet<String>,
        holders: &std::collections::BTreeMap<u32, shards::Holder>,
    ) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.members = members.iter().cloned().collect();
        status.owners = holders
            .iter()
            .map(|(s, holder)| (s.to_string(), holder.name.clone()))
            .collect();
    }

    fn set_leader(&self, leader: Option<String>) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.owners.clear();
        if let Some(leader) = leader {
            status.members = vec![leader.clone()];
            status.owners.insert("leader".into(), leader);
        }
    }

    pub fn status(&self) -> ClusterStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Empty `ownership` and `fences` the moment `lease` is lost, whatever the
/// coordinator is busy with. Stops when dropped.
fn drop_on_loss(lease: &lease::Lease, ownership: &Ownership, fences: &Arc<Fences>) -> AbortOnDrop {
    let lost = lease.lost_signal();
    let (ownership, fences) = (ownership.clone(), fences.clone());
    AbortOnDrop(tokio::spawn(async move {
        let mut lost = lost;
        if lost.wait_for(|l| *l).await.is_ok() {
            ownership.revoke();
            fences.clear();
        }
    }))
}

/// The start of a coordinator's next term (see [`NextTerm::after`]).
fn next_term<'a>(
    etcd: &'a Etcd,
    previous: &'a mut Option<lease::Lease>,
    backoff: &'a mut shards::Backoff,
    stop: &'a tokio_util::sync::CancellationToken,
) -> NextTerm<'a> {
    NextTerm {
        etcd,
        previous,
        backoff,
        stop,
    }
}

/// What a coordinator starts its next term from: the previous term's lease
/// (if there was one), its back-off, and its stop signal.
struct NextTerm<'a> {
    etcd: &'a Etcd,
    previous: &'a mut Option<lease::Lease>,
    backoff: &'a mut shards::Backoff,
    stop: &'a tokio_util::sync::CancellationToken,
}

impl NextTerm<'_> {
    /// End the previous term, if there was one ([`end_term`]), then take a
    /// new lease ([`lease::next`], which revokes the lost one if etcd
    /// answers). `None` once the coordinator is told to stop.
    async fn after(
        self,
        ownership: &Ownership,
        fences: &Fences,
        before_release: &BeforeRelease,
    ) -> Option<lease::Lease> {
        if self.previous.is_some() {
            end_term(ownership, fences, before_release).await;
        }
        lease::next(self.etcd, self.previous, self.backoff, self.stop).await
    }
}

/// After a lost lease, before this replica joins again under a new term:
/// own nothing (reconciles in flight are cancelled), wait until they are gone
/// and flush. With no fence left, any late write is refused (and counted)
/// instead of landing under the next term.
async fn end_term(ownership: &Ownership, fences: &Fences, before_release: &BeforeRelease) {
    ownership.revoke();
    fences.clear();
    ownership.settled(None).await;
    shards::run_hook(before_release).await;
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This replica's part in a cluster of replicas on etcd: leader election
/// (`shards == 1`) or shards, running on the etcd runtime until stopped.
pub struct Coordination {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    fences: Arc<Fences>,
    cluster: Arc<Cluster>,
}

impl Coordination {
    /// Start: publish what this replica owns to `ownership` as it changes.
    /// With `caught_up` (the store's progress), newly owned keys wait until
    /// the store has seen the previous owner's last writes.
    pub fn start(
        etcd: &Etcd,
        ownership: Ownership,
        before_release: BeforeRelease,
        caught_up: Option<CaughtUp>,
    ) -> Self {
        Self::start_with(etcd, ownership, before_release, caught_up, Arc::default())
    }

    /// [`start`](Self::start), keeping `fences` (handed to the store before).
    pub fn start_with(
        etcd: &Etcd,
        ownership: Ownership,
        before_release: BeforeRelease,
        caught_up: Option<CaughtUp>,
        fences: Arc<Fences>,
    ) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let cluster = Arc::new(Cluster::default());
        {
            let mut status = cluster.status.lock().unwrap_or_else(|e| e.into_inner());
            status.replica = etcd.settings().replica.clone();
            status.mode = if etcd.settings().shards <= 1 {
                "leader"
            } else {
                "shards"
            }
            .into();
        }
        ownership.set(crate::ownership::Owned::Nothing);
        let work = {
            let (etcd, fences, cluster, stop) =
                (etcd.clone(), fences.clone(), cluster.clone(), stop.clone());
            async move {
                let on_panic = (ownership.clone(), fences.clone());
                let args = (
                    etcd,
                    ownership,
                    fences,
                    cluster,
                    before_release,
                    caught_up,
                    stop,
                );
                let run = async {
                    let (etcd, ownership, fences, cluster, hook, caught_up, stop) = args;
                    if etcd.settings().shards <= 1 {
                        let run =
                            election::run(etcd, ownership, fences, cluster, hook, caught_up, stop);
                        run.await
                    } else {
                        let run =
                            shards::run(etcd, ownership, fences, cluster, hook, caught_up, stop);
                        run.await
                    }
                };
                use futures::FutureExt;
                if let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await {
                    tracing::error!(
                        "the etcd coordinator panicked: {}; this replica owns nothing from now on",
                        panic_text(panic.as_ref())
                    );
                    on_panic.0.revoke();
                    on_panic.1.clear();
                }
            }
        };
        let task = etcd.runtime().spawn(work);
        Self {
            stop,
            task,
            fences,
            cluster,
        }
    }

    /// What the store's etcd backend asks before each owner write.
    pub fn fencing(&self) -> Arc<dyn Fencing> {
        self.fences.clone()
    }

    pub fn status(&self) -> ClusterStatus {
        self.cluster.status()
    }

    /// The cluster view this coordinator keeps up to date.
    pub fn cluster(&self) -> Arc<Cluster> {
        self.cluster.clone()
    }

    /// Stop at once without handing anything over, as a crash would: the
    /// lease is no longer renewed, and the other replicas take over once it
    /// expires (the TTL).
    pub fn abort(self) {
        self.task.abort();
    }

    /// A clean stop: hand everything over (see [`shards`] and [`election`]).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
