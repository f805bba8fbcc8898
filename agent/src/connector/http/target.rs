//! The connection to the target: dial (marked, in the application's namespace), TLS as the
//! policy says, and hyper's HTTP/1.1 client over it. The client's connection task runs on the
//! same runtime and ends with the connection.
use std::{net::SocketAddr, time::Duration};

use http::StatusCode;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
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
    let stream: TargetStream = if cx.policy.tls.mode == TlsMode::Disable {
        MaybeTls::Plain(tcp)
    } else {
        let handshake = target_tls::connect(tcp, addr, cx.policy, env, configs);
        match tokio::time::timeout(env.handshake_timeout, handshake).await {
            Err(_) => return Err(TargetError::TlsTimeout(addr, env.handshake_timeout)),
            Ok(r) => MaybeTls::Tls(Box::new(r?.0)),
        }
    };
    let io = TokioIo::new(Counted::new(stream, counter));
    let (send, conn) = http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(false)
        .max_headers(super::MAX_HEADERS)
        .handshake(io)
        .await
        .map_err(TargetError::Http)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "target connection ended by an error");
        }
    });
    Ok(Target { send, task })
}
