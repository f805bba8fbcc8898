//! `protocol: http` with a real HTTP/2 application: gRPC (PyPI `grpcio`, C-core's own HTTP/2
//! stack on both ends) in cleartext with prior knowledge (an insecure channel), and over TLS
//! that latch intercepts (`appTls: enable`, the node CA; `h2` in ALPN on both legs). The
//! server on loopback admits a call only with `authorization: Bearer <token>` from latch's store;
//! the client inside the intercepted cgroup holds no token. Unary, server-streaming and
//! bidirectional calls, custom trailing metadata next to `grpc-status` (HTTP/2 trailers,
//! which nginx never sends), error statuses with their details, cancellation, and no trace of
//! the token in anything the client receives or in latch's log. curl (nghttp2) then compares
//! the response headers and trailers through latch with the server's own, byte for byte.
//!
//! Handlers are generic (`grpc.method_handlers_generic_handler` on raw bytes): no generated
//! code, no protobuf.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use latch_tests::{
    Agent, Killed, TempDir, TestCgroup, bins,
    certs::TestCa,
    nginx_api::{BASIC_USER, TOKEN, policy_yaml, secrets_yaml},
    run_within,
};

/// The gRPC server: `argv` = ip, port, token, record file, and for TLS the certificate and
/// key files; `GRPC_ARGS` in the environment: more server options, `name=integer ...`. Service `latch.test.Echo`:
/// - `Say` (unary): answers `said:<request>` with initial metadata `x-initial`, trailing
///   metadata `x-checksum` (sha256 of the request), `x-count`, a binary `x-digest-bin` and
///   `x-tag` twice;
///   a request `big:<n>` is answered with `n` bytes; `meta` answers the client's own
///   `x-request-id` and `x-blob-bin` (hex) as it received them.
/// - `Count` (server streaming): request `<n>` or `<n>:fail`: messages `msg <i>` for i < n,
///   trailing `x-checksum` over all of them and `x-sent`; with `:fail`, ABORTED after them.
/// - `Fail` (unary): FAILED_PRECONDITION with a details message of its own (non-ASCII and
///   percent signs, which `grpc-message` percent-encodes) and trailing `x-reason`: a
///   trailers-only response (no message).
/// - `Chat` (bidirectional): each message answered `echo:<message>` at once.
/// - `Forever` (server streaming): `tick <i>` every 10 ms until the call is cancelled, which
///   it records as a line `ended after <n>` in the file `argv[4]` (it never ends otherwise).
///
/// Every call without the token ends UNAUTHENTICATED; the server's answers never carry it.
const SERVER: &str = r#"
import hashlib, os, sys, time
from concurrent import futures
import grpc

ip, port, token, record = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
FAIL_DETAILS = "quota exceeded: 3 of 2 used (100% \u00fcber, caf\u00e9)"

def authorized(context):
    auth = [v for k, v in context.invocation_metadata() if k == "authorization"]
    if auth != ["Bearer " + token]:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required")

def say(request, context):
    authorized(context)
    context.send_initial_metadata((("x-initial", "hello"),))
    context.set_trailing_metadata((
        ("x-checksum", hashlib.sha256(request).hexdigest()),
        ("x-count", str(len(request))),
        ("x-digest-bin", hashlib.sha256(request).digest()[:8]),
        ("x-tag", "one"),
        ("x-tag", "two"),
    ))
    if request.startswith(b"sum:"):
        return hashlib.sha256(request[4:]).hexdigest().encode()
    if request.startswith(b"big:"):
        return b"b" * int(request[4:])
    if request == b"meta":
        md = dict(context.invocation_metadata())
        return ("x-request-id=%s x-blob-bin=%s" % (
            md.get("x-request-id"), md.get("x-blob-bin", b"").hex())).encode()
    return b"said:" + request

def count(request, context):
    authorized(context)
    n, _, fail = request.decode().partition(":")
    h = hashlib.sha256()
    for i in range(int(n)):
        m = ("msg %d" % i).encode()
        h.update(m)
        yield m
    context.set_trailing_metadata((("x-checksum", h.hexdigest()), ("x-sent", n)))
    if fail:
        context.abort(grpc.StatusCode.ABORTED, "stopped after %s messages" % n)

def fail(request, context):
    authorized(context)
    context.set_trailing_metadata((("x-reason", "over-quota"),))
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, FAIL_DETAILS)

def chat(requests, context):
    authorized(context)
    for r in requests:
        yield b"echo:" + r

def forever(request, context):
    authorized(context)
    sent = [0]
    def done():
        with open(record, "a") as f:
            f.write("ended after %d\n" % sent[0])
    context.add_callback(done)
    while context.is_active():
        yield b"tick %d" % sent[0]
        sent[0] += 1
        time.sleep(0.01)

handler = grpc.method_handlers_generic_handler("latch.test.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Forever": grpc.unary_stream_rpc_method_handler(forever),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=(handler,),
                     options=(("grpc.max_receive_message_length", 8 << 20),
                              ("grpc.max_send_message_length", 8 << 20)) + tuple(
                         (k, int(v)) for k, v in (
                             a.split("=") for a in os.environ.get("GRPC_ARGS", "").split()
                         )))
if len(sys.argv) > 5:
    pem = lambda path: open(path, "rb").read()
    creds = grpc.ssl_server_credentials(((pem(sys.argv[6]), pem(sys.argv[5])),))
    server.add_secure_port("%s:%s" % (ip, port), creds)
else:
    server.add_insecure_port("%s:%s" % (ip, port))
server.start()
print("ready", flush=True)
server.wait_for_termination()
"#;

/// The gRPC client: `argv` = address, mode (`direct`, `latch` or `load`), the server's record
/// file,
/// and for TLS the CA file to trust (the name checked is `api.test`). Prints one JSON object
/// with everything it received: per call the status code, details, initial and trailing
/// metadata (bytes values in hex) and messages.
const CLIENT: &str = r#"
import hashlib, json, os, sys, time, queue
import grpc

addr, mode, record = sys.argv[1], sys.argv[2], sys.argv[3]
options = (("grpc.enable_http_proxy", 0),
           ("grpc.max_receive_message_length", 8 << 20),
           ("grpc.max_send_message_length", 8 << 20))
if len(sys.argv) > 4:
    creds = grpc.ssl_channel_credentials(root_certificates=open(sys.argv[4], "rb").read())
    options += (("grpc.ssl_target_name_override", "api.test"),)
    channel = grpc.secure_channel(addr, creds, options=options)
else:
    channel = grpc.insecure_channel(addr, options=options)
grpc.channel_ready_future(channel).result(timeout=30)
say = channel.unary_unary("/latch.test.Echo/Say")
count = channel.unary_stream("/latch.test.Echo/Count")
fail = channel.unary_unary("/latch.test.Echo/Fail")
chat = channel.stream_stream("/latch.test.Echo/Chat")

def md(pairs):
    return [[k, v.hex() if isinstance(v, bytes) else v] for k, v in (pairs or ())]

def outcome(call, messages):
    return {"code": call.code().name, "details": call.details(),
            "initial": md(call.initial_metadata()), "trailing": md(call.trailing_metadata()),
            "messages": messages}

def unary(request, metadata=None):
    try:
        resp, call = say.with_call(request, metadata=metadata, timeout=60)
        return outcome(call, [resp.decode() if len(resp) < 100 else "%d bytes" % len(resp)])
    except grpc.RpcError as call:
        return outcome(call, [])

def streaming(request):
    call = count(request, timeout=60)
    got = []
    try:
        for m in call:
            got.append(m.decode())
    except grpc.RpcError:
        pass
    return outcome(call, got)

out = {"say": unary(b"hello")}
if mode == "load":
    # Eight threads calling back to back for four seconds.
    import collections, threading
    codes = collections.Counter()
    details = collections.Counter()
    end = time.monotonic() + 4
    def loop(t):
        i = 0
        while time.monotonic() < end:
            r = unary(b"t%d-%d" % (t, i))
            codes[r["code"]] += 1
            if r["code"] != "OK":
                details[r["details"]] += 1
            i += 1
    ts = [threading.Thread(target=loop, args=(t,)) for t in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out["load"] = {"codes": codes, "failures": details}
elif mode == "latch":
    out["own_token_replaced"] = unary(b"mine", metadata=(("authorization", "Bearer app-own"),))
    out["meta"] = unary(b"meta", metadata=(("x-request-id", "r-1"),
                                          ("x-blob-bin", b"\x00\x01\xfe\xff")))
    out["big"] = unary(b"big:%d" % (3 << 20))
    upload = os.urandom(3 << 20)
    out["upload"] = unary(b"sum:" + upload)
    out["upload_sum"] = hashlib.sha256(upload).hexdigest()
    # More calls at once than latch's 100 streams a connection.
    calls = [say.future(b"c%d" % i, timeout=60) for i in range(300)]
    out["concurrent"] = sum(c.result() == b"said:c%d" % i for i, c in enumerate(calls))
    out["count"] = streaming(b"1000")
    out["count_fail"] = streaming(b"5:fail")
    try:
        fail(b"x", timeout=60)
        out["fail"] = "succeeded"
    except grpc.RpcError as call:
        out["fail"] = outcome(call, [])
    # Ping-pong: each message is sent only after the previous answer came back, so the
    # request stream must reach the server while it is still open.
    sends = queue.Queue()
    def requests():
        while True:
            m = sends.get()
            if m is None:
                return
            yield m
    call = chat(requests(), timeout=60)
    got = []
    for i in range(50):
        sends.put(b"ping %d" % i)
        got.append(next(call).decode())
    sends.put(None)
    got.extend(m.decode() for m in call)
    out["chat"] = outcome(call, got)
    # Cancelling a call resets its stream: the server sees it end while the connection
    # stays open.
    forever = channel.unary_stream("/latch.test.Echo/Forever")(b"", timeout=60)
    ticks = [next(forever).decode() for _ in range(10)]
    forever.cancel()
    ended = None
    deadline = time.monotonic() + 10
    while ended is None and time.monotonic() < deadline:
        if os.path.exists(record) and open(record).read():
            ended = open(record).read().strip()
        time.sleep(0.02)
    out["cancel"] = {"ticks": ticks, "code": forever.code().name, "server": ended}
    out["after_cancel"] = unary(b"again")
print(json.dumps(out))
"#;

/// Panics with what to do unless Python's grpcio can be imported.
fn require_grpcio() {
    let out = Command::new(bins::tool("python3", "python3"))
        .args(["-c", "import grpc"])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "grpcio (PyPI) is missing: `cargo xtask setup` installs it\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the client with `cmd` (python3, in the cgroup or not), trusting `ca` for TLS; its
/// JSON output.
fn client(
    cmd: &mut Command,
    addr: SocketAddr,
    mode: &str,
    record: &Path,
    ca: Option<&Path>,
) -> serde_json::Value {
    let out = run_within(
        cmd.args(["-c", CLIENT, &addr.to_string(), mode])
            .arg(record)
            .args(ca),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the gRPC client ({mode}) failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("client output {stdout:?}: {e}"))
}

fn sha256_hex(data: &[u8]) -> String {
    let out = run_within(
        Command::new(bins::tool("python3", "python3"))
            .args([
                "-c",
                "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())",
            ])
            .arg(String::from_utf8(data.to_vec()).unwrap()),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts the gRPC server on `ip:port` (TLS with `tls`'s server certificate), with the
/// server options `grpc_args` (`name=integer ...`); waits until it listens.
fn start_server(
    ip: &str,
    port: u16,
    record: &Path,
    tls: Option<&TestCa>,
    grpc_args: &str,
) -> Killed {
    let server = Command::new(bins::tool("python3", "python3"))
        .args(["-c", SERVER, ip, &port.to_string(), TOKEN])
        .arg(record)
        .args(
            tls.iter()
                .flat_map(|ca| [ca.server_cert(), ca.server_key()]),
        )
        .env("GRPC_ARGS", grpc_args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the gRPC server");
    let mut server = Killed(server);
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready", "the gRPC server did not start");
    server
}

/// Where a test's gRPC server listens (127.0.0.2, a free port), and a scratch directory with
/// the path of the server's record of what it received; the prerequisites checked first.
struct Site {
    ip: &'static str,
    port: u16,
    addr: SocketAddr,
    dir: TempDir,
    record: PathBuf,
}

fn site() -> Site {
    latch_tests::require_root();
    require_grpcio();
    let ip = "127.0.0.2";
    let port = latch_tests::servers::free_port(ip);
    let dir = TempDir::new("grpc");
    Site {
        ip,
        port,
        addr: format!("{ip}:{port}").parse().unwrap(),
        record: dir.path().join("record"),
        dir,
    }
}

#[test]
fn a_server_closing_connections_at_max_connection_age_loses_no_call() {
    // gRPC servers end connections on their own (`max_connection_age`: GOAWAY, then close
    // after the streams in flight) so that clients spread over replicas. Through latch the
    // application's connection stays; latch must carry on over a new target connection and
    // never fail a call the closing one did not take.
    let Site {
        ip,
        port,
        addr,
        dir,
        record,
    } = site();
    let _server = start_server(
        ip,
        port,
        &record,
        None,
        "grpc.max_connection_age_ms=500 grpc.max_connection_age_grace_ms=5000",
    );
    let secrets = dir.write("secrets.yaml", &secrets_yaml(BASIC_USER, TOKEN, ""));
    let cg = TestCgroup::new();
    let agent = Agent::start(
        &policy_yaml(addr, &secrets, "  http: {inject: bearer}\n"),
        &cg,
    );
    let got = client(
        &mut cg.command(bins::tool("python3", "python3")),
        addr,
        "load",
        &record,
        None,
    );
    let log = agent.log();
    let codes = got["load"]["codes"].as_object().expect("codes");
    assert!(
        codes.len() == 1 && codes["OK"].as_u64().is_some_and(|n| n > 100),
        "every call succeeds: {got:#}\n{log}"
    );
    assert_eq!(got["say"]["code"], "OK");
    let target_connections = log.matches("target connected for an HTTP/2").count();
    assert!(
        target_connections >= 4,
        "the server closed its connections every 500 ms ({target_connections} made):\n{log}"
    );
    assert_eq!(agent.wait_audit(1).len(), 1, "one application connection");
    assert!(!agent.log().contains(TOKEN));
}

#[test]
fn grpc_over_h2c_gets_the_bearer_token_and_trailers_pass_untouched() {
    grpc_through_latch(false);
}

#[test]
fn grpc_over_intercepted_tls_gets_the_bearer_token_and_trailers_pass_untouched() {
    grpc_through_latch(true);
}

/// The gRPC server on 127.0.0.2 (with TLS: a certificate for `api.test` from a test CA), the
/// client directly without the token, then through latch; every call's outcome checked.
fn grpc_through_latch(tls: bool) {
    let Site {
        ip,
        port,
        addr,
        dir,
        record,
    } = site();
    let test_ca = tls.then(|| TestCa::new("api.test", &["DNS:api.test", &format!("IP:{ip}")]));
    let server = start_server(ip, port, &record, test_ca.as_ref(), "");

    // Directly, without the token: refused by the server.
    let direct = client(
        &mut Command::new(bins::tool("python3", "python3")),
        addr,
        "direct",
        &record,
        test_ca.as_ref().map(|ca| ca.ca()).as_deref(),
    );
    assert_eq!(
        direct["say"]["code"], "UNAUTHENTICATED",
        "the server checks the token: {direct:#}"
    );
    assert_eq!(direct["say"]["details"], "a bearer token is required");

    let secrets = dir.write("secrets.yaml", &secrets_yaml(BASIC_USER, TOKEN, ""));
    let cg = TestCgroup::new();
    let spec = match &test_ca {
        Some(ca) => format!(
            "  http: {{inject: bearer, appTls: {{mode: enable}}}}\n  \
             tls: {{mode: verify-full, ca: {}, serverName: api.test}}\n",
            ca.ca().display()
        ),
        None => "  http: {inject: bearer}\n".to_owned(),
    };
    let agent = Agent::start(&policy_yaml(addr, &secrets, &spec), &cg);
    let node_ca = tls.then(|| agent.export_node_ca(&dir, "node-ca.pem"));
    let got = client(
        &mut cg.command(bins::tool("python3", "python3")),
        addr,
        "latch",
        &record,
        node_ca.as_deref(),
    );
    let log = agent.log();

    // Unary: the token was injected; initial and trailing metadata exactly as sent.
    let hello_sum = sha256_hex(b"hello");
    assert_eq!(
        got["say"],
        serde_json::json!({
            "code": "OK", "details": "",
            "initial": [["x-initial", "hello"]],
            "trailing": [["x-checksum", hello_sum], ["x-count", "5"],
                         ["x-digest-bin", &hello_sum[..16]],
                         ["x-tag", "one"], ["x-tag", "two"]],
            "messages": ["said:hello"],
        }),
        "unary through latch: {got:#}\n{log}"
    );
    assert_eq!(got["own_token_replaced"]["code"], "OK", "{got:#}");
    assert_eq!(got["own_token_replaced"]["messages"][0], "said:mine");
    assert_eq!(
        got["meta"]["messages"][0], "x-request-id=r-1 x-blob-bin=0001feff",
        "the client's own metadata reaches the server unchanged: {got:#}"
    );
    assert_eq!(
        (
            got["big"]["code"].as_str(),
            got["big"]["messages"][0].as_str()
        ),
        (Some("OK"), Some("3145728 bytes")),
        "a 3 MiB answer, past latch's windows: {got:#}"
    );

    assert_eq!(
        got["upload"]["messages"][0], got["upload_sum"],
        "a 3 MiB request, past latch's windows: {got:#}"
    );
    assert_eq!(got["concurrent"], 300, "{got:#}");

    // Server streaming: every message, then the trailers.
    let count = &got["count"];
    let messages: Vec<String> = (0..1000).map(|i| format!("msg {i}")).collect();
    assert_eq!(count["code"], "OK", "{got:#}");
    assert_eq!(count["messages"], serde_json::json!(messages));
    assert_eq!(
        count["trailing"],
        serde_json::json!([
            ["x-checksum", sha256_hex(messages.concat().as_bytes())],
            ["x-sent", "1000"]
        ])
    );
    // Messages, then an error status in the trailers with the custom ones.
    let fail5 = &got["count_fail"];
    let five: Vec<String> = (0..5).map(|i| format!("msg {i}")).collect();
    assert_eq!(
        *fail5,
        serde_json::json!({
            "code": "ABORTED", "details": "stopped after 5 messages",
            "initial": [],
            "trailing": [["x-checksum", sha256_hex(five.concat().as_bytes())], ["x-sent", "5"]],
            "messages": five,
        }),
        "{got:#}"
    );
    // A trailers-only error response: status, details (percent-encoded on the wire) and
    // trailing metadata as the server sent them.
    assert_eq!(
        got["fail"],
        serde_json::json!({
            "code": "FAILED_PRECONDITION",
            "details": "quota exceeded: 3 of 2 used (100% \u{fc}ber, caf\u{e9})",
            "initial": [],
            "trailing": [["x-reason", "over-quota"]],
            "messages": [],
        }),
        "{got:#}"
    );
    // Bidirectional ping-pong.
    let pongs: Vec<String> = (0..50).map(|i| format!("echo:ping {i}")).collect();
    assert_eq!(got["chat"]["code"], "OK", "{got:#}");
    assert_eq!(got["chat"]["messages"], serde_json::json!(pongs));

    // Cancelled: the stream's reset reached the server; the connection carries on.
    let ticks: Vec<String> = (0..10).map(|i| format!("tick {i}")).collect();
    assert_eq!(got["cancel"]["ticks"], serde_json::json!(ticks), "{got:#}");
    assert_eq!(got["cancel"]["code"], "CANCELLED", "{got:#}");
    assert!(
        got["cancel"]["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("ended after ")),
        "the server saw the cancelled call end while the connection stayed open: {got:#}"
    );
    assert_eq!(got["after_cancel"]["messages"][0], "said:again", "{got:#}");

    // One application connection, brokered by the http connector; no token anywhere the
    // client or the logs can see it.
    let audit = agent.wait_audit(1);
    let audit_text = serde_json::to_string(&audit).unwrap();
    let got_text = got.to_string();
    for (name, text) in [
        ("what the client received", &got_text),
        ("the agent log", &agent.log()),
        ("the audit trail", &audit_text),
    ] {
        assert!(
            !text.contains(TOKEN) && !text.contains("Canary"),
            "the canary leaked into {name}:\n{text}"
        );
    }
    assert_eq!(audit.len(), 1, "one channel, one connection: {audit:#?}");
    assert!(
        log.contains("target connected for an HTTP/2 application h2=true"),
        "latch spoke HTTP/2 to the gRPC server too:\n{log}"
    );

    // On the wire (curl, nghttp2): the response headers and trailers through latch are byte
    // for byte those the server sends a client holding the token: `grpc-status`,
    // `grpc-message` percent-encoded, custom and binary trailers, and which of them come as
    // trailers (after the blank line) or in a trailers-only response.
    let scheme = if tls {
        "https://api.test"
    } else {
        "http://127.0.0.2"
    };
    let resolve = format!("api.test:{port}:{ip}");
    let curl_args = |ca: Option<&Path>| -> Vec<String> {
        let mut a: Vec<String> = ["-sS", "--max-time", "60", "-D", "-", "-o", "/dev/null"]
            .map(str::to_owned)
            .to_vec();
        a.extend(["-H", "content-type: application/grpc", "-H", "te: trailers"].map(str::to_owned));
        match ca {
            Some(ca) => a.extend([
                "--http2".to_owned(),
                "--cacert".to_owned(),
                ca.display().to_string(),
                "--resolve".to_owned(),
                resolve.clone(),
            ]),
            None => a.push("--http2-prior-knowledge".to_owned()),
        }
        a
    };
    let mut seen_by_curl = String::new();
    // (method, message, what the dump holds: the status as a trailer after the headers' blank
    // line, or in the one header block of a trailers-only response).
    let calls = [
        ("Say", "hello", "\r\n\r\ngrpc-status: 0\r\n"),
        (
            "Count",
            "5:fail",
            "\r\n\r\ngrpc-status: 10\r\ngrpc-message: stopped after 5 messages\r\n",
        ),
        (
            "Fail",
            "x",
            concat!(
                "\r\ngrpc-status: 9\r\n",
                "grpc-message: quota exceeded: 3 of 2 used (100%25 %C3%BCber, caf%C3%A9)\r\n",
                "x-reason: over-quota\r\n\r\n"
            ),
        ),
    ];
    for (method, message, status) in calls {
        let body = dir.path().join(format!("{method}.grpc"));
        let mut frame = vec![0u8];
        frame.extend((message.len() as u32).to_be_bytes());
        frame.extend(message.as_bytes());
        std::fs::write(&body, frame).unwrap();
        let url = format!("{scheme}:{port}/latch.test.Echo/{method}");
        let data = format!("@{}", body.display());
        let run = |cmd: &mut Command, ca: Option<&Path>, token: bool| {
            let auth = format!("authorization: Bearer {TOKEN}");
            let out = run_within(
                cmd.args(curl_args(ca))
                    .args(token.then_some(["-H", auth.as_str()]).into_iter().flatten())
                    .args(["--data-binary", &data, &url]),
                Duration::from_secs(90),
            );
            assert!(
                out.status.success(),
                "curl {method}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let direct = run(
            &mut Command::new(bins::tool("curl", "curl")),
            test_ca.as_ref().map(|ca| ca.ca()).as_deref(),
            true,
        );
        let through = run(
            &mut cg.command(bins::tool("curl", "curl")),
            node_ca.as_deref(),
            false,
        );
        assert_eq!(
            through, direct,
            "{method}: headers and trailers through latch vs from the server"
        );
        assert!(through.contains(status), "{method}: {through:?}");
        seen_by_curl.push_str(&through);
    }
    for (name, text) in [
        ("what curl received", &seen_by_curl),
        ("the agent log", &agent.log()),
    ] {
        assert!(
            !text.contains(TOKEN) && !text.contains("Canary"),
            "the canary leaked into {name}:\n{text}"
        );
    }
    drop(agent);
    drop(server);
}
