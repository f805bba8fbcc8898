//! One accepted connection, from the kernel's record to the end of the relay.
use std::{net::SocketAddr, os::fd::AsFd as _, sync::atomic::Ordering};

use aya::maps::MapError;
use latch_common::ConnMeta;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::{
    Shared,
    admit::{self, Admitted, Unrecorded, Verdict, ms},
};
use crate::{
    audit,
    connector::{ConnectError, Context, Refusal, Session, refuse},
    metrics::{Direction, Outcome},
};

/// Serves one accepted connection. `meta` is the kernel's record of it, taken by the accept
/// loop (which needs the opener to choose the connection thread).
pub(super) fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    meta: Result<Option<ConnMeta>, MapError>,
    netns: crate::netns::Handle,
    shared: &Shared,
) -> impl std::future::Future<Output = ()> + Send + '_ {
    // Two steps, the first boxed: what admission holds (about 2 KiB, the arguments included)
    // is freed once it is done rather than take room in the connection's task for its whole
    // life. The box is made here, outside the task's own future, which then keeps only the
    // box's pointer; the session is awaited where admission left it (pinned in place, never
    // moved out of the `Option`, so it takes room once).
    let admission = Box::pin(admit_for(stream, peer, local, meta, netns, shared));
    async move {
        let session = std::pin::pin!(admission.await);
        if let Some(session) = session.as_pin_mut() {
            session.await;
        }
    }
}

/// Admits the connection; `Some`: its session, to run (its span entered).
async fn admit_for(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    meta: Result<Option<ConnMeta>, MapError>,
    netns: crate::netns::Handle,
    shared: &Shared,
) -> Option<impl std::future::Future<Output = ()> + '_> {
    let id = shared.next_conn_id();
    let unrecorded = || Unrecorded {
        destination: local.to_string(),
        peer: peer.to_string(),
        reset: was_reset(&stream),
    };
    let Some(admitted) = admit::admit(shared, id, meta, Some(netns), unrecorded, false).await
    else {
        refuse::reset(stream);
        return None;
    };
    let span = admitted.span.clone();
    Some(serve(stream, admitted, shared).instrument(span))
}

/// A plain function returning its future, not an `async fn`: an `async fn` moves its
/// arguments into locals of its own, and the connection's task would hold `admitted` twice for
/// its whole life (792 bytes each).
#[allow(clippy::manual_async_fn)]
fn serve(
    stream: TcpStream,
    mut admitted: Admitted,
    shared: &Shared,
) -> impl std::future::Future<Output = ()> + Send + '_ {
    async move {
        let metrics = &shared.metrics;
        let Some(connector) = shared.connectors.get(admitted.policy.protocol) else {
            // Refused at load; a policy set made otherwise still gets no further than this.
            admitted.record.outcome = audit::Outcome::Failed;
            admitted.record.reason =
                Some(ConnectError::Unsupported(admitted.policy.protocol.as_str()).to_string());
            admitted.audit(shared);
            refuse::reset(stream);
            return;
        };
        let session = Session::new(admitted.started);
        // A refused or denied connection keeps its workload's slot until it is answered.
        match admitted.verdict {
            Verdict::Admit => {}
            Verdict::Refuse(why) => {
                admitted.audit(shared);
                connector.refuse(stream, &admitted.policy, why).await;
                return;
            }
            Verdict::Deny => admitted.audit(shared),
            // No connector: a plain relay to the destination, without credentials.
            // Boxed: the bypass relay's states are large, and every connection's task would
            // otherwise be sized for them (6.7 KiB, 3.7 KiB without).
            Verdict::Bypass => {
                return Box::pin(super::bypass::relay(stream, admitted, shared)).await;
            }
        }
        let cx = Context {
            origin: &admitted.origin,
            policy: &admitted.policy,
            env: &shared.env,
            session: &session,
        };
        if admitted.verdict == Verdict::Deny {
            connector.deny(stream, cx).await;
            return;
        }
        let policy = &admitted.policy;
        // Unless the connector keeps the deadline itself, a second descriptor of the application's
        // socket is held until the handshake is done, so a timed-out handshake can still be
        // answered after the connector is dropped.
        let bounded = crate::connector::registry::supports(policy.protocol)
            .is_some_and(|s| s.bounds_handshake);
        let app_fd = if bounded {
            None
        } else {
            stream.as_fd().try_clone_to_owned().ok()
        };
        metrics.active.inc();
        tracing::debug!("brokering");
        let (deadline, timeout) = admitted.handshake_deadline(shared);
        let watchdog = async {
            let done = if bounded {
                session.handshake().await;
                Ok(())
            } else {
                // Boxed: the timer takes room only until the handshake is done, not in every
                // connection's task for its whole life.
                Box::pin(tokio::time::timeout_at(deadline, session.handshake())).await
            };
            match done {
                Ok(()) => {
                    drop(app_fd);
                    if let Some(took) = session.handshake_took() {
                        metrics
                            .handshake_seconds
                            .get_or_create(&crate::metrics::PolicyLabels {
                                policy: policy.name.clone(),
                            })
                            .observe(took.as_secs_f64());
                    }
                    std::future::pending().await
                }
                Err(_) => app_fd,
            }
        };
        // The watchdog is polled first: the connector's own target bound has the same length but
        // started later, so when both are due in one timer tick the whole-handshake verdict wins.
        let result = tokio::select! {
            biased;
            app = watchdog => {
                if let Some(app) = app.and_then(|fd| from_fd(fd).ok()) {
                    connector.abort(app, cx, Refusal::HandshakeTimeout(timeout)).await;
                }
                Err(ConnectError::HandshakeTimeout(timeout))
            }
            r = connector.serve(stream, cx) => r,
        };
        metrics.active.dec();
        let progress = &session.progress;
        let to_target = progress.to_target.load(Ordering::Relaxed);
        let to_app = progress.to_app.load(Ordering::Relaxed);
        metrics.add_bytes(Direction::to_target, to_target);
        metrics.add_bytes(Direction::to_app, to_app);
        let record = &mut admitted.record;
        record.bytes_to_target = to_target;
        record.bytes_to_app = to_app;
        record.fast_path = progress.handed_over.load(Ordering::Relaxed);
        if record.fast_path {
            metrics.fast_path.inc();
        }
        record.handshake_ms = session.handshake_took().map(ms);
        record.duration_ms = ms(admitted.started.elapsed());
        if let Some(parked) = session.take_parked() {
            // An upgrade parked the relay: the next agent carries it on and writes its record.
            let mut state = super::resume::state(
                admitted.id,
                &policy.name,
                admitted.origin.cgroup_id,
                admitted.started,
                record,
            );
            state.cancel = parked.cancel;
            let (app, target) = (parked.app, parked.target);
            tracing::info!(to_target, to_app, "parked for the next agent");
            shared
                .env
                .parking
                .submit(crate::upgrade::relays::Parked { state, app, target });
            return;
        }
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
                    ms = admitted.started.elapsed().as_millis() as u64,
                    "closed"
                );
            }
            Err(err) => {
                let outcome = match err {
                    ConnectError::HandshakeTimeout(_) => Outcome::timed_out,
                    _ => Outcome::failed,
                };
                metrics.connection(&policy.name, outcome);
                crate::warn_throttled!(%err, to_target, to_app, "failed");
                record.outcome = audit::Outcome::Failed;
                record.reason = Some(err.to_string());
            }
        }
        shared.audit.record(record);
    }
}

/// Whether the peer reset the connection before it was accepted (the socket's pending error is
/// ECONNRESET). Its kernel record went with it (sock_ops deletes the record of a reset
/// socket), so it would otherwise look like a connection nobody redirected.
fn was_reset(stream: &TcpStream) -> bool {
    matches!(stream.take_error(), Ok(Some(e)) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// A tokio stream over a duplicate of the application's socket.
fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}
