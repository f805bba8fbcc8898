//! `protocol: mysql` — MySQL and MariaDB. latch is the server toward the application and the
//! client toward the real server. It connects to the server first and greets the application
//! with the server's own version, connection id and capabilities (so `CONNECTION_ID()` and
//! `KILL <id>` agree with what the application was told; CLIENT_SSL when the policy offers
//! TLS, [`Policy::ssl_answer`], terminated with a node-CA certificate), reads the application's
//! HandshakeResponse41 and drops its authentication data unread, authenticates to the server
//! with the policy's credentials, tells the application the server's OK, then relays,
//! performing a COM_CHANGE_USER itself with the policy's credentials for the requested user
//! (the application's own authentication data is dropped there too). The application never
//! holds, sends or sees a password.
//!
//! | file | holds |
//! |---|---|
//! | `mysql.rs` | the [`Mysql`] connector: the session, retry after rotation, relay |
//! | [`target`] | connect, greeting, TLS negotiation and authentication to the server |
//! | [`failure`] | failures and the ERR packet each becomes |
//! | [`refusal`] | latch's limits and denials as ERR packets |
//! | [`io`] | reading whole packets during the handshake |
//! | [`commands`] | the relay, watching for COM_CHANGE_USER |
//! | [`compressed`] | a leg in the compressed protocol (CLIENT_COMPRESS), as a packet stream |
//! | [`change_user`] | COM_CHANGE_USER: re-authentication with the policy's credentials |
//! | [`direct`] | direct mode: authentication on the application's own connection |
//! | [`pool`] | sessions kept after COM_QUIT for the workload's next connection |
//!
//! The wire protocol itself is the `latch-mysql` crate (sans-IO).
pub mod change_user;
pub mod commands;
pub mod compressed;
pub mod direct;
pub mod failure;
pub mod io;
pub mod pool;
pub mod refusal;
pub mod target;

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use latch_mysql::{
    CapabilityFlags, ClientHello, Greeting, HandshakeResponse, Packet,
    constants::MYSQL_NATIVE_PASSWORD, greeting::random_scramble,
};
use rustls::ServerConfig;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, time::Instant};

pub use failure::Failure;

use self::{
    io::{ReadError, read_one_packet},
    refusal::AppLeg,
    target::{Established, TargetCx},
};
use super::{
    Answered, ConnectError, Connector, Context, Env, Refusal, Served, Support,
    app_tls::{self, AcceptError, AppTls},
    kept,
    stream::{AppStream, TargetStream},
    target_tls::ClientConfigs,
};
use crate::{
    config::{Policy, Protocol, Role, SslAnswer},
    relay::Transferred,
};

pub const SUPPORT: Support = Support {
    credentials: true,
    target_tls: true,
    negotiates_tls: true,
    app_tls: true,
    direct: true,
    // The application's commands are watched (COM_CHANGE_USER, which latch performs itself), so
    // the kernel cannot carry them.
    fast_path: false,
    bounds_handshake: false,
};

/// The MySQL connector and the state its sessions share.
#[derive(Default)]
pub struct Mysql {
    /// TLS client configurations per policy (each with its session cache).
    pub tls: ClientConfigs,
    /// Direct mode: the accounts' plugins, as servers named them.
    pub plugins: direct::Plugins,
    /// Sessions kept for the next connection ([`pool`]).
    pub pool: pool::Pool,
}

/// How long an application may take to send its handshake response.
pub const APP_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Connector for Mysql {
    fn protocol(&self) -> Protocol {
        Protocol::Mysql
    }

    fn serve<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Served<'a> {
        Box::pin(self.serve_app(app, cx))
    }

    fn deny<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Answered<'a> {
        // As a server answers a host it does not let in: an ERR in place of the greeting. The
        // target is never contacted and nothing is resolved.
        let err = Failure::Denied
            .to_app(&cx.policy.name, cx.origin.conn)
            .expect("a denial is told");
        Box::pin(async move { refusal::tell(app, &err, AppLeg::default()).await })
    }

    fn refuse<'a>(&'a self, app: TcpStream, policy: &'a Policy, why: Refusal) -> Answered<'a> {
        Box::pin(refusal::before_greeting(app, policy, why))
    }

    fn abort<'a>(&'a self, app: TcpStream, cx: Context<'a>, why: Refusal) -> Answered<'a> {
        let leg = AppLeg::from_stage(cx.session.stage());
        Box::pin(refusal::abort(app, cx.policy, why, leg))
    }

    fn close_idle(&self, changed: &dyn Fn(&str) -> bool) {
        // Each says COM_QUIT as it goes.
        self.pool.clear_policies(changed);
    }

    fn kept(&self) -> Option<usize> {
        Some(self.pool.len())
    }
}

/// The application's leg during the handshake.
struct App<'s> {
    /// `None` once a TLS handshake with it failed (nothing more can be told).
    stream: Option<AppStream>,
    leg: AppLeg,
    /// Where the leg is noted for an abort.
    session: &'s super::Session,
}

impl App<'_> {
    fn io(&mut self) -> Result<&mut AppStream, Failure> {
        self.stream.as_mut().ok_or(Failure::AppClosed)
    }

    fn advance(&mut self, leg: AppLeg) {
        self.leg = leg;
        self.session.set_stage(leg.stage());
    }
}

impl Mysql {
    async fn serve_app(
        &self,
        tcp: TcpStream,
        cx: Context<'_>,
    ) -> Result<Transferred, ConnectError> {
        let mut app = App {
            stream: Some(AppStream::Plain(tcp)),
            leg: AppLeg::default(),
            session: cx.session,
        };
        let result = handshake(self, &mut app, cx).await;
        let Ready {
            target,
            early,
            session,
            app_caps,
            keep,
            compressed,
        } = match result {
            Ok(Some(ready)) => ready,
            Ok(None) => return Ok(Transferred::default()),
            Err((failure, raw)) => return Err(refuse(app, cx, failure, raw).await),
        };
        let progress = cx.progress();
        let Some(stream) = app.stream.take() else {
            return Ok(Transferred::default());
        };
        let host = host_name(&stream);
        let reauth = change_user::Reauth::new(
            cx.policy,
            cx.env,
            cx.origin.dst,
            cx.origin.conn,
            host,
            app_caps,
            session,
        );
        let result = match compressed {
            None => commands::relay(stream, target, early, reauth, progress).await,
            Some(target_early) => {
                commands::relay_compressed(stream, target, early, target_early, reauth, progress)
                    .await
            }
        };
        // The session ran; a reset from either side ends it and is not a broker failure.
        let relayed = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "relay ended by an error");
                return Ok(Transferred {
                    to_target: progress.to_target.load(Ordering::Relaxed),
                    to_app: progress.to_app.load(Ordering::Relaxed),
                });
            }
        };
        let mut transferred = relayed.transferred;
        match (relayed.quit, keep) {
            (Some((stream, session)), Some(k)) => {
                let warm = pool::Warm {
                    stream,
                    ok: k.ok,
                    session,
                    fit: k.fit,
                };
                pool::give_back(&self.pool, k.key, warm).await;
            }
            (Some((mut stream, _)), None) => {
                // The application's COM_QUIT, held back in case the session could be kept.
                if stream.write_all(&pool::QUIT).await.is_ok() && stream.flush().await.is_ok() {
                    let n = pool::QUIT.len() as u64;
                    progress.to_target.fetch_add(n, Ordering::Relaxed);
                    transferred.to_target += n;
                }
            }
            (None, _) => {}
        }
        Ok(transferred)
    }
}

type SessionError = (Failure, Option<bytes::Bytes>);

/// Tells the application why (`raw`: the server's own packet, else the failure's ERR), closes.
async fn refuse(
    mut app: App<'_>,
    cx: Context<'_>,
    failure: Failure,
    raw: Option<bytes::Bytes>,
) -> ConnectError {
    let out = match raw {
        Some(raw) => Some(BytesMut::from(&raw[..])),
        None => failure.to_app(&cx.policy.name, cx.origin.conn).map(|err| {
            let mut out = BytesMut::new();
            failure::encode(&err, app.leg.seq, app.leg.caps, &mut out);
            out
        }),
    };
    if let Some(stream) = app.stream.as_mut() {
        crate::connector::refuse::tell_and_close(stream, out.as_deref()).await;
    }
    ConnectError::Protocol {
        protocol: "mysql",
        source: Box::new(failure),
    }
}

/// A session ready to relay.
struct Ready {
    target: TargetStream,
    /// Bytes the application sent after its response (to go to the server first).
    early: BytesMut,
    /// What a COM_CHANGE_USER needs.
    session: target::SessionAuth,
    app_caps: CapabilityFlags,
    /// What keeping the session after the application's COM_QUIT needs (`None`: not kept).
    keep: Option<Keepable>,
    /// Both legs speak the compressed protocol from here on, and these bytes came from the
    /// server after its OK (frames, to be read through the server's leg).
    compressed: Option<BytesMut>,
}

/// A session's place in the pool and what its next application is told.
struct Keepable {
    key: kept::Key,
    ok: bytes::Bytes,
    fit: pool::Fit,
}

/// The handshake on both legs, up to the server's OK told to the application.
/// `None`: the application left before the session started.
async fn handshake(
    my: &Mysql,
    app: &mut App<'_>,
    cx: Context<'_>,
) -> Result<Option<Ready>, SessionError> {
    let (origin, policy, env) = (cx.origin, cx.policy, cx.env);
    let to = TargetCx {
        origin,
        policy,
        env,
        mysql: my,
    };
    // A session kept for this workload and target, else a new connection.
    let key = match policy.keep_sessions {
        true => kept::Key::of(&cx, origin.dst)
            .await
            .map(|k| k.by_executable(origin)),
        false => None,
    };
    let mut kept = match &key {
        Some(k) => pool::take(&my.pool, k).await,
        None => None,
    };
    let mut greeted = None;
    let server = match &kept {
        Some(k) => k.warm().session.greeting.clone(),
        None => {
            let g = target::connect(&to).await?;
            let server = g.greeting.clone();
            greeted = Some(g);
            server
        }
    };

    // The application's greeting: the server's version, connection id and capabilities, a
    // scramble of latch's own whose answer is never checked.
    let scramble = random_scramble().map_err(|e| {
        let source = std::io::Error::other(e.to_string());
        (
            Failure::TargetIo {
                addr: origin.dst,
                source,
            },
            None,
        )
    })?;
    // TLS toward the application when the policy offers it (`appTls`, the same rule as
    // PostgreSQL's); a CA that cannot give a certificate is told, never a silent plain text.
    let tls = match app_tls(policy, env, origin.dst.ip()) {
        Some(t) => Some(
            t.server_config()
                .map_err(|e| (Failure::AppCertificate(e), None))?,
        ),
        None => None,
    };
    let mut greeting = Greeting::for_app(&server, scramble, tls.is_some());
    if kept.is_some() {
        // A kept session is never compressed: offered no compression, the application fits
        // it (and is told the connection id it will have).
        greeting
            .capabilities
            .remove(CapabilityFlags::CLIENT_COMPRESS);
    }
    let mut out = BytesMut::new();
    let mut payload = BytesMut::new();
    greeting
        .encode(&mut payload)
        .map_err(|e| (Failure::AppIo(std::io::Error::other(e.to_string())), None))?;
    target::packet(&payload, 0, &mut out);
    app.io()
        .map_err(|f| (f, None))?
        .write_all(&out)
        .await
        .map_err(|e| (Failure::AppIo(e), None))?;
    // From here on an ERR carries its SQLSTATE unless the client says it predates protocol
    // 4.1 (MariaDB's rule: it assumes 4.1 until the response says otherwise).
    app.advance(AppLeg {
        seq: 1,
        caps: Some(CapabilityFlags::CLIENT_PROTOCOL_41),
    });

    let mut inbuf = BytesMut::with_capacity(1024);
    let response = read_response(app, &mut inbuf, tls, scramble)
        .await
        .map_err(|f| (f, None))?;
    let caps = Some(response.capabilities);
    app.advance(AppLeg {
        seq: app.leg.seq,
        caps,
    });

    let role = select_role(&response, policy, app).map_err(|f| (f, None))?;
    let mut creds = env
        .secrets
        .credentials_for(policy, role)
        .await
        .map_err(|e| (Failure::Secrets(e), None))?;
    if let Some(k) = kept.take() {
        let fits = pool::Fit::of(&response, &creds).as_ref() == Some(&k.warm().fit);
        // The server's replies to the session's reset, read now: they came while the
        // application answered its greeting.
        match k.confirm().await {
            Ok(w) if fits => {
                drop(creds);
                tracing::debug!(connection_id = server.connection_id, "kept session reused");
                let keep = key.map(|key| Keepable {
                    key,
                    ok: w.ok.clone(),
                    fit: w.fit,
                });
                return tell_ok(
                    app,
                    cx,
                    w.stream,
                    &w.ok,
                    BytesMut::new(),
                    inbuf,
                    w.session,
                    &response,
                    keep,
                )
                .await;
            }
            Ok(w) => {
                // The kept session stays kept, for connections it fits. The application was
                // greeted with its connection id; the new session has its own (as after a
                // retry below).
                tracing::debug!(
                    greeted = server.connection_id,
                    "the kept session does not fit this connection (another user, database, \
                     character set or client options); opening a new one, whose connection id \
                     differs from the greeting's"
                );
                if let Some(k) = &key {
                    pool::keep_confirmed(&my.pool, k.clone(), w);
                }
            }
            // Ended or unfit between the greeting and now (a KILL in that moment, a reset the
            // server refused): a new session, whose connection id differs from the greeting's.
            Err(_) => tracing::debug!(
                greeted = server.connection_id,
                "the kept session ended while its next application was greeted; opening a new one"
            ),
        }
    }
    let mut greeted = match greeted {
        Some(g) => g,
        None => target::connect(&to).await?,
    };
    let mut retried = false;
    let established = loop {
        let user = match &creds.username {
            Some(u) => u.expose().as_bytes().to_vec(),
            None => response.username.clone(),
        };
        let password = creds
            .password
            .as_ref()
            .map(|p| p.expose().as_bytes())
            .unwrap_or_default();
        match target::authenticate(&to, greeted, &response, &user, password).await {
            Ok(e) => break e,
            Err(f) if f.is_auth_rejection() && !retried => {
                retried = true;
                // Retried on a new connection.
                match env
                    .secrets
                    .fresh_after_rejection(policy, role, &creds)
                    .await
                {
                    Some(fresh) => creds = fresh,
                    None => return Err((f, None)),
                }
                // The application was greeted with the first connection's id; the new one has
                // its own (CONNECTION_ID() tells the truth, a client's cached id does not).
                greeted = target::connect(&to).await?;
                if greeted.greeting.connection_id != server.connection_id {
                    tracing::debug!("the retried connection has another connection id");
                }
            }
            Err(f) => return Err((f, None)),
        }
    };
    // Of the credentials the login used (refreshed ones after a retry).
    let fit = pool::Fit::of(&response, &creds);
    drop(creds);
    let Established {
        stream: target,
        ok,
        leftover,
        session,
    } = established;
    let keep = match (key, fit) {
        (Some(key), Some(fit)) if leftover.is_empty() => Some(Keepable {
            key,
            ok: ok.clone(),
            fit,
        }),
        _ => None,
    };
    tell_ok(
        app, cx, target, &ok, leftover, inbuf, session, &response, keep,
    )
    .await
}

/// Tells the application the server's `ok` (and any bytes the server sent after it), with the
/// sequence id it expects: the session is ready to relay.
#[allow(clippy::too_many_arguments)]
async fn tell_ok(
    app: &mut App<'_>,
    cx: Context<'_>,
    target: TargetStream,
    ok: &[u8],
    leftover: BytesMut,
    inbuf: BytesMut,
    session: target::SessionAuth,
    response: &HandshakeResponse,
    keep: Option<Keepable>,
) -> Result<Option<Ready>, SessionError> {
    // CLIENT_COMPRESS in the application's response and in the server's greeting (latch
    // offered it because the server did): both legs switch to compressed frames after the OK.
    // Such a session is not kept (the next application may not compress).
    let compress = CapabilityFlags::CLIENT_COMPRESS;
    let compressed = response.capabilities.contains(compress)
        && session.greeting.capabilities.contains(compress);
    let keep = keep.filter(|_| !compressed);
    let mut out = BytesMut::new();
    target::packet(ok, app.leg.seq, &mut out);
    let compressed = match compressed {
        true => Some(leftover),
        false => {
            out.extend_from_slice(&leftover);
            None
        }
    };
    let written = match app.io() {
        Ok(stream) => match stream.write_all(&out).await {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        },
        Err(_) => return Ok(None),
    };
    if let Err(e) = written {
        tracing::debug!(error = %e, "application went away before the session started");
        return Ok(None);
    }
    cx.handshake_done();
    tracing::debug!(
        tls = target.is_tls(),
        app_tls = app.stream.as_ref().is_some_and(AppStream::is_tls),
        compressed = compressed.is_some(),
        connection_id = session.greeting.connection_id,
        "session ready; relaying"
    );
    cx.progress()
        .to_app
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(Some(Ready {
        target,
        early: inbuf,
        session,
        app_caps: response.capabilities,
        keep,
        compressed,
    }))
}

/// Reads the application's HandshakeResponse41 (sequence id 1). An SSLRequest (sequence id 1)
/// is answered with a TLS handshake when the greeting offered TLS (`tls`), and the response
/// then comes over TLS with sequence id 2; without the offer it is refused.
async fn read_response(
    app: &mut App<'_>,
    buf: &mut BytesMut,
    tls: Option<Arc<ServerConfig>>,
    scramble: [u8; latch_mysql::constants::SCRAMBLE_LEN],
) -> Result<HandshakeResponse, Failure> {
    let deadline = Instant::now() + APP_RESPONSE_TIMEOUT;
    let mut expect = 1;
    loop {
        // MariaDB answers a packet out of order with the sequence id it expected.
        let packet = read_app_packet(app.io()?, buf, deadline, expect).await?;
        app.leg.seq = packet.next_seq();
        let hello = ClientHello::parse(&packet.payload).map_err(|e| {
            // The SQLSTATE goes in unless the client's capabilities (its first two bytes,
            // as far as they came) say it predates protocol 4.1, as MariaDB decides.
            if let [lo, hi, ..] = packet.payload[..] {
                let caps =
                    CapabilityFlags::from_bits_truncate(u32::from(u16::from_le_bytes([lo, hi])));
                app.leg.caps = Some(caps & CapabilityFlags::CLIENT_PROTOCOL_41);
            }
            Failure::AppProtocol(e)
        })?;
        match hello {
            ClientHello::Response(r) => {
                switch_plugin(app, buf, deadline, &r, scramble).await?;
                return Ok(r);
            }
            ClientHello::SslRequest(_) => {
                let (Some(config), Some(AppStream::Plain(_))) = (tls.as_ref(), &app.stream) else {
                    return Err(Failure::AppTls);
                };
                // Only the request was read: what follows (the TLS ClientHello, sent at once)
                // is the acceptor's, and plain-text bytes injected there fail the handshake.
                let Some(AppStream::Plain(tcp)) = app.stream.take() else {
                    unreachable!("checked above");
                };
                match app_tls::accept(tcp, config.clone(), deadline).await {
                    Ok(stream) => app.stream = Some(AppStream::Tls(Box::new(stream))),
                    Err(AcceptError::Handshake(e)) => {
                        return Err(Failure::AppTlsHandshake(e.to_string()));
                    }
                    Err(AcceptError::Timeout) => {
                        return Err(Failure::AppTlsHandshake("timed out".into()));
                    }
                }
                tracing::debug!("TLS with the application established");
                expect = packet.next_seq();
            }
        }
    }
}

/// A response made for another plugin than the greeting's (a client configured for
/// `mysql_clear_password`, say) is asked to switch to mysql_native_password, with the
/// greeting's nonce again, as MariaDB asks for its account's plugin; the answer (a password
/// hash) is dropped unread like the response's. The application then sees the exchange it
/// would see directly with an account on mysql_native_password.
async fn switch_plugin(
    app: &mut App<'_>,
    buf: &mut BytesMut,
    deadline: Instant,
    response: &HandshakeResponse,
    scramble: [u8; latch_mysql::constants::SCRAMBLE_LEN],
) -> Result<(), Failure> {
    let Some(switch) = response.switch_to(MYSQL_NATIVE_PASSWORD, scramble) else {
        return Ok(());
    };
    let mut payload = BytesMut::new();
    switch
        .encode(&mut payload)
        .map_err(|e| Failure::AppIo(std::io::Error::other(e.to_string())))?;
    let mut out = BytesMut::new();
    target::packet(&payload, app.leg.seq, &mut out);
    let stream = app.io()?;
    stream.write_all(&out).await.map_err(Failure::AppIo)?;
    stream.flush().await.map_err(Failure::AppIo)?;
    let expect = app.leg.seq.wrapping_add(1);
    let answer = read_app_packet(app.io()?, buf, deadline, expect).await?;
    app.leg.seq = answer.next_seq();
    Ok(())
}

async fn read_app_packet(
    stream: &mut AppStream,
    buf: &mut BytesMut,
    deadline: Instant,
    expect: u8,
) -> Result<Packet, Failure> {
    match tokio::time::timeout_at(deadline, read_one_packet(stream, buf, expect)).await {
        Ok(Err(ReadError::OutOfOrder { got, expected })) => {
            Err(Failure::AppOutOfOrder { got, expected })
        }
        Err(_) => Err(Failure::AppTimeout(APP_RESPONSE_TIMEOUT)),
        Ok(Err(ReadError::Closed)) => Err(Failure::AppClosed),
        Ok(Err(ReadError::Io(e))) => Err(Failure::AppIo(e)),
        Ok(Err(ReadError::Frame(e))) => Err(Failure::AppIo(std::io::Error::other(e.to_string()))),
        Ok(Ok(p)) => Ok(p),
    }
}

/// The role the application's user selects when the policy has several (`None`: the policy's
/// one credential); a user no role names is refused as the server refuses an unknown user.
fn select_role<'p>(
    response: &HandshakeResponse,
    policy: &'p Policy,
    app: &App,
) -> Result<Option<&'p Role>, Failure> {
    let with_password = !response.auth_response.expose().is_empty();
    role_for(&response.username, policy, with_password, || {
        app.stream.as_ref().map(host_name).unwrap_or_default()
    })
}

/// The application's host as MariaDB names it in "Access denied for user 'u'@'host'": its
/// address, or `localhost` for a loopback one (as the server says even with
/// `--skip-name-resolve`).
fn host_name(stream: &AppStream) -> String {
    match stream.tcp().peer_addr() {
        Ok(a) if a.ip().to_canonical().is_loopback() => "localhost".to_owned(),
        Ok(a) => a.ip().to_canonical().to_string(),
        Err(_) => String::new(),
    }
}

/// The role `user` selects (at connect and for COM_CHANGE_USER); `host` names the application
/// in the refusal, `with_password` whether it sent authentication data.
fn role_for<'p>(
    user: &[u8],
    policy: &'p Policy,
    with_password: bool,
    host: impl FnOnce() -> String,
) -> Result<Option<&'p Role>, Failure> {
    if policy.roles.is_empty() {
        return Ok(None);
    }
    let user = String::from_utf8_lossy(user);
    match policy.roles.iter().find(|r| r.user == user) {
        Some(r) => Ok(Some(r)),
        None => {
            tracing::info!(user = %user, "no role of the policy for the requested user");
            Err(Failure::UnknownRole {
                user: user.into_owned(),
                host: host(),
                password: with_password,
            })
        }
    }
}

/// The certificate source for TLS toward the application, when `policy` offers it
/// ([`Policy::ssl_answer`]); `dst` is where the application connected.
fn app_tls<'a>(policy: &'a Policy, env: &'a Env, dst: IpAddr) -> Option<AppTls<'a>> {
    (policy.ssl_answer() == SslAnswer::Tls).then(|| AppTls::new(&env.app_ca, policy, dst))
}
