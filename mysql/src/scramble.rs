//! What each authentication plugin computes from the password. The hashes of
//! mysql_native_password and caching_sha2_password are `mysql_common`'s; the MariaDB ed25519
//! signature and the RSA step are here, on `ed25519-dalek` and `rsa`.
use ed25519_dalek::hazmat::{ExpandedSecretKey, raw_sign};
use ed25519_dalek::{Signature, VerifyingKey};
use mysql_common::auth::plugins::caching_sha2_password::scramble_sha256;
use mysql_common::auth::plugins::mysql_native_password::scramble_native;
use rsa::pkcs1::DecodeRsaPublicKey as _;
use rsa::pkcs8::DecodePublicKey as _;
use rsa::{Oaep, PublicKey};
use sha1::Sha1;
use sha2::{Digest as _, Sha512};
use zeroize::Zeroizing;

use crate::constants::SCRAMBLE_LEN;
use crate::error::AuthError;

/// mysql_native_password: SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))). An empty
/// password is answered with empty data (that is how the server recognises it).
pub fn native_password(scramble: &[u8; SCRAMBLE_LEN], password: &[u8]) -> Vec<u8> {
    scramble_native(scramble, password).map_or_else(Vec::new, |h| h.to_vec())
}

/// caching_sha2_password's first message: SHA256(password) XOR SHA256(SHA256(SHA256(password))
/// + scramble). Empty for an empty password.
pub fn caching_sha2(scramble: &[u8; SCRAMBLE_LEN], password: &[u8]) -> Vec<u8> {
    scramble_sha256(scramble, password).map_or_else(Vec::new, |h| h.to_vec())
}

/// MariaDB client_ed25519: an Ed25519 signature of the server's nonce, under a key derived as
/// RFC 8032 derives one from a seed, except that the "seed" is the password of any length:
/// SHA-512(password) gives the clamped secret scalar (first half) and the nonce prefix
/// (second half): MariaDB's `crypto_sign` (plugin/auth_ed25519/ref10/sign.c) hashes the password
/// where the reference code hashes the 32-byte seed. The public key the server stores is that
/// scalar times the base point.
pub fn ed25519(password: &[u8], nonce: &[u8]) -> [u8; 64] {
    let az = Zeroizing::new(<[u8; 64]>::from(Sha512::digest(password)));
    let esk = ExpandedSecretKey::from_bytes(&az);
    let public = VerifyingKey::from(&esk);
    let sig: Signature = raw_sign::<Sha512>(&esk, nonce, &public);
    sig.to_bytes()
}

/// The public key the server keeps for an ed25519 account (what `PASSWORD()` of the plugin
/// returns, before base64): for tests and diagnostics.
pub fn ed25519_public_key(password: &[u8]) -> [u8; 32] {
    let az = Zeroizing::new(<[u8; 64]>::from(Sha512::digest(password)));
    VerifyingKey::from(&ExpandedSecretKey::from_bytes(&az)).to_bytes()
}

/// The password with its terminating NUL, XORed with the scramble repeated: what
/// caching_sha2_password (and sha256_password) encrypt with the server's RSA key, so that the
/// ciphertext is bound to this connection's scramble.
pub fn xor_password(password: &[u8], scramble: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(password.len() + 1));
    buf.extend_from_slice(password);
    buf.push(0);
    if !scramble.is_empty() {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= scramble[i % scramble.len()];
        }
    }
    buf
}

/// Reads the server's RSA public key: PEM, SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`, what
/// MySQL sends) or PKCS#1 (`BEGIN RSA PUBLIC KEY`). Trailing NULs and whitespace are ignored.
pub fn parse_public_key(pem: &[u8]) -> Result<PublicKey, AuthError> {
    let end = pem
        .iter()
        .rposition(|b| *b != 0 && !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&pem[..end]).map_err(|_| AuthError::BadPublicKey)?;
    PublicKey::from_public_key_pem(text)
        .or_else(|_| PublicKey::from_pkcs1_pem(text))
        .map_err(|_| AuthError::BadPublicKey)
}

/// RSA-OAEP (SHA-1 for the hash and MGF1, as MySQL's `RSA_PKCS1_OAEP_PADDING` uses) of
/// [`xor_password`].
pub fn rsa_encrypt_password(
    key: &PublicKey,
    password: &[u8],
    scramble: &[u8],
) -> Result<Vec<u8>, AuthError> {
    let plain = xor_password(password, scramble);
    let mut rng = getrandom::SysRng;
    key.encrypt(&mut rng, Oaep::<Sha1>::new(), &plain)
        .map_err(|_| AuthError::Rsa)
}
