//! HTTPS interception (`http.appTls: {mode: enable}`): the application's TLS is terminated with
//! a certificate for the name it asked for (SNI), issued by the node-local CA ([`crate::ca`])
//! and cached there, but only for a name the policy covers — its destination host or
//! `tls.serverName`; any other name is refused before a certificate is made. Without SNI the
//! certificate names the destination address (and the policy's host). ALPN: `h2`, then
//! `http/1.1` (an application that offers both gets `h2`, served by [`super::h2`]). An application that
//! offers ALPN with neither fails the handshake (`no_application_protocol`) rather than being
//! told one protocol and spoken another.
use std::sync::Arc;

use rustls::server::Acceptor;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

use crate::{
    ca::CaError,
    config::{Policy, Target},
    connector::Context,
};

/// The protocols offered to the application in ALPN.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Why the application's TLS was not terminated (audited; the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "the application asked TLS for {0:?}, a name this policy does not cover (its \
         destination host or tls.serverName): no certificate is issued for it"
    )]
    NameNotCovered(String),
    #[error("TLS with the application: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS with the application did not complete in time")]
    Timeout,
    #[error("the node-local CA: {0}")]
    Ca(#[source] CaError),
}

/// The names a policy's certificates may carry: its destination host and `tls.serverName`.
pub fn covered_names(policy: &Policy) -> impl Iterator<Item = &str> {
    let host = match &policy.destination.target {
        Target::Host(h) => Some(h.as_str()),
        _ => None,
    };
    host.into_iter().chain(policy.tls.server_name.as_deref())
}

/// Whether `sni` is one of [`covered_names`] (case and a trailing dot aside).
pub fn covers(policy: &Policy, sni: &str) -> bool {
    let sni = sni.strip_suffix('.').unwrap_or(sni);
    covered_names(policy).any(|n| n.strip_suffix('.').unwrap_or(n).eq_ignore_ascii_case(sni))
}

/// Reads the application's ClientHello, checks the name it asks for, and completes the
/// handshake with a certificate for it, by `deadline`.
pub async fn accept(
    tcp: TcpStream,
    cx: &Context<'_>,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, InterceptError> {
    let start =
        match tokio::time::timeout_at(deadline, LazyConfigAcceptor::new(Acceptor::default(), tcp))
            .await
        {
            Err(_) => return Err(InterceptError::Timeout),
            Ok(Err(e)) => return Err(InterceptError::Handshake(e)),
            Ok(Ok(start)) => start,
        };
    let policy = cx.policy;
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    let name = match sni {
        Some(n) if covers(policy, &n) => Some(n.strip_suffix('.').unwrap_or(&n).to_owned()),
        Some(n) => return Err(InterceptError::NameNotCovered(n)),
        None => match &policy.destination.target {
            Target::Host(h) => Some(h.clone()),
            _ => None,
        },
    };
    let leaf = cx
        .env
        .app_ca
        .server_config(cx.origin.dst.ip(), name.as_deref())
        .map_err(InterceptError::Ca)?;
    let mut config = (*leaf).clone();
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    match tokio::time::timeout_at(deadline, start.into_stream(Arc::new(config))).await {
        Err(_) => Err(InterceptError::Timeout),
        Ok(Err(e)) => Err(InterceptError::Handshake(e)),
        Ok(Ok(tls)) => {
            tracing::debug!(
                sni = name.as_deref(),
                "TLS with the application established"
            );
            Ok(tls)
        }
    }
}
