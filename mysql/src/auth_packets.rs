//! The packets of the authentication exchange between HandshakeResponse41 and the final OK.
//!
//! AuthSwitchRequest: 0xFE, the plugin name (NUL-terminated), the plugin's data (the rest; for
//! mysql_native_password and caching_sha2_password a 20-byte scramble and a NUL). A lone 0xFE
//! is the pre-4.1 "old auth switch" to mysql_old_password.
//! AuthMoreData: 0x01 and plugin-specific bytes (caching_sha2_password's 0x03/0x04 status, a PEM
//! public key).
use bytes::{BufMut as _, BytesMut};

use crate::constants::{AUTH_MORE_DATA_HEADER, AUTH_SWITCH_HEADER, MYSQL_OLD_PASSWORD};
use crate::error::{EncodeError, ParseError};
use crate::wire::{Reader, put_nul_bytes};

/// AuthSwitchRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSwitchRequest {
    pub plugin: Vec<u8>,
    /// Plugin data as sent (for the scramble-based plugins it ends with a NUL).
    pub data: Vec<u8>,
}

impl AuthSwitchRequest {
    pub fn parse(payload: &[u8]) -> Result<AuthSwitchRequest, ParseError> {
        let mut r = Reader::new(payload, "AuthSwitchRequest");
        if r.u8("empty packet")? != AUTH_SWITCH_HEADER {
            return Err(r.err("header is not 0xFE"));
        }
        if r.is_empty() {
            return Ok(AuthSwitchRequest {
                plugin: MYSQL_OLD_PASSWORD.as_bytes().to_vec(),
                data: Vec::new(),
            });
        }
        let plugin = r.nul_bytes("plugin name without terminator")?.to_vec();
        Ok(AuthSwitchRequest {
            plugin,
            data: r.rest().to_vec(),
        })
    }

    /// The data without the trailing NUL the scramble-based plugins append.
    pub fn scramble(&self) -> &[u8] {
        self.data.strip_suffix(&[0]).unwrap_or(&self.data)
    }

    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u8(AUTH_SWITCH_HEADER);
        put_nul_bytes(out, &self.plugin, "AuthSwitchRequest plugin name")?;
        out.put_slice(&self.data);
        Ok(())
    }
}

/// AuthMoreData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthMoreData {
    pub data: Vec<u8>,
}

impl AuthMoreData {
    pub fn parse(payload: &[u8]) -> Result<AuthMoreData, ParseError> {
        match payload.split_first() {
            Some((&AUTH_MORE_DATA_HEADER, data)) => Ok(AuthMoreData {
                data: data.to_vec(),
            }),
            Some(_) => Err(ParseError::new("AuthMoreData", "header is not 0x01")),
            None => Err(ParseError::new("AuthMoreData", "empty packet")),
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(AUTH_MORE_DATA_HEADER);
        out.put_slice(&self.data);
    }
}
