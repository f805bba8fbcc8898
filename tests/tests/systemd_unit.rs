//! deploy/latch.service starts the agent.
//!
//! These machines do not run systemd as PID 1 (no Docker, no VM init), so `systemctl start`
//! cannot be tested here. What is tested, for real:
//! 1. `systemd-analyze verify` accepts the unit (only the binary path is changed, to the
//!    binary under test);
//! 2. the unit's exact `ExecStart=` argument list — with its paths pointed at a temporary policy
//!    directory and log directory, the admin port made free, and `--cgroup`/`--listen` added so
//!    the test never attaches to the cgroup root — runs under the unit's process sandbox as far
//!    as it exists without systemd: `CapabilityBoundingSet`, `AmbientCapabilities`,
//!    `SecureBits=noroot-locked`, `NoNewPrivileges`, `LimitNOFILE`, `LimitMEMLOCK` (via
//!    setpriv and prlimit). It must become ready, broker, reload on `ExecReload`'s SIGHUP, and
//!    stop cleanly on SIGTERM.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use latch_tests::{
    TempDir, TestCgroup, bins, http, leftovers, servers::EchoServer, servers::free_port, tcp_policy,
};

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/latch.service")
}

/// Every value of `key=` in the unit (in order).
fn directive(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// Capability numbers (linux/capability.h) of the names the unit uses.
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_SETPCAP" => 8,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_IPC_LOCK" => 14,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("the unit names {other}: add it to cap_bit"),
    }
}

fn pid1_is_systemd() -> bool {
    std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    eprintln!(
        "PID 1 is {}systemd: {}",
        if pid1_is_systemd() { "" } else { "not " },
        if pid1_is_systemd() {
            "verify only; the ExecStart test covers the rest"
        } else {
            "systemctl cannot start units here"
        }
    );
    let analyze = bins::tool("systemd-analyze", "the Debian package systemd");
    let unit = std::fs::read_to_string(unit_path()).expect("read deploy/latch.service");
    let dir = TempDir::new("unit");
    let copy = dir.write(
        "latch.service",
        &unit.replace("/usr/bin/latch", &bins::latch().display().to_string()),
    );
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{err}"
    );
    assert!(
        !err.contains("latch.service"),
        "systemd-analyze verify complained about the unit:\n{err}"
    );
}

struct Started {
    child: Option<Child>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn the_units_exec_start_runs_the_agent_under_the_units_capabilities() {
    let unit = std::fs::read_to_string(unit_path()).expect("read deploy/latch.service");
    let exec = directive(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart expected");
    let mut argv: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert_eq!(argv[0], "/usr/bin/latch");
    assert_eq!(
        directive(&unit, "ExecReload"),
        ["/usr/bin/latch upgrade --pid $MAINPID"],
        "reload is an upgrade (tests/tests/upgrade.rs)"
    );

    let target = EchoServer::start("127.0.0.2");
    let etc = TempDir::new("unit-etc");
    etc.write(
        "web.yaml",
        &tcp_policy("web", "127.0.0.2", target.addr.port()),
    );
    let logs = TempDir::new("unit-logs");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    argv[0] = bins::latch().display().to_string();
    // The unit intercepts the whole host (`--cgroup /`); the test, a cgroup of its own.
    let cg = TestCgroup::new();
    for arg in argv.iter_mut() {
        *arg = match arg.as_str() {
            "/" => cg.path().display().to_string(),
            "/etc/latch/" => format!("{}/", etc.path().display()),
            "/var/log/latch/audit.jsonl" => logs.path().join("audit.jsonl").display().to_string(),
            "127.0.0.1:952" => admin.to_string(),
            other => other.to_owned(),
        };
    }
    assert!(
        argv.iter().any(|a| *a == cg.path().display().to_string()),
        "the unit's ExecStart names no --cgroup: {argv:?}"
    );
    // The broker listens on the unit's (the agent's) default ports: below 1024, so the unit
    // must grant CAP_NET_BIND_SERVICE.

    // The unit's sandbox, as far as it exists outside systemd. A capability this test process
    // lacks itself (a sandbox without CAP_SYS_RESOURCE) cannot be granted; it is named.
    let own = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let caps = |key: &str| -> String {
        let list = directive(&unit, key);
        assert_eq!(list.len(), 1, "{key}");
        list[0]
            .split_whitespace()
            .filter(|c| {
                let bit = cap_bit(c);
                let have = own & (1 << bit) != 0;
                if !have {
                    eprintln!("{key}: {c} left out: this test process does not hold it");
                }
                have
            })
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let bounding = caps("CapabilityBoundingSet");
    let ambient = caps("AmbientCapabilities");
    assert_eq!(directive(&unit, "NoNewPrivileges"), ["yes"]);
    assert_eq!(directive(&unit, "SecureBits"), ["noroot-locked"]);
    let unit_nofile: u64 = directive(&unit, "LimitNOFILE")[0].parse().unwrap();
    // Raising the hard limit needs CAP_SYS_RESOURCE, which a test sandbox may lack: then the
    // unit's value is capped at what this process may grant.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let nofile = &unit_nofile.min(hard).to_string();
    if unit_nofile > hard {
        eprintln!("LimitNOFILE={unit_nofile} capped at this sandbox's hard limit {hard}");
    }
    assert_eq!(directive(&unit, "LimitMEMLOCK"), ["infinity"]);
    let (_, memlock_hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
            .expect("getrlimit");
    let memlock = if memlock_hard == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        eprintln!("LimitMEMLOCK=infinity capped at this sandbox's hard limit {memlock_hard}");
        memlock_hard.to_string()
    };
    let log = logs.path().join("stderr.log");
    let mut cmd = Command::new(bins::tool("prlimit", "the Debian package util-linux"));
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg(format!("--memlock={memlock}:{memlock}"))
        .arg(bins::tool("setpriv", "the Debian package util-linux"))
        .arg(format!("--bounding-set=-all,{bounding}"))
        .arg(format!("--inh-caps=-all,{ambient}"))
        .arg(format!("--ambient-caps=-all,{ambient}"))
        .arg("--securebits=+noroot,+noroot_locked")
        .arg("--no-new-privs")
        .arg("--")
        .args(&argv)
        .env("LATCH_LOG", "info")
        // The unit's state directory is the default /var/lib/latch; this test runs outside the
        // package and keeps the agent's state (its upgrade socket) in its own directory.
        .env("LATCH_STATE_DIR", logs.path().join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let child = cmd.spawn().expect("start the ExecStart command line");
    let pid = child.id();
    let mut agent = Started { child: Some(child) };
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http::get(admin, "/readyz") {
            break;
        }
        if let Some(st) = agent.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the agent exited ({st}) before ready:\n{}", stderr());
        }
        assert!(Instant::now() < deadline, "not ready:\n{}", stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The unit's capabilities let the connect hooks read the connecting executable (`exe`).
    assert!(
        !stderr().contains("cannot record the connecting executable"),
        "{}",
        stderr()
    );
    // prlimit and setpriv exec, so the PID is the agent's.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // After attaching, the agent drops to NET_ADMIN | IPC_LOCK | SYS_PTRACE | SYS_ADMIN
    // (setns into pods' and containers' network namespaces) | NET_BIND_SERVICE (the default
    // broker port, below 1024, in namespaces prepared later).
    let want = (1u64 << 10) | (1 << 12) | (1 << 14) | (1 << 19) | (1 << 21);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .unwrap();
        if eff == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CapEff {eff:#x}, expected {want:#x}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(nofile)),
        "{limits}"
    );

    let out = cg
        .command(bins::probe())
        .args(["echo", &target.addr.to_string(), "10", "1000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "brokering: {out:?}\n{}", stderr());

    // `systemctl kill -s HUP`: the policy files are read again.
    etc.write(
        "web.yaml",
        &tcp_policy("web2", "127.0.0.2", target.addr.port()),
    );
    // SAFETY: kill(2) on the agent we started.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stderr().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let audit = std::fs::read_to_string(logs.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 10, "audit log in the LogsDirectory");

    // SAFETY: kill(2) on the agent we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let mut child = agent.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not stop on SIGTERM:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "exit {st}:\n{}", stderr());
    leftovers::assert_none(cg.id(), None);
}
