//! Vault/OpenBao KV engines, versions 1 and 2: request paths and answers. Pure functions.

use crate::secrets::value::{Secret, SecretJson, json_fields};

/// Splits a reference's path into the KV mount and the secret's path in it. With a store
/// `mount`, the whole path is inside it; without, the first segment is the mount
/// (`secret/orders-db` → `secret`, `orders-db`).
pub fn split_mount(mount: Option<&str>, path: &str) -> Result<(String, String), String> {
    let path = path.trim_matches('/');
    match mount {
        Some(m) => Ok((m.trim_matches('/').to_string(), path.to_string())),
        None => match path.split_once('/') {
            Some((m, rest)) if !m.is_empty() && !rest.is_empty() => {
                Ok((m.to_string(), rest.to_string()))
            }
            _ => Err(format!(
                "path {path:?} names no KV mount: write it as MOUNT/PATH (e.g. secret/{path}) or set the store's mount"
            )),
        },
    }
}

/// The API path (after `/v1/`) that reads a secret: KV v2 `MOUNT/data/PATH[?version=N]`,
/// KV v1 `MOUNT/PATH`.
pub fn read_path(
    kv_version: u8,
    mount: &str,
    path: &str,
    version: Option<&str>,
) -> Result<String, String> {
    match (kv_version, version) {
        (1, None) => Ok(format!("{mount}/{path}")),
        (1, Some(_)) => {
            Err("a version was given but the KV v1 engine keeps no versions".to_string())
        }
        (_, None) => Ok(format!("{mount}/data/{path}")),
        (_, Some(v)) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok(format!("{mount}/data/{path}?version={n}")),
            _ => Err(format!(
                "version {v:?} is not a positive integer (KV v2 versions are 1, 2, …)"
            )),
        },
    }
}

/// The fields of a read answer: `data.data` for KV v2, `data` for KV v1.
pub fn parse_read(kv_version: u8, body: &[u8]) -> Result<Secret, String> {
    let doc = SecretJson::parse(body)?;
    let serde_json::Value::Object(top) = &*doc else {
        return Err("the answer is not a JSON object".to_string());
    };
    let mut data = top.get("data").ok_or("the answer has no data")?;
    if kv_version != 1 {
        data = match data {
            serde_json::Value::Object(d) => match d.get("data") {
                Some(inner) => inner,
                None => {
                    return Err("the answer has no data.data (is this a KV v1 mount?)".to_string());
                }
            },
            _ => return Err("data is not an object".to_string()),
        };
    }
    match data {
        serde_json::Value::Object(fields) => Ok(Secret::Fields(json_fields(fields))),
        // a deleted or destroyed version
        serde_json::Value::Null => Err("the version is deleted or destroyed".to_string()),
        _ => Err("the secret's data is not an object".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts() {
        assert_eq!(
            split_mount(None, "secret/orders-db").unwrap(),
            ("secret".into(), "orders-db".into())
        );
        assert_eq!(
            split_mount(None, "/secret/a/b/").unwrap(),
            ("secret".into(), "a/b".into())
        );
        assert_eq!(
            split_mount(Some("kv/"), "a/b").unwrap(),
            ("kv".into(), "a/b".into())
        );
        assert!(split_mount(None, "orders-db").is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(
            read_path(2, "secret", "db", None).unwrap(),
            "secret/data/db"
        );
        assert_eq!(
            read_path(2, "secret", "db", Some("3")).unwrap(),
            "secret/data/db?version=3"
        );
        assert!(read_path(2, "secret", "db", Some("0")).is_err());
        assert!(read_path(2, "secret", "db", Some("x")).is_err());
        assert_eq!(read_path(1, "kv", "db", None).unwrap(), "kv/db");
        assert!(read_path(1, "kv", "db", Some("1")).is_err());
    }

    #[test]
    fn kv2_answer() {
        let body = br#"{"request_id":"x","lease_id":"","renewable":false,"lease_duration":0,
            "data":{"data":{"username":"app","password":"s3cret","port":5432},
            "metadata":{"created_time":"2024-01-01T00:00:00Z","version":2}}}"#;
        match parse_read(2, body).unwrap() {
            Secret::Fields(f) => {
                assert_eq!(f["username"].expose(), "app");
                assert_eq!(f["password"].expose(), "s3cret");
                assert_eq!(f["port"].expose(), "5432");
                assert!(!f.contains_key("metadata"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kv1_answer() {
        let body = br#"{"data":{"password":"pw"},"lease_duration":2764800}"#;
        assert!(
            matches!(parse_read(1, body).unwrap(), Secret::Fields(f) if f["password"].expose() == "pw")
        );
        // a v1 answer read as v2 is refused with a hint
        assert!(parse_read(2, body).unwrap_err().contains("KV v1"));
    }

    #[test]
    fn deleted_version_and_garbage() {
        let body = br#"{"data":{"data":null,"metadata":{"deletion_time":"2024-01-01T00:00:00Z"}}}"#;
        assert!(parse_read(2, body).unwrap_err().contains("deleted"));
        assert!(
            parse_read(2, b"CANARY not json")
                .unwrap_err()
                .find("CANARY")
                .is_none()
        );
    }
}
