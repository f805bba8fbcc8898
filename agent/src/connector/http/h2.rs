//! HTTP/2 toward the application: an application that opens with the HTTP/2 connection
//! preface in cleartext (h2c with prior knowledge), or that agreed to `h2` in ALPN with
//! latch's HTTPS interception, is served by hyper's HTTP/2 server. Each stream's request gets
//! the credential exactly as an HTTP/1.1 request does ([`super::outgoing`]) and goes to the
//! target over HTTP/2 (prior knowledge over plain TCP, `h2` in ALPN over TLS), or over
//! HTTP/1.1 when a TLS target does not agree to `h2` (a few connections, one request at a time
//! each). Bodies and trailers stream both ways; latch's failures are the same JSON responses.
//!
//! Bounded: at most [`MAX_STREAMS`] concurrent streams per application connection (more are
//! refused with `REFUSED_STREAM`), [`MAX_HEADER_LIST`] bytes of header fields a request, and
//! flow-control windows ([`STREAM_WINDOW`], [`CONN_WINDOW`]) for what the application may send
//! ahead of the target; hyper's defaults bound reset floods. The streams of one connection run
//! on the connection's own task ([`Streams`]): no spawned task outlives it.
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use futures_util::{StreamExt as _, stream::FuturesUnordered};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{Either, Full};
use hyper::{body::Body as _, body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use super::{
    Failure, Http, ReqBody, ResBody,
    counted::Counted,
    empty, outgoing,
    target::{self, Link, Target, TargetError},
};
use crate::{
    connector::{ConnectError, Context},
    relay::Transferred,
    secrets::Credentials,
};

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// [`crate::connector::Session::set_stage`]: the application is served in HTTP/2 (so a
/// handshake that times out before its first request is ended with a GOAWAY).
pub const STAGE: u64 = 2;
/// GOAWAY (last stream 0, `NO_ERROR`): no request came within the handshake timeout.
pub const GOAWAY_TIMEOUT: &[u8] = &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// The most streams an application may have open at once on one connection.
pub const MAX_STREAMS: u32 = 100;
/// The most bytes of header fields (HPACK-decoded, as RFC 9113 counts them) a request may
/// carry.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// How much request body one stream may send ahead of the target.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// How much request body all streams of a connection together may send ahead of the target.
pub const CONN_WINDOW: u32 = 1024 * 1024;
/// How much of a response latch queues for one stream before waiting for the application.
const MAX_SEND_BUF: usize = 256 * 1024;
/// HTTP/1.1 connections to a target that did not agree to `h2`, per application connection.
const MAX_H1_TARGETS: usize = 8;

/// hyper's HTTP/2 server as latch runs it toward applications.
fn server<E>(exec: E) -> http2::Builder<E> {
    let mut b = http2::Builder::new(exec);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .adaptive_window(false)
        .max_send_buf_size(MAX_SEND_BUF)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(256)
        .auto_date_header(false);
    b
}

/// Whether the application opened with the HTTP/2 preface (waits for all of it at most
/// `within`; anything else, or silence, is not HTTP/2).
pub async fn speaks_h2(app: &TcpStream, within: Duration) -> bool {
    matches!(opening(app, within).await, Opening::H2)
}

/// What an application's connection opens with.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    /// A TLS record (a ClientHello).
    Tls,
    /// The HTTP/2 connection preface.
    H2,
    /// Anything else (HTTP/1.x, or nothing within the time).
    Http1,
}

/// Tells [`Opening`] from the first bytes `app` sends (peeked, left in the socket), waiting
/// up to `within` for them and, when they are the start of the HTTP/2 preface, for the rest
/// of it. One look decides an HTTP/1.x request.
///
/// Most clients have sent their first bytes by the time latch serves the connection: a look
/// without waiting (no reactor round, no timer) decides those.
pub async fn opening(app: &TcpStream, within: Duration) -> Opening {
    let mut buf = [0u8; PREFACE.len()];
    if let Some(n) = waiting(app, &mut buf)
        && let Some(seen) = decide(&buf[..n])
    {
        return seen;
    }
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = match tokio::time::timeout_at(deadline, app.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Opening::Http1,
        };
        if let Some(seen) = decide(&buf[..n]) {
            return seen;
        }
        // Part of the preface: the rest is on its way.
        if tokio::time::Instant::now() >= deadline {
            return Opening::Http1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What the first bytes say; `None` while they are the start of the preface.
fn decide(first: &[u8]) -> Option<Opening> {
    match first {
        [TLS_HANDSHAKE, ..] => Some(Opening::Tls),
        _ if first != &PREFACE[..first.len()] => Some(Opening::Http1),
        _ if first.len() == PREFACE.len() => Some(Opening::H2),
        _ => None,
    }
}

/// The bytes waiting on `app` now (peeked), if any.
fn waiting(app: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    crate::connector::stream::peek_now(app, buf)
        .ok()
        .filter(|n| *n > 0)
}

/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE: u8 = 0x16;

type Task<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
/// A request handed from hyper's stream to the session, and where its response goes.
type Job = (Request<Incoming>, oneshot::Sender<Response<ResBody>>);

/// hyper's executor for the streams of one connection: they run on the connection's task
/// (see [`drive`]), so none outlives it.
#[derive(Clone)]
struct Streams(mpsc::UnboundedSender<Task<'static>>);

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // At most MAX_STREAMS of them at once: hyper runs one per accepted stream.
        let _ = self.0.send(Box::pin(fut));
    }
}

/// hyper's service: each request goes to the session as a [`Job`] (the session's futures
/// borrow the connection's context, which hyper's `'static` streams cannot).
fn service(
    jobs: mpsc::UnboundedSender<Job>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ResBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ResBody>, Infallible>> + Send + 'static,
> + Clone {
    service_fn(move |req| {
        let jobs = jobs.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            let gone = || {
                let mut r = Response::new(Either::Right(Full::new(bytes::Bytes::new())));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            };
            if jobs.send((req, tx)).is_err() {
                return Ok(gone());
            }
            Ok(rx.await.unwrap_or_else(|_| gone()))
        }
    })
}

/// Runs `conn`, the streams it hands to [`Streams`] and the session's answers to their
/// requests (`answered`), until `conn` ends.
async fn drive<'a, C: Future>(
    conn: C,
    mut tasks: mpsc::UnboundedReceiver<Task<'static>>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    answered: impl Fn(Job) -> Task<'a>,
) -> C::Output {
    let mut streams = FuturesUnordered::new();
    let mut running: FuturesUnordered<Task<'a>> = FuturesUnordered::new();
    tokio::pin!(conn);
    loop {
        tokio::select! {
            out = &mut conn => return out,
            Some(t) = tasks.recv() => streams.push(t),
            Some(job) = jobs.recv() => running.push(answered(job)),
            Some(()) = streams.next(), if !streams.is_empty() => {}
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
}

/// The target connection of an HTTP/2 session and the credentials resolved for it.
#[derive(Clone)]
struct Upstream {
    link: Arc<Shared>,
    creds: Arc<Credentials>,
}

enum Shared {
    H2(target::H2Target),
    /// A TLS target without `h2`: up to [`MAX_H1_TARGETS`] HTTP/1.1 connections.
    H1(tokio::sync::Mutex<Vec<Target>>),
}

/// One HTTP/2 application connection.
struct Session<'a> {
    http: &'a Http,
    cx: Context<'a>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
    failure: Mutex<Option<Failure>>,
    to_app: Arc<AtomicU64>,
    to_target: Arc<AtomicU64>,
    host: Option<HeaderValue>,
}

/// Serves an HTTP/2 application on `app` (plain TCP after the preface was seen, or TLS latch
/// terminated with `h2` agreed).
/// (Boxed: the caller's future then does not hold this one's type.)
pub fn serve<'a, S>(
    http: &'a Http,
    app: S,
    cx: Context<'a>,
) -> Pin<Box<dyn Future<Output = Result<Transferred, ConnectError>> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    Box::pin(serve_inner(http, app, cx))
}

async fn serve_inner<S>(http: &Http, app: S, cx: Context<'_>) -> Result<Transferred, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    cx.session.set_stage(STAGE);
    let session = Session {
        http,
        cx,
        upstream: Default::default(),
        failure: Default::default(),
        to_app: Default::default(),
        to_target: Default::default(),
        host: super::host_header(cx),
    };
    let io = TokioIo::new(Counted::new(app, session.to_app.clone()));
    let (tasks_tx, tasks) = mpsc::unbounded_channel();
    let (jobs_tx, jobs) = mpsc::unbounded_channel();
    let conn = server(Streams(tasks_tx)).serve_connection(io, service(jobs_tx));
    let session = &session;
    let answered = |(req, tx): Job| -> Task<'_> {
        Box::pin(async move {
            let mut tx = tx;
            tokio::select! {
                resp = session.handle(req) => { let _ = tx.send(resp); }
                // The application reset the stream: the request to the target goes too.
                () = tx.closed() => {}
            }
        })
    };
    if let Err(e) = drive(conn, tasks, jobs, answered).await {
        // A protocol error of the application's (answered with GOAWAY), a reset.
        tracing::debug!(error = %e, "HTTP/2 application connection ended by an error");
    }
    drop(session.upstream.lock().await.take());
    super::session_end(cx, &session.to_app, &session.to_target, &session.failure)
}

/// Answers every stream on `app` (which sent the HTTP/2 preface) with `failure`'s response,
/// for at most `within`.
pub fn answer_all(
    app: TcpStream,
    failure: &Failure,
    within: Duration,
) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(answer_all_inner(app, failure, within))
}

async fn answer_all_inner(app: TcpStream, failure: &Failure, within: Duration) {
    let (tasks_tx, tasks) = mpsc::unbounded_channel();
    let (jobs_tx, jobs) = mpsc::unbounded_channel();
    let conn = server(Streams(tasks_tx)).serve_connection(TokioIo::new(app), service(jobs_tx));
    let answered = |(_req, tx): Job| -> Task<'_> {
        Box::pin(async move {
            let _ = tx.send(response(failure).map(|b| Either::Right(Full::new(b))));
        })
    };
    tokio::pin!(conn);
    let first = tokio::time::timeout(within, drive(conn.as_mut(), tasks, jobs, &answered)).await;
    if first.is_err() {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(within, conn).await;
    }
}

/// A failure's response over HTTP/2 (no `Connection`: the connection goes on).
fn response(failure: &Failure) -> Response<bytes::Bytes> {
    let mut r = failure.response();
    r.headers_mut().remove(header::CONNECTION);
    r
}

impl Session<'_> {
    async fn handle(&self, req: Request<Incoming>) -> Response<ResBody> {
        match self.forward(req).await {
            Ok(resp) => resp.map(|b| Either::Left(super::to_app::ToApp::plain(b))),
            Err(f) => {
                crate::warn_throttled!(error = %f, "HTTP/2 request failed");
                let resp = response(&f).map(|b| Either::Right(Full::new(b)));
                self.failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(f);
                resp
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, Failure> {
        if req.method() == Method::CONNECT {
            return Err(Failure::Connect);
        }
        let (mut parts, body) = req.into_parts();
        // The `:authority` the application named goes through the injection as `Host`, as an
        // HTTP/1.1 request's would.
        if !parts.headers.contains_key(header::HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let again = (matches!(parts.method, Method::GET | Method::HEAD) && body.is_end_stream())
            .then(|| parts.clone());
        let (up, reused) = self.upstream().await?;
        let (mut resp, injected) = match (
            self.send(&up, parts, Either::Left(body)).await,
            again.as_ref(),
        ) {
            (Ok(r), _) => r,
            (Err(Failure::Target(TargetError::Http(e))), Some(again)) if reused => {
                // The target closed the connection under a reused one: once more, on a new one.
                tracing::debug!(error = %e, "target connection failed; retrying on a new one");
                self.forget(&up).await;
                let (up, _) = self.upstream().await?;
                self.send(&up, again.clone(), empty()).await?
            }
            (Err(f), _) => return Err(f),
        };
        if resp.status() == StatusCode::UNAUTHORIZED && injected {
            resp = self.after_rejection(&up, resp, again).await?;
        }
        Ok(resp)
    }

    /// The target answered 401 to latch's credential: fresh credentials from the store
    /// (rate-limited per policy) for the next requests; a request that can be repeated is
    /// sent once more with them.
    async fn after_rejection(
        &self,
        up: &Upstream,
        resp: Response<Incoming>,
        again: Option<http::request::Parts>,
    ) -> Result<Response<Incoming>, Failure> {
        let cx = self.cx;
        let Some(fresh) = cx
            .env
            .secrets
            .fresh_after_rejection(cx.policy, None, &up.creds)
            .await
        else {
            return Ok(resp);
        };
        let up = Upstream {
            link: up.link.clone(),
            creds: fresh,
        };
        {
            let mut slot = self.upstream.lock().await;
            if let Some(current) = slot.as_mut()
                && Arc::ptr_eq(&current.link, &up.link)
            {
                current.creds = up.creds.clone();
            }
        }
        let Some(again) = again else {
            return Ok(resp);
        };
        drop(resp);
        Ok(self.send(&up, again, empty()).await?.0)
    }

    /// The session's target connection (made now if there is none or it closed), and
    /// whether it was there before.
    async fn upstream(&self) -> Result<(Upstream, bool), Failure> {
        let mut slot = self.upstream.lock().await;
        if let Some(up) = slot.as_ref()
            && !matches!(&*up.link, Shared::H2(t) if t.send.is_closed())
        {
            return Ok((up.clone(), true));
        }
        let cx = self.cx;
        let creds = cx
            .env
            .secrets
            .credentials(cx.policy)
            .await
            .map_err(Failure::Secrets)?;
        let link = target::connect_h2(&cx, &self.http.tls, self.to_target.clone())
            .await
            .map_err(Failure::Target)?;
        let shared = match link {
            Link::H2(t) => Shared::H2(t),
            Link::H1(t) => Shared::H1(tokio::sync::Mutex::new(vec![t])),
        };
        tracing::debug!(
            h2 = matches!(shared, Shared::H2(_)),
            "target connected for an HTTP/2 application"
        );
        let up = Upstream {
            link: Arc::new(shared),
            creds,
        };
        *slot = Some(up.clone());
        Ok((up, false))
    }

    /// Drops `up` as the session's target connection (it failed).
    async fn forget(&self, up: &Upstream) {
        let mut slot = self.upstream.lock().await;
        if slot
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.link, &up.link))
        {
            *slot = None;
        }
    }

    /// Puts the credential into one request and sends it on `up`; the response and whether
    /// latch's credential went in.
    async fn send(
        &self,
        up: &Upstream,
        parts: http::request::Parts,
        body: ReqBody,
    ) -> Result<(Response<Incoming>, bool), Failure> {
        let (mut req, add) = outgoing(self.cx, self.host.as_ref(), &up.creds, parts, body).await?;
        let resp = match &*up.link {
            Shared::H2(t) => {
                to_h2(&mut req, &t.scheme, &target::address(&self.cx).to_string())?;
                match t.send.clone().try_send_request(req).await {
                    Ok(resp) => resp,
                    Err(mut e) => match e.take_message() {
                        // Given back unwritten: the connection was closing (the target sent
                        // GOAWAY, as gRPC servers do at `max_connection_age`, while other
                        // streams were still open, or closed it). Nothing of the request
                        // reached the target, whatever its method and body.
                        Some(req) => self.resend(up, req).await?,
                        None => return Err(Failure::Target(TargetError::Http(e.into_error()))),
                    },
                }
            }
            Shared::H1(pool) => {
                *req.version_mut() = Version::HTTP_11;
                self.send_h1(pool, req).await?
            }
        };
        Ok((resp, add))
    }

    /// Sends `req` (already made HTTP/2, its credential in), which `up`'s connection gave back
    /// unwritten, once more on a new target connection.
    async fn resend(
        &self,
        up: &Upstream,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, Failure> {
        tracing::debug!("target connection closing; request sent on a new one");
        self.forget(up).await;
        let (fresh, _) = self.upstream().await?;
        match &*fresh.link {
            Shared::H2(t) => {
                let resp = t.send.clone().send_request(req).await;
                resp.map_err(|e| Failure::Target(TargetError::Http(e)))
            }
            // The target stopped agreeing to `h2` between two connections.
            Shared::H1(pool) => {
                to_h1(&mut req);
                self.send_h1(pool, req).await
            }
        }
    }

    /// Sends `req` on an idle HTTP/1.1 target connection, a new one (up to
    /// [`MAX_H1_TARGETS`]), or the first to become idle.
    async fn send_h1(
        &self,
        pool: &tokio::sync::Mutex<Vec<Target>>,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let http_err = |e| Failure::Target(TargetError::Http(e));
        let mut targets = pool.lock().await;
        targets.retain(|t| !t.send.is_closed());
        let response = if let Some(t) = targets.iter_mut().find(|t| t.send.is_ready()) {
            t.send.send_request(req)
        } else if targets.len() < MAX_H1_TARGETS {
            let t = target::connect(&self.cx, &self.http.tls, self.to_target.clone())
                .await
                .map_err(Failure::Target)?;
            targets.push(t);
            let Some(t) = targets.last_mut() else {
                unreachable!("pushed above");
            };
            t.send.send_request(req)
        } else {
            let t = &mut targets[0];
            t.send.ready().await.map_err(http_err)?;
            t.send.send_request(req)
        };
        drop(targets);
        response.await.map_err(http_err)
    }
}

/// Makes `req` an HTTP/2 request: `:scheme` for the target connection, `:authority` from
/// the `Host` latch would send (which then goes: RFC 9113 prefers `:authority`), else
/// `otherwise` (the target's address).
fn to_h2(
    req: &mut Request<ReqBody>,
    scheme: &http::uri::Scheme,
    otherwise: &str,
) -> Result<(), Failure> {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| otherwise.to_owned());
    let uri = http::uri::Builder::new()
        .scheme(scheme.clone())
        .authority(authority);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let uri: Uri = uri
        .path_and_query(pq)
        .build()
        .map_err(|e| Failure::AppBody(format!("request target: {e}")))?;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// Makes a request [`to_h2`] made an HTTP/1.1 one again: `Host` from `:authority`, the
/// request target in origin form.
fn to_h1(req: &mut Request<ReqBody>) {
    if let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let pq = req.uri().path_and_query().cloned();
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = pq;
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: Option<&str>) -> Request<ReqBody> {
        let mut b = Request::get(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(empty()).unwrap()
    }

    /// What `opening` makes of a connection whose peer writes `parts`, 20 ms apart.
    async fn opening_of(parts: &[&'static [u8]]) -> Opening {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (app, _) = l.accept().await.unwrap();
        let parts = parts.to_vec();
        let writer = tokio::spawn(async move {
            for p in parts {
                peer.write_all(p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peer
        });
        let seen = opening(&app, Duration::from_millis(300)).await;
        drop(writer.await.unwrap());
        seen
    }

    #[tokio::test]
    async fn one_look_tells_tls_http2_and_http1_apart() {
        assert_eq!(opening_of(&[b"\x16\x03\x01\x00"]).await, Opening::Tls);
        assert_eq!(opening_of(&[b"GET / HTTP/1.1\r\n"]).await, Opening::Http1);
        // "P" could begin the preface or a PUT: it is waited for until it says which.
        assert_eq!(
            opening_of(&[b"PRI * HTTP/2", b".0\r\n\r\nSM\r\n\r\n"]).await,
            Opening::H2
        );
        assert_eq!(
            opening_of(&[b"P", b"UT / HTTP/1.1\r\n"]).await,
            Opening::Http1
        );
        // A peer that closes at once is hyper's to end.
        assert_eq!(opening_of(&[]).await, Opening::Http1);
    }

    #[tokio::test]
    async fn bytes_already_there_are_told_apart_without_waiting() {
        use tokio::io::AsyncWriteExt as _;
        for (first, seen) in [
            (&b"GET / HTTP/1.1\r\n"[..], Opening::Http1),
            (PREFACE, Opening::H2),
            (&b"\x16\x03\x01\x00"[..], Opening::Tls),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (app, _) = l.accept().await.unwrap();
            peer.write_all(first).await.unwrap();
            // Decided at once, with no time to wait.
            assert_eq!(opening(&app, Duration::ZERO).await, seen);
            // And the bytes are still there for whoever reads next.
            let mut buf = vec![0u8; first.len()];
            assert_eq!(waiting(&app, &mut buf), Some(first.len()));
        }
        assert_eq!(decide(b"PRI * HT"), None);
        assert_eq!(decide(b"PUT"), Some(Opening::Http1));
    }

    #[test]
    fn the_host_latch_sends_becomes_the_authority() {
        let mut req = request("/a/b?c=1", Some("api.test:8443"));
        to_h2(&mut req, &http::uri::Scheme::HTTPS, "10.0.0.1:8443").unwrap();
        assert_eq!(req.uri().to_string(), "https://api.test:8443/a/b?c=1");
        assert!(!req.headers().contains_key(header::HOST));
        assert_eq!(req.version(), Version::HTTP_2);

        let mut req = request("/", None);
        to_h2(&mut req, &http::uri::Scheme::HTTP, "10.0.0.1:80").unwrap();
        assert_eq!(req.uri().to_string(), "http://10.0.0.1:80/");
    }

    #[test]
    fn a_request_made_http2_becomes_http1_again_with_its_host() {
        let mut req = request("/a/b?c=1", Some("api.test:8443"));
        to_h2(&mut req, &http::uri::Scheme::HTTPS, "10.0.0.1:8443").unwrap();
        to_h1(&mut req);
        assert_eq!(req.uri().to_string(), "/a/b?c=1");
        assert_eq!(req.headers()[header::HOST], "api.test:8443");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn the_preface_is_what_rfc_9113_says() {
        assert_eq!(PREFACE, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(PREFACE.len(), 24);
        // GOAWAY: length 8, type 7, no flags, stream 0, last stream 0, NO_ERROR.
        assert_eq!(GOAWAY_TIMEOUT.len(), 9 + 8);
        assert_eq!(GOAWAY_TIMEOUT[3], 7);
    }
}
