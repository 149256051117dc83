//! Following jobs that another replica runs (README "Replicas on PostgreSQL"): a standby streams a job's
//! events itself, from the shared log, woken by PostgreSQL's notifications of committed events.
//!
//! One listener per replica ([`PgStore::listen_events`]) hears `"{job} {seq}"` after each commit and wakes
//! that job's subscribers, which then read the log after the last sequence they delivered: a notification
//! only says *that* a log grew, the events come from the log, so notices that merge or arrive late lose
//! nothing. A subscriber registers its wake-up *before* it reads the log (pitfall "snapshot, then
//! subscribe"), and every subscriber is woken whenever the listener (re)connects, because PostgreSQL
//! drops the notifications of a listener that is not connected.
//!
//! Per subscriber this holds one `watch` receiver and at most one page of the log; wake-ups while it is
//! busy collapse into one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::{Event, EventStream, JobError, JobId, OutputFile, OutputView, Scope, log, not_found};
use crate::store::{ArtifactStore, EventNotice, PgStore, Store as _};

/// How long the listener waits before it connects again after the database could not be reached.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Jobs read from the shared database, for a replica that does not run them (a standby).
#[derive(Debug, Clone)]
pub struct JobFollower {
    store: Arc<PgStore>,
    artifacts: ArtifactStore,
    inline_output_max_bytes: u64,
    wakers: Arc<Wakers>,
    /// The notification listener; aborted when the last clone goes.
    _listener: Arc<AbortOnDropHandle<()>>,
}

impl JobFollower {
    /// Starts listening for committed events on `store` (reconnecting in the background) and serves
    /// outputs from `artifacts`, inline up to `inline_output_max_bytes` like the leader.
    pub fn start(store: Arc<PgStore>, artifacts: ArtifactStore, inline_output_max_bytes: u64) -> Self {
        let wakers = Arc::new(Wakers::default());
        // Exit policy: runs until aborted (the last clone dropped); database failures are retried.
        let listener = tokio::spawn(listen(store.clone(), wakers.clone()));
        Self {
            store,
            artifacts,
            inline_output_max_bytes,
            wakers,
            _listener: Arc::new(AbortOnDropHandle::new(listener)),
        }
    }

    /// A job's events after `after_sequence`, as [`super::JobManager::subscribe`] streams them on the
    /// leader: the logged ones, then each one as its commit is announced, ending after the terminal event.
    ///
    /// # Errors
    /// `NotFound` (also for another tenant's job), storage failures.
    pub async fn subscribe(
        &self,
        id: JobId,
        after_sequence: u64,
        skip_previews: bool,
        scope: &Scope,
    ) -> Result<EventStream, JobError> {
        // Woken for every commit from now on, FIRST; then the log is read.
        let wake = self.wakers.register(&id.to_string());
        let row = self.store.get_job(&id.to_string()).await?.ok_or_else(|| not_found(id))?;
        if !scope.sees(&row.tenant) {
            return Err(not_found(id));
        }
        let wake = (!row.terminal).then_some(wake);
        Ok(EventStream::following(self.clone(), id, after_sequence, skip_previews, wake))
    }

    /// Reads logged events after `after`, at most `limit`.
    pub(super) async fn events_after(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, JobError> {
        let rows = self.store.events_after(&id.to_string(), after, limit).await?;
        rows.iter().map(log::decode_event).collect()
    }

    /// Whether the job has ended (or is gone).
    pub(super) async fn has_ended(&self, id: JobId) -> Result<bool, JobError> {
        Ok(self.store.get_job(&id.to_string()).await?.is_none_or(|row| row.terminal))
    }

    /// The output's metadata with inline bytes when small enough.
    pub(super) async fn output_view(&self, output: &OutputFile) -> Result<OutputView, JobError> {
        super::output_view(&self.artifacts, self.inline_output_max_bytes, output).await
    }
}

/// The wake-ups of the jobs being followed, by job id.
#[derive(Debug, Default)]
struct Wakers {
    jobs: Mutex<HashMap<String, watch::Sender<()>>>,
}

impl Wakers {
    fn register(self: &Arc<Self>, job_id: &str) -> Wake {
        let mut jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rx = jobs.entry(job_id.to_owned()).or_insert_with(|| watch::channel(()).0).subscribe();
        Wake { rx, job_id: job_id.to_owned(), wakers: self.clone() }
    }

    fn wake(&self, job_id: &str) {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = jobs.get(job_id) {
            tx.send_replace(());
        }
    }

    fn wake_all(&self) {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for tx in jobs.values() {
            tx.send_replace(());
        }
    }
}

/// One subscriber's wake-up: changed whenever its job's log may have grown.
#[derive(Debug)]
pub(super) struct Wake {
    rx: watch::Receiver<()>,
    job_id: String,
    wakers: Arc<Wakers>,
}

impl Wake {
    /// Waits until the log may have grown since the last call (or since registering).
    pub(super) async fn woken(&mut self) {
        // The sender lives in `wakers` while this receiver does (see `Drop`): `changed` fails never.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        let mut jobs = self.wakers.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // This receiver still counts: the last one out removes the entry.
        if jobs.get(&self.job_id).is_some_and(|tx| tx.receiver_count() <= 1) {
            jobs.remove(&self.job_id);
        }
    }
}

/// The one listener: wakes a job's subscribers for each of its notices, and every subscriber when it
/// starts listening, or again after losing its connection (what was committed meanwhile was not announced).
async fn listen(store: Arc<PgStore>, wakers: Arc<Wakers>) {
    let mut failing = false;
    loop {
        let mut notices = match store.listen_events().await {
            Ok(n) => n,
            Err(e) => {
                report(&mut failing, &e);
                tokio::time::sleep(RECONNECT_EVERY).await;
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!("replicas: listening for committed events again");
        }
        wakers.wake_all();
        loop {
            match notices.next().await {
                Ok(EventNotice::Appended { job_id, .. }) => wakers.wake(&job_id),
                Ok(EventNotice::Resync) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("replicas: listening for committed events again");
                    }
                    wakers.wake_all();
                }
                Err(e) => {
                    // The next call reconnects and answers `Resync`.
                    report(&mut failing, &e);
                    tokio::time::sleep(RECONNECT_EVERY).await;
                }
            }
        }
    }
}

/// Logs the first failure of a series as a warning and the rest at debug level (one a second would flood
/// the log through a database outage).
fn report(failing: &mut bool, e: &crate::store::StoreError) {
    let error = crate::telemetry::ErrorChain(e);
    if std::mem::replace(failing, true) {
        tracing::debug!(%error, "replicas: still cannot listen for committed events");
    } else {
        tracing::warn!(%error, "replicas: cannot listen for committed events; streams on this replica wait until it can");
    }
}
