//! Authenticating to a server as a client: answers AuthenticationCleartextPassword,
//! AuthenticationMD5Password and AuthenticationSASL (SCRAM-SHA-256, with channel binding over
//! TLS) with the policy's credentials. Pure: takes requests, returns bytes to send.
use std::sync::Arc;

use bytes::BytesMut;
use zeroize::Zeroizing;

use super::{
    backend::AuthRequest,
    scram::{self, ChannelBinding, ScramClient, ScramError},
    scram_cache::ScramKeyCache,
};

/// Why authentication could not proceed on latch's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the server asks for a password ({method}) but the policy provides none")]
    NoPassword { method: &'static str },
    #[error("the server asks for authentication method {0}, which latch does not support")]
    UnsupportedMethod(i32),
    #[error("the server offers SASL mechanisms {0:?}; latch supports SCRAM-SHA-256(-PLUS)")]
    NoMechanism(Vec<String>),
    #[error("the server offers only SCRAM-SHA-256-PLUS, which needs TLS to the target")]
    PlusWithoutTls,
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    #[error("the server sent {0} out of order")]
    OutOfOrder(&'static str),
    #[error("the policy's password contains a NUL byte, which PostgreSQL cannot receive")]
    NulInPassword,
    #[error("the server ended SCRAM without proving it knows the password")]
    ScramIncomplete,
    #[error(
        "the server asks for {0}, which the policy does not allow (authentication.methods; \
         by default scram-sha-256 only)"
    )]
    NotAllowed(&'static str),
    #[error(
        "the server asks for {0}, which shows the password (or a hash as good as it) to whoever \
         answers: latch sends it only to a server verified with tls.mode verify-full"
    )]
    Unverified(&'static str),
    #[error(
        "the policy requires channel binding (channelBinding: require), but the server does not \
         offer SCRAM-SHA-256-PLUS over TLS"
    )]
    BindingRequired,
}

/// What the policy lets one exchange answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub scram: bool,
    pub md5: bool,
    pub cleartext: bool,
    /// Only SCRAM-SHA-256-PLUS (bound to the TLS session).
    pub require_binding: bool,
    /// TLS verified the target's identity (verify-full); md5 and cleartext need it.
    pub verified_target: bool,
}

impl Allowed {
    /// SCRAM-SHA-256 only, toward an unverified target: what a policy gets by default.
    pub const SCRAM: Allowed = Allowed {
        scram: true,
        md5: false,
        cleartext: false,
        require_binding: false,
        verified_target: false,
    };

    fn check(&self, method: &'static str, allowed: bool, reveals: bool) -> Result<(), AuthError> {
        if !allowed {
            Err(AuthError::NotAllowed(method))
        } else if reveals && !self.verified_target {
            Err(AuthError::Unverified(method))
        } else {
            Ok(())
        }
    }
}

/// What to do after a request.
#[derive(Debug)]
pub enum AuthAction {
    /// Send these bytes to the server and wait for its next message.
    Send(BytesMut),
    /// Wait for the next message (nothing to send).
    Wait,
    /// AuthenticationOk: done.
    Done,
}

/// TLS state of the connection to the server, for channel binding.
#[derive(Clone, PartialEq, Eq)]
pub enum TargetTls {
    Plain,
    /// TLS with the `tls-server-end-point` hash of the server certificate, if computable.
    Tls {
        end_point: Option<Vec<u8>>,
    },
}

/// The client side of one authentication exchange.
pub struct ClientAuth {
    user: String,
    password: Option<Zeroizing<Vec<u8>>>,
    tls: TargetTls,
    nonce: Option<String>,
    scram: Option<ScramClient>,
    scram_done: bool,
    method: &'static str,
    key_cache: Option<(Arc<ScramKeyCache>, String)>,
    allowed: Allowed,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth").finish_non_exhaustive()
    }
}

impl ClientAuth {
    /// `user` is the name in the StartupMessage (MD5 salts with it).
    pub fn new(user: &str, password: Option<&str>, tls: TargetTls) -> ClientAuth {
        ClientAuth {
            user: user.to_owned(),
            password: password.map(|p| Zeroizing::new(p.as_bytes().to_vec())),
            tls,
            nonce: None,
            scram: None,
            scram_done: false,
            method: "trust",
            key_cache: None,
            allowed: Allowed::SCRAM,
        }
    }

    /// Answers only with what `allowed` permits (by default [`Allowed::SCRAM`]).
    pub fn allowing(mut self, allowed: Allowed) -> ClientAuth {
        self.allowed = allowed;
        self
    }

    /// Keeps SCRAM keys in `cache` under `scope` (the target and user), so a later exchange
    /// with the same password, salt and iteration count skips PBKDF2.
    pub fn with_key_cache(mut self, cache: Arc<ScramKeyCache>, scope: String) -> ClientAuth {
        self.key_cache = Some((cache, scope));
        self
    }

    /// Uses `nonce` instead of a random one (tests replaying recorded exchanges).
    pub fn with_nonce(mut self, nonce: &str) -> ClientAuth {
        self.nonce = Some(nonce.to_owned());
        self
    }

    /// The method the server asked for (`trust` until it asks for one), for logs.
    pub fn method(&self) -> &'static str {
        self.method
    }

    fn password(&self, method: &'static str) -> Result<&[u8], AuthError> {
        self.password
            .as_deref()
            .map(|p| p.as_slice())
            .ok_or(AuthError::NoPassword { method })
    }

    /// Handles one authentication request from the server.
    pub fn on_request(&mut self, req: AuthRequest) -> Result<AuthAction, AuthError> {
        let mut out = BytesMut::new();
        match req {
            AuthRequest::Ok => {
                if self.scram.is_some() && !self.scram_done {
                    return Err(AuthError::ScramIncomplete);
                }
                Ok(AuthAction::Done)
            }
            AuthRequest::CleartextPassword => {
                self.method = "password";
                self.allowed
                    .check("password", self.allowed.cleartext, true)?;
                let pw = self.password("password")?;
                password_message(pw, &mut out)?;
                Ok(AuthAction::Send(out))
            }
            AuthRequest::Md5Password { salt } => {
                self.method = "md5";
                self.allowed.check("md5", self.allowed.md5, true)?;
                let pw = self.password("md5")?;
                let hashed = Zeroizing::new(postgres_protocol::authentication::md5_hash(
                    self.user.as_bytes(),
                    pw,
                    salt,
                ));
                password_message(hashed.as_bytes(), &mut out)?;
                Ok(AuthAction::Send(out))
            }
            AuthRequest::Sasl { mechanisms } => {
                if self.scram.is_some() {
                    return Err(AuthError::OutOfOrder("AuthenticationSASL"));
                }
                self.allowed
                    .check("SCRAM-SHA-256", self.allowed.scram, false)?;
                let pw = self.password("SCRAM-SHA-256")?.to_vec();
                let pw = Zeroizing::new(pw);
                let has = |m: &str| mechanisms.iter().any(|x| x == m);
                let binding = match &self.tls {
                    TargetTls::Tls { end_point: Some(h) } if has(scram::SCRAM_SHA_256_PLUS) => {
                        ChannelBinding::TlsServerEndPoint(h.clone())
                    }
                    TargetTls::Tls { .. } if has(scram::SCRAM_SHA_256) => {
                        ChannelBinding::NotOffered
                    }
                    TargetTls::Plain if has(scram::SCRAM_SHA_256) => ChannelBinding::Unsupported,
                    TargetTls::Plain if has(scram::SCRAM_SHA_256_PLUS) => {
                        return Err(AuthError::PlusWithoutTls);
                    }
                    _ => return Err(AuthError::NoMechanism(mechanisms)),
                };
                if self.allowed.require_binding
                    && !matches!(binding, ChannelBinding::TlsServerEndPoint(_))
                {
                    return Err(AuthError::BindingRequired);
                }
                let nonce = self.nonce.take().unwrap_or_else(scram::random_nonce);
                let mut client = ScramClient::new("", &pw, binding, nonce);
                if let Some((cache, scope)) = &self.key_cache {
                    client = client.with_cache(cache.clone(), scope.clone());
                }
                self.method = client.mechanism();
                let first = client.client_first();
                sasl_initial_response(client.mechanism(), &first, &mut out);
                self.scram = Some(client);
                Ok(AuthAction::Send(out))
            }
            AuthRequest::SaslContinue(data) => {
                let client = self
                    .scram
                    .as_mut()
                    .ok_or(AuthError::OutOfOrder("AuthenticationSASLContinue"))?;
                let reply = client.server_first(&data)?;
                sasl_response(&reply, &mut out);
                Ok(AuthAction::Send(out))
            }
            AuthRequest::SaslFinal(data) => {
                let client = self
                    .scram
                    .as_mut()
                    .ok_or(AuthError::OutOfOrder("AuthenticationSASLFinal"))?;
                client.server_final(&data)?;
                self.scram_done = true;
                Ok(AuthAction::Wait)
            }
            AuthRequest::Other(code) => Err(AuthError::UnsupportedMethod(code)),
        }
    }
}

fn password_message(pw: &[u8], out: &mut BytesMut) -> Result<(), AuthError> {
    postgres_protocol::message::frontend::password_message(pw, out)
        .map_err(|_| AuthError::NulInPassword)
}

fn sasl_initial_response(mechanism: &str, data: &[u8], out: &mut BytesMut) {
    postgres_protocol::message::frontend::sasl_initial_response(mechanism, data, out)
        .expect("mechanism names have no NUL byte");
}

fn sasl_response(data: &[u8], out: &mut BytesMut) {
    postgres_protocol::message::frontend::sasl_response(data, out)
        .expect("SCRAM messages are small");
}
