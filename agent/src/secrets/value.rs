//! What stores return and what the resolver hands to connectors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use crate::config::SecretString;

/// One secret as a store holds it: a single value, or named fields (`username`, `password`, …).
/// `Debug` shows field names only.
#[derive(Clone)]
pub enum Secret {
    Value(SecretString),
    Fields(BTreeMap<String, SecretString>),
    /// A text that is also a JSON object (AWS `SecretString`): the whole text when a reference
    /// names no field, a member when it does.
    Structured {
        text: SecretString,
        fields: BTreeMap<String, SecretString>,
    },
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret::Value(<redacted>)"),
            Secret::Fields(m) => f
                .debug_tuple("Secret::Fields")
                .field(&m.keys().collect::<Vec<_>>())
                .finish(),
            Secret::Structured { fields, .. } => f
                .debug_tuple("Secret::Structured")
                .field(&fields.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// The credentials a connector authenticates with. `Debug` prints `<redacted>` for the values.
#[derive(Clone, Default)]
pub struct Credentials {
    /// `None` when the policy names no username: the connector keeps the one the application
    /// sent.
    pub username: Option<SecretString>,
    pub password: Option<SecretString>,
    /// When these stop being valid (a dynamic lease's end), if known.
    pub expires_at: Option<Instant>,
}

impl Credentials {
    pub fn new(username: Option<SecretString>, password: Option<SecretString>) -> Credentials {
        Credentials {
            username,
            password,
            expires_at: None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |v: &Option<SecretString>| if v.is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("Credentials")
            .field("username", &shown(&self.username))
            .field("password", &shown(&self.password))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Credentials minted by a dynamic-secrets engine, with the lease's end.
#[derive(Clone, Debug)]
pub struct DynamicCredentials {
    pub username: SecretString,
    pub password: SecretString,
    pub expires_at: Option<Instant>,
}

/// A parsed JSON answer that may hold secrets: every string in it (values, not keys) is
/// zeroized when it is dropped. Read it through `Deref`; copy out what is needed into
/// [`SecretString`]s.
pub struct SecretJson(serde_json::Value);

impl SecretJson {
    /// Parses `bytes` in a wipe scope ([`crate::wipe`]): serde_json's scratch buffer, where it
    /// unescapes strings that hold escapes, is zeroized before it is freed, and so is every
    /// other block freed while parsing (a failed parse's partial document included).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        crate::wipe::scope(|| {
            serde_json::from_slice(bytes)
                .map(SecretJson)
                .map_err(|_| "the answer is not JSON".to_string())
        })
    }
}

impl std::ops::Deref for SecretJson {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        &self.0
    }
}

impl Drop for SecretJson {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Zeroizes every string value in `v`.
pub fn wipe(v: &mut serde_json::Value) {
    use zeroize::Zeroize as _;
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(wipe),
        serde_json::Value::Object(map) => map.values_mut().for_each(wipe),
        _ => {}
    }
}

/// The scalar members of a JSON object as secret fields; nested values are kept as JSON text.
pub fn json_fields(
    map: &serde_json::Map<String, serde_json::Value>,
) -> BTreeMap<String, SecretString> {
    map.iter()
        .filter_map(|(k, v)| json_scalar(v).map(|v| (k.clone(), v)))
        .collect()
}

/// A JSON value as a secret string: strings as they are, numbers and booleans written out,
/// objects and arrays as JSON; `null` is no value.
pub fn json_scalar(v: &serde_json::Value) -> Option<SecretString> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(SecretString::new(s.clone())),
        serde_json::Value::Bool(b) => Some(SecretString::new(b.to_string())),
        serde_json::Value::Number(n) => Some(SecretString::new(n.to_string())),
        other => Some(SecretString::new(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_zeroizes_every_string_value_however_deep() {
        let mut v: serde_json::Value = serde_json::from_str(
            r#"{"password":"canary-1","nested":{"list":["canary-2",{"k":"canary-3"}]},"n":5}"#,
        )
        .unwrap();
        wipe(&mut v);
        let text = v.to_string();
        assert!(!text.contains("canary"), "{text}");
        assert_eq!(v["password"], "");
        assert_eq!(v["nested"]["list"][1]["k"], "");
        assert_eq!(v["n"], 5);
    }
}
