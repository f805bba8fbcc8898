//! `protocol: postgres` — latch is the server toward the application and the client toward
//! the real PostgreSQL server. It reads the application's startup packet (answering SSLRequest
//! with 'S' and terminating TLS when the policy's `appTls` says so, else 'N'; GSSENCRequest
//! with 'N'), authenticates to the server with the policy's credentials,
//! tells the application AuthenticationOk and the server's own cancellation key, then relays.
//! The application never holds, sends or sees a password.
//!
//! | file | holds |
//! |---|---|
//! | `postgres.rs` | the [`Postgres`] connector: the session, retry after rotation, relay |
//! | [`app`] | the application's first packet, TLS toward it (node-local CA) |
//! | [`target`] | connect, TLS negotiation, startup and authentication to the server |
//! | [`cancel`] | open sessions by namespace, destination and key, for CancelRequests |
//! | [`failure`] | failures and the ErrorResponse each becomes |
//! | [`refusal`] | latch's limits as ErrorResponses |
//! | [`direct`] | direct mode: the startup on the application's own connection |
//!
//! The wire protocol itself is the `latch-pg` crate (sans-IO).
pub mod app;
pub mod cancel;
pub mod direct;
pub mod failure;
pub mod refusal;
pub mod target;

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use bytes::BytesMut;
use latch_pg::{
    self as pg, Frame, encode,
    scram_cache::ScramKeyCache,
    startup::{self, Initial, Startup},
    startup_rules,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

pub use cancel::{CancelKey, CancelMap};
pub use failure::Failure;

use self::{
    app::{app_tls, read_startup},
    target::{Established, TargetCx},
};
use super::{
    Answered, ConnectError, Connector, Context, DialError, Env, Refusal, Served, Support,
    connect_marked, stream::AppStream, target_tls::ClientConfigs,
};
use crate::{
    config::{Policy, Protocol},
    relay::{self, Transferred},
};

pub const SUPPORT: Support = Support {
    credentials: true,
    target_tls: true,
    negotiates_tls: true,
    app_tls: true,
    direct: true,
    fast_path: true,
    bounds_handshake: false,
};

/// The PostgreSQL connector and the state its sessions share.
#[derive(Default)]
pub struct Postgres {
    /// Open relayed sessions by (namespace, destination, server's key), for cancels.
    pub cancels: CancelMap,
    /// Derived SCRAM keys: a reconnect skips PBKDF2.
    pub scram_keys: Arc<ScramKeyCache>,
    /// TLS client configurations per policy (each with its session cache).
    pub tls: ClientConfigs,
}

impl Connector for Postgres {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }

    fn serve<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Served<'a> {
        Box::pin(self.serve_app(app, cx))
    }

    fn deny<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Answered<'a> {
        Box::pin(deny(app, cx))
    }

    fn refuse<'a>(&'a self, app: TcpStream, policy: &'a Policy, why: Refusal) -> Answered<'a> {
        Box::pin(refusal::before_startup(app, policy, why))
    }

    fn abort<'a>(&'a self, app: TcpStream, cx: Context<'a>, why: Refusal) -> Answered<'a> {
        // An ErrorResponse is valid at any point of a PostgreSQL startup.
        Box::pin(refusal::tell(app, cx.policy, why))
    }
}

/// How long an application may take to send its startup packet (SSLRequest round included).
pub const APP_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a denied application gets to send its startup (to be told why in its own
/// protocol): short, so that denied connections hold little for long.
const DENY_TIMEOUT: Duration = Duration::from_secs(2);

impl Postgres {
    /// Serves one redirected PostgreSQL connection.
    async fn serve_app(
        &self,
        app: TcpStream,
        cx: Context<'_>,
    ) -> Result<Transferred, ConnectError> {
        let (origin, policy) = (cx.origin, cx.policy);
        let mut inbuf = BytesMut::with_capacity(1024);
        let tls = app_tls(policy, cx.env, origin.dst.ip());
        let first = read_startup(
            AppStream::Plain(app),
            &mut inbuf,
            tls.as_ref(),
            APP_STARTUP_TIMEOUT,
        )
        .await;
        let result = match first {
            Ok((_, Initial::Cancel { pid, secret })) => {
                forward_cancel(self, pid, secret, cx).await;
                return Ok(Transferred::default());
            }
            Ok((app, Initial::Startup(s))) => session(self, app, inbuf, s, cx)
                .await
                .map_err(|(app, f)| (Some(app), f)),
            Ok(_) => unreachable!("read_startup answers SSL and GSS requests itself"),
            Err(e) => Err(e),
        };
        match result {
            Ok(t) => Ok(t),
            Err((app, failure)) => Err(refuse(app, policy, origin.conn, failure).await),
        }
    }
}
/// Refuses a workload the policy does not admit, in PostgreSQL's own terms: the startup
/// exchange is answered (TLS as the policy says) and a FATAL 28000 explains the refusal.
/// Nothing is resolved and the target is never contacted.
async fn deny(app: TcpStream, cx: Context<'_>) {
    let (origin, policy) = (cx.origin, cx.policy);
    let mut buf = BytesMut::with_capacity(1024);
    let tls = app_tls(policy, cx.env, origin.dst.ip());
    let first = read_startup(AppStream::Plain(app), &mut buf, tls.as_ref(), DENY_TIMEOUT).await;
    match first {
        Ok((app, Initial::Startup(_))) => {
            let _ = refuse(Some(app), policy, origin.conn, Failure::Denied).await;
        }
        // Before its startup, the application hears what the server would say.
        Err((app, f @ (Failure::PreStartup(_) | Failure::AppCertificate(_)))) => {
            let _ = refuse(app, policy, origin.conn, f).await;
        }
        _ => {}
    }
}

/// Tells the application why (when it is still there), then closes.
async fn refuse(
    app: Option<AppStream>,
    policy: &Policy,
    conn: u64,
    failure: Failure,
) -> ConnectError {
    if let Some(mut app) = app {
        let reply = failure.reply(&policy.name, conn);
        crate::connector::refuse::tell_and_close(&mut app, reply.as_deref()).await;
    }
    ConnectError::Protocol {
        protocol: "postgres",
        source: Box::new(failure),
    }
}

async fn session(
    pg: &Postgres,
    mut app: AppStream,
    app_leftover: BytesMut,
    startup_msg: Startup,
    cx: Context<'_>,
) -> Result<Transferred, (AppStream, Failure)> {
    let (origin, policy, env) = (cx.origin, cx.policy, cx.env);
    let client = startup_rules::Client {
        host: app
            .tcp()
            .peer_addr()
            .map(|a| a.ip().to_canonical())
            .unwrap_or(origin.dst.ip()),
        tls: app.is_tls(),
    };
    let role = match select_role(&startup_msg, policy, client) {
        Ok(r) => r,
        Err(r) => return Err((app, Failure::Startup(r))),
    };
    let mut creds = match env.secrets.credentials_for(policy, role).await {
        Ok(c) => c,
        Err(e) => return Err((app, Failure::Secrets(e))),
    };
    let to = TargetCx {
        addr: origin.dst,
        netns: origin.netns.as_deref(),
        policy,
        env,
        pg,
    };
    let mut retried = false;
    let (established, rewritten) = loop {
        let policy_user = creds.username.as_ref().map(|u| u.expose());
        let rewritten = match startup::rewrite(&startup_msg, policy_user) {
            Ok(r) => r,
            Err(e) => return Err((app, Failure::Refused(e))),
        };
        let user = rewritten.params[0].1.clone();
        let password = creds.password.as_ref().map(|p| p.expose());
        match target::open(&to, &rewritten.params, &user, password).await {
            Ok(e) => break (e, rewritten),
            Err(f) if f.is_auth_rejection() && !retried => {
                retried = true;
                match env
                    .secrets
                    .fresh_after_rejection(policy, role, &creds)
                    .await
                {
                    Some(fresh) => creds = fresh,
                    None => return Err((app, f)),
                }
            }
            Err(f) => return Err((app, f)),
        }
    };
    drop(creds);
    let Established {
        stream: mut target,
        to_app,
        key,
        leftover: target_leftover,
    } = established;

    // The application holds the server's own key; latch only remembers which session it
    // names, to pass a CancelRequest on to the right server.
    let cancel = key.and_then(|(pid, secret)| {
        let key = CancelKey {
            netns: origin.netns_cookie,
            dst: origin.dst,
            pid,
            secret,
        };
        let guard = pg.cancels.register(key, &policy.name);
        if guard.is_none() {
            tracing::debug!("cancel map full: cancel requests for this session are ignored");
        }
        guard
    });
    let mut out = BytesMut::with_capacity(1024);
    if rewritten.negotiate {
        encode::negotiate_protocol_version(&rewritten.unrecognized, &mut out);
    }
    encode::authentication_ok(&mut out);
    let mut ready = None;
    for f in to_app {
        if f.tag == pg::backend::READY_FOR_QUERY {
            // BackendKeyData comes before ReadyForQuery.
            if let Some((pid, secret)) = key {
                encode::backend_key_data(pid, secret, &mut out);
            }
            ready = Some(f);
        } else {
            f.encode(&mut out);
        }
    }
    if let Some(f) = ready {
        f.encode(&mut out);
    }
    out.extend_from_slice(&target_leftover);
    if let Err(e) = app.write_all(&out).await {
        tracing::debug!(error = %e, "application went away before the session started");
        return Ok(Transferred::default());
    }
    cx.handshake_done();
    tracing::debug!(
        tls = target.is_tls(),
        app_tls = app.is_tls(),
        "session ready; relaying"
    );
    let early = strip_password_messages(app_leftover);
    let progress = cx.progress();
    progress
        .to_app
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    let cancel_state = key.map(|(pid, secret)| crate::upgrade::relays::CancelState {
        netns: origin.netns_cookie,
        dst: origin.dst,
        pid,
        secret,
    });
    // Plain on both legs, the session takes part in upgrades: parked, its sockets (and its
    // cancellation key) go to the next agent, which carries it on.
    let parking = Some(&*env.parking);
    let result = relay::streams_parkable(
        app,
        &mut target,
        &early,
        progress,
        |app| {
            // Everything read from the application so far was handled above (written to
            // the server or dropped), so all of it counts as taken.
            env.handover(origin, || relay::bytes_read(app))
        },
        parking,
        // The server's end is the session's: PostgreSQL closes its socket whole.
        relay::Ends::WithTarget,
    )
    .await;
    drop(cancel);
    let result = match result {
        Ok(Ok(t)) => Ok(t),
        Err(e) => Err(e),
        Ok(Err(app)) => {
            let super::stream::MaybeTls::Plain(target) = target else {
                unreachable!("only plain legs park")
            };
            if let Err(err) = cx.session.park(app, target, cancel_state) {
                env.parking.lost();
                Err(err)
            } else {
                Ok(Transferred::default())
            }
        }
    };
    // The session ran; a reset from either side ends it and is not a broker failure.
    Ok(result.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "relay ended by an error");
        Transferred {
            to_target: progress.to_target.load(Ordering::Relaxed),
            to_app: progress.to_app.load(Ordering::Relaxed),
        }
    }))
}

/// Bytes the application sent before the session started, minus any PasswordMessage (latch
/// never asked for one; nothing the application sends as a password reaches the server).
fn strip_password_messages(mut buf: BytesMut) -> BytesMut {
    let mut out = BytesMut::new();
    loop {
        // Only frames wholly buffered matter here: a length beyond what is buffered is not
        // parsed (parsing would reserve room for it, up to 2 GiB of the application's choice).
        let buffered = buf.len();
        match pg::frame::parse(&mut buf, buffered) {
            Ok(Some(Frame { tag: b'p', .. })) => {
                tracing::warn!("dropped a password message the application sent unasked");
            }
            Ok(Some(f)) => f.encode(&mut out),
            Ok(None) | Err(_) => {
                out.extend_from_slice(&buf);
                return out;
            }
        }
    }
}

/// Applies the policy's startup rules to the application's StartupMessage: the role its
/// `user` selects (`None`: the policy's one credential), or the refusal PostgreSQL would give
/// (told to the application as [`Failure::Startup`]).
/// Nothing is resolved and the server is not contacted before this passes.
pub fn select_role<'p>(
    app: &Startup,
    policy: &'p Policy,
    client: startup_rules::Client,
) -> Result<Option<&'p crate::config::Role>, startup_rules::Refusal> {
    let users: Vec<&str> = policy.roles.iter().map(|r| r.user.as_str()).collect();
    match startup_rules::check(app, &users, &policy.startup, client) {
        Ok(role) => Ok(role.map(|i| &policy.roles[i])),
        Err(r) => {
            tracing::info!(refusal = %r, "startup refused by the policy");
            Err(r)
        }
    }
}

/// Passes a CancelRequest on to the server the application sent it to, when it names a
/// session latch relays there for this namespace under this policy. Unknown keys are ignored
/// silently, as PostgreSQL does. The key is never logged.
async fn forward_cancel(pg: &Postgres, pid: i32, secret: i32, cx: Context<'_>) {
    let (origin, policy) = (cx.origin, cx.policy);
    let key = CancelKey {
        netns: origin.netns_cookie,
        dst: origin.dst,
        pid,
        secret,
    };
    let Some(session_policy) = pg.cancels.lookup(&key) else {
        tracing::info!("cancel request with an unknown key ignored");
        return;
    };
    if session_policy != policy.name {
        tracing::warn!(%session_policy, "cancel request under another policy ignored");
        return;
    }
    match send_cancel(origin.dst, origin.netns.as_deref(), pid, secret, cx.env).await {
        Ok(()) => tracing::info!(target_addr = %origin.dst, "cancel request forwarded"),
        Err(e) => tracing::warn!(error = %e, "forwarding a cancel request failed"),
    }
}

/// Sends a CancelRequest with this key to the server at `addr` on a connection of latch's own,
/// opened in `netns` (the agent's own if `None`).
pub async fn send_cancel(
    addr: std::net::SocketAddr,
    netns: Option<&crate::netns::Netns>,
    pid: i32,
    secret: i32,
    env: &Env,
) -> Result<(), DialError> {
    let mut out = BytesMut::new();
    startup::encode_cancel(pid, secret, &mut out);
    let mut s = connect_marked(addr, env.mark, env.connect_timeout, netns).await?;
    s.write_all(&out)
        .await
        .map_err(|source| DialError::Io { addr, source })?;
    // The server closes after reading it; wait briefly so the request is not cut short.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_announced_length_reserves_nothing_and_passes_through() {
        let early = BytesMut::from(&b"Q\x7f\xff\xff\xffSELECT"[..]);
        let out = strip_password_messages(early);
        assert_eq!(&out[..], b"Q\x7f\xff\xff\xffSELECT");
        assert!(
            out.capacity() < 1 << 20,
            "reserved {} bytes",
            out.capacity()
        );
    }

    #[test]
    fn password_messages_are_dropped_and_the_rest_kept_in_order() {
        let mut early = BytesMut::new();
        Frame {
            tag: b'p',
            body: bytes::Bytes::from_static(b"secret\0"),
        }
        .encode(&mut early);
        Frame {
            tag: b'Q',
            body: bytes::Bytes::from_static(b"SELECT 1\0"),
        }
        .encode(&mut early);
        let out = strip_password_messages(early);
        let mut want = BytesMut::new();
        Frame {
            tag: b'Q',
            body: bytes::Bytes::from_static(b"SELECT 1\0"),
        }
        .encode(&mut want);
        assert_eq!(out, want);
    }
}
