//! Why a MySQL session could not be brokered, and how the application is told: an ERR packet
//! with the code and SQLSTATE a MariaDB or MySQL server would use, and a message naming the
//! policy and what failed — never a secret, a store's address or a path.
use std::{io, net::SocketAddr, time::Duration};

use bytes::BytesMut;
use latch_mysql::{AuthError, CapabilityFlags, ErrPacket, ParseError, ServerError, constants::er};

use crate::{
    connector::{DialError, Refusal, target_tls::TlsFailure},
    secrets::SecretError,
};

/// MariaDB's "Unable to connect to foreign data source": what an application is told when latch
/// cannot reach or talk to the target (the server-side counterpart of the client's 2003).
pub const CANNOT_REACH: (u16, &str) = (1429, "HY000");

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("malformed handshake response from the application: {0}")]
    AppProtocol(#[source] ParseError),
    #[error("the application asked for TLS, which this policy does not offer it")]
    AppTls,
    /// The TLS handshake with the application failed (nothing can be told in plain text).
    #[error("TLS with the application: {0}")]
    AppTlsHandshake(String),
    /// The node-local CA could not be loaded or created, or issue a certificate.
    #[error("no certificate for TLS toward the application: {0}")]
    AppCertificate(#[source] crate::ca::CaError),
    #[error("the application did not send its handshake response within {0:?}")]
    AppTimeout(Duration),
    #[error("reading the application's handshake response: {0}")]
    AppIo(#[source] io::Error),
    /// A packet with the wrong sequence id (garbage, a confused client): told as MariaDB tells
    /// it, "Got packets out of order".
    #[error("the application sent a packet with sequence id {got}, expected {expected}")]
    AppOutOfOrder { got: u8, expected: u8 },
    #[error("the application closed the connection during the handshake")]
    AppClosed,
    /// The application asked for a user the policy's roles do not name.
    #[error("no role of the policy is for user {user:?}")]
    UnknownRole {
        user: String,
        host: String,
        /// Whether the application sent authentication data ("using password: YES").
        password: bool,
    },
    #[error("resolving credentials: {0}")]
    Secrets(#[source] SecretError),
    #[error(transparent)]
    Dial(DialError),
    #[error("target {addr}: {source}")]
    TargetIo {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("target {addr} closed the connection during the handshake")]
    TargetClosed { addr: SocketAddr },
    #[error("target {addr} did not complete the handshake within {after:?}")]
    TargetTimeout { addr: SocketAddr, after: Duration },
    #[error("target {addr} sent a malformed packet: {source}")]
    TargetProtocol {
        addr: SocketAddr,
        #[source]
        source: ParseError,
    },
    /// The server refused before its greeting (too many connections, host blocked): the
    /// application got the server's ERR as it was sent.
    #[error("target {addr} refused the connection before its greeting: {error}")]
    ServerRefused {
        addr: SocketAddr,
        error: ServerError,
    },
    #[error(transparent)]
    Tls(TlsFailure),
    #[error("target {addr}: {source}")]
    Auth {
        addr: SocketAddr,
        #[source]
        source: AuthError,
    },
    #[error("this workload is not admitted by the policy")]
    Denied,
    /// Direct mode: taking part in the application's own connection failed.
    #[error("direct mode: {0}")]
    HandOver(#[source] io::Error),
    /// Direct mode: the client or server did something direct mode cannot follow exactly.
    #[error("direct mode: {0}")]
    DirectUnsupported(&'static str),
    /// Direct mode: the server ended the handshake with an ERR, which went to the application
    /// as it was sent.
    #[error("target {addr} refused the authentication (the application was told)")]
    ServerEnded { addr: SocketAddr },
    #[error("{0}")]
    Limit(Refusal),
}

impl Failure {
    /// The ERR packet for the application, or `None` when nothing can be told (it is gone) or
    /// it was told already.
    pub fn to_app(&self, policy: &str, conn: u64) -> Option<ErrPacket> {
        let say = |code, what: String| {
            ErrPacket::new(code, format!("latch: policy \"{policy}\": {what}"))
        };
        Some(match self {
            Failure::AppProtocol(_) | Failure::AppTls => say(er::HANDSHAKE_ERROR, self.to_string()),
            Failure::AppOutOfOrder { .. } => ErrPacket::new(
                er::NET_PACKETS_OUT_OF_ORDER,
                format!("Got packets out of order (latch: policy \"{policy}\")"),
            ),
            // MariaDB closes a connection whose client stalls in the handshake without a word.
            Failure::AppTimeout(_)
            | Failure::AppIo(_)
            | Failure::AppClosed
            | Failure::AppTlsHandshake(_)
            | Failure::ServerRefused { .. }
            | Failure::ServerEnded { .. } => return None,
            Failure::HandOver(_) => say(
                CANNOT_REACH,
                format!(
                    "direct mode failed (latch connection {conn}; the agent's log has the details)"
                ),
            ),
            Failure::DirectUnsupported(_) => say(er::HANDSHAKE_ERROR, self.to_string()),
            Failure::AppCertificate(_) => say(
                er::HANDSHAKE_ERROR,
                format!(
                    "no certificate for TLS toward the application: the node-local CA is not \
                     usable (latch connection {conn}; the agent's log has the details)"
                ),
            ),
            // The server's own words for a user it does not know.
            Failure::UnknownRole {
                user,
                host,
                password,
            } => ErrPacket::new(
                er::ACCESS_DENIED_ERROR,
                format!(
                    "Access denied for user '{user}'@'{host}' (using password: {})",
                    if *password { "YES" } else { "NO" }
                ),
            ),
            Failure::Secrets(e) => say(
                if e.is_transient() {
                    CANNOT_REACH
                } else {
                    er::ACCESS_DENIED_ERROR
                },
                format!(
                    "could not resolve the credentials: {} (latch connection {conn}; the \
                     agent's log and audit trail have the details)",
                    e.class()
                ),
            ),
            Failure::Dial(e) => say(CANNOT_REACH, format!("could not reach the target: {e}")),
            Failure::TargetIo { .. }
            | Failure::TargetClosed { .. }
            | Failure::TargetTimeout { .. }
            | Failure::TargetProtocol { .. }
            | Failure::Tls(_) => say(CANNOT_REACH, self.to_string()),
            Failure::Auth { addr, source } => match source {
                AuthError::Server(e) if is_access_denied(e) => say(
                    er::ACCESS_DENIED_ERROR,
                    format!(
                        "the target {addr} rejected the policy's credentials (server error {})",
                        e.code
                    ),
                ),
                // Anything else the server said (unknown database, too many connections…) is
                // the server's to say, as it said it.
                AuthError::Server(e) => ErrPacket {
                    code: e.code,
                    sql_state: e.sql_state,
                    message: e.message.clone().into_bytes(),
                },
                e => say(
                    er::ACCESS_DENIED_ERROR,
                    format!("cannot authenticate to the target {addr}: {e}"),
                ),
            },
            Failure::Denied => say(er::ACCESS_DENIED_ERROR, self.to_string()),
            Failure::Limit(why) => say(super::refusal::code(why), why.to_string()),
        })
    }

    /// Whether the target rejected the credentials: a refresh and one retry may help.
    pub fn is_auth_rejection(&self) -> bool {
        matches!(self, Failure::Auth { source: AuthError::Server(e), .. } if is_access_denied(e))
    }
}

fn is_access_denied(e: &ServerError) -> bool {
    e.code == er::ACCESS_DENIED_ERROR.0
}

/// Writes `err` as a packet with sequence id `seq`; the SQLSTATE goes in only once the
/// application has said it speaks protocol 4.1 (`caps`), as a server does.
pub fn encode(err: &ErrPacket, seq: u8, caps: Option<CapabilityFlags>, out: &mut BytesMut) {
    let mut payload = BytesMut::new();
    err.encode(caps.unwrap_or(CapabilityFlags::empty()), &mut payload);
    latch_mysql::frame::encode(&payload, seq, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_tells_its_class_and_connection_not_the_store() {
        let failure = Failure::Secrets(SecretError::Unreachable {
            store: "vault-prod".into(),
            kind: "vault",
            reason: "https://vault.internal:8200/v1/sys/health: connection refused".into(),
        });
        let err = failure.to_app("orders-db", 17).unwrap();
        let msg = String::from_utf8(err.message).unwrap();
        assert!(
            msg.contains("the secret store is unreachable") && msg.contains("latch connection 17"),
            "{msg}"
        );
        for leak in ["vault-prod", "vault.internal", "8200", "connection refused"] {
            assert!(!msg.contains(leak), "{leak} in {msg}");
        }
    }

    #[test]
    fn only_access_denied_asks_for_fresh_credentials_and_is_told_as_1045_naming_the_policy() {
        let failure = |code: u16, state: &str| Failure::Auth {
            addr: "127.0.0.2:3306".parse().unwrap(),
            source: AuthError::Server(
                ErrPacket::new(
                    (code, state),
                    "Access denied for user 'app'@'127.0.0.1' (using password: YES)",
                )
                .to_server_error(),
            ),
        };
        let denied = failure(1045, "28000");
        assert!(denied.is_auth_rejection());
        assert!(!failure(1049, "42000").is_auth_rejection());
        let err = denied.to_app("orders-db", 3).unwrap();
        assert_eq!((err.code, err.sql_state), (1045, Some(*b"28000")));
        let msg = String::from_utf8(err.message).unwrap();
        assert!(
            msg.contains("policy \"orders-db\"") && msg.contains("rejected"),
            "{msg}"
        );
        // Other server errors reach the application as the server sent them.
        let err = failure(1049, "42000").to_app("orders-db", 3).unwrap();
        assert_eq!(err.code, 1049);
    }

    #[test]
    fn the_sqlstate_marker_is_written_only_after_the_client_said_protocol_41() {
        let err = ErrPacket::new(er::CON_COUNT_ERROR, "too many");
        let mut before = BytesMut::new();
        encode(&err, 0, None, &mut before);
        assert_eq!(&before[..], b"\x0b\x00\x00\x00\xff\x10\x04too many");
        let mut after = BytesMut::new();
        encode(
            &err,
            2,
            Some(CapabilityFlags::CLIENT_PROTOCOL_41),
            &mut after,
        );
        assert_eq!(&after[..], b"\x11\x00\x00\x02\xff\x10\x04#08004too many");
    }
}
