//! Every error leaves with a `google.rpc.ErrorInfo`, as the proto promises, including the errors tonic
//! itself answers before a handler runs. A tower layer over all services looks at the `grpc-status` of
//! each response (in the headers of a trailers-only answer, or in the trailers of a stream):
//!
//! - a request over `grpc.max_message_bytes`, which tonic answers `OUT_OF_RANGE` "decoded message length
//!   too large", becomes `RESOURCE_EXHAUSTED` with reason `MESSAGE_TOO_LARGE` naming the setting and the
//!   limit (a response over it becomes `RESPONSE_TOO_LARGE`);
//! - any other error without details (unknown method, undecodable request, a stream's own status) gets an
//!   `ErrorInfo` whose reason is its code's name; its message is cut to the same budget as ours.
//!
//! Statuses that already carry details (ours, built in `status`) pass untouched.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use tonic::{Code, Status};

use super::status;

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
const GRPC_DETAILS: &str = "grpc-status-details-bin";
const DECODE_TOO_LARGE: &str = "Error, decoded message length too large: found ";
const ENCODE_TOO_LARGE: &str = "Error, encoded message length too large";

/// Adds `ErrorInfo` to bare error statuses (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorDetailsLayer {
    max_message_bytes: usize,
}

impl ErrorDetailsLayer {
    /// For services whose message limit is `max_message_bytes`.
    pub(crate) fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl<S> tower::Layer<S> for ErrorDetailsLayer {
    type Service = ErrorDetailsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorDetailsService { inner, max_message_bytes: self.max_message_bytes }
    }
}

/// The service of [`ErrorDetailsLayer`].
#[derive(Debug, Clone)]
pub(crate) struct ErrorDetailsService<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S, B> tower::Service<http::Request<B>> for ErrorDetailsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let max = self.max_message_bytes;
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            complete(response.headers_mut(), max);
            Ok(response.map(|body| tonic::body::Body::new(CompletedTrailers { body, max })))
        })
    }
}

/// Rewrites a bare error status in `headers` (a trailers-only response's headers, or trailers).
fn complete(headers: &mut HeaderMap, max: usize) {
    let Some(code) = headers.get(GRPC_STATUS).map(|v| Code::from_bytes(v.as_bytes())) else { return };
    if code == Code::Ok || headers.contains_key(GRPC_DETAILS) {
        return;
    }
    // No details header, so this cannot panic on undecodable details.
    let Some(bare) = Status::from_header_map(headers) else { return };
    let message = bare.message();
    let replacement = if code == Code::OutOfRange && message.starts_with(DECODE_TOO_LARGE) {
        let size = message[DECODE_TOO_LARGE.len()..].split(' ').next().and_then(|n| n.parse().ok());
        status::message_too_large(size, max)
    } else if code == Code::OutOfRange && message.starts_with(ENCODE_TOO_LARGE) {
        status::response_too_large(max)
    } else {
        status::with_reason(code, status::reason_of(code), message)
    };
    headers.remove(GRPC_STATUS);
    headers.remove(GRPC_MESSAGE);
    if let Err(e) = replacement.add_header(headers) {
        tracing::warn!(error = %e, "cannot encode an error status");
        headers.insert(GRPC_STATUS, http::HeaderValue::from(code as i32));
    }
}

/// A response body whose trailers get the same treatment as the headers.
struct CompletedTrailers {
    body: tonic::body::Body,
    max: usize,
}

impl http_body::Body for CompletedTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = polled {
            let mut frame = frame;
            if let Some(trailers) = frame.trailers_mut() {
                complete(trailers, this.max);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn bare(status: Status) -> HeaderMap {
        let mut headers = HeaderMap::new();
        status.add_header(&mut headers).unwrap_or_else(|e| panic!("{e}"));
        headers
    }

    #[test]
    fn an_oversized_request_becomes_resource_exhausted_naming_the_setting() {
        let mut headers = bare(Status::out_of_range(
            "Error, decoded message length too large: found 2097157 bytes, the limit is: 1048576 bytes",
        ));
        complete(&mut headers, 1_048_576);
        let status = Status::from_header_map(&headers).unwrap_or_else(|| panic!("a status"));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().unwrap_or_else(|| panic!("ErrorInfo"));
        assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
        assert_eq!(info.metadata["setting"], "grpc.max_message_bytes");
        assert_eq!((info.metadata["limit"].as_str(), info.metadata["size"].as_str()), ("1048576", "2097157"));
    }

    #[test]
    fn other_bare_errors_get_an_error_info_and_ours_are_untouched() {
        let mut headers = bare(Status::unimplemented("no such method"));
        complete(&mut headers, 1);
        let status = Status::from_header_map(&headers).unwrap_or_else(|| panic!("a status"));
        assert_eq!(status.get_details_error_info().map(|i| i.reason), Some("UNIMPLEMENTED".to_string()));

        let ours = status::with_reason(Code::NotFound, "WORKFLOW_NOT_FOUND", "nope");
        let mut headers = bare(ours);
        let before = headers.clone();
        complete(&mut headers, 1);
        assert_eq!(headers, before);

        let mut ok = bare(Status::ok(""));
        complete(&mut ok, 1);
        assert!(!ok.contains_key(GRPC_DETAILS));
    }
}
