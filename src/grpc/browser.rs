//! What a browser may call (issue 11): the `Host` and `Origin` checks on gRPC-Web and HTTP/1 requests,
//! which close DNS rebinding (a page of `evil.example`, whose name was re-pointed at this server, calling
//! it same-origin from a browser on the server's network).
//!
//! - A request a browser can send (any HTTP/1 request, and on HTTP/2 anything but native gRPC: gRPC-Web,
//!   preflights) must name an allowed `Host` (the `Host` header, else the URI's authority): one of
//!   `grpc.allowed_hosts` (`name` matches any port, `name:port` that port), or the IP address the
//!   connection arrived on (a page opened by address is no rebinding). Otherwise: 421, plain.
//! - Its `Origin`, when present, must be one of `grpc.cors_origins` or the same origin (`http://` or
//!   `https://` + its allowed `Host`). Otherwise: 403, plain.
//! - Native gRPC (HTTP/2 with `content-type: application/grpc*`, not `grpc-web`) is not checked: a browser
//!   cannot send it without TLS (browsers speak HTTP/2 only over TLS, where a rebound name fails the
//!   certificate check) or a preflight (which is checked).
//!
//! Refusals never echo the request's values; they are logged at debug.

use std::{
    future::Ready,
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::Either;

use super::connections::ConnInfo;

/// The checks, from `grpc.allowed_hosts` and `grpc.cors_origins`.
#[derive(Debug, Clone)]
pub(crate) struct BrowserCheckLayer {
    rules: Arc<Rules>,
}

#[derive(Debug)]
struct Rules {
    /// Lowercased hosts (IPv6 without brackets), with the port when one was given.
    hosts: Vec<(String, Option<u16>)>,
    /// Lowercased origins.
    origins: Vec<String>,
}

impl BrowserCheckLayer {
    pub(crate) fn new(allowed_hosts: &[String], cors_origins: &[String]) -> Self {
        let hosts = allowed_hosts
            .iter()
            .filter_map(|h| {
                let (host, port) = split_host_port(h)?;
                Some((host, port))
            })
            .collect();
        let origins = cors_origins.iter().map(|o| o.to_ascii_lowercase()).collect();
        Self { rules: Arc::new(Rules { hosts, origins }) }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Host,
    Origin,
}

impl Rules {
    fn check<B>(&self, req: &http::Request<B>) -> Result<(), Refusal> {
        if is_native_grpc(req) {
            return Ok(());
        }
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
            .ok_or(Refusal::Host)?;
        let local = req.extensions().get::<ConnInfo>().and_then(ConnInfo::local_addr).map(|a| a.ip());
        if !self.host_allowed(host, local) {
            return Err(Refusal::Host);
        }
        match req.headers().get(http::header::ORIGIN) {
            None => Ok(()),
            Some(origin) => {
                let origin = origin.to_str().map_err(|_| Refusal::Origin)?.to_ascii_lowercase();
                let host = host.to_ascii_lowercase();
                let same =
                    ["http://", "https://"].iter().any(|s| origin.strip_prefix(s) == Some(host.as_str()));
                if same || self.origins.contains(&origin) { Ok(()) } else { Err(Refusal::Origin) }
            }
        }
    }

    fn host_allowed(&self, host: &str, local: Option<IpAddr>) -> bool {
        let Some((name, port)) = split_host_port(host) else { return false };
        if local.is_some_and(|ip| name.parse::<IpAddr>() == Ok(ip)) {
            return true;
        }
        self.hosts.iter().any(|(h, p)| *h == name && (p.is_none() || *p == port))
    }
}

/// HTTP/2 with a gRPC (not gRPC-Web) content type.
fn is_native_grpc<B>(req: &http::Request<B>) -> bool {
    let content_type = req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    req.version() == http::Version::HTTP_2
        && content_type.is_some_and(|c| {
            let c = c.to_ascii_lowercase();
            (c == "application/grpc"
                || c.starts_with("application/grpc+")
                || c.starts_with("application/grpc;"))
                && !c.starts_with("application/grpc-web")
        })
}

/// `host[:port]`, `[v6][:port]` or a bare IPv6 address, lowercased, without a trailing dot or brackets.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?.parse().ok()?)),
        }
    } else if s.matches(':').count() == 1 {
        let (host, port) = s.split_once(':')?;
        (host, Some(port.parse().ok()?))
    } else {
        (s, None)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

impl<S> tower::Layer<S> for BrowserCheckLayer {
    type Service = BrowserCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCheck { inner, rules: self.rules.clone() }
    }
}

/// The service of [`BrowserCheckLayer`].
#[derive(Debug, Clone)]
pub(crate) struct BrowserCheck<S> {
    inner: S,
    rules: Arc<Rules>,
}

impl<S, B> tower::Service<http::Request<B>> for BrowserCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.rules.check(&req) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(refusal) => {
                tracing::debug!(?refusal, path = %req.uri().path(), "browser request refused");
                Either::Right(std::future::ready(Ok(refuse(refusal))))
            }
        }
    }
}

fn refuse(refusal: Refusal) -> http::Response<tonic::body::Body> {
    let (status, text) = match refusal {
        Refusal::Host => {
            (http::StatusCode::MISDIRECTED_REQUEST, "this Host is not served here (grpc.allowed_hosts)\n")
        }
        Refusal::Origin => {
            (http::StatusCode::FORBIDDEN, "this Origin may not call this server (grpc.cors_origins)\n")
        }
    };
    let mut response = http::Response::new(tonic::body::Body::new(text.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(hosts: &[&str], origins: &[&str]) -> Arc<Rules> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        BrowserCheckLayer::new(&s(hosts), &s(origins)).rules
    }

    fn web(host: &str, origin: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::post("/grpc.health.v1.Health/Check")
            .version(http::Version::HTTP_11)
            .header("host", host)
            .header("content-type", "application/grpc-web+proto");
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn hosts_match_by_name_or_name_and_port() {
        let r = rules(&["localhost", "127.0.0.1", "[::1]", "relay.example:8443"], &[]);
        for ok in
            ["localhost", "LOCALHOST:50051", "localhost.", "127.0.0.1:1", "[::1]:50051", "relay.example:8443"]
        {
            assert_eq!(r.check(&web(ok, None)), Ok(()), "{ok}");
        }
        for bad in
            ["evil.example", "evil.example:50051", "relay.example:443", "relay.example", "", "127.0.0.2"]
        {
            assert_eq!(r.check(&web(bad, None)), Err(Refusal::Host), "{bad}");
        }
    }

    #[test]
    fn origins_must_be_listed_or_the_same_origin() {
        let r = rules(&["localhost"], &["https://console.example"]);
        assert_eq!(r.check(&web("localhost:50051", Some("https://console.example"))), Ok(()));
        assert_eq!(r.check(&web("localhost:50051", Some("http://localhost:50051"))), Ok(()));
        for bad in ["https://evil.example", "null", "http://localhost:1", "https://console.example:444"] {
            assert_eq!(r.check(&web("localhost:50051", Some(bad))), Err(Refusal::Origin), "{bad}");
        }
    }

    #[test]
    fn native_grpc_is_not_checked_but_grpc_web_over_http2_is() {
        let r = rules(&["localhost"], &[]);
        let native = http::Request::post("http://evil.example/x")
            .version(http::Version::HTTP_2)
            .header("content-type", "application/grpc")
            .header("origin", "https://evil.example")
            .body(())
            .unwrap();
        assert_eq!(r.check(&native), Ok(()));
        let web2 = http::Request::post("http://evil.example/x")
            .version(http::Version::HTTP_2)
            .header("content-type", "application/grpc-web+proto")
            .body(())
            .unwrap();
        assert_eq!(r.check(&web2), Err(Refusal::Host));
        let http1_grpc = http::Request::post("/x")
            .version(http::Version::HTTP_11)
            .header("host", "evil.example")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert_eq!(r.check(&http1_grpc), Err(Refusal::Host));
    }
}
