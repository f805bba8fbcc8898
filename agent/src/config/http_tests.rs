//! The `http:` block of a policy: each injection, the defaults, and each error with its place.
use super::tests::{STORES, errors, policy};
use super::*;

const HEAD: &str =
    "  destination: {host: api.internal, port: 80}\n  workloads: [{uid: 1}]\n  protocol: http\n";

fn load(spec: &str) -> Config {
    load_str("h.yaml", &format!("{STORES}{}", policy("api", spec)))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn errs(spec: &str) -> Vec<String> {
    errors("h.yaml", &format!("{STORES}{}", policy("api", spec)))
}

#[test]
fn username_and_password_alone_mean_basic_over_verified_tls() {
    let c = load(&format!(
        "{HEAD}  credentials: {{store: local, username: {{path: api, field: u}}, password: {{path: api, field: p}}}}\n"
    ));
    let p = c.policy("api").unwrap();
    assert_eq!(p.http, HttpSpec::default());
    assert_eq!(p.http.inject, Injection::Basic);
    assert_eq!(p.http.app_credentials, AppCredentials::Replace);
    assert_eq!(p.tls.mode, TlsMode::VerifyFull);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn each_injection_decodes() {
    let creds = "  credentials: {store: local, password: {path: api, field: key}}\n";
    let cases: [(&str, Injection); 4] = [
        ("{inject: bearer}", Injection::Bearer),
        (
            "{header: \"X-Api-Key: {secret}\"}",
            Injection::Header {
                name: "X-Api-Key".into(),
                template: "{secret}".into(),
            },
        ),
        (
            "{inject: query, query: api_key}",
            Injection::Query {
                name: "api_key".into(),
            },
        ),
        (
            "{inject: bearer, appCredentials: keep, targetPort: 443, host: api.example.com}",
            Injection::Bearer,
        ),
    ];
    for (block, want) in cases {
        let c = load(&format!("{HEAD}{creds}  http: {block}\n"));
        assert_eq!(c.policy("api").unwrap().http.inject, want, "{block}");
    }
    let c = load(&format!(
        "{HEAD}{creds}  http: {{inject: bearer, appCredentials: keep, targetPort: 443, host: api.example.com}}\n"
    ));
    let h = &c.policy("api").unwrap().http;
    assert_eq!(h.app_credentials, AppCredentials::Keep);
    assert_eq!(h.target_port, Some(443));
    assert_eq!(h.host.as_deref(), Some("api.example.com"));

    let c = load(&format!(
        "{HEAD}  credentials: {{store: local, username: {{path: aws, field: id}}, password: {{path: aws, field: key}}}}\n  http:\n    aws: {{service: s3, region: eu-west-1, sessionToken: {{path: aws, field: token}}}}\n"
    ));
    let Injection::AwsSigV4(a) = &c.policy("api").unwrap().http.inject else {
        panic!("not sigv4");
    };
    assert_eq!((a.service.as_str(), a.region.as_str()), ("s3", "eu-west-1"));
    assert!(a.unsigned_payload, "s3 streams unsigned by default");
    assert_eq!(a.session_token.as_ref().unwrap().store, "local");
}

#[test]
fn plain_text_to_the_target_is_explicit_and_warned() {
    let c = load(&format!(
        "{HEAD}  tls: {{mode: disable}}\n  credentials: {{store: local, password: {{path: api}}}}\n  http: {{inject: bearer}}\n"
    ));
    assert_eq!(c.policy("api").unwrap().tls.mode, TlsMode::Disable);
    assert_eq!(c.warnings.len(), 1);
    let w = c.warnings[0].to_string();
    assert!(w.starts_with("h.yaml:25:3: tls mode \"disable\""), "{w}");
}

#[test]
fn errors_name_the_place_and_the_reason() {
    let token = "  credentials: {store: local, password: {path: api}}\n";
    let cases = [
        (
            format!("{HEAD}{token}"),
            "h.yaml:21:1: http inject \"basic\" needs credentials.username as well as credentials.password; for a token alone set http.inject to \"bearer\", or give http.header or http.query",
        ),
        (
            format!("{HEAD}{token}  http: {{header: \"X-Api-Key\"}}\n"),
            "h.yaml:26:18: invalid http.header \"X-Api-Key\": write it as \"Name: value\", e.g. \"X-Api-Key: {secret}\"",
        ),
        (
            format!("{HEAD}{token}  http: {{header: \"X-Api-Key: fixed\"}}\n"),
            "h.yaml:26:18: invalid http.header \"X-Api-Key: fixed\": the value holds no {secret} (or {username}): it would inject nothing",
        ),
        (
            format!("{HEAD}{token}  http: {{header: \"Host: {{secret}}\"}}\n"),
            "h.yaml:26:18: invalid http.header \"Host: {secret}\": latch does not inject into a header that frames the request",
        ),
        (
            format!("{HEAD}{token}  http: {{inject: query}}\n"),
            "h.yaml:26:18: http.inject \"query\" needs http.query (the parameter's name)",
        ),
        (
            format!("{HEAD}{token}  http: {{inject: bearer, query: k}}\n"),
            "h.yaml:26:18: http.inject is \"bearer\" but the block gives the details of \"query\"; remove one",
        ),
        (
            format!("{HEAD}{token}  http: {{query: k, header: \"A: {{secret}}\"}}\n"),
            "h.yaml:26:20: http.header and http.query cannot both be given: a policy injects one way",
        ),
        (
            format!("{HEAD}{token}  http: {{inject: bearer, appCredentials: drop}}\n"),
            "h.yaml:26:42: invalid http.appCredentials \"drop\": expected \"replace\" or \"keep\"",
        ),
        (
            format!("{HEAD}{token}  http: {{inject: bearer, injct: 1}}\n"),
            "h.yaml:26:26: unknown field \"injct\" in http (did you mean \"inject\"?)",
        ),
        (
            format!("{HEAD}{token}  http: {{aws: {{region: us-east-1}}}}\n"),
            "h.yaml:26:10: missing field \"service\" in http.aws",
        ),
    ];
    let mut wrong = Vec::new();
    for (spec, want) in cases {
        let got = errs(&spec);
        if !got.iter().any(|e| e == want) {
            wrong.push(format!("want {want}\n got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Another protocol's policy with an http block.
    let got = errors(
        "h.yaml",
        &format!(
            "{STORES}{}",
            policy(
                "t",
                "  destination: {host: a.internal, port: 1}\n  workloads: [{uid: 1}]\n  http: {inject: bearer}\n"
            )
        ),
    );
    assert_eq!(
        got,
        ["h.yaml:24:3: http options apply to protocol http only (not tcp); remove http"]
    );
}

#[test]
fn https_interception_is_opt_in_and_needs_a_verified_target() {
    let creds = "  credentials: {store: local, password: {path: api, field: key}}\n";
    let p = load(&format!("{HEAD}{creds}  http: {{inject: bearer}}\n"));
    assert_eq!(p.policy("api").unwrap().app_tls, AppTlsMode::Disable);
    let p = load(&format!(
        "{HEAD}{creds}  http: {{inject: bearer, appTls: {{mode: enable}}}}\n"
    ));
    assert_eq!(p.policy("api").unwrap().app_tls, AppTlsMode::Enable);
    let e = errs(&format!(
        "{HEAD}{creds}  http: {{inject: bearer, appTls: {{mode: auto}}}}\n"
    ));
    assert!(
        e.iter().any(|e| e.contains("HTTPS interception is opt-in")),
        "{e:?}"
    );
    let e = errs(&format!(
        "{HEAD}{creds}  tls: {{mode: disable}}\n  http: {{inject: bearer, appTls: {{mode: enable}}}}\n"
    ));
    assert!(
        e.iter()
            .any(|e| e.contains("needs tls mode \"verify-full\" (not \"disable\")")),
        "{e:?}"
    );
    let e = errs(&format!(
        "{HEAD}{creds}  appTls: {{mode: enable}}\n  http: {{inject: bearer}}\n"
    ));
    assert!(
        e.iter().any(|e| e.contains("write appTls under http")),
        "{e:?}"
    );
}
