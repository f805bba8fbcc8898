//! `protocol: http` — HTTP/1.1 with the policy's credential put into every request. latch is
//! the server toward the application (hyper's HTTP/1.1 server on the intercepted connection)
//! and the client toward the target (hyper's client over a marked socket, TLS as the policy's
//! `tls` block says). Each request head is rewritten ([`inject`]: the application's own
//! credential dropped unless `appCredentials: keep`, latch's put in, `Host` set for the real
//! target, or an AWS SigV4 signature, [`sigv4`]); bodies, trailers and everything else stream
//! through hyper unbuffered (bounded memory whatever the size), in both directions. Keep-alive
//! and pipelined requests are answered in order on one target connection (a new one when the
//! target closed its own); `Expect: 100-continue` is answered when the body is wanted; an
//! `Upgrade` (WebSocket) request goes signed, and after the target's `101` both connections
//! are relayed as bytes.
//!
//! | file | holds |
//! |---|---|
//! | `http.rs` | the [`Http`] connector: the session, per-request forwarding, upgrades |
//! | [`inject`] | the credential into one request head (sans-IO) |
//! | [`sigv4`] | AWS SigV4 signing of a request head |
//! | [`target`] | dial, TLS and hyper's client toward the target |
//! | [`pool`] | idle target connections kept for the next application connection |
//! | [`intercept`] | HTTPS interception: the application's TLS terminated for a covered SNI |
//! | [`h2`] | HTTP/2 applications (h2c with prior knowledge, `h2` in ALPN when intercepting) |
//! | [`failure`] | latch's failures as 403/502/503/504 responses with a JSON body |
//! | [`counted`] | byte counts of the streams hyper owns |
//!
//! The application is told latch's failures as HTTP responses naming the failure class
//! ([`failure`]); malformed requests, header floods (more than [`MAX_HEADERS`] headers or
//! [`MAX_HEADER_BYTES`] of head) and heads that do not arrive within the handshake timeout
//! (slowloris) are hyper's to refuse (400, 431, close). A connection that opens with a TLS
//! ClientHello is reset and audited, unless the policy opts in to HTTPS interception
//! (`http.appTls: {mode: enable}`, [`intercept`]): then latch terminates that TLS with a
//! certificate from the node-local CA for the name asked for, if the policy covers it.
pub mod counted;
pub mod failure;
pub mod h2;
pub mod inject;
pub mod intercept;
pub mod pool;
pub mod sigv4;
pub mod target;
pub mod to_app;

use std::{
    convert::Infallible,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Either, Full, Limited};
use hyper::body::Body as _;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, upgrade::OnUpgrade};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub use failure::Failure;

use self::{counted::Counted, target::Target};
use super::{
    Answered, ConnectError, Connector, Context, Refusal, Served, Support, target_tls::ClientConfigs,
};
use crate::{
    config::{AppTlsMode, Injection, Policy, Protocol, Target as Dest, TlsMode},
    relay::Transferred,
    secrets::Credentials,
};

pub const SUPPORT: Support = Support {
    credentials: true,
    target_tls: true,
    negotiates_tls: false,
    // Opt-in HTTPS interception (`http.appTls: {mode: enable}`).
    app_tls: true,
    direct: false,
    // Every request head is rewritten: the bytes stay in user space.
    fast_path: false,
    bounds_handshake: false,
};

/// The most header fields a request (or a response) may carry (more: 431). It is hyper's
/// default, left unset: set, hyper builds its array of header slots anew for each head it
/// reads (about 1% of latch's CPU on keep-alive requests).
pub const MAX_HEADERS: usize = 100;
/// The most bytes a request line and headers may take (more: 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The largest body latch hashes for a signed SigV4 payload (more: 413; S3 signs
/// `UNSIGNED-PAYLOAD` and streams).
pub const MAX_SIGNED_BODY: usize = 8 << 20;
/// How long a refused application has to send its request head before it is closed.
const REFUSAL_READ: Duration = Duration::from_secs(10);

/// A request body toward the target: the application's, streamed, or one latch read whole to
/// sign it.
pub type ReqBody = Either<Incoming, Full<Bytes>>;
type ResBody = Either<to_app::ToApp, Full<Bytes>>;

/// The HTTP connector and what its sessions share: the TLS client configurations and the idle
/// HTTP/1.1 target connections ([`pool`]).
#[derive(Default)]
pub struct Http {
    pub tls: ClientConfigs,
    pub pool: pool::Pool,
}

impl Connector for Http {
    fn protocol(&self) -> Protocol {
        Protocol::Http
    }

    fn serve<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Served<'a> {
        Box::pin(self.serve_app(app, cx))
    }

    fn deny<'a>(&'a self, app: TcpStream, cx: Context<'a>) -> Answered<'a> {
        Box::pin(answer_all(app, Failure::Denied, cx.env.handshake_timeout))
    }

    fn close_idle(&self, changed: &dyn Fn(&str) -> bool) {
        self.pool.clear_policies(changed);
    }

    fn kept(&self) -> Option<usize> {
        Some(self.pool.len())
    }

    fn refuse<'a>(&'a self, app: TcpStream, policy: &'a Policy, why: Refusal) -> Answered<'a> {
        let _ = policy;
        Box::pin(answer_all(app, Failure::Refused(why), REFUSAL_READ))
    }

    fn abort<'a>(&'a self, app: TcpStream, cx: Context<'a>, why: Refusal) -> Answered<'a> {
        // Before the handshake is done no response has gone to the application: it waits for
        // the answer to its first request.
        Box::pin(async move {
            let mut app = app;
            // An HTTP/2 application is told in its own framing (GOAWAY); hyper's SETTINGS
            // went before.
            let raw = if cx.session.stage() == h2::STAGE {
                h2::GOAWAY_TIMEOUT.to_vec()
            } else {
                Failure::Refused(why).raw()
            };
            super::refuse::tell_and_close(&mut app, Some(&raw)).await;
        })
    }
}

/// Why a session was not served at all (audited; nothing is told).
#[derive(Debug, thiserror::Error)]
enum NotServed {
    #[error(
        "the application speaks TLS to an http policy that does not intercept HTTPS; let the \
         application speak plain HTTP to the destination (latch makes the TLS), or opt in \
         with http.appTls: {{mode: enable}}"
    )]
    AppTls,
}

/// One application connection.
struct Session<'a> {
    http: &'a Http,
    cx: Context<'a>,
    /// The target connection and the credentials resolved for it.
    target: tokio::sync::Mutex<Option<Held>>,
    /// The key of this session's target connections in the pool, once worked out (`None`
    /// inside: not pooled).
    pool_key: tokio::sync::OnceCell<Option<pool::Key>>,
    /// An upgrade agreed by the target: both sides' pending upgraded streams.
    upgrade: Mutex<Option<(OnUpgrade, Option<target::Upgraded>)>>,
    /// The first failure latch told the application (for the audit record).
    failure: Mutex<Option<Failure>>,
    to_app: Arc<AtomicU64>,
    to_target: Arc<AtomicU64>,
    /// The `Host` to send, when it must change.
    host: Option<HeaderValue>,
    /// Set until an upgrade: hyper's shutdown of the application's stream is held (see
    /// [`Counted`]).
    hold_shutdown: Arc<AtomicBool>,
}

/// The server side as latch runs it: hyper's HTTP/1.1 with header limits ([`MAX_HEADERS`] is
/// hyper's own), the header read timeout (slowloris), header case kept, no `Date` added.
fn server(header_timeout: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .preserve_header_case(true)
        .title_case_headers(false)
        .auto_date_header(false)
        .max_header_size(MAX_HEADER_BYTES)
        .half_close(true)
        .pipeline_flush(true);
    b
}

impl Http {
    async fn serve_app(
        &self,
        app: TcpStream,
        cx: Context<'_>,
    ) -> Result<Transferred, ConnectError> {
        // The TLS and HTTP/2 sessions are boxed: a plain HTTP/1.1 connection's future (held
        // for as long as it is kept alive) is not sized for their states.
        match h2::opening(&app, cx.env.handshake_timeout).await {
            h2::Opening::Tls => return Box::pin(self.serve_tls(app, cx)).await,
            h2::Opening::H2 => return Box::pin(h2::serve(self, app, cx)).await,
            h2::Opening::Http1 => {}
        }
        // A second descriptor of the application's socket, to answer a request head hyper
        // could not parse (hyper closes without a word).
        let app_fd = app.as_fd().try_clone_to_owned().ok();
        self.serve_stream(app, app_fd, cx).await
    }

    /// An application that opened with a TLS ClientHello: refused, or intercepted when the
    /// policy opts in.
    async fn serve_tls(
        &self,
        app: TcpStream,
        cx: Context<'_>,
    ) -> Result<Transferred, ConnectError> {
        if cx.policy.app_tls != AppTlsMode::Enable {
            tracing::info!("the application opened with a TLS ClientHello; refused");
            super::refuse::reset(app);
            return Err(ConnectError::Protocol {
                protocol: "http",
                source: Box::new(NotServed::AppTls),
            });
        }
        let deadline = tokio::time::Instant::now() + cx.env.handshake_timeout;
        let tls = intercept::accept(app, &cx, deadline).await.map_err(|e| {
            tracing::info!(error = %e, "HTTPS interception refused or failed");
            ConnectError::Protocol {
                protocol: "http",
                source: Box::new(e),
            }
        })?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            return h2::serve(self, tls, cx).await;
        }
        // A malformed head is hyper's to close: the raw answer below needs the plain socket.
        self.serve_stream(tls, None, cx).await
    }

    /// Serves the application's requests on `app` (plain, or TLS latch terminated).
    async fn serve_stream<S>(
        &self,
        app: S,
        app_fd: Option<std::os::fd::OwnedFd>,
        cx: Context<'_>,
    ) -> Result<Transferred, ConnectError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let session = Session {
            http: self,
            cx,
            target: Default::default(),
            pool_key: Default::default(),
            upgrade: Default::default(),
            failure: Default::default(),
            to_app: Default::default(),
            to_target: Default::default(),
            host: host_header(cx),
            hold_shutdown: Arc::new(AtomicBool::new(true)),
        };
        let io = TokioIo::new(Counted::holding_shutdown(
            app,
            session.to_app.clone(),
            session.hold_shutdown.clone(),
        ));
        let service = service_fn(|req| session.handle(req));
        let served = server(cx.env.handshake_timeout)
            .serve_connection(io, service)
            .with_upgrades()
            .await;
        let ended_well = served.is_ok();
        if let Err(e) = served {
            // A malformed request, a head that never came (slowloris), a reset.
            tracing::debug!(error = %e, "application connection ended by an error");
            if let Some(answer) = bad_request(&e)
                && let Some(fd) = app_fd
                && let Ok(mut app) = stream_from(fd)
            {
                super::refuse::tell_and_close(&mut app, Some(answer)).await;
                session
                    .to_app
                    .fetch_add(answer.len() as u64, Ordering::Relaxed);
            }
        }
        let upgrade = session
            .upgrade
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let upgraded = upgrade.is_some();
        if let Some((app_up, target_up)) = upgrade {
            relay_upgraded(app_up, target_up).await;
        }
        let held = session.target.lock().await.take();
        if let Some(held) = held {
            let target = held.settle();
            let failed = session
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
            if ended_well
                && !failed
                && !upgraded
                && let Some(Some(key)) = session.pool_key.get()
            {
                self.keep(key.clone(), target);
            }
        }
        session_end(cx, &session.to_app, &session.to_target, &session.failure)
    }
}

impl Http {
    /// Keeps a session's target connection in the pool once hyper says it is ready for
    /// another request (at most [`KEEP_READY`] from now: a response the application left
    /// unread never makes it so; the connection is then dropped).
    fn keep(&self, key: pool::Key, mut target: Target) {
        if target.send.is_closed() {
            return;
        }
        if target.send.is_ready() {
            return self.pool.put(key, target);
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(KEEP_READY, target.send.ready()).await {
                pool.put(key, target);
            }
        });
    }
}

/// How long a session's target connection may take to be ready for another request to be
/// kept.
const KEEP_READY: Duration = Duration::from_secs(1);

/// A session's target connection, the credentials resolved for it, and its bytes written
/// when the session got it: what it writes for the session goes into the session's count when
/// it is let go (dropped, or settled to be kept).
struct Held {
    target: Option<Target>,
    creds: Arc<Credentials>,
    base: u64,
    to_target: Arc<AtomicU64>,
}

impl Held {
    fn new(target: Target, creds: Arc<Credentials>, to_target: &Arc<AtomicU64>) -> Held {
        Held {
            base: target.written(),
            target: Some(target),
            creds,
            to_target: to_target.clone(),
        }
    }

    fn target(&mut self) -> &mut Target {
        self.target.as_mut().expect("a held target until settled")
    }

    /// The connection, its bytes for this session counted.
    fn settle(mut self) -> Target {
        let target = self.target.take().expect("settled once");
        self.to_target
            .fetch_add(target.written() - self.base, Ordering::Relaxed);
        target
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(t) = &self.target {
            self.to_target
                .fetch_add(t.written() - self.base, Ordering::Relaxed);
        }
    }
}

/// A session's end, for HTTP/1.1 and HTTP/2 alike: its byte counts added to the connection's
/// progress, and the failure a request recorded (if any) as the connection's error.
fn session_end(
    cx: Context<'_>,
    to_app: &AtomicU64,
    to_target: &AtomicU64,
    failure: &Mutex<Option<Failure>>,
) -> Result<Transferred, ConnectError> {
    let (to_app, to_target) = (
        to_app.load(Ordering::Relaxed),
        to_target.load(Ordering::Relaxed),
    );
    let progress = cx.progress();
    progress.to_app.fetch_add(to_app, Ordering::Relaxed);
    progress.to_target.fetch_add(to_target, Ordering::Relaxed);
    match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(f) => Err(ConnectError::Protocol {
            protocol: "http",
            source: Box::new(f),
        }),
        None => Ok(Transferred { to_target, to_app }),
    }
}

impl Session<'_> {
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<ResBody>, Infallible> {
        let method = req.method().clone();
        match self.forward(req).await {
            Ok(resp) => Ok(to_app::ToApp::of(resp, &method).map(Either::Left)),
            Err(f) => {
                crate::warn_throttled!(error = %f, "request failed");
                let resp = f.response().map(|b| Either::Right(Full::new(b)));
                self.failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(f);
                Ok(resp)
            }
        }
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, Failure> {
        if req.method() == Method::CONNECT {
            return Err(Failure::Connect);
        }
        let app_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let mut slot = self.target.lock().await;
        let mut reuse = slot.as_mut().is_some_and(|h| !h.target().send.is_closed());
        if !reuse {
            let (held, pooled) = self.connect(true).await?;
            *slot = Some(held);
            reuse = pooled;
        }
        let ready = match slot.as_mut() {
            Some(h) => h.target().send.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            // The target closed its keep-alive connection between requests: a new one.
            *slot = Some(self.connect(false).await?.0);
        }
        let reused = reuse && ready;
        let (mut parts, body) = req.into_parts();
        // The application's `Connection: close` is for its own connection (hyper closes it
        // after the response); the target connection stays open for the pool.
        let app_closes = drop_option(&mut parts.headers, "close");
        // A GET or HEAD without a body can be sent again as it was: kept (before latch's
        // credential goes in) for one retry.
        let again = (app_upgrade.is_none()
            && matches!(parts.method, Method::GET | Method::HEAD)
            && body.is_end_stream())
        .then(|| parts.clone());
        let Some(held) = slot.as_mut() else {
            unreachable!("connected above");
        };
        let creds = held.creds.clone();
        let (req, injected) = outgoing(
            self.cx,
            self.host.as_ref(),
            &creds,
            parts,
            Either::Left(body),
        )
        .await?;
        let mut resent = false;
        // The target's upgraded stream, claimed before the request goes (see
        // `Target::upgraded`).
        let mut target_up = app_upgrade.is_some().then(|| held.target().upgraded());
        let sent = match held.target().send.try_send_request(req).await {
            Ok(resp) => Ok((resp, injected)),
            Err(mut e) => match e.take_message() {
                // Given back unwritten: the target closed the connection before hyper wrote
                // any of it (a kept-alive connection the target timed out as latch reused
                // it). Nothing reached the target, so it goes once more on a new connection,
                // whatever its method and body.
                Some(req) if reused => {
                    tracing::debug!("target closed a reused connection; request sent on a new one");
                    resent = true;
                    *slot = Some(self.connect(false).await?.0);
                    let Some(held) = slot.as_mut() else {
                        unreachable!("connected above");
                    };
                    if target_up.is_some() {
                        target_up = Some(held.target().upgraded());
                    }
                    let resp = held.target().send.send_request(req).await;
                    resp.map(|r| (r, injected))
                        .map_err(|e| Failure::Target(target::TargetError::Http(e)))
                }
                _ => Err(Failure::Target(target::TargetError::Http(e.into_error()))),
            },
        };
        let (mut resp, injected) = match (sent, again.as_ref()) {
            (Ok(r), _) => r,
            (Err(Failure::Target(target::TargetError::Http(e))), Some(again))
                if reused && !resent =>
            {
                // The target closed the kept-alive connection as latch reused it: the request
                // is safe to repeat, once, on a new connection.
                tracing::debug!(error = %e, "target closed a reused connection; retrying on a new one");
                *slot = Some(self.connect(false).await?.0);
                let Some(held) = slot.as_mut() else {
                    unreachable!("connected above");
                };
                let creds = held.creds.clone();
                self.send(held.target(), &creds, again.clone(), empty())
                    .await?
            }
            (Err(f), _) => return Err(f),
        };
        if resp.status() == StatusCode::UNAUTHORIZED && injected {
            resp = self.after_rejection(&mut slot, resp, again).await?;
        }
        if app_closes {
            // What the target answered a request it was not told closes its connection says
            // keep-alive; the application asked for a close, and gets the answer a server
            // gives that: no keep-alive (hyper says `Connection: close`).
            drop_option(resp.headers_mut(), "keep-alive");
            resp.headers_mut()
                .remove(http::HeaderName::from_static("keep-alive"));
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(app_up) = app_upgrade
        {
            self.hold_shutdown.store(false, Ordering::Relaxed);
            *self.upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some((app_up, target_up));
        }
        Ok(resp)
    }

    /// The target answered 401 to latch's credential: fresh credentials from the store
    /// (rate-limited per policy) for this connection's next requests; a request that can be
    /// repeated (`again`) is sent once more with them on a new connection, any other gets
    /// the 401 as the target wrote it.
    async fn after_rejection(
        &self,
        slot: &mut Option<Held>,
        resp: Response<Incoming>,
        again: Option<http::request::Parts>,
    ) -> Result<Response<Incoming>, Failure> {
        let cx = self.cx;
        let Some(used) = slot.as_ref().map(|h| h.creds.clone()) else {
            return Ok(resp);
        };
        let Some(fresh) = cx
            .env
            .secrets
            .fresh_after_rejection(cx.policy, None, &used)
            .await
        else {
            return Ok(resp);
        };
        let Some(again) = again else {
            if let Some(held) = slot.as_mut() {
                held.creds = fresh;
            }
            return Ok(resp);
        };
        // The 401's body is not read: the connection it came on is not reused.
        drop(resp);
        let target = self.dial().await?;
        *slot = Some(Held::new(target, fresh, &self.to_target));
        let Some(held) = slot.as_mut() else {
            unreachable!("connected above");
        };
        let creds = held.creds.clone();
        Ok(self.send(held.target(), &creds, again, empty()).await?.0)
    }

    /// Puts the credential into one request and sends it; the response and whether latch's
    /// credential went in.
    async fn send(
        &self,
        target: &mut Target,
        creds: &Credentials,
        parts: http::request::Parts,
        body: ReqBody,
    ) -> Result<(Response<Incoming>, bool), Failure> {
        let (req, add) = outgoing(self.cx, self.host.as_ref(), creds, parts, body).await?;
        let resp = target
            .send
            .send_request(req)
            .await
            .map_err(|e| Failure::Target(target::TargetError::Http(e)))?;
        Ok((resp, add))
    }

    /// Resolves the credentials and gets a target connection: a kept one from the pool when
    /// `pooled` and there is one for this session's key, else a new one. Whether it came from
    /// the pool.
    async fn connect(&self, pooled: bool) -> Result<(Held, bool), Failure> {
        let cx = self.cx;
        let creds = cx
            .env
            .secrets
            .credentials(cx.policy)
            .await
            .map_err(Failure::Secrets)?;
        if pooled && let Some(key) = self.pool_key().await {
            // One that ended while it moved to this thread is dropped; the next is tried.
            while let Some(kept) = self.http.pool.take(key) {
                if let Some(target) = kept.here().await {
                    tracing::debug!("kept target connection reused");
                    return Ok((Held::new(target, creds, &self.to_target), true));
                }
            }
        }
        let target = self.dial().await?;
        Ok((Held::new(target, creds, &self.to_target), false))
    }

    /// Opens a new target connection.
    async fn dial(&self) -> Result<Target, Failure> {
        let cx = self.cx;
        let target = target::connect(&cx, &self.http.tls, Default::default())
            .await
            .map_err(Failure::Target)?;
        tracing::debug!(
            tls = cx.policy.tls.mode != TlsMode::Disable,
            "target connected"
        );
        Ok(target)
    }

    /// This session's key in the pool (worked out once).
    async fn pool_key(&self) -> Option<&pool::Key> {
        let cx = self.cx;
        self.pool_key
            .get_or_init(|| pool::Key::of(&cx, target::address(&cx)))
            .await
            .as_ref()
    }
}

/// One request as it goes to the target: the credential put in ([`inject::prepare`]; `host`:
/// the `Host` to send, if it must change) or the request signed ([`sigv4`]), the handshake
/// deadline ended; and whether latch's credential went in. The same for HTTP/1.1 and HTTP/2
/// applications.
pub(crate) async fn outgoing(
    cx: Context<'_>,
    host: Option<&HeaderValue>,
    creds: &Credentials,
    mut parts: http::request::Parts,
    body: ReqBody,
) -> Result<(Request<ReqBody>, bool), Failure> {
    let spec = &cx.policy.http;
    let add = inject::prepare(&mut parts, spec, host, creds).map_err(Failure::Inject)?;
    let body = match (&spec.inject, add) {
        (Injection::AwsSigV4(aws), true) => {
            let token = match &aws.session_token {
                Some(r) => Some(
                    cx.env
                        .secrets
                        .current()
                        .secret(r)
                        .await
                        .map_err(Failure::Secrets)?,
                ),
                None => None,
            };
            let (bytes, body) = if aws.unsigned_payload {
                (None, body)
            } else {
                let bytes = Limited::new(body, MAX_SIGNED_BODY)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            Failure::TooLargeToSign(MAX_SIGNED_BODY)
                        } else {
                            Failure::AppBody(e.to_string())
                        }
                    })?
                    .to_bytes();
                (Some(bytes.clone()), Either::Right(Full::new(bytes)))
            };
            sigv4::sign_parts(
                &mut parts,
                bytes.as_deref(),
                creds,
                token.as_ref(),
                aws,
                SystemTime::now(),
            )
            .map_err(Failure::Sign)?;
            body
        }
        _ => body,
    };
    cx.handshake_done();
    Ok((Request::from_parts(parts, body), add))
}

/// The answer to a request head hyper could not read: 431 for one too large (too many or too
/// long header fields), 400 for any other malformed head; `None` for other errors (a reset, a
/// head that never came: closed without a word, as nginx does).
fn bad_request(e: &hyper::Error) -> Option<&'static [u8]> {
    if e.is_parse_too_large() {
        Some(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: 65\r\nconnection: close\r\n\r\n{\"error\":\"request_header_too_large\",\"status\":431,\"from\":\"latch\"}\n")
    } else if e.is_parse() {
        Some(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 52\r\nconnection: close\r\n\r\n{\"error\":\"bad_request\",\"status\":400,\"from\":\"latch\"}\n")
    } else {
        None
    }
}

/// A tokio stream over a duplicate of the application's socket.
fn stream_from(fd: std::os::fd::OwnedFd) -> std::io::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// Takes option `option` (`close`, `keep-alive`) out of the `Connection` header (the header
/// goes when nothing else is left in it); whether it was there.
fn drop_option(headers: &mut http::HeaderMap, option: &str) -> bool {
    let values: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    let has = values.iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(option)))
    });
    if !has {
        return false;
    }
    let kept: Vec<&str> = values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(option))
        .collect();
    headers.remove(header::CONNECTION);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(header::CONNECTION, v);
    }
    true
}

/// An empty request body (a repeated GET or HEAD).
fn empty() -> ReqBody {
    Either::Right(Full::new(Bytes::new()))
}

/// Whether the request asks to switch protocols (`Connection: upgrade` with `Upgrade`).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// After a `101`: the two connections relayed as bytes until either side ends. What the
/// target sent past its `101` (hyper read it with the response) goes first.
async fn relay_upgraded(app: OnUpgrade, target: Option<target::Upgraded>) {
    let target = async { target?.await.ok() };
    let (app, target) = match tokio::join!(app, target) {
        (Ok(a), Some(t)) => (a, t),
        (a, t) => {
            tracing::debug!(
                app = a.is_ok(),
                target = t.is_some(),
                "upgrade did not complete"
            );
            return;
        }
    };
    let mut app = TokioIo::new(app);
    let hyper::client::conn::http1::Parts {
        io: target,
        read_buf: early,
        ..
    } = target;
    if !early.is_empty()
        && tokio::io::AsyncWriteExt::write_all(&mut app, &early)
            .await
            .is_err()
    {
        return;
    }
    let mut target = target.into_inner();
    match tokio::io::copy_bidirectional(&mut app, &mut target).await {
        Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
        Err(e) => tracing::debug!(error = %e, "upgraded connection ended by an error"),
    }
}

/// The `Host` latch sends: `http.host`, else — when latch makes TLS — the name it verifies
/// (`tls.serverName` or the destination host, with the port unless it is 443); else `None`
/// (the application's own).
fn host_header(cx: Context<'_>) -> Option<HeaderValue> {
    let policy = cx.policy;
    if let Some(h) = &policy.http.host {
        return HeaderValue::from_str(h).ok();
    }
    if policy.tls.mode == TlsMode::Disable {
        return None;
    }
    let name = match (&policy.tls.server_name, &policy.destination.target) {
        (Some(n), _) => n.clone(),
        (None, Dest::Host(h)) => h.clone(),
        _ => return None,
    };
    let port = target::address(&cx).port();
    let value = if port == 443 {
        name
    } else {
        format!("{name}:{port}")
    };
    HeaderValue::from_str(&value).ok()
}

/// Answers every request on `app` with `failure`'s response (it closes the connection), the
/// head read within `within`.
async fn answer_all(app: TcpStream, failure: Failure, within: Duration) {
    let failure = &failure;
    if h2::speaks_h2(&app, within).await {
        return h2::answer_all(app, failure, within).await;
    }
    let service = service_fn(|_req: Request<Incoming>| async move {
        Ok::<_, Infallible>(failure.response().map(Full::new))
    });
    let conn = server(within).serve_connection(TokioIo::new(app), service);
    if let Err(e) = tokio::time::timeout(within * 2, conn)
        .await
        .unwrap_or(Ok(()))
    {
        tracing::debug!(error = %e, "refused application connection ended by an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head of `n` header fields through [`server`]: the status latch's server answers.
    async fn status_for_fields(n: usize) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (app, _) = listener.accept().await.unwrap();
        let service = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let served = tokio::spawn(async move {
            let conn = server(Duration::from_secs(5)).serve_connection(TokioIo::new(app), service);
            conn.await
        });
        let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 1..n {
            head.push_str(&format!("X-F{i}: v\r\n"));
        }
        head.push_str("\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_millis(500), client.read_to_end(&mut answer)).await;
        drop(client);
        match served.await.unwrap() {
            Err(e) if e.is_parse_too_large() => "431".to_owned(),
            _ => String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        }
    }

    #[tokio::test]
    async fn a_head_of_max_headers_fields_is_served_and_one_more_is_too_large() {
        assert_eq!(status_for_fields(MAX_HEADERS).await, "HTTP/1.1 200 OK");
        assert_eq!(status_for_fields(MAX_HEADERS + 1).await, "431");
    }

    fn connection(values: &[&str]) -> Vec<String> {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append(header::CONNECTION, HeaderValue::from_str(v).unwrap());
        }
        drop_option(&mut h, "close");
        h.get_all(header::CONNECTION)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The application's `close` stays with its own connection; other options go on.
    #[test]
    fn connection_close_is_not_passed_to_the_target() {
        assert!(connection(&["close"]).is_empty());
        assert!(connection(&["Close"]).is_empty());
        assert_eq!(connection(&["Upgrade, close"]), ["Upgrade"]);
        assert_eq!(connection(&["close", "x-trace"]), ["x-trace"]);
        assert_eq!(connection(&["keep-alive"]), ["keep-alive"]);
        assert_eq!(
            connection(&["Upgrade", "keep-alive"]),
            ["Upgrade", "keep-alive"]
        );
        assert!(connection(&[]).is_empty());
    }

    /// The target's `keep-alive` in its answer to a request whose `close` latch kept back.
    #[test]
    fn keep_alive_is_taken_out_of_the_answer_to_a_closing_application() {
        let mut h = http::HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(drop_option(&mut h, "keep-alive"));
        assert!(h.get(header::CONNECTION).is_none());
        let mut h = http::HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, x-a"),
        );
        assert!(drop_option(&mut h, "keep-alive"));
        assert_eq!(h[header::CONNECTION], "x-a");
        assert!(!drop_option(&mut h, "keep-alive"));
    }
}
