//! What a Vault/OpenBao with the `aws` auth method (IAM type) needs around it in a test, on
//! loopback: an instance metadata service (IMDSv2) handing out an IAM role's temporary
//! credentials, and the `aws` method itself.
//!
//! OpenBao 2.x has no `aws` auth method built in (`bao auth enable aws`: "plugin not found in
//! the catalog"; it moved to the separately built openbao-plugins, which no package registry
//! here ships), and no Vault binary can be installed. So [`AwsAuthFront`] stands in front of a
//! real OpenBao and does what Vault's method does with a login: it sends the signed
//! `sts:GetCallerIdentity` to STS (moto, checking signatures), maps the answering assumed-role
//! ARN to its role ARN, compares it with the role's bound principal and the signed server-ID
//! header with the configured one, and then has OpenBao issue a real token with the role's
//! policies. Every other request goes to OpenBao untouched, one request a connection.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// One request as read off a connection: method, path, headers, body, and the raw bytes.
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub raw: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP/1.1 request (Content-Length bodies only).
pub fn read_request(s: &mut TcpStream) -> Option<Request> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while raw.len() < head_end + len {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body: raw[head_end..head_end + len].to_vec(),
        raw,
    })
}

fn respond(s: &mut TcpStream, status: u16, content_type: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A loopback server running `serve` for each connection on its own thread until dropped.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test server");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let serve = Arc::new(serve);
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let serve = serve.clone();
                std::thread::spawn(move || serve(conn));
            }
        });
        Server { addr, stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// An IMDSv2 instance metadata service for an instance with role `role`: a session token on
/// `PUT /latest/api/token`, then (with that token only) the role's name and the credentials
/// set by [`Imds::set_credentials`].
pub struct Imds {
    server: Server,
    credentials: Arc<Mutex<String>>,
    /// Requests served, as "METHOD path status".
    pub seen: Arc<Mutex<Vec<String>>>,
}

const SESSION_TOKEN: &str = "imds-session-token";

impl Imds {
    pub fn start(role: &str, credentials_json: String) -> Imds {
        let credentials = Arc::new(Mutex::new(credentials_json));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (creds, log, role) = (credentials.clone(), seen.clone(), role.to_owned());
        let server = Server::start(move |mut s| {
            let Some(req) = read_request(&mut s) else {
                return;
            };
            let roles = "/latest/meta-data/iam/security-credentials/";
            let authorized = req.header("x-aws-ec2-metadata-token") == Some(SESSION_TOKEN);
            let (status, body) = match (req.method.as_str(), req.path.as_str()) {
                ("PUT", "/latest/api/token")
                    if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
                {
                    (200, SESSION_TOKEN.to_owned())
                }
                ("PUT", _) => (400, String::new()),
                _ if !authorized => (401, String::new()),
                ("GET", p) if p == roles => (200, role.clone()),
                ("GET", p) if p == format!("{roles}{role}") => (200, creds.lock().unwrap().clone()),
                _ => (404, String::new()),
            };
            log.lock()
                .unwrap()
                .push(format!("{} {} {status}", req.method, req.path));
            respond(&mut s, status, "text/plain", &body);
        });
        Imds {
            server,
            credentials,
            seen,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn set_credentials(&self, json: String) {
        *self.credentials.lock().unwrap() = json;
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// The `aws` auth method's role: name, bound IAM principal, server ID, token policy.
#[derive(Clone)]
pub struct AwsRole {
    pub name: String,
    pub bound_iam_principal_arn: String,
    pub server_id: String,
    pub policy: String,
}

/// Vault's `aws` auth method (IAM type) in front of a real OpenBao at `bao`: see the module.
pub struct AwsAuthFront {
    server: Server,
    /// Logins answered, as "accepted ARN" or "refused: reason".
    pub logins: Arc<Mutex<Vec<String>>>,
}

impl AwsAuthFront {
    /// `sts`: the STS endpoint (host:port) the method sends logins to; `root_token` mints
    /// tokens in OpenBao.
    pub fn start(bao: SocketAddr, root_token: &str, sts: SocketAddr, role: AwsRole) -> Self {
        let logins = Arc::new(Mutex::new(Vec::new()));
        let log = logins.clone();
        let root = root_token.to_owned();
        let server = Server::start(move |mut s| {
            let Some(req) = read_request(&mut s) else {
                return;
            };
            if req.method == "POST" && req.path == "/v1/auth/aws/login" {
                match login(&req, bao, &root, sts, &role) {
                    Ok((arn, answer)) => {
                        log.lock().unwrap().push(format!("accepted {arn}"));
                        respond(&mut s, 200, "application/json", &answer);
                    }
                    Err(reason) => {
                        log.lock().unwrap().push(format!("refused: {reason}"));
                        let body = serde_json::json!({ "errors": [reason] }).to_string();
                        respond(&mut s, 400, "application/json", &body);
                    }
                }
                return;
            }
            // anything else: OpenBao's answer, one request a connection (so that a login is
            // never sent down a kept-alive connection to OpenBao)
            let Some(end) = req.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let mut forward = req.raw[..end + 2].to_vec();
            forward.extend_from_slice(b"Connection: close\r\n");
            forward.extend_from_slice(&req.raw[end + 2..]);
            let Ok(mut upstream) = TcpStream::connect(bao) else {
                return;
            };
            if upstream.write_all(&forward).is_err() {
                return;
            }
            let _ = std::io::copy(&mut upstream, &mut s);
        });
        AwsAuthFront { server, logins }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn logins(&self) -> Vec<String> {
        self.logins.lock().unwrap().clone()
    }
}

/// The `aws` method's login: (the caller's ARN, OpenBao's answer with a new token).
fn login(
    req: &Request,
    bao: SocketAddr,
    root: &str,
    sts: SocketAddr,
    role: &AwsRole,
) -> Result<(String, String), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let v: serde_json::Value =
        serde_json::from_slice(&req.body).map_err(|e| format!("bad login body: {e}"))?;
    let field = |k: &str| -> Result<Vec<u8>, String> {
        let s = v[k].as_str().ok_or(format!("missing {k}"))?;
        b64.decode(s).map_err(|e| format!("{k}: {e}"))
    };
    let asked = v["role"].as_str().unwrap_or_default();
    if asked != role.name {
        return Err(format!("entry for role {asked} not found"));
    }
    if v["iam_http_request_method"] != "POST" {
        return Err("iam_http_request_method must be POST".into());
    }
    let body = String::from_utf8(field("iam_request_body")?).map_err(|e| e.to_string())?;
    let headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&field("iam_request_headers")?).map_err(|e| e.to_string())?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v[0].as_str())
            .map(str::to_owned)
    };
    if header("x-vault-aws-iam-server-id").as_deref() != Some(role.server_id.as_str()) {
        return Err(format!(
            "expected X-Vault-AWS-IAM-Server-ID header value {:?}",
            role.server_id
        ));
    }
    if !header("authorization")
        .unwrap_or_default()
        .contains("x-vault-aws-iam-server-id")
    {
        return Err("the server ID header is not signed".into());
    }
    // to STS, as signed (the Host header says which endpoint the signature is for)
    let mut raw = format!(
        "POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, values) in &headers {
        for value in values.as_array().into_iter().flatten() {
            raw.push_str(&format!(
                "{name}: {}\r\n",
                value.as_str().unwrap_or_default()
            ));
        }
    }
    raw.push_str("\r\n");
    raw.push_str(&body);
    let answer = exchange(sts, &raw).map_err(|e| format!("error making upstream request: {e}"))?;
    if !answer.starts_with("HTTP/1.1 200") {
        let detail = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        return Err(format!(
            "error making upstream request: received error code 403 from STS: {detail}"
        ));
    }
    let arn = crate::moto::xml_text(&answer, "Arn");
    // arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION -> arn:aws:iam::ACCOUNT:role/ROLE
    let canonical = match arn.split_once(":assumed-role/") {
        Some((prefix, rest)) => format!(
            "{}:role/{}",
            prefix.replace(":sts:", ":iam:"),
            rest.split('/').next().unwrap_or_default()
        ),
        None => arn.clone(),
    };
    if canonical != role.bound_iam_principal_arn {
        return Err(format!(
            "IAM Principal {canonical:?} does not belong to the role {:?}",
            role.name
        ));
    }
    let create = serde_json::json!({
        "policies": [role.policy],
        "ttl": "1h",
        "display_name": format!("aws-{}", role.name),
        "meta": { "role": role.name, "canonical_arn": canonical },
    })
    .to_string();
    let raw = format!(
        "POST /v1/auth/token/create HTTP/1.1\r\nHost: {bao}\r\nX-Vault-Token: {root}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{create}",
        create.len()
    );
    let answer = exchange(bao, &raw).map_err(|e| format!("token create: {e}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    if !answer.starts_with("HTTP/1.1 200") {
        return Err(format!("token create: {body}"));
    }
    Ok((arn, body))
}

fn exchange(to: SocketAddr, raw: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(raw.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}
