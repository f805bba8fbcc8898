//! Vault/OpenBao's `aws` auth method, IAM type: the login is a SigV4-signed
//! `sts:GetCallerIdentity` request that the agent does not send itself; Vault sends it to STS
//! and learns from the answer which IAM principal the agent is. Pure: credentials and time are
//! arguments.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use zeroize::Zeroizing;

use crate::secrets::aws::creds::AwsCredentials;
use crate::secrets::aws::sigv4;
use crate::secrets::http::secret_bytes;

/// The request body Vault expects (its `iam_request_body`).
pub const GET_CALLER_IDENTITY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The header Vault compares with its `iam_server_id_header_value`.
pub const SERVER_ID_HEADER: &str = "x-vault-aws-iam-server-id";

/// The body of `auth/MOUNT/login`: `role` and the signed request (`sts_url`, signed for
/// `region`), with the server-ID header when given. In a buffer zeroed when done (it holds
/// the session token).
pub fn login_body(
    role: &str,
    creds: &AwsCredentials,
    sts_url: &str,
    region: &str,
    server_id: Option<&str>,
    time: SystemTime,
) -> Result<Bytes, String> {
    let uri: hyper::Uri = sts_url
        .parse()
        .map_err(|_| format!("STS endpoint {sts_url:?} is not a URL"))?;
    let host = uri
        .authority()
        .ok_or_else(|| format!("STS endpoint {sts_url:?} has no host"))?
        .to_string();
    let mut req = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(uri)
        .header("host", host)
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        );
    if let Some(id) = server_id {
        req = req.header(SERVER_ID_HEADER, id);
    }
    let mut req = req
        .body(())
        .map_err(|_| "bad server ID header value".to_string())?;
    sigv4::sign_request(
        &mut req,
        GET_CALLER_IDENTITY.as_bytes(),
        creds,
        region,
        "sts",
        time,
    )?;
    // {"Header-Name": ["value"], ...} as Vault reads it
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = value
            .to_str()
            .map_err(|_| format!("header {name} is not text"))?;
        headers.insert(name.as_str().to_owned(), serde_json::json!([value]));
    }
    let headers_json = Zeroizing::new(serde_json::Value::Object(headers).to_string());
    let headers_b64 = Zeroizing::new(STANDARD.encode(headers_json.as_bytes()));
    let url_b64 = STANDARD.encode(sts_url);
    let body_b64 = STANDARD.encode(GET_CALLER_IDENTITY);
    let fields = [
        ("role", role),
        ("iam_http_request_method", "POST"),
        ("iam_request_url", url_b64.as_str()),
        ("iam_request_body", body_b64.as_str()),
        ("iam_request_headers", headers_b64.as_str()),
    ];
    let len: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    Ok(secret_bytes(2 + 6 * len, |buf| {
        let map: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        serde_json::to_writer(buf, &map).expect("writing JSON to memory cannot fail")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretString;

    #[test]
    fn signed_get_caller_identity_as_vault_reads_it() {
        let creds = AwsCredentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: SecretString::new("secret-canary".into()),
            session_token: Some(SecretString::new("session-canary".into())),
            expires: None,
        };
        let body = login_body(
            "node",
            &creds,
            "https://sts.amazonaws.com/",
            "us-east-1",
            Some("vault.example.com"),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["role"], "node");
        assert_eq!(v["iam_http_request_method"], "POST");
        let decode =
            |k: &str| String::from_utf8(STANDARD.decode(v[k].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!(decode("iam_request_url"), "https://sts.amazonaws.com/");
        assert_eq!(decode("iam_request_body"), GET_CALLER_IDENTITY);
        let headers: serde_json::Value =
            serde_json::from_str(&decode("iam_request_headers")).unwrap();
        assert_eq!(headers[SERVER_ID_HEADER][0], "vault.example.com");
        assert_eq!(headers["host"][0], "sts.amazonaws.com");
        assert_eq!(headers["x-amz-security-token"][0], "session-canary");
        let auth = headers["authorization"][0].as_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20231114/us-east-1/sts/aws4_request"
            ),
            "{auth}"
        );
        // the server ID is signed, so Vault can trust it
        assert!(auth.contains(SERVER_ID_HEADER), "{auth}");
        assert!(!String::from_utf8_lossy(&body).contains("secret-canary"));
    }
}
