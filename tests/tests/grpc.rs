//! `protocol: http` with a real HTTP/2 application: gRPC (PyPI `grpcio`, C-core's own HTTP/2
//! stack on both ends) in cleartext with prior knowledge (an insecure channel). The server
//! on loopback admits a call only with `authorization: Bearer <token>` from latch's store;
//! the client inside the intercepted cgroup holds no token. Unary, server-streaming and
//! bidirectional calls, custom trailing metadata next to `grpc-status` (HTTP/2 trailers,
//! which nginx never sends), error statuses with their details, and no trace of the token in
//! anything the client receives or in latch's log.
//!
//! Handlers are generic (`grpc.method_handlers_generic_handler` on raw bytes): no generated
//! code, no protobuf.
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use latch_tests::{
    Agent, Killed, TempDir, TestCgroup, bins,
    nginx_api::{BASIC_USER, TOKEN, policy_yaml, secrets_yaml},
    run_within,
};

/// The gRPC server: `argv` = ip, port, token. Service `latch.test.Echo`:
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
import hashlib, sys, time
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
                              ("grpc.max_send_message_length", 8 << 20)))
server.add_insecure_port("%s:%s" % (ip, port))
server.start()
print("ready", flush=True)
server.wait_for_termination()
"#;

/// The gRPC client: `argv` = address, mode (`direct` or `latch`), the server's record file.
/// Prints one JSON object
/// with everything it received: per call the status code, details, initial and trailing
/// metadata (bytes values in hex) and messages.
const CLIENT: &str = r#"
import hashlib, json, os, sys, time, queue
import grpc

addr, mode, record = sys.argv[1], sys.argv[2], sys.argv[3]
channel = grpc.insecure_channel(addr, options=(
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20)))
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
if mode == "latch":
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

/// Runs the client with `cmd` (python3, in the cgroup or not); its JSON output.
fn client(cmd: &mut Command, addr: SocketAddr, mode: &str, record: &Path) -> serde_json::Value {
    let out = run_within(
        cmd.args(["-c", CLIENT, &addr.to_string(), mode])
            .arg(record),
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

#[test]
fn grpc_through_latch_gets_the_bearer_token_and_trailers_pass_untouched() {
    latch_tests::require_root();
    require_grpcio();
    let ip = "127.0.0.2";
    let port = latch_tests::servers::free_port(ip);
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let dir = TempDir::new("grpc");
    let record = dir.path().join("record");
    let server = Command::new(bins::tool("python3", "python3"))
        .args(["-c", SERVER, ip, &port.to_string(), TOKEN])
        .arg(&record)
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

    // Directly, without the token: refused by the server.
    let direct = client(
        &mut Command::new(bins::tool("python3", "python3")),
        addr,
        "direct",
        &record,
    );
    assert_eq!(
        direct["say"]["code"], "UNAUTHENTICATED",
        "the server checks the token: {direct:#}"
    );
    assert_eq!(direct["say"]["details"], "a bearer token is required");

    let secrets = dir.write("secrets.yaml", &secrets_yaml(BASIC_USER, TOKEN, ""));
    let cg = TestCgroup::new();
    let agent = Agent::start(
        &policy_yaml(addr, &secrets, "  http: {inject: bearer}\n"),
        &cg,
    );
    let got = client(
        &mut cg.command(bins::tool("python3", "python3")),
        addr,
        "latch",
        &record,
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
    drop(agent);
    drop(server);
}
