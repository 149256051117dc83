//! A `governor` clock that reads `tokio::time`, so rate limits follow a paused or advanced test clock.
//!
//! Owns only the clock adapter; knows nothing about HTTP or RunComfy.

use std::time::Instant;

/// A [`governor::clock::Clock`] backed by [`tokio::time::Instant::now`].
///
/// Under `tokio::time::pause()` it reads the simulated clock, so a rate limiter built on it lets a test (or a
/// benchmark) run hours of rate-limited traffic in milliseconds. Outside paused time it is the monotonic clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokioClock;

impl governor::clock::Clock for TokioClock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// An in-memory, unkeyed rate limiter on [`TokioClock`].
pub(super) type DirectLimiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<Instant>,
>;

/// Builds a limiter allowing `per_second` requests a second with bursts of `burst` (both at least 1).
pub(super) fn limiter(per_second: u32, burst: u32) -> DirectLimiter {
    let rate = std::num::NonZeroU32::new(per_second.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    governor::RateLimiter::direct_with_clock(governor::Quota::per_second(rate).allow_burst(burst), TokioClock)
}

/// How long to wait before `limiter` admits one more request (zero if it admits one now, consuming it).
fn try_acquire(limiter: &DirectLimiter) -> std::time::Duration {
    use governor::clock::Clock as _;
    match limiter.check() {
        Ok(()) => std::time::Duration::ZERO,
        Err(not_until) => not_until.wait_time_from(TokioClock.now()),
    }
}

/// Waits until `limiter` admits one request.
pub(super) async fn acquire(limiter: &DirectLimiter) {
    loop {
        let wait = try_acquire(limiter);
        if wait.is_zero() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}
