//! Direct mode (`spec.direct: true`; protocol in `latch_common::direct`): the application's
//! own connection goes to the server. latch answers its startup, authenticates on that
//! connection with the policy's credentials, and then leaves it to the kernel, so the session
//! costs what a direct connection costs.
//!
//! The hand-over needs a moment when nothing can be queued in the application socket's sockmap
//! state: latch withholds the server's ReadyForQuery, so the application (which waits for it)
//! sends nothing; once it has read AuthenticationOk, its ParameterStatus and BackendKeyData,
//! latch takes the socket out of the sock map and sends a Sync, which the server answers with
//! a ReadyForQuery of its own, straight to the application.
use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use latch_common::direct::{FROM_TARGET, TO_BROKER};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    sync::mpsc,
    time::Instant,
};

use super::{APP_STARTUP_TIMEOUT, failure::Failure, target};
use crate::connector::Refusal;
use crate::{
    broker::{Origin, Shared, direct::Direct},
    config::Policy,
};
use latch_pg::{
    self as pg,
    auth::{ClientAuth, TargetTls},
    encode,
    pre_startup::{Ending, PreStartup, Reason, Step},
    startup::{self, Initial},
};

/// One application socket in direct mode, as the broker holds it.
pub struct Leg<'a> {
    pub direct: &'a Direct,
    /// Cookie of the application's socket.
    pub cookie: u64,
    /// Its 4-tuple, as the kernel keys it.
    pub key: latch_common::TupleKey,
    /// The process that opened it (its descriptor is borrowed from there).
    pub pid: u32,
    /// The thread that opened it.
    pub tid: u32,
    /// What the application sent, message by message, from the lobby.
    pub from_app: mpsc::UnboundedReceiver<Bytes>,
    /// The broker's socket for it: reads what the server sent, writes into the application's
    /// receive queue.
    pub side: TcpStream,
    /// The agent's main runtime. A session runs on a runtime of its own (see
    /// `broker::direct::lobby`); the secret stores' pooled connections live on the main one.
    pub main: tokio::runtime::Handle,
    pub shared: Arc<Shared>,
    /// When the startup must be done (`--handshake-timeout` after admission began), as for
    /// relayed connections.
    pub deadline: tokio::time::Instant,
    /// Set by the hand-over: the kernel tells when the application's socket closes.
    pub watched: bool,
}

/// How a direct-mode connection ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Authenticated and left to the kernel.
    HandedOver,
    /// A cancel request was passed on to the server.
    Cancel,
}

/// Serves the startup of one direct-mode connection. `refusal` (the workload is not admitted,
/// or over its limit) is told to the application once it has sent its StartupMessage.
pub async fn serve(
    leg: &mut Leg<'_>,
    origin: &Origin,
    policy: &Policy,
    refusal: Option<Failure>,
) -> Result<Ended, Failure> {
    let shared = leg.shared.clone();
    let startup = match read_startup(leg).await? {
        Initial::Startup(s) => s,
        Initial::Cancel { pid, secret } => {
            // The application holds the server's own key: pass the request on as it is, on
            // the application's connection (the server closes it after reading, which is what
            // libpq waits for), or on one of latch's own when the application has closed it
            // already (tokio-postgres does not wait).
            let app = leg.app_socket();
            leg.leave().map_err(Failure::HandOver)?;
            let mut out = BytesMut::new();
            startup::encode_cancel(pid, secret, &mut out);
            if let Ok(app) = app
                && send(&app, &out).is_ok()
            {
                return Ok(Ended::Cancel);
            }
            super::send_cancel(
                origin.dst,
                origin.netns.as_deref(),
                pid,
                secret,
                &shared.env,
            )
            .await
            .map_err(Failure::Dial)?;
            return Ok(Ended::Cancel);
        }
        _ => unreachable!("read_startup answers SSL and GSS requests itself"),
    };
    if let Some(f) = refusal {
        return Err(f);
    }
    let client = latch_pg::startup_rules::Client {
        host: leg.app_host().map_err(Failure::HandOver)?,
        tls: false,
    };
    let role = super::select_role(&startup, policy, client).map_err(Failure::Startup)?;
    let creds = leg.credentials(policy, role, false).await?;
    let rewritten = startup::rewrite(&startup, creds.username.as_ref().map(|u| u.expose()))
        .map_err(Failure::Refused)?;
    let user = rewritten.params[0].1.clone();
    let addr = origin.dst;
    // The application waits for the answer to its StartupMessage: what is sent on its socket
    // from now on is latch's.
    leg.set(FROM_TARGET).map_err(Failure::HandOver)?;
    let app = leg.app_socket().map_err(Failure::HandOver)?;
    let mut out = BytesMut::new();
    startup::encode_startup(
        rewritten
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
        &mut out,
    );
    send(&app, &out).map_err(|source| Failure::TargetIo { addr, source })?;
    // The application's own connection carries this exchange and reads what latch sends: a
    // method that shows the password is never used here, whatever the policy says.
    let allowed = latch_pg::auth::Allowed {
        md5: false,
        cleartext: false,
        ..target::allowed(policy, &TargetTls::Plain)
    };
    let auth = ClientAuth::new(
        &user,
        creds.password.as_ref().map(|p| p.expose()),
        TargetTls::Plain,
    )
    .allowing(allowed)
    .with_key_cache(leg.pg().scram_keys.clone(), format!("{addr}/{user}"));
    let mut stream = Split {
        read: &mut leg.side,
        write: &app,
    };
    let deadline = leg.deadline;
    let done = tokio::time::timeout_at(deadline, target::authenticate(&mut stream, addr, auth))
        .await
        .map_err(|_| Failure::Limit(Refusal::HandshakeTimeout(shared.env.handshake_timeout)))?;
    let done = match done {
        Ok(d) => d,
        // An ErrorResponse went to the application (see latch_dir_skb) and the server closed
        // the connection: most likely the credentials were refused. This connection cannot be
        // retried; the next one gets fresh credentials.
        Err(Failure::TargetClosed { addr }) => {
            let _ = leg.credentials(policy, role, true).await;
            return Err(Failure::ServerEnded { addr });
        }
        Err(f) => return Err(f),
    };
    drop(creds);
    // Everything up to ReadyForQuery, which is withheld (see the module documentation).
    let mut welcome = BytesMut::with_capacity(1024);
    if rewritten.negotiate {
        encode::negotiate_protocol_version(&rewritten.unrecognized, &mut welcome);
    }
    encode::authentication_ok(&mut welcome);
    for f in done.to_app {
        if f.tag != pg::backend::READY_FOR_QUERY {
            f.encode(&mut welcome);
        }
    }
    if let Some((pid, secret)) = done.key {
        encode::backend_key_data(pid, secret, &mut welcome);
    }
    welcome.extend_from_slice(&done.leftover);
    leg.set(TO_BROKER | FROM_TARGET)
        .map_err(Failure::HandOver)?;
    leg.side.write_all(&welcome).await.map_err(Failure::AppIo)?;
    leg.hand_over(&app).await?;
    Ok(Ended::HandedOver)
}

/// Tells the application why, in its receive queue. The application socket stays in the sock
/// map (the message would be lost if it left now); it leaves when the application closes it.
pub async fn refuse(leg: &mut Leg<'_>, policy: &Policy, conn: u64, failure: &Failure) {
    if let Some(out) = failure.reply(&policy.name, conn) {
        let _ = leg.set(TO_BROKER | FROM_TARGET);
        let _ = tokio::time::timeout(Duration::from_secs(2), leg.side.write_all(&out)).await;
    }
    // The server must not wait for a startup that will not come.
    if let Ok(app) = leg.app_socket() {
        // SAFETY: plain shutdown(2) on a descriptor we own.
        unsafe { libc::shutdown(app.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// Reads the first packet from the lobby, answering SSLRequest and GSSENCRequest with 'N'
/// (the session is the application's own plain-text connection) and every other path as
/// PostgreSQL 15 does ([`pg::pre_startup`]).
async fn read_startup(leg: &mut Leg<'_>) -> Result<Initial, Failure> {
    // The application gets as long for its startup packet as a relayed one, within the
    // handshake's own deadline.
    let deadline = (Instant::now() + APP_STARTUP_TIMEOUT).min(leg.deadline);
    let mut buf = BytesMut::with_capacity(512);
    let mut pre = PreStartup::default();
    loop {
        match pre.next(&mut buf) {
            Step::Pending => match tokio::time::timeout_at(deadline, leg.from_app.recv()).await {
                Ok(Some(b)) => buf.extend_from_slice(&b),
                Ok(None) => return Err(Failure::PreStartup(pre.closed(&buf))),
                Err(_) => return Err(Failure::PreStartup(Ending::silent(Reason::Timeout))),
            },
            Step::Encryption(_) => leg.side.write_all(b"N").await.map_err(Failure::AppIo)?,
            Step::Startup(s) => return Ok(Initial::Startup(s)),
            Step::Cancel { pid, secret } => return Ok(Initial::Cancel { pid, secret }),
            Step::Close(ending) => return Err(Failure::PreStartup(ending)),
        }
    }
}

impl Leg<'_> {
    pub(crate) fn set(&self, flags: u32) -> io::Result<()> {
        self.direct
            .maps()
            .set(&self.key, self.cookie, flags)
            .map_err(io::Error::other)
    }

    /// A descriptor of the application's socket (see [`crate::broker::direct::app_socket`]).
    pub(crate) fn app_socket(&self) -> io::Result<OwnedFd> {
        crate::broker::direct::app_socket(self.pid, self.cookie)
    }

    /// The address the server sees the application's connection come from (its own end).
    pub(crate) fn app_host(&self) -> io::Result<std::net::IpAddr> {
        let app = self.app_socket()?;
        let local = socket2::SockRef::from(&app).local_addr()?;
        local
            .as_socket()
            .map(|a| a.ip().to_canonical())
            .ok_or_else(|| io::Error::other("the application's socket has no IP address"))
    }

    /// The credentials of the policy or of `role` (`fresh`: refetched), resolved on the main
    /// runtime.
    async fn credentials(
        &self,
        policy: &Policy,
        role: Option<&crate::config::Role>,
        fresh: bool,
    ) -> Result<Arc<crate::secrets::Credentials>, Failure> {
        self.resolve(policy, role, fresh)
            .await
            .map_err(Failure::HandOver)?
            .map_err(Failure::Secrets)
    }

    /// The credentials of the policy or of `role` (`fresh`: refetched), resolved on the main
    /// runtime, where the stores' connection pools live. The outer error: the main runtime
    /// dropped the task.
    pub(crate) async fn resolve(
        &self,
        policy: &Policy,
        role: Option<&crate::config::Role>,
        fresh: bool,
    ) -> io::Result<Result<Arc<crate::secrets::Credentials>, crate::secrets::SecretError>> {
        let (shared, policy) = (self.shared.clone(), policy.clone());
        let role = role.cloned();
        self.main
            .spawn(async move {
                if fresh {
                    shared.env.secrets.refresh_for(&policy, role.as_ref()).await
                } else {
                    shared
                        .env
                        .secrets
                        .credentials_for(&policy, role.as_ref())
                        .await
                }
            })
            .await
            .map_err(io::Error::other)
    }

    /// The PostgreSQL connector (its SCRAM key cache).
    fn pg(&self) -> &super::Postgres {
        self.shared
            .connectors
            .find::<super::Postgres>()
            .expect("the postgres connector is registered")
    }

    /// Takes the application's socket out of the sock map and forgets it: the programs no
    /// longer see its traffic.
    pub(crate) fn leave(&self) -> io::Result<()> {
        let maps = self.direct.maps();
        maps.remove_socket(self.cookie).map_err(io::Error::other)?;
        maps.forget(&self.key, self.cookie);
        Ok(())
    }

    /// Waits until the application has read everything injected, takes its socket out of
    /// the sock map and asks the server for the ReadyForQuery it will read next.
    async fn hand_over(&mut self, app: &OwnedFd) -> Result<(), Failure> {
        match self.step_out(app).await {
            Ok(()) => {}
            Err(StepOut::Io(e)) => return Err(Failure::HandOver(e)),
            // The application must not have sent anything since its StartupMessage: it would
            // be behind the Sync, out of order.
            Err(StepOut::AppSpoke) => {
                return Err(Failure::AppProtocol(pg::PgError::malformed(
                    "startup",
                    "the application sent messages before ReadyForQuery",
                )));
            }
        }
        let mut sync = BytesMut::new();
        pg::frame::Frame {
            tag: b'S',
            body: Bytes::new(),
        }
        .encode(&mut sync);
        send(app, &sync).map_err(Failure::HandOver)
    }

    /// The hand-over's quiet moment, for any protocol: waits until the application has read
    /// everything injected, checks that neither side said anything since (the application
    /// waits for an answer, the server for latch's next packet), then takes the socket out of
    /// the sock map and watches for its close. Whatever is sent on `app` after this reaches
    /// the server, and the server's answer the application, as on a plain connection.
    pub(crate) async fn step_out(&mut self, app: &OwnedFd) -> Result<(), StepOut> {
        let deadline = self.deadline;
        let mut pause = Duration::from_micros(50);
        loop {
            if crate::broker::direct::fionread(app).map_err(StepOut::Io)? == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(StepOut::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the application did not read latch's answers",
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        if !self.from_app.is_empty() {
            return Err(StepOut::AppSpoke);
        }
        // The server has nothing to say until it is asked; anything that arrived meanwhile
        // would be lost with the sock map state.
        if crate::broker::direct::fionread(&self.side).map_err(StepOut::Io)? > 0 {
            return Err(StepOut::Io(io::Error::other(
                "the server sent a message during the hand-over",
            )));
        }
        self.leave().map_err(StepOut::Io)?;
        // Still this workload's connection: the broker learns when it closes (see
        // `broker::direct::Direct::hold_until_closed`).
        self.watched = self.direct.maps().watch_close(self.cookie, app);
        Ok(())
    }
}

/// Why [`Leg::step_out`] did not step out.
#[derive(Debug)]
pub(crate) enum StepOut {
    Io(io::Error),
    /// The application sent something while it should have been waiting for an answer.
    AppSpoke,
}

/// Sends all of `bytes` on the application's socket without changing its file flags (they are
/// the application's): non-blocking sends, waiting briefly when the buffer is full.
pub(crate) fn send(app: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    let mut waits = 0;
    while !bytes.is_empty() {
        // SAFETY: a plain send(2) from a valid buffer.
        let n = unsafe {
            libc::send(
                app.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            bytes = &bytes[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock || waits > 1000 {
            return Err(err);
        }
        waits += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// The target leg during authentication: the server's messages arrive on the broker's side
/// socket; latch's go out on the application's socket.
struct Split<'a> {
    read: &'a mut TcpStream,
    write: &'a OwnedFd,
}

impl AsyncRead for Split<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Split<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Handshake messages are small and the socket's send buffer is empty.
        Poll::Ready(send(self.write, buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
