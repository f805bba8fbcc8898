//! SigV4 signing of a request (the `aws-sigv4` crate does the cryptography). Pure: the time is
//! an argument.

use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use super::creds::AwsCredentials;

/// Adds the `Authorization`, `X-Amz-Date` (and `X-Amz-Security-Token`) headers to `req`, whose
/// body is `body`. The request must already carry every header to be signed (`host` is taken
/// from the URI when absent).
pub fn sign_request<B>(
    req: &mut hyper::Request<B>,
    body: &[u8],
    creds: &AwsCredentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<(), String> {
    let identity: Identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        creds.secret_access_key.expose().to_string(),
        creds.session_token.as_ref().map(|t| t.expose().to_string()),
        None,
        "latch",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let uri = req.uri().to_string();
    let headers: Vec<(&str, &str)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri,
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("cannot sign the request: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    for name in ["authorization", "x-amz-security-token"] {
        if let Some(v) = req.headers_mut().get_mut(name) {
            v.set_sensitive(true);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretString;
    use std::time::{Duration, UNIX_EPOCH};

    fn creds(token: Option<&str>) -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SecretString::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: token.map(|t| SecretString::new(t.into())),
            expires: None,
        }
    }

    fn request() -> hyper::Request<()> {
        hyper::Request::builder()
            .method("POST")
            .uri("https://secretsmanager.us-east-1.amazonaws.com/")
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", "secretsmanager.GetSecretValue")
            .body(())
            .unwrap()
    }

    #[test]
    fn signs_with_a_stable_signature() {
        // 2015-08-30T12:36:00Z, the date of AWS's own SigV4 examples
        let time = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let body = br#"{"SecretId":"orders-db"}"#;
        let mut a = request();
        sign_request(
            &mut a,
            body,
            &creds(None),
            "us-east-1",
            "secretsmanager",
            time,
        )
        .unwrap();
        let auth = a.headers()["authorization"].to_str().unwrap().to_string();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/secretsmanager/aws4_request"),
            "{auth}"
        );
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-target"),
            "{auth}"
        );
        assert_eq!(a.headers()["x-amz-date"], "20150830T123600Z");
        assert!(a.headers()["authorization"].is_sensitive());
        // deterministic, and bound to the body
        let mut b = request();
        sign_request(
            &mut b,
            body,
            &creds(None),
            "us-east-1",
            "secretsmanager",
            time,
        )
        .unwrap();
        assert_eq!(a.headers()["authorization"], b.headers()["authorization"]);
        let mut c = request();
        sign_request(
            &mut c,
            b"{}",
            &creds(None),
            "us-east-1",
            "secretsmanager",
            time,
        )
        .unwrap();
        assert_ne!(a.headers()["authorization"], c.headers()["authorization"]);
    }

    #[test]
    fn session_token_is_sent() {
        let mut r = request();
        sign_request(
            &mut r,
            b"{}",
            &creds(Some("FwoGZXIvYXdzEX")),
            "eu-west-1",
            "secretsmanager",
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(r.headers()["x-amz-security-token"], "FwoGZXIvYXdzEX");
        assert!(r.headers()["x-amz-security-token"].is_sensitive());
    }
}
