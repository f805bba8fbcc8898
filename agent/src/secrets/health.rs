//! Are the secret stores reachable? A periodic, cheap probe per store ([`Store::health`]) whose
//! latest answers `/readyz` and `/status` report. Probing never reads a secret.
//!
//! [`Store::health`]: super::Store::health
use std::{
    sync::RwLock,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Resolver;

/// How often the stores are probed.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One store's latest probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreState {
    pub name: String,
    pub kind: &'static str,
    pub reachable: bool,
    /// Why not (a store error's text: names, addresses, never a value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub checked_at: u64,
    /// When the store's own credential and its leases expire.
    #[serde(flatten)]
    pub expiry: super::Expiry,
}

/// The latest probe of every store; `None` until the first round finished.
#[derive(Debug, Default)]
pub struct StoreHealth(RwLock<Option<Vec<StoreState>>>);

impl StoreHealth {
    pub fn set(&self, states: Vec<StoreState>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(states);
    }

    /// The latest states, or `None` before the first probe.
    pub fn get(&self) -> Option<Vec<StoreState>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Names of the stores the latest probe could not reach (`Err` before the first probe).
    pub fn unreachable(&self) -> Result<Vec<String>, NotProbed> {
        let states = self.get().ok_or(NotProbed)?;
        Ok(states
            .into_iter()
            .filter(|s| !s.reachable)
            .map(|s| s.name)
            .collect())
    }
}

/// The stores have not been probed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotProbed;

/// Probes every store of `resolver` once.
pub async fn probe(resolver: &Resolver) -> Vec<StoreState> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut expiries = resolver.expiries();
    resolver
        .health(PROBE_TIMEOUT)
        .await
        .into_iter()
        .map(|(name, kind, result)| StoreState {
            expiry: expiries.remove(&name).unwrap_or_default(),
            name,
            kind,
            reachable: result.is_ok(),
            error: result.err().map(|e| e.to_string()),
            checked_at: now,
        })
        .collect()
}

/// Probes the stores of the resolver in force (`current`, re-read each round so a reload's new
/// stores are probed) every `interval` until `stop` fires. Changes are logged.
pub async fn run(
    current: impl Fn() -> Resolver,
    health: &StoreHealth,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let resolver = current();
        let states = tokio::select! {
            _ = stop.cancelled() => return,
            s = probe(&resolver) => s,
        };
        let before = health.get();
        for s in &states {
            let was = before
                .as_ref()
                .and_then(|b| b.iter().find(|o| o.name == s.name))
                .map(|o| o.reachable);
            match (was, s.reachable) {
                (Some(false), true) => {
                    tracing::info!(store = %s.name, "secret store reachable again")
                }
                (Some(true) | None, false) => {
                    let err = s.error.as_deref().unwrap_or_default();
                    tracing::warn!(store = %s.name, %err, "secret store unreachable")
                }
                _ => {}
            }
        }
        health.set(states);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Whether a TCP connection to the host and port of `url` (`https://host[:port]/...`) opens
/// within [`PROBE_TIMEOUT`].
pub async fn tcp_reachable(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("no host in URL")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {PROBE_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::secrets::{BoxFuture, Lookup, Secret, SecretError, Store};

    struct Fake(bool);

    impl Store for Fake {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn fetch<'a>(&'a self, _: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
            Box::pin(async { Err(SecretError::UnknownStore("fake".into())) })
        }
        fn health(&self) -> BoxFuture<'_, Result<(), SecretError>> {
            let up = self.0;
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err(SecretError::Unreachable {
                        store: "down".into(),
                        kind: "fake",
                        reason: "127.0.0.1:1: connection refused".into(),
                    })
                }
            })
        }
    }

    #[tokio::test]
    async fn unreachable_stores_are_named() {
        let resolver = Resolver::with_stores(
            vec![
                ("up".into(), Arc::new(Fake(true)) as Arc<dyn Store>),
                ("down".into(), Arc::new(Fake(false))),
            ],
            Default::default(),
        );
        let health = StoreHealth::default();
        assert_eq!(health.unreachable(), Err(NotProbed));
        health.set(probe(&resolver).await);
        assert_eq!(health.unreachable(), Ok(vec!["down".to_string()]));
        let states = health.get().unwrap();
        assert_eq!(states[0].name, "down");
        assert!(
            states[0]
                .error
                .as_deref()
                .unwrap()
                .contains("connection refused")
        );
        assert!(states[1].reachable);
    }

    #[tokio::test]
    async fn tcp_probe_sees_a_closed_port() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = format!("http://{}/", l.local_addr().unwrap());
        assert_eq!(tcp_reachable(&open).await, Ok(()));
        drop(l);
        assert!(tcp_reachable(&open).await.is_err());
    }
}
