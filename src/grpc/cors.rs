//! CORS for gRPC-Web (issue 14): browsers on the origins in `grpc.cors_origins` may call the API from
//! their pages; every other origin gets no CORS headers at all, so the browser refuses the call (a
//! preflight from it is answered without `Access-Control-Allow-Origin`).
//!
//! Only what gRPC-Web needs is allowed: `POST` with the headers connect-web and grpc-web clients send
//! (`authorization` for the API key), and the status headers and trailers they must read are exposed.
//! Credentials (cookies) are never allowed: the API key travels in `authorization`, set by the page, so
//! no wildcard-with-credentials combination can arise.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, header};
use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
    util::MapResponseLayer,
};
use tower_http::cors::{AllowOrigin, CorsLayer};

type Response = http::Response<tonic::body::Body>;

/// What [`layer`] returns: [`CorsLayer`] under [`strip_refused`].
pub(crate) type Layer =
    ServiceBuilder<Stack<CorsLayer, Stack<MapResponseLayer<fn(Response) -> Response>, Identity>>>;

/// Request headers a gRPC-Web client sends.
const ALLOWED_HEADERS: [&str; 5] =
    ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "authorization"];
/// Response headers a gRPC-Web client must be allowed to read (a trailers-only error puts the status in
/// the headers).
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];
/// How long a browser may cache a preflight answer.
const MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `origins` (validated by `Config::validate` as exact `scheme://host[:port]`).
/// With no origins, no request ever gets CORS headers.
pub(crate) fn layer(origins: &[String]) -> Layer {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST])
        .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
        .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
        .max_age(MAX_AGE);
    ServiceBuilder::new().layer(MapResponseLayer::new(strip_refused as fn(Response) -> Response)).layer(cors)
}

/// `CorsLayer` adds the allowed methods and headers to every preflight; for an origin it refused (no
/// `Access-Control-Allow-Origin`) they are removed too, so a refused origin learns nothing.
fn strip_refused(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        for name in [
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::ACCESS_CONTROL_MAX_AGE,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        ] {
            headers.remove(name);
        }
    }
    response
}
