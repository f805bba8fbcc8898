//! `protocol: tcp` — connect to the original destination and relay bytes, nothing more; or,
//! when the policy has a `tls` block (mode `require`, `verify-ca` or `verify-full`), make TLS
//! to the destination — verified with the system roots or `tls.ca`, a client certificate from
//! the store when `tls.clientCert` is given (databases, brokers and caches that authenticate by
//! client certificate) — and relay the application's plain bytes through it.
use tokio::net::TcpStream;

use super::{
    ConnectError, Connector, Context, Served, Support,
    dial::DialError,
    stream::MaybeTls,
    target_tls::{self, ClientConfigs},
};
use crate::{config::Protocol, config::TlsMode, relay};

pub const SUPPORT: Support = Support {
    credentials: false,
    target_tls: true,
    negotiates_tls: false,
    app_tls: false,
    direct: false,
    fast_path: true,
    bounds_handshake: true,
};

/// The plain relay, or TLS origination. Refusals are resets: there is no protocol to say
/// them in.
#[derive(Default)]
pub struct Tcp {
    tls: ClientConfigs,
}

impl Connector for Tcp {
    fn protocol(&self) -> Protocol {
        Protocol::Tcp
    }

    fn serve<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Served<'a> {
        Box::pin(async move {
            // The handshake deadline is kept here (SUPPORT.bounds_handshake): it bounds the
            // connect, and an expired one is answered with a reset.
            let deadline = cx.session.deadline(cx.env.handshake_timeout);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let target = match cx.env.dial_within(cx.origin, left).await {
                Ok(target) => target,
                Err(DialError::Timeout { .. }) if tokio::time::Instant::now() >= deadline => {
                    return Err(timed_out(app, cx));
                }
                Err(err) => return Err(err.into()),
            };
            if cx.policy.tls.mode == TlsMode::Disable {
                cx.handshake_done();
                let handover = cx.env.handover(cx.origin, || Some(0));
                // A plain relay takes part in upgrades: parked, its sockets go to the next
                // agent, which carries it on.
                let parking = Some(&*cx.env.parking);
                let done = relay::splice_parkable(
                    &app,
                    &target,
                    cx.progress(),
                    handover,
                    parking,
                    relay::Ends::EachWay,
                )
                .await
                .map_err(ConnectError::Relay)?;
                return match done {
                    Some(t) => Ok(t),
                    None => {
                        if let Err(err) = cx.session.park(app, target, None) {
                            cx.env.parking.lost();
                            return Err(ConnectError::Relay(err));
                        }
                        Ok(relay::Transferred::default())
                    }
                };
            }
            // Boxed: a plain relay's task stays small while idle (the TLS states are larger).
            Box::pin(self.serve_tls(app, target, deadline, cx)).await
        })
    }
}

/// The handshake deadline passed: the application gets a reset (there is no protocol to say
/// it in).
fn timed_out(app: TcpStream, cx: Context<'_>) -> ConnectError {
    super::refuse::reset(app);
    ConnectError::HandshakeTimeout(cx.env.handshake_timeout)
}

impl Tcp {
    /// TLS to the target as the policy says, then the relay through it.
    async fn serve_tls(
        &self,
        app: TcpStream,
        target: TcpStream,
        deadline: tokio::time::Instant,
        cx: Context<'_>,
    ) -> Result<relay::Transferred, ConnectError> {
        let handshake = target_tls::connect(target, cx.origin.dst, cx.policy, cx.env, &self.tls);
        let tls = match tokio::time::timeout_at(deadline, handshake).await {
            Err(_) => return Err(timed_out(app, cx)),
            Ok(Err(e)) => {
                super::refuse::reset(app);
                return Err(ConnectError::Protocol {
                    protocol: "tcp",
                    source: Box::new(e),
                });
            }
            Ok(Ok((tls, _))) => tls,
        };
        tracing::debug!("TLS to the target established");
        cx.handshake_done();
        let mut target = MaybeTls::Tls(Box::new(tls));
        relay::streams(
            MaybeTls::Plain(app),
            &mut target,
            &[],
            cx.progress(),
            |_| None,
            relay::Ends::EachWay,
        )
        .await
        .map_err(ConnectError::Relay)
    }
}
