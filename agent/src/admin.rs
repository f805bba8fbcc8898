//! The admin HTTP endpoint (loopback by default): /healthz, /readyz, /metrics, /status.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{broker::Shared, ebpf::Interceptor};

/// Admin connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one admin connection may stay open.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// What the admin endpoint reports on.
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub interceptor: Arc<Mutex<Interceptor>>,
    pub listeners: Vec<SocketAddr>,
    pub cgroup: PathBuf,
    pub ready: AtomicBool,
    /// The network namespaces the broker listens in.
    pub namespaces: Arc<crate::netns::Namespaces>,
}

#[derive(Serialize)]
struct Status<'a> {
    version: &'static str,
    cgroup: &'a std::path::Path,
    listeners: &'a [SocketAddr],
    ready: bool,
    policies: Vec<PolicyStatus>,
    connections: ConnStatus,
    ebpf: EbpfStatus,
    /// The network namespaces the broker listens in (its own included).
    netns: Vec<NetnsStatus>,
    /// The latest reachability probe per secret store (absent before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    stores: Option<Vec<crate::secrets::health::StoreState>>,
    secret_memory: SecretMemory,
    descriptors: Descriptors,
    /// The pod cache (absent when the agent does not watch pods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pods: Option<PodsStatus>,
}

/// This node's pods as the agent knows them from the Kubernetes API.
#[derive(Serialize)]
struct PodsStatus {
    synced: bool,
    count: usize,
}

/// The agent's open files: how many now, the limit, and the most its limits can need.
#[derive(Serialize)]
struct Descriptors {
    open: usize,
    limit: u64,
    budget: u64,
}

fn descriptors(limits: &crate::broker::Limits) -> Descriptors {
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft);
    Descriptors {
        open,
        limit,
        budget: limits.descriptors_needed(),
    }
}

#[derive(Serialize)]
struct SecretMemory {
    mlocked: u64,
    mlock_failed: u64,
}

#[derive(Serialize)]
struct PolicyStatus {
    name: String,
    protocol: &'static str,
    destination: String,
}

#[derive(Serialize)]
struct ConnStatus {
    #[serde(flatten)]
    totals: crate::metrics::Totals,
    active: i64,
}

#[derive(Serialize)]
struct EbpfStatus {
    rules: usize,
    redirected: u64,
    map_errors: u64,
    /// Entries in LATCH_SOCKS (live redirected sockets) and LATCH_CONNS (accepts pending).
    socks_entries: usize,
    conns_entries: usize,
    /// Entries in LATCH_APP_SOCKS (application sockets enrolled for the fast path) and
    /// LATCH_TARGETS (target sockets of connections being or already handed over).
    fast_socks_entries: usize,
    fast_targets_entries: usize,
    /// Application sockets enrolled for the fast path since start, and connections handed
    /// over to the kernel since start.
    fast_enrolled: u64,
    fast_handovers: u64,
    /// Direct mode: application sockets enrolled since start, connections handed over to the
    /// kernel since start, and entries in LATCH_DIR_KEYS (sockets in their startup now).
    direct_enrolled: u64,
    direct_handovers: u64,
    direct_entries: usize,
    /// Network namespaces the broker listens in (its own included), matching connects the
    /// kernel saw from namespaces it did not listen in yet, and how long preparing one took
    /// lately (microseconds).
    netns_prepared: usize,
    netns_unprepared: u64,
    netns_prepare_us: crate::netns::table::PrepareTimes,
    /// The cookies in LATCH_NETNS.
    netns_map: Vec<u64>,
}

#[derive(Serialize)]
struct NetnsStatus {
    inode: u64,
    cookie: u64,
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let prober = state.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let shared = &prober.shared;
        crate::secrets::health::run(
            || shared.env.secrets.current(),
            &shared.store_health,
            crate::secrets::health::INTERVAL,
            stop,
        )
        .await
    });
    // Anyone on the node can reach this port: a bounded number of connections, each with a
    // deadline for its request headers and for its whole life.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness(state) {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            refresh_ebpf_gauges(state);
            let mut resp = text(StatusCode::OK, state.shared.metrics.encode());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/status" => {
            let body = serde_json::to_string_pretty(&status(state)).unwrap_or_default() + "\n";
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Ready: programs attached and listeners up (the runtime's flag, cleared on shutdown) and
/// every secret store reachable at the latest probe, and (watching pods) the pod cache in
/// sync with the Kubernetes API.
fn readiness(state: &AdminState) -> Result<(), String> {
    if !state.ready.load(Ordering::Acquire) {
        return Err("not brokering (starting or shutting down)".into());
    }
    if let Some(pods) = &state.shared.cgroups.pods
        && !pods.synced()
    {
        return Err("pod cache not in sync with the Kubernetes API".into());
    }
    match state.shared.store_health.unreachable() {
        Err(_) => Err("secret stores not probed yet".into()),
        Ok(down) if down.is_empty() => Ok(()),
        Ok(down) => Err(format!("secret stores unreachable: {}", down.join(", "))),
    }
}

fn status(state: &AdminState) -> Status<'_> {
    let policies = state
        .shared
        .policies()
        .policies()
        .iter()
        .map(|p| PolicyStatus {
            name: p.name.clone(),
            protocol: p.protocol.as_str(),
            destination: destination(&p.destination),
        })
        .collect();
    let ebpf = {
        let i = state.interceptor.lock().unwrap_or_else(|e| e.into_inner());
        let stats = i.stats();
        EbpfStatus {
            rules: i.rule_count(),
            redirected: stats.redirected,
            map_errors: stats.map_errors,
            socks_entries: i.socks_len(),
            conns_entries: state.shared.conns.len(),
            fast_socks_entries: i.app_socks_len(),
            fast_enrolled: stats.fast_socks,
            fast_handovers: state.shared.metrics.fast_path.get(),
            fast_targets_entries: state
                .shared
                .env
                .fast_path
                .as_ref()
                .map_or(0, |f| f.targets_len()),
            direct_enrolled: stats.direct,
            direct_handovers: state.shared.metrics.direct.get(),
            direct_entries: state.shared.direct.as_ref().map_or(0, |d| d.maps().len()),
            netns_prepared: state.namespaces.len(),
            netns_unprepared: stats.unprepared,
            netns_prepare_us: state.namespaces.prepare_times(),
            netns_map: state.namespaces.kernel_cookies(),
        }
    };
    Status {
        version: env!("CARGO_PKG_VERSION"),
        cgroup: &state.cgroup,
        listeners: &state.listeners,
        ready: state.ready.load(Ordering::Acquire),
        policies,
        connections: ConnStatus {
            totals: state.shared.metrics.totals(),
            active: state.shared.metrics.active.get(),
        },
        ebpf,
        netns: state
            .namespaces
            .entries()
            .into_iter()
            .map(|(inode, cookie)| NetnsStatus { inode, cookie })
            .collect(),
        // reachability as last probed; credential and lease expiry as of now
        stores: state.shared.store_health.get().map(|mut stores| {
            let mut now = state.shared.env.secrets.current().expiries();
            for s in &mut stores {
                if let Some(e) = now.remove(&s.name) {
                    s.expiry = e;
                }
            }
            stores
        }),
        secret_memory: {
            let m = crate::config::mlock::stats();
            SecretMemory {
                mlocked: m.locked,
                mlock_failed: m.failed,
            }
        },
        descriptors: descriptors(&state.shared.limits),
        pods: state.shared.cgroups.pods.as_ref().map(|p| PodsStatus {
            synced: p.synced(),
            count: p.len(),
        }),
    }
}

/// `host:port`, `10.0.3.0/24:5432`, `[::1]:80-89`.
fn destination(d: &crate::config::Destination) -> String {
    use crate::config::Target;
    let target = match &d.target {
        Target::Host(h) => h.clone(),
        Target::Address(std::net::IpAddr::V6(a)) => format!("[{a}]"),
        Target::Address(a) => a.to_string(),
        Target::Cidr(c) => format!("{}/{}", c.network(), c.prefix_len()),
    };
    if d.ports.from == d.ports.to {
        format!("{target}:{}", d.ports.from)
    } else {
        format!("{target}:{}-{}", d.ports.from, d.ports.to)
    }
}

fn refresh_ebpf_gauges(state: &AdminState) {
    let i = state.interceptor.lock().unwrap_or_else(|e| e.into_inner());
    let stats = i.stats();
    let m = &state.shared.metrics;
    m.ebpf_redirected.set(stats.redirected as i64);
    m.ebpf_map_errors.set(stats.map_errors as i64);
    m.rules.set(i.rule_count() as i64);
    let socks = i.socks_len();
    drop(i);
    m.map_entries
        .get_or_create(&crate::metrics::MapLabels { map: "socks" })
        .set(socks as i64);
    m.map_entries
        .get_or_create(&crate::metrics::MapLabels { map: "conns" })
        .set(state.shared.conns.len() as i64);
    let locks = crate::config::mlock::stats();
    m.secret_mlock_locked.set(locks.locked as i64);
    m.secret_mlock_failed.set(locks.failed as i64);
    m.relay_pipes.set(crate::relay::pipes::live() as i64);
    for (protocol, n) in state.shared.connectors.kept() {
        m.kept_connections
            .get_or_create(&crate::metrics::ProtocolLabels { protocol })
            .set(n as i64);
    }
    for (store, c) in crate::secrets::credential_stats::snapshot() {
        for (result, n) in [("ok", c.ok), ("failed", c.failed)] {
            m.store_credential_refreshes
                .get_or_create(&crate::metrics::StoreRefreshLabels {
                    store: store.clone(),
                    result,
                })
                .set(n as i64);
        }
    }
    if let Some(stores) = state.shared.store_health.get() {
        m.store_up.clear();
        for s in stores {
            m.store_up
                .get_or_create(&crate::metrics::StoreLabels { store: s.name })
                .set(i64::from(s.reachable));
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
