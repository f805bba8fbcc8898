//! The local stores (file, env, exec, literal) and the resolver's semantics: coalescing, cache,
//! refresh, timeouts, and no secret value in Debug, errors or logs.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use latch::config::{self, SecretStore, SecretString, StoreBackend};
use latch::secrets::{BoxFuture, Lookup, Resolver, ResolverOptions, Secret, SecretError, Store};
use support::*;

fn store(name: &str, backend: StoreBackend) -> SecretStore {
    SecretStore {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: config::Location::new("test.yaml", 1, 1),
        backend,
    }
}

fn write_secrets(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn file_resolver(path: &Path) -> Resolver {
    let s = store(
        "local",
        StoreBackend::File(config::FileStore {
            path: path.to_path_buf(),
        }),
    );
    Resolver::new(&[s], ResolverOptions::default()).unwrap()
}

#[tokio::test]
async fn file_store_serves_username_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    write_secrets(
        &file,
        "orders-db: {username: app, password: s3cret}\n",
        0o600,
    );
    let r = file_resolver(&file);
    let c = r
        .credentials(&static_policy("orders-db", "local", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "app");
    assert_eq!(c.password.as_ref().unwrap().expose(), "s3cret");
}

#[tokio::test]
async fn file_store_refuses_group_or_world_access() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    for mode in [0o640, 0o604, 0o644, 0o660] {
        write_secrets(
            &file,
            "orders-db: {username: app, password: s3cret}\n",
            mode,
        );
        let r = file_resolver(&file);
        let e = r
            .credentials(&static_policy("orders-db", "local", "orders-db", None))
            .await
            .unwrap_err();
        assert!(matches!(e, SecretError::Permission { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&file.display().to_string()), "{text}");
        assert!(text.contains(&format!("{mode:04o}")), "{text}");
        assert!(!text.contains("s3cret"));
    }
}

#[tokio::test]
async fn file_store_rereads_a_changed_file_and_rechecks_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    write_secrets(&file, "db: {username: app, password: one}\n", 0o600);
    let r = file_resolver(&file);
    let p = static_policy("db", "local", "db", None);
    assert_eq!(
        r.credentials(&p)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "one"
    );

    // rewritten in place, same size
    write_secrets(&file, "db: {username: app, password: two}\n", 0o600);
    assert_eq!(
        r.credentials(&p)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "two"
    );

    // replaced by rename (how most tools rotate a file)
    let tmp = dir.path().join("new.yaml");
    write_secrets(&tmp, "db: {username: app2, password: three}\n", 0o600);
    std::fs::rename(&tmp, &file).unwrap();
    let c = r.credentials(&p).await.unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "app2");
    assert_eq!(c.password.as_ref().unwrap().expose(), "three");

    // made readable by others later: refused from then on
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        r.credentials(&p).await,
        Err(SecretError::Permission { .. })
    ));
}

#[tokio::test]
async fn file_store_missing_path_field_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    write_secrets(&file, "db: {username: app}\ntoken: abc\n", 0o600);
    let r = file_resolver(&file);
    let e = r
        .credentials(&static_policy("x", "local", "nope", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::NotFound { ref path, .. } if path == "nope"),
        "{e:?}"
    );
    let e = r
        .credentials(&static_policy("x", "local", "db", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::FieldMissing { ref field, .. } if field == "password"),
        "{e:?}"
    );
    // a single value asked for a field
    let p = refs_policy(
        "t",
        "local",
        None,
        Some(secret_ref("local", "token", Some("password"))),
    );
    assert!(matches!(
        r.credentials(&p).await,
        Err(SecretError::FieldMissing { .. })
    ));
    // a single value
    let p = refs_policy("t", "local", None, Some(secret_ref("local", "token", None)));
    let c = r.credentials(&p).await.unwrap();
    assert!(c.username.is_none());
    assert_eq!(c.password.as_ref().unwrap().expose(), "abc");

    let gone = file_resolver(&dir.path().join("absent.yaml"));
    let e = gone
        .credentials(&static_policy("x", "local", "db", None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("absent.yaml"), "{e}");
}

#[tokio::test]
async fn env_store_reads_variables() {
    // SAFETY: this test binary's only environment writer; the names are unique to this test.
    unsafe {
        std::env::set_var("LATCHTEST_ORDERS_DB_USERNAME", "envuser");
        std::env::set_var("LATCHTEST_ORDERS_DB_PASSWORD", "envpass");
    }
    let s = store(
        "env",
        StoreBackend::Env(config::EnvStore {
            prefix: "LATCHTEST_".to_string(),
        }),
    );
    let r = Resolver::new(&[s], ResolverOptions::default()).unwrap();
    let c = r
        .credentials(&static_policy("orders-db", "env", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(c.username.as_ref().unwrap().expose(), "envuser");
    assert_eq!(c.password.as_ref().unwrap().expose(), "envpass");
    let e = r
        .credentials(&static_policy("x", "env", "missing", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::NotFound { .. }));
    assert!(e.to_string().contains("LATCHTEST_MISSING_USERNAME"), "{e}");
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    path.display().to_string()
}

fn exec_resolver(command: Vec<String>, timeout: Duration) -> Resolver {
    let s = store(
        "exec",
        StoreBackend::Exec(config::ExecStore { command, timeout }),
    );
    Resolver::new(&[s], ResolverOptions::default()).unwrap()
}

#[tokio::test]
async fn exec_store_passes_path_and_field_and_reads_value_or_json() {
    let dir = tempfile::tempdir().unwrap();
    // prints "<fixed arg>:<path>:<field>" for username, a JSON object for password
    let cmd = script(
        dir.path(),
        "get.sh",
        r#"if [ "$3" = password ]; then echo '{"password":"pw-'"$2"'","other":1}'; else echo "$1:$2:$3"; fi"#,
    );
    let r = exec_resolver(vec![cmd, "fixed".to_string()], Duration::from_secs(5));
    let c = r
        .credentials(&static_policy("db", "exec", "orders-db", None))
        .await
        .unwrap();
    assert_eq!(
        c.username.as_ref().unwrap().expose(),
        "fixed:orders-db:username"
    );
    assert_eq!(c.password.as_ref().unwrap().expose(), "pw-orders-db");
}

#[tokio::test]
async fn exec_store_no_shell_involved() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "echo.sh", r#"printf '%s' "$1""#);
    let r = exec_resolver(vec![cmd], Duration::from_secs(5));
    let p = refs_policy(
        "p",
        "exec",
        None,
        Some(secret_ref("exec", "$(id); *", None)),
    );
    let c = r.credentials(&p).await.unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "$(id); *");
}

#[tokio::test]
async fn exec_store_kills_a_command_that_outlives_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let cmd = script(
        dir.path(),
        "slow.sh",
        &format!("echo $$ > {}\nexec sleep 30", pidfile.display()),
    );
    let r = exec_resolver(vec![cmd], Duration::from_millis(300));
    let start = Instant::now();
    let e = r
        .credentials(&static_policy("db", "exec", "x", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Timeout { .. }), "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // killed and reaped: no such process any more
    // SAFETY: signal 0 only checks that the process exists.
    let gone = unsafe { libc::kill(pid, 0) } != 0;
    assert!(gone, "process {pid} still exists after the timeout");
}

#[tokio::test]
async fn exec_store_failure_is_typed() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = script(dir.path(), "fail.sh", "echo CANARY-exec-stderr >&2; exit 3");
    let r = exec_resolver(vec![cmd], Duration::from_secs(5));
    let e = r
        .credentials(&static_policy("db", "exec", "x", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("exit status: 3"), "{e}");
    assert!(!e.to_string().contains("CANARY"));
    let missing = exec_resolver(
        vec!["/nonexistent/latch-helper".to_string()],
        Duration::from_secs(5),
    );
    let e = missing
        .credentials(&static_policy("db", "exec", "x", None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/latch-helper"), "{e}");
}

fn literal_store() -> SecretStore {
    let mut fields = BTreeMap::new();
    fields.insert("username".to_string(), SecretString::new("lit".into()));
    fields.insert("password".to_string(), SecretString::new("litpw".into()));
    let mut values = BTreeMap::new();
    values.insert("db".to_string(), config::LiteralSecret::Fields(fields));
    store(
        "dev",
        StoreBackend::Literal(config::LiteralStore { values }),
    )
}

#[tokio::test]
async fn literal_store_needs_the_development_switch() {
    let e = Resolver::new(&[literal_store()], ResolverOptions::default()).unwrap_err();
    assert!(matches!(e, SecretError::Config { .. }), "{e:?}");
    assert!(e.to_string().contains("development"), "{e}");
    let opts = ResolverOptions {
        allow_literal: true,
        ..Default::default()
    };
    let r = Resolver::new(&[literal_store()], opts).unwrap();
    let c = r
        .credentials(&static_policy("db", "dev", "db", None))
        .await
        .unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), "litpw");
}

/// A store that counts its fetches, each taking `delay`, answering a new password each time.
struct CountingStore {
    fetches: AtomicUsize,
    delay: Duration,
}

impl CountingStore {
    fn new(delay: Duration) -> Arc<CountingStore> {
        Arc::new(CountingStore {
            fetches: AtomicUsize::new(0),
            delay,
        })
    }
    fn count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Store for CountingStore {
    fn kind(&self) -> &'static str {
        "counting"
    }
    fn fetch<'a>(&'a self, lookup: Lookup<'a>) -> BoxFuture<'a, Result<Secret, SecretError>> {
        Box::pin(async move {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            // a zero delay answers on the first poll, as a store with the value at hand does
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let mut f = BTreeMap::new();
            f.insert(
                "username".to_string(),
                SecretString::new(format!("user-{}", lookup.path)),
            );
            f.insert("password".to_string(), SecretString::new(format!("pw-{n}")));
            Ok(Secret::Fields(f))
        })
    }
}

fn counting_resolver(store: &Arc<CountingStore>, opts: ResolverOptions) -> Resolver {
    Resolver::with_stores(
        vec![("count".to_string(), store.clone() as Arc<dyn Store>)],
        opts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_resolves_make_one_store_fetch() {
    let store = CountingStore::new(Duration::from_millis(100));
    let r = counting_resolver(&store, ResolverOptions::default());
    let policy = Arc::new(static_policy("db", "count", "orders-db", None));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (r, policy) = (r.clone(), policy.clone());
        tasks.push(tokio::spawn(async move { r.credentials(&policy).await }));
    }
    for t in tasks {
        let c = t.await.unwrap().unwrap();
        assert_eq!(c.password.as_ref().unwrap().expose(), "pw-1");
    }
    // username and password sit at the same path: one fetch serves both, for all 100
    assert_eq!(store.count(), 1);
}

#[tokio::test]
async fn without_cache_every_connection_fetches() {
    let store = CountingStore::new(Duration::ZERO);
    let r = counting_resolver(&store, ResolverOptions::default());
    let p = static_policy("db", "count", "orders-db", None);
    let a = r.credentials(&p).await.unwrap();
    let b = r.credentials(&p).await.unwrap();
    // one fetch per connection: username and password name the same secret
    assert_eq!(store.count(), 2);
    assert_ne!(
        a.password, b.password,
        "rotation is seen by the next connection"
    );
}

#[tokio::test]
async fn ttl_cache_serves_until_expiry() {
    let store = CountingStore::new(Duration::ZERO);
    let r = counting_resolver(&store, ResolverOptions::default());
    let p = static_policy("db", "count", "orders-db", Some(Duration::from_millis(300)));
    let a = r.credentials(&p).await.unwrap();
    let b = r.credentials(&p).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(store.count(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let c = r.credentials(&p).await.unwrap();
    assert_eq!(store.count(), 2);
    assert_eq!(c.password.as_ref().unwrap().expose(), "pw-2");
}

#[tokio::test]
async fn a_policy_changed_by_reload_does_not_get_old_cached_values() {
    let store = CountingStore::new(Duration::ZERO);
    let r = counting_resolver(&store, ResolverOptions::default());
    let p1 = static_policy("db", "count", "one", Some(Duration::from_secs(3600)));
    let p2 = static_policy("db", "count", "two", Some(Duration::from_secs(3600)));
    assert_eq!(
        r.credentials(&p1)
            .await
            .unwrap()
            .username
            .as_ref()
            .unwrap()
            .expose(),
        "user-one"
    );
    assert_eq!(
        r.credentials(&p2)
            .await
            .unwrap()
            .username
            .as_ref()
            .unwrap()
            .expose(),
        "user-two"
    );
}

#[tokio::test]
async fn refresh_drops_the_cached_value_and_fetches_again() {
    let store = CountingStore::new(Duration::ZERO);
    let r = counting_resolver(&store, ResolverOptions::default());
    let p = static_policy("db", "count", "orders-db", Some(Duration::from_secs(3600)));
    assert_eq!(
        r.credentials(&p)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "pw-1"
    );
    let fresh = r.refresh(&p).await.unwrap();
    assert_eq!(fresh.password.as_ref().unwrap().expose(), "pw-2");
    // the refreshed value is what the cache holds now
    assert_eq!(
        r.credentials(&p)
            .await
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "pw-2"
    );
    assert_eq!(store.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_make_one_fetch_and_skip_a_stale_one() {
    let store = CountingStore::new(Duration::from_millis(100));
    let r = counting_resolver(&store, ResolverOptions::default());
    let p = Arc::new(static_policy("db", "count", "orders-db", None));
    // an ordinary fetch is under way...
    let stale = {
        let (r, p) = (r.clone(), p.clone());
        tokio::spawn(async move { r.credentials(&p).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // ...when 20 connections fail authentication and refresh together
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (r, p) = (r.clone(), p.clone());
        tasks.push(tokio::spawn(async move { r.refresh(&p).await }));
    }
    for t in tasks {
        assert_eq!(
            t.await
                .unwrap()
                .unwrap()
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "pw-2"
        );
    }
    assert_eq!(
        stale
            .await
            .unwrap()
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "pw-1"
    );
    assert_eq!(store.count(), 2);
}

#[tokio::test]
async fn a_slow_store_times_out() {
    let store = CountingStore::new(Duration::from_secs(30));
    let opts = ResolverOptions {
        fetch_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let r = counting_resolver(&store, opts);
    let start = Instant::now();
    let e = r
        .credentials(&static_policy("db", "count", "x", None))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Timeout { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn unknown_store_and_unsupported_dynamic() {
    let store = CountingStore::new(Duration::ZERO);
    let r = counting_resolver(&store, ResolverOptions::default());
    let e = r
        .credentials(&static_policy("db", "nope", "x", None))
        .await
        .unwrap_err();
    assert_eq!(e, SecretError::UnknownStore("nope".into()));
    let e = r
        .credentials(&dynamic_policy("db", "count", "database/creds/x", None))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::Unsupported { ref store, .. } if store == "count"),
        "{e:?}"
    );
}

#[tokio::test]
async fn canary_values_never_reach_debug_errors_or_logs() {
    let logs = captured_logs();
    const CANARY_USER: &str = "CANARY-user-7f3a9c";
    const CANARY_PASS: &str = "CANARY-pass-2b8e51";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    write_secrets(
        &file,
        &format!(
            "db: {{username: {CANARY_USER}, password: {CANARY_PASS}}}\nonly: {{username: {CANARY_USER}}}\n"
        ),
        0o600,
    );
    let r = file_resolver(&file);
    let p = static_policy("db", "local", "db", Some(Duration::from_secs(60)));
    let c = r.credentials(&p).await.unwrap();
    assert_eq!(c.password.as_ref().unwrap().expose(), CANARY_PASS);
    let _ = r.credentials(&p).await.unwrap();
    let _ = r.refresh(&p).await.unwrap();
    let debug = format!("{c:?} {c:#?} {r:?} {:?}", c.password);
    assert!(!debug.contains("CANARY"), "{debug}");

    let mut errors = Vec::new();
    errors.push(
        r.credentials(&static_policy("only", "local", "only", None))
            .await
            .unwrap_err(),
    );
    // a malformed file holding the canary
    write_secrets(
        &file,
        &format!("db: {{username: {CANARY_USER}, password: [{CANARY_PASS}\n"),
        0o600,
    );
    errors.push(r.refresh(&p).await.unwrap_err());
    write_secrets(&file, &format!("- {CANARY_PASS}\n"), 0o600);
    errors.push(r.refresh(&p).await.unwrap_err());
    write_secrets(
        &file,
        &format!("db: {{username: {CANARY_USER}, password: {CANARY_PASS}}}\n"),
        0o644,
    );
    errors.push(r.refresh(&p).await.unwrap_err());
    // an exec helper printing the canary and failing, or printing it as unusable output
    let cmd = script(
        dir.path(),
        "leak.sh",
        &format!("echo {CANARY_PASS}; echo {CANARY_PASS} >&2; exit 1"),
    );
    let x = exec_resolver(vec![cmd], Duration::from_secs(5));
    errors.push(
        x.credentials(&static_policy("db", "exec", "db", None))
            .await
            .unwrap_err(),
    );
    let cmd = script(
        dir.path(),
        "bad.sh",
        &format!("printf '{{\"username\": \"{CANARY_USER}\"}}'"),
    );
    let x = exec_resolver(vec![cmd], Duration::from_secs(5));
    errors.push(
        x.credentials(&static_policy("db", "exec", "db", None))
            .await
            .unwrap_err(),
    );
    assert_eq!(errors.len(), 6);
    for e in &errors {
        let text = format!("{e} {e:?}");
        assert!(!text.contains("CANARY"), "{text}");
    }
    assert!(!logs.lock().unwrap().is_empty());
    assert_not_logged("CANARY");
}

#[tokio::test]
async fn exec_store_helpers_see_none_of_the_agents_environment() {
    let dir = tempfile::tempdir().unwrap();
    // The "secret" is the list of variable names the helper sees.
    let cmd = script(
        dir.path(),
        "env.sh",
        "env | cut -d= -f1 | sort | tr '\\n' ' '",
    );
    let r = exec_resolver(vec![cmd], Duration::from_secs(5));
    let c = r
        .credentials(&static_policy("db", "exec", "orders-db", None))
        .await
        .unwrap();
    let seen = c.password.as_ref().unwrap().expose().to_owned();
    // This test process has CARGO_* variables (cargo test sets them); the helper must not.
    assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
    let names: Vec<&str> = seen.split_whitespace().collect();
    let shell_own = ["PWD", "SHLVL", "_", "OLDPWD"];
    for name in &names {
        assert!(
            latch::secrets::child_env::HELPER_KEEPS.contains(name) || shell_own.contains(name),
            "the helper saw {name} (all: {names:?})"
        );
    }
    assert!(names.contains(&"PATH"), "{names:?}");
}
