//! Kubernetes Secrets, read from the API server with the agent's service account (in-cluster:
//! token file, CA file, `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`; or the store's
//! `apiServer`, `tokenFile`, `caFile`). A reference's path is `name` or `namespace/name`, its
//! field a key of the Secret's `data` (base64-decoded).
//!
//! The token file is read for every request (projected tokens rotate); the namespace defaults
//! to the store's `namespace`, else the service account's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};

use super::ResolverOptions;
use super::error::SecretError;
use super::http::{HttpClient, sensitive};
use super::store::{BoxFuture, Lookup, Store};
use super::value::Secret;
use crate::config::{self, SecretString};

const KIND: &str = "kubernetes";
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

pub struct KubernetesStore {
    name: String,
    spec: config::KubernetesStore,
    /// The API server URL, or why there is none (outside a cluster without `apiServer`).
    api: Result<String, String>,
    token_file: PathBuf,
    http: HttpClient,
}

impl KubernetesStore {
    pub fn new(
        name: String,
        spec: config::KubernetesStore,
        opts: &ResolverOptions,
    ) -> Result<KubernetesStore, SecretError> {
        let api = match &spec.api_server {
            Some(a) => Ok(a.trim_end_matches('/').to_string()),
            None => api_from_env(
                std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            ),
        };
        let default_ca = Path::new(SA_DIR).join("ca.crt");
        let ca = spec
            .ca_file
            .clone()
            .or_else(|| default_ca.exists().then_some(default_ca));
        let http = HttpClient::new(ca.as_deref(), None, opts.http_timeout).map_err(|reason| {
            SecretError::Config {
                store: name.clone(),
                reason,
            }
        })?;
        let token_file = spec
            .token_file
            .clone()
            .unwrap_or_else(|| Path::new(SA_DIR).join("token"));
        Ok(KubernetesStore {
            name,
            spec,
            api,
            token_file,
            http,
        })
    }

    fn auth_failed(&self, reason: impl Into<String>) -> SecretError {
        SecretError::StoreAuth {
            store: self.name.clone(),
            kind: KIND,
            reason: reason.into(),
        }
    }

    fn default_namespace(&self) -> Result<String, SecretError> {
        if let Some(ns) = &self.spec.namespace {
            return Ok(ns.clone());
        }
        let file = Path::new(SA_DIR).join("namespace");
        std::fs::read_to_string(&file)
            .map(|s| s.trim().to_string())
            .map_err(|e| SecretError::Config {
                store: self.name.clone(),
                reason: format!(
                    "no namespace: the reference names none, the store sets none, and {} is unreadable ({e})",
                    file.display()
                ),
            })
    }

    async fn read(&self, lookup: Lookup<'_>) -> Result<Secret, SecretError> {
        let api = self.api.as_ref().map_err(|reason| SecretError::Config {
            store: self.name.clone(),
            reason: reason.clone(),
        })?;
        let (namespace, secret) = match lookup.path.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => (self.default_namespace()?, lookup.path.to_string()),
        };
        let url = secret_url(api, &namespace, &secret).map_err(|reason| SecretError::Invalid {
            store: self.name.clone(),
            path: lookup.path.to_string(),
            reason,
        })?;
        let token = super::vault::auth::read_file(&self.token_file)
            .map_err(|r| self.auth_failed(format!("service account token: {r}")))?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .header("accept", "application/json")
            .header(
                "authorization",
                sensitive(&["Bearer ", token.expose()]).map_err(|r| self.auth_failed(r))?,
            )
            .body(Full::new(Bytes::new()))
            .map_err(|_| SecretError::Invalid {
                store: self.name.clone(),
                path: lookup.path.to_string(),
                reason: "the path cannot be used in a URL".to_string(),
            })?;
        let resp = self
            .http
            .send(req)
            .await
            .map_err(|e| SecretError::Unreachable {
                store: self.name.clone(),
                kind: KIND,
                reason: format!("{api}: {e}"),
            })?;
        let path = format!("{namespace}/{secret}");
        match resp.status {
            s if s.is_success() => {
                parse_secret(&resp.body).map_err(|reason| SecretError::Invalid {
                    store: self.name.clone(),
                    path,
                    reason,
                })
            }
            StatusCode::NOT_FOUND => Err(SecretError::NotFound {
                store: self.name.clone(),
                path,
            }),
            StatusCode::UNAUTHORIZED => Err(self.auth_failed(format!(
                "the API server refused the token: {}",
                status_message(&resp.body)
            ))),
            StatusCode::FORBIDDEN => Err(SecretError::Permission {
                store: self.name.clone(),
                reason: format!("reading secret {path}: {}", status_message(&resp.body)),
            }),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(SecretError::Unreachable {
                    store: self.name.clone(),
                    kind: KIND,
                    reason: format!("{api} answered {s}"),
                })
            }
            s => Err(SecretError::Invalid {
                store: self.name.clone(),
                path,
                reason: format!(
                    "the API server answered {s}: {}",
                    status_message(&resp.body)
                ),
            }),
        }
    }
}

/// The API server URL in a pod: `https://HOST:PORT` (IPv6 hosts bracketed).
pub fn api_from_env(host: Option<&str>, port: Option<&str>) -> Result<String, String> {
    let host = host.filter(|h| !h.is_empty()).ok_or(
        "no apiServer set and KUBERNETES_SERVICE_HOST is not set (the agent is not running in a pod)",
    )?;
    let port = port.filter(|p| !p.is_empty()).unwrap_or("443");
    if host.contains(':') {
        Ok(format!("https://[{host}]:{port}"))
    } else {
        Ok(format!("https://{host}:{port}"))
    }
}

/// `API/api/v1/namespaces/NS/secrets/NAME`, refusing names that are not DNS labels/subdomains.
pub fn secret_url(api: &str, namespace: &str, name: &str) -> Result<String, String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !ok(namespace) {
        return Err(format!("{namespace:?} is not a valid namespace name"));
    }
    if !ok(name) {
        return Err(format!("{name:?} is not a valid Secret name"));
    }
    Ok(format!(
        "{api}/api/v1/namespaces/{namespace}/secrets/{name}"
    ))
}

/// The `data` of a Secret, base64-decoded. Values that are not UTF-8 text are left out.
pub fn parse_secret(body: &[u8]) -> Result<Secret, String> {
    let doc = crate::secrets::value::SecretJson::parse(body)?;
    if doc.get("kind").and_then(|k| k.as_str()) != Some("Secret") {
        return Err("the answer is not a Secret".to_string());
    }
    let mut fields = BTreeMap::new();
    if let Some(data) = doc.get("data").and_then(|d| d.as_object()) {
        for (key, value) in data {
            let Some(b64) = value.as_str() else { continue };
            let bytes = zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| format!("data.{key} is not base64"))?,
            );
            match std::str::from_utf8(&bytes) {
                Ok(text) => {
                    fields.insert(key.clone(), SecretString::new(text.to_string()));
                }
                Err(_) => {
                    tracing::debug!(%key, "kubernetes secret key is not UTF-8 text; left out")
                }
            }
        }
    }
    Ok(Secret::Fields(fields))
}

/// The `message` of a Kubernetes `Status` answer.
fn status_message(body: &[u8]) -> String {
    crate::secrets::value::SecretJson::parse(body)
        .ok()
        .and_then(|d| {
            d.get("message")
                .and_then(|m| m.as_str())
                .map(|m| m.chars().take(300).collect())
        })
        .unwrap_or_else(|| "no message".to_string())
}

impl Store for KubernetesStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// A TCP connect to the API server.
    fn health(&self) -> BoxFuture<'_, Result<(), SecretError>> {
        Box::pin(async move {
            let unreachable = |reason: String| SecretError::Unreachable {
                store: self.name.clone(),
                kind: KIND,
                reason,
            };
            let api = self.api.as_ref().map_err(|r| unreachable(r.clone()))?;
            crate::secrets::health::tcp_reachable(api)
                .await
                .map_err(|e| unreachable(format!("{api}: {e}")))
        })
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(self.read(lookup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_cluster_address() {
        assert_eq!(
            api_from_env(Some("10.96.0.1"), Some("443")).unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            api_from_env(Some("fd00::1"), None).unwrap(),
            "https://[fd00::1]:443"
        );
        assert!(
            api_from_env(None, None)
                .unwrap_err()
                .contains("KUBERNETES_SERVICE_HOST")
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            secret_url("https://k:6443", "prod", "orders-db").unwrap(),
            "https://k:6443/api/v1/namespaces/prod/secrets/orders-db"
        );
        assert!(secret_url("https://k", "prod", "../x").is_err());
        assert!(secret_url("https://k", "Prod", "x").is_err());
    }

    /// A Secret as `kubectl get secret -o json` / the API server returns it.
    #[test]
    fn recorded_secret() {
        let body = br#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"orders-db","namespace":"prod",
            "resourceVersion":"1234","uid":"6a1c"},"type":"Opaque",
            "data":{"username":"YXBw","password":"czNjcmV0","bin":"/w=="}}"#;
        match parse_secret(body).unwrap() {
            Secret::Fields(f) => {
                assert_eq!(f["username"].expose(), "app");
                assert_eq!(f["password"].expose(), "s3cret");
                assert!(!f.contains_key("bin"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_secret(br#"{"kind":"Status","message":"x"}"#).is_err());
        assert!(parse_secret(br#"{"kind":"Secret","data":{"k":"%%%"}}"#).is_err());
    }
}
