//! Why a PostgreSQL session could not be brokered, and how the application is told: an
//! ErrorResponse with severity FATAL, a SQLSTATE and a message naming the policy and what
//! failed — never a secret.
use std::{io, net::SocketAddr, time::Duration};

use crate::{
    connector::{DialError, Refusal, target_tls::TlsFailure},
    secrets::SecretError,
};
use latch_pg::{
    ErrorFields, PgError, SqlState, auth::AuthError, handshake::HandshakeError,
    startup::StartupRefusal,
};

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("malformed startup packet from the application: {0}")]
    AppProtocol(#[source] PgError),
    #[error("the application did not send a complete startup packet within {0:?}")]
    AppTimeout(Duration),
    #[error("reading the application's startup packet: {0}")]
    AppIo(#[source] io::Error),
    #[error("the application closed the connection before its startup packet")]
    AppClosed,
    #[error("TLS with the application: {0}")]
    AppTls(String),
    /// The node-local CA could not be loaded or created, or issue a certificate.
    #[error("no certificate for TLS toward the application: {0}")]
    AppCertificate(#[source] crate::ca::CaError),
    /// The application's first packets ended the connection: it is told what PostgreSQL
    /// would tell it ([`Failure::reply`]), often nothing.
    #[error("before the startup packet: {}", .0.reason)]
    PreStartup(latch_pg::pre_startup::Ending),
    #[error("{0}")]
    Refused(#[source] StartupRefusal),
    /// The policy does not let the application ask for this role, database or setting: it is
    /// told what PostgreSQL 15 says ([`latch_pg::startup_rules`]).
    #[error("refused by the policy's startup rules: {0}")]
    Startup(#[source] latch_pg::startup_rules::Refusal),
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
    #[error("target {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: HandshakeError,
    },
    #[error(transparent)]
    Tls(TlsFailure),
    #[error("this workload is not admitted by the policy")]
    Denied,
    /// A limit of the agent's (the same words as the relay's refusals).
    #[error("{0}")]
    Limit(Refusal),
    #[error("handing the connection over to the kernel: {0}")]
    HandOver(#[source] io::Error),
    #[error(
        "target {addr} ended the startup (its ErrorResponse went to the application as the \
         server sent it)"
    )]
    ServerEnded { addr: SocketAddr },
}

impl Failure {
    /// The ErrorResponse for the application of connection `conn`, or `None` when it cannot be
    /// told (it is gone or stalled).
    pub fn to_app(&self, policy: &str, conn: u64) -> Option<ErrorFields> {
        let say = |code, what: String| {
            ErrorFields::fatal(code, format!("latch: policy \"{policy}\": {what}"))
        };
        Some(match self {
            Failure::AppProtocol(PgError::UnsupportedVersion { .. }) => {
                say(SqlState::FEATURE_NOT_SUPPORTED, self.to_string())
            }
            Failure::AppProtocol(_) => say(SqlState::PROTOCOL_VIOLATION, self.to_string()),
            Failure::AppTimeout(_) => say(SqlState::PROTOCOL_VIOLATION, self.to_string()),
            Failure::AppIo(_)
            | Failure::AppClosed
            | Failure::AppTls(_)
            | Failure::PreStartup(_) => return None,
            Failure::Denied => say(SqlState::INVALID_AUTHORIZATION, self.to_string()),
            // The state directory and the CA's own words stay in the agent's log.
            Failure::AppCertificate(_) => say(
                SqlState::INTERNAL_ERROR,
                format!(
                    "no certificate for TLS toward the application: the node-local CA is not \
                     usable (latch connection {conn}; the agent's log has the details)"
                ),
            ),
            Failure::Limit(why) => say(super::refusal::sqlstate(why), self.to_string()),
            // The server's own words, so that an application cannot tell latch from a server
            // configured to refuse it (docs/internals/postgres-startup.md).
            Failure::Startup(r) => r.fields(),
            Failure::HandOver(_) => say(SqlState::CONNECTION_FAILURE, self.to_string()),
            // The application has the server's own message already.
            Failure::ServerEnded { .. } => return None,
            Failure::Refused(StartupRefusal::Replication) => {
                say(SqlState::INSUFFICIENT_PRIVILEGE, self.to_string())
            }
            Failure::Refused(StartupRefusal::NoUser) => {
                say(SqlState::INVALID_AUTHORIZATION, self.to_string())
            }
            Failure::Secrets(e) => {
                let code = if e.is_transient() {
                    SqlState::UNABLE_TO_CONNECT
                } else {
                    SqlState::INVALID_AUTHORIZATION
                };
                // The store's name, address and own words stay in the log and the audit record
                // of this connection: the application learns the kind of failure.
                say(
                    code,
                    format!(
                        "could not resolve the credentials: {} (latch connection {conn}; the \
                         agent's log and audit trail have the details)",
                        e.class()
                    ),
                )
            }
            Failure::Dial(e) => say(
                SqlState::UNABLE_TO_CONNECT,
                format!("could not reach the target: {e}"),
            ),
            Failure::TargetIo { .. }
            | Failure::TargetClosed { .. }
            | Failure::TargetTimeout { .. } => say(SqlState::CONNECTION_FAILURE, self.to_string()),
            Failure::Tls(_) => say(SqlState::UNABLE_TO_CONNECT, self.to_string()),
            Failure::Handshake { addr, source } => match source {
                HandshakeError::Server(f) if f.is_auth_failure() => say(
                    if f.code == SqlState::INVALID_PASSWORD.0 {
                        SqlState::INVALID_PASSWORD
                    } else {
                        SqlState::INVALID_AUTHORIZATION
                    },
                    format!(
                        "the target {addr} rejected the policy's credentials (server error {})",
                        f.code
                    ),
                ),
                // Anything else the server said (no such database, too many connections…) is
                // the server's to say, as it said it.
                HandshakeError::Server(f) => f.clone(),
                HandshakeError::Auth(e @ AuthError::Scram(_)) => say(
                    SqlState::INVALID_AUTHORIZATION,
                    format!("authentication to the target {addr} failed: {e}"),
                ),
                HandshakeError::Auth(e) => say(
                    SqlState::INVALID_AUTHORIZATION,
                    format!("cannot authenticate to the target {addr}: {e}"),
                ),
                HandshakeError::Protocol(e) => say(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("the target {addr} broke the protocol: {e}"),
                ),
                HandshakeError::Flood => say(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("the target {addr} broke the protocol: {source}"),
                ),
            },
        })
    }

    /// The bytes that tell the application, if anything is to be said: PostgreSQL's own answer
    /// before the startup packet, else the ErrorResponse of [`Failure::to_app`].
    pub fn reply(&self, policy: &str, conn: u64) -> Option<bytes::Bytes> {
        if let Failure::PreStartup(e) = self {
            return (!e.reply.is_empty()).then(|| e.reply.clone());
        }
        let mut out = bytes::BytesMut::new();
        self.to_app(policy, conn)?
            .encode(latch_pg::backend::ERROR_RESPONSE, &mut out);
        Some(out.freeze())
    }

    /// Whether the target rejected the password (28P01): a refresh and one retry may help.
    /// Not 28000: an application can provoke that at will (a database pg_hba refuses), and with
    /// dynamic credentials each refresh mints a lease and a role.
    pub fn is_auth_rejection(&self) -> bool {
        matches!(self, Failure::Handshake { source: HandshakeError::Server(f), .. }
            if f.code == SqlState::INVALID_PASSWORD.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_tells_the_application_its_class_and_connection_not_the_store() {
        let failure = Failure::Secrets(crate::secrets::SecretError::Unreachable {
            store: "vault-prod".into(),
            kind: "vault",
            reason: "https://vault.internal:8200/v1/sys/health: connection refused".into(),
        });
        let fields = failure.to_app("orders-db", 17).unwrap();
        let msg = &fields.message;
        assert!(
            msg.contains("the secret store is unreachable") && msg.contains("latch connection 17"),
            "{msg}"
        );
        for leak in ["vault-prod", "vault.internal", "8200", "connection refused"] {
            assert!(!msg.contains(leak), "{leak} in {msg}");
        }
    }

    #[test]
    fn only_a_rejected_password_asks_for_fresh_credentials() {
        let failure = |state: SqlState| Failure::Handshake {
            addr: "127.0.0.2:5432".parse().unwrap(),
            source: HandshakeError::Server(ErrorFields::fatal(state, "no")),
        };
        assert!(failure(SqlState::INVALID_PASSWORD).is_auth_rejection());
        assert!(!failure(SqlState::INVALID_AUTHORIZATION).is_auth_rejection());
    }
}
