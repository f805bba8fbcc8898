//! ErrorResponse and NoticeResponse: a list of (field type, text) pairs.
use bytes::{BufMut as _, BytesMut};

use super::{
    PgError,
    frame::{Reader, put_cstr, write_msg},
};

/// A SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const UNABLE_TO_CONNECT: SqlState = SqlState("08001");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
}

/// The fields of an ErrorResponse/NoticeResponse latch cares about, and the rest as they came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S` (localized) or, if absent, `V`.
    pub severity: String,
    /// `C`.
    pub code: String,
    /// `M`.
    pub message: String,
    /// `D`.
    pub detail: Option<String>,
    /// `H`.
    pub hint: Option<String>,
}

impl ErrorFields {
    /// A FATAL error with `code` and `message`.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> ErrorFields {
        ErrorFields {
            severity: "FATAL".to_owned(),
            code: code.0.to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> ErrorFields {
        self.hint = Some(hint.into());
        self
    }

    /// Decodes an ErrorResponse/NoticeResponse body. Texts that are not UTF-8 are decoded
    /// lossily (servers may use another encoding before the client encoding is known).
    pub fn decode(body: &[u8]) -> Result<ErrorFields, PgError> {
        let mut r = Reader::new(body, "ErrorResponse");
        let mut f = ErrorFields::default();
        let mut v = None;
        loop {
            let t = r.u8()?;
            if t == 0 {
                break;
            }
            let text = String::from_utf8_lossy(r.cstr()?).into_owned();
            match t {
                b'S' => f.severity = text,
                b'V' => v = Some(text),
                b'C' => f.code = text,
                b'M' => f.message = text,
                b'D' => f.detail = Some(text),
                b'H' => f.hint = Some(text),
                _ => {}
            }
        }
        r.finish()?;
        if f.severity.is_empty() {
            f.severity = v.unwrap_or_default();
        }
        Ok(f)
    }

    /// Writes an ErrorResponse (`tag` b'E') or NoticeResponse (b'N').
    pub fn encode(&self, tag: u8, out: &mut BytesMut) {
        write_msg(out, tag, |b| {
            for (t, v) in [
                (b'S', Some(&self.severity)),
                (b'V', Some(&self.severity)),
                (b'C', Some(&self.code)),
                (b'M', Some(&self.message)),
                (b'D', self.detail.as_ref()),
                (b'H', self.hint.as_ref()),
            ] {
                if let Some(v) = v {
                    b.put_u8(t);
                    put_cstr(b, v);
                }
            }
            b.put_u8(0);
        });
    }

    /// Whether the server refused the credentials (28P01 invalid password, 28000 invalid
    /// authorization such as "role does not exist" or an hba rejection).
    pub fn is_auth_failure(&self) -> bool {
        self.code == SqlState::INVALID_PASSWORD.0 || self.code == SqlState::INVALID_AUTHORIZATION.0
    }
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}
