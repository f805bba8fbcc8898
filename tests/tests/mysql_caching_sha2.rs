//! caching_sha2_password against a real MySQL server (MySQL 9 from Debian unstable, unpacked
//! by `cargo xtask setup`; MariaDB 10.11 has no server side for it). The `mariadb` CLI and
//! mysql_async in the test cgroup hold no password; latch authenticates with the policy's.
//!
//! One server listens on several loopback addresses, one policy each, so that one account's
//! entry in the server's cache of successful authentications is shared by legs latch protects
//! differently: verified TLS (`verify-full`), plain text, plain text with the server's RSA key.
//! Which of caching_sha2_password's paths latch took is in its debug log
//! (`caching_sha2=fast|full-tls|full-rsa-asked|full-rsa-pinned`), and the paths are also told
//! apart by what the server allows: over plain text without an RSA key, only the fast path
//! can succeed, and only while the server's cache holds the account (FLUSH PRIVILEGES empties
//! it).
use std::{
    process::{Command, Output},
    time::Duration,
};

use latch_tests::stdout_ok as ok;
use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    certs::TestCa,
    mysql_server::{MySql, policies_yaml, without_kept_sessions},
    postgres::secrets_yaml,
};

const USER: &str = "sha2_app";
const PW: &str = "sha2-Secret-51d9";
/// A second account, for COM_CHANGE_USER.
const OTHER: &str = "sha2_other";
const OTHER_PW: &str = "sha2-Other-Secret-c3e2";

fn run(cmd: &mut Command) -> Output {
    latch_tests::run_within(cmd, Duration::from_secs(60))
}

fn refused(cmd: &mut Command) -> String {
    let out = run(cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

struct Setup {
    db: MySql,
    _certs: TestCa,
    cg: TestCgroup,
    agent: Agent,
    dir: TempDir,
}

/// Addresses of the one server: [`TLS_IP`] behind a `verify-full` policy, [`PLAIN_IP`] behind
/// a plain-text policy that has no RSA key and does not ask for one, [`EXTRA_IPS`] behind
/// policies a test writes.
const TLS_IP: &str = "127.0.0.21";
const PLAIN_IP: &str = "127.0.0.22";
const EXTRA_IPS: [&str; 3] = ["127.0.0.23", "127.0.0.24", "127.0.0.25"];
const TLS: usize = 0;
const PLAIN: usize = 1;

/// The `credentials:` block [`policies_yaml`] writes.
const CREDS: &str = "  credentials:\n    store: local\n    username: {path: db, field: username}\n    password: {path: db, field: password}\n";

impl Setup {
    /// `extra` gives the `spec` additions of the policies for [`EXTRA_IPS`] (as many as it
    /// returns); `edit` may change each policy document (by index: TLS, PLAIN, then extras).
    fn new(
        extra: impl FnOnce(&MySql, &TempDir) -> Vec<String>,
        edit: impl Fn(usize, String) -> String,
    ) -> Setup {
        let ips = [TLS_IP, PLAIN_IP, EXTRA_IPS[0], EXTRA_IPS[1], EXTRA_IPS[2]];
        let sans: Vec<String> = std::iter::once("DNS:db.test".to_owned())
            .chain(ips.iter().map(|ip| format!("IP:{ip}")))
            .collect();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let certs = TestCa::new("db.test", &sans);
        let db = MySql::start(&ips, Some((&certs.server_cert(), &certs.server_key())));
        db.create_user(USER, PW);
        let dir = TempDir::new("my-sha2");
        let secrets = dir.write("secrets.yaml", &secrets_yaml(USER, PW));
        let tls = format!(
            "  tls: {{mode: verify-full, ca: {}}}\n",
            certs.ca().display()
        );
        let extra = extra(&db, &dir);
        let names = ["sha2-extra-0", "sha2-extra-1", "sha2-extra-2"];
        let mut policies = vec![
            ("sha2-tls", db.addrs[TLS], tls.as_str()),
            ("sha2-plain", db.addrs[PLAIN], ""),
        ];
        for (i, e) in extra.iter().enumerate() {
            policies.push((names[i], db.addrs[2 + i], e.as_str()));
        }
        let yaml = policies_yaml(&secrets, &policies);
        let yaml = yaml
            .split("---\n")
            .enumerate()
            .map(|(i, doc)| {
                // The first document is the store. Every connection logs in (the tests count
                // the exchanges), so no session is kept.
                if i == 0 {
                    doc.to_owned()
                } else {
                    without_kept_sessions(&edit(i - 1, doc.to_owned()))
                }
            })
            .collect::<Vec<_>>()
            .join("---\n");
        let cg = TestCgroup::new();
        let agent = Agent::start(&yaml, &cg);
        Setup {
            db,
            _certs: certs,
            cg,
            agent,
            dir,
        }
    }

    fn cli(&self, at: usize, sql: &str) -> Command {
        self.cli_as(at, "app_without_password", sql)
    }

    fn cli_as(&self, at: usize, user: &str, sql: &str) -> Command {
        self.db.cli_in(&self.cg, self.db.addrs[at], user, sql)
    }

    fn probe(&self, at: usize, user: &str, scenario: &str) -> Command {
        let mut cmd = self.cg.command(bins::probe());
        cmd.args(["my", &self.db.url(self.db.addrs[at], user), scenario]);
        cmd
    }

    /// How often latch took caching_sha2_password's `path` so far.
    fn paths(&self, path: &str) -> usize {
        self.agent
            .log()
            .matches(&format!("caching_sha2=\"{path}\""))
            .count()
    }

    fn assert_log_clean(&self) {
        let log = self.agent.log();
        assert!(!log.contains(PW), "the password appears in the agent log");
        assert!(
            !log.contains(OTHER_PW),
            "a password appears in the agent log"
        );
    }
}

const WHO: &str = "select current_user()";

#[test]
fn full_authentication_over_verified_tls_fills_the_servers_cache_and_then_the_fast_path_serves_plain_text()
 {
    let s = Setup::new(|_, _| Vec::new(), |_, doc| doc);
    let me = format!("{USER}@%");
    // The server's cache is empty: over plain text, without the server's RSA key and not
    // allowed to ask for it, latch cannot do a full authentication and says so.
    let err = refused(&mut s.cli(PLAIN, WHO));
    eprintln!("plain, cache empty: {err}");
    assert!(
        err.contains("ERROR 1045")
            && err.contains("latch: policy \"sha2-plain\"")
            && err.contains(
                "caching_sha2_password full authentication needs TLS or the server's RSA public key"
            ),
        "{err}"
    );
    assert!(!err.contains(PW));
    // Over verified TLS latch sends the password: full authentication.
    assert_eq!(ok(&mut s.cli(TLS, WHO)), me);
    assert_eq!(s.paths("full-tls"), 1, "{}", s.agent.log());
    // Now the server has the account cached: plain text works, by the fast path, for the CLI
    // and for mysql_async (its suite: prepared statements, a 17 MiB blob each way).
    assert_eq!(ok(&mut s.cli(PLAIN, WHO)), me);
    let who = ok(&mut s.probe(PLAIN, "app_without_password", "whoami"));
    assert!(who.starts_with(&format!("user={me} ")), "{who}");
    assert_eq!(
        ok(&mut s.probe(PLAIN, "app_without_password", "suite")),
        "suite ok"
    );
    // And over TLS, too, it is the fast path now.
    assert_eq!(ok(&mut s.cli(TLS, WHO)), me);
    assert_eq!(s.paths("full-tls"), 1, "{}", s.agent.log());
    assert_eq!(s.paths("fast"), 4, "{}", s.agent.log());
    // FLUSH PRIVILEGES empties the cache: plain text is refused again, TLS does a full
    // authentication again, after which plain text works again.
    s.db.flush_cache();
    refused(&mut s.cli(PLAIN, WHO));
    assert_eq!(ok(&mut s.cli(TLS, WHO)), me);
    assert_eq!(s.paths("full-tls"), 2, "{}", s.agent.log());
    assert_eq!(ok(&mut s.cli(PLAIN, WHO)), me);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

/// An RSA public key (PEM) that is not the server's.
fn other_public_key(dir: &TempDir) -> std::path::PathBuf {
    let key = dir.path().join("other.key");
    let public = dir.path().join("other.pub.pem");
    latch_tests::run_ok(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048"),
    );
    latch_tests::run_ok(
        Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    public
}

#[test]
fn without_tls_the_password_goes_rsa_encrypted_with_the_key_asked_for_or_pinned_and_a_wrong_key_gets_1045()
 {
    const ASKED: usize = 2;
    const PINNED: usize = 3;
    const WRONG: usize = 4;
    let s = Setup::new(
        |db, dir| {
            vec![
                "  mysql: {serverPublicKey: request}\n".to_owned(),
                format!(
                    "  mysql: {{serverPublicKey: {}}}\n",
                    db.public_key().display()
                ),
                format!(
                    "  mysql: {{serverPublicKey: {}}}\n",
                    other_public_key(dir).display()
                ),
            ]
        },
        |_, doc| doc,
    );
    let me = format!("{USER}@%");
    // Cache empty: the key the server sends when asked (0x02).
    assert_eq!(ok(&mut s.cli(ASKED, WHO)), me);
    assert_eq!(s.paths("full-rsa-asked"), 1, "{}", s.agent.log());
    // That filled the cache: plain text without a key is the fast path.
    assert_eq!(ok(&mut s.cli(PLAIN, WHO)), me);
    assert_eq!(s.paths("fast"), 1, "{}", s.agent.log());
    // Cache emptied: a pinned key that is not the server's. The server cannot decrypt what
    // latch sent and refuses; the application hears 1045 naming the policy.
    s.db.flush_cache();
    let err = refused(&mut s.cli(WRONG, WHO));
    assert!(
        err.contains("ERROR 1045") && err.contains("latch: policy \"sha2-extra-2\""),
        "{err}"
    );
    assert!(!err.contains(PW));
    refused(&mut s.cli(PLAIN, WHO));
    // The server's own key, pinned: no request, the password encrypted with it.
    assert_eq!(ok(&mut s.cli(PINNED, WHO)), me);
    assert_eq!(s.paths("full-rsa-pinned"), 1, "{}", s.agent.log());
    let who = ok(&mut s.probe(PLAIN, "app_without_password", "whoami"));
    assert!(who.starts_with(&format!("user={me} ")), "{who}");
    assert_eq!(s.paths("fast"), 2, "{}", s.agent.log());
    // mysql_async, its whole suite, over the leg that asks for the key, cache emptied again.
    s.db.flush_cache();
    assert_eq!(
        ok(&mut s.probe(ASKED, "app_without_password", "suite")),
        "suite ok"
    );
    assert_eq!(s.paths("full-rsa-asked"), 2, "{}", s.agent.log());
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn com_change_user_does_full_authentication_over_verified_tls_or_rsa_and_the_fast_path_once_cached()
{
    const ASKED: usize = 2;
    // Roles instead of credentials on the TLS leg and on a plain leg that asks for the key:
    // `reporting` is USER, `analyst` is OTHER.
    let roles = "  mysql:\n    roles:\n      reporting: {store: local, username: {path: db, field: username}, password: {path: db, field: password}}\n      analyst: {store: local, username: {path: other, field: username}, password: {path: other, field: password}}\n";
    let s = Setup::new(
        |_, _| vec![String::new()],
        |i, doc| match i {
            TLS => doc.replace(CREDS, roles),
            ASKED => doc.replace(CREDS, &format!("{roles}    serverPublicKey: request\n")),
            _ => doc,
        },
    );
    s.db.create_user(OTHER, OTHER_PW);
    s.dir.write(
        "secrets.yaml",
        &format!(
            "db:\n  username: {USER}\n  password: \"{PW}\"\nother:\n  username: {OTHER}\n  password: \"{OTHER_PW}\"\n"
        ),
    );
    let changes = "changeuser:analyst,reporting";
    let expected =
        format!("analyst: ok after={OTHER}@% x=NULL\nreporting: ok after={USER}@% x=NULL");
    // Over verified TLS, cache empty: connect as reporting (full), change to analyst (full,
    // in COM_CHANGE_USER), back to reporting (cached: fast).
    assert_eq!(ok(&mut s.probe(TLS, "reporting", changes)), expected);
    assert_eq!(s.paths("full-tls"), 2, "{}", s.agent.log());
    assert_eq!(s.paths("fast"), 1, "{}", s.agent.log());
    // Over plain text with the key asked for, cache emptied: the same with RSA.
    s.db.flush_cache();
    assert_eq!(ok(&mut s.probe(ASKED, "reporting", changes)), expected);
    assert_eq!(s.paths("full-rsa-asked"), 2, "{}", s.agent.log());
    assert_eq!(s.paths("fast"), 2, "{}", s.agent.log());
    assert_eq!(
        s.agent
            .log()
            .matches("COM_CHANGE_USER authenticated to the target")
            .count(),
        4
    );
    // Both accounts cached: the CLI as either role over plain text with the key is fast.
    assert_eq!(
        ok(&mut s.cli_as(ASKED, "analyst", WHO)),
        format!("{OTHER}@%")
    );
    assert_eq!(s.paths("fast"), 3, "{}", s.agent.log());
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

/// PyMySQL (its own protocol code), no password, toward `addr`: prints CURRENT_USER().
const PYMYSQL: &str = r#"
import sys
import pymysql
con = pymysql.connect(host=sys.argv[1], port=int(sys.argv[2]), user="app", database="appdb", read_timeout=30)
cur = con.cursor()
cur.execute("SELECT CURRENT_USER()")
print(cur.fetchone()[0])
"#;

/// Runs [`PYMYSQL`] in the cgroup toward the policy at `at`.
fn pymysql(s: &Setup, at: usize) -> Output {
    let addr = s.db.addrs[at];
    run(s
        .cg
        .command("python3")
        .args(["-c", PYMYSQL])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string()))
}

#[test]
fn direct_mode_with_the_servers_key_pinned_authenticates_every_client_whether_cached_or_not() {
    const DIRECT: usize = 2;
    const WRONG: usize = 3;
    let s = Setup::new(
        |db, dir| {
            vec![
                format!(
                    "  mysql: {{direct: true, serverPublicKey: {}}}\n",
                    db.public_key().display()
                ),
                format!(
                    "  mysql: {{direct: true, serverPublicKey: {}}}\n",
                    other_public_key(dir).display()
                ),
            ]
        },
        |_, doc| doc,
    );
    let me = format!("{USER}@%");
    for cached in [false, true] {
        if cached {
            // The first round's full authentications filled the server's cache: the plain
            // relay, which has no key, is served by the fast path now. Direct mode still
            // does full authentication (the fast path's status is what such clients cannot
            // read).
            assert_eq!(ok(&mut s.cli(PLAIN, WHO)), me);
        } else {
            s.db.flush_cache();
            refused(&mut s.cli(PLAIN, WHO));
        }
        // Connector/C and PyMySQL, holding no password: the failures of the fast path
        // (direct_mode_serves_clients_that_read_...) do not happen.
        assert_eq!(ok(&mut s.cli(DIRECT, WHO)), me, "cached: {cached}");
        let py = pymysql(&s, DIRECT);
        assert!(
            py.status.success(),
            "cached: {cached}: {}",
            String::from_utf8_lossy(&py.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), me);
        let who = ok(&mut s.probe(DIRECT, "app_without_password", "whoami"));
        assert!(who.starts_with(&format!("user={me} ")), "{who}");
    }
    assert_eq!(s.paths("full-rsa-pinned"), 6, "{}", s.agent.log());
    assert_eq!(
        s.paths("fast"),
        1,
        "only the plain relay's: {}",
        s.agent.log()
    );
    // mysql_async's whole suite over direct mode.
    assert_eq!(
        ok(&mut s.probe(DIRECT, "app_without_password", "suite")),
        "suite ok"
    );
    // A pinned key that is not the server's: the server cannot decrypt what latch sent and
    // refuses; its own 1045 reaches the application (latch has stepped out by then).
    let err = refused(&mut s.cli(WRONG, WHO));
    assert!(err.contains("ERROR 1045"), "{err}");
    assert!(!err.contains(PW));
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn direct_mode_serves_clients_that_read_the_fast_auth_status_and_leaves_full_authentication_undone()
{
    const DIRECT: usize = 2;
    let s = Setup::new(
        |_, _| vec!["  mysql: {direct: true}\n".to_owned()],
        |_, doc| doc,
    );
    let me = format!("{USER}@%");
    let pymysql = |s: &Setup| pymysql(s, DIRECT);
    // Cache empty: the server asks for full authentication, which direct mode does not do
    // (docs/direct-mode.md): the server's request reaches the application, which cannot
    // answer it, and the connection fails, whatever the client.
    let err = refused(&mut s.cli(DIRECT, WHO));
    eprintln!("direct, cache empty, mariadb: {err}");
    assert!(err.contains("ERROR 2013"), "{err}");
    let out = run(&mut s.probe(DIRECT, "app_without_password", "whoami"));
    eprintln!(
        "direct, cache empty, mysql_async: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    // The account cached (a full authentication over verified TLS through the relay): latch
    // authenticates by the fast path and steps out before its last packet; the server's fast
    // authentication status (AuthMoreData 0x03) and its OK reach the application.
    assert_eq!(ok(&mut s.cli(TLS, WHO)), me);
    // mysql_async reads that status and then the OK: it works.
    let who = ok(&mut s.probe(DIRECT, "app_without_password", "whoami"));
    assert!(who.starts_with(&format!("user={me} ")), "{who}");
    assert_eq!(
        ok(&mut s.probe(DIRECT, "app_without_password", "suite")),
        "suite ok"
    );
    // PyMySQL, holding no password, takes the 0x03 for the server's request for more: it
    // answers (an empty packet) and expects a reply after it, but the OK that follows carries
    // the sequence id before.
    let py = pymysql(&s);
    let err = String::from_utf8_lossy(&py.stderr);
    assert!(
        !py.status.success() && err.contains("Packet sequence number wrong"),
        "{err}"
    );
    // Connector/C (the mariadb CLI), holding no password, sends an empty answer and expects
    // the result next: it takes the 0x03 for one and gives up. Not fixable by sequence ids
    // (the fast path is one server packet more than such a client reads); see
    // docs/direct-mode.md.
    let err = refused(&mut s.cli(DIRECT, WHO));
    assert!(err.contains("ERROR 2013"), "{err}");
    s.agent.assert_direct_maps_drain();
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}
