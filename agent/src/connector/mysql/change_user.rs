//! COM_CHANGE_USER during a session: latch re-authenticates on the application's behalf.
//!
//! The application's packet names a user (and a database, character set, connect attributes);
//! its authentication data is wiped unread. The user selects the policy's credential as at
//! connect ([`super::role_for`]); latch sends its own COM_CHANGE_USER with those credentials,
//! computed over the connection's greeting scramble, runs the exchange (AuthSwitchRequest,
//! AuthMoreData) and tells the application the server's last word with sequence id 1, as if
//! the server had answered its packet at once. Application-supplied credentials never reach the
//! server.
//!
//! Refusals are the server's own, and leave the session as MariaDB 10.11 leaves it: a user the
//! policy's roles do not name gets MariaDB's 1045 "Access denied for user 'u'@'host' (using
//! password: YES|NO)"; the session stays the previous user's but its state (user variables,
//! temporary tables) is gone, as MariaDB clears it before authenticating, so latch sends the
//! server a COM_RESET_CONNECTION before it answers. The server's ERR is passed on as it came,
//! except an access denial of the policy's credentials, which names the policy (as at connect),
//! after one refresh and retry. After three failed changes MariaDB answers every further
//! COM_CHANGE_USER with 1047 "Unknown command" (the session goes on); latch counts its own
//! refusals and the server's and does the same.
use std::net::SocketAddr;

use bytes::BytesMut;
use latch_mysql::{
    AuthError, AuthStep, CapabilityFlags, ChangeUser, ClientAuth, ErrPacket, Sha2Path,
    constants::{COM_RESET_CONNECTION, OK_HEADER, er},
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::{
    failure::{self, Failure},
    io::{ReadError, read_packet},
    target::SessionAuth,
};
use crate::{config::Policy, connector::Env};

/// Failed changes after which every further one is answered 1047 (MariaDB's rule).
const MAX_FAILED: u8 = 3;

/// What the relay needs to re-authenticate: the session and where it came from.
pub struct Reauth<'a> {
    pub policy: &'a Policy,
    pub env: &'a Env,
    pub addr: SocketAddr,
    pub conn: u64,
    /// The application's address as the server would name it in "Access denied".
    pub host: String,
    /// The capabilities the application said it has (to read its packet).
    pub app_caps: CapabilityFlags,
    pub session: SessionAuth,
    failed: u8,
}

impl<'a> Reauth<'a> {
    pub fn new(
        policy: &'a Policy,
        env: &'a Env,
        addr: SocketAddr,
        conn: u64,
        host: String,
        app_caps: CapabilityFlags,
        session: SessionAuth,
    ) -> Self {
        Reauth {
            policy,
            env,
            addr,
            conn,
            host,
            app_caps,
            session,
            failed: 0,
        }
    }

    /// Handles the application's COM_CHANGE_USER `payload` (wiped by the caller) on the target
    /// halves. An `Err` is a target failure that ends the session.
    pub async fn run(
        &mut self,
        payload: &[u8],
        target_r: &mut (impl AsyncRead + Unpin),
        target_w: &mut (impl AsyncWrite + Unpin),
    ) -> Result<BytesMut, Failure> {
        if self.failed >= MAX_FAILED {
            self.reset_session(target_r, target_w).await?;
            let err = ErrPacket::new(er::UNKNOWN_COM_ERROR, "Unknown command");
            return Ok(self.frame(&err));
        }
        let asked = match ChangeUser::parse(payload, self.app_caps) {
            Ok(cu) => cu,
            Err(e) => {
                tracing::info!(error = %e, "malformed COM_CHANGE_USER from the application");
                self.failed += 1;
                self.reset_session(target_r, target_w).await?;
                let err = ErrPacket::new(er::HANDSHAKE_ERROR, "Bad handshake");
                return Ok(self.frame(&err));
            }
        };
        let user = asked.username.clone();
        let with_password = !asked.auth_response.expose().is_empty();
        let role = match super::role_for(&user, self.policy, with_password, || self.host.clone()) {
            Ok(role) => role,
            Err(f) => {
                self.failed += 1;
                self.reset_session(target_r, target_w).await?;
                return Ok(self.told(&f));
            }
        };
        let mut creds = match self.env.secrets.credentials_for(self.policy, role).await {
            Ok(c) => c,
            Err(e) => {
                self.failed += 1;
                self.reset_session(target_r, target_w).await?;
                return Ok(self.told(&Failure::Secrets(e)));
            }
        };
        let mut retried = false;
        loop {
            let name = match &creds.username {
                Some(u) => u.expose().as_bytes().to_vec(),
                None => user.clone(),
            };
            let password = creds
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .unwrap_or_default();
            let mut cu = ChangeUser {
                username: name,
                auth_response: Default::default(),
                database: asked.database.clone(),
                charset: asked.charset,
                auth_plugin: None,
                connect_attrs: asked.connect_attrs.clone().filter(|_| {
                    self.session
                        .caps
                        .contains(CapabilityFlags::CLIENT_CONNECT_ATTRS)
                }),
            };
            match self.exchange(&mut cu, password, target_r, target_w).await {
                Ok(ok) => {
                    tracing::info!(user = %String::from_utf8_lossy(&user), "COM_CHANGE_USER re-authenticated with the policy's credentials");
                    let mut out = BytesMut::new();
                    latch_mysql::frame::encode(&ok, 1, &mut out);
                    return Ok(out);
                }
                Err(f) if f.is_auth_rejection() && !retried => {
                    retried = true;
                    match self
                        .env
                        .secrets
                        .fresh_after_rejection(self.policy, role, &creds)
                        .await
                    {
                        Some(fresh) => creds = fresh,
                        None => {
                            self.failed += 1;
                            return Ok(self.told(&f));
                        }
                    }
                }
                // The server said no (the session stays the previous user's, as the server
                // left it): its answer goes on.
                Err(
                    f @ Failure::Auth {
                        source: AuthError::Server(_),
                        ..
                    },
                ) => {
                    self.failed += 1;
                    return Ok(self.told(&f));
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// One COM_CHANGE_USER exchange with the server: its OK payload.
    async fn exchange(
        &self,
        cu: &mut ChangeUser,
        password: &[u8],
        target_r: &mut (impl AsyncRead + Unpin),
        target_w: &mut (impl AsyncWrite + Unpin),
    ) -> Result<bytes::Bytes, Failure> {
        let addr = self.addr;
        let auth_err = |source| Failure::Auth { addr, source };
        let io_err = |source| Failure::TargetIo { addr, source };
        let mut auth = ClientAuth::new(
            &self.session.greeting,
            password,
            super::target::auth_options(
                self.policy,
                self.session.transport != latch_mysql::Transport::Plain,
            ),
        );
        let mut out = BytesMut::new();
        auth.start_change_user(cu, self.session.caps, self.session.transport, &mut out)
            .map_err(auth_err)?;
        let work = async {
            let mut buf = BytesMut::new();
            loop {
                // Flushed: a TLS or compressed leg may hold what was written until then.
                let r = match target_w.write_all(&out).await {
                    Ok(()) => target_w.flush().await,
                    Err(e) => Err(e),
                };
                // The packet holds a value derived from the password.
                out.iter_mut().for_each(|b| *b = 0);
                out.clear();
                r.map_err(io_err)?;
                let packet = read_packet(target_r, &mut buf)
                    .await
                    .map_err(|e| read_failure(addr, e))?;
                match auth.on_packet(&packet, &mut out).map_err(auth_err)? {
                    AuthStep::Continue => {}
                    AuthStep::Done(_) => {
                        if !buf.is_empty() {
                            return Err(Failure::TargetIo {
                                addr,
                                source: std::io::Error::other(
                                    "the server sent more after its OK to COM_CHANGE_USER",
                                ),
                            });
                        }
                        tracing::debug!(
                            plugin = auth.plugin(),
                            caching_sha2 = auth.caching_sha2_path().map(Sha2Path::as_str),
                            "COM_CHANGE_USER authenticated to the target"
                        );
                        return Ok(packet.payload);
                    }
                }
            }
        };
        let after = self.env.handshake_timeout;
        match tokio::time::timeout(after, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::TargetTimeout { addr, after }),
        }
    }

    /// Clears the session's state on the server (COM_RESET_CONNECTION), as MariaDB does at the
    /// start of every COM_CHANGE_USER, for a change latch refuses itself.
    async fn reset_session(
        &self,
        target_r: &mut (impl AsyncRead + Unpin),
        target_w: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), Failure> {
        let addr = self.addr;
        let work = async {
            let mut out = BytesMut::new();
            latch_mysql::frame::encode(&[COM_RESET_CONNECTION], 0, &mut out);
            let written = match target_w.write_all(&out).await {
                Ok(()) => target_w.flush().await,
                Err(e) => Err(e),
            };
            written.map_err(|source| Failure::TargetIo { addr, source })?;
            let mut buf = BytesMut::new();
            let packet = read_packet(target_r, &mut buf)
                .await
                .map_err(|e| read_failure(addr, e))?;
            match packet.first_byte() {
                Some(OK_HEADER) if buf.is_empty() => Ok(()),
                _ => Err(Failure::TargetIo {
                    addr,
                    source: std::io::Error::other(
                        "the server did not answer COM_RESET_CONNECTION with OK",
                    ),
                }),
            }
        };
        let after = self.env.handshake_timeout;
        match tokio::time::timeout(after, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::TargetTimeout { addr, after }),
        }
    }

    /// The ERR packet for `failure`, with sequence id 1.
    fn told(&self, failure: &Failure) -> BytesMut {
        let err = failure
            .to_app(&self.policy.name, self.conn)
            .unwrap_or_else(|| ErrPacket::new(er::HANDSHAKE_ERROR, "Bad handshake"));
        self.frame(&err)
    }

    fn frame(&self, err: &ErrPacket) -> BytesMut {
        let mut out = BytesMut::new();
        failure::encode(err, 1, Some(self.app_caps), &mut out);
        out
    }
}

fn read_failure(addr: SocketAddr, e: ReadError) -> Failure {
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
