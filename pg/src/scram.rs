//! SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677), client side, as PostgreSQL uses
//! them. The nonce is injected so recorded exchanges can be replayed in tests; the salted
//! password and keys derived from it are wiped when dropped.
use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::scram_cache::ScramKeyCache;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Iteration counts above this are refused (a hostile server could otherwise make the broker
/// spend seconds of CPU per connection). PostgreSQL's default is 4096.
pub const MAX_ITERATIONS: u32 = 1 << 20;

/// Iteration counts below this are refused: the client proof lets whoever saw the exchange
/// guess the password offline, and a hostile server that chose a low count makes each guess
/// cheap. PostgreSQL's default (and RFC 7677's) is 4096.
pub const MIN_ITERATIONS: u32 = 4096;

/// Client nonce length in printable characters.
const NONCE_LEN: usize = 24;

/// Channel binding as the client uses it.
#[derive(Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// No TLS: the client cannot bind (`n,,`).
    Unsupported,
    /// TLS, but the server offered no `-PLUS` mechanism (`y,,`).
    NotOffered,
    /// `tls-server-end-point`: the hash of the server certificate (`p=tls-server-end-point,,`).
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ChannelBinding::Unsupported => "n,,",
            ChannelBinding::NotOffered => "y,,",
            ChannelBinding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            ChannelBinding::TlsServerEndPoint(d) => d,
            _ => &[],
        }
    }
}

/// What went wrong in a SCRAM exchange. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed server-first-message: {0}")]
    BadServerFirst(&'static str),
    #[error("malformed server-final-message: {0}")]
    BadServerFinal(&'static str),
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("server iteration count {0} is outside {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations(u64),
    #[error("server signature does not verify: the server does not know the password")]
    BadServerSignature,
    #[error("server reported SCRAM error {0:?}")]
    ServerError(String),
    #[error("SCRAM message out of order")]
    OutOfOrder,
}

enum State {
    First,
    Final {
        server_signature: Zeroizing<[u8; 32]>,
    },
    Done,
}

/// A SCRAM-SHA-256 client exchange.
pub struct ScramClient {
    password: Zeroizing<Vec<u8>>,
    binding: ChannelBinding,
    nonce: String,
    client_first_bare: String,
    state: State,
    /// Where derived keys are looked up and kept, and this exchange's scope in it.
    cache: Option<(Arc<ScramKeyCache>, String)>,
}

/// ClientKey and ServerKey: what PBKDF2 over the password yields, all a client needs to prove
/// it knows the password and to check the server's proof. Wiped when dropped.
#[derive(Clone)]
pub struct ScramKeys {
    client_key: Zeroizing<[u8; 32]>,
    server_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

impl ScramKeys {
    /// SaltedPassword = Hi(password, salt, i); ClientKey and ServerKey from it.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramKeys {
        let salted = hi(password, salt, iterations);
        ScramKeys {
            client_key: Zeroizing::new(hmac(&salted[..], b"Client Key")),
            server_key: Zeroizing::new(hmac(&salted[..], b"Server Key")),
        }
    }

    /// Equal keys (for tests: whether a value came from the cache or was derived again).
    pub fn same_as(&self, other: &ScramKeys) -> bool {
        self.client_key == other.client_key && self.server_key == other.server_key
    }
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

/// A fresh random nonce of printable characters other than `,`.
pub fn random_nonce() -> String {
    let mut raw = [0u8; NONCE_LEN];
    getrandom::fill(&mut raw).expect("operating system random source");
    raw.iter()
        .map(|b| {
            // 0x21..=0x7e without ',' (0x2c).
            let c = 0x21 + (b % 93);
            if c == b',' { '~' } else { c as char }
        })
        .collect()
}

impl ScramClient {
    /// Starts an exchange. `user` goes into `n=` (PostgreSQL ignores it and libpq sends it
    /// empty; tests set it to replay RFC vectors). The password is SASLprep-normalized when
    /// possible, else used as bytes (as PostgreSQL does).
    pub fn new(user: &str, password: &[u8], binding: ChannelBinding, nonce: String) -> ScramClient {
        let password = match std::str::from_utf8(password)
            .ok()
            .and_then(|p| stringprep::saslprep(p).ok())
        {
            Some(p) => Zeroizing::new(p.as_bytes().to_vec()),
            None => Zeroizing::new(password.to_vec()),
        };
        let user = user.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            client_first_bare: format!("n={user},r={nonce}"),
            password,
            binding,
            nonce,
            state: State::First,
            cache: None,
        }
    }

    /// Takes derived keys from `cache` (and keeps new ones there) under `scope`, which names
    /// the target and user; the salt, iteration count and password complete the key.
    pub fn with_cache(mut self, cache: Arc<ScramKeyCache>, scope: String) -> ScramClient {
        self.cache = Some((cache, scope));
        self
    }

    /// The mechanism this exchange uses.
    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ChannelBinding::TlsServerEndPoint(_) => SCRAM_SHA_256_PLUS,
            _ => SCRAM_SHA_256,
        }
    }

    /// client-first-message, sent in SASLInitialResponse.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare).into_bytes()
    }

    /// Takes server-first-message (SASLContinue), returns client-final-message (SASLResponse).
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::First) {
            return Err(ScramError::OutOfOrder);
        }
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::BadServerFirst("not UTF-8"))?;
        let mut parts = text.split(',');
        let nonce = attr(parts.next(), 'r').ok_or(ScramError::BadServerFirst("no nonce"))?;
        let salt = attr(parts.next(), 's').ok_or(ScramError::BadServerFirst("no salt"))?;
        let iters =
            attr(parts.next(), 'i').ok_or(ScramError::BadServerFirst("no iteration count"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::BadServerFirst("salt is not base64"))?;
        let iters: u64 = iters
            .parse()
            .map_err(|_| ScramError::BadServerFirst("bad iteration count"))?;
        if iters < MIN_ITERATIONS as u64 || iters > MAX_ITERATIONS as u64 {
            return Err(ScramError::Iterations(iters));
        }
        let keys = match &self.cache {
            Some((cache, scope)) => cache.keys(scope, &self.password, &salt, iters as u32),
            None => ScramKeys::derive(&self.password, &salt, iters as u32),
        };
        let client_key = &keys.client_key;
        let stored_key = Zeroizing::<[u8; 32]>::new(Sha256::digest(&client_key[..]).into());

        let mut cbind = self.binding.gs2_header().as_bytes().to_vec();
        cbind.extend_from_slice(self.binding.data());
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);

        let signature = Zeroizing::new(hmac(&stored_key[..], auth_message.as_bytes()));
        let mut proof = Zeroizing::new([0u8; 32]);
        for i in 0..32 {
            proof[i] = client_key[i] ^ signature[i];
        }
        self.state = State::Final {
            server_signature: Zeroizing::new(hmac(&keys.server_key[..], auth_message.as_bytes())),
        };
        Ok(format!("{without_proof},p={}", B64.encode(&proof[..])).into_bytes())
    }

    /// Checks server-final-message (SASLFinal): the server proves it knows the password.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), ScramError> {
        let State::Final { server_signature } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::BadServerFinal("not UTF-8"))?;
        let first = text.split(',').next();
        if let Some(e) = attr(first, 'e') {
            return Err(ScramError::ServerError(e.chars().take(64).collect()));
        }
        let v = attr(first, 'v').ok_or(ScramError::BadServerFinal("no verifier"))?;
        let v = B64
            .decode(v)
            .map_err(|_| ScramError::BadServerFinal("verifier is not base64"))?;
        // Not secret-dependent timing in a way that helps anyone: the server sent it.
        if v.as_slice() != &server_signature[..] {
            return Err(ScramError::BadServerSignature);
        }
        Ok(())
    }
}

fn attr(part: Option<&str>, name: char) -> Option<&str> {
    let part = part?;
    let mut chars = part.chars();
    (chars.next()? == name && chars.next()? == '=').then(|| &part[2..])
}

pub(super) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802: PBKDF2-HMAC-SHA-256 with one output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<[u8; 32]> {
    let key = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes keys of any length");
    let mut mac = key.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u = Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()));
    let mut out = Zeroizing::new(*u);
    for _ in 1..iterations {
        let mut mac = key.clone();
        mac.update(&u[..]);
        *u = mac.finalize().into_bytes().into();
        for i in 0..32 {
            out[i] ^= u[i];
        }
    }
    out
}
