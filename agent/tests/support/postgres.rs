//! A throw-away PostgreSQL 15 server on a free loopback port, run as the `postgres` OS user
//! (initdb and postgres refuse root), with password (scram) authentication. Killed by pid when
//! dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ProcessGuard, free_port, wait_for_port};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const ADMIN_USER: &str = "vaultadmin";
pub const ADMIN_PASSWORD: &str = "admin-pw-for-tests";

pub struct Postgres {
    pub port: u16,
    pub log: PathBuf,
    guard: ProcessGuard,
    pub dir: tempfile::TempDir,
}

fn postgres_ids() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("no `postgres` OS user: install the Debian package postgresql-15 (apt-get install postgresql-15)");
    (user.uid.as_raw(), user.gid.as_raw())
}

fn as_postgres(program: &str, uid: u32, gid: u32, dir: &Path) -> Command {
    let mut cmd = Command::new(Path::new(PG_BIN).join(program));
    cmd.uid(uid)
        .gid(gid)
        .env("HOME", dir)
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null());
    cmd
}

impl Postgres {
    pub fn start() -> Postgres {
        assert!(
            Path::new(PG_BIN).join("postgres").exists(),
            "PostgreSQL 15 is not installed at {PG_BIN}: install the Debian package postgresql-15"
        );
        let (uid, gid) = postgres_ids();
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into())).unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, ADMIN_PASSWORD).unwrap();
        nix::unistd::chown(&pwfile, Some(uid.into()), Some(gid.into())).unwrap();
        let data = dir.path().join("data");
        let out = as_postgres("initdb", uid, gid, dir.path())
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                ADMIN_USER,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = dir.path().join("postgres.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = as_postgres("postgres", uid, gid, dir.path());
        cmd.arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.path())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let mut guard = ProcessGuard::spawn("postgres", &mut cmd);
        wait_for_port(&mut guard, port, &log, Duration::from_secs(30));
        Postgres {
            port,
            log,
            guard,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn url_template(&self) -> String {
        format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Connects as `user`/`password` and returns `current_user`.
    pub async fn login(&self, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        let task = tokio::spawn(conn);
        let row = client.query_one("SELECT current_user::text", &[]).await?;
        let name: String = row.get(0);
        drop(client);
        let _ = task.await;
        Ok(name)
    }

    /// Whether a role exists, asked as the admin.
    pub async fn role_exists(&self, role: &str) -> bool {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(ADMIN_USER)
            .password(ADMIN_PASSWORD)
            .dbname("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .expect("admin login");
        let task = tokio::spawn(conn);
        let row = client
            .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .unwrap();
        let n: i64 = row.get(0);
        drop(client);
        let _ = task.await;
        n > 0
    }
}
