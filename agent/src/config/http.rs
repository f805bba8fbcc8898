//! `spec.http` of a policy: how latch puts the credentials into the application's HTTP
//! requests (`inject`), what happens to credentials the application sent itself
//! (`appCredentials`), and where the requests go (`targetPort`, `host`).

use super::policy::SecretRef;

/// The decoded `http:` block. The default (no block) sends HTTP Basic with the policy's
/// username and password and replaces any `Authorization` the application sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpSpec {
    pub inject: Injection,
    pub app_credentials: AppCredentials,
    /// The port latch connects to (e.g. 443 while the application speaks plain HTTP to 80);
    /// `None`: the port the application connected to.
    pub target_port: Option<u16>,
    /// The `Host` latch sends; `None`: the name TLS verifies (`tls.serverName` or the
    /// destination host) when latch makes TLS, else the application's own `Host`.
    pub host: Option<String>,
}

/// Where the credential goes in each request. `{username}` and `{secret}` (the policy's
/// `password`) are the placeholders of a template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Injection {
    /// `Authorization: Basic base64(username:password)`.
    #[default]
    Basic,
    /// `Authorization: Bearer <secret>`.
    Bearer,
    /// A header of the policy's naming, its value from a template (`X-Api-Key: {secret}`).
    Header { name: String, template: String },
    /// A query parameter, its value the secret (percent-encoded).
    Query { name: String },
    /// AWS Signature Version 4: the username is the access key id, the password the secret
    /// access key.
    AwsSigV4(AwsSigning),
}

impl Injection {
    pub const NAMES: [&'static str; 5] = ["basic", "bearer", "header", "query", "aws-sigv4"];

    /// Its name as written in `http.inject`.
    pub fn name(&self) -> &'static str {
        match self {
            Injection::Basic => "basic",
            Injection::Bearer => "bearer",
            Injection::Header { .. } => "header",
            Injection::Query { .. } => "query",
            Injection::AwsSigV4(_) => "aws-sigv4",
        }
    }

    /// Whether it needs the credentials' username (besides the password).
    pub fn needs_username(&self) -> bool {
        match self {
            Injection::Basic | Injection::AwsSigV4(_) => true,
            Injection::Header { template, .. } => template.contains("{username}"),
            Injection::Bearer | Injection::Query { .. } => false,
        }
    }
}

/// `http.aws`: what SigV4 signs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSigning {
    /// The signing name of the service (`s3`, `sqs`, `execute-api`, ...).
    pub service: String,
    pub region: String,
    /// A session token to send with temporary credentials.
    pub session_token: Option<SecretRef>,
    /// Whether the body is hashed into the signature (bounded: see the connector) or sent as
    /// `UNSIGNED-PAYLOAD` (S3 accepts that; the default for `s3`).
    pub unsigned_payload: bool,
}

/// `http.appCredentials`: what latch does with credentials the application sent itself (an
/// `Authorization` header, the templated header, the query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppCredentials {
    /// Dropped, and latch's put in their place.
    #[default]
    Replace,
    /// A request that carries its own credential (the header latch would set, or the query
    /// parameter) goes as the application sent it; latch injects into the others.
    Keep,
}

impl AppCredentials {
    pub const ALL: [(&'static str, AppCredentials); 2] = [
        ("replace", AppCredentials::Replace),
        ("keep", AppCredentials::Keep),
    ];
}
