//! The application leg before the session: the first packet, with SSLRequest answered 'S' and
//! TLS terminated (a certificate from the node-local CA for the original destination) when the
//! policy's `appTls.mode` is `enable`, 'N' otherwise; GSSENCRequest always gets 'N'.
use std::{net::IpAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use rustls::ServerConfig;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use super::{failure::Failure, stream::AppStream};
use crate::{
    broker::Shared,
    config::{AppTlsMode, Policy, Target},
    pg::{
        self,
        startup::{self, Initial, MAX_STARTUP_LEN},
    },
};

/// Where a certificate for the application's TLS comes from, if the policy enables it.
pub struct AppTls<'a> {
    shared: &'a Shared,
    ip: IpAddr,
    host: Option<&'a str>,
}

impl<'a> AppTls<'a> {
    /// `Some` when `policy` terminates TLS from applications; `dst` is where the app connected.
    pub fn for_policy(policy: &'a Policy, shared: &'a Shared, dst: IpAddr) -> Option<AppTls<'a>> {
        let host = match &policy.destination.target {
            Target::Host(h) => Some(h.as_str()),
            _ => None,
        };
        (policy.app_tls == AppTlsMode::Enable).then_some(AppTls {
            shared,
            ip: dst,
            host,
        })
    }

    fn server_config(&self) -> Option<Arc<ServerConfig>> {
        match self.shared.app_ca.server_config(self.ip, self.host) {
            Ok(c) => Some(c),
            Err(e) => {
                // The application is told 'N'; with sslmode=prefer it goes on in plain text.
                tracing::warn!(error = %e, "no certificate for TLS toward the application");
                None
            }
        }
    }
}

/// A failure while reading the first packet; the stream is gone when a TLS handshake failed.
pub type StartupError = (Option<AppStream>, Failure);

/// Reads the first packet, answering SSLRequest/GSSENCRequest (once each, as PostgreSQL
/// allows) until a StartupMessage or CancelRequest arrives, all within `limit` (the stream is
/// kept for the error message when the application stalls).
pub async fn read_startup(
    mut app: AppStream,
    buf: &mut BytesMut,
    tls: Option<&AppTls<'_>>,
    limit: Duration,
) -> Result<(AppStream, Initial), StartupError> {
    let deadline = Instant::now() + limit;
    let (mut ssl_seen, mut gss_seen) = (false, false);
    loop {
        let initial = match read_initial(&mut app, buf, deadline, limit).await {
            Ok(i) => i,
            Err(f) => return Err((Some(app), f)),
        };
        match initial {
            Initial::SslRequest if !ssl_seen => {
                ssl_seen = true;
                if let Some(f) = data_after_request(buf) {
                    return Err((Some(app), f));
                }
                let config = match (&app, tls) {
                    (AppStream::Plain(_), Some(t)) => t.server_config(),
                    _ => None,
                };
                app = match (app, config) {
                    (AppStream::Plain(tcp), Some(config)) => {
                        accept_tls(tcp, config, deadline, limit).await?
                    }
                    (app, _) => answer(app, b'N').await?,
                };
            }
            Initial::GssEncRequest if !gss_seen => {
                gss_seen = true;
                if let Some(f) = data_after_request(buf) {
                    return Err((Some(app), f));
                }
                app = answer(app, b'N').await?;
            }
            Initial::SslRequest | Initial::GssEncRequest => {
                return Err((
                    Some(app),
                    Failure::AppProtocol(pg::PgError::malformed(
                        "startup packet",
                        "encryption requested twice",
                    )),
                ));
            }
            other => return Ok((app, other)),
        }
    }
}

async fn read_initial(
    app: &mut AppStream,
    buf: &mut BytesMut,
    deadline: Instant,
    limit: Duration,
) -> Result<Initial, Failure> {
    loop {
        if let Some(i) = startup::parse(buf, MAX_STARTUP_LEN).map_err(Failure::AppProtocol)? {
            return Ok(i);
        }
        let n = tokio::time::timeout_at(deadline, app.read_buf(buf))
            .await
            .map_err(|_| Failure::AppTimeout(limit))?
            .map_err(Failure::AppIo)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                Failure::AppClosed
            } else {
                Failure::AppProtocol(pg::PgError::malformed("startup packet", "truncated"))
            });
        }
    }
}

/// Bytes after an encryption request would be read as plain text: refuse, as PostgreSQL does
/// (CVE-2021-23214).
fn data_after_request(buf: &BytesMut) -> Option<Failure> {
    (!buf.is_empty()).then(|| {
        Failure::AppProtocol(pg::PgError::malformed(
            "startup packet",
            "data after an encryption request",
        ))
    })
}

async fn answer(mut app: AppStream, byte: u8) -> Result<AppStream, StartupError> {
    match app.write_all(&[byte]).await {
        Ok(()) => Ok(app),
        Err(e) => Err((Some(app), Failure::AppIo(e))),
    }
}

async fn accept_tls(
    mut tcp: tokio::net::TcpStream,
    config: Arc<ServerConfig>,
    deadline: Instant,
    limit: Duration,
) -> Result<AppStream, StartupError> {
    if let Err(e) = tcp.write_all(b"S").await {
        return Err((Some(AppStream::Plain(tcp)), Failure::AppIo(e)));
    }
    match tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept(tcp)).await {
        Ok(Ok(tls)) => {
            tracing::debug!("TLS with the application established");
            Ok(AppStream::Tls(Box::new(tls)))
        }
        Ok(Err(e)) => Err((None, Failure::AppTls(e.to_string()))),
        Err(_) => Err((None, Failure::AppTimeout(limit))),
    }
}
