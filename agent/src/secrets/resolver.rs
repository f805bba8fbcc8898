//! The resolver: a policy's credentials, now. What every connector calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::CredentialsCache;
use super::error::SecretError;
use super::flight::Flights;
use super::store::{self, Lookup, Store};
use super::value::{Credentials, Secret};
use crate::config::{self, Policy, Role, SecretRef, SecretStore, SecretString};

/// How the resolver behaves. `Default` is what production wants.
#[derive(Debug, Clone)]
pub struct ResolverOptions {
    /// The development switch: allow `literal` stores (a warning is logged when one is built).
    pub allow_literal: bool,
    /// Upper bound of one store fetch, logins and retries included.
    pub fetch_timeout: Duration,
    /// Bound of one HTTP exchange with a store (connect, send, read the answer).
    pub http_timeout: Duration,
    /// Revoke dynamic leases (Vault/OpenBao) in [`Resolver::shutdown`].
    pub revoke_leases_on_shutdown: bool,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        ResolverOptions {
            allow_literal: false,
            fetch_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(5),
            revoke_leases_on_shutdown: false,
        }
    }
}

/// Resolves credentials for policies. Cheap to clone; clones share stores, cache and fetches.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    stores: HashMap<String, Arc<dyn Store>>,
    opts: ResolverOptions,
    secrets: Flights<SecretKey, Arc<Secret>>,
    dynamic: Flights<(String, String), Arc<Credentials>>,
    cache: CredentialsCache,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct SecretKey {
    store: String,
    path: String,
    field: Option<String>,
    version: Option<String>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self
            .inner
            .stores
            .iter()
            .map(|(n, s)| (n.as_str(), s.kind()))
            .collect();
        names.sort();
        f.debug_struct("Resolver").field("stores", &names).finish()
    }
}

impl Resolver {
    /// Builds every store of the configuration (no I/O; stores log in on first use).
    pub fn new(stores: &[SecretStore], opts: ResolverOptions) -> Result<Resolver, SecretError> {
        let mut built = Vec::with_capacity(stores.len());
        for s in stores {
            built.push((s.name.clone(), store::build(s, &opts)?));
        }
        Ok(Resolver::with_stores(built, opts))
    }

    /// A resolver over stores built elsewhere (tests, embedders with their own backends).
    pub fn with_stores(stores: Vec<(String, Arc<dyn Store>)>, opts: ResolverOptions) -> Resolver {
        Resolver {
            inner: Arc::new(Inner {
                stores: stores.into_iter().collect(),
                opts,
                secrets: Flights::new(),
                dynamic: Flights::new(),
                cache: CredentialsCache::default(),
            }),
        }
    }

    /// The credentials `policy` names: from the cache while its `cache_ttl` lasts, else from the
    /// stores (concurrent callers share one fetch per secret).
    pub async fn credentials(&self, policy: &Policy) -> Result<Arc<Credentials>, SecretError> {
        self.credentials_for(policy, None).await
    }

    /// The credentials of `role` (one of `policy.roles`), or the policy's own when `None`;
    /// each role is cached and refreshed on its own.
    pub async fn credentials_for(
        &self,
        policy: &Policy,
        role: Option<&Role>,
    ) -> Result<Arc<Credentials>, SecretError> {
        self.resolve(policy, role, false).await
    }

    /// [`Resolver::refresh`] for one role (see [`Resolver::credentials_for`]).
    pub async fn refresh_for(
        &self,
        policy: &Policy,
        role: Option<&Role>,
    ) -> Result<Arc<Credentials>, SecretError> {
        self.inner.cache.remove(&cache_key(policy, role));
        self.resolve(policy, role, true).await
    }

    /// Drops what is cached for `policy` and fetches again, bypassing fetches that started
    /// before. Connectors call it once after the target refused the credentials, then retry.
    /// For dynamic credentials this mints new ones.
    pub async fn refresh(&self, policy: &Policy) -> Result<Arc<Credentials>, SecretError> {
        self.refresh_for(policy, None).await
    }

    /// One value (e.g. a TLS client key), uncached but coalesced with concurrent reads.
    pub async fn secret(&self, reference: &SecretRef) -> Result<SecretString, SecretError> {
        self.resolve_ref(reference, false).await
    }

    /// Checks every store's reachability ([`Store::health`]) concurrently, each bounded by
    /// `bound`; returns `(name, kind, result)` sorted by name.
    pub async fn health(
        &self,
        bound: std::time::Duration,
    ) -> Vec<(String, &'static str, Result<(), SecretError>)> {
        let mut checks = tokio::task::JoinSet::new();
        for (name, store) in &self.inner.stores {
            let (name, store) = (name.clone(), store.clone());
            checks.spawn(async move {
                let check = crate::wipe::Scoped::new(store.health());
                let result = match tokio::time::timeout(bound, check).await {
                    Ok(r) => r,
                    Err(_) => Err(SecretError::Timeout {
                        store: name.clone(),
                        after: bound,
                    }),
                };
                (name, store.kind(), result)
            });
        }
        let mut all = checks.join_all().await;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// What each store's own credential says the agent is ([`Store::identity`]), each bounded
    /// by `bound`: `(name, kind, None)` for stores with no credential of their own; sorted by
    /// name.
    pub async fn identities(
        &self,
        bound: std::time::Duration,
    ) -> Vec<(
        String,
        &'static str,
        Option<Result<super::Identity, SecretError>>,
    )> {
        let mut checks = tokio::task::JoinSet::new();
        for (name, store) in &self.inner.stores {
            let (name, store) = (name.clone(), store.clone());
            checks.spawn(async move {
                let who = crate::wipe::Scoped::new(store.identity());
                let result = match tokio::time::timeout(bound, who).await {
                    Ok(r) => r,
                    Err(_) => Some(Err(SecretError::Timeout {
                        store: name.clone(),
                        after: bound,
                    })),
                };
                (name, store.kind(), result)
            });
        }
        let mut all = checks.join_all().await;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// When each store's credential and leases expire ([`Store::expiry`]), by store name.
    pub fn expiries(&self) -> HashMap<String, super::Expiry> {
        self.inner
            .stores
            .iter()
            .map(|(name, store)| (name.clone(), store.expiry()))
            .collect()
    }

    /// Forgets every cached credential (e.g. after a configuration reload).
    pub fn clear_cache(&self) {
        self.inner.cache.clear();
    }

    /// Stops the stores; revokes dynamic leases when [`ResolverOptions::revoke_leases_on_shutdown`].
    pub async fn shutdown(&self) {
        self.inner.cache.clear();
        let revoke = self.inner.opts.revoke_leases_on_shutdown;
        for (name, store) in &self.inner.stores {
            let bound = self.inner.opts.fetch_timeout;
            let stop = crate::wipe::Scoped::new(store.shutdown(revoke));
            if tokio::time::timeout(bound, stop).await.is_err() {
                tracing::warn!(store = %name, "secret store shutdown did not finish within {bound:?}");
            }
        }
    }

    async fn resolve(
        &self,
        policy: &Policy,
        role: Option<&Role>,
        fresh: bool,
    ) -> Result<Arc<Credentials>, SecretError> {
        let (spec, cache_ttl) = match role {
            Some(r) => (&r.credentials, r.cache_ttl),
            None => (
                policy
                    .credentials
                    .as_ref()
                    .ok_or_else(|| SecretError::NoCredentials(policy.name.clone()))?,
                policy.cache_ttl,
            ),
        };
        let key = cache_key(policy, role);
        if !fresh
            && cache_ttl.is_some()
            && let Some(hit) = self.inner.cache.get(&key, spec, Instant::now())
        {
            return Ok(hit);
        }
        let started = Instant::now();
        let result = match spec {
            config::Credentials::Static {
                username, password, ..
            } => {
                self.resolve_static(username.as_ref(), password.as_ref(), fresh)
                    .await
            }
            config::Credentials::Dynamic { store, path } => {
                self.resolve_dynamic(store, path, fresh).await
            }
        };
        match &result {
            Ok(creds) => {
                tracing::debug!(policy = %policy.name, role = role.map(|r| r.user.as_str()), fresh, elapsed_us = started.elapsed().as_micros() as u64, "credentials resolved");
                if let Some(ttl) = cache_ttl {
                    self.inner
                        .cache
                        .put(&key, spec, creds.clone(), ttl, Instant::now());
                }
            }
            Err(e) => {
                tracing::warn!(policy = %policy.name, error = %e, "credentials not resolved");
            }
        }
        result
    }

    /// Username and password; one store request when both name the same secret (the usual
    /// `field: username` / `field: password` pair), two concurrent ones otherwise.
    async fn resolve_static(
        &self,
        username: Option<&SecretRef>,
        password: Option<&SecretRef>,
        fresh: bool,
    ) -> Result<Arc<Credentials>, SecretError> {
        if let (Some(u), Some(p)) = (username, password)
            && let (Ok(ku), Ok(kp)) = (self.key(u), self.key(p))
            && ku == kp
        {
            let secret = self.fetch(&ku, fresh).await?;
            let u = extract(&secret, u, &ku)?;
            let p = extract(&secret, p, &ku)?;
            return Ok(Arc::new(Credentials::new(Some(u), Some(p))));
        }
        let (u, p) = tokio::join!(
            self.resolve_opt(username, fresh),
            self.resolve_opt(password, fresh)
        );
        Ok(Arc::new(Credentials::new(u?, p?)))
    }

    async fn resolve_opt(
        &self,
        r: Option<&SecretRef>,
        fresh: bool,
    ) -> Result<Option<SecretString>, SecretError> {
        match r {
            Some(r) => self.resolve_ref(r, fresh).await.map(Some),
            None => Ok(None),
        }
    }

    fn store(&self, name: &str) -> Result<&Arc<dyn Store>, SecretError> {
        self.inner
            .stores
            .get(name)
            .ok_or_else(|| SecretError::UnknownStore(name.to_string()))
    }

    async fn resolve_ref(&self, r: &SecretRef, fresh: bool) -> Result<SecretString, SecretError> {
        let key = self.key(r)?;
        let secret = self.fetch(&key, fresh).await?;
        extract(&secret, r, &key)
    }

    /// What one store request fetches for `r`: per-field stores fetch each field on its own.
    fn key(&self, r: &SecretRef) -> Result<SecretKey, SecretError> {
        let per_field = self.store(&r.store)?.per_field();
        Ok(SecretKey {
            store: r.store.clone(),
            path: r.path.clone(),
            field: if per_field { r.field.clone() } else { None },
            version: r.version.clone(),
        })
    }

    /// The secret behind `key`, shared with concurrent requests for it (single flight).
    async fn fetch(&self, key: &SecretKey, fresh: bool) -> Result<Arc<Secret>, SecretError> {
        let store = self.store(&key.store)?;
        let bound = self.inner.opts.fetch_timeout;
        self.inner
            .secrets
            .run(key, fresh, || async {
                let lookup = Lookup {
                    path: &key.path,
                    field: key.field.as_deref(),
                    version: key.version.as_deref(),
                };
                // A wipe scope around every poll: what the store frees while its answer is
                // read and parsed (buffers, growing `Vec`s, parser scratch) is zeroized.
                let fetch = crate::wipe::Scoped::new(store.fetch(lookup));
                match tokio::time::timeout(bound, fetch).await {
                    Ok(r) => r.map(Arc::new),
                    Err(_) => Err(SecretError::Timeout {
                        store: key.store.clone(),
                        after: bound,
                    }),
                }
            })
            .await
            .map_err(|e| named(e, &key.store))
    }

    async fn resolve_dynamic(
        &self,
        store_name: &str,
        path: &str,
        fresh: bool,
    ) -> Result<Arc<Credentials>, SecretError> {
        let store = self.store(store_name)?;
        let bound = self.inner.opts.fetch_timeout;
        let key = (store_name.to_string(), path.to_string());
        self.inner
            .dynamic
            .run(&key, fresh, || async {
                let mint = crate::wipe::Scoped::new(store.dynamic(path, fresh));
                match tokio::time::timeout(bound, mint).await {
                    Ok(Ok(d)) => Ok(Arc::new(Credentials {
                        username: Some(d.username),
                        password: Some(d.password),
                        expires_at: d.expires_at,
                    })),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(SecretError::Timeout {
                        store: store_name.to_string(),
                        after: bound,
                    }),
                }
            })
            .await
            .map_err(|e| named(e, store_name))
    }
}

/// The cache entry of a policy's credentials, or of one of its roles.
fn cache_key(policy: &Policy, role: Option<&Role>) -> String {
    // A policy name never holds a NUL. A policy reading Secrets of the pod's namespace caches
    // per namespace: one namespace's credentials never serve another's pods.
    let name = match &policy.pod_namespace {
        Some(ns) => format!("{}\0ns={ns}", policy.name),
        None => policy.name.clone(),
    };
    match role {
        Some(r) => format!("{name}\0{}", r.user),
        None => name,
    }
}

/// Fills in the store name of errors raised by default trait methods.
fn named(e: SecretError, store_name: &str) -> SecretError {
    match e {
        SecretError::Unsupported { store, kind, what } if store.is_empty() => {
            SecretError::Unsupported {
                store: store_name.to_string(),
                kind,
                what,
            }
        }
        other => other,
    }
}

/// The value a reference names inside the secret fetched for `key` (a per-field store's
/// key names the field, and its answer is that field's value).
fn extract(secret: &Secret, r: &SecretRef, key: &SecretKey) -> Result<SecretString, SecretError> {
    match (secret, r.field.as_deref()) {
        (Secret::Value(v), None) => Ok(v.clone()),
        (Secret::Value(v), Some(_)) if key.field.is_some() => Ok(v.clone()),
        (Secret::Structured { text, .. }, None) => Ok(text.clone()),
        (Secret::Fields(f) | Secret::Structured { fields: f, .. }, Some(field)) => f
            .get(field)
            .cloned()
            .ok_or_else(|| SecretError::FieldMissing {
                store: r.store.clone(),
                path: r.path.clone(),
                field: field.to_string(),
            }),
        (Secret::Value(_), Some(field)) => Err(SecretError::FieldMissing {
            store: r.store.clone(),
            path: r.path.clone(),
            field: field.to_string(),
        }),
        (Secret::Fields(_), None) => Err(SecretError::Invalid {
            store: r.store.clone(),
            path: r.path.clone(),
            reason: "the secret has several fields; name one with `field`".to_string(),
        }),
    }
}
