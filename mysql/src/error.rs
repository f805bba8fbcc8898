//! Typed errors. None of them holds a password, a scramble response or any other secret: a
//! connector may log them and put their text in an ERR packet.
use std::fmt;

/// Framing errors: the packet stream itself cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The packet (all its continuation chunks together) is longer than the caller allows.
    /// Raised as soon as a header says so, before any of its payload is buffered.
    #[error("packet of at least {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A sequence id other than the expected one.
    #[error("packet sequence id {got}, expected {expected}")]
    Sequence { expected: u8, got: u8 },
}

/// A packet whose layout does not match what its type requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct ParseError {
    /// The packet being read ("HandshakeV10", "HandshakeResponse41", ...).
    pub what: &'static str,
    /// What was wrong with it.
    pub why: &'static str,
}

impl ParseError {
    pub(crate) fn new(what: &'static str, why: &'static str) -> Self {
        ParseError { what, why }
    }
}

/// A value that cannot be put on the wire in the form the capabilities require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {what}: {why}")]
pub struct EncodeError {
    pub what: &'static str,
    pub why: &'static str,
}

/// An ERR packet from the server: its code, SQLSTATE and message, as the server sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: u16,
    /// The five SQLSTATE characters, when the packet carried the `#` marker.
    pub sql_state: Option<[u8; 5]>,
    pub message: String,
}

impl ServerError {
    /// The SQLSTATE as text (`HY000` when the server sent none, as clients report it).
    pub fn sql_state_str(&self) -> &str {
        self.sql_state
            .as_ref()
            .and_then(|s| std::str::from_utf8(s).ok())
            .unwrap_or("HY000")
    }
}

impl fmt::Debug for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerError")
            .field("code", &self.code)
            .field("sql_state", &self.sql_state_str())
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ERROR {} ({}): {}",
            self.code,
            self.sql_state_str(),
            self.message
        )
    }
}

/// Why the client side of authentication stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The server answered with ERR (wrong password, unknown user, too many connections, ...).
    #[error("server refused the connection: {0}")]
    Server(ServerError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Malformed(#[from] ParseError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A packet that has no meaning at this point of the exchange.
    #[error("unexpected packet (first byte {first_byte:#04x}) while {state}")]
    Unexpected { state: &'static str, first_byte: u8 },
    /// The server asked for a plugin latch does not implement.
    #[error("server asked for unsupported authentication plugin {0:?}")]
    UnsupportedPlugin(String),
    /// A plugin that would reveal the password (mysql_clear_password) on a connection that is
    /// not TLS with a verified server certificate.
    #[error(
        "{plugin} sends the password in clear text; refused on a connection without verified TLS"
    )]
    ClearTextRefused { plugin: &'static str },
    /// caching_sha2_password full authentication without TLS, with asking the server for its
    /// public key disabled and no key configured.
    #[error(
        "caching_sha2_password full authentication needs TLS or the server's RSA public key, and requesting the key is disabled"
    )]
    PublicKeyRequestRefused,
    /// The server's RSA public key could not be read.
    #[error("server RSA public key is not a PEM RSA public key")]
    BadPublicKey,
    /// RSA encryption of the password failed (for example a key too small for it).
    #[error("RSA-OAEP encryption of the password failed")]
    Rsa,
    /// The scramble a plugin received has the wrong length for it.
    #[error("{plugin} scramble of {len} bytes, expected {expected}")]
    BadScramble {
        plugin: &'static str,
        len: usize,
        expected: usize,
    },
    /// The server kept switching plugins or asking for more data.
    #[error("authentication did not finish within {0} server packets")]
    TooManyRounds(usize),
    /// The operating system's random source failed.
    #[error("random source failed")]
    Random,
    /// A packet after the exchange finished.
    #[error("authentication already finished")]
    Finished,
}
