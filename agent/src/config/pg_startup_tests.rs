//! Loading `postgres.roles`, `postgres.databases` and `postgres.options`: what they become and
//! each error with its position.
use super::tests::{STORES, errors, policy};
use super::*;

const HEAD: &str = "  destination: {address: 10.0.0.1, port: 5432}\n  workloads: all\n  protocol: postgres\n  tls: {mode: disable}\n";

fn load(spec: &str) -> Result<Config, LoadErrors> {
    load_str(
        "r.yaml",
        &format!("{STORES}{}", policy("db", &format!("{HEAD}{spec}"))),
    )
}

fn errs(spec: &str) -> Vec<String> {
    errors(
        "r.yaml",
        &format!("{STORES}{}", policy("db", &format!("{HEAD}{spec}"))),
    )
}

#[test]
fn roles_map_the_user_the_application_asks_for_to_credentials_each_with_its_own_cache() {
    let config = load(
        "  postgres:
    roles:
      migrator:
        store: local
        username: {path: migrator, field: username}
        password: {path: migrator, field: password}
        cache: {ttl: 30s}
      reader: {dynamic: {store: vault, path: database/creds/ro}}
    databases: [orders, reports]
    options: [statement_timeout, Search-Path]
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let p = &config.policies[0];
    assert!(p.credentials.is_none());
    let users: Vec<&str> = p.roles.iter().map(|r| r.user.as_str()).collect();
    assert_eq!(users, ["migrator", "reader"]);
    assert_eq!(
        p.roles[0].cache_ttl,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(p.roles[1].cache_ttl, None);
    assert!(matches!(
        &p.roles[1].credentials,
        Credentials::Dynamic { store, path } if store == "vault" && path == "database/creds/ro"
    ));
    assert_eq!(
        p.startup.databases.as_deref(),
        Some(&["orders".to_string(), "reports".to_string()][..])
    );
    assert_eq!(
        p.startup.options,
        OptionsRule::Allow(vec!["statement_timeout".into(), "search_path".into()])
    );
    // Secret references of every role are audited and checked.
    assert_eq!(p.credential_blocks().count(), 2);
}

#[test]
fn without_roles_one_credential_serves_any_user_and_options_pass() {
    let config = load("  credentials: {store: local, password: {path: db}}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let p = &config.policies[0];
    assert!(p.roles.is_empty());
    assert_eq!(p.startup, StartupRules::default());
    let refuse = load(
        "  credentials: {store: local, password: {path: db}}\n  postgres: {options: refuse}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refuse.policies[0].startup.options, OptionsRule::Refuse);
}

#[test]
fn role_errors_name_their_position() {
    // Policy spec starts at line 22; HEAD is 4 lines, so `postgres:` is line 26.
    assert_eq!(
        errs(
            "  credentials: {store: local, password: {path: db}}\n  postgres:\n    roles:\n      a: {store: local, password: {path: a}}\n"
        ),
        vec![
            "r.yaml:28:5: postgres.roles and credentials (line 26) cannot both be given: with roles, the user the application asks for selects the credentials; move credentials under roles with the user name the application sends"
        ]
    );
    assert_eq!(
        errs(
            "  postgres:\n    roles:\n      a: {store: local, password: {path: a}}\n      a: {store: local, password: {path: b}}\n"
        ),
        vec!["r.yaml:29:7: duplicate key \"a\" (first at line 28, column 7)"]
    );
    assert_eq!(
        errs("  postgres:\n    roles:\n      a: {password: {path: a}}\n"),
        vec![
            "r.yaml:28:7: missing field \"store\" in postgres.roles.a (or use postgres.roles.a.dynamic)"
        ]
    );
    assert_eq!(
        errs("  postgres:\n    roles:\n      a: {store: nowhere, password: {path: a}}\n"),
        vec!["r.yaml:28:18: no SecretStore named \"nowhere\""]
    );
    assert_eq!(
        errs("  postgres:\n    roles: {}\n"),
        vec!["r.yaml:27:5: postgres.roles is empty: name at least one role, or use credentials"]
    );
    assert_eq!(
        errs(
            "  postgres:\n    roles:\n      a: {store: local, password: {path: a}, cache: {ttl: 2d}}\n"
        ),
        vec![
            "r.yaml:28:59: invalid postgres.roles.a.cache.ttl \"2d\": unknown unit \"d\" (use ms, s, m or h)"
        ]
    );
}

#[test]
fn database_and_options_errors_name_their_position() {
    let creds = "  credentials: {store: local, password: {path: db}}\n";
    assert_eq!(
        errs(&format!(
            "{creds}  postgres:\n    databases: [orders, reports, orders]\n"
        )),
        vec![
            "r.yaml:28:34: postgres.databases: database \"orders\" is listed twice (first at line 28, column 17)"
        ]
    );
    assert_eq!(
        errs(&format!("{creds}  postgres:\n    databases: []\n")),
        vec![
            "r.yaml:28:5: postgres.databases is empty: it would refuse every connection; name the databases or remove it"
        ]
    );
    assert_eq!(
        errs(&format!(
            "{creds}  postgres:\n    options: [work_mem, Work-Mem]\n"
        )),
        vec![
            "r.yaml:28:25: postgres.options: setting \"work_mem\" is listed twice (first at line 28, column 15)"
        ]
    );
    assert_eq!(
        errs(&format!("{creds}  postgres:\n    options: allow\n")),
        vec![
            "r.yaml:28:14: postgres.options must be pass, refuse or a list of setting names, found \"allow\""
        ]
    );
}
