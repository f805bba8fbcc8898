//! The broker: accepts redirected connections on loopback, finds the kernel's record of each,
//! picks the policy and hands the connection to the policy's protocol connector.
pub mod admit;
mod conn;
pub mod direct;
mod origin;
pub mod per_workload;
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

pub use origin::Origin;

use crate::{ebpf::ConnTable, metrics::Metrics, policy_set::PolicySet, secrets::Resolver};

/// Limits that protect the agent and everything else it serves.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections handled at once; further accepts wait.
    pub max_connections: usize,
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

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(10),
            max_per_workload: 1_000,
            handshake_timeout: Duration::from_secs(30),
            max_namespaces: 4_096,
            max_direct_startups: 128,
        }
    }
}

/// What every connection task needs.
pub struct Shared {
    pub conns: ConnTable,
    pub policies: RwLock<Arc<PolicySet>>,
    pub metrics: Arc<Metrics>,
    /// Resolves the credentials a policy names, at connection time.
    pub secrets: Secrets,
    /// SO_MARK of the broker's outbound sockets (skipped by the connect hooks).
    pub mark: u32,
    pub limits: Limits,
    /// Open connections per workload, bounded by `limits.max_per_workload`.
    pub per_workload: per_workload::PerWorkload,
    /// Reachability of the secret stores, probed periodically (see `secrets::health`).
    pub store_health: crate::secrets::health::StoreHealth,
    /// Open relayed PostgreSQL sessions by (namespace, destination, server's key), for cancels.
    pub pg_cancel: crate::connector::postgres::CancelMap,
    /// PostgreSQL per-connection cost savers: SCRAM keys, TLS client configurations (with
    /// their session caches), the node-local CA for TLS toward applications.
    pub pg_scram_keys: Arc<latch_pg::scram_cache::ScramKeyCache>,
    pub pg_tls: crate::connector::postgres::tls::ClientConfigs,
    pub app_ca: crate::ca::NodeCa,
    pub audit: crate::audit::Audit,
    /// The cgroup v2 mount point (to turn cgroup ids into paths) and where container
    /// runtimes' cgroups are trusted.
    pub cgroups: crate::identity::Cgroups,
    /// The kernel side of the application-to-target fast path, if available.
    pub fast_path: Option<crate::ebpf::FastPath>,
    /// Direct mode's maps and lobby, if available.
    pub direct: Option<Arc<direct::Direct>>,
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
        Self {
            conns,
            policies: RwLock::new(Arc::new(policies)),
            secrets: Secrets(RwLock::new(secrets), metrics.clone(), Default::default()),
            metrics,
            mark,
            per_workload: per_workload::PerWorkload::new(limits.max_per_workload),
            store_health: Default::default(),
            limits,
            pg_cancel: Default::default(),
            pg_scram_keys: Default::default(),
            pg_tls: Default::default(),
            app_ca: Default::default(),
            audit: crate::audit::Audit::disabled(),
            cgroups: crate::identity::Cgroups::new(
                crate::cgroup::v2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into()),
                &[],
            ),
            fast_path: None,
            direct: None,
            next_id: AtomicU64::new(1),
        }
    }

    /// How a relay may hand the application's direction of this connection to the kernel.
    /// `taken` (bytes already read from the application) is asked only when it may.
    pub fn handover(
        &self,
        origin: &Origin,
        taken: impl FnOnce() -> Option<u64>,
    ) -> Option<crate::relay::Handover<'_>> {
        let fast = self.fast_path.as_ref().filter(|_| origin.fast_path)?;
        Some(crate::relay::Handover {
            fast,
            cookie: origin.socket_cookie,
            taken: taken()?,
        })
    }

    /// A fresh connection id (audit records, spans).
    pub fn next_conn_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
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

/// The secret resolver in force; replaced when a reload changes the secret stores.
pub struct Secrets(
    RwLock<Resolver>,
    Arc<Metrics>,
    /// When each policy's credentials were last refreshed (see [`Secrets::refresh`]).
    std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
);

/// At most one refresh of a policy's credentials per this long: an application can make a
/// target reject credentials at will, and with dynamic credentials a refresh mints a lease.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl Secrets {
    /// The resolver in force now (cheap: it is reference counted).
    pub fn current(&self) -> Resolver {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `resolver` for connections from now on; returns the one it replaces.
    pub fn replace(&self, resolver: Resolver) -> Resolver {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            resolver,
        )
    }

    /// See [`Resolver::credentials`].
    pub async fn credentials(
        &self,
        policy: &crate::config::Policy,
    ) -> Result<Arc<crate::secrets::Credentials>, crate::secrets::SecretError> {
        self.credentials_for(policy, None).await
    }

    /// See [`Resolver::credentials_for`].
    pub async fn credentials_for(
        &self,
        policy: &crate::config::Policy,
        role: Option<&crate::config::Role>,
    ) -> Result<Arc<crate::secrets::Credentials>, crate::secrets::SecretError> {
        let started = std::time::Instant::now();
        let result = self.current().credentials_for(policy, role).await;
        self.1
            .secret_resolution(policy, started.elapsed(), result.as_ref().err());
        result
    }

    /// See [`Resolver::refresh`]; at most once per [`MIN_REFRESH_INTERVAL`] per policy
    /// (otherwise the credentials in force, which the caller sees are the same).
    pub async fn refresh(
        &self,
        policy: &crate::config::Policy,
    ) -> Result<Arc<crate::secrets::Credentials>, crate::secrets::SecretError> {
        self.refresh_for(policy, None).await
    }

    /// See [`Resolver::refresh_for`]; rate-limited per policy and role like [`Self::refresh`].
    pub async fn refresh_for(
        &self,
        policy: &crate::config::Policy,
        role: Option<&crate::config::Role>,
    ) -> Result<Arc<crate::secrets::Credentials>, crate::secrets::SecretError> {
        let started = std::time::Instant::now();
        let key = match role {
            Some(r) => format!("{}\0{}", policy.name, r.user),
            None => policy.name.clone(),
        };
        let recent = {
            let mut last = self.2.lock().unwrap_or_else(|e| e.into_inner());
            match last.get(&key) {
                Some(at) if started.duration_since(*at) < MIN_REFRESH_INTERVAL => true,
                _ => {
                    last.insert(key, started);
                    false
                }
            }
        };
        if recent {
            tracing::debug!(policy = %policy.name, "credentials refreshed less than a second ago; not again");
            return self.credentials_for(policy, role).await;
        }
        self.1
            .refreshes
            .get_or_create(&crate::metrics::PolicyLabels {
                policy: policy.name.clone(),
            })
            .inc();
        let result = self.current().refresh_for(policy, role).await;
        self.1
            .secret_resolution(policy, started.elapsed(), result.as_ref().err());
        result
    }

    /// See [`Resolver::shutdown`].
    pub async fn shutdown(&self) {
        self.current().shutdown().await
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

/// Accepts on `listener`, in network namespace `netns`, until the namespace's stop token fires
/// (it is a child of the broker's). Each connection runs as a task on `tracker`; tasks still
/// running when `abort` fires are dropped (their sockets closed).
pub async fn serve(
    listener: TcpListener,
    netns: crate::netns::Handle,
    shared: Arc<Shared>,
    abort: CancellationToken,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
    workers: Arc<workers::Workers>,
) {
    let stop_accepting = netns.stop.clone();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
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
            shared
                .metrics
                .refuse(crate::metrics::RefusedReason::capacity);
            tracing::debug!(%peer, "refused: the broker is at --max-connections");
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let abort = abort.clone();
        let netns = netns.clone();
        // Move the socket to its connection thread's reactor.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, "accepted socket could not be moved");
                continue;
            }
        };
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(err) => {
                tracing::debug!(%err, %peer, "accepted socket has no local address");
                continue;
            }
        };
        // The kernel's record names the opener, which picks the connection thread.
        let meta = shared.conns.take(netns.cookie, peer, local);
        let worker = match &meta {
            Ok(Some(m)) => workers.for_opener(m.pid, m.tid),
            _ => workers.next(),
        };
        worker.spawn(tracker.track_future(async move {
            let _permit = permit;
            let Ok(stream) = TcpStream::from_std(stream) else {
                return;
            };
            tokio::select! {
                _ = conn::handle(stream, peer, local, meta, netns, &shared) => {}
                _ = abort.cancelled() => {}
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_policys_credentials_are_refreshed_at_most_once_a_second() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("latch-refresh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets.yaml");
        std::fs::write(&file, "db: {username: u, password: p}\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: local}}\n\
             spec: {{file: {{path: {}}}}}\n---\n\
             apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: db}}\nspec:\n  \
             destination: {{address: 10.0.0.1, port: 5432}}\n  protocol: postgres\n  \
             workloads: [{{uid: 1}}]\n  credentials:\n    store: local\n    \
             password: {{path: db, field: password}}\n",
            file.display()
        );
        let config = crate::config::load_str("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        let metrics = Arc::new(Metrics::new());
        let resolver = Resolver::new(&config.stores, Default::default()).unwrap();
        let secrets = Secrets(RwLock::new(resolver), metrics.clone(), Default::default());
        let policy = &config.policies[0];
        for _ in 0..5 {
            secrets.refresh(policy).await.unwrap();
        }
        assert!(
            metrics
                .encode()
                .contains("latch_credential_refreshes_total{policy=\"db\"} 1"),
            "{}",
            metrics.encode()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
