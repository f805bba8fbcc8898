//! The target leg: connect (marked socket), negotiate TLS as the policy says, send the
//! rewritten StartupMessage and authenticate, up to ReadyForQuery.
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{Postgres, failure::Failure};
use crate::{
    config::{Policy, TlsMode},
    connector::{Env, connect_marked, stream::TargetStream, target_tls},
};
use latch_pg::{
    Frame,
    auth::{Allowed, ClientAuth, TargetTls},
    frame,
    handshake::{Event, MAX_HANDSHAKE_MESSAGE, TargetHandshake},
    startup,
};

/// A target connection that is authenticated and ready for queries.
pub struct Established {
    pub stream: TargetStream,
    /// What to send the application after AuthenticationOk, BackendKeyData excluded.
    pub to_app: Vec<Frame>,
    /// The server's cancellation key.
    pub key: Option<(i32, i32)>,
    /// Bytes the server sent after ReadyForQuery (normally none).
    pub leftover: BytesMut,
}

/// What the policy lets latch answer the server with on this connection: md5 and cleartext
/// only when the policy names them and TLS verified the server (verify-full).
pub fn allowed(policy: &Policy, tls: &TargetTls) -> Allowed {
    let verified = policy.tls.mode == crate::config::TlsMode::VerifyFull
        && matches!(tls, TargetTls::Tls { .. });
    Allowed {
        scram: policy.auth.scram,
        md5: policy.auth.md5,
        cleartext: policy.auth.cleartext,
        require_binding: policy.auth.channel_binding == crate::config::ChannelBindingMode::Require,
        verified_target: verified,
    }
}

/// Where a session's target leg goes and what it may use.
#[derive(Clone, Copy)]
pub struct TargetCx<'a> {
    pub addr: SocketAddr,
    /// The namespace the socket is made in (the agent's own if `None`).
    pub netns: Option<&'a crate::netns::Netns>,
    pub policy: &'a Policy,
    pub env: &'a Env,
    pub pg: &'a Postgres,
}

/// Connects to the target and authenticates as `user` with `password`, sending `params` as
/// the StartupMessage.
pub async fn open(
    to: &TargetCx<'_>,
    params: &[(String, String)],
    user: &str,
    password: Option<&str>,
) -> Result<Established, Failure> {
    let TargetCx {
        addr,
        netns,
        policy,
        env,
        pg,
    } = *to;
    let work = async {
        let tcp = connect_marked(addr, env.mark, env.connect_timeout, netns)
            .await
            .map_err(Failure::Dial)?;
        let (mut stream, tls_state) = negotiate_tls(tcp, to).await?;
        let mut out = BytesMut::new();
        startup::encode_startup(
            params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut out,
        );
        write(&mut stream, addr, &out).await?;
        let allowed = allowed(policy, &tls_state);
        let auth = ClientAuth::new(user, password, tls_state)
            .allowing(allowed)
            .with_key_cache(pg.scram_keys.clone(), format!("{addr}/{user}"));
        let done = authenticate(&mut stream, addr, auth).await?;
        Ok(Established {
            stream,
            to_app: done.to_app,
            key: done.key,
            leftover: done.leftover,
        })
    };
    // Bounded by --handshake-timeout like the whole pre-relay phase (which the broker's
    // watchdog measures from admission, so it ends first); not a fixed bound of its own.
    let after = env.handshake_timeout;
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

/// SSLRequest first unless `disable`; TLS on 'S'; on 'N' plain text only for `prefer`.
async fn negotiate_tls(
    mut tcp: tokio::net::TcpStream,
    to: &TargetCx<'_>,
) -> Result<(TargetStream, TargetTls), Failure> {
    let (addr, policy) = (to.addr, to.policy);
    let mode = policy.tls.mode;
    if mode == TlsMode::Disable {
        return Ok((TargetStream::Plain(tcp), TargetTls::Plain));
    }
    let io = |source| Failure::TargetIo { addr, source };
    let mut req = BytesMut::new();
    startup::encode_ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io)?;
    let mut answer = [0u8; 1];
    if tcp.read(&mut answer).await.map_err(io)? == 0 {
        return Err(Failure::TargetClosed { addr });
    }
    match answer[0] {
        b'S' => {
            let (stream, end_point) = target_tls::connect(tcp, addr, policy, to.env, &to.pg.tls)
                .await
                .map_err(Failure::Tls)?;
            Ok((
                TargetStream::Tls(Box::new(stream)),
                TargetTls::Tls {
                    end_point: Some(end_point),
                },
            ))
        }
        b'N' if mode == TlsMode::Prefer => {
            tracing::debug!("target declined TLS; continuing in plain text (tls.mode prefer)");
            Ok((TargetStream::Plain(tcp), TargetTls::Plain))
        }
        b'N' => Err(Failure::Tls(target_tls::TlsFailure {
            addr,
            reason: format!("the server does not support TLS, and tls.mode is {mode}"),
        })),
        other => Err(Failure::Tls(target_tls::TlsFailure {
            addr,
            reason: format!("unexpected answer {:?} to SSLRequest", other as char),
        })),
    }
}

/// What authentication gave, up to ReadyForQuery.
pub struct Authenticated {
    /// What to send the application after AuthenticationOk, BackendKeyData excluded.
    pub to_app: Vec<Frame>,
    /// The server's cancellation key.
    pub key: Option<(i32, i32)>,
    /// Bytes the server sent after ReadyForQuery (normally none).
    pub leftover: BytesMut,
}

/// Runs the authentication exchange on a stream whose StartupMessage has been sent.
pub async fn authenticate(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    addr: SocketAddr,
    auth: ClientAuth,
) -> Result<Authenticated, Failure> {
    let mut hs = TargetHandshake::new(auth);
    let mut buf = BytesMut::with_capacity(4096);
    let mut to_app = Vec::new();
    let mut key = None;
    let handshake = |source| Failure::Handshake { addr, source };
    loop {
        let frame = loop {
            match frame::parse(&mut buf, MAX_HANDSHAKE_MESSAGE).map_err(|e| handshake(e.into()))? {
                Some(f) => break f,
                None => {
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(4096);
                    }
                    let n = stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(|source| Failure::TargetIo { addr, source })?;
                    if n == 0 {
                        return Err(Failure::TargetClosed { addr });
                    }
                }
            }
        };
        match hs.on_frame(frame).map_err(handshake)? {
            Event::Reply(mut bytes) => {
                let r = write(stream, addr, &bytes).await;
                // The reply may hold a password or a value derived from it.
                bytes.iter_mut().for_each(|b| *b = 0);
                r?;
            }
            Event::Continue => {}
            Event::Authenticated => {
                tracing::debug!(method = hs.method(), "authenticated to the target")
            }
            Event::Forward(f) => to_app.push(f),
            Event::BackendKey { pid, secret } => key = Some((pid, secret)),
            Event::Ready(f) => {
                to_app.push(f);
                return Ok(Authenticated {
                    to_app,
                    key,
                    leftover: buf,
                });
            }
        }
    }
}
