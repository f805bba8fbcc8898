//! The client side of authentication, toward the real server, as a state machine without I/O:
//! [`ClientAuth::start`] writes the HandshakeResponse41 (or [`ClientAuth::start_change_user`] a
//! COM_CHANGE_USER), then each server packet goes to [`ClientAuth::on_packet`], which writes
//! what to send back, until the server's OK ([`AuthStep::Done`]) or an error.
//!
//! Plugins: mysql_native_password; caching_sha2_password (fast path 0x03; full authentication
//! 0x04 with the password in clear over TLS, or RSA-OAEP of the password XOR the scramble with
//! the server's public key, asked for with 0x02, without TLS); MariaDB client_ed25519;
//! mysql_clear_password only over TLS whose server certificate was verified. AuthSwitchRequest
//! (0xFE) may name any of them; AuthMoreData (0x01) carries caching_sha2_password's messages.
//!
//! Why clear text over unverified TLS for caching_sha2_password full authentication: it is what
//! MySQL's own clients do, and without it that plugin cannot authenticate an uncached account
//! over such a leg at all. An active attacker in the path can obtain the password either way
//! (by presenting its own certificate, or on a plain leg its own RSA key), so the policy's TLS
//! mode, not this plugin, is where that risk is decided; `ClientAuthOptions` can pin the
//! server's key or forbid asking for it. mysql_clear_password is different: a server can ask
//! for it at any time, so it is refused unless TLS verified the server.
use std::fmt;

use bytes::BytesMut;
use zeroize::Zeroizing;

use crate::auth_packets::{AuthMoreData, AuthSwitchRequest};
use crate::command::ChangeUser;
use crate::constants::{
    AUTH_MORE_DATA_HEADER, AUTH_SWITCH_HEADER, CACHING_SHA2_FAST_AUTH_SUCCESS,
    CACHING_SHA2_PASSWORD, CACHING_SHA2_PERFORM_FULL_AUTH, CACHING_SHA2_REQUEST_PUBLIC_KEY,
    CLIENT_ED25519, CapabilityFlags, ED25519_NONCE_LEN, ERR_HEADER, MYSQL_CLEAR_PASSWORD,
    MYSQL_NATIVE_PASSWORD, OK_HEADER, SCRAMBLE_LEN,
};
use crate::error::AuthError;
use crate::frame::{Packet, Seq};
use crate::greeting::Greeting;
use crate::ok_err::{ErrPacket, OkPacket};
use crate::response::{AuthResponse, HandshakeResponse, SslRequest};
use crate::scramble;

/// What protects the leg to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    /// TLS without verification of the server's certificate (`require`).
    Tls,
    /// TLS with the server's certificate and name verified (`verify-full`): the only leg a
    /// password may be sent on as it is.
    TlsVerified,
}

/// Choices about caching_sha2_password's RSA exchange and limits.
#[derive(Clone)]
pub struct ClientAuthOptions {
    /// Ask the server for its RSA public key when full authentication is needed without TLS
    /// (MySQL's `--get-server-public-key`). Default: false — a key asked for on a leg nobody
    /// verified may be an impersonator's, which would read the password; opt in per policy.
    pub request_public_key: bool,
    /// The server's RSA public key (PEM), known in advance: used instead of asking for it.
    pub server_public_key: Option<Vec<u8>>,
    /// Server packets after which the exchange is abandoned. Default: 8.
    pub max_rounds: usize,
}

impl Default for ClientAuthOptions {
    fn default() -> Self {
        ClientAuthOptions {
            request_public_key: false,
            server_public_key: None,
            max_rounds: 8,
        }
    }
}

/// What [`ClientAuth::on_packet`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send what was written to `out` (possibly nothing) and read the next server packet.
    Continue,
    /// The server accepted: its OK.
    Done(OkPacket),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plugin {
    Native,
    CachingSha2,
    Ed25519,
    Clear,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Native => MYSQL_NATIVE_PASSWORD,
            Plugin::CachingSha2 => CACHING_SHA2_PASSWORD,
            Plugin::Ed25519 => CLIENT_ED25519,
            Plugin::Clear => MYSQL_CLEAR_PASSWORD,
        }
    }

    fn from_name(name: &[u8]) -> Option<Plugin> {
        [
            Plugin::Native,
            Plugin::CachingSha2,
            Plugin::Ed25519,
            Plugin::Clear,
        ]
        .into_iter()
        .find(|p| p.name().as_bytes() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing sent yet.
    Start,
    /// A plugin's first response is out; the server may accept, refuse, switch or (for
    /// caching_sha2_password) say more.
    Responded(Plugin),
    /// caching_sha2_password asked the server for its public key.
    AwaitingKey,
    /// The last word is said: only OK or ERR may come.
    AwaitingResult,
    Done,
}

/// One authentication exchange toward the server.
pub struct ClientAuth {
    password: Zeroizing<Vec<u8>>,
    /// The scramble of the current plugin exchange (the greeting's, then a switch's).
    scramble: Vec<u8>,
    greeting_plugin: Option<Vec<u8>>,
    options: ClientAuthOptions,
    transport: Transport,
    caps: CapabilityFlags,
    seq: Seq,
    state: State,
    rounds: usize,
    plugin: Option<Plugin>,
    /// Which of caching_sha2_password's paths the exchange took.
    sha2_path: Option<Sha2Path>,
}

/// caching_sha2_password's ways to the server's OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sha2Path {
    /// The server had the account cached (AuthMoreData 0x03).
    Fast,
    /// Full authentication: the password over TLS that verified the server.
    FullTls,
    /// Full authentication: RSA with the key the server sent when asked (0x02).
    FullRsaAsked,
    /// Full authentication: RSA with the key the policy pins.
    FullRsaPinned,
}

impl Sha2Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Sha2Path::Fast => "fast",
            Sha2Path::FullTls => "full-tls",
            Sha2Path::FullRsaAsked => "full-rsa-asked",
            Sha2Path::FullRsaPinned => "full-rsa-pinned",
        }
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("transport", &self.transport)
            .field("state", &self.state)
            .field("plugin", &self.plugin.map(Plugin::name))
            .field("seq", &self.seq.next())
            .finish_non_exhaustive()
    }
}

impl ClientAuth {
    /// An exchange for the server that sent `greeting` (sequence id 0), with `password`
    /// (copied into a buffer wiped on drop).
    pub fn new(greeting: &Greeting, password: &[u8], options: ClientAuthOptions) -> ClientAuth {
        let mut seq = Seq::new();
        seq.set(1);
        ClientAuth {
            password: Zeroizing::new(password.to_vec()),
            scramble: greeting.scramble.clone(),
            greeting_plugin: greeting.auth_plugin.clone(),
            options,
            transport: Transport::Plain,
            caps: greeting.capabilities,
            seq,
            state: State::Start,
            rounds: 0,
            plugin: None,
            sha2_path: None,
        }
    }

    /// Writes the SSLRequest (sequence id 1); start TLS after sending it, then call
    /// [`ClientAuth::start`].
    pub fn ssl_request(&mut self, request: &SslRequest, out: &mut BytesMut) {
        let mut payload = BytesMut::with_capacity(32);
        request.encode(&mut payload);
        self.seq.write(&payload, out);
    }

    /// Fills in the plugin and authentication data of `response` and writes it. The first
    /// plugin is caching_sha2_password when the greeting names it, else
    /// mysql_native_password; the server switches when the account uses another.
    pub fn start(
        &mut self,
        response: &mut HandshakeResponse,
        transport: Transport,
        out: &mut BytesMut,
    ) -> Result<(), AuthError> {
        if self.state != State::Start {
            return Err(AuthError::Finished);
        }
        self.transport = transport;
        self.caps = response.capabilities;
        let (plugin, data) = self.first_response()?;
        if response
            .capabilities
            .contains(CapabilityFlags::CLIENT_PLUGIN_AUTH)
        {
            response.auth_plugin = Some(plugin.name().as_bytes().to_vec());
        }
        response.auth_response = AuthResponse::new(data);
        let mut payload = BytesMut::new();
        response.encode(&mut payload)?;
        self.seq.write(&payload, out);
        self.state = State::Responded(plugin);
        self.plugin = Some(plugin);
        Ok(())
    }

    /// Re-authenticates an established session: fills in the authentication data of `cu`
    /// (computed, as the protocol says, over the scramble of the connection's greeting) and
    /// writes the COM_CHANGE_USER (sequence id 0). `caps` are the session's capabilities.
    pub fn start_change_user(
        &mut self,
        cu: &mut ChangeUser,
        caps: CapabilityFlags,
        transport: Transport,
        out: &mut BytesMut,
    ) -> Result<(), AuthError> {
        if self.state != State::Start {
            return Err(AuthError::Finished);
        }
        self.transport = transport;
        self.caps = caps;
        let (plugin, data) = self.first_response()?;
        if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) && cu.charset.is_some() {
            cu.auth_plugin = Some(plugin.name().as_bytes().to_vec());
        }
        cu.auth_response = AuthResponse::new(data);
        let mut payload = BytesMut::new();
        cu.encode(caps, &mut payload)?;
        self.seq.reset();
        self.seq.write(&payload, out);
        self.state = State::Responded(plugin);
        self.plugin = Some(plugin);
        Ok(())
    }

    /// The plugin in use (after the last switch), once started.
    pub fn plugin(&self) -> Option<&'static str> {
        self.plugin.map(Plugin::name)
    }

    /// Which of caching_sha2_password's paths the exchange took, once the server said.
    pub fn caching_sha2_path(&self) -> Option<Sha2Path> {
        self.sha2_path
    }

    /// The sequence id the next packet on this leg carries.
    pub fn next_seq(&self) -> u8 {
        self.seq.next()
    }

    fn first_response(&self) -> Result<(Plugin, Vec<u8>), AuthError> {
        let plugin = match self.greeting_plugin.as_deref() {
            Some(name) if name == CACHING_SHA2_PASSWORD.as_bytes() => Plugin::CachingSha2,
            _ => Plugin::Native,
        };
        let data = self.scramble_response(plugin)?;
        Ok((plugin, data))
    }

    fn scramble20(&self, plugin: Plugin) -> Result<[u8; SCRAMBLE_LEN], AuthError> {
        let s = self.scramble.as_slice();
        let s = s.strip_suffix(&[0]).unwrap_or(s);
        s.try_into().map_err(|_| AuthError::BadScramble {
            plugin: plugin.name(),
            len: s.len(),
            expected: SCRAMBLE_LEN,
        })
    }

    /// A plugin's first message over the current scramble.
    fn scramble_response(&self, plugin: Plugin) -> Result<Vec<u8>, AuthError> {
        match plugin {
            Plugin::Native => Ok(scramble::native_password(
                &self.scramble20(plugin)?,
                &self.password,
            )),
            Plugin::CachingSha2 => Ok(scramble::caching_sha2(
                &self.scramble20(plugin)?,
                &self.password,
            )),
            Plugin::Ed25519 => {
                if self.scramble.len() != ED25519_NONCE_LEN {
                    return Err(AuthError::BadScramble {
                        plugin: plugin.name(),
                        len: self.scramble.len(),
                        expected: ED25519_NONCE_LEN,
                    });
                }
                Ok(scramble::ed25519(&self.password, &self.scramble).to_vec())
            }
            Plugin::Clear => {
                if self.transport != Transport::TlsVerified {
                    return Err(AuthError::ClearTextRefused {
                        plugin: MYSQL_CLEAR_PASSWORD,
                    });
                }
                Ok(with_nul(&self.password).to_vec())
            }
        }
    }

    /// Takes the server's next packet; writes the answer (if any) to `out`.
    pub fn on_packet(
        &mut self,
        packet: &Packet,
        out: &mut BytesMut,
    ) -> Result<AuthStep, AuthError> {
        match self.state {
            State::Start => {
                return Err(AuthError::Unexpected {
                    state: "no response was sent yet",
                    first_byte: packet.first_byte().unwrap_or(0),
                });
            }
            State::Done => return Err(AuthError::Finished),
            _ => {}
        }
        self.rounds += 1;
        if self.rounds > self.options.max_rounds {
            return Err(AuthError::TooManyRounds(self.options.max_rounds));
        }
        self.seq.check(packet)?;
        let payload = &packet.payload[..];
        let Some(&first) = payload.first() else {
            return Err(AuthError::Unexpected {
                state: "reading the server's answer (empty packet)",
                first_byte: 0,
            });
        };
        match (first, self.state) {
            (OK_HEADER, _) => {
                let ok = OkPacket::parse(payload, self.caps)?;
                self.state = State::Done;
                Ok(AuthStep::Done(ok))
            }
            (ERR_HEADER, _) => {
                self.state = State::Done;
                Err(AuthError::Server(
                    ErrPacket::parse(payload)?.to_server_error(),
                ))
            }
            (AUTH_SWITCH_HEADER, State::Responded(_)) => {
                let switch = AuthSwitchRequest::parse(payload)?;
                let plugin = Plugin::from_name(&switch.plugin).ok_or_else(|| {
                    AuthError::UnsupportedPlugin(
                        String::from_utf8_lossy(&switch.plugin).into_owned(),
                    )
                })?;
                self.scramble = switch.data;
                self.plugin = Some(plugin);
                let data = self.scramble_response(plugin)?;
                self.seq.write(&data, out);
                self.state = match plugin {
                    Plugin::CachingSha2 => State::Responded(plugin),
                    _ => State::AwaitingResult,
                };
                Ok(AuthStep::Continue)
            }
            (AUTH_MORE_DATA_HEADER, State::Responded(Plugin::CachingSha2)) => {
                let more = AuthMoreData::parse(payload)?;
                match more.data.as_slice() {
                    [CACHING_SHA2_FAST_AUTH_SUCCESS] => {
                        self.sha2_path = Some(Sha2Path::Fast);
                        self.state = State::AwaitingResult;
                        Ok(AuthStep::Continue)
                    }
                    [CACHING_SHA2_PERFORM_FULL_AUTH] => self.full_auth(out),
                    _ => Err(AuthError::Unexpected {
                        state: "waiting for caching_sha2_password's fast or full authentication",
                        first_byte: first,
                    }),
                }
            }
            (AUTH_MORE_DATA_HEADER, State::AwaitingKey) => {
                let more = AuthMoreData::parse(payload)?;
                let key = scramble::parse_public_key(&more.data)?;
                self.send_rsa(&key, out)?;
                Ok(AuthStep::Continue)
            }
            (_, state) => Err(AuthError::Unexpected {
                state: match state {
                    State::AwaitingKey => "waiting for the server's RSA public key",
                    State::AwaitingResult => "waiting for OK or ERR",
                    _ => "waiting for the server's answer to the authentication data",
                },
                first_byte: first,
            }),
        }
    }

    /// caching_sha2_password: the server has no cached hash and wants the password itself.
    fn full_auth(&mut self, out: &mut BytesMut) -> Result<AuthStep, AuthError> {
        if self.transport == Transport::Tls {
            // The server reads the password in clear over any TLS; an unverified leg may
            // be an impersonator's.
            return Err(AuthError::ClearTextRefused {
                plugin: "caching_sha2_password (full authentication)",
            });
        }
        if self.transport == Transport::TlsVerified {
            self.seq.write(&with_nul(&self.password), out);
            self.state = State::AwaitingResult;
            self.sha2_path = Some(Sha2Path::FullTls);
        } else if let Some(pem) = self.options.server_public_key.clone() {
            let key = scramble::parse_public_key(&pem)?;
            self.send_rsa(&key, out)?;
            self.sha2_path = Some(Sha2Path::FullRsaPinned);
        } else if self.options.request_public_key {
            self.seq.write(&[CACHING_SHA2_REQUEST_PUBLIC_KEY], out);
            self.state = State::AwaitingKey;
            self.sha2_path = Some(Sha2Path::FullRsaAsked);
        } else {
            return Err(AuthError::PublicKeyRequestRefused);
        }
        Ok(AuthStep::Continue)
    }

    fn send_rsa(&mut self, key: &rsa::PublicKey, out: &mut BytesMut) -> Result<(), AuthError> {
        let scramble = self.scramble20(Plugin::CachingSha2)?;
        let cipher = scramble::rsa_encrypt_password(key, &self.password, &scramble)?;
        self.seq.write(&cipher, out);
        self.state = State::AwaitingResult;
        Ok(())
    }
}

fn with_nul(password: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(password.len() + 1));
    v.extend_from_slice(password);
    v.push(0);
    v
}
