//! Starting and stopping the data path: eBPF programs, broker listeners, admin endpoint and
//! DNS refresh, in the order that keeps every step safe to undo.
use std::{
    collections::{HashMap, HashSet},
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
    secrets::{Resolver, ResolverOptions},
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
    pub secrets: ResolverOptions,
    pub audit: crate::audit::AuditOptions,
    /// What intercepted connections meet while the broker cannot serve them.
    pub fail_mode: FailMode,
    /// Pin the links so interception outlives this process (restarts, crashes).
    pub keep_interception: bool,
    /// Names this agent's pin directory (`<bpffs>/latch/<instance>`).
    pub instance: String,
    /// Hand applications' sends to the kernel after the handshake where the policy allows.
    pub fast_path: bool,
    /// Cgroups under which container ids and pod UIDs are trusted, beyond the defaults (see
    /// [`crate::identity::Cgroups`]).
    pub runtime_cgroup_roots: Vec<String>,
    /// The kernel's BTF (field offsets for recording the connecting executable).
    pub kernel_btf: PathBuf,
    /// This node's name in Kubernetes: watch its pods (the `namespace`, `serviceAccount` and
    /// `labels` selectors need them). `None`: no pod metadata.
    pub node_name: Option<String>,
}

/// What happens to connections the programs would intercept while no broker serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FailMode {
    /// They fail: redirection stays in place through shutdown (and, with pinned links, while
    /// the agent is down), so nothing reaches a target without latch.
    #[default]
    Closed,
    /// They go to their destination directly: redirection is switched off before draining,
    /// and links are never pinned.
    Open,
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
    #[error("starting the connection threads: {0}")]
    Workers(#[source] std::io::Error),
    #[error("keeping interception across restarts needs {0}")]
    Keep(&'static str),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error("secret stores: {0}")]
    Secrets(#[from] crate::secrets::SecretError),
    #[error("opening the audit log: {0}")]
    Audit(#[source] std::io::Error),
    #[error("{0}")]
    PidNamespace(#[source] crate::identity::PidNamespaceError),
    #[error("recording the agent's network namespace: {0}")]
    Netns(#[source] std::io::Error),
    #[error(transparent)]
    NetnsMap(crate::netns::table::NetnsError),
    #[error("watching pods: {0}")]
    Pods(#[from] crate::pods::watch::WatchError),
}

/// The running data path. [`Running::stop`] takes it down in order.
pub struct Running {
    interceptor: Arc<Mutex<Interceptor>>,
    shared: Arc<Shared>,
    rules: Arc<RuleState>,
    admin_state: Option<Arc<AdminState>>,
    stop_accepting: CancellationToken,
    /// The accept loops (they end when `stop_accepting` fires).
    accepting: TaskTracker,
    abort: CancellationToken,
    background: CancellationToken,
    tracker: TaskTracker,
    /// Connection threads; kept until `stop` has drained the connections they run.
    workers: Arc<broker::workers::Workers>,
    listeners: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    stores: Mutex<String>,
    secret_options: ResolverOptions,
    fail_mode: FailMode,
    /// The network namespaces the broker listens in.
    namespaces: Arc<crate::netns::Namespaces>,
    /// Ends the admin endpoint (on an upgrade, before draining: the next agent answers it).
    admin_stop: CancellationToken,
    /// A duplicate of the admin listener, for the next agent.
    admin_fd: Option<std::os::fd::OwnedFd>,
    /// Connections served at once (`--max-connections`).
    slots: Arc<Semaphore>,
}

/// How far past the old agent's connection ids the new one counts (connections the old agent
/// admits between its offer and its detaching take ids up to there).
const CONN_ID_GAP: u64 = 1 << 20;

/// Takes the inherited listener of `want`'s family if its address suits `want` (the same, or
/// any port of the same address for port 0).
fn inherited_listener(
    pool: &mut Vec<std::net::TcpListener>,
    want: SocketAddr,
) -> Option<tokio::net::TcpListener> {
    let at = pool.iter().position(|l| {
        l.local_addr().is_ok_and(|a| {
            a.is_ipv4() == want.is_ipv4()
                && a.ip() == want.ip()
                && (want.port() == 0 || a.port() == want.port())
        })
    })?;
    let l = pool.remove(at);
    l.set_nonblocking(true).ok()?;
    tokio::net::TcpListener::from_std(l).ok()
}

impl Running {
    /// Loads and attaches the programs, binds the listeners and starts serving. On error,
    /// everything started so far is undone (dropping the interceptor detaches).
    pub async fn start(config: &Config, opts: &Options) -> Result<Self, StartError> {
        Self::start_inheriting(config, opts, None).await
    }

    /// As [`Running::start`], on what a running agent handed over (an upgrade): its
    /// listeners (own namespace and others), admin listener, connection map and rule ids.
    pub async fn start_inheriting(
        config: &Config,
        opts: &Options,
        inherited: Option<&mut crate::upgrade::Inherited>,
    ) -> Result<Self, StartError> {
        let (v4, v6) = split_listen(&opts.listen)?;
        warn_unprivileged_ports(opts);
        crate::identity::require_host_pid_namespace().map_err(StartError::PidNamespace)?;
        crate::netns::init_own().map_err(StartError::Netns)?;
        let pins = pin_dir(opts)?;
        let secrets = Resolver::new(&config.stores, opts.secrets.clone())?;
        let own_inode = crate::netns::own_inode();
        let mut own_pool = Vec::new();
        let mut other_listeners = Vec::new();
        let mut inherited_admin = None;
        let mut inherited_conns = None;
        let mut inherited_ids = None;
        let mut inherited_next_conn = 0;
        if let Some(inh) = inherited {
            inherited_next_conn = inh.next_conn_id;
            for (inode, l) in inh.listeners.drain(..) {
                if Some(inode) == own_inode {
                    own_pool.push(l);
                } else {
                    other_listeners.push((inode, l));
                }
            }
            inherited_admin = inh.admin.take();
            inherited_conns = inh.conns.take();
            inherited_ids = Some((std::mem::take(&mut inh.policy_ids), inh.next_rule_id));
        }
        let listener4 = match inherited_listener(&mut own_pool, v4) {
            Some(l) => l,
            None => broker::bind(v4).map_err(|source| StartError::Bind { addr: v4, source })?,
        };
        let v6_inherited = v6.and_then(|addr| inherited_listener(&mut own_pool, addr));
        // Someone else holding the IPv6 port is refused like the IPv4 one. Without IPv6 in
        // the agent's namespace, IPv6 rules stay: the hooks find no listener of latch's there,
        // so those connects fail closed (or go direct) and are audited, rather than silently
        // escaping interception; pods with IPv6 get their listener when prepared.
        let listener6 = match v6 {
            _ if v6_inherited.is_some() => v6_inherited,
            Some(addr) => match broker::bind(addr) {
                Ok(l) => Some(l),
                Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(StartError::Bind { addr, source });
                }
                Err(err) => {
                    tracing::warn!(%addr, %err, "no IPv6 listener in the agent's network namespace: IPv6 connects the policies match there are refused (fail mode closed) or go direct (open), and audited");
                    None
                }
            },
            None => None,
        };
        let local4 = listener4
            .local_addr()
            .map_err(|source| StartError::Bind { addr: v4, source })?;
        let bound6 = match (&listener6, v6) {
            (Some(l), Some(addr)) => Some(
                l.local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            _ => None,
        };
        // Where IPv6 redirects go, in every namespace (the same port everywhere).
        let local6 = bound6.or(v6.filter(|a| a.port() != 0));
        let admin_listener = match opts.admin {
            Some(addr) => {
                match inherited_admin.and_then(|l| inherited_listener(&mut vec![l], addr)) {
                    Some(l) => Some(l),
                    None => Some(
                        tokio::net::TcpListener::bind(addr)
                            .await
                            .map_err(|source| StartError::Bind { addr, source })?,
                    ),
                }
            }
            None => None,
        };

        let mut interceptor = Interceptor::load(&opts.kernel_btf)?;
        if let crate::ebpf::ExeIdentity::Unavailable(why) = interceptor.exe_identity() {
            tracing::error!(
                reason = %why,
                "the connect hooks cannot record the connecting executable: every `exe` \
                 workload selector admits nothing"
            );
        }
        interceptor.set_fast_path(opts.fast_path);
        interceptor.spawn_log_reader();
        let conns = interceptor.take_conn_table()?;
        if let Some(fd) = inherited_conns
            && let Err(err) = conns.adopt_previous(fd)
        {
            tracing::warn!(%err, "cannot read the previous agent's connection map");
        }
        let (netns_map, netns_events) = interceptor.take_netns()?;
        let policies = match inherited_ids {
            Some((names, next)) => PolicySet::inheriting(config, names, next),
            None => PolicySet::new(config),
        };
        let dns = Dns::from_system()?;
        let (resolved, next_refresh) = dns.resolve_all(&policies.hosts(), &Resolved::new()).await;
        // The lobby must exist before any application socket can be diverted to it, and the
        // kernel must pass the self-test before any rule asks for direct mode.
        let direct = match interceptor
            .take_direct()
            .map_err(|e| e.to_string())
            .and_then(|maps| {
                broker::direct::Direct::new(maps, opts.limits.max_direct_startups)
                    .map_err(|e| e.to_string())
            })
            .and_then(|d| d.self_test().map(|()| d).map_err(|e| e.to_string()))
        {
            Ok(d) => Some(Arc::new(d)),
            Err(err) => {
                tracing::warn!(
                    %err,
                    "direct mode unavailable on this kernel; policies asking for it are relayed"
                );
                interceptor.set_direct(false);
                None
            }
        };
        interceptor.sync_rules(&policies.rules(&resolved, local6.is_some()))?;
        let metrics = Arc::new(Metrics::new());
        let mut shared = Shared::new(
            conns,
            policies,
            metrics,
            secrets,
            opts.mark,
            opts.limits.clone(),
        );
        shared.audit = crate::audit::Audit::start(opts.audit.clone()).map_err(StartError::Audit)?;
        shared.env.fast_path = match interceptor.take_fast_path() {
            Ok(_) if !opts.fast_path => None,
            Ok(fast) => Some(fast),
            Err(err) => {
                tracing::warn!(%err, "fast path unavailable; every byte goes through the broker");
                None
            }
        };
        shared.direct = direct;
        shared.fail_mode = opts.fail_mode;
        shared.cgroups =
            crate::identity::Cgroups::new(shared.cgroups.root.clone(), &opts.runtime_cgroup_roots);
        let background = CancellationToken::new();
        let kubernetes_selectors: Vec<&str> = config
            .policies
            .iter()
            .filter(|p| p.workloads.iter().any(|w| w.uses_kubernetes()))
            .map(|p| p.name.as_str())
            .collect();
        if opts.node_name.is_none() && !kubernetes_selectors.is_empty() {
            tracing::warn!(
                policies = ?kubernetes_selectors,
                "namespace/serviceAccount/labels selectors admit nothing without pod metadata: \
                 set --node-name (or NODE_NAME) to watch this node's pods"
            );
        }
        if let Some(node) = &opts.node_name {
            let cache = crate::pods::PodCache::new();
            // Until the first list completes, /readyz says the pod cache is not in sync.
            crate::pods::watch::start(node, cache.clone(), background.clone()).await?;
            shared.cgroups.pods = Some(cache);
        }
        if inherited_next_conn > 0 {
            shared.count_ids_from(inherited_next_conn + CONN_ID_GAP);
        }
        let shared = Arc::new(shared);
        let stop_accepting = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(opts.limits.max_connections));
        let slots_kept = slots.clone();
        crate::relay::pipes::set_max(opts.limits.max_pipes);
        let mut listeners = vec![local4];
        listeners.extend(bound6);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = Arc::new(broker::workers::Workers::start(cpus).map_err(StartError::Workers)?);
        // The broker listens in its own namespace and in every one in use under the cgroup
        // before the programs are attached, so no redirect finds nobody listening.
        let accepting = TaskTracker::new();
        let serve: crate::netns::table::Serve = {
            let serving = broker::Serving {
                shared: shared.clone(),
                abort: abort.clone(),
                tracker: tracker.clone(),
                slots: slots.clone(),
                workers: workers.clone(),
                accepting: accepting.clone(),
            };
            Box::new(move |netns, listener| serving.listen(netns, &listener))
        };
        let namespaces = Arc::new(
            crate::netns::Namespaces::new(
                netns_map,
                std::iter::once(listener4).chain(listener6).collect(),
                other_listeners,
                local4,
                local6,
                opts.limits.max_namespaces,
                stop_accepting.clone(),
                serve,
            )
            .map_err(StartError::NetnsMap)?,
        );
        crate::netns::watch::sweep(&namespaces, &opts.cgroup);
        // Inherited listeners of namespaces no longer in use close now.
        namespaces.drop_inherited();
        let mut cfg = broker_config(local4, local6, opts.mark);
        if opts.fail_mode == FailMode::Open {
            cfg.flags |= latch_common::CONFIG_FAIL_OPEN;
        }
        interceptor.set_broker(cfg)?;
        interceptor.attach(&opts.cgroup, &pins, opts.keep_interception)?;
        tracing::info!(
            cgroup = %opts.cgroup.display(),
            listen4 = %local4,
            listen6 = ?local6,
            rules = interceptor.rule_count(),
            policies = shared.policies().policies().len(),
            namespaces = namespaces.len(),
            "attached"
        );
        let interceptor = Arc::new(Mutex::new(interceptor));
        tokio::spawn(broker::direct::run_lobby(
            shared.clone(),
            stop_accepting.clone(),
            tracker.clone(),
            abort.clone(),
        ));
        tokio::spawn(crate::netns::watch::run(
            crate::netns::watch::Watch {
                namespaces: namespaces.clone(),
                cgroup: opts.cgroup.clone(),
                events: Some(netns_events),
                on_unprepared: unprepared_reporter(shared.clone(), opts.fail_mode),
            },
            stop_accepting.clone(),
        ));
        let rules = Arc::new(RuleState {
            dns,
            resolved: tokio::sync::Mutex::new(resolved),
            interceptor: interceptor.clone(),
            shared: shared.clone(),
            ipv6: local6.is_some(),
            reschedule: tokio::sync::Notify::new(),
        });
        tokio::spawn(refresh_dns(rules.clone(), next_refresh, background.clone()));
        let mut admin_addr = None;
        let admin_stop = background.child_token();
        let admin_fd = admin_listener.as_ref().and_then(|l| {
            use std::os::fd::AsFd as _;
            l.as_fd().try_clone_to_owned().ok()
        });
        let admin_state = admin_listener.map(|l| {
            admin_addr = l.local_addr().ok();
            let state = Arc::new(AdminState {
                shared: shared.clone(),
                interceptor: interceptor.clone(),
                listeners: listeners.clone(),
                cgroup: opts.cgroup.clone(),
                ready: true.into(),
                namespaces: namespaces.clone(),
            });
            tokio::spawn(admin::serve(l, state.clone(), admin_stop.clone()));
            state
        });
        Ok(Self {
            interceptor,
            shared,
            rules,
            admin_state,
            stop_accepting,
            accepting,
            abort,
            background,
            tracker,
            workers,
            listeners,
            admin_addr,
            stores: Mutex::new(store_fingerprint(&config.stores)),
            fail_mode: opts.fail_mode,
            namespaces,
            secret_options: opts.secrets.clone(),
            admin_stop,
            admin_fd,
            slots: slots_kept,
        })
    }

    /// Carries on the relays a previous agent hands over (see [`crate::upgrade::relays`]).
    pub fn resumer(&self) -> broker::resume::Resumer {
        broker::resume::Resumer {
            shared: self.shared.clone(),
            tracker: self.tracker.clone(),
            abort: self.abort.clone(),
            workers: self.workers.clone(),
            slots: self.slots.clone(),
        }
    }

    /// Duplicates of what the next agent takes over (see [`crate::upgrade`]).
    pub fn offer(&self) -> std::io::Result<crate::upgrade::Offer> {
        let (policy_ids, next_rule_id) = self.shared.policies().ids();
        Ok(crate::upgrade::Offer {
            listeners: self.namespaces.handover()?,
            admin: self
                .admin_fd
                .as_ref()
                .map(|fd| fd.try_clone())
                .transpose()?,
            conns: self.shared.conns.dup_fd(),
            policy_ids,
            next_rule_id,
            next_conn_id: self.shared.peek_next_conn_id(),
        })
    }

    /// What stops looking connections up in the previous agent's map (after an upgrade).
    pub fn previous_map_forgetter(&self) -> impl FnOnce() + Send + 'static {
        let shared = self.shared.clone();
        move || shared.conns.forget_previous()
    }

    /// The next agent serves now: stop accepting and answering the admin endpoint, then
    /// detach this one's programs (its are attached), hand the plain relays over on
    /// `relays_to` (the upgrade connection, when the new agent takes them), and drain the
    /// rest like [`Running::stop`].
    ///
    /// In that order: the new agent accepts on the same listeners and looks up this agent's
    /// records too, so whatever these programs redirect until they go is served; but a
    /// connection the new agent's programs redirected is recorded only in its map, and this
    /// agent must not be accepting any more when the first one arrives.
    pub async fn hand_over(
        self,
        grace: Duration,
        relays_to: Option<std::os::fd::OwnedFd>,
    ) -> Totals {
        self.admin_stop.cancel();
        self.stop_accepting.cancel();
        self.accepting.close();
        self.accepting.wait().await;
        self.interceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .detach();
        tracing::info!("programs detached; the new agent serves new connections");
        if let Some(conn) = relays_to {
            self.hand_relays_over(conn).await;
        }
        self.finish(grace).await
    }

    /// Parks every relay that can be and sends them to the new agent as they park, for up to
    /// [`crate::upgrade::PARK_WINDOW`]. What cannot be sent (the new agent went away) is
    /// carried on here, and drained with the rest.
    async fn hand_relays_over(&self, conn: std::os::fd::OwnedFd) {
        use crate::upgrade::{PARK_WINDOW, handover};
        let parking = self.shared.env.parking.clone();
        parking.request(PARK_WINDOW);
        // The window bounds the decisions; relays that decided are submitted at once.
        let cap = tokio::time::Instant::now() + PARK_WINDOW + Duration::from_secs(2);
        // A new agent that stops reading fails the send rather than hold this one up.
        if let Err(err) = crate::upgrade::socket::set_send_timeout(&conn, Duration::from_secs(10)) {
            tracing::warn!(%err, "upgrade socket: cannot bound sends");
        }
        let conn = Arc::new(conn);
        let (mut sent, mut kept) = (0usize, Vec::new());
        let mut broken = false;
        loop {
            let (batch, done) = parking.collect();
            if !batch.is_empty() {
                if broken {
                    kept.extend(batch);
                } else {
                    let c = conn.clone();
                    let n = batch.len();
                    match tokio::task::spawn_blocking(move || handover::send_relays(&c, batch))
                        .await
                    {
                        Ok(Ok(too_big)) => {
                            if !too_big.is_empty() {
                                tracing::warn!(
                                    relays = too_big.len(),
                                    "relay state too large to hand over; carrying them on here"
                                );
                            }
                            sent += n - too_big.len();
                            kept.extend(too_big);
                        }
                        Ok(Err((err, left))) => {
                            tracing::warn!(%err, left = left.len(), "handing relays over failed; carrying them on here");
                            sent += n - left.len();
                            kept.extend(left);
                            broken = true;
                        }
                        Err(err) => {
                            tracing::error!(%err, "handing relays over failed");
                            broken = true;
                        }
                    }
                }
            }
            if done || tokio::time::Instant::now() >= cap {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !broken && let Err(err) = handover::end_relays(&conn) {
            tracing::warn!(%err, "ending the relay hand-over");
        }
        tracing::info!(
            handed_over = sent,
            kept = kept.len(),
            "live relays handed to the new agent"
        );
        let resumer = self.resumer();
        for p in kept {
            resumer.resume(p);
        }
    }

    pub fn listeners(&self) -> &[SocketAddr] {
        &self.listeners
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The capabilities this run needs beyond those always kept.
    pub fn needs(&self) -> crate::privileges::Needs {
        crate::privileges::Needs {
            privileged_port: self.listeners.iter().any(|a| a.port() < 1024),
        }
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
        if self.fail_mode == FailMode::Open {
            // New connections go straight to their targets from now on.
            let mut i = self.interceptor.lock().unwrap_or_else(|e| e.into_inner());
            let mut cfg = broker_config_disabled();
            cfg.mark = self.shared.env.mark;
            if let Err(err) = i.set_broker(cfg) {
                tracing::warn!(%err, "could not disable redirection before draining");
            }
        }
        self.finish(grace).await
    }

    /// Stops accepting, drains for up to `grace`, closes what is left and lets go of the
    /// programs, maps and listeners.
    async fn finish(self, grace: Duration) -> Totals {
        // Fail closed: redirection stays; with the listeners closed, new connections are
        // refused until the programs are detached (or, when pinned, until the next agent).
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
        self.shared.connectors.close_idle(&|_| true);
        self.shared.env.secrets.shutdown().await;
        let totals = self.shared.metrics.totals();
        // Dropping the last reference to the interceptor detaches every program that is not
        // pinned; pinned ones stay for the next agent.
        drop(self.admin_state);
        let pinned = self
            .interceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_pinned();
        if pinned {
            tracing::info!(
                "links stay pinned: interception (failing closed) continues until the next agent"
            );
        }
        drop(self.interceptor);
        // Closes the listeners in every namespace (their accept loops have ended).
        drop(self.namespaces);
        drop(self.workers);
        totals
    }
}

/// Audits and counts a connect the kernel matched in a namespace the broker did not listen in
/// yet (refused, or let through with the fail mode `open`).
fn unprepared_reporter(
    shared: Arc<Shared>,
    fail_mode: FailMode,
) -> Box<dyn Fn(&latch_common::ConnMeta) + Send + Sync> {
    // One warning per namespace (a namespace that cannot be prepared, its broker port taken by
    // a squatter, reports every matching connect); each connect is still audited and counted.
    let warned = Mutex::new(std::collections::HashSet::new());
    Box::new(move |meta| {
        let origin = broker::Origin::from(meta);
        let id = shared.next_conn_id();
        // Its own warning below (once per namespace); the summaries count the storm.
        shared.refuse(crate::metrics::RefusedReason::netns_unprepared);
        let (outcome, what) = match fail_mode {
            FailMode::Closed => (crate::audit::Outcome::Refused, "refused by the kernel"),
            FailMode::Open => (
                crate::audit::Outcome::Bypassed,
                "let through to its destination (fail mode open)",
            ),
        };
        let first = {
            let mut warned = warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.len() >= 1024 {
                warned.clear();
            }
            warned.insert(origin.netns_cookie)
        };
        if first {
            tracing::warn!(conn = id, %origin, netns = origin.netns_cookie, "connect from a network namespace latch was not listening in yet: {what}; preparing it");
        } else {
            tracing::debug!(conn = id, %origin, netns = origin.netns_cookie, "connect from an unprepared network namespace: {what}");
        }
        let mut record = crate::audit::Record::new(id, outcome, origin.dst.to_string());
        record.reason = Some(format!("network namespace not prepared yet: {what}"));
        if let Some(policy) = shared.policies().by_rule(origin.rule_id) {
            record = record.with_policy(policy);
        }
        record.workload = Some(crate::identity::Workload::resolve(&origin, &shared.cgroups).into());
        shared.audit.record(&record);
    })
}

/// This instance's pin directory, after checking that keeping interception is coherent.
fn pin_dir(opts: &Options) -> Result<std::path::PathBuf, StartError> {
    let bpffs = crate::ebpf::pins::bpffs();
    if opts.keep_interception {
        if opts.fail_mode == FailMode::Open {
            return Err(StartError::Keep(
                "--fail-mode closed (open means: let connections through when latch is down)",
            ));
        }
        if opts.listen.iter().any(|a| a.port() == 0) {
            return Err(StartError::Keep(
                "fixed listen ports (the pinned programs redirect to them while latch is down)",
            ));
        }
        if bpffs.is_none() {
            return Err(StartError::Keep(
                "a mounted bpffs (mount -t bpf bpf /sys/fs/bpf)",
            ));
        }
    }
    let root = bpffs.unwrap_or_else(|| "/sys/fs/bpf".into());
    Ok(crate::ebpf::pins::pin_dir(&root, &opts.instance))
}

/// Warns about fixed ports any local user may bind in the agent's namespace: while the agent
/// is down they can hold the port and keep it from starting, or (the admin port) answer
/// health checks in its place. The hooks never redirect to a socket that is not latch's.
fn warn_unprivileged_ports(opts: &Options) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    for addr in opts.listen.iter().chain(&opts.admin) {
        if addr.port() != 0 && u32::from(addr.port()) >= start {
            tracing::warn!(
                %addr,
                ip_unprivileged_port_start = start,
                "any local user may bind this port while the agent is down (and so keep it \
                 from starting); pick one below ip_unprivileged_port_start"
            );
        }
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

/// What keeps the eBPF rule tries in step with the policies and their hosts' addresses.
struct RuleState {
    dns: Dns,
    resolved: tokio::sync::Mutex<Resolved>,
    interceptor: Arc<Mutex<Interceptor>>,
    shared: Arc<Shared>,
    ipv6: bool,
    /// Poked after a reload so the refresh loop recomputes when to wake.
    reschedule: tokio::sync::Notify,
}

impl RuleState {
    /// Resolves the current policies' hosts and makes the tries match; returns when the
    /// earliest answer expires.
    async fn refresh(&self) -> Result<std::time::Instant, EbpfError> {
        let mut resolved = self.resolved.lock().await;
        let policies = self.shared.policies();
        let (fresh, next) = self.dns.resolve_all(&policies.hosts(), &resolved).await;
        if fresh != *resolved {
            tracing::info!(?fresh, "policy host addresses changed");
        }
        let rules = policies.rules(&fresh, self.ipv6);
        self.interceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync_rules(&rules)?;
        *resolved = fresh;
        Ok(next)
    }
}

/// Re-resolves policy host names when their answers expire and updates the rule tries in
/// place. Existing connections are not touched.
async fn refresh_dns(rules: Arc<RuleState>, mut next: std::time::Instant, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = rules.reschedule.notified() => {}
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        next = match rules.refresh().await {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(%err, "could not update interception rules");
                std::time::Instant::now() + crate::dns::RETRY
            }
        };
    }
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub policies: usize,
    pub stores_changed: bool,
    pub rules: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("secret stores: {0}")]
    Secrets(#[from] crate::secrets::SecretError),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
}

impl Running {
    /// Applies a new, already validated configuration: new connections use the new policies
    /// and stores; live connections carry on with what they started with; the rule tries are
    /// updated in place.
    pub async fn reload(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        // Build everything that can fail before changing anything.
        let stores_changed = store_fingerprint(&config.stores)
            != *self.stores.lock().unwrap_or_else(|e| e.into_inner());
        let resolver = if stores_changed {
            Some(Resolver::new(&config.stores, self.secret_options.clone())?)
        } else {
            None
        };
        let previous = self.shared.policies();
        let set = PolicySet::successor(config, Some(&previous));
        // The policies whose content changed, that went or that came.
        let contents = |set: &PolicySet| -> HashMap<String, String> {
            (set.policies().iter())
                .map(|p| (p.name.clone(), content(p)))
                .collect()
        };
        let (before, after) = (contents(&previous), contents(&set));
        let changed: HashSet<String> = (before.keys().chain(after.keys()))
            .filter(|name| before.get(*name) != after.get(*name))
            .cloned()
            .collect();
        drop(previous);
        let policies = set.policies().len();
        // Policies first, then rules: a connection redirected under a new rule id must find
        // its policy; one redirected under a removed policy's id is refused.
        self.shared.set_policies(set);
        // Target connections kept between application connections under a changed policy were
        // made under the old one (it may name other credentials, TLS or users): let them go.
        if !changed.is_empty() {
            (self.shared.connectors).close_idle(&|policy| changed.contains(policy));
        }
        if let Some(resolver) = resolver {
            let old = self.shared.env.secrets.replace(resolver);
            *self.stores.lock().unwrap_or_else(|e| e.into_inner()) =
                store_fingerprint(&config.stores);
            tokio::spawn(async move { old.shutdown().await });
        }
        self.rules.refresh().await?;
        self.rules.reschedule.notify_one();
        let rules = self
            .interceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rule_count();
        Ok(ReloadReport {
            policies,
            stores_changed,
            rules,
        })
    }
}

/// What a policy says, to tell a changed one at a reload: its `Debug` form (every field, and
/// no secret: only references to them) without where it is written, which moves when another
/// policy is added above it.
fn content(policy: &crate::config::Policy) -> String {
    let mut p = policy.clone();
    p.source = Default::default();
    format!("{p:?}")
}

/// What identifies a set of store definitions (names and backends, not source positions).
fn store_fingerprint(stores: &[crate::config::SecretStore]) -> String {
    stores
        .iter()
        .map(|s| format!("{}={:?}", s.name, s.backend))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The cgroup the agent attaches to when none is given: the root of the v2 hierarchy.
pub fn default_cgroup() -> Result<PathBuf, crate::cgroup::CgroupError> {
    crate::cgroup::v2_mount()
}

/// Whether `path` lies inside a cgroup v2 hierarchy.
pub fn is_cgroup_dir(path: &Path) -> bool {
    path.join("cgroup.procs").exists()
}
