//! TLS to the target with rustls, as the policy's `tls` block says: `require` encrypts without
//! checking the certificate, `verify-ca` checks the chain, `verify-full` the chain and the name.
//! Protocol-neutral: a connector calls [`connect`] once its protocol has agreed to TLS, with
//! the [`ClientConfigs`] cache it owns.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::Env;
use crate::config::{Policy, Target, TlsMode};

/// The TLS handshake with the target failed, or could not start (no usable CA, client
/// certificate or server name). The reason names what, never a secret.
#[derive(Debug, thiserror::Error)]
#[error("TLS to target {addr}: {reason}")]
pub struct TlsFailure {
    pub addr: SocketAddr,
    pub reason: String,
}

/// Runs the TLS handshake on `tcp`; returns the stream and the `tls-server-end-point` channel
/// binding data (the server certificate's hash).
pub async fn connect(
    tcp: TcpStream,
    addr: SocketAddr,
    policy: &Policy,
    env: &Env,
    configs: &ClientConfigs,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), TlsFailure> {
    connect_alpn(tcp, addr, policy, env, configs, &[]).await
}

/// As [`connect`], offering `alpn` in the ClientHello (empty: nothing offered). The policy's
/// cached configuration is copied for it; the copy shares its session cache.
pub async fn connect_alpn(
    tcp: TcpStream,
    addr: SocketAddr,
    policy: &Policy,
    env: &Env,
    configs: &ClientConfigs,
    alpn: &[&[u8]],
) -> Result<(TlsStream<TcpStream>, Vec<u8>), TlsFailure> {
    let fail = |reason: String| TlsFailure { addr, reason };
    let mut config = client_config(policy, env, configs).await.map_err(fail)?;
    if !alpn.is_empty() {
        let mut with = (*config).clone();
        with.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config = Arc::new(with);
    }
    let name = server_name(policy, addr).map_err(fail)?;
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| fail(format!("handshake failed: {e}")))?;
    let end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| end_point_hash(c.as_ref()))
        .ok_or_else(|| fail("the server sent no certificate".to_owned()))?;
    Ok((stream, end_point))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The name to verify and send as SNI: `tls.serverName`, else the destination host, else the
/// address connected to.
fn server_name(policy: &Policy, addr: SocketAddr) -> Result<ServerName<'static>, String> {
    let name = match (&policy.tls.server_name, &policy.destination.target) {
        (Some(n), _) => n.clone(),
        (None, Target::Host(h)) => h.clone(),
        (None, _) => return Ok(ServerName::IpAddress(addr.ip().into())),
    };
    ServerName::try_from(name.clone())
        .map_err(|_| format!("{name:?} is not a valid TLS server name"))
}

/// Client configurations by policy, built once and reused while the policy's `tls` block, its
/// CA file and its client certificate stay the same. Reuse is what makes TLS session
/// resumption possible: each configuration keeps its own session cache (rustls' in-memory
/// store), so the next connection to the same server offers the ticket it got before.
#[derive(Default)]
pub struct ClientConfigs {
    map: Mutex<HashMap<String, (Fingerprint, Arc<ClientConfig>)>>,
}

type Fingerprint = [u8; 32];

/// More policies than this and the cache starts over (stale names after reloads).
const MAX_CONFIGS: usize = 1024;

impl ClientConfigs {
    fn get(&self, policy: &str, fingerprint: &[u8; 32]) -> Option<Arc<ClientConfig>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(policy)
            .filter(|(f, _)| f == fingerprint)
            .map(|(_, c)| c.clone())
    }

    fn put(&self, policy: &str, fingerprint: [u8; 32], config: Arc<ClientConfig>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CONFIGS && !map.contains_key(policy) {
            map.clear();
        }
        map.insert(policy.to_owned(), (fingerprint, config));
    }
}

/// What a policy's client configuration is built from: the `tls` block, the CA file's size and
/// modification time, and the client certificate and key (hashed; they may have rotated).
fn fingerprint(policy: &Policy, client: Option<(&[u8], &[u8])>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(format!("{:?}", policy.tls).as_bytes());
    if let Some(meta) = policy
        .tls
        .ca
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
    {
        h.update(meta.len().to_be_bytes());
        if let Ok(t) = meta.modified()
            && let Ok(d) = t.duration_since(std::time::UNIX_EPOCH)
        {
            h.update(d.as_nanos().to_be_bytes());
        }
    }
    if let Some((cert, key)) = client {
        h.update((cert.len() as u64).to_be_bytes());
        h.update(cert);
        h.update(key);
    }
    h.finalize().into()
}

/// The fingerprint of the client configuration a connection for `policy` is made with now
/// (its `tls` block, CA file and client certificate and key, resolved from the store): two
/// connections with the same one were made alike (the HTTP connector's pool keys on it).
pub async fn client_fingerprint(policy: &Policy, env: &Env) -> Result<[u8; 32], String> {
    let client = client_pems(policy, env).await?;
    let pems = client
        .as_ref()
        .map(|(c, k)| (c.expose().as_bytes(), k.expose().as_bytes()));
    Ok(fingerprint(policy, pems))
}

/// The policy's client certificate and key for mTLS, from the store (`None`: no mTLS).
async fn client_pems(
    policy: &Policy,
    env: &Env,
) -> Result<Option<(crate::config::SecretString, crate::config::SecretString)>, String> {
    Ok(match (&policy.tls.client_cert, &policy.tls.client_key) {
        (Some(cert), Some(key)) => {
            let resolver = env.secrets.current();
            let cert = resolver
                .secret(cert)
                .await
                .map_err(|e| format!("client certificate: {e}"))?;
            let key = resolver
                .secret(key)
                .await
                .map_err(|e| format!("client key: {e}"))?;
            Some((cert, key))
        }
        _ => None,
    })
}

async fn client_config(
    policy: &Policy,
    env: &Env,
    configs: &ClientConfigs,
) -> Result<Arc<ClientConfig>, String> {
    let client = client_pems(policy, env).await?;
    let pems = client
        .as_ref()
        .map(|(c, k)| (c.expose().as_bytes(), k.expose().as_bytes()));
    let fp = fingerprint(policy, pems);
    if let Some(config) = configs.get(&policy.name, &fp) {
        return Ok(config);
    }
    let config = Arc::new(build_client_config(policy, pems)?);
    configs.put(&policy.name, fp, config.clone());
    Ok(config)
}

fn build_client_config(
    policy: &Policy,
    client: Option<(&[u8], &[u8])>,
) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match policy.tls.mode {
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(roots(policy)?);
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("CA certificates: {e}"))?;
            if policy.tls.mode == TlsMode::VerifyCa {
                Arc::new(ChainOnly(inner))
            } else {
                inner
            }
        }
        _ => Arc::new(Unverified(provider.clone())),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "the client certificate is not PEM".to_owned())?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|_| "the client key is not a PEM private key".to_owned())?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

fn roots(policy: &Policy) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match &policy.tls.ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading CA file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "CA file {} holds no usable certificate",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system CA certificates found; set tls.ca".to_owned());
            }
        }
    }
    Ok(roots)
}

/// `tls-server-end-point` (RFC 5929): the certificate's hash with its signature's hash
/// function, SHA-256 for MD5/SHA-1 (and when the algorithm is not recognized).
pub fn end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    match signature_hash(cert_der) {
        Some(384) => Sha384::digest(cert_der).to_vec(),
        Some(512) => Sha512::digest(cert_der).to_vec(),
        _ => Sha256::digest(cert_der).to_vec(),
    }
}

/// The hash size of a certificate's signatureAlgorithm, for the algorithms that use SHA-384 or
/// SHA-512 (RSA PKCS#1 and ECDSA).
fn signature_hash(der: &[u8]) -> Option<u16> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, ... }, ... }
    let (_, outer) = tlv(der, 0x30)?;
    let (rest, _) = tlv(outer, 0x30)?;
    let (_, alg) = tlv(rest, 0x30)?;
    let (_, oid) = tlv(alg, 0x06)?;
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    match oid {
        [p @ .., 0x0c] if p == RSA => Some(384),
        [p @ .., 0x0d] if p == RSA => Some(512),
        [p @ .., 0x03] if p == ECDSA => Some(384),
        [p @ .., 0x04] if p == ECDSA => Some(512),
        _ => None,
    }
}

/// One DER TLV with tag `tag` at the start of `b`: (bytes after it, its contents).
fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, b) = b.split_first()?;
    if t != tag {
        return None;
    }
    let (&l, mut b) = b.split_first()?;
    let len = if l < 0x80 {
        l as usize
    } else {
        let n = (l & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (&b[len..], &b[..len]))
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require`: encryption without certificate checks (libpq's meaning); handshake
/// signatures are still verified so the peer holds the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tls: &str) -> Policy {
        let text = format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: local}}\nspec:\n  file: {{path: /etc/latch/secrets.yaml}}\n---\napiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: db}}\nspec:\n  destination: {{address: 127.0.0.2, port: 5432}}\n  protocol: postgres\n  tls: {tls}\n  credentials: {{store: local, password: {{path: db}}}}\n"
        );
        crate::config::load_str("t.yaml", &text)
            .unwrap()
            .policies
            .remove(0)
    }

    /// One configuration (and so one session cache) per policy while nothing it is built from
    /// changes; a changed `tls` block or client certificate builds a new one.
    #[test]
    fn client_configs_are_reused_until_their_inputs_change() {
        let require = policy("{mode: require}");
        let configs = ClientConfigs::default();
        let fp = fingerprint(&require, None);
        assert!(configs.get("db", &fp).is_none());
        let built = Arc::new(build_client_config(&require, None).unwrap());
        configs.put("db", fp, built.clone());
        assert!(Arc::ptr_eq(&configs.get("db", &fp).unwrap(), &built));
        assert_eq!(fp, fingerprint(&policy("{mode: require}"), None));

        let verify = policy("{mode: verify-full, serverName: db.internal}");
        assert!(configs.get("db", &fingerprint(&verify, None)).is_none());
        let with_cert = fingerprint(&require, Some((b"cert-a", b"key")));
        assert_ne!(with_cert, fp);
        assert_ne!(with_cert, fingerprint(&require, Some((b"cert-b", b"key"))));
        // The same certificate with another key is another client (and another pool key for
        // HTTP's kept connections).
        assert_ne!(
            with_cert,
            fingerprint(&require, Some((b"cert-a", b"key-2")))
        );
        assert_ne!(
            fingerprint(&require, Some((b"cert-", b"akey"))),
            with_cert,
            "the certificate's end is not taken for the key's start"
        );
        assert!(configs.get("db", &with_cert).is_none());
    }
}
