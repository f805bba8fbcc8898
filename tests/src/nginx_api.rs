//! nginx from Debian as an API that checks credentials, for the HTTP connector's tests: HTTP
//! Basic (`auth_basic`), a bearer token, an API-key header and a query parameter (each an `if`
//! on the variable nginx parses), a DAV `PUT` for uploads, an endpoint that shows what arrived,
//! TLS listeners (one that asks for a client certificate), and HTTP/2 listeners (h2c with
//! prior knowledge; `h2` in ALPN over TLS). Stopped by PID on drop.
use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{TempDir, bins, certs::TestCa, servers::free_port};

/// The Basic user and password nginx accepts.
pub const BASIC_USER: &str = "api-user";
pub const BASIC_PASSWORD: &str = "basic-Canary-0c7d41";
/// The token nginx accepts as `Authorization: Bearer`, `X-Api-Key` and `?api_key=`.
pub const TOKEN: &str = "tok-Canary-5b2e9d";
/// What the protected files hold.
pub const OK_BODY: &str = "ok from nginx\n";

pub struct NginxApi {
    child: Child,
    /// Plain HTTP.
    pub addr: SocketAddr,
    /// HTTPS with the test CA's server certificate (`api.test`, 127.0.0.2).
    pub tls_addr: SocketAddr,
    /// HTTPS that requires a client certificate from the test CA.
    pub mtls_addr: SocketAddr,
    /// HTTP/2 with prior knowledge in cleartext (h2c), the same locations.
    pub h2c_addr: SocketAddr,
    /// HTTPS offering `h2` (and `http/1.1`) in ALPN, the same locations.
    pub h2_tls_addr: SocketAddr,
    /// Plain HTTP that closes a connection idle for a second (`keepalive_timeout 1s`).
    pub short_keepalive_addr: SocketAddr,
    pub ca: TestCa,
    pub dir: TempDir,
}

impl NginxApi {
    pub fn start(ip: &str) -> Self {
        let nginx = bins::tool("nginx", "the Debian package nginx-light");
        let ca = TestCa::new("api.test", &["DNS:api.test", &format!("IP:{ip}")]);
        let dir = TempDir::new("nginx-api");
        let d = dir.path().display().to_string();
        for sub in [
            "www", "uploads", "body", "proxy", "fastcgi", "uwsgi", "scgi",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        dir.write("www/ok.txt", OK_BODY);
        dir.write(
            "htpasswd",
            &format!("{BASIC_USER}:{{PLAIN}}{BASIC_PASSWORD}\n"),
        );
        let (port, tls_port, mtls_port) = (free_port(ip), free_port(ip), free_port(ip));
        let (h2c_port, h2_tls_port) = (free_port(ip), free_port(ip));
        let short_keepalive_port = free_port(ip);
        let locations = format!(
            "root {d}/www;\n\
             location /basic/ {{ auth_basic \"latch\"; auth_basic_user_file {d}/htpasswd; alias {d}/www/; }}\n\
             location /bearer/ {{ if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401 \"no\\n\"; }} alias {d}/www/; }}\n\
             location /header/ {{ if ($http_x_api_key != \"{TOKEN}\") {{ return 401 \"no\\n\"; }} alias {d}/www/; }}\n\
             location /query/ {{ if ($arg_api_key != \"{TOKEN}\") {{ return 401 \"no\\n\"; }} alias {d}/www/; }}\n\
             location /upload/ {{ if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401 \"no\\n\"; }}\n\
               dav_methods PUT; create_full_put_path on; client_max_body_size 0; alias {d}/uploads/; }}\n\
             location = /conn {{ if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401 \"no\\n\"; }}\n\
               default_type text/plain; return 200 \"conn=$connection req=$connection_requests arg=$arg_n\\n\"; }}\n\
             location = /seen {{ default_type text/plain;\n\
               return 200 \"auth=[$http_authorization] key=[$http_x_api_key] args=[$args] host=[$http_host] custom=[$http_x_custom] proto=[$server_protocol]\\n\"; }}\n"
        );
        dir.write("locations.conf", &locations);
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n  \
             server {{ listen {ip}:{port}; include {d}/locations.conf; }}\n  \
             server {{ listen {ip}:{short_keepalive_port}; keepalive_timeout 1s; include {d}/locations.conf; }}\n  \
             server {{ listen {ip}:{tls_port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};\n    \
               include {d}/locations.conf; }}\n  \
             server {{ listen {ip}:{h2c_port} http2; include {d}/locations.conf; }}\n  \
             server {{ listen {ip}:{h2_tls_port} ssl http2; ssl_certificate {cert}; ssl_certificate_key {key};\n    \
               include {d}/locations.conf; }}\n  \
             server {{ listen {ip}:{mtls_port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};\n    \
               ssl_client_certificate {cacert}; ssl_verify_client on;\n    \
               location / {{ if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401 \"no\\n\"; }}\n      \
                 default_type text/plain; return 200 \"client=[$ssl_client_s_dn]\\n\"; }} }}\n}}\n",
            cert = ca.server_cert().display(),
            key = ca.server_key().display(),
            cacert = ca.ca().display(),
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start on {addr}:\n{}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            addr,
            tls_addr: format!("{ip}:{tls_port}").parse().unwrap(),
            mtls_addr: format!("{ip}:{mtls_port}").parse().unwrap(),
            h2c_addr: format!("{ip}:{h2c_port}").parse().unwrap(),
            h2_tls_addr: format!("{ip}:{h2_tls_port}").parse().unwrap(),
            short_keepalive_addr: format!("{ip}:{short_keepalive_port}").parse().unwrap(),
            ca,
            dir,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Where a `PUT /upload/<name>` lands.
    pub fn uploaded(&self, name: &str) -> PathBuf {
        self.dir.path().join("uploads").join(name)
    }
}

impl Drop for NginxApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file store and a `protocol: http` policy `api` for `dest` (`tls: {mode: disable}` unless
/// `extra_spec` has a `tls:` block), reading `api.username`/`api.password` from `secrets`.
pub fn policy_yaml(dest: SocketAddr, secrets: &std::path::Path, extra_spec: &str) -> String {
    let mut extra = if extra_spec.lines().any(|l| l.starts_with("  tls:")) {
        extra_spec.to_owned()
    } else {
        format!("  tls: {{mode: disable}}\n{extra_spec}")
    };
    if !extra.lines().any(|l| l.starts_with("  workloads:")) {
        extra.push_str("  workloads: all\n");
    }
    let creds = if extra.lines().any(|l| l.starts_with("  credentials:")) {
        String::new()
    } else {
        "  credentials:\n    store: local\n    username: {path: api, field: username}\n    \
         password: {path: api, field: password}\n"
            .to_owned()
    };
    format!(
        "apiVersion: latch.dev/v1alpha1\nkind: SecretStore\nmetadata:\n  name: local\nspec:\n  \
         file: {{path: {}}}\n---\n\
         apiVersion: latch.dev/v1alpha1\nkind: Policy\nmetadata:\n  name: api\nspec:\n  \
         destination:\n    address: \"{}\"\n    port: {}\n  protocol: http\n{creds}{extra}",
        secrets.display(),
        dest.ip(),
        dest.port()
    )
}

/// The secrets file: `api.username`/`api.password`, plus `extra` (more YAML at the top).
pub fn secrets_yaml(username: &str, password: &str, extra: &str) -> String {
    format!("api:\n  username: \"{username}\"\n  password: \"{password}\"\n{extra}")
}

/// nginx on an h2c listener (HTTP/2 with prior knowledge) passing every request on to an
/// HTTP/1.1 `upstream` with its `Host` as the client sent it (`:authority` for HTTP/2): an
/// HTTP/2 front for servers that speak HTTP/1.1 only, such as moto.
pub struct H2cFront {
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

impl H2cFront {
    pub fn start(ip: &str, upstream: SocketAddr) -> Self {
        let nginx = bins::tool("nginx", "the Debian package nginx-light");
        let dir = TempDir::new("nginx-h2c-front");
        let d = dir.path().display().to_string();
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let port = free_port(ip);
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{ listen {ip}:{port} http2;\n    \
               location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1;\n      \
                 proxy_set_header Host $http_host; client_max_body_size 0; }} }}\n}}\n"
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start on {addr}:\n{}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for H2cFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
