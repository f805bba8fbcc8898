//! Refusing an application in its own protocol for reasons of latch's limits rather than a
//! policy's: a workload over its concurrency limit, a handshake that took too long. Plain TCP
//! can only be reset; a PostgreSQL client gets a FATAL ErrorResponse it can show.
use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::{Policy, Protocol};
use latch_pg::{
    backend::ERROR_RESPONSE,
    error_fields::{ErrorFields, SqlState},
    pre_startup::{PreStartup, Step},
};

/// How long a refused application gets to send its startup packet and take the answer.
const REFUSAL_IO: Duration = Duration::from_secs(2);

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

    /// The SQLSTATE a PostgreSQL client is told.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            Refusal::WorkloadLimit { .. } | Refusal::Busy { .. } => SqlState::TOO_MANY_CONNECTIONS,
            Refusal::HandshakeTimeout(_) => SqlState::UNABLE_TO_CONNECT,
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

/// Refuses a connection before anything was exchanged: a PostgreSQL client's startup packet is
/// read first (encryption requests answered 'N'), so it takes the ErrorResponse as the answer.
pub async fn refuse(mut app: TcpStream, policy: &Policy, why: Refusal) {
    if policy.protocol == Protocol::Postgres {
        let got = tokio::time::timeout(REFUSAL_IO, read_startup(&mut app)).await;
        if matches!(got, Ok(true)) {
            tell_postgres(app, policy, why).await;
        }
        return;
    }
    reset(app);
}

/// Ends a connection whose handshake was cut short: the application may be anywhere in its
/// startup, so PostgreSQL clients just get the ErrorResponse (valid at any point of startup).
pub async fn abort(app: TcpStream, policy: &Policy, why: Refusal) {
    match policy.protocol {
        Protocol::Postgres => tell_postgres(app, policy, why).await,
        _ => reset(app),
    }
}

async fn tell_postgres(mut app: TcpStream, policy: &Policy, why: Refusal) {
    let fields = ErrorFields::fatal(
        why.sqlstate(),
        format!("latch: policy \"{}\": {why}", policy.name),
    );
    let mut out = BytesMut::new();
    fields.encode(ERROR_RESPONSE, &mut out);
    let _ = tokio::time::timeout(REFUSAL_IO, async {
        app.write_all(&out).await?;
        app.shutdown().await
    })
    .await;
}

/// Reads until a StartupMessage, answering every path before it as PostgreSQL 15 does (the
/// same codec as the connectors', [`pre_startup`]); `false` on anything else.
async fn read_startup(app: &mut TcpStream) -> bool {
    let mut buf = BytesMut::with_capacity(512);
    let mut pre = PreStartup::default();
    loop {
        let ending = match pre.next(&mut buf) {
            Step::Startup(_) => return true,
            Step::Cancel { .. } => return false,
            Step::Encryption(_) => {
                if app.write_all(b"N").await.is_err() {
                    return false;
                }
                continue;
            }
            Step::Close(ending) => ending,
            Step::Pending => match app.read_buf(&mut buf).await {
                Ok(0) | Err(_) => pre.closed(&buf),
                Ok(_) => continue,
            },
        };
        if !ending.reply.is_empty() {
            let _ = app.write_all(&ending.reply).await;
        }
        return false;
    }
}

/// Closes with RST, so the client sees a reset rather than a clean EOF.
pub fn reset(app: TcpStream) {
    let _ = socket2::SockRef::from(&app).set_linger(Some(Duration::ZERO));
    drop(app);
}
