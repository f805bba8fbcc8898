//! The broker: accepts redirected connections on loopback, finds the kernel's record of each,
//! picks the policy and hands the connection to the policy's protocol connector.
mod accept;
pub mod admit;
mod bypass;
mod conn;
pub mod direct;

pub mod per_workload;
pub mod resume;
pub mod workers;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicU64},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::origin::Origin;

use crate::{
    connector::{Connectors, Env},
    ebpf::ConnTable,
    metrics::Metrics,
    policy_set::PolicySet,
    secrets::{Resolver, Secrets},
};

/// Limits that protect the agent and everything else it serves.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections handled at once; further accepts wait.
    pub max_connections: usize,
    /// Pipes the relay splices through at once (see `relay::pipes`).
    pub max_pipes: usize,
    /// How long reaching a target may take.
    pub connect_timeout: Duration,
    /// Connections one workload (cgroup) may have brokered at once; more are refused.
    pub max_per_workload: usize,
    /// How long a connector's pre-relay phase (target connect, protocol startup and
    /// authentication) may take before the connection is failed.
    pub handshake_timeout: Duration,
    /// Network namespaces the broker listens in at once (its own included).
    pub max_namespaces: usize,
    /// Direct-mode startups running at once (each on a thread of its own).
    pub max_direct_startups: usize,
}

/// Descriptors the agent keeps for itself beside its connections: listeners' neighbours, the
/// admin port, secret stores, the audit log, kernel maps and programs, runtimes.
pub const DESCRIPTOR_RESERVE: u64 = 256;

impl Limits {
    /// The most descriptors these limits can make the agent hold: two sockets per connection,
    /// two per pipe, a namespace descriptor and two listeners per namespace, and the reserve.
    pub fn descriptors_needed(&self) -> u64 {
        2 * self.max_connections as u64
            + 2 * self.max_pipes as u64
            + 3 * self.max_namespaces as u64
            + DESCRIPTOR_RESERVE
    }

    /// The most connections that fit `limit` descriptors with the other limits as they are
    /// (pipes a quarter of the connections, as by default).
    pub fn connections_fitting(&self, limit: u64) -> usize {
        let rest = 3 * self.max_namespaces as u64 + DESCRIPTOR_RESERVE;
        // 2 per connection + 2 per pipe at one pipe per four connections = 2.5 each.
        (limit.saturating_sub(rest) * 2 / 5) as usize
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_pipes: 2_500,
            connect_timeout: Duration::from_secs(10),
            max_per_workload: 1_000,
            handshake_timeout: Duration::from_secs(30),
            max_namespaces: 4_096,
            max_direct_startups: 128,
        }
    }
}

/// The broker's state, shared by every connection task. What connectors may use of it is in
/// `env` (they get that, not this).
pub struct Shared {
    pub conns: ConnTable,
    pub policies: RwLock<Arc<PolicySet>>,
    pub metrics: Arc<Metrics>,
    /// The agent services connectors use: secrets, the outbound mark, timeouts, the node CA,
    /// the fast path.
    pub env: Env,
    /// One connector per built protocol, each with its own caches.
    pub connectors: Connectors,
    pub limits: Limits,
    /// Open connections per workload, bounded by `limits.max_per_workload`.
    pub per_workload: per_workload::PerWorkload,
    /// Reachability of the secret stores, probed periodically (see `secrets::health`).
    pub store_health: crate::secrets::health::StoreHealth,
    pub audit: crate::audit::Audit,
    /// The cgroup v2 mount point (to turn cgroup ids into paths) and where container
    /// runtimes' cgroups are trusted.
    pub cgroups: crate::identity::Cgroups,
    /// Direct mode's maps and lobby, if available.
    pub direct: Option<Arc<direct::Direct>>,
    /// Per-reason refusal counts for the log's and the audit trail's summaries.
    pub refusals: crate::refusals::Refusals,
    /// `--fail-mode`: with `open`, a connection of a pod whose metadata never arrived goes to
    /// its destination without latch (see `admit`).
    pub fail_mode: crate::runtime::FailMode,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        conns: ConnTable,
        policies: PolicySet,
        metrics: Arc<Metrics>,
        secrets: Resolver,
        mark: u32,
        limits: Limits,
    ) -> Self {
        let mut env = Env::new(
            Secrets::new(secrets, metrics.clone()),
            limits.connect_timeout,
            limits.handshake_timeout,
        );
        env.mark = mark;
        Self {
            conns,
            policies: RwLock::new(Arc::new(policies)),
            env,
            connectors: Connectors::default(),
            metrics,
            per_workload: per_workload::PerWorkload::new(limits.max_per_workload),
            store_health: Default::default(),
            limits,
            audit: crate::audit::Audit::disabled(),
            cgroups: crate::identity::Cgroups::new(
                crate::cgroup::v2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into()),
                &[],
            ),
            direct: None,
            refusals: Default::default(),
            fail_mode: Default::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Counts a refusal (metrics, and the log's and audit trail's per-second summaries).
    /// `true`: the first of a storm for this reason, which the caller logs in full; later
    /// ones go into a summary line.
    pub fn refuse(&self, reason: crate::metrics::RefusedReason) -> bool {
        self.metrics.refuse(reason);
        self.refusals.note(reason, &self.audit)
    }

    /// A fresh connection id (audit records, spans).
    pub fn next_conn_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts connection ids on from `next` (after an upgrade: past the old agent's, so the
    /// relays it hands over keep ids no connection of this agent has).
    pub fn count_ids_from(&self, next: u64) {
        self.next_id
            .fetch_max(next, std::sync::atomic::Ordering::Relaxed);
    }

    /// The next connection id, unused (for the next agent).
    pub fn peek_next_conn_id(&self) -> u64 {
        self.next_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The policy set in force now.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the policy set for connections accepted from now on.
    pub fn set_policies(&self, set: PolicySet) {
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }
}

/// Binds a listener; IPv6 sockets are v6-only so the IPv4 listener may share the port number.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let s = TcpSocket::new_v6()?;
        socket2::SockRef::from(&s).set_only_v6(true)?;
        s
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Room for a burst of connects from a whole node; the kernel caps it at
    // net.core.somaxconn. A full accept queue drops handshakes, which applications see as
    // connect stalls of a second or more (SYN retransmits).
    socket.listen(LISTEN_BACKLOG)
}

/// Accept queue length asked for on the broker's listeners.
pub const LISTEN_BACKLOG: u32 = 4096;

/// What every accept loop shares.
#[derive(Clone)]
pub struct Serving {
    pub shared: Arc<Shared>,
    /// Tasks still running when it fires are dropped (their sockets closed).
    pub abort: CancellationToken,
    /// Every connection runs as a task on it.
    pub tracker: TaskTracker,
    /// `--max-connections`.
    pub slots: Arc<Semaphore>,
    pub workers: Arc<workers::Workers>,
    /// The accept loops themselves, so that stopping can wait until none accepts any more.
    pub accepting: TaskTracker,
}

impl Serving {
    /// Accepts on `listener`, in network namespace `netns`, on the accepting connection
    /// threads (an accept loop each, see [`workers`]): a connection is served by the thread
    /// that accepted it unless its opener is paired with another, so most cost no hand-over
    /// between threads. The loops end when the namespace's stop token fires.
    pub fn listen(&self, netns: &crate::netns::Handle, listener: &Arc<std::net::TcpListener>) {
        for here in 0..self.workers.acceptors() {
            let accept = serve(listener.clone(), netns.clone(), self.clone(), here);
            self.workers
                .handle(here)
                .spawn(self.accepting.track_future(accept));
        }
    }
}

/// One accept loop, on connection thread `here`: see [`Serving::listen`].
async fn serve(
    listener: Arc<std::net::TcpListener>,
    netns: crate::netns::Handle,
    serving: Serving,
    here: usize,
) {
    let Serving {
        shared,
        abort,
        tracker,
        slots,
        workers,
        accepting: _,
    } = serving;
    let stop_accepting = netns.stop.clone();
    let listener = match accept::Acceptor::new(listener) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, "cannot accept on the broker's listener");
            return;
        }
    };
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer, local) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(err) => {
                // EMFILE, ENOBUFS and friends: wait and try again rather than give up the
                // listener (the pending connection stays in the backlog).
                crate::warn_throttled!(%err, ?backoff, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // Over capacity: reset at once rather than leave connections waiting in the backlog (a
        // flood from one workload would otherwise stall every other workload's connects).
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if shared.refuse(crate::metrics::RefusedReason::capacity) {
                tracing::warn!(%peer, "refused: the broker is at --max-connections");
            }
            // Its record goes too: the kernel removes it when the application's socket meets
            // the reset, but not if that socket had already closed (`CONN_APP_CLOSED`).
            let _ = shared.conns.take(netns.cookie, peer, local);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let abort = abort.clone();
        let netns = netns.clone();
        // The kernel's record names the opener, which picks the connection thread.
        let meta = shared.conns.take(netns.cookie, peer, local);
        let worker = match &meta {
            Ok(Some(m)) => workers.for_opener(m.pid, m.tid, here),
            _ => here,
        };
        let task = tracker.track_future(async move {
            let _permit = permit;
            let Ok(stream) = TcpStream::from_std(stream) else {
                return;
            };
            tokio::select! {
                _ = conn::handle(stream, peer, local, meta, netns, &shared) => {}
                _ = abort.cancelled() => {}
            }
        });
        if worker == here {
            tokio::spawn(task);
        } else {
            workers.handle(worker).spawn(task);
        }
    }
}
