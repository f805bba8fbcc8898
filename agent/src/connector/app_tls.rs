//! TLS toward applications: a certificate for the destination the application connected to,
//! issued by the node-local CA ([`crate::ca`]). Each protocol decides when to offer it (in its
//! own negotiation); the handshake itself is the same for all.
use std::{net::IpAddr, sync::Arc};

use rustls::ServerConfig;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    ca::{CaError, NodeCa},
    config::{Policy, Target},
};

/// Where the certificate for one connection's TLS comes from.
pub struct AppTls<'a> {
    ca: &'a NodeCa,
    ip: IpAddr,
    host: Option<&'a str>,
}

/// The TLS handshake with the application did not complete.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS with the application: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS with the application did not complete in time")]
    Timeout,
}

impl<'a> AppTls<'a> {
    /// For a connection to `dst` under `policy`: the certificate names the policy's host, if
    /// it has one, and the address.
    pub fn new(ca: &'a NodeCa, policy: &'a Policy, dst: IpAddr) -> Self {
        let host = match &policy.destination.target {
            Target::Host(h) => Some(h.as_str()),
            _ => None,
        };
        Self { ca, ip: dst, host }
    }

    /// The server configuration (loads or creates the CA on first need; leaves are cached).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CaError> {
        self.ca.server_config(self.ip, self.host)
    }
}

/// Runs the server side of the TLS handshake on `tcp`, by `deadline`.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, AcceptError> {
    match tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(AcceptError::Handshake(e)),
        Err(_) => Err(AcceptError::Timeout),
    }
}
