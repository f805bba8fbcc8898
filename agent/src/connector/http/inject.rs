//! Putting the policy's credential into one request, sans-IO: the request head in, the head
//! to send out. Everything the policy does not name stays as the application wrote it.
use base64::Engine as _;
use bytes::Bytes;
use http::{
    HeaderName, HeaderValue,
    header::{AUTHORIZATION, HOST},
    request::Parts,
    uri::PathAndQuery,
};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    config::{AppCredentials, HttpSpec, Injection},
    secrets::Credentials,
};

/// Why a request could not carry the credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// The policy's injection needs a value the store did not give.
    #[error("the credentials have no {0}")]
    Missing(&'static str),
    /// The value cannot go into a header (a control character, say). Never shows the value.
    #[error("the credential cannot be sent in an HTTP header")]
    NotAHeaderValue,
    /// The request target is not one latch can rewrite (`CONNECT host:port`, `*` with a query).
    #[error("request target {0:?} cannot carry a query credential")]
    Target(String),
}

/// Whether the request already carries its own credential where the policy would put one.
pub fn app_has_credential(parts: &Parts, inject: &Injection) -> bool {
    match inject {
        Injection::Basic | Injection::Bearer | Injection::AwsSigV4(_) => {
            parts.headers.contains_key(AUTHORIZATION)
        }
        Injection::Header { name, .. } => parts.headers.contains_key(name.as_str()),
        Injection::Query { name } => parts
            .uri
            .query()
            .is_some_and(|q| query_pairs(q).any(|p| param_is(p, name))),
    }
}

/// Prepares `parts` for the target: origin-form target, `Host` for the real target
/// (`host`: what to send, if it must change), the application's credential dropped
/// (`appCredentials: replace`) and latch's put in — except for SigV4, which signs the finished
/// request later ([`super::sigv4`]). Returns whether latch's credential is to be added
/// (false when `appCredentials: keep` and the application sent its own).
pub fn prepare(
    parts: &mut Parts,
    spec: &HttpSpec,
    host: Option<&HeaderValue>,
    creds: &Credentials,
) -> Result<bool, InjectError> {
    origin_form(parts)?;
    if let Some(h) = host {
        parts.headers.insert(HOST, h.clone());
    }
    if spec.app_credentials == AppCredentials::Keep && app_has_credential(parts, &spec.inject) {
        return Ok(false);
    }
    drop_app_credential(parts, &spec.inject)?;
    match &spec.inject {
        Injection::Basic => {
            let user = creds
                .username
                .as_ref()
                .ok_or(InjectError::Missing("username"))?;
            let pass = creds
                .password
                .as_ref()
                .ok_or(InjectError::Missing("password"))?;
            let plain = Zeroizing::new(format!("{}:{}", user.expose(), pass.expose()));
            let value = Zeroizing::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(plain.as_bytes())
            ));
            parts.headers.insert(AUTHORIZATION, sensitive(&value)?);
        }
        Injection::Bearer => {
            let token = creds
                .password
                .as_ref()
                .ok_or(InjectError::Missing("password"))?;
            let value = Zeroizing::new(format!("Bearer {}", token.expose()));
            parts.headers.insert(AUTHORIZATION, sensitive(&value)?);
        }
        Injection::Header { name, template } => {
            let value = fill(template, creds)?;
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| InjectError::NotAHeaderValue)?;
            parts.headers.insert(name, sensitive(&value)?);
        }
        Injection::Query { name } => {
            let secret = creds
                .password
                .as_ref()
                .ok_or(InjectError::Missing("password"))?;
            add_query(parts, name, secret.expose())?;
        }
        Injection::AwsSigV4(_) => {}
    }
    Ok(true)
}

/// `{secret}` and `{username}` replaced in a header template.
fn fill(template: &str, creds: &Credentials) -> Result<Zeroizing<String>, InjectError> {
    let mut out = Zeroizing::new(template.to_owned());
    if out.contains("{secret}") {
        let s = creds
            .password
            .as_ref()
            .ok_or(InjectError::Missing("password"))?;
        out = Zeroizing::new(out.replace("{secret}", s.expose()));
    }
    if out.contains("{username}") {
        let u = creds
            .username
            .as_ref()
            .ok_or(InjectError::Missing("username"))?;
        out = Zeroizing::new(out.replace("{username}", u.expose()));
    }
    Ok(out)
}

/// A header value holding a credential: marked sensitive (HPACK never indexes it) and backed
/// by memory that is wiped when the last reference to it goes (see [`wiped_bytes`]).
pub(super) fn sensitive(value: &str) -> Result<HeaderValue, InjectError> {
    let mut v = HeaderValue::from_maybe_shared(wiped_bytes(value))
        .map_err(|_| InjectError::NotAHeaderValue)?;
    v.set_sensitive(true);
    Ok(v)
}

/// A copy of `value` in a [`Bytes`] whose buffer is zeroed when the last clone is dropped.
/// `HeaderValue` and `PathAndQuery` keep a `Bytes` they are given as it is, so the credential
/// they carry is wiped with them (what hyper copies into its own write buffer is not).
pub(super) fn wiped_bytes(value: &str) -> Bytes {
    Bytes::from_owner(Wiped(value.as_bytes().to_vec()))
}

struct Wiped(Vec<u8>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Removes what the application sent where latch's credential goes.
fn drop_app_credential(parts: &mut Parts, inject: &Injection) -> Result<(), InjectError> {
    match inject {
        Injection::Basic | Injection::Bearer => {
            parts.headers.remove(AUTHORIZATION);
        }
        Injection::AwsSigV4(_) => {
            for h in [
                "authorization",
                "x-amz-date",
                "x-amz-security-token",
                "x-amz-content-sha256",
            ] {
                parts.headers.remove(h);
            }
        }
        Injection::Header { name, .. } => {
            parts.headers.remove(name.as_str());
        }
        Injection::Query { name } => {
            let Some(q) = parts.uri.query() else {
                return Ok(());
            };
            if !query_pairs(q).any(|p| param_is(p, name)) {
                return Ok(());
            }
            let kept: Vec<&str> = query_pairs(q).filter(|p| !param_is(p, name)).collect();
            let path = parts.uri.path().to_owned();
            let pq = if kept.is_empty() {
                path
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            set_path_and_query(parts, &pq)?;
        }
    }
    Ok(())
}

fn query_pairs(q: &str) -> impl Iterator<Item = &str> {
    q.split('&').filter(|p| !p.is_empty())
}

/// Whether the pair `p` (`name=value`, raw) names the parameter `name`, as a server decodes it.
fn param_is(p: &str, name: &str) -> bool {
    let raw = p.split_once('=').map_or(p, |(n, _)| n);
    form_urlencoded::parse(raw.as_bytes())
        .next()
        .is_some_and(|(n, _)| n == name)
}

fn add_query(parts: &mut Parts, name: &str, value: &str) -> Result<(), InjectError> {
    let encoded: Zeroizing<String> =
        Zeroizing::new(form_urlencoded::byte_serialize(value.as_bytes()).collect());
    let pq = Zeroizing::new(match parts.uri.query() {
        Some(q) if !q.is_empty() => format!("{}?{q}&{name}={}", parts.uri.path(), *encoded),
        _ => format!("{}?{name}={}", parts.uri.path(), *encoded),
    });
    let pq = PathAndQuery::from_maybe_shared(wiped_bytes(&pq))
        .map_err(|_| InjectError::NotAHeaderValue)?;
    parts.uri = pq.into();
    Ok(())
}

fn set_path_and_query(parts: &mut Parts, pq: &str) -> Result<(), InjectError> {
    let pq = PathAndQuery::try_from(pq).map_err(|_| InjectError::NotAHeaderValue)?;
    parts.uri = pq.into();
    Ok(())
}

/// The request target in origin form (`/path?query`): an application that wrote the absolute
/// form (`http://host/path`) talks to the destination all the same.
fn origin_form(parts: &mut Parts) -> Result<(), InjectError> {
    if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        return Ok(());
    }
    let Some(pq) = parts.uri.path_and_query().cloned() else {
        return Err(InjectError::Target(parts.uri.to_string()));
    };
    parts.uri = pq.into();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AwsSigning, SecretString};

    #[test]
    fn credential_headers_and_queries_keep_the_wiped_buffer_instead_of_copying_it() {
        // The property the wiping relies on: `HeaderValue` / `PathAndQuery` hold the very
        // `Bytes` they are given, so dropping them drops (and zeroes) the credential's buffer.
        let bytes = wiped_bytes("Bearer canary-7d1f");
        let value = HeaderValue::from_maybe_shared(bytes.clone()).unwrap();
        assert_eq!(value.as_bytes().as_ptr(), bytes.as_ptr());
        let pq = wiped_bytes("/x?key=canary-7d1f");
        let parsed = PathAndQuery::from_maybe_shared(pq.clone()).unwrap();
        assert_eq!(parsed.as_str().as_ptr(), pq.as_ptr());
        let v = sensitive("Bearer canary-7d1f").unwrap();
        assert!(v.is_sensitive());
        assert_eq!(format!("{v:?}"), "Sensitive");
    }

    fn creds(user: Option<&str>, pass: &str) -> Credentials {
        Credentials::new(
            user.map(|u| SecretString::new(u.into())),
            Some(SecretString::new(pass.into())),
        )
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn spec(inject: Injection, keep: bool) -> HttpSpec {
        HttpSpec {
            inject,
            app_credentials: if keep {
                AppCredentials::Keep
            } else {
                AppCredentials::Replace
            },
            ..Default::default()
        }
    }

    #[test]
    fn basic_replaces_the_applications_authorization() {
        let mut p = parts(
            "/a?b=1",
            &[("authorization", "Basic bm9wZTpub3Bl"), ("x-a", "1")],
        );
        let added = prepare(
            &mut p,
            &spec(Injection::Basic, false),
            None,
            &creds(Some("aladdin"), "opensesame"),
        )
        .unwrap();
        assert!(added);
        assert_eq!(
            p.headers.get_all(AUTHORIZATION).iter().collect::<Vec<_>>(),
            ["Basic YWxhZGRpbjpvcGVuc2VzYW1l"]
        );
        assert!(p.headers[AUTHORIZATION].is_sensitive());
        assert_eq!(p.headers["x-a"], "1");
        assert_eq!(p.uri, "/a?b=1");
    }

    #[test]
    fn keep_leaves_a_request_with_its_own_credential_alone() {
        let mut p = parts("/", &[("authorization", "Bearer app")]);
        let added = prepare(
            &mut p,
            &spec(Injection::Bearer, true),
            None,
            &creds(None, "t"),
        )
        .unwrap();
        assert!(!added);
        assert_eq!(p.headers[AUTHORIZATION], "Bearer app");
        let mut p = parts("/", &[]);
        assert!(
            prepare(
                &mut p,
                &spec(Injection::Bearer, true),
                None,
                &creds(None, "t")
            )
            .unwrap()
        );
        assert_eq!(p.headers[AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn header_template_fills_secret_and_username() {
        let inject = Injection::Header {
            name: "X-Api-Key".into(),
            template: "{username}/{secret}".into(),
        };
        let mut p = parts("/", &[("x-api-key", "mine"), ("X-API-KEY", "again")]);
        prepare(&mut p, &spec(inject, false), None, &creds(Some("u"), "k3y")).unwrap();
        assert_eq!(
            p.headers.get_all("x-api-key").iter().collect::<Vec<_>>(),
            ["u/k3y"]
        );
    }

    #[test]
    fn query_parameter_replaces_every_spelling_and_keeps_the_rest_byte_for_byte() {
        let inject = Injection::Query {
            name: "api_key".into(),
        };
        let mut p = parts(
            "http://h:8080/p/a%20b?x=1&api_key=app&y=%2F&api%5Fkey=enc&z",
            &[],
        );
        prepare(
            &mut p,
            &spec(inject, false),
            None,
            &creds(None, "s e&c=r/t"),
        )
        .unwrap();
        assert_eq!(p.uri, "/p/a%20b?x=1&y=%2F&z&api_key=s+e%26c%3Dr%2Ft");
        let mut p = parts("/", &[]);
        let inject = Injection::Query { name: "k".into() };
        prepare(&mut p, &spec(inject, false), None, &creds(None, "v")).unwrap();
        assert_eq!(p.uri, "/?k=v");
    }

    #[test]
    fn host_is_set_for_the_real_target() {
        let mut p = parts("/", &[("host", "127.0.0.2:8080")]);
        let host = HeaderValue::from_static("api.example.com");
        prepare(
            &mut p,
            &spec(Injection::Bearer, false),
            Some(&host),
            &creds(None, "t"),
        )
        .unwrap();
        assert_eq!(p.headers[HOST], "api.example.com");
    }

    #[test]
    fn a_secret_that_cannot_be_a_header_value_is_refused_without_showing_it() {
        let mut p = parts("/", &[]);
        let err = prepare(
            &mut p,
            &spec(Injection::Bearer, false),
            None,
            &creds(None, "bad\r\nX-Injected: 1"),
        )
        .unwrap_err();
        assert_eq!(err, InjectError::NotAHeaderValue);
        assert!(!err.to_string().contains("Injected"));
        assert!(p.headers.get(AUTHORIZATION).is_none());
    }

    #[test]
    fn sigv4_drops_the_applications_signature_and_adds_nothing_yet() {
        let inject = Injection::AwsSigV4(AwsSigning {
            service: "sqs".into(),
            region: "us-east-1".into(),
            session_token: None,
            unsigned_payload: false,
        });
        let mut p = parts(
            "/",
            &[("authorization", "AWS4-HMAC-SHA256 x"), ("x-amz-date", "d")],
        );
        assert!(prepare(&mut p, &spec(inject, false), None, &creds(Some("AK"), "SK")).unwrap());
        assert!(p.headers.get(AUTHORIZATION).is_none());
        assert!(p.headers.get("x-amz-date").is_none());
    }

    #[test]
    fn missing_username_for_basic_is_an_error() {
        let mut p = parts("/", &[]);
        assert_eq!(
            prepare(
                &mut p,
                &spec(Injection::Basic, false),
                None,
                &creds(None, "p")
            ),
            Err(InjectError::Missing("username"))
        );
    }
}
