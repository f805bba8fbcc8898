//! Decoding `spec.http` (see [`super::http`]).

use super::decode::{self, Cx, Map};
use super::decode_policy::secret_ref;
use super::http::{AppCredentials, AwsSigning, HttpSpec, Injection};
use super::net;
use super::policy::AppTlsMode;
use super::schema_policy as schema;
use super::yaml::{Entry, Mark};

/// `http.aws.payload`: whether the payload is left unsigned.
pub const PAYLOADS: [(&str, bool); 2] = [("signed", false), ("unsigned", true)];

/// The placeholders a header template may hold.
const PLACEHOLDERS: [&str; 2] = ["{secret}", "{username}"];

/// `http: {inject, header, query, aws, appCredentials, targetPort, host, appTls}`.
/// `default_store` is the credentials' store (for `aws.sessionToken`). `appTls` (HTTPS
/// interception) is returned beside the spec, with where it was written, for the policy.
pub fn http(
    cx: &mut Cx,
    entry: &Entry,
    default_store: Option<&str>,
) -> Option<(HttpSpec, Option<(AppTlsMode, Mark)>)> {
    let mut m = Map::new(cx, &entry.value, entry.key_mark, "http", &schema::HTTP)?;
    let before = cx.errors.len();
    let inject_entry = m.entry("inject");
    let named = inject_entry.and_then(|e| {
        let choices: Vec<(&'static str, &'static str)> =
            Injection::NAMES.iter().map(|n| (*n, *n)).collect();
        decode::choice(cx, &e.value, "http.inject", &choices).map(|n| (n, e.value.mark))
    });
    let header = m.entry("header").and_then(|e| header(cx, e));
    let query = m.entry("query").and_then(|e| {
        let name = decode::string(cx, &e.value, "http.query")?;
        query_name(&name)
            .map_err(|r| cx.error(e.value.mark, format!("invalid http.query {name:?}: {r}")))
            .ok()
            .map(|_| name)
    });
    let aws = m.entry("aws").and_then(|e| aws(cx, e, default_store));
    let given: Vec<(&str, Mark)> = [
        ("header", m.entry("header")),
        ("query", m.entry("query")),
        ("aws", m.entry("aws")),
    ]
    .into_iter()
    .filter_map(|(k, e)| e.map(|e| (k, e.key_mark)))
    .collect();
    let mut given = given;
    given.sort_by_key(|(_, at)| *at);
    if let [_, (second, at), ..] = given.as_slice() {
        cx.error(
            *at,
            format!(
                "http.{second} and http.{} cannot both be given: a policy injects one way",
                given[0].0
            ),
        );
    }
    // What `inject` says, or what the one detail given implies, else Basic.
    let implied = given.first().map(|(k, _)| match *k {
        "header" => "header",
        "query" => "query",
        _ => "aws-sigv4",
    });
    let kind = match (named, implied) {
        (Some((n, _)), None) => n,
        (Some((n, at)), Some(i)) if n != i => {
            cx.error(
                at,
                format!(
                    "http.inject is {n:?} but the block gives the details of {i:?}; remove one"
                ),
            );
            n
        }
        (Some((n, _)), Some(_)) => n,
        (None, Some(i)) => i,
        (None, None) => "basic",
    };
    let needs = |cx: &mut Cx, what: &str| {
        cx.error(
            inject_entry.map_or(entry.key_mark, |e| e.value.mark),
            format!("http.inject {kind:?} needs http.{what}"),
        )
    };
    let inject = match kind {
        "basic" => Some(Injection::Basic),
        "bearer" => Some(Injection::Bearer),
        "header" => match header {
            Some((name, template)) => Some(Injection::Header { name, template }),
            None => {
                if m.entry("header").is_none() {
                    needs(cx, "header (e.g. \"X-Api-Key: {secret}\")");
                }
                None
            }
        },
        "query" => match query {
            Some(name) => Some(Injection::Query { name }),
            None => {
                if m.entry("query").is_none() {
                    needs(cx, "query (the parameter's name)");
                }
                None
            }
        },
        _ => match aws {
            Some(a) => Some(Injection::AwsSigV4(a)),
            None => {
                if m.entry("aws").is_none() {
                    needs(cx, "aws ({service, region})");
                }
                None
            }
        },
    };
    let app_credentials = match m.get("appCredentials") {
        Some(n) => decode::choice(cx, n, "http.appCredentials", &AppCredentials::ALL),
        None => Some(AppCredentials::Replace),
    };
    let target_port = m
        .get("targetPort")
        .and_then(|n| decode::integer(cx, n, "http.targetPort", 1, 65535))
        .map(|p| p as u16);
    let host = m.get("host").and_then(|n| {
        let text = decode::string(cx, n, "http.host")?;
        host_header(&text)
            .map_err(|r| cx.error(n.mark, format!("invalid http.host {text:?}: {r}")))
            .ok()
            .map(|_| text)
    });
    let app_tls = m
        .entry("appTls")
        .map(|e| (super::decode_policy::app_tls(cx, e), e.key_mark));
    m.finish(cx);
    if cx.errors.len() > before {
        return None;
    }
    let app_tls = match app_tls {
        Some((mode, at)) => Some((mode?, at)),
        None => None,
    };
    Some((
        HttpSpec {
            inject: inject?,
            app_credentials: app_credentials?,
            target_port,
            host,
        },
        app_tls,
    ))
}

/// `header: "Name: template"`.
fn header(cx: &mut Cx, e: &Entry) -> Option<(String, String)> {
    let text = decode::string(cx, &e.value, "http.header")?;
    let parsed = (|| {
        let (name, template) = text
            .split_once(':')
            .ok_or("write it as \"Name: value\", e.g. \"X-Api-Key: {secret}\"")?;
        let name = name.trim();
        let template = template.trim();
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err("the header name must be an HTTP token (letters, digits, -, _ ...)");
        }
        if ["host", "content-length", "transfer-encoding", "connection"]
            .contains(&name.to_ascii_lowercase().as_str())
        {
            return Err("latch does not inject into a header that frames the request");
        }
        if !PLACEHOLDERS.iter().any(|p| template.contains(p)) {
            return Err("the value holds no {secret} (or {username}): it would inject nothing");
        }
        if template.bytes().any(|b| b.is_ascii_control()) {
            return Err("the value holds control characters");
        }
        Ok((name.to_owned(), template.to_owned()))
    })();
    parsed
        .map_err(|r| cx.error(e.value.mark, format!("invalid http.header {text:?}: {r}")))
        .ok()
}

/// `aws: {service, region, sessionToken?, payload?: signed | unsigned}`.
fn aws(cx: &mut Cx, e: &Entry, default_store: Option<&str>) -> Option<AwsSigning> {
    let mut m = Map::new(cx, &e.value, e.key_mark, "http.aws", &schema::HTTP_AWS)?;
    let service = m.require_string(cx, "service");
    let region = m.require_string(cx, "region");
    let session_token = m
        .entry("sessionToken")
        .map(|t| secret_ref(cx, t, "http.aws.sessionToken", default_store));
    let payload = match m.get("payload") {
        Some(n) => decode::choice(cx, n, "http.aws.payload", &PAYLOADS).map(Some),
        None => Some(None),
    };
    m.finish(cx);
    for (what, v) in [("service", &service), ("region", &region)] {
        if let Some(v) = v
            && !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            cx.error(
                e.value.locate(&[what]),
                format!("invalid http.aws.{what} {v:?}: letters, digits, - and _ only"),
            );
            return None;
        }
    }
    let service = service?;
    let unsigned_payload = payload?.unwrap_or(service == "s3");
    Some(AwsSigning {
        region: region?,
        session_token: match session_token {
            Some(t) => Some(t?),
            None => None,
        },
        unsigned_payload,
        service,
    })
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn query_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name
        .bytes()
        .any(|b| b.is_ascii_control() || b" #&=?%+".contains(&b) || !b.is_ascii())
    {
        return Err("a parameter name of letters, digits and -._~ only");
    }
    Ok(())
}

/// A host name or address, with an optional port.
fn host_header(text: &str) -> Result<(), String> {
    let host = match text.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
            p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?;
            h
        }
        _ => text,
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    net::host_name(bare).map(|_| ())
}
