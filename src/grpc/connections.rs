//! Bounded incoming connections (issue 17, defect 2).
//!
//! - **A bound on open connections.** Each accepted TCP connection holds a permit of a semaphore that is
//!   acquired *before* `accept` (as mini-redis does), so at most `grpc.max_connections` are open and the
//!   next clients wait in the kernel's listen backlog until one closes.
//! - **Handshake and idle timeouts.** A connection that has not sent its first 24 bytes (the HTTP/2
//!   preface) within `grpc.handshake_timeout`, or has had no call open for `grpc.idle_timeout`, is closed.
//!   Calls are counted by [`CallTrackingLayer`], which finds the connection's [`Activity`] in the request's
//!   extensions (tonic puts each connection's `ConnectInfo` there) and holds a guard until the response
//!   body has been sent or dropped.
//! - **Accept errors without spinning.** EMFILE, ENFILE, ENOBUFS and the like leave the listener readable,
//!   so retrying at once would spin; the acceptor backs off (5 ms doubling to 1 s) and logs at most once per
//!   [`ACCEPT_LOG_EVERY`], with the number of failures since the last line.
//!
//! A connection is closed from its read half: once a deadline has passed and the peer has nothing more
//! for us, `poll_read` reports end-of-stream and hyper ends the connection (tonic gives no handle on one
//! connection to send a GOAWAY). A client with a call open is never idle, and the kernel's buffer is read
//! first, so only a call sent at the very moment its idle connection closes can fail (`UNAVAILABLE`, safe to
//! retry on a new connection). Keepalive pings and the bound on streams per connection are set on tonic's
//! builder (see `serve`). Under TLS, [`super::tls`] wraps each `Conn` after accept: the deadlines see the
//! encrypted bytes (the TLS ClientHello counts as the preface), so `tls` bounds the TLS handshake by the same
//! `grpc.handshake_timeout`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use futures::{Stream, task::AtomicWaker};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::tls::ClientSubject;

/// Bytes of the HTTP/2 connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`): the handshake timeout
/// runs until this many bytes have arrived.
const PREFACE_LEN: usize = 24;
/// At most one log line per this long about failing accepts.
pub(crate) const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The bounds the acceptor applies (from `grpc.*`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Open connections at most.
    pub(crate) max_connections: usize,
    /// Time for a new connection to send the HTTP/2 preface.
    pub(crate) handshake_timeout: Duration,
    /// Time a connection may stay open with no call.
    pub(crate) idle_timeout: Duration,
}

/// `configured` connections, or fewer when the process's open-file limit would not leave room for the
/// rest of the service (the database, artifacts, ComfyUI sockets): a quarter of the limit, at least 64
/// descriptors, is kept for them. An attack that opens more connections than there are descriptors then
/// waits in the backlog instead of making `SubmitJob` fail with "Too many open files".
pub(crate) fn effective_max_connections(configured: usize, open_file_limit: Option<u64>) -> usize {
    let Some(limit) = open_file_limit else { return configured };
    let reserve = (limit / 4).max(64);
    let usable = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX).max(1);
    configured.min(usable)
}

/// The soft limit on open files of this process (`Max open files` in `/proc/self/limits`), where the
/// platform says (Linux).
pub(crate) fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// The accepted connections of `listener`, bounded by `limits`, for `serve_with_incoming_shutdown`. The
/// stream never yields an error (accept errors are handled here) and never ends.
pub(crate) fn incoming(
    listener: Arc<TcpListener>,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<Conn, io::Error>> {
    incoming_until_cut(listener, limits, None)
}

/// [`incoming`] whose connections all close when `cut` is cancelled, calls open or not: a standby's
/// server (`super::serve_standby`) ends its health watches when the replica starts leading, so clients
/// reconnect to the leader's server on the same listener.
pub(crate) fn incoming_until_cut(
    listener: Arc<TcpListener>,
    limits: ConnectionLimits,
    cut: Option<tokio_util::sync::CancellationToken>,
) -> impl Stream<Item = Result<Conn, io::Error>> {
    let acceptor = Acceptor {
        listener,
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        backoff: AcceptBackoff::new(),
        cut,
    };
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let conn = acceptor.next().await;
        Some((Ok(conn), acceptor))
    })
}

struct Acceptor {
    listener: Arc<TcpListener>,
    permits: Arc<Semaphore>,
    limits: ConnectionLimits,
    backoff: AcceptBackoff,
    cut: Option<tokio_util::sync::CancellationToken>,
}

impl Acceptor {
    async fn next(&mut self) -> Conn {
        // Before accept: at the bound, new connections stay in the backlog instead of taking descriptors.
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the semaphore is never closed"),
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, remote)) => {
                    self.backoff.succeeded();
                    // Small gRPC messages must not wait for Nagle's algorithm (a 40 ms stall per call with
                    // delayed ACKs).
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let cut = self.cut.clone().map(|t| Box::pin(t.cancelled_owned()));
                    return Conn::new(stream, remote, permit, self.limits, cut);
                }
                // The peer gave up between SYN and accept: nothing to wait for.
                Err(e) if is_peer_error(&e) => continue,
                Err(e) => {
                    let (delay, _logged) = self.backoff.failed(&e, Instant::now());
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}

/// Backoff and log rate limit of failing accepts.
#[derive(Debug)]
struct AcceptBackoff {
    delays: ExponentialBackoff,
    failing: bool,
    failures_since_log: u64,
    last_log: Option<Instant>,
}

impl AcceptBackoff {
    fn new() -> Self {
        Self { delays: Self::delays(), failing: false, failures_since_log: 0, last_log: None }
    }

    fn delays() -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(ACCEPT_BACKOFF_MIN)
            .with_max_delay(ACCEPT_BACKOFF_MAX)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// Records a failed accept; returns how long to wait before the next one, and whether it was logged.
    fn failed(&mut self, e: &io::Error, now: Instant) -> (Duration, bool) {
        self.failing = true;
        self.failures_since_log += 1;
        let log = self.last_log.is_none_or(|last| now.duration_since(last) >= ACCEPT_LOG_EVERY);
        if log {
            tracing::warn!(
                error = %e,
                failures = self.failures_since_log,
                "accepting gRPC connections fails; backing off (if this is `Too many open files`, lower \
                 grpc.max_connections or raise the open-file limit)"
            );
            self.last_log = Some(now);
            self.failures_since_log = 0;
        }
        (self.delays.next().unwrap_or(ACCEPT_BACKOFF_MAX), log)
    }

    fn succeeded(&mut self) {
        if self.failing {
            self.failing = false;
            self.delays = Self::delays();
        }
    }
}

/// One connection's open calls and the time it became idle, shared by the connection (which closes it
/// when idle too long) and the [`CallTrackingLayer`] (which counts calls).
#[derive(Debug)]
pub(crate) struct Activity {
    calls: AtomicUsize,
    // A std lock: held for a copy, never across an await.
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when its last call ends so that it arms the idle timer.
    reader: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
        }
    }

    fn call_started(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts one call as open until dropped (with the response body).
#[derive(Debug)]
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            self.0.reader.wake();
        }
    }
}

/// What tonic puts in each request's extensions for a [`Conn`] (plain or under TLS).
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    tcp: TcpConnectInfo,
    activity: Arc<Activity>,
    /// The verified client certificate's subject, on an mTLS connection.
    subject: Option<ClientSubject>,
}

impl ConnInfo {
    /// The same connection, authenticated by a client certificate with this subject.
    pub(crate) fn with_subject(self, subject: Option<ClientSubject>) -> Self {
        Self { subject, ..self }
    }

    /// The verified client certificate's subject, on an mTLS connection.
    pub(crate) fn subject(&self) -> Option<&ClientSubject> {
        self.subject.as_ref()
    }

    /// The local address the connection arrived on.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr
    }
}

/// An accepted connection with its permit and deadlines.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    local: Option<SocketAddr>,
    remote: SocketAddr,
    activity: Arc<Activity>,
    preface_left: usize,
    handshake: Pin<Box<Sleep>>,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// When this resolves the connection closes, calls open or not (see [`incoming_until_cut`]).
    cut: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    closed: bool,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn new(
        stream: TcpStream,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
        limits: ConnectionLimits,
        cut: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    ) -> Self {
        let now = Instant::now();
        Self {
            local: stream.local_addr().ok(),
            stream,
            remote,
            activity: Arc::new(Activity::new()),
            preface_left: PREFACE_LEN,
            handshake: Box::pin(tokio::time::sleep_until(now + limits.handshake_timeout)),
            idle: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            idle_timeout: limits.idle_timeout,
            cut,
            closed: false,
            _permit: permit,
        }
    }

    /// The peer's address.
    pub(crate) fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Why the connection must close now, if a deadline has passed (registers the wake-ups otherwise).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        if self.cut.as_mut().is_some_and(|cut| cut.as_mut().poll(cx).is_ready()) {
            return Some("the standby replica started leading");
        }
        if self.preface_left > 0 && self.handshake.as_mut().poll(cx).is_ready() {
            return Some("no HTTP/2 preface within grpc.handshake_timeout");
        }
        // Register before reading the count, so a call ending after the check wakes us.
        self.activity.reader.register(cx.waker());
        if self.activity.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let deadline = self.activity.idle_since() + self.idle_timeout;
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        if self.idle.as_mut().poll(cx).is_ready() && self.activity.calls.load(Ordering::SeqCst) == 0 {
            return Some("no call within grpc.idle_timeout");
        }
        None
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            this.preface_left = this.preface_left.saturating_sub(buf.filled().len() - before);
            return Poll::Ready(result);
        }
        match this.expired(cx) {
            Some(why) => {
                tracing::debug!(remote = %this.remote, why, "closing gRPC connection");
                this.closed = true;
                Poll::Ready(Ok(())) // end of stream: hyper ends the connection
            }
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.remote) },
            activity: self.activity.clone(),
            subject: None,
        }
    }
}

/// The header in which a standby names the caller it forwards a call for, with mTLS: the subject of the
/// client certificate the standby verified. Believed only on a connection whose own client certificate is
/// a replica's (`grpc.tls.replica_subjects`), and removed from every other call.
pub(crate) const FORWARDED_CLIENT: &str = "x-comfyrelay-forwarded-client";

/// Counts each call as open on its connection until its response body ends (see the module docs); also
/// puts tonic's own `TcpConnectInfo` in the request, so `Request::remote_addr` keeps working, and on an
/// mTLS connection the [`ClientSubject`], for the layers inside this one and the handlers: the connection's
/// own, or on a replica's connection the caller it names in [`FORWARDED_CLIENT`].
#[derive(Debug, Clone, Default)]
pub(crate) struct CallTrackingLayer {
    replicas: Arc<std::collections::HashSet<String>>,
}

impl CallTrackingLayer {
    /// Believes [`FORWARDED_CLIENT`] on connections whose client certificate has one of `replica_subjects`.
    pub(crate) fn new(replica_subjects: &[String]) -> Self {
        Self { replicas: Arc::new(replica_subjects.iter().cloned().collect()) }
    }
}

impl<S> tower::Layer<S> for CallTrackingLayer {
    type Service = CallTracking<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallTracking { inner, replicas: self.replicas.clone() }
    }
}

/// The service of [`CallTrackingLayer`].
#[derive(Debug, Clone)]
pub(crate) struct CallTracking<S> {
    inner: S,
    replicas: Arc<std::collections::HashSet<String>>,
}

impl<S, B> tower::Service<http::Request<B>> for CallTracking<S>
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Never passed on as it came: only a replica's connection may name another caller.
        let forwarded = req.headers_mut().remove(FORWARDED_CLIENT);
        let info = req.extensions().get::<ConnInfo>().cloned();
        let guard = info.map(|info| {
            req.extensions_mut().insert(info.tcp);
            if let Some(subject) = info.subject {
                let subject = match forwarded {
                    // Lossy: a subject that is not UTF-8 matches no mapped subject.
                    Some(caller) if self.replicas.contains(&subject.0) => {
                        ClientSubject(String::from_utf8_lossy(caller.as_bytes()).into_owned())
                    }
                    _ => subject,
                };
                req.extensions_mut().insert(subject);
            }
            info.activity.call_started()
        });
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| tonic::body::Body::new(Guarded { body, _guard: guard })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call counted until it ends or is dropped.
#[derive(Debug)]
struct Guarded {
    body: tonic::body::Body,
    _guard: CallGuard,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
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

    #[test]
    fn the_connection_bound_leaves_descriptors_for_the_rest_of_the_service() {
        assert_eq!(effective_max_connections(512, None), 512);
        assert_eq!(effective_max_connections(512, Some(1024)), 512);
        assert_eq!(effective_max_connections(512, Some(96)), 32);
        assert_eq!(effective_max_connections(512, Some(10)), 1);
        assert_eq!(effective_max_connections(4, Some(1 << 20)), 4);
        assert!(open_file_limit().is_none_or(|n| n > 0));
    }

    #[test]
    fn failing_accepts_back_off_to_a_second_and_log_once_per_interval() {
        let mut backoff = AcceptBackoff::new();
        let e = io::Error::from_raw_os_error(24); // EMFILE
        let start = Instant::now();
        let (mut waited, mut delays, mut lines) = (Duration::ZERO, Vec::new(), 0);
        for _ in 0..40 {
            let (delay, logged) = backoff.failed(&e, start + waited);
            delays.push(delay);
            lines += u32::from(logged);
            waited += delay;
        }
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
        assert_eq!(delays.last().copied(), Some(ACCEPT_BACKOFF_MAX));
        // 40 failures in a row are spread over half a minute, and logged a few times, not 40.
        assert!(waited > Duration::from_secs(25), "{waited:?}");
        assert!((2..=4).contains(&lines), "{lines} log lines");
        backoff.succeeded();
        assert_eq!(backoff.failed(&e, start + waited).0, ACCEPT_BACKOFF_MIN, "a success resets the backoff");
    }
}
