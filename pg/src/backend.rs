//! Decoding the messages a server sends during startup.
use super::{Frame, PgError, error_fields::ErrorFields, frame::Reader};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

/// An authentication request (`R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    /// Kerberos, GSSAPI, SSPI and anything newer: latch cannot answer these.
    Other(i32),
}

/// A startup-time message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Auth(AuthRequest),
    BackendKeyData {
        pid: i32,
        secret: i32,
    },
    ParameterStatus {
        name: String,
        value: String,
    },
    ReadyForQuery {
        status: u8,
    },
    Error(ErrorFields),
    Notice,
    NegotiateProtocolVersion {
        minor: i32,
        unrecognized: Vec<String>,
    },
    /// Any other message: not expected before ReadyForQuery.
    Other(u8),
}

impl BackendMessage {
    pub fn decode(frame: &Frame) -> Result<BackendMessage, PgError> {
        let body = &frame.body[..];
        Ok(match frame.tag {
            AUTHENTICATION => BackendMessage::Auth(decode_auth(body)?),
            BACKEND_KEY_DATA => {
                let mut r = Reader::new(body, "BackendKeyData");
                let pid = r.i32()?;
                let secret = r.i32()?;
                // Protocol 3.2 keys may be longer; latch asks the server for 3.0.
                r.finish()?;
                BackendMessage::BackendKeyData { pid, secret }
            }
            PARAMETER_STATUS => {
                let mut r = Reader::new(body, "ParameterStatus");
                let name = String::from_utf8_lossy(r.cstr()?).into_owned();
                let value = String::from_utf8_lossy(r.cstr()?).into_owned();
                r.finish()?;
                BackendMessage::ParameterStatus { name, value }
            }
            READY_FOR_QUERY => {
                let mut r = Reader::new(body, "ReadyForQuery");
                let status = r.u8()?;
                r.finish()?;
                BackendMessage::ReadyForQuery { status }
            }
            ERROR_RESPONSE => BackendMessage::Error(ErrorFields::decode(body)?),
            NOTICE_RESPONSE => {
                ErrorFields::decode(body)?;
                BackendMessage::Notice
            }
            NEGOTIATE_PROTOCOL_VERSION => {
                let mut r = Reader::new(body, "NegotiateProtocolVersion");
                let minor = r.i32()?;
                let n = r.i32()?;
                if n < 0 || n as usize > body.len() {
                    return Err(PgError::malformed(
                        "NegotiateProtocolVersion",
                        "bad option count",
                    ));
                }
                let mut unrecognized = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    unrecognized.push(String::from_utf8_lossy(r.cstr()?).into_owned());
                }
                r.finish()?;
                BackendMessage::NegotiateProtocolVersion {
                    minor,
                    unrecognized,
                }
            }
            other => BackendMessage::Other(other),
        })
    }
}

fn decode_auth(body: &[u8]) -> Result<AuthRequest, PgError> {
    let mut r = Reader::new(body, "Authentication");
    let code = r.i32()?;
    let req = match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let rest = r.rest();
            let salt: [u8; 4] = rest.try_into().map_err(|_| {
                PgError::malformed("AuthenticationMD5Password", "salt is not 4 bytes")
            })?;
            AuthRequest::Md5Password { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.str()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m.to_owned());
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(r.rest().to_vec()),
        12 => AuthRequest::SaslFinal(r.rest().to_vec()),
        other => {
            r.rest();
            AuthRequest::Other(other)
        }
    };
    r.finish()?;
    Ok(req)
}
