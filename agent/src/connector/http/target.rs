//! The connection to the target: dial (marked, in the application's namespace), TLS as the
//! policy says, and hyper's HTTP/1.1 client over it — or, for an application that speaks
//! HTTP/2, hyper's HTTP/2 client where the target speaks it ([`connect_h2`]). The client's connection task runs on the
//! same runtime and ends with the connection; an HTTP/1.1 one can be moved to another
//! connection thread ([`Target::here`]).
use std::{
    future::Future as _,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

use http::{StatusCode, uri::Scheme};
use hyper::client::conn::{
    http1::{self, SendRequest},
    http2,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{sync::oneshot, task::JoinHandle};

use super::{ReqBody, counted::Counted};
use crate::{
    config::TlsMode,
    connector::{
        Context, DialError,
        stream::{MaybeTls, TargetStream},
        target_tls::{self, ClientConfigs, TlsFailure},
    },
};

/// Why the target could not be reached or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    #[error("TLS to target {0}: timed out after {1:?}")]
    TlsTimeout(SocketAddr, Duration),
    #[error("HTTP to target: {0}")]
    Http(#[source] hyper::Error),
}

impl TargetError {
    pub fn class(&self) -> (StatusCode, &'static str) {
        match self {
            TargetError::Dial(DialError::Timeout { .. }) | TargetError::TlsTimeout(..) => {
                (StatusCode::GATEWAY_TIMEOUT, "target_timeout")
            }
            TargetError::Dial(_) => (StatusCode::BAD_GATEWAY, "target_unreachable"),
            TargetError::Tls(_) => (StatusCode::BAD_GATEWAY, "target_tls_failure"),
            TargetError::Http(_) => (StatusCode::BAD_GATEWAY, "target_error"),
        }
    }
}

/// The stream under hyper's HTTP/1.1 client.
type Io = TokioIo<Counted<TargetStream>>;

/// The stream handed back by hyper's client, with what it read and did not use.
pub type Parts = http1::Parts<Io>;

/// The target's side of an upgraded connection, once hyper's client hands it back.
pub type Upgraded = oneshot::Receiver<Parts>;

/// A connection to the target, ready for requests.
pub struct Target {
    pub send: SendRequest<ReqBody>,
    task: JoinHandle<()>,
    /// Asks the connection task to stop and hand the stream back ([`Target::here`]).
    stop: Option<oneshot::Sender<oneshot::Sender<Parts>>>,
    /// Where the connection task hands the stream when it ends by itself (after a `101`: the
    /// upgraded connection, with the bytes hyper read past the response); when nobody asked
    /// for it, the stream is closed.
    ended: Arc<Mutex<Option<oneshot::Sender<Parts>>>>,
    /// The bytes written to the target on this connection so far (upgraded bytes included).
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The connection thread that runs `task` (and whose reactor has the socket).
    pub(super) home: Option<u64>,
}

impl Target {
    /// The bytes written to the target on this connection so far.
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The upgraded stream, if the target answers the next request with `101` (the
    /// connection task then ends). Asked for before an upgrade request is sent: the task may
    /// end as soon as the response is out.
    pub fn upgraded(&self) -> Upgraded {
        let (tx, rx) = oneshot::channel();
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// The same connection, run by this connection thread: a kept connection made on another
    /// thread would wake that thread for every event of every session that used it. The old
    /// task stops and hands the stream over; the socket moves to this thread's reactor and
    /// hyper's client starts again over it (no bytes are exchanged). `None` if the
    /// connection ended meanwhile or the target sent something unasked for.
    pub async fn here(mut self) -> Option<Target> {
        let here = crate::broker::workers::current();
        if here.is_none() || self.home == here {
            return Some(self);
        }
        let (tx, rx) = oneshot::channel();
        self.stop.take()?.send(tx).ok()?;
        let http1::Parts { io, read_buf, .. } = rx.await.ok()?;
        if !read_buf.is_empty() {
            return None;
        }
        let mut stream = io.into_inner();
        if let Err(err) = stream.inner_mut().rehome() {
            tracing::debug!(%err, "kept target connection not moved to this thread");
            return None;
        }
        http1_with(stream).await.ok()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // The connection task holds the socket; a dropped session takes it down at once.
        // (After an upgrade the task has already handed the socket on and ended.)
        self.task.abort();
    }
}

/// Where the requests go: the destination's address, on `http.targetPort` if set.
pub fn address(cx: &Context<'_>) -> SocketAddr {
    let mut addr = cx.origin.dst;
    if let Some(p) = cx.policy.http.target_port {
        addr.set_port(p);
    }
    addr
}

/// Dials the target, makes TLS as the policy says, and hands the stream to hyper's client.
pub async fn connect(
    cx: &Context<'_>,
    configs: &ClientConfigs,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Target, TargetError> {
    let stream = dial(cx, configs, &[]).await?;
    http1_over(stream, counter).await
}

/// hyper's HTTP/1.1 client over a dialled stream.
pub(super) async fn http1_over(
    stream: TargetStream,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Target, TargetError> {
    http1_with(Counted::new(stream, counter)).await
}

/// hyper's HTTP/1.1 client over a stream, its connection task on this runtime. The task runs
/// the connection without hyper's upgrades: it hands the stream back instead, to a session
/// that got a `101` ([`Target::upgraded`]) or to one that moves the connection
/// ([`Target::here`]).
async fn http1_with(stream: Counted<TargetStream>) -> Result<Target, TargetError> {
    let written = stream.counter();
    let (send, mut conn) = http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        // at most super::MAX_HEADERS header fields in a response: hyper's default
        .handshake(TokioIo::new(stream))
        .await
        .map_err(TargetError::Http)?;
    let (stop, mut stopping) = oneshot::channel::<oneshot::Sender<Parts>>();
    let ended = Arc::new(Mutex::new(None::<oneshot::Sender<Parts>>));
    let done = ended.clone();
    let task = tokio::spawn(async move {
        let mut listening = true;
        let stopped = std::future::poll_fn(|cx| {
            if listening {
                match Pin::new(&mut stopping).poll(cx) {
                    Poll::Ready(Ok(reply)) => return Poll::Ready(Some(reply)),
                    // The Target is gone, and this task with it.
                    Poll::Ready(Err(_)) => listening = false,
                    Poll::Pending => {}
                }
            }
            conn.poll_without_shutdown(cx).map(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "target connection ended by an error");
                }
                None
            })
        })
        .await;
        let parts = conn.into_parts();
        let to = stopped.or_else(|| done.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(to) = to {
            let _ = to.send(parts);
        }
    });
    Ok(Target {
        send,
        task,
        stop: Some(stop),
        ended,
        written,
        home: crate::broker::workers::current(),
    })
}

/// Dials the target and makes TLS as the policy says, offering `alpn` (none: the client
/// configuration's own, which offers nothing).
async fn dial(
    cx: &Context<'_>,
    configs: &ClientConfigs,
    alpn: &[&[u8]],
) -> Result<TargetStream, TargetError> {
    let env = cx.env;
    let addr = address(cx);
    let tcp = crate::connector::connect_marked(
        addr,
        env.mark,
        env.connect_timeout,
        cx.origin.netns.as_deref(),
    )
    .await?;
    let _ = tcp.set_nodelay(true);
    if cx.policy.tls.mode == TlsMode::Disable {
        return Ok(MaybeTls::Plain(tcp));
    }
    let handshake = target_tls::connect_alpn(tcp, addr, cx.policy, env, configs, alpn);
    match tokio::time::timeout(env.handshake_timeout, handshake).await {
        Err(_) => Err(TargetError::TlsTimeout(addr, env.handshake_timeout)),
        Ok(r) => Ok(MaybeTls::Tls(Box::new(r?.0))),
    }
}

/// A target connection for an HTTP/2 application: HTTP/2 when the target speaks it (with prior
/// knowledge over plain TCP, `h2` agreed in ALPN over TLS), else HTTP/1.1 (a TLS target that
/// did not agree to `h2`).
pub enum Link {
    H2(H2Target),
    H1(Target),
}

/// hyper's HTTP/2 client on one target connection; requests multiplex over clones of `send`.
pub struct H2Target {
    pub send: http2::SendRequest<ReqBody>,
    /// `https` over TLS, `http` over plain TCP (the `:scheme` of each request).
    pub scheme: Scheme,
    task: JoinHandle<()>,
}

impl Drop for H2Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The most bytes of response header fields latch takes from an HTTP/2 target.
const H2_MAX_RESPONSE_HEADERS: u32 = 64 * 1024;
/// Flow-control windows toward the target: how much of its responses may wait in latch for
/// the application to read them.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;

/// Dials the target for an HTTP/2 application ([`Link`]).
pub async fn connect_h2(
    cx: &Context<'_>,
    configs: &ClientConfigs,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Link, TargetError> {
    let stream = dial(cx, configs, &[b"h2", b"http/1.1"]).await?;
    let scheme = match &stream {
        MaybeTls::Plain(_) => Scheme::HTTP,
        MaybeTls::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => Scheme::HTTPS,
        MaybeTls::Tls(_) => return Ok(Link::H1(http1_over(stream, counter).await?)),
    };
    let io = TokioIo::new(Counted::new(stream, counter));
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(H2_MAX_RESPONSE_HEADERS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_send_buf_size(H2_STREAM_WINDOW as usize)
        .handshake(io)
        .await
        .map_err(TargetError::Http)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/2 target connection ended by an error");
        }
    });
    Ok(Link::H2(H2Target { send, scheme, task }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::workers::{self, Workers};
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// `f`'s output, run as a task on connection thread `i`.
    fn on<F, R>(w: &Workers, i: usize, f: impl FnOnce() -> F + Send + 'static) -> R
    where
        F: std::future::Future<Output = R> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        w.handle(i).spawn(async move {
            let _ = tx.send(f().await);
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// A server that answers every request on every connection `200 ok`; the number of
    /// connections it accepted.
    fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        while let Ok(n) = s.read(&mut buf).await
                            && n > 0
                        {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        });
        (addr, accepted)
    }

    async fn get(t: &mut Target) -> StatusCode {
        t.send.ready().await.unwrap();
        let req = http::Request::get("/")
            .header("host", "t")
            .body(ReqBody::Right(Full::new(bytes::Bytes::new())))
            .unwrap();
        let resp = t.send.send_request(req).await.unwrap();
        let status = resp.status();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        t.send.ready().await.unwrap();
        status
    }

    #[test]
    fn a_connection_taken_on_another_thread_moves_there_and_keeps_serving() {
        let w = Workers::start(2).unwrap();
        let (addr, accepted) = server();
        // Made, and used, on thread 1.
        let (mut made, there) = on(&w, 1, move || async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut t = http1_over(MaybeTls::Plain(tcp), Default::default())
                .await
                .unwrap();
            assert_eq!(get(&mut t).await, StatusCode::OK);
            (t, workers::current())
        });
        assert_eq!(made.home, there);
        // Taken on thread 0: it moves, and the next request goes on the same connection.
        let (home, here, status) = on(&w, 0, move || async move {
            let mut t = made.here().await.expect("moved");
            let status = get(&mut t).await;
            (t.home, workers::current(), status)
        });
        assert_eq!((home, status), (here, StatusCode::OK));
        assert_ne!(home, there);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
        // One that lives where it is taken stays as it is.
        made = on(&w, 1, move || async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            http1_over(MaybeTls::Plain(tcp), Default::default())
                .await
                .unwrap()
        });
        let task = made.task.id();
        let same = on(&w, 1, move || async move {
            made.here().await.unwrap().task.id()
        });
        assert_eq!(same, task);
    }
}
