//! The target's response body on its way to an HTTP/1.1 application.
//!
//! hyper writes a response whose body has already ended (an empty body) without the
//! `Content-Length: 0` field it was given, and adds its own `content-length: 0` after every
//! other field. To keep the target's field where the target put it, such a body is passed as
//! one of unknown length that has not ended yet: hyper then takes its length from that field,
//! writes it in place, and sends no body bytes.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The target's body, as hyper should see it on the application's connection.
pub struct ToApp {
    inner: Incoming,
    /// Empty, announced with `Content-Length: 0`: reported as not ended and of unknown length.
    zero_in_place: bool,
}

impl ToApp {
    /// The body of `resp`, the answer to a `method` request.
    pub fn of(resp: Response<Incoming>, method: &Method) -> Response<ToApp> {
        let zero_in_place = resp.body().is_end_stream() && announces_zero(&resp, method);
        resp.map(|inner| ToApp {
            inner,
            zero_in_place,
        })
    }

    /// The body as it is (HTTP/2, where fields have no place to keep).
    pub fn plain(inner: Incoming) -> ToApp {
        ToApp {
            inner,
            zero_in_place: false,
        }
    }
}

/// Whether the response says `Content-Length: 0` where a body could be (not the answer to a
/// HEAD, not 1xx, 204 or 304, whose fields hyper writes as they are).
fn announces_zero<B>(resp: &Response<B>, method: &Method) -> bool {
    let status = resp.status();
    *method != Method::HEAD
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
        && resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
}

impl Body for ToApp {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        !self.zero_in_place && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.zero_in_place {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, length: Option<&str>) -> Response<()> {
        let mut r = Response::builder().status(status);
        if let Some(l) = length {
            r = r.header(header::CONTENT_LENGTH, l);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn only_a_zero_length_where_a_body_could_be_is_kept_in_place() {
        assert!(announces_zero(&resp(201, Some("0")), &Method::POST));
        assert!(announces_zero(&resp(200, Some("0")), &Method::GET));
        assert!(!announces_zero(&resp(200, Some("0")), &Method::HEAD));
        assert!(!announces_zero(&resp(204, Some("0")), &Method::GET));
        assert!(!announces_zero(&resp(304, Some("0")), &Method::GET));
        assert!(!announces_zero(&resp(200, Some("14")), &Method::GET));
        assert!(!announces_zero(&resp(200, None), &Method::GET));
    }
}
