//! The connection to the target: dial (marked, in the application's namespace), TLS as the
//! policy says, and hyper's HTTP/1.1 client over it — or, for an application that speaks
//! HTTP/2, hyper's HTTP/2 client where the target speaks it ([`connect_h2`]). The client's connection task runs on the
//! same runtime and ends with the connection.
use std::{net::SocketAddr, time::Duration};

use http::{StatusCode, uri::Scheme};
use hyper::client::conn::{
    http1::{self, SendRequest},
    http2,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::task::JoinHandle;

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

/// A connection to the target, ready for requests.
pub struct Target {
    pub send: SendRequest<ReqBody>,
    task: JoinHandle<()>,
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
    let io = TokioIo::new(Counted::new(stream, counter.clone()));
    let (send, conn) = http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        // at most super::MAX_HEADERS header fields in a response: hyper's default
        .handshake(io)
        .await
        .map_err(TargetError::Http)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "target connection ended by an error");
        }
    });
    Ok(Target {
        send,
        task,
        written: counter,
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
