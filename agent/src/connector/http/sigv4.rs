//! AWS Signature Version 4 on a request going to the target (`http.inject: aws-sigv4`). The
//! `aws-sigv4` crate does the cryptography; this decides what is signed: every header the
//! request carries (the `Host` included), and the body's SHA-256 — or `UNSIGNED-PAYLOAD`
//! where the policy says so (S3's default), so a large upload streams unbuffered.
use std::time::SystemTime;

use aws_sigv4::{
    http_request::{
        PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode, sign,
    },
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use http::request::Parts;

use crate::{
    config::{AwsSigning, SecretString},
    secrets::Credentials,
};

/// Header fields left out of the signature.
const UNSIGNED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "user-agent",
];

/// Signs `parts` in place (`Authorization`, `X-Amz-Date`, `X-Amz-Security-Token`, and
/// `X-Amz-Content-Sha256` for S3 or an unsigned payload). `body`: the whole body when the
/// payload is signed, `None` for `UNSIGNED-PAYLOAD`.
pub fn sign_parts(
    parts: &mut Parts,
    body: Option<&[u8]>,
    creds: &Credentials,
    session_token: Option<&SecretString>,
    aws: &AwsSigning,
    time: SystemTime,
) -> Result<(), String> {
    let key_id = creds
        .username
        .as_ref()
        .ok_or("the credentials have no username (the access key id)")?;
    let secret = creds
        .password
        .as_ref()
        .ok_or("the credentials have no password (the secret access key)")?;
    let identity: Identity = aws_credential_types::Credentials::new(
        key_id.expose(),
        secret.expose(),
        session_token.map(|t| t.expose().to_owned()),
        None,
        "latch",
    )
    .into();
    let mut settings = SigningSettings::default();
    let s3 = aws.service == "s3";
    if s3 || body.is_none() {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    if s3 {
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&aws.region)
        .name(&aws.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let uri = parts.uri.to_string();
    // Hop-by-hop fields (and `Expect`, which hyper answers itself) may change or vanish on the
    // way: they are not signed.
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter(|(k, _)| !UNSIGNED.contains(&k.as_str()))
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let body = match body {
        Some(b) => SignableBody::Bytes(b),
        None => SignableBody::UnsignedPayload,
    };
    let signable = SignableRequest::new(parts.method.as_str(), uri, headers.into_iter(), body)
        .map_err(|e| format!("cannot sign the request: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into_parts();
    let (headers, params) = instructions.into_parts();
    debug_assert!(params.is_empty());
    for h in headers {
        // The session token (`x-amz-security-token`) is a credential: wiped with the request.
        let mut value = http::HeaderValue::from_maybe_shared(super::inject::wiped_bytes(h.value()))
            .map_err(|_| "a signature header is not a header value".to_owned())?;
        value.set_sensitive(h.sensitive() || h.name() == "authorization");
        parts.headers.insert(
            http::HeaderName::from_bytes(h.name().as_bytes())
                .map_err(|_| "a signature header has a bad name".to_owned())?,
            value,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn creds() -> Credentials {
        Credentials::new(
            Some(SecretString::new("AKIDEXAMPLE".into())),
            Some(SecretString::new(
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            )),
        )
    }

    fn aws(service: &str, unsigned: bool) -> AwsSigning {
        AwsSigning {
            service: service.into(),
            region: "us-east-1".into(),
            session_token: None,
            unsigned_payload: unsigned,
        }
    }

    fn parts() -> Parts {
        http::Request::builder()
            .method("POST")
            .uri("/?Action=ListQueues")
            .header("host", "sqs.us-east-1.amazonaws.com")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("expect", "100-continue")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn signs_headers_and_body_deterministically() {
        let time = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let mut a = parts();
        sign_parts(
            &mut a,
            Some(b"x=1"),
            &creds(),
            None,
            &aws("sqs", false),
            time,
        )
        .unwrap();
        let auth = a.headers["authorization"].to_str().unwrap().to_owned();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sqs/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date,"
            ),
            "{auth}"
        );
        assert!(a.headers["authorization"].is_sensitive());
        let mut b = parts();
        sign_parts(
            &mut b,
            Some(b"x=2"),
            &creds(),
            None,
            &aws("sqs", false),
            time,
        )
        .unwrap();
        assert_ne!(a.headers["authorization"], b.headers["authorization"]);
    }

    #[test]
    fn unsigned_payload_says_so_and_session_token_goes_along() {
        let token = SecretString::new("FwoGZXIvYXdzEX".into());
        let mut a = parts();
        sign_parts(
            &mut a,
            None,
            &creds(),
            Some(&token),
            &aws("s3", true),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(a.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD");
        assert_eq!(a.headers["x-amz-security-token"], "FwoGZXIvYXdzEX");
        assert!(a.headers["x-amz-security-token"].is_sensitive());
    }
}
