//! HandshakeV10, the server's greeting: latch builds one toward the application (copying the
//! real server's version, connection id and capabilities into it so `CONNECTION_ID()` and
//! `KILL <id>` agree with what the application sees) and parses the real server's.
//!
//! Layout (MySQL "Protocol::HandshakeV10", MariaDB "Connection: Initial handshake packet"):
//! protocol version 10, server version (NUL-terminated), connection id (4), scramble part 1
//! (8), filler 0, capabilities low 16 bits, character set, status flags, capabilities high 16
//! bits, auth-plugin-data length (or 0), 6 reserved bytes, 4 bytes that are reserved in MySQL
//! and MariaDB's extended capabilities when the server clears CLIENT_MYSQL (bit 0), scramble
//! part 2 (max(13, length - 8) bytes, the last one a NUL) when CLIENT_SECURE_CONNECTION, the
//! plugin name (NUL-terminated; some MySQL versions omit the NUL) when CLIENT_PLUGIN_AUTH.
use std::borrow::Cow;

use bytes::{BufMut as _, BytesMut};

use crate::constants::{
    CapabilityFlags, MariadbCapabilities, PROTOCOL_VERSION, SCRAMBLE_LEN, StatusFlags,
};
use crate::error::{EncodeError, ParseError};
use crate::wire::{Reader, put_nul_bytes};

const WHAT: &str = "HandshakeV10";

/// The greeting, field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// As the server sent it, e.g. `5.5.5-10.11.19-MariaDB-0+deb12u1` (MariaDB prefixes
    /// `5.5.5-` so that old clients do not mistake 10.x for 1.0).
    pub server_version: Vec<u8>,
    pub connection_id: u32,
    /// The authentication scramble (auth-plugin-data) without the terminating NUL: 20 bytes
    /// from MySQL and MariaDB.
    pub scramble: Vec<u8>,
    pub capabilities: CapabilityFlags,
    /// MariaDB's extended capabilities (zero from MySQL, which sets CLIENT_MYSQL).
    pub mariadb_capabilities: MariadbCapabilities,
    /// The server's default collation id.
    pub charset: u8,
    pub status: StatusFlags,
    /// The plugin the scramble is meant for; `None` without CLIENT_PLUGIN_AUTH.
    pub auth_plugin: Option<Vec<u8>>,
}

impl Greeting {
    /// Reads a greeting payload. An ERR packet here (e.g. "Too many connections" or "Host is
    /// blocked") is not a greeting: check for `0xFF` first with [`crate::ErrPacket`].
    pub fn parse(payload: &[u8]) -> Result<Greeting, ParseError> {
        let mut r = Reader::new(payload, WHAT);
        let version = r.u8("empty packet")?;
        if version != PROTOCOL_VERSION {
            return Err(r.err("protocol version is not 10"));
        }
        let server_version = r.nul_bytes("server version without terminator")?.to_vec();
        let connection_id = r.u32("truncated connection id")?;
        let part1 = r.take(8, "truncated scramble")?;
        r.u8("truncated filler")?;
        let caps_low = r.u16("truncated capabilities")?;
        let charset = r.u8("truncated character set")?;
        let status = r.u16("truncated status flags")?;
        let caps_high = r.u16("truncated capabilities")?;
        let capabilities =
            CapabilityFlags::from_bits_retain(u32::from(caps_low) | u32::from(caps_high) << 16);
        let data_len = r.u8("truncated auth-plugin-data length")?;
        r.take(6, "truncated reserved bytes")?;
        let ext = r.u32("truncated reserved bytes")?;
        let mariadb_capabilities = if capabilities.contains(CapabilityFlags::CLIENT_LONG_PASSWORD) {
            MariadbCapabilities::empty()
        } else {
            MariadbCapabilities::from_bits_retain(ext)
        };
        let mut scramble = part1.to_vec();
        if capabilities.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
            let n = usize::from(data_len).saturating_sub(8).max(13);
            let part2 = r.take(n, "truncated scramble")?;
            // Scramble bytes are never NUL: what follows the scramble is its terminator and
            // padding up to 13 bytes.
            let end = part2.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            let part2 = &part2[..end];
            scramble.extend_from_slice(part2);
        }
        let auth_plugin = if capabilities.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) {
            Some(r.nul_or_eof_bytes().to_vec())
        } else {
            None
        };
        Ok(Greeting {
            server_version,
            connection_id,
            scramble,
            capabilities,
            mariadb_capabilities,
            charset,
            status: StatusFlags::from_bits_retain(status),
            auth_plugin,
        })
    }

    /// Writes the greeting payload. The scramble must be at least 8 bytes and without NUL
    /// bytes (clients read part 2 as a NUL-terminated string); at most 250 bytes.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let err = |why| EncodeError { what: WHAT, why };
        if self.scramble.len() < 8 || self.scramble.len() > 250 {
            return Err(err("scramble must be 8 to 250 bytes"));
        }
        if self.scramble.contains(&0) {
            return Err(err("scramble contains a NUL byte"));
        }
        out.put_u8(PROTOCOL_VERSION);
        put_nul_bytes(out, &self.server_version, WHAT)?;
        out.put_u32_le(self.connection_id);
        out.put_slice(&self.scramble[..8]);
        out.put_u8(0);
        let caps = self.capabilities.bits();
        out.put_u16_le(caps as u16);
        out.put_u8(self.charset);
        out.put_u16_le(self.status.bits());
        out.put_u16_le((caps >> 16) as u16);
        let plugin_auth = self
            .capabilities
            .contains(CapabilityFlags::CLIENT_PLUGIN_AUTH);
        out.put_u8(if plugin_auth {
            (self.scramble.len() + 1) as u8
        } else {
            0
        });
        out.put_bytes(0, 6);
        if self
            .capabilities
            .contains(CapabilityFlags::CLIENT_LONG_PASSWORD)
        {
            out.put_u32_le(0);
        } else {
            out.put_u32_le(self.mariadb_capabilities.bits());
        }
        if self
            .capabilities
            .contains(CapabilityFlags::CLIENT_SECURE_CONNECTION)
        {
            let part2 = &self.scramble[8..];
            out.put_slice(part2);
            // NUL-terminated, at least 13 bytes in all.
            out.put_bytes(0, 13usize.saturating_sub(part2.len()).max(1));
        }
        if plugin_auth {
            put_nul_bytes(out, self.auth_plugin.as_deref().unwrap_or_default(), WHAT)?;
        }
        Ok(())
    }

    /// The greeting latch sends the application on behalf of `server`: the server's version,
    /// connection id, collation, status and MariaDB capabilities, its capabilities as
    /// [`crate::response::app_capabilities`] filters them (CLIENT_SSL when `offer_tls`), a
    /// scramble of latch's own (the application's answer to it is dropped unchecked) and
    /// mysql_native_password, the plugin every client implements.
    pub fn for_app(server: &Greeting, scramble: [u8; SCRAMBLE_LEN], offer_tls: bool) -> Greeting {
        Greeting {
            server_version: server.server_version.clone(),
            connection_id: server.connection_id,
            scramble: scramble.to_vec(),
            capabilities: crate::response::app_capabilities(server.capabilities, offer_tls)
                | CapabilityFlags::CLIENT_PROTOCOL_41
                | CapabilityFlags::CLIENT_SECURE_CONNECTION
                | CapabilityFlags::CLIENT_PLUGIN_AUTH,
            mariadb_capabilities: server.mariadb_capabilities,
            charset: server.charset,
            status: server.status,
            auth_plugin: Some(crate::constants::MYSQL_NATIVE_PASSWORD.as_bytes().to_vec()),
        }
    }

    /// The server version as text (lossy).
    pub fn server_version_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.server_version)
    }

    /// Whether the server is MariaDB (by its version string).
    pub fn is_mariadb(&self) -> bool {
        self.server_version
            .windows(7)
            .any(|w| w.eq_ignore_ascii_case(b"mariadb"))
    }

    /// The first 20 bytes of the scramble, the nonce of mysql_native_password and
    /// caching_sha2_password; `None` when the server sent fewer.
    pub fn scramble20(&self) -> Option<[u8; SCRAMBLE_LEN]> {
        self.scramble.get(..SCRAMBLE_LEN)?.try_into().ok()
    }
}

/// A fresh 20-byte scramble for a greeting latch sends: random bytes in 1..=127 other than
/// `$`, as MySQL's own generator makes them (no NUL, which would end part 2 early).
pub fn random_scramble() -> Result<[u8; SCRAMBLE_LEN], getrandom::Error> {
    let mut s = [0u8; SCRAMBLE_LEN];
    getrandom::fill(&mut s)?;
    for b in &mut s {
        *b &= 0x7F;
        if *b == 0 || *b == b'$' {
            *b += 1;
        }
    }
    Ok(s)
}
