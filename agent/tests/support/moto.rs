//! A throw-away `moto_server` (PyPI `moto[server]`) on a free loopback port, killed by pid when
//! dropped, and a raw HTTP helper to set it up through its API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ProcessGuard, free_port, require_program, wait_for_port};

pub struct Moto {
    pub port: u16,
    pub log: PathBuf,
    guard: ProcessGuard,
    pub dir: tempfile::TempDir,
}

impl Moto {
    /// `unauthenticated_actions`: after that many requests moto enforces IAM authentication
    /// (and checks SigV4 signatures); `None`: never.
    pub fn start(unauthenticated_actions: Option<u32>) -> Moto {
        let bin = require_program("moto_server", "pip install 'moto[server]'");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("moto.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(n) = unauthenticated_actions {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let mut guard = ProcessGuard::spawn("moto_server", &mut cmd);
        wait_for_port(&mut guard, port, &log, Duration::from_secs(60));
        Moto {
            port,
            log,
            guard,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One unsigned request (accepted while moto does not enforce authentication); the
    /// `Authorization` header only names the service for moto's routing. Returns (status, body).
    pub fn request(&self, service: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
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

    pub fn secretsmanager(&self, action: &str, body: &serde_json::Value) -> serde_json::Value {
        let target = format!("secretsmanager.{action}");
        let (status, text) = self.request(
            "secretsmanager",
            &[
                ("Content-Type", "application/x-amz-json-1.1"),
                ("X-Amz-Target", &target),
            ],
            &body.to_string(),
        );
        assert_eq!(status, 200, "{action} failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// An IAM query-API call; returns the XML answer.
    pub fn iam(&self, params: &[(&str, &str)]) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("Version", "2010-05-08");
        for (k, v) in params {
            form.append_pair(k, v);
        }
        let (status, text) = self.request(
            "iam",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            &form.finish(),
        );
        assert_eq!(status, 200, "IAM {params:?} failed: {text}");
        text
    }
}

/// The text of the first `<name>` element.
pub fn xml_text(xml: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
        + open.len();
    let end = xml[start..].find(&format!("</{name}>")).unwrap() + start;
    xml[start..end].to_string()
}
