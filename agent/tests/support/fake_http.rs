//! A tiny HTTP/1 server on loopback answering with recorded responses, for APIs that cannot run
//! here (Kubernetes API server, TokenReview).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// What the handler sees of a request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

pub type Handler = Arc<dyn Fn(&Seen) -> (u16, String) + Send + Sync>;

pub struct FakeHttp {
    pub port: u16,
    pub https: bool,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeHttp {
    pub async fn start(handler: Handler) -> FakeHttp {
        FakeHttp::start_with(handler, None).await
    }

    /// With `tls`, the server speaks HTTPS only.
    pub async fn start_with(handler: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeHttp {
        let https = tls.is_some();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (handler, seen, tls) = (handler.clone(), seen2.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (handler, seen) = (handler.clone(), seen.clone());
                        async move {
                            let method = req.method().to_string();
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let authorization = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let s = Seen {
                                method,
                                path,
                                authorization,
                                body,
                            };
                            let (status, text) = handler(&s);
                            seen.lock().unwrap().push(s);
                            let resp = Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        FakeHttp {
            port,
            https,
            seen,
            task,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A throw-away CA and a server certificate for `127.0.0.1` (and the in-cluster API server
/// name); returns them and a TLS acceptor serving the server certificate.
pub fn test_tls() -> (latch_tests::certs::TestCa, tokio_rustls::TlsAcceptor) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = latch_tests::certs::TestCa::new(
        "kubernetes",
        &["IP:127.0.0.1", "DNS:kubernetes.default.svc"],
    );
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca.server_cert())
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(ca.server_key()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    (
        ca,
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )
}
