//! The application leg before the session: the first packet, with SSLRequest answered 'S' and
//! TLS terminated (a certificate from the node-local CA for the original destination) when the
//! policy says so ([`Policy::ssl_answer`]: `appTls.mode` `enable`, or `auto` over a
//! `verify-full` server leg), 'N' otherwise; GSSENCRequest always gets 'N'. When the CA or a
//! certificate cannot be had, the application gets a FATAL ErrorResponse, never a silent 'N'
//! that would send a `prefer` client on in plain text. Every other path before the
//! StartupMessage is answered as PostgreSQL 15 answers it ([`latch_pg::pre_startup`]).
use std::{net::IpAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use rustls::ServerConfig;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    time::Instant,
};

use super::failure::Failure;
use crate::{
    config::{Policy, SslAnswer},
    connector::{
        Env,
        app_tls::{self, AcceptError, AppTls},
        stream::AppStream,
    },
};
use latch_pg::{
    pre_startup::{Encryption, Ending, PreStartup, Reason, Step},
    startup::Initial,
};

/// The certificate source for the application's TLS, when `policy` answers an SSLRequest
/// with 'S'; `dst` is where the application connected.
pub fn app_tls<'a>(policy: &'a Policy, env: &'a Env, dst: IpAddr) -> Option<AppTls<'a>> {
    (policy.ssl_answer() == SslAnswer::Tls).then(|| AppTls::new(&env.app_ca, policy, dst))
}

/// A failure while reading the first packet; the stream is gone when a TLS handshake failed.
pub type StartupError = (Option<AppStream>, Failure);

/// Reads the first packet, answering SSLRequest and GSSENCRequest as PostgreSQL does (see
/// [`pg::pre_startup`]) until a StartupMessage or CancelRequest arrives, all within `limit`.
/// Anything else ends in [`Failure::PreStartup`], with what PostgreSQL would have answered.
pub async fn read_startup(
    mut app: AppStream,
    buf: &mut BytesMut,
    tls: Option<&AppTls<'_>>,
    limit: Duration,
) -> Result<(AppStream, Initial), StartupError> {
    let deadline = Instant::now() + limit;
    let mut pre = PreStartup::default();
    loop {
        match pre.next(buf) {
            Step::Pending => {
                let read = tokio::time::timeout_at(deadline, app.read_buf(buf)).await;
                let ending = match read {
                    Ok(Ok(0)) => pre.closed(buf),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Err((Some(app), Failure::AppIo(e))),
                    // PostgreSQL ends a connection that stalls in its startup without a word.
                    Err(_) => Ending::silent(Reason::Timeout),
                };
                return Err((Some(app), Failure::PreStartup(ending)));
            }
            Step::Encryption(Encryption::Ssl) => {
                let config = match (&app, tls) {
                    (AppStream::Plain(_), Some(t)) => match t.server_config() {
                        Ok(c) => Some(c),
                        // Told as an ErrorResponse in place of 'S' (libpq reports it).
                        Err(e) => return Err((Some(app), Failure::AppCertificate(e))),
                    },
                    _ => None,
                };
                app = match (app, config) {
                    (AppStream::Plain(tcp), Some(config)) => {
                        // Plain-text bytes behind the request are refused once TLS is up,
                        // as PostgreSQL refuses them.
                        pre.tls_started();
                        accept_tls(tcp, config, deadline, limit).await?
                    }
                    (app, _) => answer(app, b'N').await?,
                };
            }
            Step::Encryption(Encryption::Gss) => app = answer(app, b'N').await?,
            Step::Startup(s) => return Ok((app, Initial::Startup(s))),
            Step::Cancel { pid, secret } => return Ok((app, Initial::Cancel { pid, secret })),
            Step::Close(ending) => return Err((Some(app), Failure::PreStartup(ending))),
        }
    }
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
    match app_tls::accept(tcp, config, deadline).await {
        Ok(tls) => {
            tracing::debug!("TLS with the application established");
            Ok(AppStream::Tls(Box::new(tls)))
        }
        Err(AcceptError::Handshake(e)) => Err((None, Failure::AppTls(e.to_string()))),
        Err(AcceptError::Timeout) => Err((None, Failure::AppTimeout(limit))),
    }
}
