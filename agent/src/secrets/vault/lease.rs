//! Dynamic-secrets leases (e.g. `database/creds/ROLE`): parse the answer, decide whether to
//! reuse, renew or replace. Pure functions; the I/O is in [`super::VaultStore`].

use std::time::{Duration, Instant};

use crate::config::SecretString;

/// One lease and the credentials it carries.
#[derive(Clone)]
pub struct Lease {
    pub id: String,
    /// The duration granted when minted (the renewal increment asked for).
    pub duration: Duration,
    pub renewable: bool,
    pub expires: Instant,
    pub username: SecretString,
    pub password: SecretString,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("duration", &self.duration)
            .field("renewable", &self.renewable)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// What to do with the current lease before handing out its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Reuse,
    Renew,
    Replace,
}

/// Reuse while more than a third of the lease is left; then renew when renewable, else mint new
/// credentials. With less than a tenth (or 2 s) left, always mint: a renewal may not come in
/// time and a connection could start with credentials about to die.
pub fn plan(lease: &Lease, now: Instant) -> Plan {
    let left = lease.expires.saturating_duration_since(now);
    if left > lease.duration / 3 {
        Plan::Reuse
    } else if lease.renewable && left > (lease.duration / 10).max(Duration::from_secs(2)) {
        Plan::Renew
    } else {
        Plan::Replace
    }
}

/// Whether a renewal answer is worth keeping: it must give back at least half the original
/// duration (a lease close to its max TTL is cut short; then mint new ones instead).
pub fn renewal_sufficient(lease: &Lease, granted: Duration) -> bool {
    granted >= lease.duration / 2
}

/// Parses a dynamic-secrets read: `lease_id`, `lease_duration`, `renewable`, and
/// `data.username` / `data.password`.
pub fn parse_creds(body: &[u8], now: Instant) -> Result<Lease, String> {
    let doc = crate::secrets::value::SecretJson::parse(body)?;
    let id = doc
        .get("lease_id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let secs = doc
        .get("lease_duration")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let renewable = doc
        .get("renewable")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let data = doc.get("data").ok_or("the answer has no data")?;
    let field = |name: &str| {
        data.get(name)
            .and_then(|v| v.as_str())
            .map(|s| SecretString::new(s.to_string()))
            .ok_or_else(|| {
                format!("the answer has no data.{name} (is this a dynamic-credentials path?)")
            })
    };
    let username = field("username")?;
    let password = field("password")?;
    if id.is_empty() || secs == 0 {
        return Err(
            "the answer carries no lease (is this a dynamic-credentials path?)".to_string(),
        );
    }
    let duration = Duration::from_secs(secs);
    Ok(Lease {
        id,
        duration,
        renewable,
        expires: now + duration,
        username,
        password,
    })
}

/// Parses `sys/leases/renew`: the newly granted duration.
pub fn parse_renewal(body: &[u8]) -> Result<Duration, String> {
    let doc = crate::secrets::value::SecretJson::parse(body)?;
    doc.get("lease_duration")
        .and_then(|v| v.as_u64())
        .map(Duration::from_secs)
        .ok_or_else(|| "the renewal answer has no lease_duration".to_string())
}

pub fn renew_body(lease_id: &str, increment: Duration) -> Vec<u8> {
    serde_json::json!({ "lease_id": lease_id, "increment": increment.as_secs() })
        .to_string()
        .into_bytes()
}

pub fn revoke_body(lease_id: &str) -> Vec<u8> {
    serde_json::json!({ "lease_id": lease_id })
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(duration: u64, left: u64, renewable: bool, now: Instant) -> Lease {
        Lease {
            id: "database/creds/r/abc".into(),
            duration: Duration::from_secs(duration),
            renewable,
            expires: now + Duration::from_secs(left),
            username: SecretString::new("u".into()),
            password: SecretString::new("p".into()),
        }
    }

    #[test]
    fn parse_database_creds() {
        let now = Instant::now();
        let body = br#"{"request_id":"r","lease_id":"database/creds/orders-rw/AbC","renewable":true,
            "lease_duration":3600,"data":{"password":"CANARY-pw","username":"v-token-orders-rw-x"}}"#;
        let l = parse_creds(body, now).unwrap();
        assert_eq!(l.id, "database/creds/orders-rw/AbC");
        assert_eq!(l.duration, Duration::from_secs(3600));
        assert!(l.renewable);
        assert_eq!(l.username.expose(), "v-token-orders-rw-x");
        assert_eq!(l.password.expose(), "CANARY-pw");
        assert!(!format!("{l:?}").contains("CANARY"));
        // a KV answer is not a lease
        assert!(
            parse_creds(
                br#"{"lease_id":"","lease_duration":0,"data":{"username":"a","password":"b"}}"#,
                now
            )
            .is_err()
        );
    }

    #[test]
    fn plans() {
        let now = Instant::now();
        assert_eq!(plan(&lease(3600, 3000, true, now), now), Plan::Reuse);
        assert_eq!(plan(&lease(3600, 1000, true, now), now), Plan::Renew);
        assert_eq!(plan(&lease(3600, 1000, false, now), now), Plan::Replace);
        assert_eq!(plan(&lease(3600, 100, true, now), now), Plan::Replace);
        assert_eq!(plan(&lease(3600, 0, true, now), now), Plan::Replace);
        let l = lease(3600, 1000, true, now);
        assert!(renewal_sufficient(&l, Duration::from_secs(3600)));
        assert!(!renewal_sufficient(&l, Duration::from_secs(600)));
    }

    #[test]
    fn renewal_answer() {
        let body = br#"{"lease_id":"x","renewable":true,"lease_duration":1800,"data":null}"#;
        assert_eq!(parse_renewal(body).unwrap(), Duration::from_secs(1800));
    }
}
