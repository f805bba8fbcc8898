//! One accepted connection, from the kernel lookup to the end of the relay.
use std::{net::SocketAddr, sync::atomic::Ordering, time::Instant};

use tokio::net::TcpStream;
use tracing::{Instrument as _, info_span};

use super::{Origin, Shared};
use crate::{
    config::Protocol,
    connector::{self, ConnectError},
    metrics::{Direction, Outcome, RefusedReason},
    relay::Progress,
};

pub(super) async fn handle(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(err) => {
            tracing::debug!(%err, %peer, "accepted socket has no local address");
            return;
        }
    };
    let meta = match shared.conns.take(peer, local) {
        Ok(Some(meta)) => meta,
        Ok(None) => {
            // Nothing reaches credentials unless the kernel redirected it.
            shared.metrics.refuse(RefusedReason::not_redirected);
            tracing::warn!(conn = id, %peer, %local, "refused a connection the kernel did not redirect");
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
    let origin = Origin::from(&meta);
    let policies = shared.policies();
    let Some(policy) = policies.by_rule(origin.rule_id).cloned() else {
        shared.metrics.refuse(RefusedReason::no_policy);
        tracing::warn!(conn = id, %origin, "no policy for this destination any more; refusing");
        reset(stream);
        return;
    };
    let span = info_span!(
        "conn",
        id,
        policy = %policy.name,
        dst = %origin.dst,
        pid = origin.pid,
        uid = origin.uid,
        comm = %origin.comm,
        cgroup_id = origin.cgroup_id,
    );
    serve(stream, origin, &policy, shared)
        .instrument(span)
        .await;
}

async fn serve(stream: TcpStream, origin: Origin, policy: &crate::config::Policy, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    let metrics = &shared.metrics;
    metrics.active.inc();
    let progress = Progress::default();
    let handshake_done = || {
        metrics
            .handshake_seconds
            .get_or_create(&crate::metrics::PolicyLabels {
                policy: policy.name.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
    };
    tracing::debug!("brokering");
    let result = match policy.protocol {
        Protocol::Tcp => {
            connector::tcp::serve(stream, &origin, shared, &progress, handshake_done).await
        }
        other => Err(ConnectError::Unsupported(other.as_str())),
    };
    metrics.active.dec();
    let to_target = progress.to_target.load(Ordering::Relaxed);
    let to_app = progress.to_app.load(Ordering::Relaxed);
    metrics.add_bytes(Direction::to_target, to_target);
    metrics.add_bytes(Direction::to_app, to_app);
    match result {
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
            metrics.connection(&policy.name, Outcome::failed);
            tracing::warn!(%err, to_target, to_app, "failed");
        }
    }
}

/// Closes with RST, so the client sees a refused/reset connection rather than a clean EOF.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
