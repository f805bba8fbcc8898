//! What went wrong on a request's way, and the response the application gets for it: a status
//! and a small JSON body naming the failure class — never a secret, a store URL or a path (the
//! agent's log has the detail).
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::{inject::InjectError, target::TargetError};
use crate::{connector::Refusal, secrets::SecretError};

/// A failure of latch's, told to the application as an HTTP response.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("the policy does not admit this workload")]
    Denied,
    #[error("credentials: {0}")]
    Secrets(#[source] SecretError),
    #[error("injecting the credential: {0}")]
    Inject(#[source] InjectError),
    #[error(transparent)]
    Target(TargetError),
    #[error(
        "the request body is larger than {0} bytes, the most latch hashes for a SigV4 signature"
    )]
    TooLargeToSign(usize),
    #[error("reading the request body: {0}")]
    AppBody(String),
    #[error("signing: {0}")]
    Sign(String),
    #[error("{0}")]
    Refused(Refusal),
    #[error("CONNECT is not brokered: the application talks to the destination itself")]
    Connect,
}

impl Failure {
    /// The status and failure class the application is told.
    pub fn class(&self) -> (StatusCode, &'static str) {
        match self {
            Failure::Denied => (StatusCode::FORBIDDEN, "denied"),
            Failure::Secrets(
                SecretError::Unreachable { .. }
                | SecretError::Timeout { .. }
                | SecretError::StoreAuth { .. },
            ) => (StatusCode::SERVICE_UNAVAILABLE, "store_unreachable"),
            Failure::Secrets(_) | Failure::Inject(_) | Failure::Sign(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "credentials_unavailable")
            }
            Failure::Target(e) => e.class(),
            Failure::TooLargeToSign(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large_to_sign"),
            Failure::AppBody(_) => (StatusCode::BAD_REQUEST, "bad_request_body"),
            Failure::Refused(Refusal::HandshakeTimeout(_)) => {
                (StatusCode::GATEWAY_TIMEOUT, "timeout")
            }
            Failure::Refused(Refusal::WorkloadLimit { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "workload_limit")
            }
            Failure::Refused(Refusal::Busy { .. }) => (StatusCode::SERVICE_UNAVAILABLE, "capacity"),
            Failure::Connect => (StatusCode::METHOD_NOT_ALLOWED, "connect_not_brokered"),
        }
    }

    /// The response: status, `Content-Type: application/json`, `Connection: close` (latch
    /// closes the connection after its own answers), and `{"error": class, "status": code}`.
    pub fn response(&self) -> Response<Bytes> {
        let (status, class) = self.class();
        let body = Bytes::from(format!(
            "{{\"error\":\"{class}\",\"status\":{},\"from\":\"latch\"}}\n",
            status.as_u16()
        ));
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }

    /// The same response as raw HTTP/1.1 bytes, for answers written without hyper (a timed-out
    /// handshake).
    pub fn raw(&self) -> Vec<u8> {
        let r = self.response();
        let (status, body) = (r.status(), r.body());
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            String::from_utf8_lossy(body)
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_the_class_and_nothing_of_the_store() {
        let f = Failure::Secrets(SecretError::Unreachable {
            store: "vault-prod".into(),
            kind: "vault",
            reason: "https://vault.internal:8200/v1/secret/data/api: refused".into(),
        });
        let r = f.response();
        assert_eq!(r.status(), 503);
        let body = String::from_utf8(r.body().to_vec()).unwrap();
        assert_eq!(
            body,
            "{\"error\":\"store_unreachable\",\"status\":503,\"from\":\"latch\"}\n"
        );
        let raw = String::from_utf8(f.raw()).unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{raw}"
        );
        assert!(!raw.contains("vault"), "{raw}");
        assert_eq!(Failure::Denied.response().status(), 403);
    }
}
