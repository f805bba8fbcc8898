//! Refusing an application for reasons of latch's limits rather than a policy's: a workload
//! over its concurrency limit, a handshake that took too long, too many startups at once. Each
//! connector says it in its protocol's terms ([`super::Connector::refuse`]); plain TCP can only
//! be reset.
use std::time::Duration;

use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

/// How long a refused application gets to take its answer: a stalled one must not hold the
/// task (its send buffer is normally empty, so this is rarely waited for).
pub const TELL_WITHIN: Duration = Duration::from_secs(2);

/// Why latch refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The workload has `max` connections open already.
    WorkloadLimit { max: usize },
    /// Connecting and authenticating to the target took longer than allowed.
    HandshakeTimeout(Duration),
    /// `max` direct-mode startups are running already.
    Busy { max: usize },
}

impl Refusal {
    /// Short machine-readable reason (metric label, audit).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::WorkloadLimit { .. } => "workload_limit",
            Refusal::HandshakeTimeout(_) => "handshake_timeout",
            Refusal::Busy { .. } => "capacity",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::WorkloadLimit { max } => write!(
                f,
                "too many connections from this workload (at most {max} at once)"
            ),
            Refusal::HandshakeTimeout(t) => {
                write!(f, "connecting to the target timed out after {t:?}")
            }
            Refusal::Busy { max } => {
                write!(f, "too many direct-mode startups at once (at most {max})")
            }
        }
    }
}

/// Writes `answer` (if any) to the application and closes its write side, within
/// [`TELL_WITHIN`]; whatever fails is dropped (the application is going away).
pub async fn tell_and_close(app: &mut (impl AsyncWrite + Unpin), answer: Option<&[u8]>) {
    let _ = tokio::time::timeout(TELL_WITHIN, async {
        if let Some(bytes) = answer {
            app.write_all(bytes).await?;
        }
        app.shutdown().await
    })
    .await;
}

/// Closes with RST, so the client sees a reset rather than a clean EOF.
pub fn reset(app: TcpStream) {
    let _ = socket2::SockRef::from(&app).set_linger(Some(Duration::ZERO));
    drop(app);
}
