//! Per-call observability of the gRPC server: a tower layer that counts every call by method and status
//! code with its duration, and the per-call span that continues the caller's W3C `traceparent`.
//!
//! The status of a call is in its `grpc-status` header (trailers-only answers) or its trailers; a body that
//! is dropped before either (the client went away mid-stream) counts as `CANCELLED`. Method labels are the
//! methods the server registered; any other path is `unknown`, so callers cannot grow the label set.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prost::Message as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics;

/// The per-call span: named after the method, a child of the caller's `traceparent` when there is one, with
/// the client certificate's subject (`client`) on an mTLS connection.
pub(super) fn call_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let method = path.strip_prefix('/').unwrap_or(path);
    let client = req.extensions().get::<super::connections::ConnInfo>().and_then(|c| c.subject());
    let span = tracing::info_span!(
        "rpc",
        otel.name = %method,
        otel.kind = "server",
        rpc.system = "grpc",
        method = %path,
        client = client.map(|s| s.0.as_str()),
    );
    let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
    // A context without a remote span makes this span a root; failing to attach is only a lost parent.
    let _ = span.set_parent(parent);
    span
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Counts gRPC calls by method and code, with durations.
#[derive(Debug, Clone)]
pub(super) struct MetricsLayer {
    methods: Arc<HashMap<String, &'static str>>,
}

impl MetricsLayer {
    /// Knows the methods of the services in these encoded `FileDescriptorSet`s. The table is built once
    /// per process (every server of a process registers the same services).
    pub(super) fn new(descriptor_sets: &[&[u8]]) -> Self {
        static METHODS: std::sync::OnceLock<Arc<HashMap<String, &'static str>>> = std::sync::OnceLock::new();
        let methods = METHODS.get_or_init(|| {
            let mut methods = HashMap::new();
            for bytes in descriptor_sets {
                let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else { continue };
                for file in set.file {
                    for service in &file.service {
                        for method in &service.method {
                            let name = format!("{}.{}/{}", file.package(), service.name(), method.name());
                            // Leaked once per process: label values are 'static, and the set is fixed.
                            methods
                                .entry(format!("/{name}"))
                                .or_insert_with(|| &*Box::leak(name.into_boxed_str()));
                        }
                    }
                }
            }
            Arc::new(methods)
        });
        Self { methods: methods.clone() }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, methods: self.methods.clone() }
    }
}

/// See [`MetricsLayer`].
#[derive(Debug, Clone)]
pub(super) struct MetricsService<S> {
    inner: S,
    methods: Arc<HashMap<String, &'static str>>,
}

impl<S, B> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = self.methods.get(req.uri().path()).copied().unwrap_or("unknown");
        let call = Call { method, started: Instant::now(), code: None, done: false };
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await;
            match response {
                Ok(response) => {
                    let mut call = call;
                    call.code = grpc_status(response.headers());
                    Ok(response.map(|body| tonic::body::Body::new(MeteredBody { inner: body, call })))
                }
                Err(e) => {
                    // Dropping `call` records it without a status.
                    Err(e)
                }
            }
        })
    }
}

/// One call being measured; recorded exactly once, when its body ends or is dropped.
#[derive(Debug)]
struct Call {
    method: &'static str,
    started: Instant,
    code: Option<i32>,
    done: bool,
}

impl Call {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            metrics::grpc_request(self.method, self.code, self.started.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish();
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

pin_project_lite::pin_project! {
    struct MeteredBody {
        #[pin]
        inner: tonic::body::Body,
        call: Call,
    }
}

impl Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.code = Some(code);
                    this.call.finish();
                }
            }
            Poll::Ready(None) => this.call.finish(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
