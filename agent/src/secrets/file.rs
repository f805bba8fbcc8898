//! The `file` store, the embedded default: a YAML mapping `{path: value}` or
//! `{path: {field: value}}` in a file that only its owner may read.
//!
//! The file is checked with a `stat` whenever it may have changed: its mode (a file made group
//! or world readable is refused from then on), and it is read again when its inode, size, mtime
//! or ctime changed (rotation by rewrite or by rename both count). "May have changed" comes from
//! inotify ([`super::file_watch`]): a lookup of an unchanged file costs one `read` of the watch,
//! and the first lookup after any change to the file or its path checks it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::error::SecretError;
use super::file_watch::FileWatch;
use super::store::{BoxFuture, Lookup, Store};
use super::value::Secret;
use crate::config::SecretString;
use crate::config::yaml::{self, Value};

/// Permission bits that make a secrets file unacceptable: any access by group or others.
const FORBIDDEN_MODE: u32 = 0o077;

pub struct FileStore {
    name: String,
    path: PathBuf,
    loaded: Mutex<Option<Loaded>>,
}

struct Loaded {
    stamp: Stamp,
    secrets: Arc<BTreeMap<String, Secret>>,
    /// Set before `stamp` was taken: says when it may be out of date.
    watch: FileWatch,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStore {
    pub fn new(name: String, path: PathBuf) -> FileStore {
        FileStore {
            name,
            path,
            loaded: Mutex::new(None),
        }
    }

    fn secrets(&self) -> Result<Arc<BTreeMap<String, Secret>>, SecretError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loaded.as_mut()
            && !l.watch.may_have_changed()
        {
            return Ok(l.secrets.clone());
        }
        let result = self.check_and_load(&mut loaded);
        if result.is_err() {
            // Checked again at every lookup until it is fixed.
            *loaded = None;
        }
        result
    }

    /// Checks the file (mode, stamp) and reads it again if it changed.
    fn check_and_load(
        &self,
        loaded: &mut Option<Loaded>,
    ) -> Result<Arc<BTreeMap<String, Secret>>, SecretError> {
        let stamp = self.stamp()?;
        if let Some(l) = loaded.as_ref().filter(|l| l.stamp == stamp) {
            return Ok(l.secrets.clone());
        }
        // Changed, or never read: watch it first, so that a change after the look below is seen.
        let watch = FileWatch::new(&self.path);
        let stamp = self.stamp()?;
        let text =
            Zeroizing::new(std::fs::read_to_string(&self.path).map_err(|e| self.io_error(&e))?);
        let secrets = Arc::new(parse(&text).map_err(|reason| SecretError::Invalid {
            store: self.name.clone(),
            path: self.path.display().to_string(),
            reason,
        })?);
        tracing::debug!(store = %self.name, file = %self.path.display(), entries = secrets.len(), watched = watch.is_watched(), "secrets file (re)loaded");
        *loaded = Some(Loaded {
            stamp,
            secrets: secrets.clone(),
            watch,
        });
        Ok(secrets)
    }

    /// The file's stamp, after checking its mode.
    fn stamp(&self) -> Result<Stamp, SecretError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| self.io_error(&e))?;
        check_mode(&self.name, &self.path, meta.mode())?;
        Ok(Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    fn io_error(&self, e: &std::io::Error) -> SecretError {
        let file = self.path.display();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => SecretError::Permission {
                store: self.name.clone(),
                reason: format!("cannot read secrets file {file}: {e}"),
            },
            _ => SecretError::Unreachable {
                store: self.name.clone(),
                kind: "file",
                reason: format!("cannot read secrets file {file}: {e}"),
            },
        }
    }
}

/// Refuses a file that group or others may read, write or execute.
pub fn check_mode(store: &str, path: &Path, mode: u32) -> Result<(), SecretError> {
    if mode & FORBIDDEN_MODE != 0 {
        return Err(SecretError::Permission {
            store: store.to_string(),
            reason: format!(
                "secrets file {} has mode {:04o}, which lets group or others access it; \
                 refusing to use it (run: chmod 600 {})",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
        });
    }
    Ok(())
}

/// Parses the file's YAML: a mapping from path to a scalar or to a mapping of scalars. Errors
/// say where, never what value.
pub fn parse(text: &str) -> Result<BTreeMap<String, Secret>, String> {
    let (mut docs, errors) = yaml::parse(text);
    if let Some(e) = errors.first() {
        return Err(format!(
            "not valid YAML at line {}, column {}",
            e.mark.line, e.mark.column
        ));
    }
    if docs.len() > 1 {
        return Err("the file holds several YAML documents; keep one mapping".to_string());
    }
    let Some(doc) = docs.pop() else {
        return Ok(BTreeMap::new());
    };
    let entries = match doc.value {
        Value::Null => return Ok(BTreeMap::new()),
        Value::Mapping(entries) => entries,
        _ => return Err("the file must be a YAML mapping of secret paths".to_string()),
    };
    let mut out = BTreeMap::new();
    for entry in entries {
        let key = entry.key;
        let at = entry.value.mark;
        let secret = match entry.value.value {
            Value::Mapping(fields) => {
                let mut m = BTreeMap::new();
                for f in fields {
                    let fat = f.value.mark;
                    let v = scalar(f.value.value).ok_or_else(|| {
                        format!("{key}.{} (line {}) must be a single value", f.key, fat.line)
                    })?;
                    m.insert(f.key, v);
                }
                Secret::Fields(m)
            }
            other => Secret::Value(scalar(other).ok_or_else(|| {
                format!(
                    "{key} (line {}) must be a value or a mapping of fields",
                    at.line
                )
            })?),
        };
        out.insert(key, secret);
    }
    Ok(out)
}

fn scalar(v: Value) -> Option<SecretString> {
    match v {
        Value::Scalar { text, .. } => Some(SecretString::new(text)),
        _ => None,
    }
}

impl Store for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn health(&self) -> super::store::BoxFuture<'_, Result<(), SecretError>> {
        Box::pin(async move {
            let meta = std::fs::metadata(&self.path).map_err(|e| self.io_error(&e))?;
            check_mode(&self.name, &self.path, meta.mode())
        })
    }

    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(async move {
            let secrets = self.secrets()?;
            secrets
                .get(lookup.path)
                .cloned()
                .ok_or_else(|| SecretError::NotFound {
                    store: self.name.clone(),
                    path: lookup.path.to_string(),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_fields() {
        let m = parse("orders-db: {username: app, password: s3cret}\ntoken: abc\nport: 5432\n")
            .unwrap();
        match &m["orders-db"] {
            Secret::Fields(f) => {
                assert_eq!(f["username"].expose(), "app");
                assert_eq!(f["password"].expose(), "s3cret");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&m["token"], Secret::Value(v) if v.expose() == "abc"));
        assert!(matches!(&m["port"], Secret::Value(v) if v.expose() == "5432"));
    }

    #[test]
    fn empty_file_is_empty_map() {
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn parse_errors_hide_values() {
        let e = parse("a: [CANARY-1]\n").unwrap_err();
        assert!(!e.contains("CANARY"), "{e}");
        let e = parse("a: {b: c\nCANARY-2").unwrap_err();
        assert!(!e.contains("CANARY"), "{e}");
        let e = parse("- CANARY-3\n").unwrap_err();
        assert!(!e.contains("CANARY"), "{e}");
    }

    #[test]
    fn mode_check() {
        let p = Path::new("/etc/latch/secrets.yaml");
        assert!(check_mode("s", p, 0o100600).is_ok());
        assert!(check_mode("s", p, 0o100400).is_ok());
        let e = check_mode("s", p, 0o100644).unwrap_err().to_string();
        assert!(
            e.contains("/etc/latch/secrets.yaml") && e.contains("0644"),
            "{e}"
        );
        assert!(check_mode("s", p, 0o100640).is_err());
        assert!(check_mode("s", p, 0o100602).is_err());
    }

    /// The value of `tok` as the store gives it now.
    async fn tok(store: &FileStore) -> Result<String, SecretError> {
        let lookup = Lookup {
            path: "tok",
            field: None,
            version: None,
        };
        match store.fetch(lookup).await? {
            Secret::Value(v) => Ok(v.expose().to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_rotated_or_loosened_file_is_seen_at_the_next_lookup_and_a_refusal_lasts() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(t.path()).unwrap();
        let f = dir.join("s.yaml");
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(&f, "tok: one\n");
        let store = FileStore::new("local".into(), f.clone());
        assert_eq!(tok(&store).await.unwrap(), "one");
        assert!(
            store
                .loaded
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .watch
                .is_watched(),
            "not watched: every lookup would stat"
        );

        // Rewritten in place, then replaced by a rename: each seen by the very next lookup.
        write(&f, "tok: two\n");
        assert_eq!(tok(&store).await.unwrap(), "two");
        write(&dir.join("s.yaml.new"), "tok: three\n");
        std::fs::rename(dir.join("s.yaml.new"), &f).unwrap();
        assert_eq!(tok(&store).await.unwrap(), "three");

        // Made readable by others: refused, and still refused at the lookups after.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        for _ in 0..2 {
            let e = tok(&store).await.unwrap_err();
            assert!(matches!(e, SecretError::Permission { .. }), "{e}");
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(tok(&store).await.unwrap(), "three");

        // Removed: an error at each lookup, not the last value.
        std::fs::remove_file(&f).unwrap();
        assert!(tok(&store).await.is_err());
        assert!(
            tok(&store).await.is_err(),
            "a removed file's secrets were served"
        );
    }
}
