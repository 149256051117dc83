//! Scriptable faults of the emulated RunComfy Server API. Each fault is consumed as it fires.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

/// How the next launch fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchFailure {
    /// HTTP 500 and no machine is created (a clean failure that still looks ambiguous to a client).
    Rejected,
    /// The machine IS created (and boots normally), but the answer is HTTP 500.
    CreatedButFailed,
    /// The machine IS created, but the answer is held back this long (the client times out first).
    CreatedButStalled(Duration),
    /// The answer is held back this long, then HTTP 504, and NO machine is created (a gateway that gave
    /// up before the backend saw the request).
    Stalled(Duration),
}

/// What a request runs into before it is processed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RequestFault {
    /// Answer this HTTP status with a gateway-style body.
    Status(u16),
    /// Answer 429 with this `Retry-After`.
    RateLimited(Duration),
    /// Answer HTTP 200 with `{"error_code": code, "error_message": message}`.
    ErrorIn200 { code: i64, message: String },
}

/// What happens to the next launched machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct MachinePlan {
    pub(crate) never_ready: bool,
    pub(crate) die_after_ready: Option<Duration>,
    pub(crate) not_found_lookups: usize,
}

#[derive(Debug, Default)]
struct State {
    echo_token: bool,
    launch_failures: VecDeque<LaunchFailure>,
    requests: VecDeque<RequestFault>,
    never_ready: usize,
    die_after_ready: VecDeque<Duration>,
    not_found_lookups: usize,
}

/// Fault injection for [`RunComfyEmulator`](super::RunComfyEmulator). Faults queue up and fire in order.
#[derive(Debug)]
pub struct RunComfyFaults {
    state: Mutex<State>,
    /// While true, requests get no answer (see [`RunComfyFaults::set_unreachable`]).
    unreachable: tokio::sync::watch::Sender<bool>,
}

impl Default for RunComfyFaults {
    fn default() -> Self {
        Self { state: Mutex::default(), unreachable: tokio::sync::watch::Sender::new(false) }
    }
}

impl RunComfyFaults {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next launch (after any already queued) fails this way.
    pub fn fail_next_launch(&self, failure: LaunchFailure) {
        self.lock().launch_failures.push_back(failure);
    }

    /// The next `machines` launched machines stay `Starting` forever (until deleted).
    pub fn never_ready(&self, machines: usize) {
        self.lock().never_ready += machines;
    }

    /// The next launched machine dies `after` it becomes Ready: its ComfyUI stops while the API keeps
    /// reporting `Ready` (and billing) until it is deleted or its duration runs out.
    pub fn die_after_ready(&self, after: Duration) {
        self.lock().die_after_ready.push_back(after);
    }

    /// The next `count` API requests answer `status` (e.g. 502, 503) without being processed.
    pub fn fail_requests(&self, count: usize, status: u16) {
        self.lock().requests.extend(std::iter::repeat_n(RequestFault::Status(status), count));
    }

    /// The next `count` API requests answer 429 with `Retry-After: retry_after` without being processed.
    pub fn rate_limit_requests(&self, count: usize, retry_after: Duration) {
        self.lock().requests.extend(std::iter::repeat_n(RequestFault::RateLimited(retry_after), count));
    }

    /// The next `count` API requests answer HTTP 200 with an error body (RunComfy's documented quirk),
    /// without being processed.
    pub fn errors_in_200(&self, count: usize, code: i64, message: &str) {
        let fault = RequestFault::ErrorIn200 { code, message: message.to_string() };
        self.lock().requests.extend(std::iter::repeat_n(fault, count));
    }

    /// Every machine launched from now on answers 404 to its first `lookups` GET/DELETE/update requests,
    /// like an eventually consistent store (it is listed normally). 0 turns it off.
    pub fn not_found_after_launch(&self, lookups: usize) {
        self.lock().not_found_lookups = lookups;
    }

    /// While `unreachable`, every API request is held without an answer, as behind a network partition
    /// (callers' timeouts fire); requests still held when it is turned off get HTTP 504.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.unreachable.send_replace(unreachable);
    }

    /// Auth failures (401/403) quote the presented `Authorization` header in their message, as some
    /// gateways do: what a client passes on from an error body must not leak the token.
    pub fn echo_token_in_auth_errors(&self, echo: bool) {
        self.lock().echo_token = echo;
    }

    /// Removes every queued fault (and ends `set_unreachable`).
    pub fn clear(&self) {
        *self.lock() = State::default();
        self.set_unreachable(false);
    }

    pub(crate) fn echoes_token(&self) -> bool {
        self.lock().echo_token
    }

    /// Resolves at once if the API is reachable; otherwise once it is again (`true`: the request was held).
    pub(crate) async fn wait_reachable(&self) -> bool {
        let mut rx = self.unreachable.subscribe();
        if !*rx.borrow_and_update() {
            return false;
        }
        let _ = rx.wait_for(|u| !*u).await;
        true
    }

    pub(crate) fn take_launch_failure(&self) -> Option<LaunchFailure> {
        self.lock().launch_failures.pop_front()
    }

    pub(crate) fn take_request_fault(&self) -> Option<RequestFault> {
        self.lock().requests.pop_front()
    }

    pub(crate) fn take_machine_plan(&self) -> MachinePlan {
        let mut s = self.lock();
        let never_ready = s.never_ready > 0;
        s.never_ready = s.never_ready.saturating_sub(1);
        MachinePlan {
            never_ready,
            die_after_ready: s.die_after_ready.pop_front(),
            not_found_lookups: s.not_found_lookups,
        }
    }
}
