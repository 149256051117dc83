//! Following jobs that another replica runs (README "Replicas on PostgreSQL"): a standby streams a job's
//! events itself, from the shared log, woken by PostgreSQL's notifications of committed events; it reads
//! jobs, pages of jobs and outputs from the shared database and artifacts with the leader's own queries
//! for jobs it does not hold ([`JobFollower::get`], [`JobFollower::list`], [`JobFollower::open_output`]).
//!
//! One listener per replica ([`PgStore::listen_events`]) hears `"{job} {seq}"` after each commit and wakes
//! that job's subscribers, which then read the log after the last sequence they delivered: a notification
//! only says *that* a log grew, the events come from the log, so notices that merge or arrive late lose
//! nothing. A subscriber registers its wake-up *before* it reads the log (pitfall "snapshot, then
//! subscribe"), and every subscriber is woken whenever the listener (re)connects, because PostgreSQL
//! drops the notifications of a listener that is not connected.
//!
//! The subscribers of one job share its reads (a [`Tail`]): after a notice, the first subscriber to ask
//! reads the new events once, under the job's lock, and the others take them from the tail, so a notice
//! costs one read of the log whatever the number of subscribers (`comfyrelay_follower_log_reads_total`
//! counts them). A tail is fresh while no wake-up came after its last read began; a subscriber behind the
//! tail's window, or a tail not yet started, reads the log for itself. The job's row (its tenant, for the
//! scope check) is read once too, by its first subscriber.
//!
//! Per subscriber this holds one `watch` receiver and at most one page of the log; wake-ups while it is
//! busy collapse into one. Per followed job, at most [`TAIL_EVENTS`] recent events.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::{
    Event, EventStream, Job, JobError, JobId, JobPage, ListRequest, OutputFile, OutputView, Scope, log,
    not_found,
};
use crate::store::{ArtifactReader, ArtifactStore, EventNotice, PgStore, Store as _};

/// How long the listener waits before it connects again after the database could not be reached.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// The recent events a followed job's [`Tail`] keeps for its subscribers.
const TAIL_EVENTS: usize = 256;
/// The events one read of the log brings into a tail.
const TAIL_PAGE: u32 = 256;

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
        let (wake, followed) = self.wakers.register(&id.to_string());
        // A job's tenant never changes: the job's row is read once for all its subscribers. A terminal job
        // keeps the wake-up of a later subscriber, harmlessly: its stream ends at the terminal event.
        let (tenant, terminal) = match followed.tenant.get() {
            Some(tenant) => (tenant.clone(), false),
            None => {
                crate::metrics::follower_log_read();
                let row = self.store.get_job(&id.to_string()).await?.ok_or_else(|| not_found(id))?;
                let _ = followed.tenant.set(row.tenant.clone());
                (row.tenant, row.terminal)
            }
        };
        if !scope.sees(&tenant) {
            return Err(not_found(id));
        }
        let wake = (!terminal).then_some(wake);
        Ok(EventStream::following(self.clone(), id, after_sequence, skip_previews, wake))
    }

    /// One job as of its last commit, as [`super::JobManager::get`] answers for it.
    ///
    /// # Errors
    /// `NotFound` (also for another tenant's job), storage failures.
    pub async fn get(&self, id: JobId, scope: &Scope) -> Result<Job, JobError> {
        super::stored_job(&*self.store, id, scope).await
    }

    /// A page of jobs, newest first, as [`super::JobManager::list`] answers it.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad page token or size, storage failures.
    pub async fn list(&self, req: ListRequest, scope: &Scope) -> Result<JobPage, JobError> {
        super::list_stored(&*self.store, req, scope, |_| None).await
    }

    /// Opens an output of a job for streaming from byte `offset` on, from the artifacts every replica
    /// shares.
    ///
    /// # Errors
    /// `NotFound` for an unknown job or file name; `InvalidArgument` for an `offset` past its end;
    /// artifact failures.
    pub async fn open_output(
        &self,
        id: JobId,
        filename: &str,
        offset: u64,
        scope: &Scope,
    ) -> Result<(OutputFile, ArtifactReader), JobError> {
        let job = self.get(id, scope).await?;
        super::open_output_of(&self.artifacts, &job, filename, offset).await
    }

    /// Logged events after `after`, at most `limit`: from the job's tail when its subscribers' last read
    /// is fresh and covers them, else read (once for all its subscribers when they are at the tail).
    pub(super) async fn events_after(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Arc<Event>>, JobError> {
        let Some(followed) = self.wakers.get(&id.to_string()) else {
            return self.read(id, after, limit).await;
        };
        let mut tail = followed.tail.lock().await;
        let Some(last) = tail.last else {
            // Not started: this subscriber's read starts it when it reaches the end of the log.
            let wakes = followed.wakes.load(Ordering::SeqCst);
            let page = self.read(id, after, limit).await?;
            if !page.is_empty() && (page.len() as u64) < u64::from(limit) {
                tail.extend(&page, wakes);
            }
            return Ok(page);
        };
        if !tail.is_fresh(&followed) && after >= tail.first().saturating_sub(1) {
            // One read for every subscriber at the tail; a full page leaves the tail stale (more to read).
            let wakes = followed.wakes.load(Ordering::SeqCst);
            let page = self.read(id, last, TAIL_PAGE).await?;
            let reached_end = (page.len() as u64) < u64::from(TAIL_PAGE);
            let fresh_as_of = if reached_end { wakes } else { tail.fresh_as_of };
            tail.extend(&page, fresh_as_of);
        }
        match tail.after(after, limit) {
            Some(events) => Ok(events),
            // Behind the tail's window: this subscriber reads for itself.
            None => {
                drop(tail);
                self.read(id, after, limit).await
            }
        }
    }

    /// Whether the job has ended (or is gone): known from a fresh tail, else read.
    pub(super) async fn has_ended(&self, id: JobId) -> Result<bool, JobError> {
        if let Some(followed) = self.wakers.get(&id.to_string()) {
            let tail = followed.tail.lock().await;
            // A job's row turns terminal in the commit of its terminal event, so a fresh tail knows.
            if tail.last.is_some() && tail.is_fresh(&followed) {
                return Ok(tail.ended);
            }
        }
        crate::metrics::follower_log_read();
        Ok(self.store.get_job(&id.to_string()).await?.is_none_or(|row| row.terminal))
    }

    /// Reads the log after `after`, at most `limit`.
    async fn read(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<Arc<Event>>, JobError> {
        crate::metrics::follower_log_read();
        let rows = self.store.events_after(&id.to_string(), after, limit).await?;
        rows.iter().map(|row| log::decode_event(row).map(Arc::new)).collect()
    }

    /// The output's metadata with inline bytes when small enough.
    ///
    /// # Errors
    /// Artifact failures.
    pub async fn output_view(&self, output: &OutputFile) -> Result<OutputView, JobError> {
        super::output_view(&self.artifacts, self.inline_output_max_bytes, output).await
    }
}

/// The jobs being followed, by job id.
#[derive(Debug, Default)]
struct Wakers {
    jobs: Mutex<HashMap<String, Arc<Followed>>>,
}

/// One followed job: its subscribers' wake-up and the reads they share.
#[derive(Debug)]
struct Followed {
    wake: watch::Sender<()>,
    /// Wake-ups so far (notices of this job and resyncs); a tail read that began at this count holds
    /// every commit announced until then.
    wakes: AtomicU64,
    tail: tokio::sync::Mutex<Tail>,
    /// The job's tenant, once a subscriber has read the job's row.
    tenant: std::sync::OnceLock<String>,
}

/// The recent events of a followed job, read once for all its subscribers.
#[derive(Debug, Default)]
struct Tail {
    /// Consecutive events, oldest first, at most [`TAIL_EVENTS`].
    events: VecDeque<Arc<Event>>,
    /// The sequence of the last event read; `None` until a read reached the end of the log.
    last: Option<u64>,
    /// [`Followed::wakes`] when the last read that reached the end of the log began.
    fresh_as_of: u64,
    /// A terminal event was read.
    ended: bool,
}

impl Tail {
    /// Whether no wake-up came since the last read that reached the end of the log began.
    fn is_fresh(&self, followed: &Followed) -> bool {
        self.fresh_as_of == followed.wakes.load(Ordering::SeqCst)
    }

    /// The sequence of the oldest event held (one past `last` when none is).
    fn first(&self) -> u64 {
        self.events.front().map_or_else(|| self.last.unwrap_or(0) + 1, |e| e.seq)
    }

    /// Appends the events of a read (the ones after `last`), fresh as of `wakes`.
    fn extend(&mut self, page: &[Arc<Event>], wakes: u64) {
        for e in page {
            if self.last.is_some_and(|last| e.seq <= last) {
                continue;
            }
            self.ended |= e.kind.is_terminal();
            self.last = Some(e.seq);
            self.events.push_back(e.clone());
            if self.events.len() > TAIL_EVENTS {
                self.events.pop_front();
            }
        }
        self.fresh_as_of = wakes;
    }

    /// The events after `after`, at most `limit`, when the tail holds all of them up to its end.
    fn after(&self, after: u64, limit: u32) -> Option<Vec<Arc<Event>>> {
        let last = self.last?;
        if after >= last {
            return Some(Vec::new());
        }
        if after + 1 < self.first() {
            return None;
        }
        let skip = usize::try_from(after + 1 - self.first()).ok()?;
        Some(self.events.iter().skip(skip).take(limit as usize).cloned().collect())
    }
}

impl Wakers {
    /// A new subscriber's wake-up, and the job it follows.
    fn register(self: &Arc<Self>, job_id: &str) -> (Wake, Arc<Followed>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let followed = jobs.entry(job_id.to_owned()).or_insert_with(|| {
            Arc::new(Followed {
                wake: watch::channel(()).0,
                wakes: AtomicU64::new(0),
                tail: tokio::sync::Mutex::new(Tail::default()),
                tenant: std::sync::OnceLock::new(),
            })
        });
        let wake = Wake { rx: followed.wake.subscribe(), job_id: job_id.to_owned(), wakers: self.clone() };
        (wake, followed.clone())
    }

    fn get(&self, job_id: &str) -> Option<Arc<Followed>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(job_id).cloned()
    }

    fn wake(&self, job_id: &str) {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(followed) = jobs.get(job_id) {
            followed.woken();
        }
    }

    fn wake_all(&self) {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for followed in jobs.values() {
            followed.woken();
        }
    }
}

impl Followed {
    /// The log may have grown: the tail is stale (counted first), then the subscribers wake.
    fn woken(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.wake.send_replace(());
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
        if jobs.get(&self.job_id).is_some_and(|followed| followed.wake.receiver_count() <= 1) {
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
