//! `protocol: http` end to end: nginx from Debian checking credentials (auth_basic, a bearer
//! token, an API-key header, a query parameter, client certificates), real clients (curl,
//! Python's `requests`, a WebSocket client) inside the intercepted cgroup holding no
//! credential. latch puts the credential in; the clients never see it.
use std::{path::PathBuf, process::Command, time::Duration};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    nginx_api::{BASIC_PASSWORD, BASIC_USER, NginxApi, OK_BODY, TOKEN, policy_yaml, secrets_yaml},
    run_within,
};

/// nginx, a secrets file, an agent with policy `api` for `dest` (nginx's plain port unless
/// said otherwise), and the test cgroup.
struct Setup {
    agent: Agent,
    cg: TestCgroup,
    nginx: NginxApi,
    _secrets: TempDir,
}

impl Setup {
    fn new(extra_spec: &str) -> Setup {
        let spec = extra_spec.to_owned();
        Setup::with(move |_| spec, "", &[])
    }

    /// `spec` makes the policy's extra lines knowing nginx's ports and CA.
    fn with(
        spec: impl FnOnce(&NginxApi) -> String,
        extra_secrets: &str,
        agent_args: &[&str],
    ) -> Setup {
        let nginx = NginxApi::start("127.0.0.2");
        let spec = spec(&nginx);
        let secrets = TempDir::new("http-secrets");
        let password = if spec.contains("http:") {
            TOKEN
        } else {
            BASIC_PASSWORD
        };
        let file = secrets.write(
            "secrets.yaml",
            &secrets_yaml(BASIC_USER, password, extra_secrets),
        );
        let cg = TestCgroup::new();
        let yaml = policy_yaml(nginx.addr, &file, &spec);
        let agent = Agent::start_args(&yaml, &cg, agent_args);
        Setup {
            agent,
            cg,
            nginx,
            _secrets: secrets,
        }
    }

    /// curl inside the cgroup: (status, body, stderr).
    fn curl(&self, args: &[&str]) -> (u16, String, String) {
        curl(&mut self.cg.command(bins::tool("curl", "curl")), args)
    }

    /// The agent's log holds no credential.
    fn assert_log_clean(&self) {
        let log = self.agent.log();
        for secret in [TOKEN, BASIC_PASSWORD, "YXBpLXVzZXI6"] {
            assert!(
                !log.contains(secret),
                "a credential in the agent log:\n{log}"
            );
        }
    }
}

/// Runs curl with `args` (plus `-sS --max-time 60` and a status line at the end).
fn curl(cmd: &mut Command, args: &[&str]) -> (u16, String, String) {
    let out = run_within(
        cmd.args(["-sS", "--max-time", "60", "-w", "\n%{http_code}"])
            .args(args),
        Duration::from_secs(90),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn outside_curl(args: &[&str]) -> (u16, String, String) {
    curl(&mut Command::new(bins::tool("curl", "curl")), args)
}

#[test]
fn basic_from_username_and_password_replaces_the_applications_own() {
    let s = Setup::new("");
    let url = s.nginx.url("/basic/ok.txt");
    // nginx checks: without latch, no credential, or a wrong one, is refused.
    assert_eq!(outside_curl(&[&url]).0, 401);
    let (code, body, err) = s.curl(&[&url]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    let (code, _, err) = s.curl(&["-u", "mallory:guess", &url]);
    assert_eq!(code, 200, "the application's own Basic is replaced: {err}");
    // What reached nginx: latch's Basic, the application's other headers untouched.
    let (code, seen, _) = s.curl(&[
        "-H",
        "X-Custom: Kept As Is",
        &s.nginx.url("/seen?a=1&b=%2F"),
    ]);
    assert_eq!(code, 200);
    assert!(seen.contains("auth=[Basic YXBpLXVzZXI6"), "{seen}");
    assert!(
        seen.contains("args=[a=1&b=%2F]") && seen.contains("custom=[Kept As Is]"),
        "{seen}"
    );
    s.assert_log_clean();
}

#[test]
fn bearer_token_and_app_credentials_keep() {
    let s = Setup::new("  http: {inject: bearer}\n");
    let url = s.nginx.url("/bearer/ok.txt");
    assert_eq!(outside_curl(&[&url]).0, 401);
    let (code, body, err) = s.curl(&[&url]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    let (code, _, _) = s.curl(&["-H", "Authorization: Bearer app-own-token", &url]);
    assert_eq!(code, 200, "replaced by default");
    s.assert_log_clean();

    let keep = Setup::new("  http: {inject: bearer, appCredentials: keep}\n");
    let url = keep.nginx.url("/bearer/ok.txt");
    let (code, _, _) = keep.curl(&["-H", "Authorization: Bearer app-own-token", &url]);
    assert_eq!(
        code, 401,
        "keep: the application's own credential goes as it is"
    );
    assert_eq!(keep.curl(&[&url]).0, 200, "keep: latch's when it sent none");
}

#[test]
fn header_template_and_query_parameter() {
    let h = Setup::new("  http: {header: \"X-Api-Key: {secret}\"}\n");
    let url = h.nginx.url("/header/ok.txt");
    assert_eq!(outside_curl(&[&url]).0, 401);
    let (code, body, err) = h.curl(&["-H", "x-api-key: wrong", &url]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    h.assert_log_clean();

    let q = Setup::new("  http: {query: api_key}\n");
    let url = q.nginx.url("/query/ok.txt?x=1&api_key=wrong");
    assert_eq!(outside_curl(&[&url]).0, 401);
    let (code, body, err) = q.curl(&[&url]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    let (_, seen, _) = q.curl(&[&q.nginx.url("/seen?x=1&api_key=wrong&y=2")]);
    assert!(
        seen.contains(&format!("args=[x=1&y=2&api_key={TOKEN}]")),
        "{seen}"
    );
    q.assert_log_clean();
}

#[test]
fn tls_to_the_target_verified_with_the_policy_ca_and_host_set() {
    // The application speaks plain HTTP to nginx's plain port; latch speaks HTTPS to the TLS
    // port (targetPort), verifying api.test with the test CA.
    let s = Setup::with(
        |n| {
            format!(
                "  http: {{inject: bearer, targetPort: {}}}\n  tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
                n.tls_addr.port(),
                n.ca.ca().display()
            )
        },
        "",
        &[],
    );
    let (code, body, err) = s.curl(&[&s.nginx.url("/bearer/ok.txt")]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    let (_, seen, _) = s.curl(&[&s.nginx.url("/seen")]);
    assert!(
        seen.contains(&format!("host=[api.test:{}]", s.nginx.tls_addr.port())),
        "{seen}"
    );
    s.assert_log_clean();

    // A target whose certificate the policy's CA did not sign: 502, the class named, nothing
    // of the CA file or the credential.
    let wrong = Setup::with(
        |n| {
            format!(
                "  http: {{inject: bearer, targetPort: {}}}\n  tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
                n.tls_addr.port(),
                n.ca.other_ca().display()
            )
        },
        "",
        &[],
    );
    let (code, body, err) = wrong.curl(&["-i", &wrong.nginx.url("/bearer/ok.txt")]);
    assert_eq!(code, 502, "{body}{err}");
    assert!(
        body.contains("{\"error\":\"target_tls_failure\",\"status\":502,\"from\":\"latch\"}"),
        "{body}"
    );
    assert!(
        !body.contains("other-ca") && !body.contains(TOKEN),
        "{body}"
    );
    let audit = wrong.agent.wait_audit(1);
    assert_eq!(audit[0]["outcome"], "failed", "{audit:?}");
}

#[test]
fn client_certificate_from_the_store() {
    let nginx_ca_client = |n: &NginxApi| -> (String, String) {
        let (cert, key) = n.ca.client_cert("orders-app");
        let indent = |p: PathBuf| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        };
        (indent(cert), indent(key))
    };
    let mut pems = None;
    let s = Setup::with(
        |n| {
            pems = Some(nginx_ca_client(n));
            format!(
                "  http: {{inject: bearer, targetPort: {}}}\n  tls:\n    mode: verify-full\n    ca: {}\n    serverName: api.test\n    clientCert: {{path: client, field: cert}}\n    clientKey: {{path: client, field: key}}\n",
                n.mtls_addr.port(),
                n.ca.ca().display()
            )
        },
        "",
        &[],
    );
    let (cert, key) = pems.unwrap();
    s._secrets.write(
        "secrets.yaml",
        &secrets_yaml(
            BASIC_USER,
            TOKEN,
            &format!("client:\n  cert: |\n{cert}  key: |\n{key}"),
        ),
    );
    // Without the certificate nginx refuses (400 "No required SSL certificate was sent").
    let (code, _, _) = outside_curl(&[
        "--cacert",
        &s.nginx.ca.ca().display().to_string(),
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &format!("https://{}/", s.nginx.mtls_addr),
    ]);
    assert_eq!(code, 400);
    let (code, body, err) = s.curl(&[&s.nginx.url("/")]);
    assert_eq!(code, 200, "{body}{err}\n{}", s.agent.log());
    assert!(body.contains("CN=orders-app"), "{body}");
    s.assert_log_clean();
}

/// Runs a Python script inside the cgroup; returns its stdout (it must succeed).
fn python_in(cg: &TestCgroup, script: &str, args: &[&str]) -> String {
    let out = run_within(
        cg.command(bins::tool("python3", "python3"))
            .arg("-c")
            .arg(script)
            .args(args),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `conn=N req=M` nginx's `/conn` answered (its connection number and how many requests
/// that connection has carried), the status asserted 200.
fn conn_of(answer: (u16, String, String)) -> (String, u32) {
    let (code, body, err) = answer;
    assert_eq!(code, 200, "{body}{err}");
    let mut words = body.split_whitespace();
    let conn = words.next().unwrap_or_default().to_owned();
    let req = words
        .next()
        .and_then(|r| r.strip_prefix("req="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no req= in {body:?}"));
    (conn, req)
}

#[test]
fn target_connections_are_kept_for_the_same_workload_only() {
    let s = Setup::new("  http: {inject: bearer}\n");
    // Two curls one after the other, a connection each: the second gets the first's target
    // connection, with latch's credential in its request (/conn answers 401 without it).
    let (first, req) = conn_of(s.curl(&[&s.nginx.url("/conn?n=1")]));
    assert_eq!(req, 1);
    s.agent.wait_audit(1);
    let (second, req) = conn_of(s.curl(&[&s.nginx.url("/conn?n=2")]));
    assert_eq!((second.as_str(), req), (first.as_str(), 2), "not reused");
    // Each session's audit record has its own bytes (the same request, the same count).
    let audit = s.agent.wait_audit(2);
    let to_target: Vec<u64> = audit
        .iter()
        .map(|r| r["bytes_to_target"].as_u64().unwrap_or(0))
        .collect();
    assert!(to_target[0] > 50, "{audit:?}");
    assert_eq!(to_target[0], to_target[1], "{audit:?}");
    for r in &audit {
        assert_eq!(r["outcome"], "relayed", "{audit:?}");
        assert!(r["bytes_to_app"].as_u64().unwrap_or(0) > 50, "{audit:?}");
    }

    // Another workload (a cgroup below the test's: another cgroup id) never gets it.
    let other = s.cg.path().join("other-workload");
    std::fs::create_dir(&other).unwrap();
    let in_other = |path: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(other.join("cgroup.procs"))
            .arg(bins::tool("curl", "curl"));
        curl(&mut cmd, &[&s.nginx.url(path)])
    };
    let (theirs, req) = conn_of(in_other("/conn?n=3"));
    assert_ne!(theirs, first, "another workload got the kept connection");
    assert_eq!(req, 1);
    s.agent.wait_audit(3);
    // ... and the first workload still gets its own.
    let (again, req) = conn_of(s.curl(&[&s.nginx.url("/conn?n=4")]));
    assert_eq!((again.as_str(), req), (first.as_str(), 3));
    s.agent.wait_audit(4);
    // The other workload's second connection: its own kept one, never the first's.
    let (theirs_again, _) = conn_of(in_other("/conn?n=5"));
    assert_eq!(theirs_again, theirs);
    s.assert_log_clean();
}

#[test]
fn an_application_that_asks_for_a_close_gets_the_answer_a_server_gives_it() {
    let s = Setup::new("  http: {inject: bearer}\n");
    let head = |close: bool| {
        let mut args = vec!["-D", "-", "-o", "/dev/null"];
        if close {
            args.extend(["-H", "Connection: close"]);
        }
        let url = s.nginx.url("/conn?n=1");
        args.push(&url);
        let (code, head, err) = s.curl(&args);
        assert_eq!(code, 200, "{head}{err}");
        head.lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("connection:"))
            .map(|l| l.trim().to_owned())
            .collect::<Vec<_>>()
    };
    // latch keeps the target connection for later (it does not pass the close on), but the
    // application is answered as nginx answers a closing request: `close`, no keep-alive.
    assert_eq!(head(true), ["Connection: close"]);
    assert_eq!(head(false), ["Connection: keep-alive"]);
    s.assert_log_clean();
}

#[test]
fn a_kept_connection_the_target_closed_is_replaced() {
    // nginx closes connections idle for a second.
    let s = Setup::with(
        |n| {
            format!(
                "  http: {{inject: bearer, targetPort: {}}}\n",
                n.short_keepalive_addr.port()
            )
        },
        "",
        &[],
    );
    let (first, _) = conn_of(s.curl(&[&s.nginx.url("/conn?n=1")]));
    s.agent.wait_audit(1);
    std::thread::sleep(Duration::from_secs(2));
    let (second, req) = conn_of(s.curl(&[&s.nginx.url("/conn?n=2")]));
    assert_ne!(second, first);
    assert_eq!(req, 1);
    let audit = s.agent.wait_audit(2);
    assert_eq!(audit[1]["outcome"], "relayed", "{audit:?}");
}

#[test]
fn a_thousand_keep_alive_requests_on_one_connection_and_pipelining_in_order() {
    let s = Setup::new("  http: {inject: bearer}\n");
    let urls: Vec<String> = (1..=1000)
        .map(|i| s.nginx.url(&format!("/conn?n={i}")))
        .collect();
    let out = run_within(
        s.cg.command(bins::tool("curl", "curl"))
            .args(["-sS", "--max-time", "120", "-w", "%{num_connects}\n"])
            .args(&urls),
        Duration::from_secs(150),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        2000,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let connects: u32 = lines
        .iter()
        .skip(1)
        .step_by(2)
        .map(|l| l.parse::<u32>().unwrap())
        .sum();
    assert_eq!(connects, 1, "curl opened one connection");
    let first_conn = lines[0].split_whitespace().next().unwrap().to_owned();
    for (i, l) in lines.iter().step_by(2).enumerate() {
        // One target connection too, the requests in order.
        assert_eq!(
            *l,
            format!("{first_conn} req={} arg={}", i + 1, i + 1),
            "request {}",
            i + 1
        );
    }
    let audit = s.agent.wait_audit(1);
    assert_eq!(audit.len(), 1, "{audit:?}");

    // Three requests in one write: answered in order on one target connection.
    let script = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port))
reqs = b"".join(b"GET /conn?n=%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (i, b"Connection: close\r\n" if i == 3 else b"") for i in (1, 2, 3))
s.sendall(reqs)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode())
"#;
    let out = python_in(
        &s.cg,
        script,
        &[
            &s.nginx.addr.ip().to_string(),
            &s.nginx.addr.port().to_string(),
        ],
    );
    let bodies: Vec<&str> = out.lines().filter(|l| l.starts_with("conn=")).collect();
    assert_eq!(bodies.len(), 3, "{out}");
    // (On the target connection the first curl left kept: its request count goes on.)
    let conn = bodies[0].split_whitespace().next().unwrap();
    let (_, first) = conn_of((200, bodies[0].to_owned(), String::new()));
    for (i, b) in bodies.iter().enumerate() {
        let req = first + i as u32;
        assert_eq!(*b, format!("{conn} req={req} arg={}", i + 1), "{out}");
    }
    assert!(!out.contains(TOKEN));
    s.assert_log_clean();
}

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

fn sha256(path: &std::path::Path) -> String {
    let out = run_within(
        Command::new(bins::tool("sha256sum", "coreutils")).arg(path),
        Duration::from_secs(300),
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn large_chunked_upload_with_expect_100_continue_streams_in_bounded_memory() {
    // 256 MiB by default (two shared cores in CI); LATCH_HTTP_UPLOAD_MB=1024 for the issue's 1 GB.
    let mib: u64 = std::env::var("LATCH_HTTP_UPLOAD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let s = Setup::new("  http: {inject: bearer}\n");
    let data = TempDir::new("upload");
    let file = data.path().join("big.bin");
    let out = Command::new(bins::tool("head", "coreutils"))
        .args(["-c", &(mib << 20).to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&file).unwrap())
        .status()
        .unwrap();
    assert!(out.success());
    let before = peak_rss_kib(s.agent.pid());
    let started = std::time::Instant::now();
    let (code, _, err) = s.curl(&[
        "-v",
        "--max-time",
        "600",
        "-T",
        &file.display().to_string(),
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        &s.nginx.url("/upload/big.bin"),
    ]);
    let took = started.elapsed();
    assert_eq!(code, 201, "{err}");
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    assert!(err.contains("> Transfer-Encoding: chunked"), "{err}");
    assert_eq!(
        sha256(&s.nginx.uploaded("big.bin")),
        sha256(&file),
        "the bytes nginx stored"
    );
    let after = peak_rss_kib(s.agent.pid());
    eprintln!(
        "uploaded {mib} MiB in {took:?} ({:.0} MiB/s); agent peak RSS {before} -> {after} KiB",
        mib as f64 / took.as_secs_f64()
    );
    assert!(
        after < before + 64 * 1024,
        "the agent's peak memory grew by {} KiB for a {mib} MiB upload",
        after - before
    );
    let _ = std::fs::remove_file(s.nginx.uploaded("big.bin"));
    s.assert_log_clean();
}

/// An agent whose policy puts the bearer token into HTTP requests to `addr` (the secrets
/// directory, the intercepted cgroup, the agent: dropped in the reverse order).
fn bearer_agent(addr: std::net::SocketAddr) -> (TempDir, TestCgroup, Agent) {
    let secrets = TempDir::new("http-secrets");
    let file = secrets.write("secrets.yaml", &secrets_yaml(BASIC_USER, TOKEN, ""));
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy_yaml(addr, &file, "  http: {inject: bearer}\n"), &cg);
    (secrets, cg, agent)
}

/// A target served by a Python script on `ip:port`, once it accepts connections, and an agent
/// whose policy puts the bearer token into requests to it.
struct PyTarget {
    addr: std::net::SocketAddr,
    cg: TestCgroup,
    agent: Agent,
    _server: latch_tests::Killed,
    _secrets: TempDir,
}

impl PyTarget {
    fn start(script: &str, (ip, port): (&str, u16), what: &str) -> PyTarget {
        let server = Command::new(bins::tool("python3", "python3"))
            .arg("-c")
            .arg(script)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let server = latch_tests::Killed(server);
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        assert!(
            latch_tests::eventually(Duration::from_secs(20), || {
                std::net::TcpStream::connect(addr).is_ok()
            }),
            "{what} did not start"
        );
        let (secrets, cg, agent) = bearer_agent(addr);
        PyTarget {
            addr,
            cg,
            agent,
            _server: server,
            _secrets: secrets,
        }
    }
}

#[test]
fn websocket_upgrade_is_signed_then_relayed() {
    let ip = "127.0.0.2";
    let port = latch_tests::servers::free_port(ip);
    // An echo server (Python `websockets`) that refuses an upgrade without the token.
    let server_script = format!(
        r#"
import asyncio, sys
from websockets.asyncio.server import serve
from websockets.http11 import Response
from websockets.datastructures import Headers
def check(conn, request):
    if request.headers.get("Authorization") != "Bearer {TOKEN}":
        return conn.respond(401, "no\n")
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with serve(echo, "{ip}", {port}, process_request=check, max_size=None) as s:
        print("ready", flush=True)
        await s.serve_forever()
asyncio.run(main())
"#
    );
    let PyTarget {
        addr,
        cg,
        agent,
        _server,
        _secrets,
    } = PyTarget::start(
        &server_script,
        (ip, port),
        "the WebSocket server (python3 -m pip install websockets)",
    );
    let client = r#"
import os, sys
from websockets.sync.client import connect
from websockets.exceptions import InvalidStatus
url = sys.argv[1]
if sys.argv[2] == "direct":
    try:
        connect(url)
        print("connected without a token")
    except InvalidStatus as e:
        print("refused", e.response.status_code)
    sys.exit(0)
with connect(url, max_size=None) as ws:
    for i in range(100):
        ws.send("message %d" % i)
        assert ws.recv() == "message %d" % i
    big = os.urandom(1 << 20)
    ws.send(big)
    assert ws.recv() == big
print("echo ok")
"#;
    let url = format!("ws://{addr}/");
    let direct = run_within(
        Command::new(bins::tool("python3", "python3")).args(["-c", client, &url, "direct"]),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout).trim(),
        "refused 401"
    );
    let out = python_in(&cg, client, &[&url, "latch"]);
    assert_eq!(out.trim(), "echo ok");
    let audit = agent.wait_audit(1);
    assert!(
        audit[0]["bytes_to_target"].as_u64().unwrap() > 1 << 20,
        "{audit:?}"
    );
    assert!(!agent.log().contains(TOKEN));
}

#[test]
fn bytes_the_target_sends_with_its_101_reach_the_application_first() {
    let ip = "127.0.0.2";
    let port = latch_tests::servers::free_port(ip);
    // A server that answers an upgrade with the token by `101` and its first bytes of the new
    // protocol in the same write (hyper reads them with the response), then echoes.
    let server_script = format!(
        r#"
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("{ip}", {port})); l.listen(8)
def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(4096)
        if not d: return
        head += d
    if b"authorization: bearer {TOKEN}".lower() not in head.lower():
        c.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"); c.close(); return
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\nHELLO")
    while True:
        d = c.recv(4096)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#
    );
    let PyTarget {
        cg,
        agent,
        _server,
        _secrets,
        ..
    } = PyTarget::start(&server_script, (ip, port), "the upgrade server");
    let client = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
got = b""
while not got.endswith(b"HELLO"):
    d = s.recv(4096)
    if not d: break
    got += d
head, _, early = got.partition(b"\r\n\r\n")
print(head.split(b"\r\n")[0].decode(), early.decode())
s.sendall(b"ping")
print(s.recv(4096).decode())
"#;
    let out = python_in(&cg, client, &[ip, &port.to_string()]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["HTTP/1.1 101 Switching Protocols HELLO", "ping"],
        "{}",
        agent.log()
    );
}

#[test]
fn hostile_input_gets_clear_4xx_and_others_are_unaffected() {
    let s = Setup::with(
        |_| "  http: {inject: bearer}\n".to_owned(),
        "",
        &["--handshake-timeout", "2"],
    );
    let script = r#"
import socket, sys, time, json
host, port = sys.argv[1], int(sys.argv[2])
def ask(raw, wait=10):
    s = socket.create_connection((host, port))
    s.settimeout(wait)
    s.sendall(raw)
    data = b""
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
    except socket.timeout:
        data += b" <timeout>"
    s.close()
    return data.split(b"\r\n", 1)[0].decode(errors="replace")
r = {}
r["garbage"] = ask(b"GARBAGE\r\n\r\n")
r["bad_version"] = ask(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n")
r["header_flood"] = ask(b"GET /bearer/ok.txt HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n")
r["huge_header"] = ask(b"GET /bearer/ok.txt HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
r["cr_in_value"] = ask(b"GET /bearer/ok.txt HTTP/1.1\r\nHost: x\r\nX-Split: a\rSet-Cookie: evil=1\r\n\r\n")
r["obs_fold"] = ask(b"GET /bearer/ok.txt HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n b\r\n\r\n")
r["two_lengths"] = ask(b"POST /bearer/ok.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
r["bad_chunk"] = ask(b"POST /bearer/ok.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
# Slowloris: a head that never ends, one byte at a time.
s = socket.create_connection((host, port))
s.sendall(b"GET /bearer/ok.txt HTTP/1.1\r\nHost: x\r\n")
start = time.time()
closed = None
try:
    for i in range(40):
        s.sendall(b"X")
        time.sleep(0.25)
        s.settimeout(0.01)
        try:
            if s.recv(1024) == b"":
                closed = time.time() - start
                break
        except socket.timeout:
            pass
except (BrokenPipeError, ConnectionResetError):
    closed = time.time() - start
r["slowloris_closed_after"] = closed
r["after"] = ask(b"GET /bearer/ok.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
print(json.dumps(r))
"#;
    let ip = s.nginx.addr.ip().to_string();
    let port = s.nginx.addr.port().to_string();
    let cg = &s.cg;
    let (out, (code, body, _)) = std::thread::scope(|t| {
        let hostile = t.spawn(|| python_in(cg, script, &[&ip, &port]));
        // Someone else's request while the hostile ones run.
        std::thread::sleep(Duration::from_millis(500));
        let other = s.curl(&[&s.nginx.url("/bearer/ok.txt")]);
        (hostile.join().unwrap(), other)
    });
    assert_eq!((code, body.as_str()), (200, OK_BODY));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    for (case, want) in [
        ("garbage", "HTTP/1.1 400 Bad Request"),
        ("bad_version", "HTTP/1.1 400 Bad Request"),
        (
            "header_flood",
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
        (
            "huge_header",
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
        ("cr_in_value", "HTTP/1.1 400 Bad Request"),
        ("obs_fold", "HTTP/1.1 400 Bad Request"),
        ("two_lengths", "HTTP/1.1 400 Bad Request"),
        ("after", "HTTP/1.1 200 OK"),
    ] {
        assert_eq!(r[case], want, "{case}: {r}");
    }
    let closed = r["slowloris_closed_after"]
        .as_f64()
        .expect("slowloris never closed");
    assert!(
        closed < 6.0,
        "slowloris held the connection {closed} s: {r}"
    );
    s.assert_log_clean();
}

#[test]
fn failures_are_answered_with_their_class_and_nothing_else() {
    // Denied: the policy names another workload.
    let denied = Setup::new("  http: {inject: bearer}\n  workloads: [{uid: 4242}]\n");
    let (code, body, _) = denied.curl(&["-i", &denied.nginx.url("/bearer/ok.txt")]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("{\"error\":\"denied\",\"status\":403,\"from\":\"latch\"}"),
        "{body}"
    );

    // An application that speaks TLS to an http policy: reset, audited with the reason.
    let tls = Setup::new("  http: {inject: bearer}\n");
    let (code, _, err) = tls.curl(&["-k", &format!("https://{}/bearer/ok.txt", tls.nginx.addr)]);
    assert_eq!(code, 0, "{err}");
    let audit = tls.agent.wait_audit(1);
    assert_eq!(audit[0]["outcome"], "failed", "{audit:?}");
    assert!(
        audit[0]["reason"]
            .as_str()
            .unwrap()
            .contains("speaks TLS to an http policy"),
        "{audit:?}"
    );

    // The target is unreachable: nothing listens on the port latch dials.
    let ip = "127.0.0.2";
    let closed = latch_tests::servers::free_port(ip);
    let down = Setup::new(&format!(
        "  http: {{inject: bearer, targetPort: {closed}}}\n"
    ));
    let (code, body, _) = down.curl(&["-i", &down.nginx.url("/bearer/ok.txt")]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("\"error\":\"target_unreachable\""), "{body}");
    assert!(!body.contains(&closed.to_string()), "{body}");

    // The target accepts and never answers the TLS handshake: 504.
    let silent = std::net::TcpListener::bind((ip, 0)).unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let slow = Setup::with(
        |n| {
            format!(
                "  http: {{inject: bearer, targetPort: {silent_port}}}\n  tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
                n.ca.ca().display()
            )
        },
        "",
        &["--handshake-timeout", "2"],
    );
    let (code, body, _) = slow.curl(&["-i", &slow.nginx.url("/bearer/ok.txt")]);
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("timeout\""), "{body}");

    // The store is unreachable (OpenBao, stopped after the agent is ready): 503, nothing of
    // the store's address or the secret's path.
    let vault_port = latch_tests::servers::free_port("127.0.0.1");
    let bao =
        latch_tests::openbao::OpenBao::start(format!("127.0.0.1:{vault_port}").parse().unwrap());
    let token = TempDir::new("vault-token");
    let token_file = token.write("token", latch_tests::openbao::ROOT_TOKEN);
    let nginx = NginxApi::start(ip);
    let cg = TestCgroup::new();
    let yaml = format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: vault\nspec:\n  \
         vault:\n    address: http://127.0.0.1:{vault_port}\n    insecure: true\n    auth: {{token: {{file: {}}}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: api\nspec:\n  \
         destination: {{address: \"{ip}\", port: {}}}\n  protocol: http\n  workloads: all\n  \
         tls: {{mode: disable}}\n  credentials: {{store: vault, password: {{path: secret/api, field: token}}}}\n  \
         http: {{inject: bearer}}\n",
        token_file.display(),
        nginx.addr.port()
    );
    let agent = Agent::start(&yaml, &cg);
    bao.stop();
    let (code, body, _) = curl(
        &mut cg.command(bins::tool("curl", "curl")),
        &["-i", &nginx.url("/bearer/ok.txt")],
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"error\":\"store_unreachable\""), "{body}");
    assert!(
        !body.contains(&vault_port.to_string()) && !body.contains("secret/api"),
        "{body}"
    );
    let audit = agent.wait_audit(1);
    assert_eq!(audit[0]["outcome"], "failed", "{audit:?}");
}

#[test]
fn python_requests_behaves_the_same_through_latch_as_directly() {
    // The same calls with Python's `requests` (urllib3 underneath): directly with the token in
    // hand, and from inside the cgroup without it. Statuses, reasons, response headers (names,
    // their case, order and values; not Date/ETag/Last-Modified) and bodies must be the same.
    let s = Setup::new("  http: {inject: bearer}\n");
    let script = format!(
        r#"
import hashlib, json, sys, requests
base, mode = sys.argv[1], sys.argv[2]
s = requests.Session()
if mode == "direct":
    s.headers["Authorization"] = "Bearer {TOKEN}"
out = []
def rec(r):
    h = [(k, v) for k, v in r.headers.items() if k.lower() not in ("date", "etag", "last-modified")]
    out.append({{"status": r.status_code, "reason": r.reason, "headers": h, "body": hashlib.sha256(r.content).hexdigest()}})
rec(s.get(base + "/bearer/ok.txt"))
rec(s.get(base + "/bearer/missing.txt"))
rec(s.head(base + "/bearer/ok.txt"))
rec(s.post(base + "/bearer/ok.txt", data=b"x"))
rec(s.get(base + "/bearer/ok.txt", headers={{"Range": "bytes=0-3"}}))
rec(s.get(base + "/bearer/ok.txt", headers={{"If-None-Match": "*"}}))
def gen():
    for i in range(200):
        yield (b"%05d" % i) * 1000
rec(s.put(base + "/upload/requests-" + mode + ".bin", data=gen()))
r = s.get(base + "/upload/requests-" + mode + ".bin", stream=True)
out.append({{"streamed": hashlib.sha256(b"".join(r.iter_content(4096))).hexdigest(), "status": r.status_code}})
for i in range(20):
    rec(s.get(base + "/bearer/ok.txt", params={{"i": i}}))
# The upload's Location names the file, which has the mode in it.
print(json.dumps(out).replace("requests-" + mode, "requests-MODE"))
"#
    );
    let base = format!("http://{}", s.nginx.addr);
    let direct = run_within(
        Command::new(bins::tool("python3", "python3")).args(["-c", &script, &base, "direct"]),
        Duration::from_secs(60),
    );
    assert!(
        direct.status.success(),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );
    let direct = String::from_utf8_lossy(&direct.stdout).into_owned();
    let through = python_in(&s.cg, &script, &[&base, "latch"]);
    assert!(
        direct.contains("\"status\": 200") && direct.contains("\"status\": 201"),
        "{direct}"
    );
    assert_eq!(through, direct, "through latch vs direct");
    assert!(!through.contains(TOKEN));
    s.assert_log_clean();
}

#[test]
fn aws_sigv4_signed_by_latch_is_accepted_by_moto() {
    let ip = "127.0.0.2";
    let port = latch_tests::servers::free_port(ip);
    let dir = TempDir::new("moto");
    let moto_bin = bins::tool("moto_server", "moto[server] from PyPI (cargo xtask setup)");
    // After 4 unauthenticated setup calls moto checks every request's SigV4 signature against
    // the access keys it issued.
    let moto = Command::new(moto_bin)
        .args(["-H", ip, "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        .env("HOME", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("moto.log")).unwrap())
        .spawn()
        .expect("start moto_server");
    let _moto = latch_tests::Killed(moto);
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    assert!(
        latch_tests::eventually(Duration::from_secs(60), || std::net::TcpStream::connect(
            addr
        )
        .is_ok()),
        "moto_server did not start"
    );
    let setup = r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="latch")
key = iam.create_access_key(UserName="latch")["AccessKey"]
iam.put_user_policy(UserName="latch", PolicyName="all", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
boto3.client("s3", **kw).create_bucket(Bucket="latch-bucket")
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
    let out = run_within(
        Command::new(bins::tool("python3", "python3")).args([
            "-c",
            setup,
            &format!("http://{addr}"),
        ]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = String::from_utf8_lossy(&out.stdout).into_owned();
    let (key_id, secret) = keys.trim().split_once(' ').expect("key id and secret");
    // moto checks signatures: curl's own SigV4 with the right key id and a wrong secret is
    // refused.
    let root = format!("http://{addr}/");
    let signed_by_curl = |secret: &str| {
        outside_curl(&[
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &format!("{key_id}:{secret}"),
            &root,
        ])
        .0
    };
    assert_eq!(
        signed_by_curl("not-the-secret"),
        403,
        "moto must check signatures"
    );

    let secrets = TempDir::new("aws-secrets");
    let file = secrets.write("secrets.yaml", &secrets_yaml(key_id, secret, ""));
    let cg = TestCgroup::new();
    let agent = Agent::start(
        &policy_yaml(
            addr,
            &file,
            "  http:\n    aws: {service: s3, region: us-east-1}\n",
        ),
        &cg,
    );
    let curl_in = |args: &[&str]| curl(&mut cg.command(bins::tool("curl", "curl")), args);
    let (code, body, err) = curl_in(&[&format!("http://{addr}/")]);
    assert_eq!(
        code,
        200,
        "ListBuckets signed by latch: {body}{err}\n{}",
        agent.log()
    );
    assert!(body.contains("<Name>latch-bucket</Name>"), "{body}");
    // An upload (UNSIGNED-PAYLOAD, streamed) and the object read back.
    let data = TempDir::new("aws-object");
    let obj = data.write("obj.txt", &"latch object line\n".repeat(10_000));
    let url = format!("http://{addr}/latch-bucket/obj.txt");
    let (code, body, _) = curl_in(&["-T", &obj.display().to_string(), &url]);
    assert_eq!(code, 200, "PutObject: {body}");
    let (code, body, _) = curl_in(&[&url]);
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read_to_string(&obj).unwrap());
    assert!(!agent.log().contains(secret));
    drop(agent);

    // A service that signs the payload's hash (SQS, form-encoded): latch reads the body to sign it.
    let agent = Agent::start(
        &policy_yaml(
            addr,
            &file,
            "  http:\n    aws: {service: sqs, region: us-east-1}\n",
        ),
        &cg,
    );
    let (code, body, err) = curl(
        &mut cg.command(bins::tool("curl", "curl")),
        &[
            "-d",
            "Action=CreateQueue&QueueName=latch-q&Version=2012-11-05",
            &format!("http://{addr}/"),
        ],
    );
    assert_eq!(
        code,
        200,
        "CreateQueue signed by latch: {body}{err}\n{}",
        agent.log()
    );
    assert!(body.contains("latch-q"), "{body}");
}

#[test]
fn the_canary_credential_never_reaches_the_application_log_audit_or_metrics() {
    use std::fmt::Write as _;
    let s = Setup::new("");
    let basic = {
        // base64("api-user:basic-Canary-0c7d41") as latch sends it.
        let out = run_within(
            Command::new(bins::tool("sh", "dash")).args([
                "-c",
                &format!("printf %s '{BASIC_USER}:{BASIC_PASSWORD}' | base64 -w0"),
            ]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let hex = BASIC_PASSWORD.bytes().fold(String::new(), |mut h, b| {
        let _ = write!(h, "{b:02x}");
        h
    });
    let forms = [BASIC_PASSWORD, basic.as_str(), hex.as_str()];
    let mut seen = String::new();
    for path in [
        "/basic/ok.txt",
        "/basic/missing",
        "/bearer/ok.txt",
        "/upload/x",
    ] {
        let out = run_within(
            s.cg.command(bins::tool("curl", "curl"))
                .args(["-sS", "-i", "-v", "--max-time", "20"])
                .arg(s.nginx.url(path)),
            Duration::from_secs(30),
        );
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(seen.contains(OK_BODY), "{seen}");
    let audit = serde_json::to_string(&s.agent.wait_audit(4)).unwrap();
    for (name, text) in [
        ("the application's bytes", seen),
        ("the agent log", s.agent.log()),
        ("the audit trail", audit),
        ("the metrics", s.agent.metrics()),
    ] {
        for form in forms {
            assert!(
                !text.contains(form),
                "the canary ({form}) leaked into {name}:\n{text}"
            );
        }
    }
}

/// What Python's `ssl` sees of latch's certificate (subject CN, issuer CN, ALPN chosen when
/// offered `h2` and `http/1.1`), then a `requests` GET over the same name; `api.test`
/// resolves to 127.0.0.2 inside the script only.
const PY_INTERCEPTED: &str = r#"
import socket, ssl, sys
import requests
port, cafile, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
real = socket.getaddrinfo
socket.getaddrinfo = lambda h, *a, **k: real("127.0.0.2" if h == "api.test" else h, *a, **k)
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["h2", "http/1.1"])
with socket.create_connection(("api.test", port)) as raw:
    with ctx.wrap_socket(raw, server_hostname="api.test") as t:
        c = t.getpeercert()
        cn = lambda rdns: [v for rdn in rdns for (k, v) in rdn if k == "commonName"][0]
        print("subject=" + cn(c["subject"]), "issuer=" + cn(c["issuer"]), "alpn=" + str(t.selected_alpn_protocol()))
h2only = ssl.create_default_context(cafile=cafile)
h2only.set_alpn_protocols(["h2"])
try:
    with socket.create_connection(("api.test", port)) as raw:
        with h2only.wrap_socket(raw, server_hostname="api.test") as t:
            print("h2only=accepted:" + str(t.selected_alpn_protocol()))
except ssl.SSLError as e:
    print("h2only=refused")
r = requests.get("https://api.test:%d%s" % (port, path), verify=cafile, timeout=30)
print("requests=%d %s" % (r.status_code, r.text.strip()))
"#;

#[test]
fn https_interception_terminates_tls_for_covered_names_with_the_node_ca() {
    // The application speaks HTTPS to api.test (nginx's TLS port); latch terminates it with a
    // certificate from the node-local CA, injects the token, and re-encrypts to nginx,
    // verifying api.test with the test CA.
    let nginx = NginxApi::start("127.0.0.2");
    let secrets = TempDir::new("http-secrets");
    let file = secrets.write("secrets.yaml", &secrets_yaml(BASIC_USER, TOKEN, ""));
    let cg = TestCgroup::new();
    let spec = format!(
        "  http: {{inject: bearer, appTls: {{mode: enable}}}}\n  tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
        nginx.ca.ca().display()
    );
    let agent = Agent::start(&policy_yaml(nginx.tls_addr, &file, &spec), &cg);
    let s = Setup {
        agent,
        cg,
        nginx,
        _secrets: secrets,
    };
    let node_ca = s.agent.export_node_ca(&s._secrets, "node-ca.pem");
    let node_ca = node_ca.to_str().unwrap();
    let port = s.nginx.tls_addr.port();
    let resolve = format!("api.test:{port}:127.0.0.2");
    let url = format!("https://api.test:{port}/bearer/ok.txt");
    // nginx checks the token: directly, with its own CA and no token, 401.
    let test_ca = s.nginx.ca.ca();
    let (code, _, err) = outside_curl(&[
        "--cacert",
        test_ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 401, "{err}");

    // Through latch: curl trusts only the node CA and verifies the name api.test; it offers
    // h2 and http/1.1 in ALPN and is given h2 (tests/tests/http2.rs has more of it).
    let (code, body, err) = s.curl(&["-v", "--cacert", node_ca, "--resolve", &resolve, &url]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    assert!(
        err.contains("CN=api.test") && err.contains("latch node-local CA"),
        "the certificate curl saw: {err}"
    );
    assert!(err.contains("ALPN: server accepted h2"), "{err}");
    // Asked for http/1.1 alone, it gets http/1.1.
    let (code, body, err) = s.curl(&[
        "-v",
        "--http1.1",
        "--cacert",
        node_ca,
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    assert!(err.contains("ALPN: server accepted http/1.1"), "{err}");
    let (code, seen, err) = s.curl(&[
        "--cacert",
        node_ca,
        "--resolve",
        &resolve,
        &format!("https://api.test:{port}/seen"),
    ]);
    assert_eq!(code, 200, "{err}");
    assert!(
        seen.contains(&format!("auth=[Bearer {TOKEN}]"))
            && seen.contains(&format!("host=[api.test:{port}]")),
        "{seen}"
    );

    // Python: the certificate is for api.test, issued by the node CA; h2 is chosen in ALPN,
    // also when offered alone; requests (HTTP/1.1) gets the protected file.
    let out = python_in(
        &s.cg,
        PY_INTERCEPTED,
        &[&port.to_string(), node_ca, "/bearer/ok.txt"],
    );
    assert!(
        out.contains("subject=api.test issuer=latch node-local CA alpn=h2"),
        "{out}"
    );
    assert!(out.contains("h2only=accepted:h2"), "{out}");
    assert!(out.contains("requests=200 ok from nginx"), "{out}");

    // No SNI (an address in the URL): a certificate for the destination address.
    let (code, body, err) = s.curl(&[
        "--cacert",
        node_ca,
        &format!("https://127.0.0.2:{port}/bearer/ok.txt"),
    ]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");

    // A name the policy does not cover gets no certificate: the handshake is refused and the
    // audit record says why.
    let before = s.agent.audit().len();
    let other = format!("other.test:{port}:127.0.0.2");
    let (code, _, err) = s.curl(&[
        "-k",
        "--resolve",
        &other,
        &format!("https://other.test:{port}/bearer/ok.txt"),
    ]);
    assert_eq!(code, 0, "{err}");
    let audit = s.agent.wait_audit(before + 1);
    let refused = audit
        .iter()
        .find(|a| {
            a["reason"]
                .as_str()
                .is_some_and(|r| r.contains("\"other.test\", a name this policy does not cover"))
        })
        .unwrap_or_else(|| panic!("no audit record of the refused name: {audit:?}"));
    assert_eq!(refused["outcome"], "failed", "{refused:?}");
    s.assert_log_clean();
}

/// A `requests` session on one connection: a GET, then the password rotated in nginx's
/// htpasswd and in the store (files rewritten by the script, as an operator would), a GET, a
/// second rotation and a POST with a body, a last GET.
const PY_ROTATION: &str = r#"
import sys, time, requests
url, htpasswd, store = sys.argv[1:4]
rotations = [(sys.argv[4], sys.argv[5]), (sys.argv[6], sys.argv[7])]
def rotate(i):
    for path, text in zip((htpasswd, store), rotations[i]):
        with open(path, "w") as f:
            f.write(text)
    time.sleep(1.2)  # past latch's once-a-second limit on refreshing
s = requests.Session()
print("first=%d" % s.get(url, timeout=30).status_code)
rotate(0)
print("get_after_rotation=%d" % s.get(url, timeout=30).status_code)
rotate(1)
print("post_after_rotation=%d" % s.post(url, data=b"x" * 10, timeout=30).status_code)
print("next_get=%d" % s.get(url, timeout=30).status_code)
"#;

#[test]
fn a_401_refreshes_the_credential_and_a_get_is_retried_once_with_it() {
    let s = Setup::new("");
    let url = s.nginx.url("/basic/ok.txt");
    let htpasswd = s.nginx.dir.path().join("htpasswd");
    let store = s._secrets.path().join("secrets.yaml");
    let (pw_b, pw_c) = ("rotated-Canary-b1", "rotated-Canary-c2");
    let out = python_in(
        &s.cg,
        PY_ROTATION,
        &[
            &url,
            htpasswd.to_str().unwrap(),
            store.to_str().unwrap(),
            &format!("{BASIC_USER}:{{PLAIN}}{pw_b}\n"),
            &secrets_yaml(BASIC_USER, pw_b, ""),
            &format!("{BASIC_USER}:{{PLAIN}}{pw_c}\n"),
            &secrets_yaml(BASIC_USER, pw_c, ""),
        ],
    );
    // The GET after the rotation: nginx answered 401 to the old password; latch fetched the
    // new one and sent the GET again with it.
    assert!(out.contains("first=200\nget_after_rotation=200\n"), "{out}");
    // The POST (a body: not repeated) gets nginx's 401 as it is; the next GET on the same
    // connection carries the password fetched after that 401 and is answered at once.
    assert!(
        out.contains("post_after_rotation=401\nnext_get=200\n"),
        "{out}"
    );
    let log = s.agent.log();
    assert_eq!(
        log.matches("retrying once with refreshed ones").count(),
        2,
        "one refresh per rotation (none for the last GET):\n{log}"
    );
    for pw in [pw_b, pw_c] {
        assert!(!log.contains(pw), "a credential in the agent log:\n{log}");
    }
    s.assert_log_clean();
}

/// A target that answers the first request on each connection (keep-alive) and closes the
/// connection when the second arrives, without answering: the race of a keep-alive timeout,
/// every time. Returns its address and, per request seen, whether it carried the token.
fn closing_target() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                for answered in [false, true] {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&buf[..k]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    log.lock().unwrap().push(text.contains(&format!(
                        "authorization: bearer {}",
                        TOKEN.to_ascii_lowercase()
                    )));
                    head.clear();
                    if answered {
                        return; // closed as the second request arrives
                    }
                    let body = format!("conn={}\n", n + 1);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
    (addr, seen)
}

#[test]
fn a_get_is_retried_once_on_a_new_connection_when_the_target_closes_a_reused_one() {
    let (addr, seen) = closing_target();
    let (_secrets, cg, agent) = bearer_agent(addr);
    let url = format!("http://{addr}/a");
    // curl sends both GETs on one connection to latch (num_connects 1, then 0); latch's
    // connection to the target is reused for the second and closed under it.
    let out = run_within(
        cg.command(bins::tool("curl", "curl")).args([
            "-sS",
            "--max-time",
            "60",
            "-w",
            "[%{http_code} %{num_connects}]",
            &url,
            &url,
        ]),
        Duration::from_secs(90),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "conn=1\n[200 1]conn=2\n[200 0]",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the target saw: the first GET, the second on the reused connection (closed), the
    // second again on a new one; each with the token.
    assert_eq!(*seen.lock().unwrap(), vec![true, true, true]);
    // A POST with a body is not repeated: the application is told.
    let out = run_within(
        cg.command(bins::tool("curl", "curl")).args([
            "-sS",
            "--max-time",
            "60",
            "-w",
            "[%{http_code}]",
            &url,
            "--next",
            "-d",
            "body",
            "-w",
            "[%{http_code}]",
            &url,
        ]),
        Duration::from_secs(90),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("conn=3\n[200]")
            && text.contains("\"error\":\"target_error\"")
            && text.ends_with("[502]"),
        "{text}"
    );
    drop(agent);
}

/// A target that records the raw bytes of one request (head, chunked body and its trailer
/// section) into `record`, then answers with a chunked body carrying a trailer of its own.
const TRAILER_TARGET: &str = r#"
import socket, sys
ip, port, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(4)
print("ready", flush=True)
conn, _ = srv.accept()
data = b""
while True:
    if b"\r\n\r\n" in data:
        body = data.split(b"\r\n\r\n", 1)[1]
        # A chunked body ends with the last chunk, the trailer section and an empty line.
        if b"0\r\n" in body and body.endswith(b"\r\n\r\n"):
            break
    chunk = conn.recv(65536)
    if not chunk:
        break
    data += chunk
open(record, "wb").write(data)
conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Resp-Sum\r\n"
             b"Connection: close\r\n\r\n5\r\nworld\r\n0\r\nX-Resp-Sum: 42\r\n\r\n")
conn.close()
"#;

#[test]
fn request_and_response_trailers_pass_through_with_the_credential_injected() {
    let ip = "127.0.0.2";
    let port = latch_tests::servers::free_port(ip);
    let dir = TempDir::new("trailers");
    let record = dir.path().join("request.raw");
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let server = Command::new(bins::tool("python3", "python3"))
        .args(["-c", TRAILER_TARGET, ip, &port.to_string()])
        .arg(&record)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the trailer target");
    let mut server = latch_tests::Killed(server);
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready", "the trailer target did not start");

    let secrets = dir.write("secrets.yaml", &secrets_yaml(BASIC_USER, TOKEN, ""));
    let cg = TestCgroup::new();
    let agent = Agent::start(
        &policy_yaml(addr, &secrets, "  http: {inject: bearer}\n"),
        &cg,
    );
    let client = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"POST /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n"
          b"Trailer: X-Req-Sum\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Req-Sum: 7\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"#;
    let response = python_in(&cg, client, &[ip, &port.to_string()]);
    let request =
        String::from_utf8_lossy(&std::fs::read(&record).expect("the target got a request"))
            .into_owned();
    let lower = request.to_ascii_lowercase();
    assert!(
        lower.contains(&format!(
            "authorization: bearer {}",
            TOKEN.to_ascii_lowercase()
        )),
        "the credential was injected:\n{request}"
    );
    let (_, body) = request.split_once("\r\n\r\n").unwrap();
    assert!(
        body.ends_with("0\r\nx-req-sum: 7\r\n\r\n") || body.ends_with("0\r\nX-Req-Sum: 7\r\n\r\n"),
        "the request trailer reached the target after the body:\n{request}"
    );
    assert!(body.contains("hello"), "{request}");
    let (head, rbody) = response.split_once("\r\n\r\n").expect(&response);
    assert!(head.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        rbody.ends_with("0\r\nx-resp-sum: 42\r\n\r\n")
            || rbody.ends_with("0\r\nX-Resp-Sum: 42\r\n\r\n"),
        "the response trailer reached the application:\n{response}"
    );
    assert!(!response.contains(TOKEN));
    let audit = agent.wait_audit(1);
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(!agent.log().contains(TOKEN));
}

/// A target that answers each request head with a 200 and keeps what it received.
fn recording_target() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&buf[..k]),
                        }
                    }
                    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let _ = tx.send(String::from_utf8_lossy(&head[..end]).into_owned());
                    head.drain(..end);
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
            });
        }
    });
    (addr, rx)
}

#[test]
fn the_target_gets_the_request_fields_in_the_applications_case_and_order_with_the_credential() {
    let (addr, rx) = recording_target();
    let (_secrets, cg, _agent) = bearer_agent(addr);
    // Written by hand: field names in mixed case, an empty body's Content-Length in the
    // middle, one name twice with another between.
    let script = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"POST /a?x=1 HTTP/1.1\r\nHost: api.test\r\nX-First: 1\r\nContent-Length: 0\r\nx-lower: 2\r\nX-First: 3\r\nAccept: */*\r\n\r\n")
print(s.recv(4096))
"#;
    let out = python_in(
        &cg,
        script,
        &[&addr.ip().to_string(), &addr.port().to_string()],
    );
    assert_eq!(
        out.trim(),
        r"b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok'"
    );
    let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // Each name's case and place as sent; the values of a repeated name stay in their order
    // (hyper keeps them together, at the first one's place: fields of different names may be
    // reordered, RFC 9110 5.3); latch's credential comes last.
    assert_eq!(
        got,
        format!(
            "POST /a?x=1 HTTP/1.1\r\nHost: api.test\r\nX-First: 1\r\nX-First: 3\r\n\
             Content-Length: 0\r\nx-lower: 2\r\nAccept: */*\r\n\
             authorization: Bearer {TOKEN}\r\n\r\n"
        )
    );
}
