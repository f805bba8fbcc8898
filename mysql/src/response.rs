//! What the client sends after the greeting: HandshakeResponse41, or first the 32-byte
//! SSLRequest when it sets CLIENT_SSL (then the full response follows inside TLS). Latch parses
//! both from the application (keeping the authentication data only to drop it) and builds both
//! toward the server, with the capabilities negotiated here.
//!
//! Layout (MySQL "Protocol::HandshakeResponse41", MariaDB "Handshake response packet"):
//! capabilities (4), max packet size (4), collation (1), 19 reserved bytes, 4 bytes that carry
//! MariaDB's extended capabilities when the client clears CLIENT_MYSQL, the user name
//! (NUL-terminated), the authentication data (length-encoded with
//! CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, else one length byte with CLIENT_SECURE_CONNECTION,
//! else NUL-terminated), the database (NUL-terminated, with CLIENT_CONNECT_WITH_DB), the plugin
//! name (NUL-terminated, with CLIENT_PLUGIN_AUTH), the connect attributes (a length-encoded
//! total, then length-encoded key/value strings, with CLIENT_CONNECT_ATTRS), and MySQL 8's zstd
//! level (1 byte, with CLIENT_ZSTD_COMPRESSION_ALGORITHM). The SSLRequest is the first 32 bytes
//! alone.
use std::fmt;

use bytes::{BufMut as _, BytesMut};
use zeroize::Zeroizing;

use crate::constants::{CapabilityFlags, MariadbCapabilities};
use crate::error::{EncodeError, ParseError};
use crate::greeting::Greeting;
use crate::wire::{Reader, put_lenenc, put_lenenc_bytes, put_nul_bytes};

const WHAT: &str = "HandshakeResponse41";
const SSL_WHAT: &str = "SSLRequest";

/// Length of the SSLRequest payload (the fixed head of HandshakeResponse41).
pub const SSL_REQUEST_LEN: usize = 32;

/// Authentication data from a client: a password hash, a signature or even a clear-text
/// password. Latch keeps it only to drop it: wiped on drop, never printed.
#[derive(Clone, Default)]
pub struct AuthResponse(Zeroizing<Vec<u8>>);

impl AuthResponse {
    pub fn new(bytes: Vec<u8>) -> Self {
        AuthResponse(Zeroizing::new(bytes))
    }

    /// The bytes, for the code that must put them on the wire or check them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for AuthResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthResponse(<{} bytes redacted>)", self.0.len())
    }
}

impl PartialEq for AuthResponse {
    fn eq(&self, other: &Self) -> bool {
        self.0[..] == other.0[..]
    }
}

impl Eq for AuthResponse {}

/// Connect attributes in the order the client sent them (duplicates kept), so they pass
/// through byte for byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectAttrs(pub Vec<(Vec<u8>, Vec<u8>)>);

impl ConnectAttrs {
    /// The value of the first attribute named `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    pub(crate) fn parse(
        r: &mut Reader<'_>,
        what: &'static str,
    ) -> Result<ConnectAttrs, ParseError> {
        let block = r.lenenc_bytes("connect attributes longer than the packet")?;
        let mut inner = Reader::new(block, what);
        let mut pairs = Vec::new();
        while !inner.is_empty() {
            let k = inner.lenenc_bytes("truncated connect attribute name")?;
            let v = inner.lenenc_bytes("truncated connect attribute value")?;
            pairs.push((k.to_vec(), v.to_vec()));
        }
        Ok(ConnectAttrs(pairs))
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        let mut block = BytesMut::new();
        for (k, v) in &self.0 {
            put_lenenc_bytes(&mut block, k);
            put_lenenc_bytes(&mut block, v);
        }
        put_lenenc_bytes(out, &block);
    }
}

/// The fixed head both packets share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    capabilities: CapabilityFlags,
    max_packet_size: u32,
    charset: u8,
    mariadb_capabilities: MariadbCapabilities,
}

impl Head {
    fn parse(r: &mut Reader<'_>) -> Result<Head, ParseError> {
        let capabilities = CapabilityFlags::from_bits_retain(r.u32("truncated capabilities")?);
        let max_packet_size = r.u32("truncated max packet size")?;
        let charset = r.u8("truncated character set")?;
        r.take(19, "truncated reserved bytes")?;
        let ext = r.u32("truncated reserved bytes")?;
        let mariadb_capabilities = if capabilities.contains(CapabilityFlags::CLIENT_LONG_PASSWORD) {
            MariadbCapabilities::empty()
        } else {
            MariadbCapabilities::from_bits_retain(ext)
        };
        Ok(Head {
            capabilities,
            max_packet_size,
            charset,
            mariadb_capabilities,
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        out.put_u32_le(self.capabilities.bits());
        out.put_u32_le(self.max_packet_size);
        out.put_u8(self.charset);
        out.put_bytes(0, 19);
        if self
            .capabilities
            .contains(CapabilityFlags::CLIENT_LONG_PASSWORD)
        {
            out.put_u32_le(0);
        } else {
            out.put_u32_le(self.mariadb_capabilities.bits());
        }
    }
}

/// The SSLRequest: the client's capabilities (with CLIENT_SSL) before TLS starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslRequest {
    pub capabilities: CapabilityFlags,
    pub max_packet_size: u32,
    pub charset: u8,
    pub mariadb_capabilities: MariadbCapabilities,
}

impl SslRequest {
    pub fn parse(payload: &[u8]) -> Result<SslRequest, ParseError> {
        if payload.len() != SSL_REQUEST_LEN {
            return Err(ParseError::new(SSL_WHAT, "length is not 32"));
        }
        let h = Head::parse(&mut Reader::new(payload, SSL_WHAT))?;
        if !h.capabilities.contains(CapabilityFlags::CLIENT_SSL) {
            return Err(ParseError::new(SSL_WHAT, "CLIENT_SSL is not set"));
        }
        Ok(SslRequest {
            capabilities: h.capabilities,
            max_packet_size: h.max_packet_size,
            charset: h.charset,
            mariadb_capabilities: h.mariadb_capabilities,
        })
    }

    /// Writes the payload; CLIENT_SSL is set whatever `capabilities` says.
    pub fn encode(&self, out: &mut BytesMut) {
        Head {
            capabilities: self.capabilities | CapabilityFlags::CLIENT_SSL,
            max_packet_size: self.max_packet_size,
            charset: self.charset,
            mariadb_capabilities: self.mariadb_capabilities,
        }
        .encode(out);
    }
}

/// HandshakeResponse41, field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub capabilities: CapabilityFlags,
    pub max_packet_size: u32,
    /// The client's collation id.
    pub charset: u8,
    pub mariadb_capabilities: MariadbCapabilities,
    pub username: Vec<u8>,
    pub auth_response: AuthResponse,
    /// With CLIENT_CONNECT_WITH_DB; `None` when the flag is clear or the packet ended first.
    pub database: Option<Vec<u8>>,
    /// With CLIENT_PLUGIN_AUTH.
    pub auth_plugin: Option<Vec<u8>>,
    /// With CLIENT_CONNECT_ATTRS.
    pub connect_attrs: Option<ConnectAttrs>,
    /// MySQL 8's zstd compression level, with CLIENT_ZSTD_COMPRESSION_ALGORITHM.
    pub zstd_level: Option<u8>,
}

/// What a client sends after the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    /// Start TLS, then read the full response.
    SslRequest(SslRequest),
    Response(HandshakeResponse),
}

impl ClientHello {
    /// Tells the two apart: an SSLRequest is exactly 32 bytes with CLIENT_SSL (a full response
    /// is longer: it has at least the user name's terminator after those 32 bytes).
    pub fn parse(payload: &[u8]) -> Result<ClientHello, ParseError> {
        if payload.len() == SSL_REQUEST_LEN {
            return SslRequest::parse(payload).map(ClientHello::SslRequest);
        }
        HandshakeResponse::parse(payload).map(ClientHello::Response)
    }
}

impl HandshakeResponse {
    /// Reads a full response. Clients without CLIENT_PROTOCOL_41 (HandshakeResponse320, MySQL
    /// before 4.1) are refused. Optional trailing fields whose flag is set but that the packet
    /// ends before are taken as absent, as the servers do.
    pub fn parse(payload: &[u8]) -> Result<HandshakeResponse, ParseError> {
        let mut r = Reader::new(payload, WHAT);
        let head = Head::parse(&mut r)?;
        let caps = head.capabilities;
        if !caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
            return Err(r.err("client without CLIENT_PROTOCOL_41"));
        }
        let username = r.nul_bytes("user name without terminator")?.to_vec();
        let auth = if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            r.lenenc_bytes("authentication data longer than the packet")?
        } else if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
            let n = r.u8("truncated authentication data length")?;
            r.take(n.into(), "authentication data longer than the packet")?
        } else {
            r.nul_bytes("authentication data without terminator")?
        };
        let auth_response = AuthResponse::new(auth.to_vec());
        let database = if caps.contains(CapabilityFlags::CLIENT_CONNECT_WITH_DB) && !r.is_empty() {
            Some(r.nul_bytes("database without terminator")?.to_vec())
        } else {
            None
        };
        let auth_plugin = if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) && !r.is_empty() {
            Some(r.nul_or_eof_bytes().to_vec())
        } else {
            None
        };
        let connect_attrs = if caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) && !r.is_empty()
        {
            Some(ConnectAttrs::parse(&mut r, WHAT)?)
        } else {
            None
        };
        let zstd_level =
            if caps.contains(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM) && !r.is_empty() {
                Some(r.u8("truncated zstd level")?)
            } else {
                None
            };
        if !r.is_empty() {
            return Err(r.err("trailing bytes"));
        }
        Ok(HandshakeResponse {
            capabilities: caps,
            max_packet_size: head.max_packet_size,
            charset: head.charset,
            mariadb_capabilities: head.mariadb_capabilities,
            username,
            auth_response,
            database,
            auth_plugin,
            connect_attrs,
            zstd_level,
        })
    }

    /// The AuthSwitchRequest a server sends this response when its account authenticates with
    /// `plugin` (`scramble` is the new nonce), or `None` when the response already answered
    /// for it. MariaDB and MySQL ask a client that named another plugin (CLIENT_PLUGIN_AUTH and
    /// a name, e.g. `mysql_clear_password`) to switch; a client without CLIENT_PLUGIN_AUTH, or
    /// with an empty name, is taken to have answered for mysql_native_password.
    pub fn switch_to(
        &self,
        plugin: &str,
        scramble: [u8; crate::constants::SCRAMBLE_LEN],
    ) -> Option<crate::AuthSwitchRequest> {
        let named = match &self.auth_plugin {
            Some(name)
                if self
                    .capabilities
                    .contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) =>
            {
                name.as_slice()
            }
            _ => b"",
        };
        let answered = match named {
            b"" => crate::constants::MYSQL_NATIVE_PASSWORD.as_bytes(),
            name => name,
        };
        if answered == plugin.as_bytes() {
            return None;
        }
        let mut data = scramble.to_vec();
        data.push(0);
        Some(crate::AuthSwitchRequest {
            plugin: plugin.as_bytes().to_vec(),
            data,
        })
    }

    /// Writes the payload. Fields are written as the capabilities say (a field whose flag is
    /// set but that is `None` is written empty; one whose flag is clear is left out), so a
    /// parsed response encodes back to the same bytes. [`HandshakeResponse::for_server`]
    /// builds one whose flags and fields agree.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let caps = self.capabilities;
        Head {
            capabilities: caps,
            max_packet_size: self.max_packet_size,
            charset: self.charset,
            mariadb_capabilities: self.mariadb_capabilities,
        }
        .encode(out);
        put_nul_bytes(out, &self.username, "user name")?;
        let auth = self.auth_response.expose();
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            put_lenenc(out, auth.len() as u64);
            out.put_slice(auth);
        } else if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
            let n = u8::try_from(auth.len()).map_err(|_| EncodeError {
                what: WHAT,
                why: "authentication data over 255 bytes without CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA",
            })?;
            out.put_u8(n);
            out.put_slice(auth);
        } else {
            put_nul_bytes(out, auth, "authentication data")?;
        }
        if caps.contains(CapabilityFlags::CLIENT_CONNECT_WITH_DB) {
            put_nul_bytes(
                out,
                self.database.as_deref().unwrap_or_default(),
                "database",
            )?;
        }
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
        if caps.contains(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM) {
            out.put_u8(self.zstd_level.unwrap_or(3));
        }
        Ok(())
    }

    /// The response latch sends to the server on behalf of the application's `app`: the
    /// application's database, connect attributes, collation and max packet size, the
    /// capabilities [`server_capabilities`] negotiates, `username` (the policy's, not
    /// necessarily the application's), and no authentication data yet ([`crate::ClientAuth`]
    /// fills in the plugin and its response).
    pub fn for_server(
        app: &HandshakeResponse,
        server: &Greeting,
        username: &[u8],
        tls: bool,
    ) -> HandshakeResponse {
        let mut caps = server_capabilities(app.capabilities, server.capabilities, tls);
        caps.set(
            CapabilityFlags::CLIENT_CONNECT_WITH_DB,
            app.database.is_some(),
        );
        let attrs = app.connect_attrs.clone().filter(|_| {
            server
                .capabilities
                .contains(CapabilityFlags::CLIENT_CONNECT_ATTRS)
        });
        caps.set(CapabilityFlags::CLIENT_CONNECT_ATTRS, attrs.is_some());
        HandshakeResponse {
            capabilities: caps,
            max_packet_size: app.max_packet_size,
            charset: app.charset,
            mariadb_capabilities: app.mariadb_capabilities & server.mariadb_capabilities,
            username: username.to_vec(),
            auth_response: AuthResponse::default(),
            database: app.database.clone(),
            auth_plugin: None,
            connect_attrs: attrs,
            zstd_level: None,
        }
    }

    /// The SSLRequest that goes before this response when the leg uses TLS.
    pub fn ssl_request(&self) -> SslRequest {
        SslRequest {
            capabilities: self.capabilities | CapabilityFlags::CLIENT_SSL,
            max_packet_size: self.max_packet_size,
            charset: self.charset,
            mariadb_capabilities: self.mariadb_capabilities,
        }
    }
}

/// Capabilities latch never negotiates on either leg: zstd compression (MySQL 8's; zlib
/// compression, CLIENT_COMPRESS, passes through: the connector reads and writes its frames),
/// and TLS, which is decided per leg by the connector, not passed through.
pub const NEVER: CapabilityFlags = CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM
    .union(CapabilityFlags::CLIENT_SSL)
    .union(CapabilityFlags::CLIENT_SSL_VERIFY_SERVER_CERT);

/// Capabilities that only shape the handshake itself, which latch runs on its own toward the
/// server: used whenever the server offers them, whatever the application asked.
pub const HANDSHAKE_ONLY: CapabilityFlags = CapabilityFlags::CLIENT_SECURE_CONNECTION
    .union(CapabilityFlags::CLIENT_PLUGIN_AUTH)
    .union(CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA);

/// The capabilities latch offers the application in its greeting: the server's, without
/// [`NEVER`], with CLIENT_SSL when latch will terminate TLS for the application.
pub fn app_capabilities(server: CapabilityFlags, offer_tls: bool) -> CapabilityFlags {
    let mut caps = server.difference(NEVER);
    caps.set(CapabilityFlags::CLIENT_SSL, offer_tls);
    caps
}

/// The capabilities latch sends the server: what both the application asked and the server
/// offers (the command phase is relayed, so both legs must agree on everything that shapes
/// it), plus the handshake-only ones the server offers, minus [`NEVER`], with CLIENT_SSL when
/// this leg uses TLS.
pub fn server_capabilities(
    app: CapabilityFlags,
    server: CapabilityFlags,
    tls: bool,
) -> CapabilityFlags {
    let mut caps = ((app & server) | (server & HANDSHAKE_ONLY)).difference(NEVER);
    caps.set(CapabilityFlags::CLIENT_SSL, tls);
    caps
}
