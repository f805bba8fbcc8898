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
