//! A throw-away MariaDB 10.11 server on a loopback address: its own datadir made with
//! `mariadb-install-db`, `mariadbd` on a free port, with an account on mysql_native_password
//! and one on ed25519 (`auth_ed25519`). Stopped by PID on drop. Administration goes over the
//! server's Unix socket as root (unix_socket authentication), which latch does not intercept.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{TempDir, TestCgroup, bins, servers::free_port};

/// An account that authenticates with mysql_native_password.
pub const NATIVE_USER: &str = "native_app";
/// An account that authenticates with MariaDB's ed25519.
pub const ED25519_USER: &str = "ed_app";
/// A database both may use.
pub const APP_DB: &str = "appdb";

pub struct MariaDb {
    child: Option<Child>,
    pub addr: SocketAddr,
    socket: PathBuf,
    dir: TempDir,
}

impl MariaDb {
    /// A server on `ip` (a 127.0.0.x address) and a free port, with [`NATIVE_USER`] and
    /// [`ED25519_USER`] created with these passwords.
    pub fn start(ip: &str, native_pw: &str, ed_pw: &str) -> Self {
        Self::start_with(ip, native_pw, ed_pw, None)
    }

    /// [`MariaDb::start`], with TLS from this certificate and key (`--ssl-cert`/`--ssl-key`)
    /// when `tls` is given.
    pub fn start_with(
        ip: &str,
        native_pw: &str,
        ed_pw: &str,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Self {
        Self::start_tls(ip, native_pw, ed_pw, tls, None)
    }

    /// [`MariaDb::start_with`], and `--ssl-ca=<client_ca>` when given: the CA client
    /// certificates are verified against (for `REQUIRE X509` / `REQUIRE SUBJECT` accounts).
    pub fn start_tls(
        ip: &str,
        native_pw: &str,
        ed_pw: &str,
        tls: Option<(&std::path::Path, &std::path::Path)>,
        client_ca: Option<&std::path::Path>,
    ) -> Self {
        crate::require_root();
        let install = bins::tool("mariadb-install-db", "mariadb-server");
        let server = bins::tool("mariadbd", "mariadb-server");
        bins::tool("mariadb", "mariadb-client");
        let dir = TempDir::new("mariadb");
        let data = dir.path().join("data");
        // A temporary directory of its own: a server starting removes every `#sql-*` file in
        // its tmpdir, which, were it /tmp, would include the temporary tables of another
        // instance's bootstrap (it then fails: "Unknown table 'mysql.tmp_user_sys'").
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("make the server's tmpdir");
        // One at a time: concurrent bootstraps in one test process have been seen to fail.
        static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        {
            let _one = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
            crate::run_ok(
                Command::new(install)
                    .arg("--no-defaults")
                    .arg(format!("--datadir={}", data.display()))
                    .arg(format!("--tmpdir={}", tmp.display()))
                    .args([
                        "--user=root",
                        "--skip-test-db",
                        "--auth-root-authentication-method=socket",
                    ]),
            );
        }
        let port = free_port(ip);
        let socket = dir.path().join("mysqld.sock");
        let mut server = Command::new(server);
        // --no-defaults must come first.
        server.arg("--no-defaults");
        if let Some((cert, key)) = tls {
            server
                .arg(format!("--ssl-cert={}", cert.display()))
                .arg(format!("--ssl-key={}", key.display()));
        }
        if let Some(ca) = client_ca {
            server.arg(format!("--ssl-ca={}", ca.display()));
        }
        let child = server
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                dir.path().join("server.log").display()
            ))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--port={port}"))
            .args([
                "--user=root",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--max-allowed-packet=64M",
                "--skip-name-resolve",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let mut db = MariaDb {
            child: Some(child),
            addr: SocketAddr::new(ip.parse().expect("an IP address"), port),
            socket,
            dir,
        };
        db.wait_ready();
        db.sql("INSTALL SONAME 'auth_ed25519'");
        db.sql(&format!("CREATE DATABASE {APP_DB}"));
        db.sql(&format!(
            "CREATE USER {NATIVE_USER}@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{native_pw}')"
        ));
        db.sql(&format!(
            "CREATE USER {ED25519_USER}@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ed_pw}')"
        ));
        for user in [NATIVE_USER, ED25519_USER] {
            db.sql(&format!("GRANT ALL ON {APP_DB}.* TO {user}@'%'"));
            db.sql(&format!("GRANT PROCESS ON *.* TO {user}@'%'"));
        }
        db
    }

    fn wait_ready(&mut self) {
        crate::servers::wait_db_ready(self, Duration::from_secs(30));
    }

    /// The server's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn admin(&self, sql: &str) -> Output {
        root_sql(&self.socket, sql)
    }

    /// Runs `sql` as root over the Unix socket (not intercepted); returns stdout, trimmed.
    pub fn sql(&self, sql: &str) -> String {
        root_sql_ok(&self.socket, sql)
    }

    /// The `mariadb` CLI inside `cg` (so latch intercepts it) as `user`: no password given,
    /// none in the environment or an option file, batch output without column names.
    pub fn cli_in(&self, cg: &TestCgroup, user: &str, sql: &str) -> Command {
        let mut cmd = cg.command(bins::tool("mariadb", "mariadb-client"));
        cmd.arg("--no-defaults")
            .args(["-h", &self.addr.ip().to_string()])
            .args(["-P", &self.addr.port().to_string()])
            .args(["--protocol=TCP", "--connect-timeout=20"])
            .args(["-u", user, "-D", APP_DB, "-N", "-B", "-e", sql])
            .env_remove("MYSQL_PWD");
        cmd
    }

    /// The URL mysql_async connects with (no password).
    pub fn url(&self, user: &str) -> String {
        format!(
            "mysql://{user}@{}:{}/{APP_DB}",
            self.addr.ip(),
            self.addr.port()
        )
    }
}

/// The `mariadb` CLI as root over the server's Unix socket `socket` (not intercepted): its
/// output, batch mode without column names.
pub fn root_sql(socket: &std::path::Path, sql: &str) -> Output {
    Command::new(bins::tool("mariadb", "mariadb-client"))
        .arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .args(["-u", "root", "-N", "-B", "-e", sql])
        .output()
        .expect("run mariadb")
}

/// [`root_sql`], which must succeed; its stdout, trimmed.
pub fn root_sql_ok(socket: &std::path::Path, sql: &str) -> String {
    let out = root_sql(socket, sql);
    assert!(
        out.status.success(),
        "mariadb as root failed: {sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl crate::servers::DbServer for MariaDb {
    const NAME: &'static str = "mariadbd";
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
    fn answers(&self) -> bool {
        self.admin("SELECT 1").status.success()
    }
    fn log(&self) -> String {
        MariaDb::log(self)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        crate::servers::stop_db(self);
    }
}

/// A `SecretStore` (file) plus a `protocol: mysql` policy named `name` for `addr`, reading
/// `db.username`/`db.password` from `secrets_file`; `extra_spec` is added under `spec` (the
/// policy says `tls: {mode: disable}` unless it has a `tls:` block: the test server has no
/// certificate).
pub fn policy_yaml(
    name: &str,
    addr: SocketAddr,
    secrets_file: &std::path::Path,
    extra_spec: &str,
) -> String {
    crate::postgres::policy_yaml(name, addr, secrets_file, extra_spec)
        .replace("protocol: postgres", "protocol: mysql")
}

/// A Python client `script` started inside `cg`, told the server's address and port, a user
/// that holds no password, and [`APP_DB`] (`sys.argv[1..5]`).
pub fn python_client(cg: &TestCgroup, addr: SocketAddr, script: &str) -> Command {
    let mut cmd = cg.command("python3");
    cmd.args(["-c", script])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(["app_without_password", APP_DB]);
    cmd
}
