//! Mounts the web console ([`crate::console`]) on the gRPC port: a `GET` under `/console` is answered
//! with the page's assets before it reaches gRPC-Web or the services; every other request passes on.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

/// Answers console paths; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConsoleLayer;

impl<S> tower::Layer<S> for ConsoleLayer {
    type Service = ConsoleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConsoleService { inner }
    }
}

/// The service of [`ConsoleLayer`].
#[derive(Debug, Clone)]
pub(crate) struct ConsoleService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for ConsoleService<S>
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
        if crate::console::is_console_path(req.uri().path()) {
            let response = crate::console::respond(req.method(), req.uri().path())
                .map(|body| tonic::body::Body::new(http_body_util::Full::new(body)));
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.inner.call(req))
    }
}
