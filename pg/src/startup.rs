//! The first packet of a connection: untagged, a big-endian `i32` length (counting itself) and
//! an `i32` code — a protocol version (StartupMessage) or one of the special request codes.
use bytes::{BufMut as _, BytesMut};

use super::{PgError, frame::Reader};

/// The largest first packet latch accepts from an application (PostgreSQL's own limit is
/// 10000 bytes).
pub const MAX_STARTUP_LEN: usize = 10_000;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// What an application's first packet asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initial {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(Startup),
}

/// A StartupMessage: its version and parameters in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl Startup {
    /// The value of parameter `name`, if sent (the last one wins, as in PostgreSQL).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Takes the first packet off `buf`; `Ok(None)` until it is complete. The length is checked
/// against `max_len` before the body is buffered.
pub fn parse(buf: &mut BytesMut, max_len: usize) -> Result<Option<Initial>, PgError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(PgError::BadLength(len.into()));
    }
    let len = len as usize;
    if len > max_len {
        return Err(PgError::TooLarge { len, max: max_len });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let packet = buf.split_to(len);
    decode(&packet[4..]).map(Some)
}

/// Decodes a first packet's body (after the length).
pub fn decode(body: &[u8]) -> Result<Initial, PgError> {
    let mut r = Reader::new(body, "startup packet");
    let code = r.i32()? as u32;
    let fixed = |r: &Reader<'_>, what: &'static str| {
        r.finish()
            .map_err(|_| PgError::malformed(what, "wrong length"))
    };
    match code {
        SSL_REQUEST_CODE => fixed(&r, "SSLRequest").map(|()| Initial::SslRequest),
        GSSENC_REQUEST_CODE => fixed(&r, "GSSENCRequest").map(|()| Initial::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let mut r = Reader::new(r.rest(), "CancelRequest");
            let pid = r.i32()?;
            let secret = r.i32()?;
            // Protocol 3.2 allows longer keys; latch hands out 4-byte keys only.
            fixed(&r, "CancelRequest")?;
            Ok(Initial::Cancel { pid, secret })
        }
        version => {
            let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
            if major != 3 {
                return Err(PgError::UnsupportedVersion { major, minor });
            }
            let mut params = Vec::new();
            let mut r = Reader::new(r.rest(), "StartupMessage");
            loop {
                let name = r.str()?;
                if name.is_empty() {
                    break;
                }
                let value = r.str()?;
                params.push((name.to_owned(), value.to_owned()));
            }
            r.finish()?;
            Ok(Initial::Startup(Startup {
                major,
                minor,
                params,
            }))
        }
    }
}

/// Encodes a StartupMessage (protocol 3.0) with `params`.
pub fn encode_startup<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
    out: &mut BytesMut,
) {
    let at = out.len();
    out.put_i32(0);
    out.put_u32(super::PROTOCOL_3_0);
    for (k, v) in params {
        super::frame::put_cstr(out, k);
        super::frame::put_cstr(out, v);
    }
    out.put_u8(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes an SSLRequest.
pub fn encode_ssl_request(out: &mut BytesMut) {
    out.put_i32(8);
    out.put_u32(SSL_REQUEST_CODE);
}

/// Encodes a CancelRequest.
pub fn encode_cancel(pid: i32, secret: i32, out: &mut BytesMut) {
    out.put_i32(16);
    out.put_u32(CANCEL_REQUEST_CODE);
    out.put_i32(pid);
    out.put_i32(secret);
}

/// Why an application's StartupMessage cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupRefusal {
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("replication connections are not allowed through latch")]
    Replication,
}

/// The StartupMessage latch sends to the server, and what to tell the application first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// Parameters for the server, in the application's order.
    pub params: Vec<(String, String)>,
    /// `_pq_.` options the application asked for that are not passed on; with a minor version
    /// above 0 they are reported in a NegotiateProtocolVersion.
    pub unrecognized: Vec<String>,
    /// Whether the application must be sent NegotiateProtocolVersion (minor > 0 or options).
    pub negotiate: bool,
}

/// Rewrites an application's StartupMessage for the server: `user` becomes `policy_user` when
/// the policy names one (the application's `database` default — its own user name — is kept
/// explicit), `_pq_.` protocol options are dropped (and reported), `replication` is refused,
/// everything else is passed through in order.
pub fn rewrite(app: &Startup, policy_user: Option<&str>) -> Result<Rewritten, StartupRefusal> {
    if let Some(v) = app.get("replication")
        && !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    {
        return Err(StartupRefusal::Replication);
    }
    let app_user = app.get("user").filter(|u| !u.is_empty());
    let user = policy_user.or(app_user).ok_or(StartupRefusal::NoUser)?;
    let mut params = Vec::with_capacity(app.params.len() + 1);
    let mut unrecognized = Vec::new();
    params.push(("user".to_owned(), user.to_owned()));
    let mut has_database = false;
    for (k, v) in &app.params {
        if k == "user" || k == "replication" || params.iter().any(|(p, _)| p == k) {
            continue;
        }
        if k.starts_with("_pq_.") {
            if !unrecognized.contains(k) {
                unrecognized.push(k.clone());
            }
            continue;
        }
        has_database |= k == "database";
        params.push((k.clone(), app.get(k).unwrap_or(v).to_owned()));
    }
    // The server's default database is the user name; keep the application's.
    if !has_database && let Some(u) = app_user.filter(|u| Some(*u) != policy_user) {
        params.push(("database".to_owned(), u.to_owned()));
    }
    let negotiate = app.minor > 0 || !unrecognized.is_empty();
    Ok(Rewritten {
        params,
        unrecognized,
        negotiate,
    })
}
