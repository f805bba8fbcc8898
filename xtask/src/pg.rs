//! A throw-away PostgreSQL cluster: initdb into a temp dir, postgres in the foreground as the
//! `postgres` OS user (both refuse to run as root), stopped by its PID on drop.

use crate::proc::{self, Guard, output};
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The postgres OS user's uid and gid (for helpers that must not run as root).
    pub uid: u32,
    pub gid: u32,
    log: PathBuf,
    server: Guard,
}

fn os_user_id(flag: &str) -> Result<u32> {
    let id = output(Command::new("id").args([flag, "postgres"]))
        .context("no `postgres` OS user (is the Debian postgresql package installed?)")?;
    id.trim()
        .parse()
        .with_context(|| format!("parsing `id {flag} postgres` output {id:?}"))
}

impl Postgres {
    /// Cluster files go into `dir` (handed over to the postgres user); listens on `addr` and a
    /// free port, where every login needs a SCRAM-SHA-256 password; the unix socket in `dir`
    /// (trust) is for setting the cluster up.
    pub fn start(dir: &Path, addr: Ipv4Addr) -> Result<Postgres> {
        Postgres::start_with(dir, addr, false)
    }

    /// As [`Postgres::start`]; with `tls`, the server also accepts TLS (`ssl = on`) with a
    /// self-signed P-256 certificate for `addr` that `openssl` generates into `dir`.
    pub fn start_with(dir: &Path, addr: Ipv4Addr, tls: bool) -> Result<Postgres> {
        let (uid, gid) = (os_user_id("-u")?, os_user_id("-g")?);
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .with_context(|| format!("chown {} to postgres", dir.display()))?;
        let data = dir.join("data");
        let log = dir.join("postgres.log");
        let as_postgres = |prog: &str| {
            let mut c = Command::new(Path::new(BIN_DIR).join(prog));
            c.uid(uid)
                .gid(gid)
                .current_dir(dir)
                .env("LC_ALL", "C")
                .stdin(Stdio::null());
            c
        };

        println!(
            "postgres: initdb {} (as the postgres user; TCP logins need scram-sha-256)",
            data.display()
        );
        let out = as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .with_context(|| format!("running {BIN_DIR}/initdb"))?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let mut tls_args = Vec::new();
        if tls {
            let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
            proc::run(
                Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                    .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                    .args(["-subj", &format!("/CN={addr}"), "-addext"])
                    .arg(format!("subjectAltName=IP:{addr}"))
                    .arg("-keyout")
                    .arg(&key)
                    .arg("-out")
                    .arg(&crt)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .context("generating the server's self-signed certificate")?;
            for f in [&crt, &key] {
                std::os::unix::fs::chown(f, Some(uid), Some(gid))?;
            }
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            tls_args = vec![
                "-c".to_string(),
                "ssl=on".to_string(),
                "-c".to_string(),
                format!("ssl_cert_file={}", crt.display()),
                "-c".to_string(),
                format!("ssl_key_file={}", key.display()),
            ];
        }
        let port = proc::free_port(addr)?;
        let logf = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = as_postgres("postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-h", &addr.to_string(), "-p", &port.to_string(), "-k"])
            .arg(dir)
            .args(&tls_args)
            .stdout(logf.try_clone()?)
            .stderr(logf);
        // SIGINT = PostgreSQL's "fast" shutdown.
        let server = Guard::spawn("postgres", &mut cmd, libc::SIGINT)?;
        let mut pg = Postgres {
            addr,
            port,
            uid,
            gid,
            log,
            server,
        };
        println!(
            "postgres: postgres pid {} on {addr}:{port}",
            pg.server.pid()
        );
        if let Err(e) = pg.wait_ready() {
            return Err(e.context(format!(
                "postgres did not come up; its log:\n{}",
                pg.log_text()
            )));
        }
        Ok(pg)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.server.ensure_running()?;
            proc::check_interrupted()?;
            let (host, port) = (self.addr.to_string(), self.port.to_string());
            let mut isready = Command::new(Path::new(BIN_DIR).join("pg_isready"));
            isready.args(["-h", &host, "-p", &port, "-U", "postgres", "-t", "1"]);
            let ready = proc::succeeds(&mut isready);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the superuser over the unix socket (trust, set-up only).
    pub fn admin_sql(&self, dir: &Path, sql: &str) -> Result<()> {
        let out = Command::new("/usr/bin/psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .context("running psql over the unix socket")?;
        if !out.status.success() {
            bail!(
                "setting up PostgreSQL failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop now (the guard would do the same on drop).
    pub fn stop(&mut self) {
        let pid = self.server.pid();
        if let Some(status) = self.server.stop() {
            println!("postgres: postgres pid {pid} stopped ({status})");
        }
    }
}
