//! A `latch agent` process attached to a test cgroup, stopped (and checked for leftovers)
//! when the test ends.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{TempDir, TestCgroup, bins, http};

pub struct Agent {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub dir: TempDir,
    log: PathBuf,
    cgroup_id: u64,
}

impl Agent {
    /// The node CA of this agent's state directory (`latch ca export`), written to `name` in
    /// `into`.
    pub fn export_node_ca(&self, into: &crate::TempDir, name: &str) -> std::path::PathBuf {
        into.write(name, &crate::export_node_ca(&self.dir.path().join("state")))
    }

    /// Starts `latch agent` for `cgroup` with the given policy YAML; waits until ready.
    pub fn start(policy_yaml: &str, cgroup: &TestCgroup) -> Self {
        Self::start_with(policy_yaml, cgroup, Command::new(bins::latch()))
    }

    /// Like [`Agent::start`] with extra command-line arguments. A `--listen` among them
    /// replaces the default ephemeral listeners.
    pub fn start_args(policy_yaml: &str, cgroup: &TestCgroup, extra: &[&str]) -> Self {
        let mut cmd = Command::new(bins::latch());
        cmd.args(["agent"]);
        Self::spawn(policy_yaml, cgroup, cmd, extra)
    }

    /// Like [`Agent::start_args`], with `envs` set for the agent process.
    pub fn start_env(
        policy_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
        envs: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        let mut cmd = Command::new(bins::latch());
        cmd.args(["agent"]).envs(envs.iter().copied());
        Self::spawn(policy_yaml, cgroup, cmd, extra)
    }

    /// Like [`Agent::start_args`], but the agent's environment is only `PATH` and `envs`: no
    /// variable of the test's own (no AWS keys, no Vault token) reaches it.
    pub fn start_clean_env(
        policy_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(bins::latch());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["agent"])
            .envs(envs.iter().copied());
        Self::spawn(policy_yaml, cgroup, cmd, extra)
    }

    /// The agent process's environment, as the kernel has it (`/proc/PID/environ`).
    pub fn environment(&self) -> Vec<(String, String)> {
        let raw = std::fs::read(format!("/proc/{}/environ", self.pid())).expect("read environ");
        raw.split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| {
                let v = String::from_utf8_lossy(v);
                let (k, val) = v.split_once('=').unwrap_or((&v, ""));
                (k.to_owned(), val.to_owned())
            })
            .collect()
    }

    /// Like [`Agent::start_args`], with the log filter `latch_log` (the `LATCH_LOG` value).
    pub fn start_logging(
        policy_yaml: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
        latch_log: &str,
    ) -> Self {
        let mut cmd = Command::new(bins::latch());
        cmd.args(["agent"]).env("LATCH_LOG", latch_log);
        Self::spawn(policy_yaml, cgroup, cmd, extra)
    }

    /// Like [`Agent::start`], but the agent process itself runs inside `cgroup` (to show that
    /// its own outbound connections are not intercepted).
    pub fn start_inside(policy_yaml: &str, cgroup: &TestCgroup) -> Self {
        Self::start_with(policy_yaml, cgroup, cgroup.command(bins::latch()))
    }

    fn start_with(policy_yaml: &str, cgroup: &TestCgroup, mut cmd: Command) -> Self {
        cmd.arg("agent");
        Self::spawn(policy_yaml, cgroup, cmd, &[])
    }

    fn spawn(policy_yaml: &str, cgroup: &TestCgroup, mut cmd: Command, extra: &[&str]) -> Self {
        crate::require_root();
        let dir = TempDir::new("agent");
        let policy = dir.write("policy.yaml", policy_yaml);
        let log = dir.path().join("agent.log");
        // Port 0 everywhere: the agent reports what it bound in the ready file (a port picked
        // here and released could be taken by any of the parallel tests' connections).
        let ready_file = dir.path().join("ready.json");
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0", "--listen", "[::1]:0"]
        };
        // A pin directory of its own, so agents of parallel tests never take over each other.
        let own_instance = format!("test-{}", dir.path().file_name().unwrap().to_string_lossy());
        let instance: Vec<&str> = if extra.contains(&"--instance") {
            Vec::new()
        } else {
            vec!["--instance", &own_instance]
        };
        let default_log = !cmd.get_envs().any(|(k, _)| k == "LATCH_LOG");
        let child = cmd
            .arg("--policy")
            .arg(&policy)
            .arg("--cgroup")
            .arg(cgroup.path())
            .args(listen)
            .args(&instance)
            .args(extra)
            .args(["--admin", "127.0.0.1:0", "--ready-file"])
            .arg(&ready_file)
            .args(if extra.contains(&"--grace-period") {
                &[][..]
            } else {
                &["--grace-period", "3"][..]
            })
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            // The node-local CA (TLS toward applications, created on first use) in the test's
            // own directory; a `--state-dir` among `extra` wins over it.
            .env("LATCH_STATE_DIR", dir.path().join("state"))
            .envs(default_log.then_some(("LATCH_LOG", "info,latch=debug")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .expect("start latch agent");
        let mut agent = Self {
            child: Some(child),
            admin: "0.0.0.0:0".parse().unwrap(),
            dir,
            log,
            cgroup_id: cgroup.id(),
        };
        agent.wait_ready(&ready_file);
        agent
    }

    fn wait_ready(&mut self, ready_file: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.admin.port() == 0
                && let Ok(text) = std::fs::read_to_string(ready_file)
            {
                let ready: serde_json::Value = serde_json::from_str(&text).expect("ready file");
                self.admin = ready["admin"]
                    .as_str()
                    .expect("admin address")
                    .parse()
                    .unwrap();
            }
            if self.admin.port() != 0
                && let Ok((200, _)) = http::get(self.admin, "/readyz")
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "latch agent exited ({status}) before ready:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!("latch agent not ready after 20s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Replaces the policy file the way an editor saves it (write a new file, rename it over
    /// the old one); the agent notices through inotify.
    pub fn rewrite_policy(&self, yaml: &str) {
        let tmp = self.dir.write(".policy.yaml.tmp", yaml);
        std::fs::rename(&tmp, self.dir.path().join("policy.yaml")).expect("replace policy file");
    }

    /// Waits (up to 5 s) until the agent's log contains `needle` `n` times.
    pub fn wait_log(&self, needle: &str, n: usize) {
        let logged = crate::eventually(Duration::from_secs(5), || {
            self.log().matches(needle).count() >= n
        });
        assert!(
            logged,
            "agent never logged {needle:?} ({n}x):\n{}",
            self.log()
        );
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// The audit records written so far, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}"))
            })
            .collect()
    }

    /// Waits (up to 5 s) until `n` audit records exist; returns them.
    pub fn wait_audit(&self, n: usize) -> Vec<serde_json::Value> {
        crate::wait_for(Duration::from_secs(5), || {
            Some(self.audit()).filter(|r| r.len() >= n)
        })
        .unwrap_or_else(|| {
            let records = self.audit();
            panic!(
                "{} audit records, expected {n}:\n{records:#?}",
                records.len()
            )
        })
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /status as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http::get(self.admin, "/status").expect("GET /status");
        assert_eq!(code, 200, "GET /status: {body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// The eBPF part of GET /status.
    pub fn ebpf(&self) -> serde_json::Value {
        self.status()["ebpf"].clone()
    }

    /// Once every session has ended, no direct-mode state is left in the kernel maps.
    pub fn assert_direct_maps_drain(&self) {
        let drained = crate::eventually(Duration::from_secs(10), || {
            let ebpf = self.ebpf();
            ebpf["direct_entries"] == 0 && ebpf["conns_entries"] == 0
        });
        assert!(drained, "direct-mode entries left: {}", self.ebpf());
    }

    /// GET /metrics text.
    pub fn metrics(&self) -> String {
        let (code, body) = http::get(self.admin, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "GET /metrics: {body}");
        body
    }

    /// A connection counter from /status: "relayed", "refused", "failed" or "active".
    pub fn count(&self, what: &str) -> u64 {
        self.status()["connections"][what]
            .as_u64()
            .unwrap_or_else(|| panic!("no connections.{what} in status"))
    }

    /// Waits (up to 5 s) until counter `what` reaches `n`; relays are counted when they close.
    pub fn wait_count(&self, what: &str, n: u64) {
        let reached = crate::eventually(Duration::from_secs(5), || self.count(what) == n);
        assert!(
            reached,
            "connections.{what} is {}, expected {n}; agent log:\n{}",
            self.count(what),
            self.log()
        );
    }

    /// The broker's listen address for IPv4 or IPv6.
    pub fn listener(&self, ipv6: bool) -> SocketAddr {
        self.status()["listeners"]
            .as_array()
            .expect("listeners")
            .iter()
            .filter_map(|l| l.as_str()?.parse::<SocketAddr>().ok())
            .find(|a| a.is_ipv6() == ipv6)
            .expect("listener of that family")
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the child we started and have not reaped.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// kill -9: the agent gets no chance to clean up. Returns once it is reaped.
    pub fn crash(mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM/SIGINT and wait for the exit, without the leftover check (for kept links).
    pub fn signal_and_wait(self, signal: i32) -> ExitStatus {
        self.signal(signal);
        self.wait_exit()
    }

    /// Waits for the agent to exit after a signal, up to 15 s.
    pub fn wait_exit(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        reap(&mut child, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("agent did not exit within 15s:\n{}", self.log()))
    }

    /// Waits up to `within` for the agent to exit on its own (an upgrade's old agent), keeping
    /// its log and audit trail readable. `None`: still running.
    pub fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("agent running");
        let status = crate::wait_for(within, || child.try_wait().expect("wait agent"));
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM, wait for exit, then check nothing of the agent remains attached or pinned.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: kill(2) on the child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = reap(&mut child, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("agent did not stop within 15s of SIGTERM:\n{}", self.log()));
        crate::leftovers::assert_none(self.cgroup_id, None);
        status
    }
}

/// The child's exit status once it exits within `within`; otherwise it is killed, reaped, and
/// `None` returned.
fn reap(child: &mut std::process::Child, within: Duration) -> Option<ExitStatus> {
    let status = crate::wait_for(within, || child.try_wait().expect("wait agent"));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("--- latch agent log ---\n{}", self.log());
            }
        }
    }
}
