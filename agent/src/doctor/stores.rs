//! `latch doctor --policy FILE`: for each secret store of the configuration, the identity the
//! agent will use with it (the AWS principal from `sts:GetCallerIdentity`, the Vault token's
//! entity and policies from `lookup-self`) and whether it works. Store credentials are
//! obtained as the agent would obtain them; nothing secret is printed.
use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::Verdict;
use crate::secrets::{Identity, Resolver, SecretError};

/// How long one store may take to say who the agent is.
pub const BOUND: Duration = Duration::from_secs(15);

/// One store's check.
#[derive(Debug, Clone)]
pub struct StoreCheck {
    pub name: String,
    pub kind: &'static str,
    pub verdict: Verdict,
}

impl fmt::Display for StoreCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = format!("store {}", self.name);
        match &self.verdict {
            Verdict::Ok(found) => write!(f, "ok    {what:<22} {}: {found}", self.kind),
            Verdict::Warn { found, fix } => {
                write!(
                    f,
                    "warn  {what:<22} {}: {found}\n      fix: {fix}",
                    self.kind
                )
            }
            Verdict::Fail { found, fix } => {
                write!(
                    f,
                    "FAIL  {what:<22} {}: {found}\n      fix: {fix}",
                    self.kind
                )
            }
        }
    }
}

/// Asks every store of `resolver` who the agent is (stores without a credential of their own
/// are probed for reachability instead).
pub async fn check(resolver: &Resolver) -> Vec<StoreCheck> {
    let health = resolver.health(BOUND).await;
    resolver
        .identities(BOUND)
        .await
        .into_iter()
        .map(|(name, kind, who)| {
            let verdict = match who {
                Some(Ok(id)) => Verdict::Ok(describe(&id, SystemTime::now())),
                Some(Err(e)) => failed(&e),
                None => match health.iter().find(|h| h.0 == name).map(|h| &h.2) {
                    Some(Err(e)) => failed(e),
                    _ => Verdict::Ok("reachable; no credential of its own".into()),
                },
            };
            StoreCheck {
                name,
                kind,
                verdict,
            }
        })
        .collect()
}

/// `principal; policies a, b; credential expires at T (in N min)`.
pub fn describe(id: &Identity, now: SystemTime) -> String {
    let mut text = id.principal.clone();
    if !id.policies.is_empty() {
        text.push_str(&format!("; policies {}", id.policies.join(", ")));
    }
    if let Some(at) = id.expires_at {
        text.push_str(&format!("; credential {}", expires_text(at, now)));
    }
    text
}

/// `expires 2026-12-03T19:36:30Z (in 59 min)`, for `latch status` too.
pub fn expires_text(at: u64, now: SystemTime) -> String {
    let when = UNIX_EPOCH + Duration::from_secs(at);
    let stamp = crate::audit::rfc3339(when);
    let stamp = stamp.split('.').next().unwrap_or(&stamp).to_owned() + "Z";
    match when.duration_since(now) {
        Ok(left) => format!("expires {stamp} (in {})", human(left)),
        Err(_) => format!("expired {stamp}"),
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

fn failed(e: &SecretError) -> Verdict {
    let fix = match e {
        SecretError::Unreachable { .. } | SecretError::Timeout { .. } => {
            "make the store (or the metadata service it names) reachable from this machine"
        }
        SecretError::StoreAuth { .. } | SecretError::Permission { .. } => {
            "give this machine an identity the store accepts, as the message says"
        }
        _ => "correct the store's configuration, as the message says",
    };
    Verdict::Fail {
        found: e.to_string(),
        fix: fix.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_identity_and_expiry() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_322_000);
        let id = Identity {
            principal: "entity 8f2e (aws-vm-node)".into(),
            policies: vec!["default".into(), "reader".into()],
            expires_at: Some(1_796_322_000 + 3540),
        };
        assert_eq!(
            describe(&id, now),
            "entity 8f2e (aws-vm-node); policies default, reader; credential expires \
             2026-12-03T19:19:00Z (in 59 min)"
        );
        assert!(expires_text(1_796_321_000, now).starts_with("expired "));
        let check = StoreCheck {
            name: "vm-store".into(),
            kind: "aws",
            verdict: failed(&SecretError::StoreAuth {
                store: "vm-store".into(),
                kind: "aws",
                reason: "instance metadata: refused (401)".into(),
            }),
        };
        let text = check.to_string();
        assert!(text.starts_with("FAIL  store vm-store"), "{text}");
        assert!(text.contains("fix: give this machine"), "{text}");
    }
}
