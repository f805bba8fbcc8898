//! Decoding what a PostgreSQL policy lets the application ask for in its StartupMessage:
//! `postgres.roles` (credentials by the user name the application sends),
//! `postgres.databases` (an allow-list) and `postgres.options` (`pass`, `refuse` or a list of
//! setting names).
//!
//! ```yaml
//! postgres:
//!   roles:
//!     migrator: {store: local, username: {path: migrator, field: username}, password: {path: migrator, field: password}}
//!     reader:   {dynamic: {store: vault, path: database/creds/orders-ro}}
//!   databases: [orders]
//!   options: [statement_timeout, search_path]   # or pass (default), refuse
//! ```
use super::decode::{self, Cx};
use super::decode_policy::credentials;
use super::policy::{OptionsRule, Role};
use super::yaml::{Entry, Node, Value};
use latch_pg::startup_rules::setting_name;

/// `postgres.roles` or `mysql.roles` (`block`): a mapping from the user name the application
/// asks for to a credentials block (the shape of `spec.credentials`). Keys are unique (the
/// YAML reader reports a duplicate with both positions).
pub fn roles(cx: &mut Cx, entry: &Entry, block: &str) -> Option<Vec<Role>> {
    let entries = match &entry.value.value {
        Value::Mapping(entries) if !entries.is_empty() => entries,
        Value::Mapping(_) | Value::Null => {
            cx.error(
                entry.key_mark,
                format!("{block}.roles is empty: name at least one role, or use credentials"),
            );
            return None;
        }
        _ => {
            cx.error(
                entry.value.mark,
                format!(
                    "{block}.roles must be a mapping of user names to credentials, found {}",
                    entry.value.describe()
                ),
            );
            return None;
        }
    };
    let before = cx.errors.len();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if e.key.is_empty() {
            cx.error(
                e.key_mark,
                format!("{block}.roles: a user name cannot be empty"),
            );
            continue;
        }
        if let Some((credentials, cache_ttl)) =
            credentials(cx, e, &format!("{block}.roles.{}", e.key))
        {
            out.push(Role {
                user: e.key.clone(),
                credentials,
                cache_ttl,
            });
        }
    }
    (cx.errors.len() == before).then_some(out)
}

/// `postgres.databases`: a non-empty list of database names, each once.
pub fn databases(cx: &mut Cx, entry: &Entry) -> Option<Vec<String>> {
    let items = decode::sequence(cx, &entry.value, "postgres.databases")?;
    if items.is_empty() {
        cx.error(
            entry.key_mark,
            "postgres.databases is empty: it would refuse every connection; name the databases \
             or remove it",
        );
        return None;
    }
    names(cx, items, "postgres.databases", "database", |s| {
        s.to_owned()
    })
}

/// `postgres.options`: `pass`, `refuse`, or a list of setting names.
pub fn options(cx: &mut Cx, entry: &Entry) -> Option<OptionsRule> {
    match &entry.value.value {
        Value::Scalar { text, .. } if text == "pass" => Some(OptionsRule::Pass),
        Value::Scalar { text, .. } if text == "refuse" => Some(OptionsRule::Refuse),
        Value::Sequence(items) if !items.is_empty() => {
            names(cx, items, "postgres.options", "setting", setting_name).map(OptionsRule::Allow)
        }
        Value::Sequence(_) => {
            cx.error(
                entry.value.mark,
                "postgres.options is an empty list: write refuse to allow no setting",
            );
            None
        }
        _ => {
            cx.error(
                entry.value.mark,
                format!(
                    "postgres.options must be pass, refuse or a list of setting names, found {}",
                    entry.value.describe()
                ),
            );
            None
        }
    }
}

/// Names from a list: non-empty strings, each once (after `normalize`).
fn names(
    cx: &mut Cx,
    items: &[Node],
    what: &str,
    noun: &str,
    normalize: impl Fn(&str) -> String,
) -> Option<Vec<String>> {
    let before = cx.errors.len();
    let mut out: Vec<(String, &Node)> = Vec::with_capacity(items.len());
    for item in items {
        let Some(text) = decode::string(cx, item, &format!("{what} entry")) else {
            continue;
        };
        let name = normalize(&text);
        if name.is_empty() || name.contains('\0') {
            cx.error(item.mark, format!("{what}: a {noun} name cannot be empty"));
        } else if let Some((_, first)) = out.iter().find(|(n, _)| *n == name) {
            cx.error(
                item.mark,
                format!(
                    "{what}: {noun} {name:?} is listed twice (first at line {}, column {})",
                    first.mark.line, first.mark.column
                ),
            );
        } else {
            out.push((name, item));
        }
    }
    (cx.errors.len() == before).then(|| out.into_iter().map(|(n, _)| n).collect())
}
