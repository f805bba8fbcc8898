//! OK and ERR packets, as the connection phase uses them: the server's final answer to a
//! handshake (or to COM_CHANGE_USER / COM_RESET_CONNECTION), and what latch answers an
//! application with.
//!
//! OK: 0x00, affected rows and last insert id (length-encoded), then with CLIENT_PROTOCOL_41
//! the status flags and warning count (2 + 2); then with CLIENT_SESSION_TRACK a length-encoded
//! info string and, when the status says SERVER_SESSION_STATE_CHANGED, the length-encoded
//! session state changes; without it the info is the rest of the packet.
//! ERR: 0xFF, the error code (2), with CLIENT_PROTOCOL_41 `#` and the five-character SQLSTATE,
//! then the message (rest of the packet). Before the server knows the client's capabilities
//! (an ERR in place of the greeting) the marker is absent.
use bytes::{BufMut as _, BytesMut};

use crate::constants::{CapabilityFlags, ERR_HEADER, OK_HEADER, StatusFlags};
use crate::error::{ParseError, ServerError};
use crate::wire::{Reader, put_lenenc, put_lenenc_bytes};

/// An OK packet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: StatusFlags,
    pub warnings: u16,
    /// Human-readable information (usually empty in the handshake).
    pub info: Vec<u8>,
    /// Raw session state changes (CLIENT_SESSION_TRACK), e.g. the schema the OK of a handshake
    /// with a database reports.
    pub session_state: Option<Vec<u8>>,
}

impl OkPacket {
    /// An OK for a handshake latch completes itself: nothing affected, `status` as given.
    pub fn new(status: StatusFlags) -> OkPacket {
        OkPacket {
            status,
            ..OkPacket::default()
        }
    }

    /// Reads an OK packet (header 0x00) under the client capabilities `caps`.
    pub fn parse(payload: &[u8], caps: CapabilityFlags) -> Result<OkPacket, ParseError> {
        let mut r = Reader::new(payload, "OK packet");
        if r.u8("empty packet")? != OK_HEADER {
            return Err(r.err("header is not 0x00"));
        }
        let affected_rows = r.lenenc("truncated affected rows")?;
        let last_insert_id = r.lenenc("truncated last insert id")?;
        let (status, warnings) = if caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
            let s = r.u16("truncated status flags")?;
            (
                StatusFlags::from_bits_retain(s),
                r.u16("truncated warnings")?,
            )
        } else if caps.contains(CapabilityFlags::CLIENT_TRANSACTIONS) {
            (
                StatusFlags::from_bits_retain(r.u16("truncated status flags")?),
                0,
            )
        } else {
            (StatusFlags::empty(), 0)
        };
        let (info, session_state) = if caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK) {
            // MariaDB and MySQL omit the info string entirely when it is empty and there is
            // nothing after it.
            let info = if r.is_empty() {
                &[][..]
            } else {
                r.lenenc_bytes("info longer than the packet")?
            };
            let state =
                if status.contains(StatusFlags::SERVER_SESSION_STATE_CHANGED) && !r.is_empty() {
                    Some(
                        r.lenenc_bytes("session state longer than the packet")?
                            .to_vec(),
                    )
                } else {
                    None
                };
            (info.to_vec(), state)
        } else {
            (r.rest().to_vec(), None)
        };
        if !r.is_empty() {
            return Err(r.err("trailing bytes"));
        }
        Ok(OkPacket {
            affected_rows,
            last_insert_id,
            status,
            warnings,
            info,
            session_state,
        })
    }

    /// Writes the payload for a client with capabilities `caps`.
    pub fn encode(&self, caps: CapabilityFlags, out: &mut BytesMut) {
        out.put_u8(OK_HEADER);
        put_lenenc(out, self.affected_rows);
        put_lenenc(out, self.last_insert_id);
        if caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
            out.put_u16_le(self.status.bits());
            out.put_u16_le(self.warnings);
        } else if caps.contains(CapabilityFlags::CLIENT_TRANSACTIONS) {
            out.put_u16_le(self.status.bits());
        }
        if caps.contains(CapabilityFlags::CLIENT_SESSION_TRACK) {
            let state = self.session_state.as_ref().filter(|_| {
                self.status
                    .contains(StatusFlags::SERVER_SESSION_STATE_CHANGED)
            });
            if !self.info.is_empty() || state.is_some() {
                put_lenenc_bytes(out, &self.info);
            }
            if let Some(state) = state {
                put_lenenc_bytes(out, state);
            }
        } else {
            out.put_slice(&self.info);
        }
    }
}

/// An ERR packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    pub sql_state: Option<[u8; 5]>,
    pub message: Vec<u8>,
}

impl ErrPacket {
    /// An error to send: `(code, sqlstate)` as in [`crate::constants::er`], and a message.
    /// A SQLSTATE that is not five ASCII characters is replaced by `HY000`.
    pub fn new(code_state: (u16, &str), message: impl Into<String>) -> ErrPacket {
        let (code, state) = code_state;
        let state = <[u8; 5]>::try_from(state.as_bytes())
            .ok()
            .filter(|s| s.iter().all(u8::is_ascii_alphanumeric))
            .unwrap_or(*b"HY000");
        ErrPacket {
            code,
            sql_state: Some(state),
            message: message.into().into_bytes(),
        }
    }

    /// Reads an ERR packet (header 0xFF). The `#` marker decides whether a SQLSTATE follows,
    /// so this reads an ERR sent before or after capabilities were agreed.
    pub fn parse(payload: &[u8]) -> Result<ErrPacket, ParseError> {
        let mut r = Reader::new(payload, "ERR packet");
        if r.u8("empty packet")? != ERR_HEADER {
            return Err(r.err("header is not 0xFF"));
        }
        let code = r.u16("truncated error code")?;
        let sql_state = if r.peek() == Some(b'#') && r.remaining() >= 6 {
            r.u8("truncated")?;
            let s = r.take(5, "truncated SQLSTATE")?;
            Some([s[0], s[1], s[2], s[3], s[4]])
        } else {
            None
        };
        Ok(ErrPacket {
            code,
            sql_state,
            message: r.rest().to_vec(),
        })
    }

    /// Writes the payload; the SQLSTATE (HY000 when none) goes in with CLIENT_PROTOCOL_41.
    pub fn encode(&self, caps: CapabilityFlags, out: &mut BytesMut) {
        out.put_u8(ERR_HEADER);
        out.put_u16_le(self.code);
        if caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
            out.put_u8(b'#');
            out.put_slice(&self.sql_state.unwrap_or(*b"HY000"));
        }
        out.put_slice(&self.message);
    }

    /// As a typed error (message decoded lossily).
    pub fn to_server_error(&self) -> ServerError {
        ServerError {
            code: self.code,
            sql_state: self.sql_state,
            message: String::from_utf8_lossy(&self.message).into_owned(),
        }
    }
}
