//! Temporary AWS credentials from the machine itself: the EC2 instance metadata service
//! (IMDSv2: a session token, then the instance role's credentials) and the ECS/EKS container
//! credentials endpoint. Both answer the same JSON (`AccessKeyId`, `SecretAccessKey`, `Token`,
//! `Expiration`); parsing is pure.

use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};

use super::creds::{AwsCredentials, parse_iso8601};
use crate::config::SecretString;
use crate::secrets::http::{HttpClient, sensitive};

/// The instance metadata service unless `AWS_EC2_METADATA_SERVICE_ENDPOINT` names another.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// The ECS agent's address for `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
pub const ECS_ENDPOINT: &str = "http://169.254.170.2";
/// Lifetime asked for the IMDSv2 session token (the maximum, 6 hours).
const TOKEN_TTL: &str = "21600";

/// Why no credentials came: the service could not be reached (or failed), or it refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    Unreachable(String),
    Refused(String),
}

/// The instance metadata endpoint from the environment read through `var`; `Err` with the
/// reason when `AWS_EC2_METADATA_DISABLED` is true.
pub fn imds_endpoint(var: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Err("AWS_EC2_METADATA_DISABLED is true".into());
    }
    Ok(var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| IMDS_ENDPOINT.into())
        .trim()
        .trim_end_matches('/')
        .to_owned())
}

/// The instance role's credentials, IMDSv2: a session token (PUT), the role's name, then its
/// credentials, each request carrying the token.
pub(crate) async fn from_imds(http: &HttpClient, endpoint: &str) -> Result<AwsCredentials, Fault> {
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("{endpoint}/latest/api/token"))
        .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL)
        .body(Full::new(Bytes::new()))
        .map_err(|_| Fault::Unreachable(format!("bad metadata endpoint {endpoint:?}")))?;
    let token = answer(http, req, "the IMDSv2 session token").await?;
    let token = SecretString::new(
        String::from_utf8(token.to_vec())
            .map_err(|_| Fault::Unreachable("the IMDSv2 token is not text".into()))?,
    );
    let get = |path: String| -> Result<Request<Full<Bytes>>, Fault> {
        let header = sensitive(&[token.expose()]).map_err(Fault::Unreachable)?;
        Request::builder()
            .method(Method::GET)
            .uri(format!("{endpoint}{path}"))
            .header("x-aws-ec2-metadata-token", header)
            .body(Full::new(Bytes::new()))
            .map_err(|_| Fault::Unreachable(format!("bad metadata endpoint {endpoint:?}")))
    };
    const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
    let roles = answer(http, get(ROLES.into())?, "the instance's role").await?;
    let role = std::str::from_utf8(&roles)
        .ok()
        .and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty()))
        .map(str::to_owned)
        .ok_or_else(|| {
            Fault::Refused("the instance has no IAM role (instance profile) attached".into())
        })?;
    if role.contains('/') || role.contains("..") {
        return Err(Fault::Refused(format!("unexpected role name {role:?}")));
    }
    let body = answer(
        http,
        get(format!("{ROLES}{role}"))?,
        "the role's credentials",
    )
    .await?;
    parse_credentials(&body).map_err(|r| Fault::Refused(format!("role {role}: {r}")))
}

/// `f` with what to change about the instance metadata service.
pub fn imds_fix(f: Fault) -> Fault {
    match f {
        Fault::Unreachable(r) => Fault::Unreachable(format!(
            "{r} (not on EC2, or the metadata service is off for this instance: enable it \
             (instance metadata options HttpEndpoint=enabled; from a container also \
             HttpPutResponseHopLimit=2), set AWS_EC2_METADATA_SERVICE_ENDPOINT to the right \
             endpoint, or give the store another auth)"
        )),
        Fault::Refused(r) if r.contains("(401") => Fault::Refused(format!(
            "{r} (the metadata service refused the IMDSv2 session token: a proxy in between \
             or a hop limit of 1 seen from a container; set HttpPutResponseHopLimit=2)"
        )),
        Fault::Refused(r) if r.contains("(403") => Fault::Refused(format!(
            "{r} (the metadata service is switched off for this instance, or an IAM policy \
             denies it: enable HttpEndpoint in the instance metadata options)"
        )),
        Fault::Refused(r) if r.contains("no IAM role") => Fault::Refused(format!(
            "{r}: attach an instance profile whose role may read the secrets"
        )),
        other => other,
    }
}

/// Where the container credentials endpoint is and the authorization to send, from the
/// environment read through `var`: `None` when neither `_RELATIVE_URI` nor `_FULL_URI` is set.
pub fn container_endpoint(
    var: impl Fn(&str) -> Option<String>,
) -> Option<Result<(String, Option<SecretString>), String>> {
    let uri = if let Some(rel) = var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        format!("{ECS_ENDPOINT}/{}", rel.trim().trim_start_matches('/'))
    } else {
        let full = var("AWS_CONTAINER_CREDENTIALS_FULL_URI")?;
        if let Err(r) = allowed_full_uri(full.trim()) {
            return Some(Err(r));
        }
        full.trim().to_owned()
    };
    let auth = if let Some(path) = var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        match std::fs::read_to_string(path.trim()) {
            Ok(t) => Some(SecretString::new(t.trim().to_owned())),
            Err(e) => {
                return Some(Err(format!(
                    "cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {}: {e}",
                    path.trim()
                )));
            }
        }
    } else {
        var("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(SecretString::new)
    };
    Some(Ok((uri, auth)))
}

/// As the SDKs: plain HTTP only to this machine or the ECS/EKS agents' link-local addresses,
/// anything else over HTTPS (the answer is a credential).
fn allowed_full_uri(uri: &str) -> Result<(), String> {
    let parsed: hyper::Uri = uri
        .parse()
        .map_err(|_| format!("AWS_CONTAINER_CREDENTIALS_FULL_URI {uri:?} is not a URL"))?;
    match parsed.scheme_str() {
        Some("https") => return Ok(()),
        Some("http") => {}
        _ => {
            return Err(format!(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI {uri:?} is not http(s)"
            ));
        }
    }
    let host = parsed.host().unwrap_or_default().trim_matches(['[', ']']);
    let local = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            ip.is_loopback()
                || ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"]
                    .iter()
                    .any(|a| a.parse::<std::net::IpAddr>().ok() == Some(ip))
        }
        Err(_) => host == "localhost",
    };
    if local {
        Ok(())
    } else {
        Err(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI {uri:?} is plain HTTP to another host: only this machine and the ECS/EKS agent addresses may be, anything else needs https"
        ))
    }
}

/// The container's role credentials.
pub(crate) async fn from_container(
    http: &HttpClient,
    uri: &str,
    auth: Option<&SecretString>,
) -> Result<AwsCredentials, Fault> {
    let mut req = Request::builder().method(Method::GET).uri(uri);
    if let Some(a) = auth {
        req = req.header(
            "authorization",
            sensitive(&[a.expose()]).map_err(Fault::Unreachable)?,
        );
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|_| Fault::Unreachable(format!("bad container credentials URI {uri:?}")))?;
    let body = answer(http, req, "the container credentials").await?;
    parse_credentials(&body).map_err(Fault::Refused)
}

/// The body of a 200 answer; 401/403 are refusals, anything else or no answer unreachable.
async fn answer(
    http: &HttpClient,
    req: Request<Full<Bytes>>,
    what: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, Fault> {
    let uri = req.uri().clone();
    let resp = http
        .send(req)
        .await
        .map_err(|e| Fault::Unreachable(format!("{what} from {uri}: {e}")))?;
    match resp.status {
        StatusCode::OK => Ok(resp.body),
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            Err(Fault::Refused(format!("{what} from {uri}: refused ({s})")))
        }
        s => Err(Fault::Unreachable(format!(
            "{what} from {uri}: answered {s}"
        ))),
    }
}

/// The credentials JSON both services answer.
pub fn parse_credentials(body: &[u8]) -> Result<AwsCredentials, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "the answer is not JSON".to_string())?;
    if let Some(code) = v["Code"].as_str().filter(|c| *c != "Success") {
        let message = v["Message"].as_str().unwrap_or_default();
        return Err(format!("the service says {code}: {message}"));
    }
    let field = |name: &str| {
        v[name]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("the answer has no {name}"))
    };
    let expires = match v["Expiration"].as_str() {
        Some(e) => Some(parse_iso8601(e).ok_or_else(|| format!("bad Expiration {e:?}"))?),
        None => None,
    };
    Ok(AwsCredentials {
        access_key_id: field("AccessKeyId")?.to_owned(),
        secret_access_key: SecretString::new(field("SecretAccessKey")?.to_owned()),
        session_token: v["Token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(|t| SecretString::new(t.to_owned())),
        expires,
    })
}

/// How long `c` still works, if it expires.
pub fn remaining(c: &AwsCredentials, now: SystemTime) -> Option<std::time::Duration> {
    c.expires.map(|e| e.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn imds_endpoint_default_override_and_disable() {
        assert_eq!(imds_endpoint(vars(&[])).unwrap(), IMDS_ENDPOINT);
        assert_eq!(
            imds_endpoint(vars(&[(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                "http://127.0.0.1:9/"
            )]))
            .unwrap(),
            "http://127.0.0.1:9"
        );
        let off = imds_endpoint(vars(&[("AWS_EC2_METADATA_DISABLED", "TRUE")])).unwrap_err();
        assert!(off.contains("AWS_EC2_METADATA_DISABLED"), "{off}");
        assert!(imds_endpoint(vars(&[("AWS_EC2_METADATA_DISABLED", "false")])).is_ok());
    }

    #[test]
    fn container_endpoint_relative_full_and_token() {
        assert!(container_endpoint(vars(&[])).is_none());
        let (uri, auth) = container_endpoint(vars(&[(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "/v2/credentials/abc",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(uri, "http://169.254.170.2/v2/credentials/abc");
        assert!(auth.is_none());
        let (uri, auth) = container_endpoint(vars(&[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://127.0.0.1:8080/creds",
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "canary-token"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(uri, "http://127.0.0.1:8080/creds");
        assert_eq!(auth.unwrap().expose(), "canary-token");
        let far = container_endpoint(vars(&[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://example.com/creds",
        )]))
        .unwrap()
        .unwrap_err();
        assert!(far.contains("needs https"), "{far}");
        assert!(
            container_endpoint(vars(&[(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "https://example.com/creds"
            )]))
            .unwrap()
            .is_ok()
        );
    }

    #[test]
    fn metadata_faults_say_what_to_change() {
        let Fault::Unreachable(r) = imds_fix(Fault::Unreachable("connection refused".into()))
        else {
            panic!()
        };
        assert!(r.contains("AWS_EC2_METADATA_SERVICE_ENDPOINT"), "{r}");
        let Fault::Refused(r) = imds_fix(Fault::Refused("x: refused (401 Unauthorized)".into()))
        else {
            panic!()
        };
        assert!(r.contains("HttpPutResponseHopLimit"), "{r}");
        let Fault::Refused(r) = imds_fix(Fault::Refused("x: refused (403 Forbidden)".into()))
        else {
            panic!()
        };
        assert!(r.contains("HttpEndpoint"), "{r}");
    }

    #[test]
    fn credentials_json() {
        let c = parse_credentials(
            br#"{"Code":"Success","AccessKeyId":"ASIAX","SecretAccessKey":"s3cr3t","Token":"tok","Expiration":"2026-12-04T16:10:40Z"}"#,
        )
        .unwrap();
        assert_eq!(c.access_key_id, "ASIAX");
        assert_eq!(c.secret_access_key.expose(), "s3cr3t");
        assert_eq!(c.session_token.unwrap().expose(), "tok");
        assert!(c.expires.is_some());
        let e = parse_credentials(br#"{"Code":"AssumeRoleUnauthorizedAccess","Message":"no"}"#)
            .unwrap_err();
        assert!(e.contains("AssumeRoleUnauthorizedAccess"), "{e}");
        assert!(parse_credentials(b"<html>").is_err());
        let missing = parse_credentials(br#"{"AccessKeyId":"A"}"#).unwrap_err();
        assert!(missing.contains("SecretAccessKey"), "{missing}");
    }
}
