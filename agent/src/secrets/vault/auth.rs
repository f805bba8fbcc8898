//! Logging in to Vault/OpenBao and keeping the token alive: token (from a file or variable,
//! renewed with `auth/token/renew-self`), AppRole, Kubernetes/JWT. Pure request bodies and
//! answer parsing; the I/O is in [`super::VaultStore`].

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{CredentialSource, RoleIdSource, SecretString};
use crate::secrets::http::secret_bytes;

/// The token the store uses, and when to renew or replace it.
pub struct TokenState {
    pub token: SecretString,
    pub obtained: Instant,
    /// `None`: the token does not expire (e.g. a root token).
    pub ttl: Option<Duration>,
    pub renewable: bool,
}

impl TokenState {
    /// Time to renew (or log in again): two thirds of the way to expiry.
    pub fn due(&self, now: Instant) -> bool {
        match self.ttl {
            None => false,
            Some(ttl) => now >= self.obtained + ttl * 2 / 3,
        }
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.ttl.is_some_and(|ttl| now >= self.obtained + ttl)
    }
}

/// What a login or renew-self answer says about the token.
#[derive(Debug)]
pub struct AuthInfo {
    pub token: SecretString,
    pub ttl: Option<Duration>,
    pub renewable: bool,
}

/// Parses the `auth` block of a login or renew-self answer.
pub fn parse_auth(body: &[u8]) -> Result<AuthInfo, String> {
    let doc = crate::secrets::value::SecretJson::parse(body)?;
    let auth = doc
        .get("auth")
        .filter(|a| a.is_object())
        .ok_or("the answer has no auth block")?;
    let token = auth
        .get("client_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("the answer has no client_token")?;
    let secs = auth
        .get("lease_duration")
        .and_then(|d| d.as_u64())
        .unwrap_or(0);
    Ok(AuthInfo {
        token: SecretString::new(token.to_string()),
        ttl: (secs > 0).then(|| Duration::from_secs(secs)),
        renewable: auth
            .get("renewable")
            .and_then(|r| r.as_bool())
            .unwrap_or(false),
    })
}

/// Parses `auth/token/lookup-self`: the token's remaining `ttl` (0: never expires) and whether
/// it is renewable. The answer holds the token itself (`data.id`): parsed as a [`SecretJson`].
///
/// [`SecretJson`]: crate::secrets::value::SecretJson
pub fn parse_lookup_self(body: &[u8]) -> Result<(Option<Duration>, bool), String> {
    let doc = crate::secrets::value::SecretJson::parse(body)?;
    let data = doc
        .get("data")
        .filter(|d| d.is_object())
        .ok_or("the answer has no data")?;
    let ttl = data.get("ttl").and_then(|t| t.as_u64()).unwrap_or(0);
    let renewable = data
        .get("renewable")
        .and_then(|r| r.as_bool())
        .unwrap_or(false);
    Ok(((ttl > 0).then(|| Duration::from_secs(ttl)), renewable))
}

/// Who a token is, from `auth/token/lookup-self`: its entity, display name and policies
/// (token and identity policies). The answer holds the token itself: parsed as a
/// [`SecretJson`](crate::secrets::value::SecretJson), only these fields kept.
pub fn parse_token_identity(body: &[u8]) -> Result<(String, Vec<String>), String> {
    let doc = crate::secrets::value::SecretJson::parse(body)?;
    let data = doc
        .get("data")
        .filter(|d| d.is_object())
        .ok_or("the answer has no data")?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let name = text("display_name").unwrap_or_else(|| "?".into());
    let principal = match text("entity_id") {
        Some(id) => format!("entity {id} ({name})"),
        None => format!("token {name} (no entity)"),
    };
    let mut policies: Vec<String> = ["policies", "identity_policies"]
        .iter()
        .filter_map(|k| data.get(*k).and_then(|p| p.as_array()))
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    policies.sort();
    policies.dedup();
    Ok((principal, policies))
}

/// What to change when a login is refused: the role does not accept this machine's identity.
pub fn login_hint(method: &str, role: Option<&str>, mount: &str, answer: &str) -> String {
    let clock = answer.contains("Signature expired")
        || answer.contains("RequestTimeTooSkewed")
        || answer.contains("Signature not yet current")
        || answer.contains("token is expired")
        || answer.contains("not yet valid");
    if clock {
        return "the machine's clock is off (the signed request or token is outside its validity): synchronize it (chrony, systemd-timesyncd)"
            .into();
    }
    let role = role.map_or("the role".to_owned(), |r| format!("role {r:?}"));
    let what = match method {
        "aws" => "its bound IAM principal (bound_iam_principal_arn) and the server ID header",
        "jwt" | "kubernetes" => "its bound audiences, subject and claims, and the issuer's keys",
        "cert" => "the CA it trusts (certificate) and its allowed names",
        "approle" => "the role id and secret id",
        _ => "the token",
    };
    format!(
        "{role} at auth/{mount} does not accept this machine's identity: check {what}, or the store's auth.{method}.role"
    )
}

/// The body of `auth/MOUNT/login` for AppRole, in a buffer zeroed when the request is done.
pub fn approle_body(role_id: &str, secret_id: &SecretString) -> Bytes {
    login_body(&[("role_id", role_id), ("secret_id", secret_id.expose())])
}

/// The body of `auth/MOUNT/login` for the Kubernetes and JWT methods (zeroed when done).
pub fn jwt_body(role: &str, jwt: &SecretString) -> Bytes {
    login_body(&[("role", role), ("jwt", jwt.expose())])
}

/// The body of `auth/MOUNT/login` for TLS certificate auth: the role (`name`) if one is
/// named; the credential is the client certificate on the connection.
pub fn cert_body(role: Option<&str>) -> Bytes {
    match role {
        Some(r) => login_body(&[("name", r)]),
        None => login_body(&[]),
    }
}

/// A JSON object of `fields` in a zeroizing buffer (JSON writes a byte as at most six).
fn login_body(fields: &[(&str, &str)]) -> Bytes {
    struct Object<'a>(&'a [(&'a str, &'a str)]);
    impl serde::Serialize for Object<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().copied())
        }
    }
    let len: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    secret_bytes(2 + 6 * len, |buf| {
        serde_json::to_writer(buf, &Object(fields)).expect("writing JSON to memory cannot fail")
    })
}

/// Reads a credential the agent itself needs (a token, a secret id) from a file or variable;
/// surrounding whitespace dropped. The error names the source, never its content.
pub fn read_source(source: &CredentialSource) -> Result<SecretString, String> {
    match source {
        CredentialSource::File(path) => read_file(path),
        CredentialSource::Env(var) => read_env(var),
    }
}

pub fn read_role_id(source: &RoleIdSource) -> Result<String, String> {
    match source {
        RoleIdSource::Value(v) => Ok(v.clone()),
        RoleIdSource::File(path) => read_file(path).map(|s| s.expose().to_string()),
        RoleIdSource::Env(var) => read_env(var).map(|s| s.expose().to_string()),
    }
}

pub fn read_file(path: &Path) -> Result<SecretString, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretString::new(value.to_string()))
}

fn read_env(var: &str) -> Result<SecretString, String> {
    let text = zeroize::Zeroizing::new(
        std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?,
    );
    let value = text.trim();
    if value.is_empty() {
        return Err(format!("environment variable {var} is empty"));
    }
    Ok(SecretString::new(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_answer() {
        let body = br#"{"auth":{"client_token":"s.CANARY","accessor":"a","policies":["default"],
            "lease_duration":2764800,"renewable":true}}"#;
        let a = parse_auth(body).unwrap();
        assert_eq!(a.token.expose(), "s.CANARY");
        assert_eq!(a.ttl, Some(Duration::from_secs(2764800)));
        assert!(a.renewable);
        assert!(!format!("{a:?}").contains("CANARY"));
        assert!(parse_auth(br#"{"auth":null,"errors":[]}"#).is_err());
    }

    #[test]
    fn lookup_self_answer() {
        let root = br#"{"data":{"ttl":0,"renewable":false,"policies":["root"]}}"#;
        assert_eq!(parse_lookup_self(root).unwrap(), (None, false));
        let t = br#"{"data":{"ttl":60,"renewable":true}}"#;
        assert_eq!(
            parse_lookup_self(t).unwrap(),
            (Some(Duration::from_secs(60)), true)
        );
    }

    #[test]
    fn token_identity() {
        let body = br#"{"data":{"id":"s.CANARY","display_name":"aws-vm-node","entity_id":"8f2e",
            "policies":["default","reader"],"identity_policies":["reader","team"],"ttl":3000}}"#;
        let (who, policies) = parse_token_identity(body).unwrap();
        assert_eq!(who, "entity 8f2e (aws-vm-node)");
        assert_eq!(policies, ["default", "reader", "team"]);
        let (who, _) =
            parse_token_identity(br#"{"data":{"display_name":"token","entity_id":""}}"#).unwrap();
        assert_eq!(who, "token token (no entity)");
    }

    #[test]
    fn login_hints() {
        let h = login_hint(
            "jwt",
            Some("node"),
            "jwt",
            "error validating claims: aud claim does not match",
        );
        assert!(
            h.contains("role \"node\" at auth/jwt") && h.contains("audiences"),
            "{h}"
        );
        let h = login_hint(
            "aws",
            Some("vm"),
            "aws",
            "error making upstream request: SignatureDoesNotMatch: Signature expired: 2026",
        );
        assert!(h.contains("clock"), "{h}");
    }

    #[test]
    fn renewal_schedule() {
        let now = Instant::now();
        let t = TokenState {
            token: SecretString::new("t".into()),
            obtained: now,
            ttl: Some(Duration::from_secs(30)),
            renewable: true,
        };
        assert!(!t.due(now + Duration::from_secs(19)));
        assert!(t.due(now + Duration::from_secs(20)));
        assert!(!t.expired(now + Duration::from_secs(29)));
        assert!(t.expired(now + Duration::from_secs(30)));
    }

    #[test]
    fn bodies() {
        let b = approle_body("role", &SecretString::new("sid".into()));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["secret_id"], "sid");
        let b = jwt_body("r", &SecretString::new("eyJ".into()));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["jwt"], "eyJ");
        assert_eq!(v["role"], "r");
        // the worst case for escaping still fits the buffer (the debug assertion would fire)
        let nasty = "\u{1}\"".repeat(500);
        let b = approle_body("\u{2}", &SecretString::new(nasty.clone()));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["secret_id"], nasty.as_str());
    }
}
