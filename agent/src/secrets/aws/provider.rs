//! Where an AWS store's credentials come from (its `auth`), and keeping temporary ones fresh.
//!
//! With no `auth` the store looks where the AWS SDKs look, in their order: the environment,
//! a web identity token (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`), the shared profile
//! (`AWS_PROFILE`, else `default`), the container credentials endpoint, the instance metadata
//! service (IMDSv2). A named `auth` uses that one provider only.
//!
//! Temporary credentials (web identity, container, instance) are kept until shortly before
//! they expire. In the last [`REFRESH_BEFORE`] (less a per-store jitter, so stores and nodes
//! do not all ask at once) a connection still gets the current ones, and one background task
//! fetches the next; only credentials with less than [`MIN_LEFT`] left, or none, make a
//! connection wait for a fetch.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request};

use super::creds::{self, AwsCredentials};
use super::metadata::{self, Fault};
use crate::config::AwsAuth;
use crate::secrets::error::SecretError;
use crate::secrets::http::HttpClient;

const KIND: &str = "aws";
/// Refresh temporary credentials in the background once they have this little left...
pub const REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);
/// ...and wait for fresh ones when they have less than this.
pub const MIN_LEFT: Duration = Duration::from_secs(60);
/// Up to this much earlier or later than [`REFRESH_BEFORE`], per store.
const JITTER: Duration = Duration::from_secs(5 * 60);

pub struct Provider {
    store: String,
    auth: AwsAuth,
    sts_endpoint: String,
    http: HttpClient,
    cached: tokio::sync::Mutex<Option<AwsCredentials>>,
    refreshing: AtomicBool,
    /// This store's refresh point: [`REFRESH_BEFORE`] ± [`JITTER`].
    refresh_before: Duration,
}

impl Provider {
    pub(crate) fn new(
        store: String,
        auth: AwsAuth,
        sts_endpoint: String,
        http: HttpClient,
    ) -> Self {
        let mut r = [0u8; 2];
        let _ = getrandom::fill(&mut r);
        let spread = JITTER.as_secs() * 2 * u64::from(u16::from_le_bytes(r)) / u64::from(u16::MAX);
        let refresh_before = REFRESH_BEFORE - JITTER + Duration::from_secs(spread);
        Self {
            store,
            auth,
            sts_endpoint,
            http,
            cached: tokio::sync::Mutex::new(None),
            refreshing: AtomicBool::new(false),
            refresh_before,
        }
    }

    /// Credentials to sign the next request with.
    pub async fn credentials(self: &Arc<Self>) -> Result<AwsCredentials, SecretError> {
        match &self.auth {
            // Read each time: a changed file or environment applies to the next request.
            AwsAuth::Env => from_env().map_err(|r| self.auth_failed(r)),
            AwsAuth::Profile(p) => self.profile(p)?.ok_or_else(|| {
                self.auth_failed(format!(
                    "no AWS profile {p:?} in the shared credentials or config file"
                ))
            }),
            _ => self.temporary().await,
        }
    }

    /// When the temporary credentials held now expire; `None` when none are held (or a
    /// refresh holds them right now).
    pub fn expires(&self) -> Option<SystemTime> {
        self.cached.try_lock().ok()?.as_ref()?.expires
    }

    /// Forgets cached credentials AWS refused (revoked, or expired early).
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    /// Whether the credentials can expire (then a refusal may mean "fetch new ones").
    pub fn temporary_kind(&self) -> bool {
        !matches!(self.auth, AwsAuth::Env | AwsAuth::Profile(_))
    }

    async fn temporary(self: &Arc<Self>) -> Result<AwsCredentials, SecretError> {
        let now = SystemTime::now();
        if let Some(c) = self.cached.lock().await.as_ref() {
            match metadata::remaining(c, now) {
                None => return Ok(c.clone()),
                Some(left) if left >= MIN_LEFT => {
                    if left < self.refresh_before {
                        self.refresh_in_background();
                    }
                    return Ok(c.clone());
                }
                Some(_) => {}
            }
        }
        let fresh = self.fetch().await;
        crate::secrets::credential_stats::record(&self.store, fresh.is_ok());
        let fresh = fresh?;
        // Static credentials found by the chain (environment, profile) are not kept: they
        // are read again for the next request, as with `auth: env` or `profile`.
        if fresh.expires.is_some() {
            *self.cached.lock().await = Some(fresh.clone());
        }
        Ok(fresh)
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let fetched = this.fetch().await;
            crate::secrets::credential_stats::record(&this.store, fetched.is_ok());
            match fetched {
                Ok(c) => {
                    tracing::debug!(store = %this.store, "AWS credentials refreshed before expiry");
                    *this.cached.lock().await = Some(c);
                }
                Err(e) => tracing::warn!(
                    store = %this.store,
                    %e,
                    "refreshing AWS credentials failed; the current ones serve until they expire"
                ),
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    async fn fetch(&self) -> Result<AwsCredentials, SecretError> {
        match &self.auth {
            AwsAuth::WebIdentity {
                role_arn,
                token_file,
            } => self.assume_role(role_arn, token_file).await,
            AwsAuth::Instance => {
                let endpoint = metadata::imds_endpoint(env).map_err(|r| {
                    self.auth_failed(format!("instance metadata is switched off: {r}"))
                })?;
                self.imds(&endpoint).await
            }
            AwsAuth::Container => match metadata::container_endpoint(env) {
                Some(Ok((uri, auth))) => self.container(&uri, auth.as_ref()).await,
                Some(Err(r)) => Err(self.auth_failed(r)),
                None => Err(self.auth_failed(
                    "no container credentials: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and AWS_CONTAINER_CREDENTIALS_FULL_URI are not set",
                )),
            },
            AwsAuth::Chain => self.chain().await,
            AwsAuth::Env | AwsAuth::Profile(_) => unreachable!("not temporary"),
        }
    }

    /// The SDKs' order; the error names what each provider lacked.
    async fn chain(&self) -> Result<AwsCredentials, SecretError> {
        let mut tried = Vec::new();
        match from_env() {
            Ok(c) => return Ok(c),
            Err(r) => tried.push(format!("environment: {r}")),
        }
        match (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN")) {
            (Some(file), Some(role)) => {
                return self.assume_role(&role, Path::new(file.trim())).await;
            }
            _ => tried.push(
                "web identity: AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN are not both set"
                    .into(),
            ),
        }
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        match self.profile(&profile)? {
            Some(c) => return Ok(c),
            None => tried.push(format!("profile {profile:?}: not in the shared files")),
        }
        match metadata::container_endpoint(env) {
            Some(Ok((uri, auth))) => return self.container(&uri, auth.as_ref()).await,
            Some(Err(r)) => return Err(self.auth_failed(r)),
            None => tried.push("container: AWS_CONTAINER_CREDENTIALS_*_URI not set".into()),
        }
        match metadata::imds_endpoint(env) {
            Ok(endpoint) => self.imds(&endpoint).await.map_err(|e| match e {
                SecretError::Unreachable { reason, .. } | SecretError::StoreAuth { reason, .. } => {
                    self.auth_failed(format!(
                        "no AWS credentials found ({}; instance metadata: {reason})",
                        tried.join("; ")
                    ))
                }
                other => other,
            }),
            Err(r) => {
                tried.push(format!("instance metadata: {r}"));
                Err(self.auth_failed(format!("no AWS credentials found ({})", tried.join("; "))))
            }
        }
    }

    async fn imds(&self, endpoint: &str) -> Result<AwsCredentials, SecretError> {
        let c = metadata::from_imds(&self.http, endpoint)
            .await
            .map_err(|f| self.fault("instance metadata", metadata::imds_fix(f)))?;
        tracing::debug!(store = %self.store, "AWS credentials from the instance metadata service");
        Ok(c)
    }

    async fn container(
        &self,
        uri: &str,
        auth: Option<&crate::config::SecretString>,
    ) -> Result<AwsCredentials, SecretError> {
        let c = metadata::from_container(&self.http, uri, auth)
            .await
            .map_err(|f| self.fault("container credentials", f))?;
        tracing::debug!(store = %self.store, "AWS credentials from the container endpoint");
        Ok(c)
    }

    fn fault(&self, what: &str, f: Fault) -> SecretError {
        match f {
            Fault::Unreachable(r) => SecretError::Unreachable {
                store: self.store.clone(),
                kind: KIND,
                reason: format!("{what}: {r}"),
            },
            Fault::Refused(r) => self.auth_failed(format!("{what}: {r}")),
        }
    }

    fn auth_failed(&self, reason: impl Into<String>) -> SecretError {
        SecretError::StoreAuth {
            store: self.store.clone(),
            kind: KIND,
            reason: reason.into(),
        }
    }

    /// Static keys of `profile` from the shared credentials, then config, file.
    fn profile(&self, profile: &str) -> Result<Option<AwsCredentials>, SecretError> {
        let files = [
            (creds::credentials_file(), false),
            (creds::config_file(), true),
        ];
        for (path, config_style) in files {
            let Some(path) = path else { continue };
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => zeroize::Zeroizing::new(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(self.auth_failed(format!("cannot read {}: {e}", path.display())));
                }
            };
            match creds::parse_profile(&text, profile, config_style) {
                Ok(Some(c)) => return Ok(Some(c)),
                Ok(None) => continue,
                Err(r) => return Err(self.auth_failed(format!("{}: {r}", path.display()))),
            }
        }
        Ok(None)
    }

    async fn assume_role(
        &self,
        role_arn: &str,
        token_file: &Path,
    ) -> Result<AwsCredentials, SecretError> {
        let token = crate::secrets::vault::auth::read_file(token_file)
            .map_err(|r| self.auth_failed(format!("web identity token: {r}")))?;
        let body =
            creds::assume_role_body(role_arn, &format!("latch-{}", std::process::id()), &token);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/", self.sts_endpoint))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/xml")
            .body(Full::<Bytes>::new(body))
            .map_err(|_| self.auth_failed("bad STS endpoint URL"))?;
        let unreachable = |reason: String| SecretError::Unreachable {
            store: self.store.clone(),
            kind: KIND,
            reason,
        };
        let resp = self
            .http
            .send(req)
            .await
            .map_err(|e| unreachable(format!("STS {}: {e}", self.sts_endpoint)))?;
        let text = std::str::from_utf8(&resp.body).unwrap_or_default();
        if resp.status.is_server_error() {
            return Err(unreachable(format!("STS answered {}", resp.status)));
        }
        if !resp.status.is_success() {
            return Err(self.auth_failed(format!(
                "AssumeRoleWithWebIdentity for {role_arn} refused ({}): {}",
                resp.status,
                creds::parse_sts_error(text)
            )));
        }
        let c = creds::parse_assume_role(text)
            .map_err(|r| self.auth_failed(format!("AssumeRoleWithWebIdentity: {r}")))?;
        tracing::debug!(store = %self.store, role = %role_arn, "assumed role with web identity");
        Ok(c)
    }
}

/// The agent's environment.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn from_env() -> Result<AwsCredentials, String> {
    creds::from_env(env)
}
