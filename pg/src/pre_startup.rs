//! Everything before a StartupMessage is accepted, answered as PostgreSQL 15 answers it
//! (`ProcessStartupPacket` in `postmaster.c`), without I/O.
//!
//! The bytes each path produces were captured from a real PostgreSQL 15 and are kept as a
//! table in this module's tests. In short: a connection that closes, stalls, sends a length
//! outside 8..=10004 (Terminate `X` first is one) or a packet cut short is closed without a
//! word (the server only logs); an unknown protocol version gets FATAL 0A000 (in the old
//! protocol's format below version 3); a second SSLRequest or GSSENCRequest is an unknown
//! protocol version (1234.5679, 1234.5680); bytes pipelined behind an encryption request get
//! the answer and then FATAL 08P01; a StartupMessage with a bad layout FATAL 08P01, one
//! without a user FATAL 28000. Where latch differs: GSSENCRequest is always declined (as a
//! server without GSSAPI support declines it), errors carry no source location (`F`, `L`,
//! `R` fields), and a parameter that is not UTF-8 is refused.
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

use super::{
    ErrorFields, SqlState,
    backend::ERROR_RESPONSE,
    encode,
    startup::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, Startup},
};

/// The longest first packet, length word included (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`,
/// 10000, counts the body only).
pub const MAX_PACKET_LEN: usize = 10_004;

/// Which encryption a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    Ssl,
    Gss,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// More bytes are needed (room for a complete packet is reserved).
    Pending,
    /// Answer this request with one byte: `N`, or for SSL `S` and a TLS handshake (then call
    /// [`PreStartup::tls_started`]); then call [`PreStartup::next`] again.
    Encryption(Encryption),
    /// A StartupMessage with a user name, protocol major version 3.
    Startup(Startup),
    /// A CancelRequest with a 4-byte key.
    Cancel { pid: i32, secret: i32 },
    /// Send `reply` (often nothing), then close the connection.
    Close(Ending),
}

/// How a connection ends before its startup: what the application is sent, and why (for the
/// log; never shown to the application).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub reply: Bytes,
    pub reason: Reason,
}

/// Why a connection ended before its startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("the application closed the connection before its startup packet")]
    Closed,
    #[error("the application closed the connection in the middle of its startup packet")]
    Incomplete,
    #[error("the application did not send its startup packet in time")]
    Timeout,
    #[error("invalid length of startup packet")]
    InvalidLength,
    #[error("malformed cancel request")]
    BadCancel,
    #[error("unsupported frontend protocol")]
    UnsupportedProtocol,
    #[error("received unencrypted data after an encryption request")]
    UnencryptedData,
    #[error("invalid startup packet layout")]
    Layout,
    #[error("a startup parameter is not valid UTF-8")]
    NotUtf8,
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

impl Ending {
    /// Closing without a word, as PostgreSQL does (it only logs).
    pub fn silent(reason: Reason) -> Ending {
        Ending {
            reply: Bytes::new(),
            reason,
        }
    }

    fn fatal(reason: Reason, fields: ErrorFields) -> Ending {
        let mut out = BytesMut::new();
        fields.encode(ERROR_RESPONSE, &mut out);
        Ending {
            reply: out.freeze(),
            reason,
        }
    }
}

/// The negotiation before the StartupMessage: which encryption requests were answered.
#[derive(Debug, Default)]
pub struct PreStartup {
    ssl_done: bool,
    gss_done: bool,
    /// Bytes arrived together with this request: they were not encrypted.
    unencrypted_after: Option<Encryption>,
}

impl PreStartup {
    /// Takes the next packet off `buf`.
    pub fn next(&mut self, buf: &mut BytesMut) -> Step {
        if let Some(e) = self.unencrypted_after.take() {
            let what = match e {
                Encryption::Ssl => "SSL request",
                Encryption::Gss => "GSSAPI encryption request",
            };
            let mut f = ErrorFields::fatal(
                SqlState::PROTOCOL_VIOLATION,
                format!("received unencrypted data after {what}"),
            );
            f.detail = Some(
                "This could be either a client-software bug or evidence of an attempted \
                 man-in-the-middle attack."
                    .to_owned(),
            );
            return Step::Close(Ending::fatal(Reason::UnencryptedData, f));
        }
        if buf.len() < 4 {
            return Step::Pending;
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if !(8..=MAX_PACKET_LEN as i32).contains(&len) {
            return Step::Close(Ending::silent(Reason::InvalidLength));
        }
        let len = len as usize;
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Step::Pending;
        }
        let mut packet = buf.split_to(len);
        packet.advance(4);
        let code = packet.get_u32();
        let body = &packet[..];
        match code {
            CANCEL_REQUEST_CODE => match body {
                [a, b, c, d, e, f, g, h] => Step::Cancel {
                    pid: i32::from_be_bytes([*a, *b, *c, *d]),
                    secret: i32::from_be_bytes([*e, *f, *g, *h]),
                },
                _ => Step::Close(Ending::silent(Reason::BadCancel)),
            },
            // PostgreSQL does not look at the length of an encryption request.
            SSL_REQUEST_CODE if !self.ssl_done => {
                self.ssl_done = true;
                self.encryption(Encryption::Ssl, buf)
            }
            GSSENC_REQUEST_CODE if !self.gss_done => {
                self.gss_done = true;
                self.encryption(Encryption::Gss, buf)
            }
            version if version >> 16 != 3 => Step::Close(unsupported(version)),
            version => startup(version, body),
        }
    }

    /// TLS was started after an SSLRequest: a GSSENCRequest is no longer allowed.
    pub fn tls_started(&mut self) {
        self.gss_done = true;
    }

    /// The application closed the connection (or stopped sending) with `buf` unread.
    pub fn closed(&self, buf: &BytesMut) -> Ending {
        Ending::silent(if buf.is_empty() {
            Reason::Closed
        } else {
            Reason::Incomplete
        })
    }

    fn encryption(&mut self, e: Encryption, buf: &BytesMut) -> Step {
        if !buf.is_empty() {
            self.unencrypted_after = Some(e);
        }
        Step::Encryption(e)
    }
}

/// FATAL 0A000 for a protocol version other than 3.x; below 3, in the old protocol's format
/// (`E`, then one string), which is what such a client understands.
fn unsupported(version: u32) -> Ending {
    let message = format!(
        "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
        version >> 16,
        version & 0xffff
    );
    if version >> 16 >= 3 {
        return Ending::fatal(
            Reason::UnsupportedProtocol,
            ErrorFields::fatal(SqlState::FEATURE_NOT_SUPPORTED, message),
        );
    }
    let mut out = BytesMut::with_capacity(message.len() + 12);
    out.put_u8(ERROR_RESPONSE);
    out.put_slice(b"FATAL:  ");
    out.put_slice(message.as_bytes());
    out.put_slice(b"\n\0");
    Ending {
        reply: out.freeze(),
        reason: Reason::UnsupportedProtocol,
    }
}

/// A protocol 3.x StartupMessage body (after the version), scanned as PostgreSQL scans it.
fn startup(version: u32, body: &[u8]) -> Step {
    let layout = || {
        Step::Close(Ending::fatal(
            Reason::Layout,
            ErrorFields::fatal(
                SqlState::PROTOCOL_VIOLATION,
                "invalid startup packet layout: expected terminator as last byte",
            ),
        ))
    };
    // A string runs to its NUL or to the end of the packet (PostgreSQL appends a NUL).
    let cstr = |at: usize| {
        let rest = &body[at.min(body.len())..];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let mut params = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let name = cstr(at);
        if name.is_empty() {
            break;
        }
        let value_at = at + name.len() + 1;
        if value_at >= body.len() {
            break;
        }
        let value = cstr(value_at);
        params.push((name, value));
        at = value_at + value.len() + 1;
    }
    if at + 1 != body.len() {
        return layout();
    }
    let Ok(params) = params
        .into_iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8(k.to_vec())?,
                String::from_utf8(v.to_vec())?,
            ))
        })
        .collect::<Result<Vec<_>, std::string::FromUtf8Error>>()
    else {
        return Step::Close(Ending::fatal(
            Reason::NotUtf8,
            ErrorFields::fatal(
                SqlState::PROTOCOL_VIOLATION,
                "latch: startup parameters must be valid UTF-8",
            ),
        ));
    };
    let startup = Startup {
        major: 3,
        minor: (version & 0xffff) as u16,
        params,
    };
    if startup.get("user").is_none_or(str::is_empty) {
        // PostgreSQL negotiates the protocol version before it looks for the user.
        let mut out = BytesMut::new();
        let unrecognized: Vec<String> = startup
            .params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect();
        if startup.minor > 0 || !unrecognized.is_empty() {
            encode::negotiate_protocol_version(&unrecognized, &mut out);
        }
        ErrorFields::fatal(
            SqlState::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .encode(ERROR_RESPONSE, &mut out);
        return Step::Close(Ending {
            reply: out.freeze(),
            reason: Reason::NoUser,
        });
    }
    Step::Startup(startup)
}

#[cfg(test)]
#[path = "pre_startup_tests.rs"]
mod tests;
