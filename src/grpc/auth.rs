//! Authentication once per call, as a tower layer over every service (not inside handlers): reads
//! `authorization: Bearer <key>` (the same metadata over gRPC and gRPC-Web) or the verified client
//! certificate subject ([`super::tls::ClientSubject`]), checks the role the method needs, and puts the
//! [`Principal`] into the request's extensions for the handlers. Services in `auth.open_services` (health,
//! reflection) pass without a key.
//!
//! A refused call is `UNAUTHENTICATED` (no, unknown, revoked or expired key) or `PERMISSION_DENIED` (a
//! role without the right), logged with the key's public prefix and the peer address, at most a few
//! lines a second; the key itself is never logged or echoed.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tonic::{Code, Status};

use super::status::with_reason;
use crate::{
    auth::{AuthError, Authenticator, Principal, Role, prefix_for_log},
    jobs::Scope,
};

/// Failed-authentication log lines per second at most (bursts of 10); the rest are counted and the count
/// is reported with the next line logged.
const FAILURE_LOGS_PER_SECOND: u32 = 5;

/// The layer (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer {
    auth: Authenticator,
    failures: Arc<FailureLog>,
}

impl AuthLayer {
    pub(crate) fn new(auth: Authenticator) -> Self {
        Self { auth, failures: Arc::new(FailureLog::new()) }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, auth: self.auth.clone(), failures: self.failures.clone() }
    }
}

/// The service of [`AuthLayer`].
#[derive(Debug, Clone)]
pub(crate) struct AuthService<S> {
    inner: S,
    auth: Authenticator,
    failures: Arc<FailureLog>,
}

/// The role a method needs: reading is for viewers, submitting and cancelling for submitters, operating
/// machines for admins.
fn needed_role(service: &str, method: &str) -> Role {
    match (service, method) {
        ("comfyrelay.v1.JobService", "SubmitJob" | "CancelJob") => Role::Submitter,
        ("comfyrelay.v1.MachineService", _) => Role::Admin,
        _ => Role::Viewer,
    }
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is the ready one's replacement; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (auth, failures) = (self.auth.clone(), self.failures.clone());
        Box::pin(async move {
            let path = req.uri().path().trim_start_matches('/');
            let (service, method) = path.split_once('/').unwrap_or((path, ""));
            if auth.is_open(service) {
                return inner.call(req).await;
            }
            let needed = needed_role(service, method);
            let authorization = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            let subject = req.extensions().get::<super::tls::ClientSubject>().map(|s| s.0.as_str());
            let now = crate::jobs::model::now_ms();
            let refused = match auth.authenticate(authorization, subject, now).await {
                Ok(principal) if principal.role.allows(needed) => {
                    req.extensions_mut().insert(principal);
                    return inner.call(req).await;
                }
                Ok(principal) => {
                    failures.log(
                        &req,
                        &principal.key_prefix,
                        &format!("role {} may not call it", principal.role),
                    );
                    with_reason(
                        Code::PermissionDenied,
                        "ROLE_NOT_ALLOWED",
                        format!(
                            "{} needs role {needed}; this key's role is {}",
                            crate::limits::echo(path),
                            principal.role
                        ),
                    )
                }
                Err(AuthError::Store(e)) => super::status::store_error(&e),
                Err(e) => {
                    failures.log(&req, prefix_for_log(authorization), &e.to_string());
                    let reason = match e {
                        AuthError::Missing => "API_KEY_MISSING",
                        AuthError::Malformed => "API_KEY_MALFORMED",
                        AuthError::Unknown => "API_KEY_UNKNOWN",
                        AuthError::Revoked => "API_KEY_REVOKED",
                        AuthError::Expired => "API_KEY_EXPIRED",
                        AuthError::Store(_) => "INTERNAL",
                    };
                    with_reason(Code::Unauthenticated, reason, e.to_string())
                }
            };
            Ok(refused.into_http())
        })
    }
}

/// Failed authentications, logged at a bounded rate.
#[derive(Debug)]
struct FailureLog {
    limiter: governor::DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl FailureLog {
    fn new() -> Self {
        let rate = std::num::NonZeroU32::new(FAILURE_LOGS_PER_SECOND).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst)),
            suppressed: AtomicU64::new(0),
        }
    }

    fn log<B>(&self, req: &http::Request<B>, key_prefix: &str, why: &str) {
        if self.limiter.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            key_prefix,
            peer = %peer,
            method = %crate::limits::echo(req.uri().path()),
            suppressed,
            "call refused: {why}"
        );
    }
}

/// The caller of a call, as the layer left it.
///
/// # Errors
/// `UNAUTHENTICATED` when the layer did not run for this call (a service added outside it).
pub(crate) fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| with_reason(Code::Unauthenticated, "API_KEY_MISSING", "no authenticated caller"))
}

/// Which jobs a caller sees: an admin every tenant's, others their own tenant's.
pub(crate) fn scope(p: &Principal) -> Scope {
    match p.role {
        Role::Admin => Scope::All,
        Role::Viewer | Role::Submitter => Scope::Tenant(p.tenant.clone()),
    }
}
