//! AWS Secrets Manager: SigV4-signed `GetSecretValue` with credentials found as the AWS SDKs
//! find them (`provider.rs`: environment, web identity, shared profile, container endpoint,
//! instance metadata), or from the one provider the store's `auth` names (STS at the store's
//! `endpoint` when one is set, for local emulators).
//!
//! A reference's `path` is the secret id (name or ARN), `field` a member of its JSON
//! `SecretString` (no field: the whole string), `version` a version id (a UUID) or a stage
//! (`AWSCURRENT`, `AWSPREVIOUS`, custom labels).

pub mod creds;
pub mod metadata;
pub mod provider;
pub mod sigv4;
pub mod whoami;

use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};

use super::ResolverOptions;
use super::error::SecretError;
use super::http::{HttpClient, Response};
use super::store::{BoxFuture, Lookup, Store};
use super::value::{Secret, json_fields};
use crate::config::{self, SecretString};
use creds::AwsCredentials;

const KIND: &str = "aws";

pub struct AwsStore {
    name: String,
    spec: config::AwsStore,
    endpoint: String,
    /// STS, for `GetCallerIdentity` (`latch doctor`).
    sts_endpoint: String,
    http: HttpClient,
    /// Where the credentials come from; keeps temporary ones fresh.
    creds: std::sync::Arc<provider::Provider>,
}

impl AwsStore {
    pub fn new(
        name: String,
        spec: config::AwsStore,
        opts: &ResolverOptions,
    ) -> Result<AwsStore, SecretError> {
        let http = HttpClient::new(None, None, opts.http_timeout).map_err(|reason| {
            SecretError::Config {
                store: name.clone(),
                reason,
            }
        })?;
        let region = &spec.region;
        let (endpoint, sts_endpoint) = match &spec.endpoint {
            Some(e) => (
                e.trim_end_matches('/').to_string(),
                e.trim_end_matches('/').to_string(),
            ),
            None => (
                format!("https://secretsmanager.{region}.amazonaws.com"),
                format!("https://sts.{region}.amazonaws.com"),
            ),
        };
        let creds = std::sync::Arc::new(provider::Provider::new(
            name.clone(),
            spec.auth.clone(),
            sts_endpoint.clone(),
            http.clone(),
        ));
        Ok(AwsStore {
            name,
            spec,
            endpoint,
            sts_endpoint,
            http,
            creds,
        })
    }

    fn auth_failed(&self, reason: impl Into<String>) -> SecretError {
        SecretError::StoreAuth {
            store: self.name.clone(),
            kind: KIND,
            reason: reason.into(),
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> SecretError {
        SecretError::Unreachable {
            store: self.name.clone(),
            kind: KIND,
            reason: reason.to_string(),
        }
    }

    async fn get_secret_value(&self, lookup: Lookup<'_>) -> Result<Secret, SecretError> {
        let body = request_body(lookup.path, lookup.version);
        let mut retried = false;
        loop {
            let creds = self.creds.credentials().await?;
            let resp = self.send_signed(&body, &creds).await?;
            if resp.status.is_success() {
                return parse_secret_value(&resp.body).map_err(|reason| SecretError::Invalid {
                    store: self.name.clone(),
                    path: lookup.path.to_string(),
                    reason,
                });
            }
            let (code, message) = parse_error(&resp.body);
            // temporary credentials may have been revoked or expired early: once more, fresh
            if !retried && is_auth_code(&code) && self.creds.temporary_kind() {
                retried = true;
                self.creds.forget().await;
                continue;
            }
            return Err(self.failure(lookup.path, resp.status, &code, &message));
        }
    }

    async fn send_signed(
        &self,
        body: &[u8],
        creds: &AwsCredentials,
    ) -> Result<Response, SecretError> {
        self.send_signed_to(
            &self.endpoint,
            "secretsmanager",
            &[
                ("content-type", "application/x-amz-json-1.1"),
                ("x-amz-target", "secretsmanager.GetSecretValue"),
            ],
            body,
            creds,
        )
        .await
    }

    async fn send_signed_to(
        &self,
        endpoint: &str,
        service: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        creds: &AwsCredentials,
    ) -> Result<Response, SecretError> {
        let uri: hyper::Uri = format!("{endpoint}/")
            .parse()
            .map_err(|_| self.unreachable(format!("bad endpoint URL {endpoint}")))?;
        let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req
            .body(())
            .map_err(|_| self.unreachable("cannot build the request"))?;
        sigv4::sign_request(
            &mut req,
            body,
            creds,
            &self.spec.region,
            service,
            SystemTime::now(),
        )
        .map_err(|r| self.auth_failed(r))?;
        let (parts, ()) = req.into_parts();
        let req = Request::from_parts(parts, Full::new(Bytes::copy_from_slice(body)));
        self.http
            .send(req)
            .await
            .map_err(|e| self.unreachable(format!("{endpoint}: {e}")))
    }

    /// `sts:GetCallerIdentity` with the store's credentials: the principal they are.
    async fn whoami(&self) -> Result<crate::secrets::Identity, SecretError> {
        let creds = self.creds.credentials().await?;
        let resp = self
            .send_signed_to(
                self.sts_endpoint.trim_end_matches('/'),
                "sts",
                &[(
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                )],
                whoami::GET_CALLER_IDENTITY,
                &creds,
            )
            .await?;
        if !resp.status.is_success() {
            let (code, message) = parse_error(&resp.body);
            if resp.status.is_server_error() {
                return Err(self.unreachable(format!("STS answered {}: {code}", resp.status)));
            }
            return Err(self.auth_failed(format!(
                "sts:GetCallerIdentity refused: {}",
                whoami::explain_refusal(&code, &message)
            )));
        }
        let arn = whoami::parse_caller_identity(&String::from_utf8_lossy(&resp.body))
            .map_err(|r| self.auth_failed(r))?;
        Ok(crate::secrets::Identity {
            principal: arn,
            policies: Vec::new(),
            expires_at: creds.expires.map(super::store::epoch_secs),
        })
    }

    fn failure(&self, path: &str, status: StatusCode, code: &str, message: &str) -> SecretError {
        let detail = if message.is_empty() {
            format!("{code} ({status})")
        } else {
            format!("{code}: {message}")
        };
        match code {
            "ResourceNotFoundException" => SecretError::NotFound {
                store: self.name.clone(),
                path: path.to_string(),
            },
            "AccessDeniedException" | "AccessDenied" | "DecryptionFailure" => {
                SecretError::Permission {
                    store: self.name.clone(),
                    reason: format!("reading {path:?}: {detail}"),
                }
            }
            c if is_auth_code(c) => self.auth_failed(whoami::explain_refusal(code, message)),
            _ if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN => {
                self.auth_failed(detail)
            }
            _ if status.is_server_error() || code.contains("Throttling") => {
                self.unreachable(detail)
            }
            _ => SecretError::Invalid {
                store: self.name.clone(),
                path: path.to_string(),
                reason: detail,
            },
        }
    }
}

fn is_auth_code(code: &str) -> bool {
    matches!(
        code,
        "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "RequestTimeTooSkewed"
            | "RequestExpired"
    )
}

/// Whether `v` looks like a version id (a UUID) rather than a staging label.
fn is_version_id(v: &str) -> bool {
    v.len() == 36
        && v.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// The JSON body of `GetSecretValue`.
pub fn request_body(secret_id: &str, version: Option<&str>) -> Vec<u8> {
    let mut body = serde_json::json!({ "SecretId": secret_id });
    if let Some(v) = version {
        let key = if is_version_id(v) {
            "VersionId"
        } else {
            "VersionStage"
        };
        body[key] = serde_json::Value::String(v.to_string());
    }
    body.to_string().into_bytes()
}

/// The secret in a `GetSecretValue` answer: `SecretString` (a JSON object also gives fields), or
/// `SecretBinary` holding UTF-8 text.
pub fn parse_secret_value(body: &[u8]) -> Result<Secret, String> {
    let doc = super::value::SecretJson::parse(body)?;
    let text = if let Some(s) = doc.get("SecretString").and_then(|s| s.as_str()) {
        s.to_string()
    } else if let Some(b) = doc.get("SecretBinary").and_then(|s| s.as_str()) {
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|_| "SecretBinary is not base64".to_string())?,
        );
        String::from_utf8(bytes.to_vec())
            .map_err(|_| "SecretBinary is not UTF-8 text".to_string())?
    } else {
        return Err("the answer has neither SecretString nor SecretBinary".to_string());
    };
    if text.trim_start().starts_with('{')
        && let Ok(inner) = super::value::SecretJson::parse(text.as_bytes())
        && let serde_json::Value::Object(map) = &*inner
    {
        let fields = json_fields(map);
        return Ok(Secret::Structured {
            text: SecretString::new(text),
            fields,
        });
    }
    Ok(Secret::Value(SecretString::new(text)))
}

/// The error type (without its namespace) and message of an AWS error answer: JSON, or the XML
/// some front ends (signature checks) answer with.
pub fn parse_error(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    if text.trim_start().starts_with('<') {
        return match creds::parse_sts_error(&text).split_once(": ") {
            Some((code, message)) => (code.to_string(), message.chars().take(300).collect()),
            None => (creds::parse_sts_error(&text), String::new()),
        };
    }
    let doc = super::value::SecretJson::parse(body).ok();
    let doc = doc.as_deref().unwrap_or(&serde_json::Value::Null);
    let code = doc
        .get("__type")
        .or_else(|| doc.get("code"))
        .and_then(|t| t.as_str())
        .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
        .unwrap_or_else(|| "UnknownError".to_string());
    let message = doc
        .get("message")
        .or_else(|| doc.get("Message"))
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    (code, message)
}

impl Store for AwsStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// A TCP connect to the Secrets Manager endpoint (no request, no signing).
    fn health(&self) -> BoxFuture<'_, Result<(), SecretError>> {
        Box::pin(async move {
            crate::secrets::health::tcp_reachable(&self.endpoint)
                .await
                .map_err(|e| self.unreachable(format!("{}: {e}", self.endpoint)))
        })
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(self.get_secret_value(lookup))
    }

    fn identity(&self) -> BoxFuture<'_, Option<Result<crate::secrets::Identity, SecretError>>> {
        Box::pin(async move { Some(self.whoami().await) })
    }

    fn expiry(&self) -> crate::secrets::Expiry {
        crate::secrets::Expiry {
            credential_expires_at: self.creds.expires().map(super::store::epoch_secs),
            leases: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        let b: serde_json::Value =
            serde_json::from_slice(&request_body("orders-db", None)).unwrap();
        assert_eq!(b, serde_json::json!({"SecretId": "orders-db"}));
        let b: serde_json::Value =
            serde_json::from_slice(&request_body("x", Some("AWSPREVIOUS"))).unwrap();
        assert_eq!(b["VersionStage"], "AWSPREVIOUS");
        let id = "EXAMPLE1-90ab-cdef-fedc-ba987EXAMPLE";
        assert!(!is_version_id(id));
        let id = "3a4f5b6c-90ab-cdef-fedc-ba9870123456";
        let b: serde_json::Value = serde_json::from_slice(&request_body("x", Some(id))).unwrap();
        assert_eq!(b["VersionId"], id);
    }

    #[test]
    fn secret_string_json_and_plain() {
        let body = br#"{"ARN":"arn:x","Name":"orders-db","SecretString":"{\"username\":\"app\",\"password\":\"pw\"}","VersionId":"v"}"#;
        match parse_secret_value(body).unwrap() {
            Secret::Structured { text, fields } => {
                assert!(text.expose().starts_with('{'));
                assert_eq!(fields["password"].expose(), "pw");
            }
            other => panic!("{other:?}"),
        }
        let body = br#"{"SecretString":"plain"}"#;
        assert!(
            matches!(parse_secret_value(body).unwrap(), Secret::Value(v) if v.expose() == "plain")
        );
        let body = br#"{"SecretBinary":"aGVsbG8="}"#;
        assert!(
            matches!(parse_secret_value(body).unwrap(), Secret::Value(v) if v.expose() == "hello")
        );
        assert!(parse_secret_value(br#"{"Name":"x"}"#).is_err());
    }

    #[test]
    fn errors() {
        let body = br#"{"__type":"com.amazonaws.secretsmanager#ResourceNotFoundException","message":"Secrets Manager can't find the specified secret."}"#;
        let (code, msg) = parse_error(body);
        assert_eq!(code, "ResourceNotFoundException");
        assert!(msg.contains("can't find"));
        assert_eq!(parse_error(b"{}").0, "UnknownError");
        let xml = b"<?xml version='1.0'?><ErrorResponse><Errors><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message></Error></Errors></ErrorResponse>";
        let (code, msg) = parse_error(xml);
        assert_eq!(code, "SignatureDoesNotMatch");
        assert!(msg.starts_with("The request signature"));
    }
}
