//! Following a job's events to its end, resuming after a lost connection from the last sequence
//! received: `StreamJob` replays from `after_sequence`, and events at or below it are dropped, so the
//! caller sees every event once, in order.
//!
//! Reconnects back off exponentially (`backon`, 200 ms doubling to 5 s, with jitter) and give up when
//! the stream has stayed broken for `reconnect_for` (a job may be silent for long; only a broken stream
//! counts). One-shot calls that are safe to repeat (a submit with its idempotency key) and downloads
//! (resumed at the byte they reached) are retried the same way, under a [`Retry`] budget.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::time::Instant;
use tonic::Code;

use super::{
    connect::Clients,
    error::CliError,
    render::{Printer, Reconnect, Resume},
};
use crate::proto::pb;

/// How a followed job ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum End {
    Succeeded(Vec<pb::Output>),
    Failed(Option<pb::JobError>),
    Cancelled(String),
}

/// What the follower tells its observer besides events.
#[derive(Debug)]
pub(crate) enum Notice<'a> {
    /// An event, each sequence once.
    Event(&'a pb::JobEvent),
    /// The stream broke; it is re-opened after the sequence it names.
    Reconnecting(Reconnect),
}

/// Whether a stream error is worth a reconnect: transport failures and a server going away.
fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        // A cut connection surfaces as `Unknown` (h2/hyper errors) or `Unavailable`; `Internal` covers a
        // stream reset mid-message; `Cancelled` is what a server's graceful shutdown can send.
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::DeadlineExceeded
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// The delays between attempts: 200 ms doubling to 5 s, with jitter, for as long as the caller's budget.
fn backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether a one-shot call's error is worth repeating: the server said it is unavailable (draining, no
/// leader yet, its database away), or the connection broke (`Unknown`).
fn call_retryable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown)
}

/// The retry budget of one call or stream (named in notices): attempts while the server is unavailable
/// or the connection breaks, until it has stayed broken for `retry_for` with no progress since (a job
/// that is merely silent never counts), backing off between them. Each retry is told (a [`Reconnect`]
/// notice). Only for calls that are safe to repeat, and streams resumed where they broke.
///
/// An `UNAVAILABLE` the server sent is always worth a retry. A failure of the transport (the status has a
/// source: no answer came) is retried only once `answered` says the server has answered this process
/// before: a first call that cannot get through (plaintext to a TLS port, say) fails at once, as the
/// connection does when nothing listens. Every answer sets `answered`.
#[derive(Debug)]
pub(crate) struct Retry<'a> {
    call: &'static str,
    retry_for: Duration,
    printer: Printer,
    answered: &'a AtomicBool,
    /// When the call broke with no progress since.
    broken_since: Option<Instant>,
    delays: backon::ExponentialBackoff,
}

impl<'a> Retry<'a> {
    /// A budget of `retry_for` of unbroken failure.
    pub(crate) fn new(
        call: &'static str,
        retry_for: Duration,
        printer: Printer,
        answered: &'a AtomicBool,
    ) -> Self {
        Self { call, retry_for, printer, answered, broken_since: None, delays: backoff() }
    }

    /// The server answered: later transport failures are worth a retry.
    pub(crate) fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// A stream made progress (an event, a download's chunk): the next break gets the whole `retry_for`
    /// again, and the backoff starts over.
    pub(crate) fn progressed(&mut self) {
        self.broken_since = None;
        self.delays = backoff();
    }

    /// After a failed attempt: tells the retry ([`Reconnect::print`]) and waits for it, or returns the
    /// error ([`Retry::next`]).
    ///
    /// # Errors
    /// `status`, when it ends the call.
    pub(crate) async fn again(&mut self, status: tonic::Status, resume: Resume) -> Result<(), CliError> {
        let reconnect = self.next(status, resume)?;
        reconnect.print(self.printer);
        tokio::time::sleep(reconnect.retry_in).await;
        Ok(())
    }

    /// After a failed attempt: the retry to tell and wait for, or the error when it is not worth one or
    /// the call has stayed broken for `retry_for`. A stream resumed where it broke (`resume`) also retries
    /// the failures of a connection cut mid-message (`Internal`, `Cancelled`, `Aborted`).
    ///
    /// # Errors
    /// `status`, when it ends the call.
    pub(crate) fn next(&mut self, status: tonic::Status, resume: Resume) -> Result<Reconnect, CliError> {
        let from_server = std::error::Error::source(&status).is_none();
        if from_server {
            self.answered();
        }
        let worth = match resume {
            Resume::Repeat => call_retryable(&status),
            Resume::AfterSequence(_) | Resume::AtByte { .. } => retryable(&status),
        };
        let broken_for = self.broken_since.get_or_insert_with(Instant::now).elapsed();
        if !worth || !(from_server || self.answered.load(Ordering::Relaxed)) || broken_for >= self.retry_for {
            return Err(status.into());
        }
        let retry_in = self.delays.next().unwrap_or(Duration::from_secs(5));
        Ok(Reconnect { call: self.call, error: status.message().to_string(), retry_in, resume })
    }
}

/// Follows `job_id` from after `after` to its terminal event, calling `observe` for each event (once per
/// sequence) and each reconnect.
///
/// # Errors
/// The first non-retryable RPC error, or the last error once the stream stayed broken for
/// `reconnect_for`.
pub(crate) async fn follow(
    clients: &Clients,
    job_id: &str,
    after: u64,
    reconnect_for: Duration,
    mut observe: impl FnMut(Notice<'_>),
) -> Result<End, CliError> {
    let mut last = after;
    let mut retry = clients.retry_within("StreamJob", reconnect_for);
    loop {
        let mut jobs = clients.jobs.clone();
        let request =
            pb::StreamJobRequest { job_id: job_id.to_string(), after_sequence: last, skip_previews: false };
        let broke = match jobs.stream_job(request).await {
            Ok(response) => {
                retry.answered();
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            if event.sequence <= last {
                                continue;
                            }
                            last = event.sequence;
                            retry.progressed();
                            observe(Notice::Event(&event));
                            if let Some(end) = terminal(&event) {
                                return Ok(end);
                            }
                        }
                        // The server ended the stream before the terminal event (it is draining): resume.
                        Ok(None) => break tonic::Status::unavailable("the stream ended before the job did"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        let reconnect = retry.next(broke, Resume::AfterSequence(last))?;
        let retry_in = reconnect.retry_in;
        observe(Notice::Reconnecting(reconnect));
        tokio::time::sleep(retry_in).await;
    }
}

/// The job's end, if `event` is terminal.
pub(crate) fn terminal(event: &pb::JobEvent) -> Option<End> {
    use pb::job_event::Kind;
    match &event.kind {
        Some(Kind::Succeeded(s)) => Some(End::Succeeded(s.outputs.clone())),
        Some(Kind::Failed(f)) => Some(End::Failed(f.error.clone())),
        Some(Kind::Cancelled(c)) => Some(End::Cancelled(c.reason.clone())),
        Some(
            Kind::Queued(_)
            | Kind::Provisioning(_)
            | Kind::Started(_)
            | Kind::NodeStarted(_)
            | Kind::NodesCached(_)
            | Kind::Progress(_)
            | Kind::Preview(_)
            | Kind::OutputReady(_)
            | Kind::NodeExecuted(_)
            | Kind::ProgressText(_)
            | Kind::Retrying(_)
            | Kind::ComfyMessage(_)
            | Kind::PromptSubmitted(_)
            | Kind::Warning(_)
            | Kind::CancelRequested(_)
            | Kind::CancelStep(_)
            | Kind::Requeued(_),
        )
        | None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_download_that_made_progress_gets_its_whole_retry_budget_again() {
        let answered = AtomicBool::new(true);
        let cut = || tonic::Status::unavailable("cut");
        let resume = || Resume::AtByte { filename: "a.png".into(), offset: 1 };
        let mut retry =
            Retry::new("DownloadOutput", Duration::from_secs(10), Printer { json: true }, &answered);
        assert!(retry.again(cut(), resume()).await.is_ok(), "within the budget: retried");
        // Broken for eleven seconds with no progress since: the budget is spent...
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(retry.again(cut(), resume()).await.is_err(), "no progress for longer than retry_for");
        // ...and with progress it counts from the next break.
        let mut retry =
            Retry::new("DownloadOutput", Duration::from_secs(10), Printer { json: true }, &answered);
        assert!(retry.again(cut(), resume()).await.is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        retry.progressed();
        assert!(retry.again(cut(), resume()).await.is_ok(), "progress 0 s ago: retried");
        // A long download (or a silent job) that breaks for the first time gets the whole budget.
        let mut retry = Retry::new("StreamJob", Duration::from_secs(10), Printer { json: true }, &answered);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(retry.next(cut(), Resume::AfterSequence(3)).is_ok(), "first break after a long silence");
        // A status that is not worth a retry ends the call at once, budget or not.
        let refused = retry.again(tonic::Status::not_found("gone"), resume()).await;
        assert!(refused.is_err());
    }
}
