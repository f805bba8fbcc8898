//! The commands latch must recognise after the handshake, when it watches the application's
//! command stream: COM_CHANGE_USER (re-authentication, which latch performs itself with the
//! policy's credentials), COM_RESET_CONNECTION (passes through) and COM_QUIT. Everything else
//! is relayed untouched.
//!
//! COM_CHANGE_USER: 0x11, the user (NUL-terminated), the authentication data (one length byte
//! with CLIENT_SECURE_CONNECTION, else NUL-terminated), the database (NUL-terminated), then, if
//! the packet goes on, the collation (2), the plugin name (NUL-terminated, with
//! CLIENT_PLUGIN_AUTH) and the connect attributes (with CLIENT_CONNECT_ATTRS). The
//! authentication data is computed over the scramble of the connection's greeting.
use bytes::{BufMut as _, BytesMut};

use crate::constants::{COM_CHANGE_USER, COM_QUIT, COM_RESET_CONNECTION, CapabilityFlags};
use crate::error::{EncodeError, ParseError};
use crate::response::{AuthResponse, ConnectAttrs};
use crate::wire::{Reader, put_nul_bytes};

const WHAT: &str = "COM_CHANGE_USER";

/// A command packet, as far as latch cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Quit,
    ResetConnection,
    ChangeUser(ChangeUser),
    /// Any other command: its first byte.
    Other(u8),
}

impl Command {
    /// Reads the first packet of a command (sequence id 0) under the client capabilities.
    pub fn parse(payload: &[u8], caps: CapabilityFlags) -> Result<Command, ParseError> {
        match payload.first() {
            None => Err(ParseError::new("command", "empty packet")),
            Some(&COM_QUIT) => Ok(Command::Quit),
            Some(&COM_RESET_CONNECTION) => Ok(Command::ResetConnection),
            Some(&COM_CHANGE_USER) => ChangeUser::parse(payload, caps).map(Command::ChangeUser),
            Some(&b) => Ok(Command::Other(b)),
        }
    }
}

/// COM_CHANGE_USER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeUser {
    pub username: Vec<u8>,
    /// The application's authentication data: dropped, never forwarded.
    pub auth_response: AuthResponse,
    pub database: Vec<u8>,
    /// Present when the packet goes on after the database.
    pub charset: Option<u16>,
    pub auth_plugin: Option<Vec<u8>>,
    pub connect_attrs: Option<ConnectAttrs>,
}

impl ChangeUser {
    pub fn parse(payload: &[u8], caps: CapabilityFlags) -> Result<ChangeUser, ParseError> {
        let mut r = Reader::new(payload, WHAT);
        if r.u8("empty packet")? != COM_CHANGE_USER {
            return Err(r.err("command byte is not 0x11"));
        }
        let username = r.nul_bytes("user name without terminator")?.to_vec();
        let auth = if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
            let n = r.u8("truncated authentication data length")?;
            r.take(n.into(), "authentication data longer than the packet")?
        } else {
            r.nul_bytes("authentication data without terminator")?
        };
        let auth_response = AuthResponse::new(auth.to_vec());
        let database = r.nul_bytes("database without terminator")?.to_vec();
        let mut cu = ChangeUser {
            username,
            auth_response,
            database,
            charset: None,
            auth_plugin: None,
            connect_attrs: None,
        };
        if r.is_empty() {
            return Ok(cu);
        }
        cu.charset = Some(r.u16("truncated character set")?);
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) && !r.is_empty() {
            cu.auth_plugin = Some(r.nul_bytes("plugin name without terminator")?.to_vec());
        }
        if caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) && !r.is_empty() {
            cu.connect_attrs = Some(ConnectAttrs::parse(&mut r, WHAT)?);
        }
        // Anything after is ignored, as MariaDB does: mysql_async writes an (empty) attribute
        // block whether or not CLIENT_CONNECT_ATTRS was agreed.
        Ok(cu)
    }

    /// Writes the payload (the fields after the database only when `charset` is set).
    pub fn encode(&self, caps: CapabilityFlags, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u8(COM_CHANGE_USER);
        put_nul_bytes(out, &self.username, "user name")?;
        let auth = self.auth_response.expose();
        if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
            let n = u8::try_from(auth.len()).map_err(|_| EncodeError {
                what: WHAT,
                why: "authentication data over 255 bytes",
            })?;
            out.put_u8(n);
            out.put_slice(auth);
        } else {
            put_nul_bytes(out, auth, "authentication data")?;
        }
        put_nul_bytes(out, &self.database, "database")?;
        let Some(charset) = self.charset else {
            return Ok(());
        };
        out.put_u16_le(charset);
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) {
            put_nul_bytes(
                out,
                self.auth_plugin.as_deref().unwrap_or_default(),
                "plugin name",
            )?;
        }
        if caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) {
            self.connect_attrs.clone().unwrap_or_default().encode(out);
        }
        Ok(())
    }
}
