//! A throw-away MySQL server (MySQL itself, not MariaDB): the one `cargo xtask setup` unpacks
//! from Debian unstable into [`PREFIX`] with its own libraries (xtask/src/setup_mysql.rs).
//! Its own datadir made with `mysqld --initialize-insecure`, `mysqld` on a free port of one or
//! more loopback addresses, accounts on caching_sha2_password. Administration goes over the
//! server's Unix socket as root (the `mariadb` CLI, whose connector has the
//! caching_sha2_password client plugin), which latch does not intercept. Stopped by PID on drop.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{TempDir, TestCgroup, bins, servers::free_port};

/// Where `cargo xtask setup` put the server.
pub const PREFIX: &str = "/opt/latch-test/mysql";
/// A database the accounts may use.
pub const APP_DB: &str = "appdb";

pub struct MySql {
    child: Option<Child>,
    /// The server's address on each IP it was asked to listen on (one port).
    pub addrs: Vec<SocketAddr>,
    socket: PathBuf,
    dir: TempDir,
}

/// `PREFIX/bin/mysqld` and the unpacked root, or a panic that says how to get them.
fn server() -> (PathBuf, PathBuf) {
    let prefix = Path::new(PREFIX);
    let wrapper = prefix.join("bin/mysqld");
    if !prefix.join("installed").is_file() || !wrapper.is_file() {
        panic!(
            "no MySQL server in {PREFIX}: run `cargo xtask setup` (it unpacks Debian unstable's \
             mysql-server-core there)"
        );
    }
    (wrapper, prefix.join("root"))
}

impl MySql {
    /// A server listening on each of `ips` (127.0.0.x addresses) at one free port; with TLS
    /// from this certificate and key when `tls` is given (else MySQL's own generated ones).
    /// The RSA key pair for caching_sha2_password is MySQL's own, generated at start.
    pub fn start(ips: &[&str], tls: Option<(&Path, &Path)>) -> MySql {
        crate::require_root();
        bins::tool("mariadb", "mariadb-client");
        let (mysqld, root) = server();
        let dir = TempDir::new("mysql");
        let data = dir.path().join("data");
        // Its own, as for MariaDB (`mariadb::MariaDb::start_tls`): not /tmp, shared with other
        // servers' temporary tables.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("make the server's tmpdir");
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        let common = |cmd: &mut Command| {
            // --no-defaults must come first.
            cmd.arg("--no-defaults")
                .arg("--user=root")
                .arg(format!("--basedir={}", root.join("usr").display()))
                .arg(format!(
                    "--lc-messages-dir={}",
                    root.join("usr/share/mysql").display()
                ))
                .arg(format!(
                    "--character-sets-dir={}",
                    root.join("usr/share/mysql/charsets").display()
                ))
                .arg(format!(
                    "--plugin-dir={}",
                    root.join("usr/lib/mysql/plugin").display()
                ))
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()));
        };
        let mut init = Command::new(&mysqld);
        common(&mut init);
        crate::run_ok(init.arg("--initialize-insecure").arg(format!(
            "--log-error={}",
            dir.path().join("init.log").display()
        )));
        let port = free_port(ips[0]);
        let socket = dir.path().join("mysqld.sock");
        let mut cmd = Command::new(&mysqld);
        common(&mut cmd);
        if let Some((cert, key)) = tls {
            cmd.arg(format!("--ssl-cert={}", cert.display()))
                .arg(format!("--ssl-key={}", key.display()));
        }
        let child = cmd
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                dir.path().join("server.log").display()
            ))
            .arg(format!("--secure-file-priv={}", files.display()))
            .arg(format!("--bind-address={}", ips.join(",")))
            .arg(format!("--port={port}"))
            .args([
                "--mysqlx=OFF",
                "--skip-log-bin",
                "--performance-schema=OFF",
                "--innodb-buffer-pool-size=16M",
                "--skip-name-resolve",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mysqld");
        let mut db = MySql {
            child: Some(child),
            addrs: ips
                .iter()
                .map(|ip| SocketAddr::new(ip.parse::<IpAddr>().expect("an IP address"), port))
                .collect(),
            socket,
            dir,
        };
        db.wait_ready();
        db.sql(&format!("CREATE DATABASE {APP_DB}"));
        db
    }

    /// Creates `user`@'%' on caching_sha2_password with `password`, with rights on [`APP_DB`].
    pub fn create_user(&self, user: &str, password: &str) {
        self.sql(&format!(
            "CREATE USER '{user}'@'%' IDENTIFIED WITH caching_sha2_password BY '{password}'"
        ));
        self.sql(&format!("GRANT ALL ON {APP_DB}.* TO '{user}'@'%'"));
    }

    /// Empties caching_sha2_password's cache of successful authentications: the next
    /// authentication of every account is a full one.
    pub fn flush_cache(&self) {
        self.sql("FLUSH PRIVILEGES");
    }

    fn wait_ready(&mut self) {
        crate::servers::wait_db_ready(self, Duration::from_secs(60));
    }

    /// The server's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's RSA public key file (PEM) for caching_sha2_password.
    pub fn public_key(&self) -> PathBuf {
        self.dir.path().join("data/public_key.pem")
    }

    fn admin(&self, sql: &str) -> Output {
        crate::mariadb::root_sql(&self.socket, sql)
    }

    /// Runs `sql` as root over the Unix socket (not intercepted); returns stdout, trimmed.
    pub fn sql(&self, sql: &str) -> String {
        crate::mariadb::root_sql_ok(&self.socket, sql)
    }

    /// The `mariadb` CLI inside `cg` (so latch intercepts it) toward `addr` as `user`: no
    /// password given, none in the environment or an option file.
    pub fn cli_in(&self, cg: &TestCgroup, addr: SocketAddr, user: &str, sql: &str) -> Command {
        let mut cmd = cg.command(bins::tool("mariadb", "mariadb-client"));
        cmd.arg("--no-defaults")
            .args(["-h", &addr.ip().to_string()])
            .args(["-P", &addr.port().to_string()])
            .args(["--protocol=TCP", "--connect-timeout=20"])
            .args(["-u", user, "-D", APP_DB, "-N", "-B", "-e", sql])
            .env_remove("MYSQL_PWD");
        cmd
    }

    /// The URL mysql_async connects to `addr` with (no password).
    pub fn url(&self, addr: SocketAddr, user: &str) -> String {
        format!("mysql://{user}@{}:{}/{APP_DB}", addr.ip(), addr.port())
    }
}

impl crate::servers::DbServer for MySql {
    const NAME: &'static str = "mysqld";
    const STOP_WITHIN: Duration = Duration::from_secs(20);
    fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }
    fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
    fn answers(&self) -> bool {
        self.admin("SELECT 1").status.success()
    }
    fn log(&self) -> String {
        MySql::log(self)
    }
}

impl Drop for MySql {
    fn drop(&mut self) {
        crate::servers::stop_db(self);
    }
}

/// Policies (`protocol: mysql`) named `name` for `addr` with `extra_spec` each, after one
/// file `SecretStore` named `local` on `secrets_file`, reading `db.username`/`db.password`.
pub fn policies_yaml(secrets_file: &Path, policies: &[(&str, SocketAddr, &str)]) -> String {
    let mut docs = Vec::new();
    for (i, (name, addr, extra)) in policies.iter().enumerate() {
        let doc = crate::mariadb::policy_yaml(name, *addr, secrets_file, extra);
        if i == 0 {
            docs.push(doc);
        } else {
            // Only the Policy document: the store is the first one's.
            let policy = doc
                .split("---\n")
                .nth(1)
                .expect("a policy document")
                .to_owned();
            docs.push(policy);
        }
    }
    docs.join("---\n")
}

/// `doc` (a Policy document) with `mysql.keepSessions: false`: every connection then logs in
/// to the server itself, for tests that count or change logins.
pub fn without_kept_sessions(doc: &str) -> String {
    if doc.contains("  mysql: {") {
        doc.replacen("  mysql: {", "  mysql: {keepSessions: false, ", 1)
    } else if doc.contains("  mysql:\n") {
        doc.replacen("  mysql:\n", "  mysql:\n    keepSessions: false\n", 1)
    } else {
        format!("{}\n  mysql: {{keepSessions: false}}\n", doc.trim_end())
    }
}
