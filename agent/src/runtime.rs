//! Starting and stopping the data path: eBPF programs, broker listeners, admin endpoint and
//! DNS refresh, in the order that keeps every step safe to undo.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use latch_common::{BrokerConfig, CONFIG_ENABLED};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    broker::{self, Limits, Shared},
    config::Config,
    dns::Dns,
    ebpf::{EbpfError, Interceptor},
    metrics::{Metrics, Totals},
    policy_set::{PolicySet, Resolved},
};

/// Default SO_MARK on the broker's own sockets ("latch" in leetspeak-ish hex).
pub const DEFAULT_MARK: u32 = 0x1a7c_0001;

#[derive(Debug, Clone)]
pub struct Options {
    /// cgroup v2 directory to attach to.
    pub cgroup: PathBuf,
    /// Broker listeners: at most one IPv4 and one IPv6 loopback address.
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub mark: u32,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listen addresses must be loopback (at most one IPv4, one IPv6), got {0}")]
    Listen(SocketAddr),
    #[error("an IPv4 loopback listen address is required")]
    NoIpv4Listener,
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

/// The running data path. [`Running::stop`] takes it down in order.
pub struct Running {
    interceptor: Arc<Mutex<Interceptor>>,
    shared: Arc<Shared>,
    admin_state: Option<Arc<AdminState>>,
    stop_accepting: CancellationToken,
    abort: CancellationToken,
    background: CancellationToken,
    tracker: TaskTracker,
    listeners: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl Running {
    /// Loads and attaches the programs, binds the listeners and starts serving. On error,
    /// everything started so far is undone (dropping the interceptor detaches).
    pub async fn start(config: &Config, opts: &Options) -> Result<Self, StartError> {
        let (v4, v6) = split_listen(&opts.listen)?;
        let listener4 = broker::bind(v4).map_err(|source| StartError::Bind { addr: v4, source })?;
        let listener6 = match v6 {
            Some(addr) => match broker::bind(addr) {
                Ok(l) => Some(l),
                Err(err) => {
                    tracing::warn!(%addr, %err, "no IPv6 listener; IPv6 destinations will not be intercepted");
                    None
                }
            },
            None => None,
        };
        let local4 = listener4
            .local_addr()
            .map_err(|source| StartError::Bind { addr: v4, source })?;
        let local6 = listener6.as_ref().and_then(|l| l.local_addr().ok());
        let admin_listener = match opts.admin {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };

        let mut interceptor = Interceptor::load()?;
        interceptor.spawn_log_reader();
        let conns = interceptor.take_conn_table()?;
        let policies = PolicySet::new(config);
        let dns = Dns::from_system()?;
        let hosts = policies.hosts();
        let (resolved, next_refresh) = dns.resolve_all(&hosts, &Resolved::new()).await;
        interceptor.sync_rules(&policies.rules(&resolved, local6.is_some()))?;
        interceptor.set_broker(broker_config(local4, local6, opts.mark))?;
        interceptor.attach(&opts.cgroup)?;
        tracing::info!(
            cgroup = %opts.cgroup.display(),
            listen4 = %local4,
            listen6 = ?local6,
            rules = interceptor.rule_count(),
            policies = policies.policies().len(),
            "attached"
        );

        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::new(
            conns,
            policies,
            metrics,
            opts.mark,
            opts.limits.clone(),
        ));
        let interceptor = Arc::new(Mutex::new(interceptor));
        let stop_accepting = CancellationToken::new();
        let abort = CancellationToken::new();
        let background = CancellationToken::new();
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(opts.limits.max_connections));
        let mut listeners = vec![local4];
        listeners.extend(local6);
        for listener in std::iter::once(listener4).chain(listener6) {
            tokio::spawn(broker::serve(
                listener,
                shared.clone(),
                stop_accepting.clone(),
                abort.clone(),
                tracker.clone(),
                slots.clone(),
            ));
        }
        if !hosts.is_empty() {
            tokio::spawn(refresh_dns(
                dns,
                hosts,
                resolved,
                next_refresh,
                shared.clone(),
                interceptor.clone(),
                local6.is_some(),
                background.clone(),
            ));
        }
        let mut admin_addr = None;
        let admin_state = admin_listener.map(|l| {
            admin_addr = l.local_addr().ok();
            let state = Arc::new(AdminState {
                shared: shared.clone(),
                interceptor: interceptor.clone(),
                listeners: listeners.clone(),
                cgroup: opts.cgroup.clone(),
                ready: true.into(),
            });
            tokio::spawn(admin::serve(l, state.clone(), background.clone()));
            state
        });
        Ok(Self {
            interceptor,
            shared,
            admin_state,
            stop_accepting,
            abort,
            background,
            tracker,
            listeners,
            admin_addr,
        })
    }

    pub fn listeners(&self) -> &[SocketAddr] {
        &self.listeners
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Stops redirecting and accepting, lets live connections finish for up to `grace`, then
    /// closes what is left and detaches the programs. Returns the connection totals.
    pub async fn stop(self, grace: Duration) -> Totals {
        if let Some(state) = &self.admin_state {
            state.ready.store(false, Ordering::Release);
        }
        {
            let mut i = self.interceptor.lock().unwrap_or_else(|e| e.into_inner());
            let mut cfg = broker_config_disabled();
            cfg.mark = self.shared.mark;
            if let Err(err) = i.set_broker(cfg) {
                tracing::warn!(%err, "could not disable redirection before detaching");
            }
        }
        self.stop_accepting.cancel();
        self.tracker.close();
        let live = self.tracker.len();
        if live > 0 {
            tracing::info!(live, ?grace, "draining connections");
        }
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "grace period over; closing remaining connections"
            );
            self.abort.cancel();
            self.tracker.wait().await;
        }
        self.background.cancel();
        let totals = self.shared.metrics.totals();
        // Dropping the last reference to the interceptor detaches every program.
        drop(self.admin_state);
        drop(self.interceptor);
        totals
    }
}

fn split_listen(listen: &[SocketAddr]) -> Result<(SocketAddr, Option<SocketAddr>), StartError> {
    let mut v4 = None;
    let mut v6 = None;
    for addr in listen {
        let slot = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
        if !addr.ip().is_loopback() || slot.is_some() {
            return Err(StartError::Listen(*addr));
        }
        *slot = Some(*addr);
    }
    Ok((v4.ok_or(StartError::NoIpv4Listener)?, v6))
}

fn broker_config(v4: SocketAddr, v6: Option<SocketAddr>, mark: u32) -> BrokerConfig {
    let addr4 = match v4.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    let (addr6, port6) = match v6 {
        Some(SocketAddr::V6(a)) => (*a.ip(), a.port()),
        _ => (Ipv6Addr::LOCALHOST, 0),
    };
    BrokerConfig {
        addr4: addr4.octets(),
        port4: v4.port(),
        port6,
        mark,
        flags: CONFIG_ENABLED,
        addr6: addr6.octets(),
    }
}

fn broker_config_disabled() -> BrokerConfig {
    BrokerConfig::default()
}

/// Re-resolves policy host names when their answers expire and updates the rule tries in
/// place. Existing connections are not touched.
#[allow(clippy::too_many_arguments)]
async fn refresh_dns(
    dns: Dns,
    hosts: Vec<String>,
    mut resolved: Resolved,
    mut next: std::time::Instant,
    shared: Arc<Shared>,
    interceptor: Arc<Mutex<Interceptor>>,
    ipv6: bool,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        let (fresh, when) = dns.resolve_all(&hosts, &resolved).await;
        next = when;
        if fresh == resolved {
            continue;
        }
        tracing::info!(?fresh, "policy host addresses changed; updating rules");
        let rules = shared.policies().rules(&fresh, ipv6);
        let mut i = interceptor.lock().unwrap_or_else(|e| e.into_inner());
        match i.sync_rules(&rules) {
            Ok(()) => resolved = fresh,
            Err(err) => tracing::error!(%err, "could not update interception rules"),
        }
    }
}

/// The cgroup the agent attaches to when none is given: the root of the v2 hierarchy.
pub fn default_cgroup() -> Result<PathBuf, crate::cgroup::CgroupError> {
    crate::cgroup::v2_mount()
}

/// Whether `path` lies inside a cgroup v2 hierarchy.
pub fn is_cgroup_dir(path: &Path) -> bool {
    path.join("cgroup.procs").exists()
}
