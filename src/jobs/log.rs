//! The job log's one writer: every event of every job goes through it. It takes what has arrived together
//! (up to a bound), checks each event against its job's current record with [`apply`], commits the
//! accepted events and the jobs' new records in one transaction (group commit), and only then installs
//! the new records and broadcasts the events. So an event reaches a subscriber only once it is durable,
//! and a replay after a crash equals what live subscribers saw.
//!
//! # Bounds and policies
//! - The inbox holds at most [`INBOX`] commands. Runners and submits wait for room (backpressure on the
//!   job that produces faster than the disk takes). The scheduler never waits: it uses
//!   [`Log::try_append`] for queue positions (a dropped position is published again on its next change)
//!   and spawns the rare event that must not be dropped.
//! - A batch is at most [`MAX_BATCH`] commands and about [`MAX_BATCH_BYTES`] of event bodies.
//! - Each live job's broadcast keeps [`LIVE_CAPACITY`] events; a subscriber further behind catches up
//!   from the log (see `subscribe`).
//!
//! # Task
//! One task on a thread of its own (the store's commit runs synchronously there, without a hop to a
//! connection thread), awaited by the job engine at drain. Exit policy: it runs until [`Log::close`] (queued after
//! everything sent before it) or until every sender is gone; a failed commit is logged with its cause
//! chain and reported to every waiter of that batch, and the writer goes on with the next batch.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as StdMutex},
    time::Instant,
};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{
    apply::{Rejected, apply},
    error::JobError,
    model::{Event, EventKind, Job, JobId, JobRecord, JobSpec, now_ms},
};
use crate::{
    store::{Batch, CreateOutcome, EventRow, IdempotencyKey, JobRow, NewJob, StateUpdate, Store},
    telemetry::JobTelemetry,
};

/// Commands the writer's inbox holds.
pub(super) const INBOX: usize = 8192;
/// Commands committed together at most.
pub(super) const MAX_BATCH: usize = 2048;
/// Event bytes committed together, about (a batch stops growing past this).
pub(super) const MAX_BATCH_BYTES: usize = 16 << 20;
/// Events each live job's broadcast keeps for subscribers that fall behind.
pub(super) const LIVE_CAPACITY: usize = 256;

/// A job that has not ended: its spec, its current record and its live feed.
#[derive(Debug)]
pub(super) struct LiveJob {
    /// What it is.
    pub(super) spec: Arc<JobSpec>,
    record: watch::Sender<Arc<JobRecord>>,
    events: broadcast::Sender<Arc<Event>>,
    /// The last [`LIVE_CAPACITY`] committed events, so a subscriber catches up without reading the store.
    recent: StdMutex<Recent>,
    /// Cancelled when the job ended or a caller asked to cancel it: its runner stops waiting.
    pub(super) cancel: CancellationToken,
    /// The job's trace and metrics, fed by the writer with every committed event.
    pub(super) telemetry: JobTelemetry,
}

/// A live job's most recent events: every committed event from sequence `from` on (those before it are
/// only in the store).
#[derive(Debug)]
struct Recent {
    from: u64,
    events: std::collections::VecDeque<Arc<Event>>,
}

impl LiveJob {
    fn new(spec: Arc<JobSpec>, record: JobRecord, telemetry: JobTelemetry) -> Arc<Self> {
        let recent = Recent { from: record.last_sequence + 1, events: Default::default() };
        Arc::new(Self {
            spec,
            record: watch::channel(Arc::new(record)).0,
            events: broadcast::channel(LIVE_CAPACITY).0,
            recent: StdMutex::new(recent),
            cancel: CancellationToken::new(),
            telemetry,
        })
    }

    /// The record as last committed.
    pub(super) fn record(&self) -> Arc<JobRecord> {
        self.record.borrow().clone()
    }

    /// The job as last committed.
    pub(super) fn job(&self) -> Job {
        Job { spec: self.spec.clone(), record: self.record() }
    }

    /// The live feed of committed events.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// The committed events after `after`, when they are all still held in memory (`None`: read the
    /// store). Subscribe to the live feed first: an event committed after this snapshot is then in the feed.
    pub(super) fn events_after(&self, after: u64) -> Option<Vec<Arc<Event>>> {
        let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if after.saturating_add(1) < recent.from {
            return None;
        }
        Some(recent.events.iter().filter(|e| e.seq > after).cloned().collect())
    }

    /// Keeps a committed event among the recent ones, then broadcasts it.
    fn publish(&self, event: Arc<Event>) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if recent.events.is_empty() {
                // A new job's record already counts its first event.
                recent.from = recent.from.min(event.seq);
            }
            if recent.events.len() == LIVE_CAPACITY
                && let Some(old) = recent.events.pop_front()
            {
                recent.from = old.seq + 1;
            }
            recent.events.push_back(event.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    /// Changes of the committed record.
    pub(super) fn watch(&self) -> watch::Receiver<Arc<JobRecord>> {
        self.record.subscribe()
    }
}

/// Why an append did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum AppendError {
    /// The job is not live (finished, or unknown).
    #[error("the job is not live")]
    NotLive,
    /// The event does not apply to the job's state.
    #[error("event refused: {0}")]
    Rejected(Rejected),
    /// The batch could not be committed.
    #[error("the job log could not be written")]
    Store(#[source] Arc<crate::store::StoreError>),
    /// The writer has stopped (shutdown).
    #[error("the job log is closed")]
    Closed,
}

impl From<AppendError> for JobError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Store(s) => JobError::Store(s),
            AppendError::Closed => JobError::ShuttingDown,
            other => JobError::Log(other.to_string()),
        }
    }
}

/// What a create did.
#[derive(Debug)]
pub(super) enum Created {
    /// Stored; the job is live.
    New(Arc<LiveJob>),
    /// The idempotency key was used before with the same request, by this job.
    Existing(String),
    /// The key was used before with a different request, by this job.
    Conflict(String),
}

/// Resolves when an appended event is durable (or refused).
#[derive(Debug)]
#[must_use = "an unawaited ticket is fire-and-forget; say so with `drop`"]
pub(super) struct Ticket(oneshot::Receiver<Result<Arc<Event>, AppendError>>);

impl Ticket {
    /// Waits until the event is committed and broadcast.
    ///
    /// # Errors
    /// The event was refused, the job is not live, the commit failed or the writer stopped.
    pub(super) async fn durable(self) -> Result<Arc<Event>, AppendError> {
        self.0.await.unwrap_or(Err(AppendError::Closed))
    }
}

/// Where the writer answers an append.
type Reply = oneshot::Sender<Result<Arc<Event>, AppendError>>;

enum Command {
    Create {
        spec: Arc<JobSpec>,
        first: EventKind,
        key: Option<IdempotencyKey>,
        telemetry: Box<JobTelemetry>,
        reply: oneshot::Sender<Result<Created, AppendError>>,
    },
    Append {
        id: JobId,
        kind: EventKind,
        reply: Reply,
    },
    Close,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Create { spec, .. } => write!(f, "Create({})", spec.id),
            Command::Append { id, kind, .. } => write!(f, "Append({id}, {})", kind.name()),
            Command::Close => f.write_str("Close"),
        }
    }
}

/// The handle to the writer and the registry of live jobs. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Log {
    tx: mpsc::Sender<Command>,
    live: Arc<StdMutex<HashMap<JobId, Arc<LiveJob>>>>,
}

impl Log {
    /// Starts the writer on `store`, on a thread of its own (a current-thread runtime: the store's commit
    /// may block it, and nothing else waits on that thread). The returned future resolves when the writer
    /// has stopped; the owner awaits it at drain.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub(super) fn new(
        store: Arc<dyn Store>,
    ) -> std::io::Result<(Self, impl std::future::Future<Output = ()> + Send + 'static)> {
        let (tx, rx) = mpsc::channel(INBOX);
        let live = Arc::new(StdMutex::new(HashMap::new()));
        let writer = Writer { store, live: live.clone(), rx };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stopped, on_stop) = oneshot::channel::<()>();
        let span = tracing::info_span!("job_log");
        std::thread::Builder::new().name("job-log".into()).spawn(move || {
            runtime.block_on(tracing::Instrument::instrument(writer.run(), span));
            drop(stopped);
        })?;
        Ok((Self { tx, live }, async move {
            let _ = on_stop.await;
        }))
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<LiveJob>>> {
        // Held only for map operations, never across an await; a poisoned map is still a valid map.
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A live job.
    pub(super) fn live(&self, id: JobId) -> Option<Arc<LiveJob>> {
        self.registry().get(&id).cloned()
    }

    /// How many jobs are live.
    pub(super) fn live_count(&self) -> usize {
        self.registry().len()
    }

    /// Makes a stored, unfinished job live again (recovery at start).
    pub(super) fn register(&self, spec: Arc<JobSpec>, record: JobRecord) -> Arc<LiveJob> {
        // A recovered job starts a new trace.
        let telemetry = JobTelemetry::new(spec.id, &spec.workflow);
        let live = LiveJob::new(spec, record, telemetry);
        self.registry().insert(live.spec.id, live.clone());
        live
    }

    /// Stores a new job with its first event; returns once it is committed.
    ///
    /// # Errors
    /// The commit failed or the writer stopped.
    pub(super) async fn create(
        &self,
        spec: Arc<JobSpec>,
        first: EventKind,
        key: Option<IdempotencyKey>,
        telemetry: JobTelemetry,
    ) -> Result<Created, AppendError> {
        let (reply, rx) = oneshot::channel();
        let command = Command::Create { spec, first, key, telemetry: Box::new(telemetry), reply };
        self.tx.send(command).await.map_err(|_| AppendError::Closed)?;
        rx.await.unwrap_or(Err(AppendError::Closed))
    }

    /// Queues an event for job `id`, waiting for room in the inbox. Await the ticket for durability.
    pub(super) async fn append(&self, id: JobId, kind: EventKind) -> Ticket {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Command::Append { reply, .. })) =
            self.tx.send(Command::Append { id, kind, reply }).await
        {
            let _ = reply.send(Err(AppendError::Closed));
        }
        Ticket(rx)
    }

    /// Queues an event without waiting; gives it back when the inbox is full (or closed).
    ///
    /// # Errors
    /// The event, not queued.
    pub(super) fn try_append(&self, id: JobId, kind: EventKind) -> Result<(), Box<EventKind>> {
        let (reply, _) = oneshot::channel();
        match self.tx.try_send(Command::Append { id, kind, reply }) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Command::Append { kind, .. } => Err(Box::new(kind)),
                // Only an Append was sent.
                Command::Create { .. } | Command::Close => Ok(()),
            },
        }
    }

    /// Asks the writer to stop after what was queued before; returns at once.
    pub(super) async fn close(&self) {
        let _ = self.tx.send(Command::Close).await;
    }
}

struct Writer {
    store: Arc<dyn Store>,
    live: Arc<StdMutex<HashMap<JobId, Arc<LiveJob>>>>,
    rx: mpsc::Receiver<Command>,
}

/// An accepted create waiting for its commit.
struct PendingCreate {
    live: Arc<LiveJob>,
    first: Arc<Event>,
    reply: oneshot::Sender<Result<Created, AppendError>>,
}

impl Writer {
    async fn run(mut self) {
        let mut commands = Vec::with_capacity(MAX_BATCH);
        loop {
            let Some(first) = self.rx.recv().await else { return };
            let mut bytes = command_bytes(&first);
            commands.push(first);
            while commands.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(c) => {
                        bytes += command_bytes(&c);
                        commands.push(c);
                    }
                    Err(_) => break,
                }
            }
            let closing = commands.iter().any(|c| matches!(c, Command::Close));
            self.commit(&mut commands).await;
            if closing {
                // Everything sent before Close is written; refuse what comes after.
                self.rx.close();
                while let Some(c) = self.rx.recv().await {
                    refuse(c, AppendError::Closed);
                }
                return;
            }
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<LiveJob>>> {
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies, commits, then installs and broadcasts one batch.
    async fn commit(&mut self, commands: &mut Vec<Command>) {
        let now = now_ms();
        let mut batch = Batch::default();
        let mut creates: Vec<PendingCreate> = Vec::new();
        // Jobs touched, in first-touch order, with their staged record.
        let mut staged: Vec<(Arc<LiveJob>, JobRecord)> = Vec::new();
        let mut index: HashMap<JobId, usize> = HashMap::new();
        let mut accepted: Vec<(usize, Arc<Event>, Reply)> = Vec::new();
        for command in commands.drain(..) {
            match command {
                Command::Close => {}
                Command::Create { spec, first, key, telemetry, reply } => {
                    let event = Event { job_id: spec.id, seq: 1, time_ms: now, kind: first };
                    let record = match apply(&spec, &JobRecord::new(), &event) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = reply.send(Err(AppendError::Rejected(e)));
                            continue;
                        }
                    };
                    match (job_row(&spec, &record, now), event_row(&event)) {
                        (Ok(row), Ok(first_event)) => {
                            batch.creates.push(NewJob { row, first_event, key });
                            creates.push(PendingCreate {
                                live: LiveJob::new(spec, record, *telemetry),
                                first: Arc::new(event),
                                reply,
                            });
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            tracing::error!(job_id = %spec.id, error = %e, "cannot encode a new job");
                            let _ = reply.send(Err(AppendError::Rejected(Rejected::Ended)));
                        }
                    }
                }
                Command::Append { id, kind, reply } => {
                    let slot = match index.get(&id) {
                        Some(&i) => i,
                        None => {
                            let Some(live) = self.registry().get(&id).cloned() else {
                                let _ = reply.send(Err(AppendError::NotLive));
                                continue;
                            };
                            let record = (*live.record()).clone();
                            staged.push((live, record));
                            index.insert(id, staged.len() - 1);
                            staged.len() - 1
                        }
                    };
                    let (live, current) = &staged[slot];
                    let event = Event { job_id: id, seq: current.last_sequence + 1, time_ms: now, kind };
                    match apply(&live.spec, current, &event) {
                        Ok(next) => {
                            let row = match event_row(&event) {
                                Ok(row) => row,
                                Err(e) => {
                                    tracing::error!(job_id = %id, error = %e, "cannot encode an event");
                                    let _ = reply.send(Err(AppendError::Rejected(Rejected::Ended)));
                                    continue;
                                }
                            };
                            batch.events.push(row);
                            if let EventKind::OutputReady { output } = &event.kind {
                                batch.artifacts.push((id.to_string(), output.sha256.clone()));
                            }
                            staged[slot].1 = next;
                            accepted.push((slot, Arc::new(event), reply));
                        }
                        Err(rejected) => {
                            tracing::debug!(job_id = %id, event = event.kind.name(), %rejected, "event refused");
                            let _ = reply.send(Err(AppendError::Rejected(rejected)));
                        }
                    }
                }
            }
        }
        for (live, record) in &staged {
            match state_update(live.spec.id, record, now) {
                Ok(u) => batch.updates.push(u),
                Err(e) => tracing::error!(job_id = %live.spec.id, error = %e, "cannot encode a job record"),
            }
        }
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let outcome = self.store.commit(&batch).await;
        let elapsed = started.elapsed();
        crate::metrics::store_commit(elapsed, batch.events.len() + batch.creates.len());
        tracing::trace!(
            events = batch.events.len(),
            creates = batch.creates.len(),
            jobs = batch.updates.len(),
            ?elapsed,
            "group commit"
        );
        let outcomes = match outcome {
            Ok(o) => o,
            Err(e) => {
                let e = Arc::new(e);
                tracing::error!(error = %crate::telemetry::ErrorChain(&*e), "the job log could not be written");
                for c in creates {
                    let _ = c.reply.send(Err(AppendError::Store(e.clone())));
                }
                for (_, _, reply) in accepted {
                    let _ = reply.send(Err(AppendError::Store(e.clone())));
                }
                return;
            }
        };
        // Durable: install the records, then broadcast, then answer.
        for (c, outcome) in creates.into_iter().zip(outcomes) {
            let answer = match outcome {
                CreateOutcome::Created => {
                    self.registry().insert(c.live.spec.id, c.live.clone());
                    c.live.publish(c.first);
                    Created::New(c.live)
                }
                CreateOutcome::Existing { job_id } => Created::Existing(job_id),
                CreateOutcome::Conflict { job_id } => Created::Conflict(job_id),
            };
            let _ = c.reply.send(Ok(answer));
        }
        for (live, record) in &staged {
            live.record.send_replace(Arc::new(record.clone()));
        }
        for (slot, event, _) in &accepted {
            let live = &staged[*slot].0;
            live.publish(event.clone());
            live.telemetry.observe(event);
        }
        for (live, record) in &staged {
            if record.state.is_terminal() {
                // Retired after its terminal event is durable and broadcast: a subscriber that finds no
                // live entry reads the whole log from the store.
                self.registry().remove(&live.spec.id);
                live.cancel.cancel();
            }
        }
        // Answered last: whoever waits on an event sees everything it did (the job retired and cancelled).
        for (_, event, reply) in accepted {
            let _ = reply.send(Ok(event));
        }
    }
}

fn refuse(c: Command, e: AppendError) {
    match c {
        Command::Create { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Close => {}
    }
}

/// Rough size of a command's event body, to bound a batch.
fn command_bytes(c: &Command) -> usize {
    match c {
        Command::Append { kind: EventKind::Preview { data, .. }, .. } => data.len() * 4 / 3 + 128,
        Command::Create { .. } => 4096,
        _ => 256,
    }
}

/// The row of a new job.
pub(super) fn job_row(spec: &JobSpec, record: &JobRecord, now: i64) -> Result<JobRow, serde_json::Error> {
    Ok(JobRow {
        id: spec.id.to_string(),
        tenant: spec.tenant.clone(),
        state: record.state.status().as_str().to_string(),
        terminal: record.state.is_terminal(),
        workflow: spec.workflow.clone(),
        priority: spec.priority,
        created_ms: spec.created_ms,
        updated_ms: now,
        ended_ms: record.ended_ms,
        request_id: spec.request_id.clone(),
        last_seq: record.last_sequence,
        labels: spec.labels.clone(),
        artifacts: spec.images.iter().map(|i| i.sha256.clone()).collect(),
        spec: serde_json::to_string(spec)?,
        record: serde_json::to_string(record)?,
    })
}

fn state_update(id: JobId, record: &JobRecord, now: i64) -> Result<StateUpdate, serde_json::Error> {
    Ok(StateUpdate {
        id: id.to_string(),
        state: record.state.status().as_str().to_string(),
        terminal: record.state.is_terminal(),
        updated_ms: now,
        ended_ms: record.ended_ms,
        last_seq: record.last_sequence,
        record: serde_json::to_string(record)?,
    })
}

/// An event's row: the kind is the body; id, sequence and time are columns.
pub(super) fn event_row(event: &Event) -> Result<EventRow, serde_json::Error> {
    Ok(EventRow {
        job_id: event.job_id.to_string(),
        seq: event.seq,
        time_ms: event.time_ms,
        body: serde_json::to_string(&event.kind)?,
    })
}

/// Decodes an event row, in this version's format or the earlier one (whose body was the whole event).
///
/// # Errors
/// A body that is neither.
pub(super) fn decode_event(row: &EventRow) -> Result<Event, JobError> {
    let id: JobId = row.job_id.parse().map_err(|_| JobError::Log(format!("bad job id {:?}", row.job_id)))?;
    match serde_json::from_str::<EventKind>(&row.body) {
        Ok(kind) => Ok(Event { job_id: id, seq: row.seq, time_ms: row.time_ms, kind }),
        Err(e) => match serde_json::from_str::<Event>(&row.body) {
            Ok(legacy) => Ok(Event { job_id: id, seq: row.seq, time_ms: row.time_ms, kind: legacy.kind }),
            Err(_) => Err(JobError::Corrupt(e)),
        },
    }
}

/// Decodes a job row written by this version.
///
/// # Errors
/// A body that does not decode.
pub(super) fn decode_job(row: &JobRow) -> Result<Job, JobError> {
    let spec: JobSpec = serde_json::from_str(&row.spec)?;
    let record: JobRecord = serde_json::from_str(&row.record)?;
    Ok(Job { spec: Arc::new(spec), record: Arc::new(record) })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        jobs::apply::tests::{any_kind, spec},
        store::{Durability, SqliteStore},
    };

    async fn writer(dir: &std::path::Path) -> (Log, Arc<SqliteStore>, tokio::task::JoinHandle<()>) {
        let store = Arc::new(SqliteStore::open(dir, Durability::Crash).await.unwrap());
        let (log, task) = Log::new(store.clone()).expect("writer thread");
        (log, store, tokio::spawn(task))
    }

    async fn replay(store: &SqliteStore, spec: &JobSpec) -> (JobRecord, Vec<Event>) {
        let rows = store.events_after(&spec.id.to_string(), 0, 10_000).await.unwrap();
        let events: Vec<Event> = rows.iter().map(|r| decode_event(r).unwrap()).collect();
        let mut record = JobRecord::new();
        for e in &events {
            record = apply(spec, &record, e).expect("every stored event applies on replay");
        }
        (record, events)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Random event sequences through the real writer and SQLite: the stored record, the live record and
        /// the record rebuilt by replaying the stored log from zero are the same, the log is gap-free, and
        /// subscribers saw exactly the stored events.
        #[test]
        fn replaying_the_log_rebuilds_the_stored_record(
            kinds in prop::collection::vec(any_kind(), 0..40),
            burst in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let dir = tempfile::tempdir().unwrap();
                let (log, store, task) = writer(dir.path()).await;
                let spec = Arc::new(spec(&["3"]));
                let first = EventKind::Queued { position: 1, reason: String::new() };
                let telemetry = JobTelemetry::new(spec.id, "w");
                let Created::New(live) = log.create(spec.clone(), first, None, telemetry).await.unwrap()
                else {
                    panic!("created")
                };
                let mut feed = live.subscribe();
                // Either all at once (one group commit) or one by one (a commit each).
                let mut tickets = Vec::new();
                for kind in kinds {
                    let t = log.append(spec.id, kind).await;
                    if burst {
                        tickets.push(t);
                    } else {
                        let _ = t.durable().await;
                    }
                }
                for t in tickets {
                    let _ = t.durable().await;
                }
                let stored = store.get_job(&spec.id.to_string()).await.unwrap().unwrap();
                let stored = decode_job(&stored).unwrap();
                let (replayed, events) = replay(&store, &spec).await;
                assert_eq!(*stored.record, replayed);
                assert_eq!(*live.record(), replayed);
                for (i, e) in events.iter().enumerate() {
                    assert_eq!(e.seq, i as u64 + 1);
                }
                let mut seen = Vec::new();
                while let Ok(e) = feed.try_recv() {
                    seen.push((*e).clone());
                }
                // Event 1 was broadcast before this subscriber attached.
                assert_eq!(seen.as_slice(), &events[1..]);
                log.close().await;
                task.await.unwrap();
            });
        }
    }

    /// A new job created through the writer, queued, and its live entry.
    async fn queued_job(log: &Log) -> (Arc<JobSpec>, Arc<LiveJob>) {
        let spec = Arc::new(spec(&[]));
        let first = EventKind::Queued { position: 1, reason: String::new() };
        match log.create(spec.clone(), first, None, JobTelemetry::new(spec.id, "w")).await.unwrap() {
            Created::New(live) => (spec, live),
            other => panic!("not created: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_live_job_holds_its_recent_events_and_says_when_the_store_must_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store, task) = writer(dir.path()).await;
        let (spec, live) = queued_job(&log).await;
        let seqs = |v: Vec<Arc<Event>>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(live.events_after(0).unwrap()), vec![1]);
        let total = LIVE_CAPACITY as u64 + 10;
        for i in 2..=total {
            let kind = EventKind::Queued { position: (i % 7) as u32 + 1, reason: String::new() };
            log.append(spec.id, kind).await.durable().await.unwrap();
        }
        // The oldest ten have left memory: from before them the store is read, and it has them.
        assert!(live.events_after(0).is_none());
        assert!(live.events_after(9).is_none());
        let held = live.events_after(10).unwrap();
        assert_eq!(seqs(held), (11..=total).collect::<Vec<_>>());
        assert!(live.events_after(total).unwrap().is_empty());
        assert_eq!(store.events_after(&spec.id.to_string(), 0, 20).await.unwrap().len(), 20);
        log.close().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_event_is_not_stored_and_a_terminal_retires_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store, task) = writer(dir.path()).await;
        let (spec, live) = queued_job(&log).await;
        let refused = log.append(spec.id, EventKind::PromptSubmitted { upload_ms: 1 }).await.durable().await;
        assert!(matches!(refused, Err(AppendError::Rejected(Rejected::NotInState { .. }))));
        let done = log
            .append(spec.id, EventKind::Cancelled { reason: "x".into(), usage: Default::default() })
            .await
            .durable()
            .await
            .unwrap();
        assert_eq!(done.seq, 2);
        assert!(live.cancel.is_cancelled());
        assert!(log.live(spec.id).is_none());
        let after = log
            .append(spec.id, EventKind::Queued { position: 1, reason: String::new() })
            .await
            .durable()
            .await;
        assert!(matches!(after, Err(AppendError::NotLive)));
        assert_eq!(store.events_after(&spec.id.to_string(), 0, 10).await.unwrap().len(), 2);
        log.close().await;
        task.await.unwrap();
        let late = log
            .append(spec.id, EventKind::Queued { position: 1, reason: String::new() })
            .await
            .durable()
            .await;
        assert!(matches!(late, Err(AppendError::Closed)));
    }
}
