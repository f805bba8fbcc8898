//! Resolving policy host names, and re-resolving them as their DNS answers expire.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_resolver::TokioResolver;

use crate::policy_set::Resolved;

/// Answers are re-resolved no sooner than this, even with a TTL of 0…
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// …and no later than this, whatever the TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// A failed lookup is retried after this; the last good answer stays in force meanwhile.
pub const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct DnsError(String);

/// Resolves host names with the system configuration (/etc/resolv.conf, /etc/hosts).
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    pub fn from_system() -> Result<Self, DnsError> {
        let resolver = TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| DnsError(e.to_string()))?;
        Ok(Self { resolver })
    }

    /// Resolves every host; returns the answers and when the earliest one expires. A host that
    /// fails keeps its entry from `previous` (if any) and is retried after [`RETRY`].
    pub async fn resolve_all(&self, hosts: &[String], previous: &Resolved) -> (Resolved, Instant) {
        let mut out = Resolved::new();
        let now = Instant::now();
        let mut next = now + MAX_REFRESH;
        for host in hosts {
            match self.resolver.lookup_ip(host.as_str()).await {
                Ok(answer) => {
                    let mut addrs: Vec<IpAddr> = answer.iter().collect();
                    addrs.sort();
                    addrs.dedup();
                    let ttl = answer.valid_until().saturating_duration_since(now);
                    next = next.min(now + ttl.clamp(MIN_REFRESH, MAX_REFRESH));
                    out.insert(host.clone(), addrs);
                }
                Err(err) => {
                    tracing::warn!(%host, %err, "could not resolve policy host; keeping last answer");
                    if let Some(old) = previous.get(host) {
                        out.insert(host.clone(), old.clone());
                    }
                    next = next.min(now + RETRY);
                }
            }
        }
        (out, next)
    }
}
