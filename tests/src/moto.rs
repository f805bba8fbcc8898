//! A throw-away `moto_server` (PyPI `moto[server]`: Secrets Manager, STS, IAM and the instance
//! metadata service) on a free loopback port, killed by PID on drop, and raw HTTP calls to set
//! it up through its API.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{Killed, TempDir, bins};

pub struct Moto {
    pub port: u16,
    _process: Killed,
    dir: TempDir,
}

impl Moto {
    /// Starts `moto_server` on 127.0.0.1 and a free port; no request is authenticated until
    /// [`Moto::check_signatures`].
    pub fn start() -> Moto {
        let bin = bins::tool("moto_server", "moto[server] from PyPI (cargo xtask setup)");
        let dir = TempDir::new("moto");
        let port = crate::servers::free_port("127.0.0.1");
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("moto log"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            port,
            _process: Killed(child),
            dir,
        };
        assert!(
            crate::eventually(Duration::from_secs(60), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "moto_server did not start:\n{}",
            moto.log()
        );
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// moto's request log (one line per request, `"METHOD /path HTTP/1.1" status`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// How many requests `METHOD path` moto has answered.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        let needle = format!("\"{method} {path} HTTP/1.1\"");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// From now on moto checks every request's SigV4 signature against the keys it issued
    /// (IAM users' and assumed roles'), and the caller's IAM permissions.
    pub fn check_signatures(&self) {
        let (status, body) = self.raw("POST", "/moto-api/reset-auth", &[], "0");
        assert_eq!(status, 200, "reset-auth: {body}");
    }

    /// One HTTP request; (status, body).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect moto");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).expect("write to moto");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read moto's answer");
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// An unsigned call (accepted before [`Moto::check_signatures`]); the `Authorization`
    /// header only names the service for moto's routing.
    fn unsigned(&self, service: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
        );
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.raw("POST", "/", &all, body)
    }

    pub fn secretsmanager(&self, action: &str, body: &serde_json::Value) -> serde_json::Value {
        let target = format!("secretsmanager.{action}");
        let (status, text) = self.unsigned(
            "secretsmanager",
            &[
                ("Content-Type", "application/x-amz-json-1.1"),
                ("X-Amz-Target", &target),
            ],
            &body.to_string(),
        );
        assert_eq!(status, 200, "{action} failed: {text}");
        serde_json::from_str(&text).expect("secretsmanager JSON")
    }

    /// A query-API call (IAM, STS); returns the XML answer.
    pub fn query(&self, service: &str, version: &str, params: &[(&str, &str)]) -> String {
        let mut body = format!("Version={version}");
        for (k, v) in params {
            body.push_str(&format!("&{k}={}", urlencode(v)));
        }
        let (status, text) = self.unsigned(
            service,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            &body,
        );
        assert_eq!(status, 200, "{service} {params:?} failed: {text}");
        text
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The text of the first `<name>` element.
pub fn xml_text(xml: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
        + open.len();
    let end = xml[start..]
        .find(&format!("</{name}>"))
        .expect("closing tag")
        + start;
    xml[start..end].to_string()
}
