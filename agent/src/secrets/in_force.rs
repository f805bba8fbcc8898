//! The secret resolver in force, as connections use it: replaced when a reload changes the
//! secret stores, timed into the metrics, and refreshed at most once a second per policy.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use super::{Credentials, Resolver, SecretError};
use crate::{
    config::{Policy, Role},
    metrics::Metrics,
};

/// The secret resolver in force; replaced when a reload changes the secret stores.
pub struct Secrets(
    RwLock<Resolver>,
    Arc<Metrics>,
    /// When each policy's credentials were last refreshed (see [`Secrets::refresh`]).
    Mutex<HashMap<String, Instant>>,
);

/// At most one refresh of a policy's credentials per this long: an application can make a
/// target reject credentials at will, and with dynamic credentials a refresh mints a lease.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl Secrets {
    /// `resolver` in force, its resolutions timed into `metrics`.
    pub fn new(resolver: Resolver, metrics: Arc<Metrics>) -> Self {
        Self(RwLock::new(resolver), metrics, Default::default())
    }

    /// The resolver in force now (cheap: it is reference counted).
    pub fn current(&self) -> Resolver {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `resolver` for connections from now on; returns the one it replaces.
    pub fn replace(&self, resolver: Resolver) -> Resolver {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            resolver,
        )
    }

    /// See [`Resolver::credentials`].
    pub async fn credentials(&self, policy: &Policy) -> Result<Arc<Credentials>, SecretError> {
        self.credentials_for(policy, None).await
    }

    /// See [`Resolver::credentials_for`].
    pub async fn credentials_for(
        &self,
        policy: &Policy,
        role: Option<&Role>,
    ) -> Result<Arc<Credentials>, SecretError> {
        let started = Instant::now();
        let result = self.current().credentials_for(policy, role).await;
        self.1
            .secret_resolution(policy, started.elapsed(), result.as_ref().err());
        result
    }

    /// See [`Resolver::refresh`]; at most once per [`MIN_REFRESH_INTERVAL`] per policy
    /// (otherwise the credentials in force, which the caller sees are the same).
    pub async fn refresh(&self, policy: &Policy) -> Result<Arc<Credentials>, SecretError> {
        self.refresh_for(policy, None).await
    }

    /// After the target rejected `used`: fresh credentials for one retry, if fetching again
    /// gives something new (the password may have been rotated since it was cached); `None`
    /// when it does not, or the store fails (logged), and the rejection stands.
    pub async fn fresh_after_rejection(
        &self,
        policy: &Policy,
        role: Option<&Role>,
        used: &Credentials,
    ) -> Option<Arc<Credentials>> {
        match self.refresh_for(policy, role).await {
            Ok(fresh) if fresh.username != used.username || fresh.password != used.password => {
                tracing::info!(
                    "target rejected the credentials; retrying once with refreshed ones"
                );
                Some(fresh)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "refreshing credentials after a rejection failed");
                None
            }
        }
    }

    /// See [`Resolver::refresh_for`]; rate-limited per policy and role like [`Self::refresh`].
    pub async fn refresh_for(
        &self,
        policy: &Policy,
        role: Option<&Role>,
    ) -> Result<Arc<Credentials>, SecretError> {
        let started = Instant::now();
        let key = match role {
            Some(r) => format!("{}\0{}", policy.name, r.user),
            None => policy.name.clone(),
        };
        let recent = {
            let mut last = self.2.lock().unwrap_or_else(|e| e.into_inner());
            match last.get(&key) {
                Some(at) if started.duration_since(*at) < MIN_REFRESH_INTERVAL => true,
                _ => {
                    last.insert(key, started);
                    false
                }
            }
        };
        if recent {
            tracing::debug!(policy = %policy.name, "credentials refreshed less than a second ago; not again");
            return self.credentials_for(policy, role).await;
        }
        self.1
            .refreshes
            .get_or_create(&crate::metrics::PolicyLabels {
                policy: policy.name.clone(),
            })
            .inc();
        let result = self.current().refresh_for(policy, role).await;
        self.1
            .secret_resolution(policy, started.elapsed(), result.as_ref().err());
        result
    }

    /// See [`Resolver::shutdown`].
    pub async fn shutdown(&self) {
        self.current().shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_policys_credentials_are_refreshed_at_most_once_a_second() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("latch-refresh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets.yaml");
        std::fs::write(&file, "db: {username: u, password: p}\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata: {{name: local}}\n\
             spec: {{file: {{path: {}}}}}\n---\n\
             apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: db}}\nspec:\n  \
             destination: {{address: 10.0.0.1, port: 5432}}\n  protocol: postgres\n  \
             workloads: [{{uid: 1}}]\n  credentials:\n    store: local\n    \
             password: {{path: db, field: password}}\n",
            file.display()
        );
        let config = crate::config::load_str("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        let metrics = Arc::new(Metrics::new());
        let resolver = Resolver::new(&config.stores, Default::default()).unwrap();
        let secrets = Secrets::new(resolver, metrics.clone());
        let policy = &config.policies[0];
        for _ in 0..5 {
            secrets.refresh(policy).await.unwrap();
        }
        assert!(
            metrics
                .encode()
                .contains("latch_credential_refreshes_total{policy=\"db\"} 1"),
            "{}",
            metrics.encode()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
