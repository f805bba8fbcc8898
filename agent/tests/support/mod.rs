//! Shared helpers of the `secrets_*` integration tests: policies, log capture, child processes.
#![allow(dead_code)]

pub mod fake_http;
pub mod moto;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use latch::config::{
    Credentials, Destination, Location, Policy, PortRange, Protocol, SecretRef, Target, TlsMode,
    TlsSpec,
};

pub fn secret_ref(store: &str, path: &str, field: Option<&str>) -> SecretRef {
    SecretRef {
        store: store.to_string(),
        path: path.to_string(),
        field: field.map(str::to_string),
        version: None,
        from_pod: false,
    }
}

fn policy(name: &str, credentials: Credentials, cache_ttl: Option<Duration>) -> Policy {
    Policy {
        name: name.to_string(),
        labels: Default::default(),
        annotations: Default::default(),
        source: Location::new("test.yaml", 1, 1),
        destination: Destination {
            target: Target::Host(format!("{name}.internal")),
            ports: PortRange::single(5432),
        },
        workloads: Vec::new(),
        protocol: Protocol::Postgres,
        tls: TlsSpec {
            mode: TlsMode::Disable,
            ca: None,
            server_name: None,
            client_cert: None,
            client_key: None,
        },
        app_tls: Default::default(),
        credentials: Some(credentials),
        cache_ttl,
        roles: Vec::new(),
        startup: Default::default(),
        direct: false,
        auth: Default::default(),
        server_public_key: Default::default(),
        keep_sessions: true,
        admit_all: true,
        http: Default::default(),
        pod_namespace: None,
    }
}

/// A policy reading `username` and `password` fields of `path` in `store`.
pub fn static_policy(name: &str, store: &str, path: &str, cache_ttl: Option<Duration>) -> Policy {
    policy(
        name,
        Credentials::Static {
            store: store.to_string(),
            username: Some(secret_ref(store, path, Some("username"))),
            password: Some(secret_ref(store, path, Some("password"))),
        },
        cache_ttl,
    )
}

/// A policy with explicit references.
pub fn refs_policy(
    name: &str,
    store: &str,
    username: Option<SecretRef>,
    password: Option<SecretRef>,
) -> Policy {
    policy(
        name,
        Credentials::Static {
            store: store.to_string(),
            username,
            password,
        },
        None,
    )
}

pub fn dynamic_policy(name: &str, store: &str, path: &str, cache_ttl: Option<Duration>) -> Policy {
    policy(
        name,
        Credentials::Dynamic {
            store: store.to_string(),
            path: path.to_string(),
        },
        cache_ttl,
    )
}

/// Every tracing event of the test binary, at every level, as text.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = BufWriter(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buf
    })
    .clone()
}

/// Panics when `canary` appears in the captured log lines.
pub fn assert_not_logged(canary: &str) {
    let logs = captured_logs();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(
        !text.is_empty(),
        "nothing was logged: the capture is not working"
    );
    assert!(
        !text.contains(canary),
        "a secret value reached the logs:\n{text}"
    );
}

#[derive(Clone)]
struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A child process killed (by its pid) and reaped when the guard drops, test failure included.
pub struct ProcessGuard {
    pub name: String,
    pub child: Child,
}

impl ProcessGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> ProcessGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ProcessGuard {
            name: name.to_string(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with `log`'s content if the process has exited.
    pub fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{} exited early ({status}):\n{text}", self.name);
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SIGTERM first so servers clean up, then SIGKILL.
        // SAFETY: kill(2) has no memory effects; `pid` is this guard's own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on `127.0.0.1` now, chosen below the kernel's ephemeral range
/// (net.ipv4.ip_local_port_range, 32768 and up by default), so the source port of some other
/// test's outgoing connection cannot take it between this check and the server's bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Some servers also bind the next port (Vault/OpenBao's cluster port is api + 1).
    const STEP: u32 = 4;
    let base = (std::process::id() % 600) * 20;
    (0..12_000u32)
        .map(|_| 20_000 + (base + NEXT.fetch_add(STEP, Ordering::Relaxed)) % 12_000)
        .find(|&port| TcpListener::bind(("127.0.0.1", port as u16)).is_ok())
        .expect("no free port below the ephemeral range") as u16
}

/// Waits until something accepts connections on `port`, or panics (showing `log`).
pub fn wait_for_port(guard: &mut ProcessGuard, port: u16, log: &Path, within: Duration) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        guard.assert_running(log);
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    panic!(
        "{} did not listen on 127.0.0.1:{port} within {within:?}:\n{text}",
        guard.name
    );
}

/// The path of `program` on PATH, or a panic saying which package provides it.
pub fn require_program(program: &str, package: &str) -> std::path::PathBuf {
    which(program).unwrap_or_else(|| {
        panic!("`{program}` is not installed: this test needs it (install with: {package})")
    })
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
