//! The small HTTP(S) client the network stores share: hyper 1 with rustls (ring), one
//! connection pool per store, a bound on every exchange, answers read into zeroizing buffers.
//! Exchanges and hyper's connection tasks run in wipe scopes ([`crate::wipe`]): what hyper and
//! rustls free while an answer passes through them is zeroized first.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use zeroize::Zeroizing;

/// Answers larger than this are refused.
const MAX_BODY: usize = 4 << 20;
/// The answer buffer's first capacity at most, whatever length the server announces.
const FIRST_CAPACITY: usize = 64 << 10;

#[derive(Clone)]
pub(crate) struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

pub(crate) struct Response {
    pub status: StatusCode,
    pub body: Zeroizing<Vec<u8>>,
}

#[derive(Debug)]
pub(crate) enum HttpError {
    Timeout(Duration),
    /// Connecting, TLS, sending or reading failed; the text is safe to show.
    Transport(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Timeout(d) => write!(f, "no answer within {d:?}"),
            HttpError::Transport(s) => f.write_str(s),
        }
    }
}

impl HttpClient {
    /// `ca_file`: PEM CA certificates to trust instead of the system roots. `server_name`: the
    /// name to verify and send as SNI instead of the URL's host.
    pub fn new(
        ca_file: Option<&Path>,
        server_name: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpClient, String> {
        Self::with_client_cert(ca_file, server_name, timeout, None)
    }

    /// As [`HttpClient::new`], presenting `client_cert` (PEM certificate chain file, PEM key
    /// file) to servers that ask for one (Vault's TLS certificate auth).
    pub fn with_client_cert(
        ca_file: Option<&Path>,
        server_name: Option<&str>,
        timeout: Duration,
        client_cert: Option<(&Path, &Path)>,
    ) -> Result<HttpClient, String> {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("cannot parse CA file {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("CA file {} holds no certificate", path.display()));
                }
                for c in certs {
                    roots.add(c).map_err(|e| {
                        format!("bad certificate in CA file {}: {e}", path.display())
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let tls = match client_cert {
            None => tls.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("cannot read client certificate {}: {e}", cert.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        format!("cannot parse client certificate {}: {e}", cert.display())
                    })?;
                if chain.is_empty() {
                    return Err(format!("{} holds no certificate", cert.display()));
                }
                // the error names the file, never its content
                let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                    .map_err(|_| format!("cannot read a private key from {}", key.display()))?;
                tls.with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let builder = match server_name {
            Some(name) => {
                let name = rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|_| format!("invalid TLS server name {name:?}"))?;
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let connector = builder.enable_http1().wrap_connector(http);
        // hyper's connection tasks (socket, TLS, read buffers) run in wipe scopes.
        let client = Client::builder(crate::wipe::WipingExecutor)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpClient { client, timeout })
    }

    /// Sends `req` and reads the whole answer, all within the client's timeout, in a wipe
    /// scope.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response, HttpError> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport(chain(&e)))?;
            let status = resp.status();
            let body = read_body(resp.into_body()).await?;
            Ok(Response { status, body })
        };
        crate::wipe::Scoped::new(tokio::time::timeout(self.timeout, exchange))
            .await
            .unwrap_or(Err(HttpError::Timeout(self.timeout)))
    }
}

/// The whole body, at most [`MAX_BODY`], in a zeroizing buffer that grows by moving to a new
/// zeroizing buffer (the old one is wiped, not left behind by a reallocation). Chunks hyper no
/// longer shares are zeroized before they are dropped; shared ones belong to hyper's read
/// buffer, wiped when it is freed (in the connection's wipe scope).
async fn read_body(mut body: hyper::body::Incoming) -> Result<Zeroizing<Vec<u8>>, HttpError> {
    use hyper::body::Body as _;
    use zeroize::Zeroize as _;
    let hint = body.size_hint().lower() as usize;
    let mut buf = Zeroizing::new(Vec::with_capacity(hint.min(FIRST_CAPACITY)));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| HttpError::Transport(format!("reading the answer: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > MAX_BODY {
            return Err(HttpError::Transport(format!(
                "the answer is larger than {} MiB",
                MAX_BODY >> 20
            )));
        }
        crate::wipe::append(&mut buf, &data);
        if let Ok(mut owned) = data.try_into_mut() {
            owned.as_mut().zeroize();
        }
    }
    Ok(buf)
}

/// An error and its sources, joined (hyper's own text alone says little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = s.source();
    }
    text
}

/// A header value made of `parts` (e.g. `["Bearer ", token]`), which hyper must not log or
/// compress into tables, held in a buffer zeroed when the header is dropped.
pub(crate) fn sensitive(parts: &[&str]) -> Result<hyper::header::HeaderValue, String> {
    let len = parts.iter().map(|p| p.len()).sum();
    let bytes = secret_bytes(len, |buf| {
        for p in parts {
            buf.extend_from_slice(p.as_bytes());
        }
    });
    let mut v = hyper::header::HeaderValue::from_maybe_shared(bytes)
        .map_err(|_| "a credential holds bytes not allowed in a header".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

/// Bytes that hold a credential (a request body, a header): `write` fills a buffer of
/// `capacity` that must not grow, since a reallocation would leave a copy behind; the buffer
/// is zeroed when the last reference is dropped.
pub(crate) fn secret_bytes(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(capacity));
    write(&mut buf);
    debug_assert!(buf.len() <= capacity, "the credential buffer grew");
    Bytes::from_owner(buf)
}
