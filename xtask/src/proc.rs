//! Process helpers: running commands, guarded children (stopped by PID on drop), temp dirs,
//! free ports, and Ctrl-C handling so guards get to clean up.

use anyhow::{Context, Result, bail};
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag: the polling loops below notice it and return an error,
/// so every guard's Drop runs (children in our process group got the same SIGINT from a terminal).
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask {what}` must run as root: it installs packages and the tests/demo load eBPF \
             programs and create cgroups (try: sudo -E cargo xtask {what})"
        );
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root().join(d) }
        }
        None => root().join("target"),
    }
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn show(cmd: &Command) -> String {
    let program = cmd.get_program();
    let mut s = if std::env::var_os("CARGO").is_some_and(|c| c == program) {
        "cargo".to_string()
    } else {
        program.to_string_lossy().into_owned()
    };
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run to completion with inherited stdio; error unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    eprintln!("+ {shown}");
    let status = wait_child(
        cmd.spawn()
            .with_context(|| format!("cannot start `{shown}`"))?,
        None,
    )?;
    if !status.success() {
        bail!("`{shown}` failed: {status}");
    }
    Ok(())
}

/// Run quietly; true when it exits 0 (false also when it cannot start).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Captured stdout of a command that must succeed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wait for a child, polling so Ctrl-C and the timeout are noticed; kills it (by PID) on either.
pub fn wait_child(child: Child, timeout: Option<Duration>) -> Result<ExitStatus> {
    let mut g = Guard::new("command", child, libc::SIGTERM);
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        if let Some(status) = g.try_wait()? {
            return Ok(status);
        }
        check_interrupted()?;
        if deadline.is_some_and(|d| Instant::now() > d) {
            bail!("timed out after {:?}", timeout.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawn with stdout captured (by a reader thread, so a full pipe never blocks the child),
/// wait with a timeout, return status and stdout.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String)> {
    let shown = show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut out = child.stdout.take().expect("stdout is piped");
    let reader: JoinHandle<String> = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = wait_child(child, Some(timeout)).with_context(|| format!("`{shown}`"))?;
    let stdout = reader.join().unwrap_or_default();
    Ok((status, stdout))
}

/// A child process that is stopped by its PID when dropped: `stop_signal` first, SIGKILL after 10 s.
pub struct Guard {
    name: String,
    child: Option<Child>,
    stop_signal: libc::c_int,
}

impl Guard {
    pub fn new(name: &str, child: Child, stop_signal: libc::c_int) -> Guard {
        Guard {
            name: name.to_string(),
            child: Some(child),
            stop_signal,
        }
    }

    pub fn spawn(name: &str, cmd: &mut Command, stop_signal: libc::c_int) -> Result<Guard> {
        let shown = show(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{shown}`"))?;
        Ok(Guard::new(name, child, stop_signal))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Some(status) once the process has exited (then the guard has nothing left to stop).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} already reaped", self.name);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Error if the process has already exited (used while waiting for a server to come up).
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// Stop now (signal, wait up to 10 s, then SIGKILL); returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain kill(2) of our own, not yet reaped child, so the PID cannot have been reused.
        unsafe { libc::kill(pid, self.stop_signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: {} (pid {pid}) did not stop in 10 s, killing it",
            self.name
        );
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh directory under the system temp dir, removed (recursively) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("{prefix}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("xtask: could not remove {}: {e}", self.0.display());
        }
    }
}

/// A TCP port free on ``addr`` now, chosen below the kernel's ephemeral range
/// (net.ipv4.ip_local_port_range, 32768 and up by default), so the source port of some other
/// test's outgoing connection cannot take it between this check and the server's bind.
pub fn free_port(addr: Ipv4Addr) -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Consecutive calls get different ports even before the first is bound.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Some servers also bind the next port (Vault/OpenBao's cluster port is api + 1).
    const STEP: u32 = 4;
    let base = std::process::id() % 12_000;
    (0..12_000u32)
        .map(|_| (20_000 + (base + NEXT.fetch_add(STEP, Ordering::Relaxed)) % 12_000) as u16)
        .find(|&port| TcpListener::bind((addr, port)).is_ok())
        .with_context(|| format!("no free port below the ephemeral range on {addr}"))
}

/// True when some socket LISTENs on addr:port (read from /proc/net/tcp, without connecting:
/// a probe connection would count as a client for one-shot servers like `iperf3 -s -1`).
pub fn is_listening(addr: Ipv4Addr, port: u16) -> bool {
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(addr.octets()));
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

/// Wait until `guard`'s server listens on addr:port (error if it exits or 15 s pass).
pub fn wait_listening(guard: &mut Guard, addr: Ipv4Addr, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !is_listening(addr, port) {
        guard.ensure_running()?;
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}:{port} after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Exit code for a status (128+signal when killed, like a shell).
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The latch binary for demo/bench: `$LATCH_BIN` when set (no build), else build it with cargo.
pub fn latch_bin(release: bool) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("LATCH_BIN") {
        let bin = PathBuf::from(bin);
        println!("xtask: using LATCH_BIN={} (not building)", bin.display());
        return Ok(bin);
    }
    println!(
        "xtask: building latch{}",
        if release { " (release)" } else { "" }
    );
    let mut cmd = cargo();
    cmd.args(["build", "-p", "latch"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("latch"))
}
