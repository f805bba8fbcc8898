//! A throw-away PostgreSQL 15 cluster on a loopback address: `initdb` in a temp dir, run as the
//! `postgres` OS user (initdb and postgres refuse root), SCRAM by default, with roles that
//! authenticate with SCRAM, MD5 and clear-text passwords. Stopped by PID on drop.
use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{TempDir, TestCgroup, servers::free_port};

/// Where Debian's `postgresql` package puts the server binaries.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// A role that authenticates with SCRAM-SHA-256 and owns database [`APP_DB`].
pub const SCRAM_USER: &str = "scram_app";
/// A role whose password is stored as MD5 and that pg_hba sends through `md5`.
pub const MD5_USER: &str = "md5_app";
/// A role that pg_hba sends through `password` (clear text).
pub const PLAIN_USER: &str = "plain_app";
/// A database owned by [`SCRAM_USER`].
pub const APP_DB: &str = "appdb";

/// A server binary from [`BIN_DIR`]; panics with what to install when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = Path::new(BIN_DIR).join(name);
    if !p.is_file() {
        panic!(
            "{} not found: install PostgreSQL 15 (`apt-get install postgresql`, or `cargo xtask setup`)",
            p.display()
        );
    }
    p
}

pub struct PgCluster {
    child: Option<Child>,
    /// It listens in another network namespace.
    in_netns: bool,
    pub addr: SocketAddr,
    sock_dir: PathBuf,
    dir: TempDir,
}

/// How [`PgCluster::start_opts`] starts a cluster.
#[derive(Default)]
pub struct PgOpts<'a> {
    /// The address it listens on (`listen_addresses`).
    pub ip: &'a str,
    /// Its port; a free one on `ip` when not given.
    pub port: Option<u16>,
    /// A network namespace (its path) to run the server in, instead of the caller's.
    pub netns: Option<PathBuf>,
    /// pg_hba.conf; the default admits the roles of [`PgCluster::start`] from 127.0.0.0/8.
    pub hba: Option<String>,
    pub tls: Option<ServerTls<'a>>,
}

/// Server-side TLS files (PEM), readable by the postgres user once copied in.
pub struct ServerTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn postgres_ids() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .expect("look up user postgres")
        .unwrap_or_else(|| {
            panic!("no `postgres` OS user: install PostgreSQL 15 (`apt-get install postgresql`)")
        });
    (user.uid.as_raw(), user.gid.as_raw())
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    nix::unistd::chown(path, Some(uid.into()), Some(gid.into()))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

impl PgCluster {
    /// psql run inside `cg` (so latch intercepts it) against this cluster as `user` on `db`:
    /// no password anywhere, never prompts, unaligned tuples only.
    pub fn psql_in(&self, cg: &TestCgroup, user: &str, db: &str, sql: &str) -> Command {
        let mut cmd = cg.command(bin("psql"));
        cmd.args([
            "-h",
            &self.addr.ip().to_string(),
            "-p",
            &self.addr.port().to_string(),
        ])
        .args(["-U", user, "-d", db, "-w", "-X", "-A", "-t", "-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE");
        cmd
    }

    /// A cluster listening on `ip` (a 127.0.0.x address) and a free port, with the test roles
    /// created with passwords `scram_pw`, `md5_pw` and `plain_pw`.
    pub fn start(ip: &str, scram_pw: &str, md5_pw: &str, plain_pw: &str) -> Self {
        Self::start_with(ip, scram_pw, md5_pw, plain_pw, None)
    }

    pub fn start_with(
        ip: &str,
        scram_pw: &str,
        md5_pw: &str,
        plain_pw: &str,
        tls: Option<ServerTls<'_>>,
    ) -> Self {
        let cluster = Self::start_opts(PgOpts {
            ip,
            tls,
            ..PgOpts::default()
        });
        for stmt in [
            format!("CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{scram_pw}'"),
            format!("CREATE DATABASE {APP_DB} OWNER {SCRAM_USER}"),
            // Stored as MD5, so that pg_hba's `md5` really runs the MD5 exchange.
            format!(
                "SET password_encryption = 'md5'; CREATE ROLE {MD5_USER} LOGIN PASSWORD '{md5_pw}'"
            ),
            format!("CREATE ROLE {PLAIN_USER} LOGIN PASSWORD '{plain_pw}'"),
        ] {
            cluster.sql(&stmt);
        }
        cluster
    }

    /// A cluster with no roles but `postgres` (trusted over the Unix socket), as `opts` says.
    pub fn start_opts(opts: PgOpts<'_>) -> Self {
        let PgOpts {
            ip,
            port,
            netns,
            hba,
            tls,
        } = opts;
        crate::require_root();
        let ids = postgres_ids();
        let dir = TempDir::new("pg");
        chown(dir.path(), ids);
        let data = dir.path().join("data");
        let sock_dir = dir.path().join("sock");
        std::fs::create_dir(&sock_dir).expect("create socket dir");
        chown(&sock_dir, ids);
        let as_postgres = |prog: PathBuf| {
            let mut c = Command::new(prog);
            c.uid(ids.0)
                .gid(ids.1)
                .current_dir(dir.path())
                .env("LC_ALL", "C.UTF-8");
            c
        };
        let out = as_postgres(bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hba = hba.unwrap_or_else(|| {
            format!(
                "local all all trust\n\
             host all {MD5_USER} 127.0.0.0/8 md5\n\
             host all {PLAIN_USER} 127.0.0.0/8 password\n\
             host all all 127.0.0.0/8 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n\
             host replication all 127.0.0.0/8 scram-sha-256\n"
            )
        });
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut conf = String::from(
            "password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 100\nshared_buffers = 16MB\n",
        );
        if let Some(tls) = tls {
            for (src, name) in [(tls.cert, "server.crt"), (tls.key, "server.key")] {
                let dst = data.join(name);
                std::fs::copy(src, &dst).expect("copy TLS file");
                chown(&dst, ids);
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    &dst,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .expect("chmod TLS file");
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf)
            .expect("write postgresql.auto.conf");
        let port = port.unwrap_or_else(|| free_port(ip));
        let mut server = match &netns {
            // nsenter joins the namespace as root, then becomes postgres and execs the server.
            Some(ns) => {
                let mut c = Command::new(crate::bins::tool("nsenter", "util-linux"));
                c.arg(format!("--net={}", ns.display()))
                    .args(["-S", &ids.0.to_string(), "-G", &ids.1.to_string(), "--"])
                    .arg(bin("postgres"))
                    .current_dir(dir.path())
                    .env("LC_ALL", "C.UTF-8");
                c
            }
            None => as_postgres(bin("postgres")),
        };
        let child = server
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                &format!("listen_addresses={ip}"),
                "-p",
                &port.to_string(),
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", sock_dir.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log")).expect("server log"))
            .spawn()
            .expect("start postgres");
        let mut cluster = PgCluster {
            child: Some(child),
            in_netns: netns.is_some(),
            addr: SocketAddr::new(ip.parse().expect("an IP address"), port),
            sock_dir,
            dir,
        };
        cluster.wait_ready();
        cluster
    }

    fn wait_ready(&mut self) {
        crate::servers::wait_db_ready(self, Duration::from_secs(30));
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// psql as the superuser over the unix socket with `args` (a later `-d` picks the database).
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin("psql"))
            .arg("-h")
            .arg(&self.sock_dir)
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .env_remove("PGPASSWORD")
            .output()
            .expect("run psql")
    }

    /// Runs `sql` as the superuser over the unix socket (not intercepted); returns stdout.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.admin(&["-c", sql]);
        assert!(
            out.status.success(),
            "psql as superuser failed: {sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Lets clients from `cidr` in with SCRAM (a pg_hba.conf line), and reloads.
    pub fn hba_allow(&self, cidr: &str) {
        let hba = self.dir.path().join("data").join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        text.push_str(&format!("host all all {cidr} scram-sha-256\n"));
        std::fs::write(&hba, text).expect("write pg_hba.conf");
        assert_eq!(self.sql("SELECT pg_reload_conf()"), "t");
    }

    /// The path of the cluster's Unix socket.
    pub fn unix_socket(&self) -> PathBuf {
        self.sock_dir.join(format!(".s.PGSQL.{}", self.addr.port()))
    }

    /// The PID of the cluster's postmaster.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl crate::servers::DbServer for PgCluster {
    const NAME: &'static str = "postgres";
    /// Fast shutdown.
    const STOP_SIGNAL: i32 = libc::SIGINT;
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
    fn answers(&self) -> bool {
        self.admin(&["-c", "select 1"]).status.success()
    }
    fn reachable(&self) -> bool {
        !self.in_netns
    }
    fn log(&self) -> String {
        PgCluster::log(self)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        crate::servers::stop_db(self);
    }
}

/// A `SecretStore` (file) plus a `protocol: postgres` policy for `addr`, reading
/// `db.username`/`db.password` from `secrets_file`; `extra_spec` is added under `spec`. Unless
/// `extra_spec` has a `tls:` block, the policy says `tls: {mode: disable}`: the test clusters
/// have no certificate (a policy verifies the server by default).
pub fn policy_yaml(name: &str, addr: SocketAddr, secrets_file: &Path, extra_spec: &str) -> String {
    let mut extra_spec = if extra_spec.lines().any(|l| l.starts_with("  tls:")) {
        extra_spec.to_owned()
    } else {
        format!("  tls: {{mode: disable}}\n{extra_spec}")
    };
    // Unless the test names its workloads, the policy admits every one in the test cgroup.
    if !extra_spec.lines().any(|l| l.starts_with("  workloads:")) {
        extra_spec.push_str("  workloads: all\n");
    }
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: local\nspec:\n  \
         file: {{path: {}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n  \
         destination:\n    address: \"{}\"\n    port: {}\n  protocol: postgres\n  \
         credentials:\n    store: local\n    username: {{path: db, field: username}}\n    \
         password: {{path: db, field: password}}\n{extra_spec}",
        secrets_file.display(),
        addr.ip(),
        addr.port()
    )
}

/// The secrets file text for [`policy_yaml`].
pub fn secrets_yaml(user: &str, password: &str) -> String {
    format!("db:\n  username: {user}\n  password: \"{password}\"\n")
}
