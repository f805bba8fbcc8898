//! The target leg: connect (marked socket), read the server's greeting, negotiate TLS as the
//! policy says (SSLRequest, then rustls), send HandshakeResponse41 with the policy's user and
//! run the client authentication exchange up to the server's OK.
use std::net::SocketAddr;

use bytes::BytesMut;
use latch_mysql::{
    AuthStep, CapabilityFlags, ClientAuth, ClientAuthOptions, ErrPacket, Greeting,
    HandshakeResponse, Sha2Path, Transport, constants::ERR_HEADER, frame,
};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    Mysql,
    failure::Failure,
    io::{ReadError, read_packet},
};
use crate::{
    config::{Policy, ServerPublicKey, TlsMode},
    connector::{Env, stream::TargetStream, target_tls},
    origin::Origin,
};

/// Where a session's target leg goes and what it may use.
#[derive(Clone, Copy)]
pub struct TargetCx<'a> {
    pub origin: &'a Origin,
    pub policy: &'a Policy,
    pub env: &'a Env,
    pub mysql: &'a Mysql,
}

impl TargetCx<'_> {
    fn addr(&self) -> SocketAddr {
        self.origin.dst
    }
}

/// A connection whose greeting was read.
pub struct Greeted {
    pub tcp: TcpStream,
    pub greeting: Greeting,
    /// Bytes after the greeting (normally none).
    pub buf: BytesMut,
}

/// An authenticated connection.
pub struct Established {
    pub stream: TargetStream,
    /// The server's OK payload (sequence id rewritten when it goes to the application).
    pub ok: bytes::Bytes,
    /// Bytes the server sent after its OK (normally none).
    pub leftover: BytesMut,
    /// What a later COM_CHANGE_USER on this connection needs: the server's greeting (its
    /// scramble), the session's capabilities and what protects the leg.
    pub session: SessionAuth,
}

/// What an established connection was authenticated with, for COM_CHANGE_USER.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    pub greeting: Greeting,
    pub caps: CapabilityFlags,
    pub transport: Transport,
}

fn read_error(addr: SocketAddr, e: ReadError) -> Failure {
    match e {
        ReadError::Io(source) => Failure::TargetIo { addr, source },
        ReadError::Closed => Failure::TargetClosed { addr },
        ReadError::Frame(e) => Failure::Auth {
            addr,
            source: e.into(),
        },
        ReadError::OutOfOrder { got, expected } => Failure::TargetIo {
            addr,
            source: std::io::Error::other(format!(
                "packet with sequence id {got}, expected {expected}"
            )),
        },
    }
}

/// Connects and reads the server's greeting. An ERR in its place (too many connections, host
/// blocked) is [`Failure::ServerRefused`], with the packet to pass on as it came.
pub async fn connect(to: &TargetCx<'_>) -> Result<Greeted, (Failure, Option<bytes::Bytes>)> {
    let addr = to.addr();
    let work = async {
        let mut tcp = to
            .env
            .dial(to.origin)
            .await
            .map_err(|e| (Failure::Dial(e), None))?;
        let mut buf = BytesMut::with_capacity(1024);
        let packet = read_packet(&mut tcp, &mut buf)
            .await
            .map_err(|e| (read_error(addr, e), None))?;
        if packet.first_byte() == Some(ERR_HEADER) {
            let mut raw = BytesMut::new();
            packet.encode(&mut raw);
            let error = ErrPacket::parse(&packet.payload)
                .map_err(|source| (Failure::TargetProtocol { addr, source }, None))?
                .to_server_error();
            return Err((Failure::ServerRefused { addr, error }, Some(raw.freeze())));
        }
        let greeting = Greeting::parse(&packet.payload)
            .map_err(|source| (Failure::TargetProtocol { addr, source }, None))?;
        Ok(Greeted { tcp, greeting, buf })
    };
    let after = to.env.handshake_timeout;
    match tokio::time::timeout(after, work).await {
        Ok(r) => r,
        Err(_) => Err((Failure::TargetTimeout { addr, after }, None)),
    }
}

/// caching_sha2_password's choices from the policy (`mysql.serverPublicKey`) for a leg in
/// plain text (`tls` false) or TLS. The RSA exchange happens only in plain text, so a pinned
/// key file is read only for such a leg. A key file that cannot be read is logged; full
/// authentication without TLS then fails as without the option.
pub(crate) fn auth_options(policy: &Policy, tls: bool) -> ClientAuthOptions {
    let mut options = ClientAuthOptions::default();
    match &policy.server_public_key {
        ServerPublicKey::None => {}
        ServerPublicKey::File(_) if tls => {}
        ServerPublicKey::Request => options.request_public_key = true,
        ServerPublicKey::File(path) => match std::fs::read(path) {
            Ok(pem) => options.server_public_key = Some(pem),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "mysql.serverPublicKey: cannot read the server's RSA public key"
            ),
        },
    }
    options
}

/// Authenticates on a greeted connection as `user` with `password`, on behalf of the
/// application's response `app`.
pub async fn authenticate(
    to: &TargetCx<'_>,
    greeted: Greeted,
    app: &HandshakeResponse,
    user: &[u8],
    password: &[u8],
) -> Result<Established, Failure> {
    let addr = to.addr();
    let work = async {
        let Greeted {
            tcp,
            greeting,
            mut buf,
        } = greeted;
        let mode = to.policy.tls.mode;
        let server_tls = greeting.capabilities.contains(CapabilityFlags::CLIENT_SSL);
        let tls = match mode {
            TlsMode::Disable => false,
            _ if server_tls => true,
            TlsMode::Prefer => {
                tracing::debug!("target offers no TLS; continuing in plain text (tls.mode prefer)");
                false
            }
            _ => {
                return Err(Failure::Tls(target_tls::TlsFailure {
                    addr,
                    reason: format!("the server does not support TLS, and tls.mode is {mode}"),
                }));
            }
        };
        let mut response = HandshakeResponse::for_server(app, &greeting, user, tls);
        let options = auth_options(to.policy, tls);
        let mut auth = ClientAuth::new(&greeting, password, options);
        let caps = response.capabilities;
        let mut out = BytesMut::new();
        let (mut stream, transport) = if tls {
            auth.ssl_request(&response.ssl_request(), &mut out);
            let mut tcp = tcp;
            write(&mut tcp, addr, &out).await?;
            out.clear();
            if !buf.is_empty() {
                return Err(Failure::Tls(target_tls::TlsFailure {
                    addr,
                    reason: "the server sent bytes before the TLS handshake".into(),
                }));
            }
            let (stream, _) = target_tls::connect(tcp, addr, to.policy, to.env, &to.mysql.tls)
                .await
                .map_err(Failure::Tls)?;
            let transport = if mode == TlsMode::VerifyFull {
                Transport::TlsVerified
            } else {
                Transport::Tls
            };
            (TargetStream::Tls(Box::new(stream)), transport)
        } else {
            (TargetStream::Plain(tcp), Transport::Plain)
        };
        let auth_err = |source| Failure::Auth { addr, source };
        auth.start(&mut response, transport, &mut out)
            .map_err(auth_err)?;
        write(&mut stream, addr, &out).await?;
        loop {
            out.clear();
            let packet = read_packet(&mut stream, &mut buf)
                .await
                .map_err(|e| read_error(addr, e))?;
            let step = auth.on_packet(&packet, &mut out);
            match step.map_err(auth_err)? {
                AuthStep::Continue => {
                    if !out.is_empty() {
                        let r = write(&mut stream, addr, &out).await;
                        // The answer may hold the password or a value derived from it.
                        out.iter_mut().for_each(|b| *b = 0);
                        r?;
                    }
                }
                AuthStep::Done(_) => {
                    tracing::debug!(
                        plugin = auth.plugin(),
                        caching_sha2 = auth.caching_sha2_path().map(Sha2Path::as_str),
                        tls,
                        "authenticated to the target"
                    );
                    return Ok(Established {
                        stream,
                        ok: packet.payload,
                        leftover: buf,
                        session: SessionAuth {
                            greeting,
                            caps,
                            transport,
                        },
                    });
                }
            }
        }
    };
    let after = to.env.handshake_timeout;
    match tokio::time::timeout(after, work).await {
        Ok(r) => r,
        Err(_) => Err(Failure::TargetTimeout { addr, after }),
    }
}

async fn write(
    stream: &mut (impl AsyncWrite + Unpin),
    addr: SocketAddr,
    bytes: &[u8],
) -> Result<(), Failure> {
    stream
        .write_all(bytes)
        .await
        .map_err(|source| Failure::TargetIo { addr, source })
}

/// A frame with sequence id `seq` around `payload`.
pub fn packet(payload: &[u8], seq: u8, out: &mut BytesMut) -> u8 {
    frame::encode(payload, seq, out)
}
