//! One accepted connection, from the kernel's record to the end of the relay.
use std::{net::SocketAddr, os::fd::AsFd as _, sync::atomic::Ordering, time::Instant};

use aya::maps::MapError;
use latch_common::ConnMeta;
use tokio::net::TcpStream;
use tracing::{Instrument as _, info_span};

use super::{Origin, Shared};
use crate::{
    audit::{self, Record},
    config::Protocol,
    connector::{
        self, ConnectError,
        refuse::{self, Refusal},
    },
    identity::Workload,
    metrics::{Direction, Outcome, RefusedReason},
    relay::Progress,
};

/// Serves one accepted connection. `meta` is the kernel's record of it, taken by the accept
/// loop (which needs the opener to choose the connection thread).
pub(super) async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    meta: Result<Option<ConnMeta>, MapError>,
    netns: crate::netns::Handle,
    shared: &Shared,
) {
    let id = shared.next_conn_id();
    let meta = match meta {
        Ok(Some(meta)) => meta,
        Ok(None) => {
            // Nothing reaches credentials unless the kernel redirected it.
            shared.metrics.refuse(RefusedReason::not_redirected);
            tracing::warn!(conn = id, %peer, %local, "refused a connection the kernel did not redirect");
            let mut record = Record::new(id, audit::Outcome::Refused, local.to_string());
            record.reason = Some(format!("not redirected by the kernel (peer {peer})"));
            shared.audit.record(&record);
            reset(stream);
            return;
        }
        Err(err) => {
            shared.metrics.refuse(RefusedReason::not_redirected);
            tracing::error!(conn = id, %peer, %err, "kernel connection map lookup failed; refusing");
            reset(stream);
            return;
        }
    };
    let mut origin = Origin::from(&meta);
    // Target sockets are opened in the application's namespace.
    origin.netns = Some(netns);
    origin.conn = id;
    let policies = shared.policies();
    let Some(policy) = policies.by_rule(origin.rule_id).cloned() else {
        shared.metrics.refuse(RefusedReason::no_policy);
        tracing::warn!(conn = id, %origin, "no policy for this destination any more; refusing");
        let mut record = Record::new(id, audit::Outcome::Refused, origin.dst.to_string());
        record.reason = Some("no policy covers this destination".into());
        record.workload = Some(Workload::resolve(&origin, &shared.cgroups));
        shared.audit.record(&record);
        reset(stream);
        return;
    };
    let workload = Workload::resolve(&origin, &shared.cgroups);
    let span = span(id, &policy.name, &origin, false);
    serve(stream, origin, workload, &policy, shared, id)
        .instrument(span)
        .await;
}

async fn serve(
    stream: TcpStream,
    origin: Origin,
    workload: Workload,
    policy: &crate::config::Policy,
    shared: &Shared,
    id: u64,
) {
    let started = Instant::now();
    let metrics = &shared.metrics;
    let mut record =
        Record::new(id, audit::Outcome::Relayed, origin.dst.to_string()).with_policy(policy);
    // The workload's own limit comes first: a workload flooding connections its policy denies
    // meets its limit, not every other workload's.
    let Some(_slot) = shared.per_workload.try_acquire(origin.cgroup_id) else {
        let why = Refusal::WorkloadLimit {
            max: shared.per_workload.max(),
        };
        metrics.refuse(RefusedReason::workload_limit);
        tracing::warn!(
            limit = shared.per_workload.max(),
            "refused: workload over its connection limit"
        );
        record.outcome = audit::Outcome::Refused;
        record.reason = Some(why.to_string());
        record.workload = Some(workload);
        record.duration_ms = ms(started.elapsed());
        shared.audit.record(&record);
        refuse::refuse(stream, policy, why).await;
        return;
    };
    if !workload.admitted_by(&policy.workloads) {
        metrics.deny(&policy.name);
        let exe_verdicts = workload.exe_verdicts(&policy.workloads);
        tracing::warn!(
            exe = ?workload.exe,
            exe_verdicts,
            cgroup = ?workload.cgroup,
            "denied: the policy does not admit this workload"
        );
        record.outcome = audit::Outcome::Denied;
        record.reason = Some(denial_reason(&policy.name, exe_verdicts));
        record.workload = Some(workload);
        record.duration_ms = ms(started.elapsed());
        shared.audit.record(&record);
        connector::deny(stream, &origin, policy, shared).await;
        return;
    }
    record.workload = Some(workload);
    let _ = stream.set_nodelay(true);
    // A second descriptor of the application's socket, held until the handshake is done, so a
    // timed-out handshake can still be answered after the connector is dropped.
    let app_fd = stream.as_fd().try_clone_to_owned().ok();
    let handshake_signal = tokio::sync::Notify::new();
    let handshake = std::sync::OnceLock::new();
    metrics.active.inc();
    let progress = Progress::default();
    let handshake_done = || {
        metrics
            .handshake_seconds
            .get_or_create(&crate::metrics::PolicyLabels {
                policy: policy.name.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        let _ = handshake.set(started.elapsed());
        handshake_signal.notify_one();
    };
    tracing::debug!("brokering");
    let connector = async {
        match policy.protocol {
            Protocol::Tcp => {
                connector::tcp::serve(stream, &origin, shared, &progress, handshake_done).await
            }
            Protocol::Postgres => {
                connector::postgres::serve(
                    stream,
                    &origin,
                    policy,
                    shared,
                    &progress,
                    handshake_done,
                )
                .await
            }
            other => Err(ConnectError::Unsupported(other.as_str())),
        }
    };
    let timeout = shared.limits.handshake_timeout;
    let watchdog = async {
        match tokio::time::timeout(timeout, handshake_signal.notified()).await {
            Ok(()) => {
                drop(app_fd);
                std::future::pending().await
            }
            Err(_) => app_fd,
        }
    };
    let result = tokio::select! {
        biased;
        r = connector => r,
        app = watchdog => {
            if let Some(app) = app.and_then(|fd| from_fd(fd).ok()) {
                refuse::abort(app, policy, Refusal::HandshakeTimeout(timeout)).await;
            }
            Err(ConnectError::HandshakeTimeout(timeout))
        }
    };
    metrics.active.dec();
    let to_target = progress.to_target.load(Ordering::Relaxed);
    let to_app = progress.to_app.load(Ordering::Relaxed);
    metrics.add_bytes(Direction::to_target, to_target);
    metrics.add_bytes(Direction::to_app, to_app);
    record.bytes_to_target = to_target;
    record.bytes_to_app = to_app;
    record.fast_path = progress.handed_over.load(Ordering::Relaxed);
    if record.fast_path {
        metrics.fast_path.inc();
    }
    record.handshake_ms = handshake.get().copied().map(ms);
    record.duration_ms = ms(started.elapsed());
    match &result {
        // Once relaying, a reset from either side ends the session; it is not a broker failure.
        Ok(_) | Err(ConnectError::Relay(_)) => {
            if let Err(err) = &result {
                tracing::debug!(%err, "relay ended by an error");
            }
            metrics.connection(&policy.name, Outcome::relayed);
            tracing::info!(
                to_target,
                to_app,
                ms = started.elapsed().as_millis() as u64,
                "closed"
            );
        }
        Err(err) => {
            let outcome = match err {
                ConnectError::HandshakeTimeout(_) => Outcome::timed_out,
                _ => Outcome::failed,
            };
            metrics.connection(&policy.name, outcome);
            tracing::warn!(%err, to_target, to_app, "failed");
            record.outcome = audit::Outcome::Failed;
            record.reason = Some(err.to_string());
        }
    }
    shared.audit.record(&record);
}

/// The one span of a connection (`direct` marks direct-mode connections).
pub(super) fn span(id: u64, policy: &str, origin: &Origin, direct: bool) -> tracing::Span {
    info_span!(
        "conn",
        id,
        policy,
        dst = %origin.dst,
        pid = origin.pid,
        uid = origin.uid,
        comm = %origin.comm,
        cgroup_id = origin.cgroup_id,
        direct = direct.then_some(true),
    )
}

/// A tokio stream over a duplicate of the application's socket.
fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

pub(super) fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Closes with RST, so the client sees a refused/reset connection rather than a clean EOF.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// The audit reason of a denial; with `exe` selectors, how the executable compared with each.
pub(super) fn denial_reason(policy: &str, exe_verdicts: Option<String>) -> String {
    match exe_verdicts {
        Some(v) => format!("policy {policy:?} does not admit this workload ({v})"),
        None => format!("policy {policy:?} does not admit this workload"),
    }
}
