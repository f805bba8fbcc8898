//! Protocol errors: malformed or oversized bytes from either side.

/// Why bytes could not be understood. Messages describe the bytes, never their content when it
/// might hold a secret (password messages are never decoded into errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// A length prefix larger than the limit for this stage.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A length prefix smaller than the header it must cover.
    #[error("invalid message length {0}")]
    BadLength(i64),
    /// The bytes do not form the message their tag or code announces.
    #[error("malformed {what}: {reason}")]
    Malformed {
        what: &'static str,
        reason: &'static str,
    },
    /// A protocol version latch does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: latch supports protocol 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    /// A message that is not allowed at this point of the exchange.
    #[error("unexpected message {tag:?} during {stage}")]
    Unexpected { tag: char, stage: &'static str },
}

impl PgError {
    /// A message that does not parse: `what` names it, `reason` says how.
    pub fn malformed(what: &'static str, reason: &'static str) -> PgError {
        PgError::Malformed { what, reason }
    }
}
