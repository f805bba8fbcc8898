//! The Vault / OpenBao store: KV v1 and v2 reads, dynamic credentials with leases, and the
//! token the agent logs in for (token, AppRole, Kubernetes/JWT).
//!
//! Login happens on first use. The token is renewed (`auth/token/renew-self`) two thirds into
//! its TTL when renewable, else obtained again; a request denied with 403 gets one retry with a
//! fresh token (a rotated token file, an expired login). Dynamic leases are reused while more
//! than a third is left, then renewed or replaced; every lease handed out is remembered so
//! [`Store::shutdown`] can revoke them.

pub mod auth;
pub mod aws_iam;
pub mod kv;
pub mod lease;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};

use super::ResolverOptions;
use super::error::SecretError;
use super::http::{HttpClient, Response, sensitive};
use super::store::{BoxFuture, Lookup, Store};
use super::value::{DynamicCredentials, Secret};
use crate::config::{self, SecretString, VaultAuth};
use auth::TokenState;
use lease::{Lease, Plan};

const KIND: &str = "vault";

pub struct VaultStore {
    name: String,
    spec: config::VaultStore,
    base: String,
    http: HttpClient,
    token: tokio::sync::Mutex<Option<TokenState>>,
    /// The current lease per dynamic path.
    leases: tokio::sync::Mutex<HashMap<String, Lease>>,
    /// Every lease handed out and not yet revoked: (id, end).
    issued: Mutex<Vec<(String, Instant)>>,
    /// The machine's AWS credentials, for `auth: aws`.
    aws: Option<std::sync::Arc<crate::secrets::aws::provider::Provider>>,
}

impl VaultStore {
    pub fn new(
        name: String,
        spec: config::VaultStore,
        opts: &ResolverOptions,
    ) -> Result<VaultStore, SecretError> {
        let client_cert = match &spec.auth {
            VaultAuth::Cert {
                cert_file,
                key_file,
                ..
            } => Some((cert_file.as_path(), key_file.as_path())),
            _ => None,
        };
        let http = HttpClient::with_client_cert(
            spec.tls.ca.as_deref(),
            spec.tls.server_name.as_deref(),
            opts.http_timeout,
            client_cert,
        )
        .map_err(|reason| SecretError::Config {
            store: name.clone(),
            reason,
        })?;
        let aws = match &spec.auth {
            VaultAuth::Aws { region, .. } => {
                // the chain's own STS calls (web identity) go to the region's endpoint
                let sts = HttpClient::new(None, None, opts.http_timeout).map_err(|reason| {
                    SecretError::Config {
                        store: name.clone(),
                        reason,
                    }
                })?;
                Some(std::sync::Arc::new(
                    crate::secrets::aws::provider::Provider::new(
                        name.clone(),
                        config::AwsAuth::Chain,
                        format!("https://sts.{region}.amazonaws.com"),
                        sts,
                    ),
                ))
            }
            _ => None,
        };
        Ok(VaultStore {
            aws,
            base: spec.address.trim_end_matches('/').to_string(),
            name,
            spec,
            http,
            token: tokio::sync::Mutex::new(None),
            leases: tokio::sync::Mutex::new(HashMap::new()),
            issued: Mutex::new(Vec::new()),
        })
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> SecretError {
        SecretError::Unreachable {
            store: self.name.clone(),
            kind: KIND,
            reason: format!("{}: {reason}", self.base),
        }
    }

    fn auth_failed(&self, reason: impl Into<String>) -> SecretError {
        SecretError::StoreAuth {
            store: self.name.clone(),
            kind: KIND,
            reason: reason.into(),
        }
    }

    fn invalid(&self, path: &str, reason: String) -> SecretError {
        SecretError::Invalid {
            store: self.name.clone(),
            path: path.to_string(),
            reason,
        }
    }

    /// One HTTP exchange with `/v1/PATH`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<Response, SecretError> {
        let uri = format!("{}/v1/{}", self.base, path.trim_start_matches('/'));
        let mut req = Request::builder().method(method).uri(&uri);
        if let Some(ns) = &self.spec.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(t) = token {
            req = req.header(
                "X-Vault-Token",
                sensitive(&[t.expose()]).map_err(|r| self.auth_failed(r))?,
            );
        }
        if body.is_some() {
            req = req.header("Content-Type", "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| self.invalid(path, "the path cannot be used in a URL".to_string()))?;
        self.http.send(req).await.map_err(|e| self.unreachable(e))
    }

    /// A request made with the store's token; on 403, once more with a new token.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response, SecretError> {
        let token = self.token().await?;
        let resp = self
            .send(method.clone(), path, Some(&token), body.clone())
            .await?;
        if resp.status != StatusCode::FORBIDDEN {
            return Ok(resp);
        }
        tracing::debug!(store = %self.name, "vault denied a request; obtaining a new token and retrying once");
        self.forget_token(&token).await;
        let token = self.token().await?;
        self.send(method, path, Some(&token), body).await
    }

    /// The current token: logs in, renews or logs in again as needed.
    async fn token(&self) -> Result<SecretString, SecretError> {
        let mut state = self.token.lock().await;
        let now = Instant::now();
        if let Some(s) = state.as_ref() {
            if !s.due(now) {
                return Ok(s.token.clone());
            }
            if s.renewable && !s.expired(now) {
                let renewed = self.renew_self(&s.token).await;
                super::credential_stats::record(&self.name, renewed.is_ok());
                match renewed {
                    Ok(renewed) => {
                        tracing::debug!(store = %self.name, ttl = ?renewed.ttl, "vault token renewed");
                        let token = renewed.token.clone();
                        *state = Some(renewed);
                        return Ok(token);
                    }
                    Err(e) => {
                        tracing::warn!(store = %self.name, error = %e, "vault token renewal failed; logging in again")
                    }
                }
            }
        }
        let fresh = self.login().await;
        super::credential_stats::record(&self.name, fresh.is_ok());
        let fresh = fresh?;
        let token = fresh.token.clone();
        *state = Some(fresh);
        Ok(token)
    }

    /// The auth method's name and the role the login asks for.
    fn method_and_role(&self) -> (&'static str, Option<&str>) {
        match &self.spec.auth {
            VaultAuth::Token(_) => ("token", None),
            VaultAuth::AppRole { .. } => ("approle", None),
            VaultAuth::Kubernetes { role, .. } => ("kubernetes", Some(role)),
            VaultAuth::Jwt { role, .. } => ("jwt", Some(role)),
            VaultAuth::Aws { role, .. } => ("aws", Some(role)),
            VaultAuth::Cert { role, .. } => ("cert", role.as_deref()),
        }
    }

    /// `auth/token/lookup-self` with the store's token: its entity, name and policies.
    async fn whoami(&self) -> Result<crate::secrets::Identity, SecretError> {
        let resp = self
            .call(Method::GET, "auth/token/lookup-self", None)
            .await?;
        if !resp.status.is_success() {
            return Err(self.auth_failed(format!(
                "auth/token/lookup-self answered {}",
                describe(&resp)
            )));
        }
        let (principal, policies) = auth::parse_token_identity(&resp.body)
            .map_err(|r| self.auth_failed(format!("lookup-self: {r}")))?;
        Ok(crate::secrets::Identity {
            principal,
            policies,
            expires_at: self.expiry().credential_expires_at,
        })
    }

    async fn forget_token(&self, used: &SecretString) {
        let mut state = self.token.lock().await;
        if state.as_ref().is_some_and(|s| &s.token == used) {
            *state = None;
        }
    }

    async fn renew_self(&self, token: &SecretString) -> Result<TokenState, SecretError> {
        let obtained = Instant::now();
        let resp = self
            .send(
                Method::POST,
                "auth/token/renew-self",
                Some(token),
                Some(Bytes::from_static(b"{}")),
            )
            .await?;
        if !resp.status.is_success() {
            return Err(self.auth_failed(format!("renew-self answered {}", describe(&resp))));
        }
        let info = auth::parse_auth(&resp.body)
            .map_err(|r| self.auth_failed(format!("renew-self: {r}")))?;
        Ok(TokenState {
            // renew-self answers with the same token
            token: token.clone(),
            obtained,
            ttl: info.ttl,
            renewable: info.renewable,
        })
    }

    async fn login(&self) -> Result<TokenState, SecretError> {
        let obtained = Instant::now();
        let (mount, body) = match &self.spec.auth {
            VaultAuth::Token(source) => {
                let token = auth::read_source(source)
                    .map_err(|r| self.auth_failed(format!("token: {r}")))?;
                let resp = self
                    .send(Method::GET, "auth/token/lookup-self", Some(&token), None)
                    .await?;
                if !resp.status.is_success() {
                    return Err(self.auth_failed(format!(
                        "the token was refused: {} (expired or revoked: put a valid token in \
                         {}, or log in with the machine's identity: auth aws, jwt or cert)",
                        describe(&resp),
                        match source {
                            config::CredentialSource::File(p) => p.display().to_string(),
                            config::CredentialSource::Env(v) => format!("${v}"),
                        }
                    )));
                }
                let (ttl, renewable) = auth::parse_lookup_self(&resp.body)
                    .map_err(|r| self.auth_failed(format!("lookup-self: {r}")))?;
                tracing::debug!(store = %self.name, ?ttl, renewable, "vault token loaded");
                return Ok(TokenState {
                    token,
                    obtained,
                    ttl,
                    renewable,
                });
            }
            VaultAuth::AppRole {
                role_id,
                secret_id,
                mount,
            } => {
                let role_id = auth::read_role_id(role_id)
                    .map_err(|r| self.auth_failed(format!("AppRole role id: {r}")))?;
                let secret_id = auth::read_source(secret_id)
                    .map_err(|r| self.auth_failed(format!("AppRole secret id: {r}")))?;
                (mount, auth::approle_body(&role_id, &secret_id))
            }
            VaultAuth::Kubernetes {
                role,
                token_file,
                mount,
            } => {
                let jwt = auth::read_file(token_file)
                    .map_err(|r| self.auth_failed(format!("service account token: {r}")))?;
                (mount, auth::jwt_body(role, &jwt))
            }
            VaultAuth::Jwt {
                role,
                token_file,
                mount,
            } => {
                // read at each login: the issuer rotates the file (projected tokens last an hour)
                let jwt = auth::read_file(token_file)
                    .map_err(|r| self.auth_failed(format!("JWT auth token: {r}")))?;
                (mount, auth::jwt_body(role, &jwt))
            }
            VaultAuth::Aws {
                role,
                mount,
                region,
                sts_endpoint,
                server_id,
            } => {
                let provider = self.aws.as_ref().expect("built with the store");
                let creds = provider.credentials().await?;
                let body = aws_iam::login_body(
                    role,
                    &creds,
                    sts_endpoint,
                    region,
                    server_id.as_deref(),
                    std::time::SystemTime::now(),
                )
                .map_err(|r| self.auth_failed(format!("AWS IAM login: {r}")))?;
                (mount, body)
            }
            VaultAuth::Cert { role, mount, .. } => {
                if !self.base.starts_with("https://") {
                    return Err(self.auth_failed(
                        "certificate auth needs TLS: make the store's address https://",
                    ));
                }
                (mount, auth::cert_body(role.as_deref()))
            }
        };
        let path = format!("auth/{}/login", mount.trim_matches('/'));
        let resp = self.send(Method::POST, &path, None, Some(body)).await?;
        if resp.status.is_server_error() {
            return Err(self.unreachable(format!("{path} answered {}", describe(&resp))));
        }
        if !resp.status.is_success() {
            let answer = describe(&resp);
            let (method, role) = self.method_and_role();
            let hint = auth::login_hint(method, role, mount.trim_matches('/'), &answer);
            return Err(self.auth_failed(format!("{path} answered {answer}: {hint}")));
        }
        let info =
            auth::parse_auth(&resp.body).map_err(|r| self.auth_failed(format!("{path}: {r}")))?;
        tracing::debug!(store = %self.name, %path, ttl = ?info.ttl, renewable = info.renewable, "logged in to vault");
        Ok(TokenState {
            token: info.token,
            obtained,
            ttl: info.ttl,
            renewable: info.renewable,
        })
    }

    /// Maps an unsuccessful answer to a secret read to an error.
    fn failure(&self, path: &str, resp: &Response) -> SecretError {
        match resp.status {
            StatusCode::NOT_FOUND => SecretError::NotFound {
                store: self.name.clone(),
                path: path.to_string(),
            },
            StatusCode::FORBIDDEN => SecretError::Permission {
                store: self.name.clone(),
                reason: format!("vault denied access to {path:?}: {}", describe(resp)),
            },
            StatusCode::UNAUTHORIZED => self.auth_failed(describe(resp)),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                self.unreachable(describe(resp))
            }
            _ => self.invalid(path, format!("vault answered {}", describe(resp))),
        }
    }

    async fn read_kv(&self, lookup: Lookup<'_>) -> Result<Secret, SecretError> {
        let (mount, path) = kv::split_mount(self.spec.mount.as_deref(), lookup.path)
            .map_err(|r| self.invalid(lookup.path, r))?;
        let api = kv::read_path(self.spec.kv_version, &mount, &path, lookup.version)
            .map_err(|r| self.invalid(lookup.path, r))?;
        let resp = self.call(Method::GET, &api, None).await?;
        if !resp.status.is_success() {
            return Err(self.failure(lookup.path, &resp));
        }
        kv::parse_read(self.spec.kv_version, &resp.body).map_err(|r| match r.contains("deleted") {
            true => SecretError::NotFound {
                store: self.name.clone(),
                path: lookup.path.to_string(),
            },
            false => self.invalid(lookup.path, r),
        })
    }

    async fn mint(&self, path: &str) -> Result<Lease, SecretError> {
        let resp = self.call(Method::GET, path, None).await?;
        if !resp.status.is_success() {
            return Err(self.failure(path, &resp));
        }
        let lease =
            lease::parse_creds(&resp.body, Instant::now()).map_err(|r| self.invalid(path, r))?;
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((lease.id.clone(), lease.expires));
        tracing::debug!(store = %self.name, %path, duration = ?lease.duration, renewable = lease.renewable, "dynamic credentials minted");
        Ok(lease)
    }

    async fn renew(&self, lease: &Lease) -> Result<Duration, SecretError> {
        let body = lease::renew_body(&lease.id, lease.duration);
        let resp = self
            .call(Method::PUT, "sys/leases/renew", Some(body.into()))
            .await?;
        if !resp.status.is_success() {
            return Err(self.failure("sys/leases/renew", &resp));
        }
        lease::parse_renewal(&resp.body).map_err(|r| self.invalid("sys/leases/renew", r))
    }

    async fn dynamic_creds(
        &self,
        path: &str,
        fresh: bool,
    ) -> Result<DynamicCredentials, SecretError> {
        let path = path.trim_matches('/');
        let mut leases = self.leases.lock().await;
        let now = Instant::now();
        let plan = match leases.get(path) {
            Some(_) if fresh => Plan::Replace,
            Some(l) => lease::plan(l, now),
            None => Plan::Replace,
        };
        if plan == Plan::Renew {
            let current = leases
                .get_mut(path)
                .expect("planned from an existing lease");
            match self.renew(current).await {
                Ok(granted) if lease::renewal_sufficient(current, granted) => {
                    current.expires = Instant::now() + granted;
                    self.note_expiry(&current.id, current.expires);
                    tracing::debug!(store = %self.name, %path, ?granted, "lease renewed");
                }
                Ok(granted) => {
                    tracing::debug!(store = %self.name, %path, ?granted, "lease near its max TTL; minting new credentials");
                    let new = self.mint(path).await?;
                    leases.insert(path.to_string(), new);
                }
                Err(e) => {
                    tracing::warn!(store = %self.name, %path, error = %e, "lease renewal failed; minting new credentials");
                    let new = self.mint(path).await?;
                    leases.insert(path.to_string(), new);
                }
            }
        } else if plan == Plan::Replace {
            let new = self.mint(path).await?;
            leases.insert(path.to_string(), new);
        }
        let l = &leases[path];
        Ok(DynamicCredentials {
            username: l.username.clone(),
            password: l.password.clone(),
            expires_at: Some(l.expires),
        })
    }

    fn note_expiry(&self, id: &str, expires: Instant) {
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = issued.iter_mut().find(|(i, _)| i == id) {
            e.1 = expires;
        }
    }

    async fn revoke_all(&self) {
        let now = Instant::now();
        let ids: Vec<String> = {
            let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *issued)
                .into_iter()
                .filter(|(_, end)| *end > now)
                .map(|(id, _)| id)
                .collect()
        };
        self.leases.lock().await.clear();
        let mut revoked = 0;
        for id in &ids {
            match self
                .call(
                    Method::PUT,
                    "sys/leases/revoke",
                    Some(lease::revoke_body(id).into()),
                )
                .await
            {
                Ok(r) if r.status.is_success() => revoked += 1,
                Ok(r) => {
                    tracing::warn!(store = %self.name, "lease revocation answered {}", describe(&r))
                }
                Err(e) => tracing::warn!(store = %self.name, error = %e, "lease revocation failed"),
            }
        }
        tracing::info!(store = %self.name, revoked, of = ids.len(), "dynamic leases revoked");
    }
}

/// An answer's status and Vault's error messages (which name paths and reasons, not values),
/// shortened.
fn describe(resp: &Response) -> String {
    let mut text = resp.status.to_string();
    if let Ok(doc) = super::value::SecretJson::parse(&resp.body)
        && let Some(errors) = doc.get("errors").and_then(|e| e.as_array())
    {
        let msgs: Vec<&str> = errors.iter().filter_map(|e| e.as_str()).collect();
        if !msgs.is_empty() {
            let mut joined = msgs.join("; ");
            if joined.len() > 300 {
                let mut cut = 300;
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                joined.truncate(cut);
                joined.push('…');
            }
            text = format!("{text} ({joined})");
        }
    }
    text
}

impl Store for VaultStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// `GET sys/health` (unauthenticated): reachable and unsealed; a standby counts as healthy.
    fn health(&self) -> BoxFuture<'_, Result<(), SecretError>> {
        Box::pin(async move {
            let resp = self
                .send(
                    Method::GET,
                    "sys/health?standbyok=true&perfstandbyok=true",
                    None,
                    None,
                )
                .await?;
            match resp.status.as_u16() {
                200 | 429 | 472 | 473 => Ok(()),
                501 => Err(self.unreachable("not initialized")),
                503 => Err(self.unreachable("sealed")),
                other => Err(self.unreachable(format!("sys/health answered {other}"))),
            }
        })
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(self.read_kv(lookup))
    }

    fn dynamic<'a>(
        &'a self,
        path: &'a str,
        fresh: bool,
    ) -> BoxFuture<'a, Result<DynamicCredentials, SecretError>> {
        Box::pin(self.dynamic_creds(path, fresh))
    }

    fn identity(&self) -> BoxFuture<'_, Option<Result<crate::secrets::Identity, SecretError>>> {
        Box::pin(async move { Some(self.whoami().await) })
    }

    fn expiry(&self) -> crate::secrets::Expiry {
        use crate::secrets::{LeaseExpiry, store::instant_epoch_secs};
        let credential_expires_at = self
            .token
            .try_lock()
            .ok()
            .and_then(|t| t.as_ref().and_then(|t| Some(t.obtained + t.ttl?)))
            .map(instant_epoch_secs);
        let mut leases: Vec<LeaseExpiry> = self
            .leases
            .try_lock()
            .map(|l| {
                l.iter()
                    .map(|(path, lease)| LeaseExpiry {
                        path: path.clone(),
                        expires_at: instant_epoch_secs(lease.expires),
                    })
                    .collect()
            })
            .unwrap_or_default();
        leases.sort_by(|a, b| a.path.cmp(&b.path));
        crate::secrets::Expiry {
            credential_expires_at,
            leases,
        }
    }

    fn shutdown(&self, revoke: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if revoke || self.spec.revoke_on_shutdown {
                self.revoke_all().await;
            }
        })
    }
}
