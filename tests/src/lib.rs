//! Test support for latch's end-to-end tests: real servers and clients on loopback, clients
//! in a cgroup the test creates, and checks that nothing is left behind.
//!
//! These tests need root (eBPF, cgroups). They never skip: a missing prerequisite fails the
//! test with a message that says what to install or run.
pub mod agent;
pub mod aws_iam_vault;
pub mod bins;
pub mod certs;
pub mod cgroup;
pub mod container;
pub mod http;
pub mod kube_api;
pub mod leftovers;
pub mod manifests;
pub mod mariadb;
pub mod memory;
pub mod moto;
pub mod my_setup;
pub mod mysql_server;
pub mod nginx_api;
pub mod openbao;
pub mod pg_roles;
pub mod pg_setup;
pub mod pod;
pub mod postgres;
pub mod servers;
pub mod suites;

pub use agent::Agent;
pub use cgroup::TestCgroup;

use std::path::PathBuf;

/// Panics unless running as root, with a message saying why the test needs it.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test loads eBPF programs and creates cgroups: run it as root \
             (`sudo -E cargo xtask test`)"
        );
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "latch-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        // Whatever the umask: latch refuses policy directories others may write.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod temp dir");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Writes `text` to `name` inside the directory (mode 0600) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.0.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("write temp file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process a test started, killed (by PID) and reaped on drop, also when the test panics.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` every 20 ms until it holds or `within` has passed; returns whether it held.
/// Callers assert on the result with their own message.
pub fn eventually(within: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(within, || cond().then_some(())).is_some()
}

/// Polls `probe` every 20 ms until it gives a value, for at most `within`; the value, or
/// `None` when time ran out. The one wait loop of the tests: a condition, never a fixed sleep.
pub fn wait_for<T>(within: std::time::Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion; panics with its status and output unless it succeeded.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("run command");
    assert_succeeded(cmd, &out);
    out
}

/// Panics with `cmd`'s status and output unless it succeeded.
fn assert_succeeded(cmd: &std::process::Command, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` within a minute ([`run_within`]); panics with its output unless it succeeded.
/// Its standard output, trimmed.
pub fn stdout_ok(cmd: &mut std::process::Command) -> String {
    let out = run_within(cmd, std::time::Duration::from_secs(60));
    assert_succeeded(cmd, &out);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `latch ca export` of the state directory `state_dir`: the node CA (PEM) that applications
/// trust for the TLS latch terminates.
pub fn export_node_ca(state_dir: &std::path::Path) -> String {
    let out = run_ok(
        std::process::Command::new(bins::latch())
            .args(["ca", "export", "--state-dir"])
            .arg(state_dir),
    );
    String::from_utf8(out.stdout).expect("a PEM is text")
}

/// Runs `cmd` to completion, but kills it (and fails the test, naming it) if it takes longer
/// than `limit`: for clients that would hang forever on the bug a test looks for.
pub fn run_within(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::{io::Read as _, process::Stdio};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A `kind: Policy` document relaying `address:port` as plain TCP.
pub fn tcp_policy(name: &str, address: &str, port: u16) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n  \
         destination:\n    address: {address}\n    port: {port}\n  protocol: tcp\n  \
         workloads: all\n"
    )
}
