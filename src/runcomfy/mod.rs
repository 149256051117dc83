//! RunComfy Server API client: rate-limited, retrying, tolerant of the API's documented quirks.
//!
//! Owns the wire models ([`Server`], [`ServerStatus`], [`Workflow`]), the typed [`RunComfyError`] and the
//! [`RunComfyClient`]. It must not know about pools, jobs or gRPC: the pool decides *when* to launch and
//! delete machines; this module only makes each call safe (one account-wide rate limiter, timeouts,
//! `Retry-After`, no blind relaunch, grace for a 404 right after launch, errors carried in HTTP 200 bodies).
//!
//! All timing uses `tokio::time`, so callers can run it under `tokio::time::pause()`. With paused time
//! and real sockets, keep a short periodic timer running (tests use the emulator's `PausedTimeTicker`) so
//! the auto-advancing clock cannot jump past a request timeout while a loopback answer is in flight.

mod client;
mod clock;
mod error;
mod model;

pub use client::{ClientOptions, DeleteOutcome, RunComfyClient};
pub use clock::TokioClock;
pub use error::RunComfyError;
pub use model::{LaunchRequest, Server, ServerStatus, ServerType, Timestamp, Workflow};

#[cfg(test)]
mod tests;
