//! `protocol: http` with HTTP/2 applications, end to end: nginx from Debian on an h2c
//! listener (`listen ... http2`, prior knowledge) and an h2 TLS listener checking credentials;
//! curl with `--http2-prior-knowledge` and hyper's HTTP/2 client (`latch-probe h2`) inside the
//! intercepted cgroup, holding no credential; hostile HTTP/2 input from raw sockets.
use std::{net::SocketAddr, process::Command, time::Duration};

use latch_tests::{
    Agent, TempDir, TestCgroup, bins,
    nginx_api::{BASIC_PASSWORD, BASIC_USER, NginxApi, OK_BODY, TOKEN, policy_yaml, secrets_yaml},
    run_within,
};

/// nginx, a secrets file, an agent with policy `api` for the destination `dest(&nginx)`, and
/// the test cgroup.
struct Setup {
    agent: Agent,
    cg: TestCgroup,
    nginx: NginxApi,
    _secrets: TempDir,
}

impl Setup {
    /// Policy `api` for nginx's h2c listener with `spec`'s extra lines.
    fn h2c(spec: &str) -> Setup {
        let spec = spec.to_owned();
        Setup::with(|n| n.h2c_addr, move |_| spec, &[])
    }

    fn with(
        dest: impl FnOnce(&NginxApi) -> SocketAddr,
        spec: impl FnOnce(&NginxApi) -> String,
        agent_args: &[&str],
    ) -> Setup {
        let nginx = NginxApi::start("127.0.0.2");
        let spec = spec(&nginx);
        let secrets = TempDir::new("http2-secrets");
        let password = if spec.contains("http:") {
            TOKEN
        } else {
            BASIC_PASSWORD
        };
        let file = secrets.write("secrets.yaml", &secrets_yaml(BASIC_USER, password, ""));
        let cg = TestCgroup::new();
        let agent = Agent::start_args(&policy_yaml(dest(&nginx), &file, &spec), &cg, agent_args);
        Setup {
            agent,
            cg,
            nginx,
            _secrets: secrets,
        }
    }

    /// `http://<h2c listener>{path}`.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.nginx.h2c_addr)
    }

    /// curl inside the cgroup: (status, HTTP version, body, stderr).
    fn curl(&self, args: &[&str]) -> (u16, String, String, String) {
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

/// curl `--http2-prior-knowledge` with `args`: (status, HTTP version, body, stderr).
fn curl(cmd: &mut Command, args: &[&str]) -> (u16, String, String, String) {
    let out = run_within(
        cmd.args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "60",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(args),
        Duration::from_secs(90),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, version) = last.split_once(' ').unwrap_or((last, ""));
    (
        code.trim().parse().unwrap_or(0),
        version.trim().to_owned(),
        body.to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn outside_curl(args: &[&str]) -> (u16, String, String, String) {
    curl(&mut Command::new(bins::tool("curl", "curl")), args)
}

#[test]
fn h2c_prior_knowledge_gets_basic_bearer_header_and_query_credentials() {
    // Basic from a username and password, the application's own replaced.
    let s = Setup::h2c("");
    let url = s.url("/basic/ok.txt");
    let (code, version, _, err) = outside_curl(&[&url]);
    assert_eq!(
        (code, version.as_str()),
        (401, "2"),
        "nginx speaks h2c: {err}"
    );
    let (code, version, body, err) = s.curl(&[&url]);
    assert_eq!(
        (code, version.as_str(), body.as_str()),
        (200, "2", OK_BODY),
        "{err}"
    );
    let (code, _, _, err) = s.curl(&["-u", "mallory:guess", &url]);
    assert_eq!(code, 200, "the application's own Basic is replaced: {err}");
    let (code, _, seen, _) = s.curl(&["-H", "X-Custom: Kept As Is", &s.url("/seen?a=1&b=%2F")]);
    assert_eq!(code, 200);
    assert!(seen.contains("auth=[Basic YXBpLXVzZXI6"), "{seen}");
    assert!(
        seen.contains("args=[a=1&b=%2F]")
            && seen.contains("custom=[Kept As Is]")
            && seen.contains(&format!("host=[{}]", s.nginx.h2c_addr))
            && seen.contains("proto=[HTTP/2.0]"),
        "latch spoke HTTP/2 to nginx, the application's authority kept: {seen}"
    );
    s.assert_log_clean();

    // Bearer; and appCredentials: keep.
    let b = Setup::h2c("  http: {inject: bearer}\n");
    let url = b.url("/bearer/ok.txt");
    assert_eq!(outside_curl(&[&url]).0, 401);
    let (code, _, body, err) = b.curl(&["-H", "Authorization: Bearer app-own", &url]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    b.assert_log_clean();
    let keep = Setup::h2c("  http: {inject: bearer, appCredentials: keep}\n");
    let url = keep.url("/bearer/ok.txt");
    assert_eq!(
        keep.curl(&["-H", "Authorization: Bearer app-own", &url]).0,
        401,
        "keep: the application's own goes as it is"
    );
    assert_eq!(keep.curl(&[&url]).0, 200);

    // A header template, and a query parameter after the application's own.
    let h = Setup::h2c("  http: {header: \"X-Api-Key: {secret}\"}\n");
    let (code, _, body, err) = h.curl(&["-H", "x-api-key: wrong", &h.url("/header/ok.txt")]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    let q = Setup::h2c("  http: {query: api_key}\n");
    let (code, _, body, err) = q.curl(&[&q.url("/query/ok.txt?x=1&api_key=wrong")]);
    assert_eq!((code, body.as_str()), (200, OK_BODY), "{err}");
    let (_, _, seen, _) = q.curl(&[&q.url("/seen?x=1&api_key=wrong&y=2")]);
    assert!(
        seen.contains(&format!("args=[x=1&y=2&api_key={TOKEN}]")),
        "{seen}"
    );
    q.assert_log_clean();
    h.assert_log_clean();
}

/// Runs `latch-probe h2 ADDR STREAMS PATH` in `cmd`; returns its lines.
fn probe_h2(cmd: &mut Command, addr: SocketAddr, streams: usize, path: &str) -> Vec<String> {
    let out = run_within(
        cmd.args(["h2", &addr.to_string(), &streams.to_string(), path]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "latch-probe h2: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn hypers_client_multiplexes_many_streams_on_one_connection() {
    let s = Setup::h2c("  http: {inject: bearer}\n");
    let addr = s.nginx.h2c_addr;
    // Directly: nginx refuses every stream without the token.
    let direct = probe_h2(&mut Command::new(bins::probe()), addr, 20, "/conn");
    assert_eq!(direct.last().unwrap(), "done ok=0 failed=20", "{direct:?}");
    assert!(direct.iter().filter(|l| l.contains("status=401")).count() == 20);

    // Through latch: 500 streams on one connection (latch admits 100 at a time), each
    // answered for its own request, all on one target connection.
    let streams = 500;
    let lines = probe_h2(&mut s.cg.command(bins::probe()), addr, streams, "/conn");
    assert_eq!(
        lines.last().unwrap(),
        &format!("done ok={streams} failed=0"),
        "{lines:?}"
    );
    let mut conns = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for l in lines.iter().filter(|l| l.starts_with("n=")) {
        // n=<i> status=200 body=conn=<c> req=<r> arg=<i>
        let mut f = l.split_whitespace();
        let n = f.next().unwrap().strip_prefix("n=").unwrap().to_owned();
        assert_eq!(f.next(), Some("status=200"), "{l}");
        let conn = f.next().unwrap().strip_prefix("body=").unwrap().to_owned();
        let _req = f.next();
        assert_eq!(f.next(), Some(format!("arg={n}").as_str()), "{l}");
        conns.insert(conn);
        seen.insert(n);
    }
    assert_eq!(seen.len(), streams, "every stream answered once");
    assert_eq!(conns.len(), 1, "one target connection: {conns:?}");
    let audit = s.agent.wait_audit(1);
    assert_eq!(audit.len(), 1, "one application connection: {audit:?}");
    assert_eq!(audit[0]["outcome"], "relayed", "{audit:?}");
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
fn a_large_upload_over_h2_streams_in_bounded_memory_and_arrives_whole() {
    // 256 MiB by default; LATCH_HTTP_UPLOAD_MB=1024 for 1 GB.
    let mib: u64 = std::env::var("LATCH_HTTP_UPLOAD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let s = Setup::h2c("  http: {inject: bearer}\n");
    let data = TempDir::new("upload2");
    let file = data.path().join("big.bin");
    let out = Command::new(bins::tool("head", "coreutils"))
        .args(["-c", &(mib << 20).to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&file).unwrap())
        .status()
        .unwrap();
    assert!(out.success());
    let before = peak_rss_kib(s.agent.pid());
    let started = std::time::Instant::now();
    let (code, version, _, err) = s.curl(&[
        "--max-time",
        "600",
        "-T",
        &file.display().to_string(),
        &s.url("/upload/big2.bin"),
    ]);
    let took = started.elapsed();
    assert_eq!((code, version.as_str()), (201, "2"), "{err}");
    assert_eq!(
        sha256(&s.nginx.uploaded("big2.bin")),
        sha256(&file),
        "the bytes nginx stored"
    );
    let after = peak_rss_kib(s.agent.pid());
    eprintln!(
        "uploaded {mib} MiB over h2 in {took:?} ({:.0} MiB/s); agent peak RSS {before} -> {after} KiB",
        mib as f64 / took.as_secs_f64()
    );
    assert!(
        after < before + 64 * 1024,
        "the agent's peak memory grew by {} KiB for a {mib} MiB upload",
        after - before
    );
    let _ = std::fs::remove_file(s.nginx.uploaded("big2.bin"));
    let audit = s.agent.wait_audit(1);
    assert!(
        audit[0]["bytes_to_target"].as_u64().unwrap() > mib << 20,
        "{audit:?}"
    );
    s.assert_log_clean();
}

/// Raw HTTP/2 from Python: frames written by hand (HPACK literals, no Huffman), the server's
/// frames read back.
const PY_HOSTILE: &str = r#"
import socket, struct, sys, json, time
host, port = sys.argv[1], int(sys.argv[2])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload
def hint(n, prefix):
    limit = (1 << prefix) - 1
    if n < limit:
        return bytes([n])
    out, n = [limit], n - limit
    while n >= 128:
        out.append((n & 127) | 128); n >>= 7
    out.append(n)
    return bytes(out)
def lit(name_index, value):
    return bytes([name_index]) + hint(len(value), 7) + value
def lit_new(name, value):
    return b"\x00" + hint(len(name), 7) + name + hint(len(value), 7) + value
def get(path, extra=b""):
    # :method GET, :scheme http, :path, :authority
    return b"\x82\x86" + lit(4, path) + lit(1, b"api") + extra
def read_frames(s, until_close=True, wait=10):
    s.settimeout(wait)
    buf, frames = b"", []
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
            buf += c
            while len(buf) >= 9:
                n = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + n:
                    break
                t, fl, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7fffffff
                frames.append((t, fl, sid, buf[9:9 + n]))
                buf = buf[9 + n:]
    except socket.timeout:
        frames.append(("timeout",))
    except ConnectionResetError:
        frames.append(("reset",))
    return frames
def open_h2():
    s = socket.create_connection((host, port))
    s.sendall(PREFACE + frame(4, 0, 0))
    # The server's SETTINGS first: acknowledge it.
    s.settimeout(10)
    head = s.recv(9)
    n = int.from_bytes(head[:3], "big")
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    assert head[3] == 4, head
    settings = {int.from_bytes(body[i:i+2], "big"): int.from_bytes(body[i+2:i+6], "big") for i in range(0, n, 6)}
    s.sendall(frame(4, 1, 0))
    return s, settings
def goaway(frames):
    g = [f for f in frames if f[0] == 7]
    return int.from_bytes(g[0][3][4:8], "big") if g else None
r = {}
if sys.argv[3:] == ["idle"]:
    # The preface and SETTINGS, then nothing: latch's handshake timeout ends it.
    s, _ = open_h2()
    start = time.time()
    f = read_frames(s, wait=30)
    print(json.dumps({"goaway": goaway(f), "closed": f[-1] != ("timeout",), "after": time.time() - start}))
    sys.exit(0)
# Garbage after the preface: a GOAWAY naming a protocol error, then the connection closes.
s = socket.create_connection((host, port))
s.sendall(PREFACE + b"\x00\x00\x04\x99garbage-garbage-garbage")
f = read_frames(s)
r["garbage_goaway"] = goaway(f)
r["garbage_closed"] = f[-1] != ("timeout",)
# A stream flood: 300 requests at once on one connection.
s, settings = open_h2()
r["max_concurrent_streams"] = settings.get(3)
r["initial_window"] = settings.get(4)
r["max_header_list"] = settings.get(6)
s.sendall(b"".join(frame(1, 5, 2 * i + 1, get(b"/conn?n=%d" % i)) for i in range(300)))
f = read_frames(s, wait=5)
heads = {x[2] for x in f if x[0] == 1}
refused = {x[2] for x in f if x[0] == 3 and int.from_bytes(x[3], "big") == 7}
r["flood_answered"] = len(heads)
r["flood_refused"] = len(refused)
r["flood_ok"] = sum(1 for x in f if x[0] == 1 and x[3][:1] == b"\x88")
r["flood_goaway"] = goaway(f)
s.close()
# A header list over the limit (90 KB in HEADERS and CONTINUATION frames), then a request
# within the limits on the same connection.
s, _ = open_h2()
block = get(b"/bearer/ok.txt", lit_new(b"x-big", b"a" * 15000) * 6)
parts = [block[i:i + 16384] for i in range(0, len(block), 16384)]
frames = [frame(1, 1, 1, parts[0])] + [frame(9, 4 if i == len(parts) - 1 else 0, 1, p) for i, p in enumerate(parts[1:], 1)]
s.sendall(b"".join(frames) + frame(1, 5, 3, get(b"/bearer/ok.txt")))
f = read_frames(s, wait=5)
# :status 431 is not in HPACK's static table: a literal (name index 8), value Huffman-coded
# ("431" -> 0x69 0x86 0x7f... is h2's encoding; any status but 200 will do here).
r["big_headers_stream1"] = [(x[0], x[3][:2].hex() if x[0] == 1 else int.from_bytes(x[3][:4], "big")) for x in f if len(x) == 4 and x[2] == 1]
r["big_headers_then"] = [x[3][:1].hex() for x in f if x[0] == 1 and x[2] == 3]
r["big_headers_goaway"] = goaway(f)
s.close()
# Rapid reset: HEADERS then RST_STREAM, 500 times.
s, _ = open_h2()
s.sendall(b"".join(frame(1, 5, 2 * i + 1, get(b"/bearer/ok.txt")) + frame(3, 0, 2 * i + 1, struct.pack(">I", 8)) for i in range(500)))
f = read_frames(s, wait=5)
r["rapid_reset_goaway"] = goaway(f)
s.close()
print(json.dumps(r))
"#;

#[test]
fn hostile_h2_input_gets_a_clean_error_and_others_are_unaffected() {
    let s = Setup::h2c("  http: {inject: bearer}\n");
    let ip = s.nginx.h2c_addr.ip().to_string();
    let port = s.nginx.h2c_addr.port().to_string();
    let cg = &s.cg;
    let before = peak_rss_kib(s.agent.pid());
    let (out, others) = std::thread::scope(|t| {
        let hostile = t.spawn(|| {
            let out = run_within(
                cg.command(bins::tool("python3", "python3"))
                    .arg("-c")
                    .arg(PY_HOSTILE)
                    .args([&ip, &port]),
                Duration::from_secs(120),
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        // Someone else's requests, on their own connections, while the hostile ones run.
        let mut others = Vec::new();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(300));
            others.push(s.curl(&[&s.url("/bearer/ok.txt")]));
        }
        (hostile.join().unwrap(), others)
    });
    for (code, version, body, err) in &others {
        assert_eq!(
            (*code, version.as_str(), body.as_str()),
            (200, "2", OK_BODY),
            "{err}"
        );
    }
    eprintln!("{out}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // The bytes after the preface read as a frame of 6.7 MB: FRAME_SIZE_ERROR.
    assert_eq!(r["garbage_goaway"], 6, "GOAWAY FRAME_SIZE_ERROR: {r}");
    assert_eq!(r["garbage_closed"], true, "{r}");
    assert_eq!(r["max_concurrent_streams"], 100, "{r}");
    assert_eq!(r["max_header_list"], 64 * 1024, "{r}");
    let (answered, refused) = (
        r["flood_answered"].as_u64().unwrap(),
        r["flood_refused"].as_u64().unwrap(),
    );
    assert!(
        answered <= 100 && refused >= 200 && answered + refused == 300,
        "streams over the limit refused (REFUSED_STREAM): {r}"
    );
    assert_eq!(
        r["flood_ok"].as_u64(),
        Some(answered),
        "the admitted streams answered 200: {r}"
    );
    assert_eq!(r["flood_goaway"], serde_json::Value::Null, "{r}");
    // Too many header bytes: 431 for that stream; the next one on the connection is served.
    let first = r["big_headers_stream1"].to_string();
    assert!(
        first.starts_with("[[1,\"") && !first.starts_with("[[1,\"88"),
        "a response other than 200 to the oversized stream: {r}"
    );
    assert_eq!(r["big_headers_then"], serde_json::json!(["88"]), "200: {r}");
    assert_eq!(r["big_headers_goaway"], serde_json::Value::Null, "{r}");
    // Streams opened and reset at once, 500 times: GOAWAY ENHANCE_YOUR_CALM.
    assert_eq!(r["rapid_reset_goaway"], 11, "{r}");
    let after = peak_rss_kib(s.agent.pid());
    assert!(
        after < before + 64 * 1024,
        "the agent's peak memory grew by {} KiB",
        after - before
    );
    s.assert_log_clean();
}

#[test]
fn tls_targets_get_h2_when_they_offer_it_and_http_1_1_when_not() {
    // The application speaks h2c to nginx's plain h2c address; latch speaks HTTPS to
    // nginx's h2 TLS port (targetPort), verifying api.test, and agrees on h2 in ALPN.
    let tls_spec = |port: u16, n: &NginxApi| {
        format!(
            "  http: {{inject: bearer, targetPort: {port}}}\n  tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
            n.ca.ca().display()
        )
    };
    let s = Setup::with(|n| n.h2c_addr, |n| tls_spec(n.h2_tls_addr.port(), n), &[]);
    let (code, version, body, err) = s.curl(&[&s.url("/bearer/ok.txt")]);
    assert_eq!(
        (code, version.as_str(), body.as_str()),
        (200, "2", OK_BODY),
        "{err}"
    );
    let (_, _, seen, _) = s.curl(&[&s.url("/seen")]);
    assert!(
        seen.contains("proto=[HTTP/2.0]")
            && seen.contains(&format!("host=[api.test:{}]", s.nginx.h2_tls_addr.port())),
        "{seen}"
    );
    let lines = probe_h2(
        &mut s.cg.command(bins::probe()),
        s.nginx.h2c_addr,
        200,
        "/conn",
    );
    assert_eq!(lines.last().unwrap(), "done ok=200 failed=0", "{lines:?}");
    s.assert_log_clean();

    // A TLS target that speaks only HTTP/1.1: the streams go as HTTP/1.1 requests, on a few
    // connections.
    let h1 = Setup::with(|n| n.h2c_addr, |n| tls_spec(n.tls_addr.port(), n), &[]);
    let (code, version, body, err) = h1.curl(&[&h1.url("/bearer/ok.txt")]);
    assert_eq!(
        (code, version.as_str(), body.as_str()),
        (200, "2", OK_BODY),
        "{err}"
    );
    let (_, _, seen, _) = h1.curl(&[&h1.url("/seen")]);
    assert!(seen.contains("proto=[HTTP/1.1]"), "{seen}");
    let lines = probe_h2(
        &mut h1.cg.command(bins::probe()),
        h1.nginx.h2c_addr,
        200,
        "/conn",
    );
    assert_eq!(lines.last().unwrap(), "done ok=200 failed=0", "{lines:?}");
    let conns: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter(|l| l.starts_with("n="))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert!(
        (1..=8).contains(&conns.len()),
        "at most 8 HTTP/1.1 target connections: {conns:?}"
    );
    h1.assert_log_clean();
}

#[test]
fn failures_over_h2_are_the_same_json_responses() {
    // Denied: 403 with the JSON body, over HTTP/2.
    let denied = Setup::h2c("  http: {inject: bearer}\n  workloads: [{uid: 4242}]\n");
    let (code, version, body, err) = denied.curl(&[&denied.url("/bearer/ok.txt")]);
    assert_eq!((code, version.as_str()), (403, "2"), "{err}");
    assert_eq!(
        body,
        "{\"error\":\"denied\",\"status\":403,\"from\":\"latch\"}\n"
    );

    // An application that sends the preface and no request: GOAWAY (NO_ERROR) after the
    // handshake timeout, and the connection closed.
    let idle = Setup::with(
        |n| n.h2c_addr,
        |_| "  http: {inject: bearer}\n".to_owned(),
        &["--handshake-timeout", "2"],
    );
    let out = run_within(
        idle.cg
            .command(bins::tool("python3", "python3"))
            .arg("-c")
            .arg(PY_HOSTILE)
            .args([
                &idle.nginx.h2c_addr.ip().to_string(),
                &idle.nginx.h2c_addr.port().to_string(),
                "idle",
            ]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        (&r["goaway"], &r["closed"]),
        (&serde_json::json!(0), &serde_json::json!(true)),
        "{r}"
    );
    assert!(r["after"].as_f64().unwrap() < 6.0, "{r}");

    // A target that refuses connections: 502 target_unreachable.
    let gone = Setup::with(
        |n| n.h2c_addr,
        |_| {
            let port = latch_tests::servers::free_port("127.0.0.2");
            format!("  http: {{inject: bearer, targetPort: {port}}}\n")
        },
        &[],
    );
    let (code, version, body, err) = gone.curl(&["-i", &gone.url("/bearer/ok.txt")]);
    assert_eq!((code, version.as_str()), (502, "2"), "{err}");
    assert!(
        body.contains("{\"error\":\"target_unreachable\",\"status\":502,\"from\":\"latch\"}"),
        "{body}"
    );
    assert!(
        !body.to_ascii_lowercase().contains("connection:"),
        "no Connection header over h2: {body}"
    );
}

#[test]
fn intercepted_https_with_alpn_h2_is_served_as_http2_both_ways() {
    // The application speaks HTTPS to api.test (nginx's h2 TLS port) and offers h2; latch
    // terminates it with the node CA, agrees on h2, injects the token, and speaks h2 over
    // verified TLS to nginx.
    let s = Setup::with(
        |n| n.h2_tls_addr,
        |n| {
            format!(
                "  http: {{inject: bearer, appTls: {{mode: enable}}}}\n  tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
                n.ca.ca().display()
            )
        },
        &[],
    );
    let node_ca = s.agent.export_node_ca(&s._secrets, "node-ca.pem");
    let node_ca = node_ca.to_str().unwrap();
    let port = s.nginx.h2_tls_addr.port();
    let resolve = format!("api.test:{port}:127.0.0.2");
    let url = |p: &str| format!("https://api.test:{port}{p}");
    let test_ca = s.nginx.ca.ca();
    let (code, version, _, err) = outside_curl(&[
        "--cacert",
        test_ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url("/bearer/ok.txt"),
    ]);
    assert_eq!((code, version.as_str()), (401, "2"), "{err}");
    let (code, version, body, err) = s.curl(&[
        "-v",
        "--cacert",
        node_ca,
        "--resolve",
        &resolve,
        &url("/bearer/ok.txt"),
    ]);
    assert_eq!(
        (code, version.as_str(), body.as_str()),
        (200, "2", OK_BODY),
        "{err}"
    );
    assert!(err.contains("ALPN: server accepted h2"), "{err}");
    assert!(err.contains("latch node-local CA"), "{err}");
    let (_, _, seen, _) = s.curl(&["--cacert", node_ca, "--resolve", &resolve, &url("/seen")]);
    assert!(
        seen.contains(&format!("auth=[Bearer {TOKEN}]")) && seen.contains("proto=[HTTP/2.0]"),
        "{seen}"
    );
    s.assert_log_clean();
}

#[test]
fn aws_sigv4_signed_by_latch_over_h2_is_accepted_by_moto() {
    use latch_tests::moto::{Moto, xml_text};
    // moto speaks HTTP/1.1 only: nginx in front of it takes HTTP/2 with prior knowledge and
    // passes each request on with the `:authority` latch signed as its Host.
    let moto = Moto::start();
    let front = latch_tests::nginx_api::H2cFront::start(
        "127.0.0.2",
        format!("127.0.0.1:{}", moto.port).parse().unwrap(),
    );
    moto.query(
        "iam",
        "2010-05-08",
        &[("Action", "CreateUser"), ("UserName", "latch-h2")],
    );
    let key = moto.query(
        "iam",
        "2010-05-08",
        &[("Action", "CreateAccessKey"), ("UserName", "latch-h2")],
    );
    let (key_id, secret) = (
        xml_text(&key, "AccessKeyId"),
        xml_text(&key, "SecretAccessKey"),
    );
    moto.check_signatures();
    // Signatures are checked through the front: curl's own SigV4 with a wrong secret is refused.
    let url = format!("http://{}/", front.addr);
    let signed_by_curl = |secret: &str| {
        outside_curl(&[
            "--aws-sigv4",
            "aws:amz:us-east-1:sts",
            "--user",
            &format!("{key_id}:{secret}"),
            "-d",
            "Action=GetCallerIdentity&Version=2011-06-15",
            &url,
        ])
    };
    let (code, version, body, _) = signed_by_curl("not-the-secret");
    assert_eq!(
        (code, version.as_str()),
        (403, "2"),
        "moto must check signatures: {body}"
    );
    let (code, _, body, _) = signed_by_curl(&secret);
    assert_eq!(code, 200, "the front passes a good signature on: {body}");

    let secrets = TempDir::new("aws-h2-secrets");
    let file = secrets.write("secrets.yaml", &secrets_yaml(&key_id, &secret, ""));
    let cg = TestCgroup::new();
    let agent = Agent::start(
        &policy_yaml(
            front.addr,
            &file,
            "  http:\n    aws: {service: sts, region: us-east-1}\n",
        ),
        &cg,
    );
    let curl_in = |args: &[&str]| curl(&mut cg.command(bins::tool("curl", "curl")), args);
    // A POST whose form body latch reads to sign its hash. (moto refuses STS's GET form even
    // when curl signs it itself, so the query API's GET is not tried.)
    let (code, version, body, err) =
        curl_in(&["-d", "Action=GetCallerIdentity&Version=2011-06-15", &url]);
    assert_eq!(
        (code, version.as_str()),
        (200, "2"),
        "GetCallerIdentity over h2 signed by latch: {body}{err}\n{}",
        agent.log()
    );
    assert!(
        body.contains("user/latch-h2"),
        "moto named the caller: {body}"
    );
    assert!(!agent.log().contains(&secret));
    let audit = agent.wait_audit(1);
    assert!(
        audit.iter().all(|r| !r.to_string().contains(&secret)),
        "{audit:?}"
    );
}
