//! Who may use what: workload selectors admit or deny, and every decision is audited.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins, eventually,
    pg_setup::{SCRAM_PW, Setup, stdout},
    postgres::{APP_DB, SCRAM_USER},
    servers::EchoServer,
};

fn policy(port: u16, workloads: &str) -> String {
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata: {{name: guarded}}\nspec:\n  \
         destination: {{address: 127.0.0.2, port: {port}}}\n  protocol: tcp\n  workloads:\n{workloads}"
    )
}

fn echo(cg: &TestCgroup, addr: std::net::SocketAddr, uid: Option<u32>) -> bool {
    let mut cmd = cg.command(bins::probe());
    cmd.args(["echo", &addr.to_string(), "1", "100"]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("probe").status.success()
}

#[test]
fn a_workload_the_policy_does_not_name_is_denied_and_audited() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(target.addr.port(), "    - uid: 4242\n"), &cg);

    assert!(
        !echo(&cg, target.addr, None),
        "root was admitted by a uid 4242 policy"
    );
    assert!(
        echo(&cg, target.addr, Some(4242)),
        "uid 4242 was not admitted"
    );

    let records = agent.wait_audit(2);
    let denied = &records[0];
    assert_eq!(denied["v"], 1);
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["policy"], "guarded");
    assert_eq!(denied["workload"]["uid"], 0);
    assert_eq!(denied["workload"]["comm"], "latch-probe");
    assert_eq!(denied["destination"], target.addr.to_string());
    let relayed = &records[1];
    assert_eq!(relayed["outcome"], "relayed");
    assert_eq!(relayed["workload"]["uid"], 4242);
    assert_eq!(relayed["bytes_to_target"], 100);
    assert_eq!(relayed["bytes_to_app"], 100);
    assert_eq!(
        target.accepted(),
        1,
        "the denied connection reached the target"
    );
    assert_eq!(agent.count("denied"), 1);
    assert!(
        agent
            .metrics()
            .contains("latch_connections_denied_total{policy=\"guarded\"} 1")
    );
    assert!(agent.stop().success());
}

#[test]
fn cgroup_and_executable_selectors_match_the_kernels_view() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let root = latch_tests::cgroup::v2_root();
    let rel = format!("/{}", cg.path().strip_prefix(&root).unwrap().display());
    let probe = bins::probe().canonicalize().unwrap();
    let workloads = format!(
        "    - cgroup: {rel}\n      exe: {}\n    - exe: /usr/bin/curl\n      uid: 1\n",
        probe.display()
    );
    let agent = Agent::start(&policy(target.addr.port(), &workloads), &cg);
    assert!(
        echo(&cg, target.addr, None),
        "the probe in the named cgroup was denied"
    );
    // A different executable in the same cgroup: python is not named.
    let out = cg
        .command("python3")
        .args([
            "-c",
            &format!(
                "import socket; s=socket.create_connection(('127.0.0.2',{})); s.sendall(b'x'); \
                 print(s.recv(1))",
                target.addr.port()
            ),
        ])
        .output()
        .expect("python3");
    assert!(
        !out.status.success(),
        "python was admitted by an exe selector for the probe"
    );
    let records = agent.wait_audit(2);
    assert_eq!(records[0]["outcome"], "relayed");
    assert_eq!(records[0]["workload"]["exe"], probe.display().to_string());
    assert_eq!(records[0]["workload"]["cgroup"], rel);
    assert_eq!(records[1]["outcome"], "denied");
    assert!(
        records[1]["workload"]["exe"]
            .as_str()
            .unwrap_or("")
            .contains("python"),
        "{:?}",
        records[1]
    );
    assert!(agent.stop().success());
}

#[test]
fn refusals_are_audited_too() {
    let target = EchoServer::start("127.0.0.2");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(target.addr.port(), "    - uid: 0\n"), &cg);
    let broker = agent.listener(false);
    drop(std::net::TcpStream::connect(broker).expect("connect to broker"));
    let records = agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "refused");
    assert_eq!(records[0]["destination"], broker.to_string());
    assert!(
        records[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not redirected")
    );
    assert!(agent.stop().success());
}

/// A PostgreSQL client in Python, run by whichever copy of the interpreter the test chooses:
/// `connect HOST PORT` connects and speaks the protocol; `connect-exec HOST PORT EXE` connects,
/// then execs EXE (this script, `speak-fd FD`) keeping the socket, and that process speaks the
/// protocol on the inherited socket. Prints `ADMITTED <current_user>` or
/// `ERROR <SQLSTATE> <message>`.
const PG_CLIENT: &str = r#"
import os, socket, struct, sys

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("CLOSED")
        b += c
    return b

def message(s):
    t = recvn(s, 1)
    n = struct.unpack("!I", recvn(s, 4))[0]
    return t, recvn(s, n - 4)

def error(payload):
    f = {p[:1].decode(): p[1:].decode() for p in payload.split(b"\0") if p}
    print("ERROR", f.get("C"), f.get("M"), flush=True)

def speak(s):
    db = os.environ["PGDATABASE"].encode()
    body = struct.pack("!I", 196608) + b"user\0app_without_password\0database\0" + db + b"\0\0"
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    while True:
        t, p = message(s)
        if t == b"E":
            return error(p)
        if t == b"Z":
            break
    q = b"select current_user\0"
    s.sendall(b"Q" + struct.pack("!I", len(q) + 4) + q)
    user = None
    while True:
        t, p = message(s)
        if t == b"E":
            return error(p)
        if t == b"D":
            n = struct.unpack("!I", p[2:6])[0]
            user = p[6:6 + n].decode()
        if t == b"Z":
            print("ADMITTED", user, flush=True)
            return

mode = sys.argv[1]
if mode == "connect":
    speak(socket.create_connection((sys.argv[2], int(sys.argv[3]))))
elif mode == "connect-exec":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    os.set_inheritable(s.fileno(), True)
    os.execv(sys.argv[4], [sys.argv[4], sys.argv[0], "speak-fd", str(s.fileno())])
elif mode == "speak-fd":
    speak(socket.socket(fileno=int(sys.argv[2])))
"#;

/// Copies of the Python interpreter at test-owned paths: each copy is an executable of its
/// own (another inode), whatever its bytes.
fn python_copy(dir: &TempDir, name: &str) -> PathBuf {
    let real = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    let path = dir.path().join(name);
    std::fs::copy(&real, &path).expect("copy python3");
    path.canonicalize().expect("canonical path")
}

/// Sends SIGCONT to the agent when dropped (also when the test panics while it is stopped).
struct Stopped<'a>(&'a Agent);

impl<'a> Stopped<'a> {
    fn new(agent: &'a Agent) -> Self {
        agent.signal(libc::SIGSTOP);
        Self(agent)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

fn exe_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[test]
fn a_process_that_execs_an_allowed_binary_after_connecting_is_not_admitted() {
    let bin = TempDir::new("exe");
    let allowed = python_copy(&bin, "allowed-python");
    let starter = python_copy(&bin, "starter-python");
    let script = bin.write("pg_client.py", PG_CLIENT);
    let s = Setup::new(
        SCRAM_USER,
        SCRAM_PW,
        &format!("  workloads:\n    - exe: {}\n", allowed.display()),
    );
    let host = s.pg.addr.ip().to_string();
    let port = s.pg.addr.port().to_string();
    let client = |exe: &Path, args: &[&str]| -> Command {
        let mut cmd = s.cg.command(exe);
        cmd.arg(&script).args(args).env("PGDATABASE", APP_DB);
        cmd
    };

    // The allowed binary from the start: admitted.
    let out = latch_tests::run_ok(&mut client(&allowed, &["connect", &host, &port]));
    assert_eq!(stdout(&out), format!("ADMITTED {SCRAM_USER}"));
    // Another binary: denied.
    let out = latch_tests::run_ok(&mut client(&starter, &["connect", &host, &port]));
    assert!(stdout(&out).starts_with("ERROR 28000"), "{}", stdout(&out));

    // Another binary connects, then execs the allowed one keeping the socket. The broker is
    // held (SIGSTOP) until the exec is done, as a busy node would be slow to accept: whatever
    // /proc says at accept time, the connect was made by `starter`.
    let attack = {
        let _held = Stopped::new(&s.agent);
        let child = client(
            &starter,
            &["connect-exec", &host, &port, allowed.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client");
        let pid = child.id();
        assert!(
            eventually(Duration::from_secs(10), || exe_of(pid).as_deref()
                == Some(allowed.as_path())),
            "the client never exec'd the allowed binary: {:?}",
            exe_of(pid)
        );
        child
    };
    let out = attack.wait_with_output().expect("wait for the client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("ERROR 28000"),
        "a process that exec'd the allowed binary after connecting was admitted: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("not admitted by the policy"), "{text}");

    // Records are written when connections end: find them by what they say.
    let records = s.agent.wait_audit(3);
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let by = |outcome: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["outcome"] == outcome).collect()
    };
    let relayed = by("relayed");
    assert_eq!(relayed.len(), 1, "{records:?}");
    assert_eq!(
        relayed[0]["workload"]["exe_ino"],
        ino(&allowed),
        "{records:?}"
    );
    let denied = by("denied");
    assert_eq!(denied.len(), 2, "{records:?}");
    for d in &denied {
        let reason = d["reason"].as_str().unwrap_or("");
        assert!(reason.contains("a different executable"), "{reason}");
        assert_eq!(d["workload"]["exe_ino"], ino(&starter), "{d:?}");
    }
    // The attack's record: /proc showed the allowed binary, the kernel's record did not.
    assert!(
        denied
            .iter()
            .any(|d| d["workload"]["exe"] == allowed.display().to_string()),
        "{denied:?}"
    );
    assert_eq!(s.agent.count("denied"), 2);
    assert_eq!(s.agent.count("relayed"), 1);
    s.assert_log_clean();
    assert!(s.agent.stop().success());
}

#[test]
fn without_kernel_btf_an_exe_selector_admits_nothing_and_says_why() {
    let bin = TempDir::new("exe-nobtf");
    let allowed = python_copy(&bin, "allowed-python");
    let script = bin.write("pg_client.py", PG_CLIENT);
    let no_btf = bin.path().join("no-such-btf");
    let s = Setup::with_agent_args(
        SCRAM_USER,
        SCRAM_PW,
        &format!("  workloads:\n    - exe: {}\n", allowed.display()),
        &["--kernel-btf", no_btf.to_str().unwrap()],
    );
    let log = s.agent.log();
    assert!(
        log.contains("cannot record the connecting executable") && log.contains("no-such-btf"),
        "{log}"
    );
    // The programs loaded without the reads, and still redirect.
    let out = latch_tests::run_ok(
        s.cg.command(&allowed)
            .arg(&script)
            .args(["connect", &s.pg.addr.ip().to_string()])
            .arg(s.pg.addr.port().to_string())
            .env("PGDATABASE", APP_DB),
    );
    assert!(stdout(&out).starts_with("ERROR 28000"), "{}", stdout(&out));
    let records = s.agent.wait_audit(1);
    assert_eq!(records[0]["outcome"], "denied", "{:?}", records[0]);
    let reason = records[0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("no executable recorded at connect") && reason.contains("field offsets"),
        "{reason}"
    );
    assert!(
        records[0]["workload"]["exe_unrecorded"].is_string(),
        "{:?}",
        records[0]
    );
    // /proc names the allowed binary; that decides nothing.
    assert_eq!(records[0]["workload"]["exe"], allowed.display().to_string());
    assert!(s.agent.stop().success());
}
