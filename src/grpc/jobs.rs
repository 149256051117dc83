//! `comfyrelay.v1.JobService`: decode, call the job engine (or, on a standby, read the shared database),
//! encode. No logic beyond that.

use std::pin::Pin;

use futures::Stream;
use tokio::{io::AsyncReadExt, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{
    auth, convert,
    status::{BadField, bad_request, job_error},
};
use crate::{
    jobs::{
        Event, EventKind, EventStream, Job, JobError, JobFollower, JobId, JobManager, JobPage, ListRequest,
        OutputFile, OutputView, Scope, Violation,
    },
    limits::{self, Exceeded, RequestLimits, Unit},
    proto::pb,
};

/// What the JobService calls: the job engine of the replica that runs the jobs, or a standby's reads of the
/// shared database and artifacts (README "Replicas on PostgreSQL"). A standby forwards `SubmitJob` and
/// `CancelJob` to the leader before they reach its `JobApi`.
#[derive(Debug, Clone)]
pub(crate) enum Jobs {
    /// The job engine: every call.
    Engine(JobManager),
    /// A standby's: `StreamJob`, `GetJob`, `ListJobs` and `DownloadOutput`, as of each job's last commit.
    Follower(JobFollower),
}

impl Jobs {
    async fn get(&self, id: JobId, scope: &Scope) -> Result<Job, JobError> {
        match self {
            Self::Engine(jobs) => jobs.get(id, scope).await,
            Self::Follower(jobs) => jobs.get(id, scope).await,
        }
    }

    async fn list(&self, req: ListRequest, scope: &Scope) -> Result<JobPage, JobError> {
        match self {
            Self::Engine(jobs) => jobs.list(req, scope).await,
            Self::Follower(jobs) => jobs.list(req, scope).await,
        }
    }

    async fn subscribe(
        &self,
        id: JobId,
        after: u64,
        skip_previews: bool,
        scope: &Scope,
    ) -> Result<EventStream, JobError> {
        match self {
            Self::Engine(jobs) => jobs.subscribe(id, after, skip_previews, scope).await,
            Self::Follower(jobs) => jobs.subscribe(id, after, skip_previews, scope).await,
        }
    }

    async fn open_output(
        &self,
        id: JobId,
        filename: &str,
        offset: u64,
        scope: &Scope,
    ) -> Result<(OutputFile, crate::store::ArtifactReader), JobError> {
        match self {
            Self::Engine(jobs) => jobs.open_output(id, filename, offset, scope).await,
            Self::Follower(jobs) => jobs.open_output(id, filename, offset, scope).await,
        }
    }

    async fn output_view(&self, output: &OutputFile) -> Result<OutputView, JobError> {
        match self {
            Self::Engine(jobs) => jobs.output_view(output).await,
            Self::Follower(jobs) => jobs.output_view(output).await,
        }
    }

    /// The engine, for the calls only it serves.
    fn engine(&self) -> Result<&JobManager, Status> {
        match self {
            Self::Engine(jobs) => Ok(jobs),
            // Not reached: the standby routes these calls to the leader.
            Self::Follower(_) => Err(super::status::with_reason(
                tonic::Code::Unavailable,
                "NOT_THE_LEADER",
                "this replica is a standby; call the leader",
            )),
        }
    }
}

/// The JobService adapter.
#[derive(Debug, Clone)]
pub(crate) struct JobApi {
    jobs: Jobs,
    shutdown: CancellationToken,
    limits: RequestLimits,
}

impl JobApi {
    /// `shutdown` ends open streams and downloads, telling clients where to resume.
    pub(crate) fn new(jobs: Jobs, shutdown: CancellationToken, limits: RequestLimits) -> Self {
        Self { jobs, shutdown, limits }
    }

    async fn job_with_outputs(&self, job: &crate::jobs::Job) -> Result<pb::Job, Status> {
        let mut outputs = Vec::with_capacity(job.record.outputs.len());
        for o in &job.record.outputs {
            outputs.push(convert::output_view_to_pb(self.jobs.output_view(o).await.map_err(job_error)?));
        }
        Ok(convert::job_to_pb(job, outputs))
    }
}

type JobEventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send + 'static>>;
type ChunkStream = ReceiverStream<Result<pb::DownloadOutputResponse, Status>>;

fn bad(v: Violation) -> Status {
    job_error(crate::jobs::JobError::InvalidArgument(vec![v]))
}

/// One `StreamJob` call, pulled by tonic as the client reads: no task and no buffer of its own, so a
/// subscriber that stops reading holds only what HTTP/2 flow control lets through, and one that goes away
/// is dropped with its stream.
struct Subscription {
    /// Counted as a live subscriber while the call is open.
    _counted: crate::metrics::SubscriberGuard,
    events: EventStream,
    shutdown: CancellationToken,
    last: u64,
    done: bool,
}

impl Subscription {
    async fn next(&mut self) -> Option<Result<pb::JobEvent, Status>> {
        if self.done {
            return None;
        }
        let next = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => {
                // Tell the client to resume elsewhere from the last sequence it received.
                self.done = true;
                return Some(Err(super::status::shutting_down_resume(self.last)));
            }
            next = self.events.next() => next?,
        };
        Some(match next {
            Ok(event) => {
                self.last = event.seq;
                Ok(self.encode(&event).await)
            }
            Err(e) => {
                self.done = true;
                Err(job_error(e))
            }
        })
    }

    /// The wire form, with the bytes of small outputs inline.
    async fn encode(&self, event: &Event) -> pb::JobEvent {
        let files: &[crate::jobs::OutputFile] = match &event.kind {
            EventKind::OutputReady { output } => std::slice::from_ref(output),
            EventKind::Succeeded { outputs, .. } => outputs,
            _ => &[],
        };
        let mut outputs = Vec::with_capacity(files.len());
        for f in files {
            match self.events.output_view(f).await {
                Ok(v) => outputs.push(convert::output_view_to_pb(v)),
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "output not readable for inline delivery");
                    outputs.push(convert::output_to_pb(f, None));
                }
            }
        }
        convert::event_to_pb(event, outputs)
    }
}

/// A `StreamJob` request's job, sequence, previews choice and the caller's scope.
fn stream_request(
    req: Request<pb::StreamJobRequest>,
) -> Result<(crate::jobs::JobId, u64, bool, crate::jobs::Scope), Status> {
    let scope = auth::scope(&auth::principal(&req)?);
    let pb::StreamJobRequest { job_id, after_sequence, skip_previews } = req.into_inner();
    let id = convert::job_id("job_id", &job_id).map_err(bad)?;
    Ok((id, after_sequence, skip_previews, scope))
}

/// The `StreamJob` answer: `events` (of `id`, after `after`) as the client reads them, ended at `shutdown`
/// by an `UNAVAILABLE` that says where to resume.
fn event_stream(
    id: crate::jobs::JobId,
    after: u64,
    events: EventStream,
    shutdown: CancellationToken,
) -> JobEventStream {
    let subscription =
        Subscription { _counted: crate::metrics::subscriber(), events, shutdown, last: after, done: false };
    let span = tracing::debug_span!("stream_job", job_id = %id);
    let stream = futures::stream::unfold(subscription, move |mut s| {
        let span = span.clone();
        async move { s.next().await.map(|item| (item, s)) }.instrument(span)
    });
    Box::pin(stream)
}

fn too_long(field: &str, value: &str, limit: usize) -> Status {
    bad_request(vec![BadField::from(Exceeded::new(field, value.len() as u64, limit as u64, Unit::Bytes))])
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::Job>, Status> {
        let principal = auth::principal(&req)?;
        let mut req = convert::submit_request(req.into_inner(), &self.limits).map_err(bad_request)?;
        req.tenant = principal.tenant;
        let job = self.jobs.engine()?.submit(req).await.map_err(job_error)?;
        Ok(Response::new(convert::job_to_pb(&job, Vec::new())))
    }

    type StreamJobStream = JobEventStream;

    async fn stream_job(
        &self,
        req: Request<pb::StreamJobRequest>,
    ) -> Result<Response<Self::StreamJobStream>, Status> {
        let (id, after_sequence, skip_previews, scope) = stream_request(req)?;
        let events =
            self.jobs.subscribe(id, after_sequence, skip_previews, &scope).await.map_err(job_error)?;
        Ok(Response::new(event_stream(id, after_sequence, events, self.shutdown.clone())))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let scope = auth::scope(&auth::principal(&req)?);
        let pb::GetJobRequest { job_id } = req.into_inner();
        let id = convert::job_id("job_id", &job_id).map_err(bad)?;
        let job = self.jobs.get(id, &scope).await.map_err(job_error)?;
        Ok(Response::new(self.job_with_outputs(&job).await?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let scope = auth::scope(&auth::principal(&req)?);
        let req = convert::list_request(req.into_inner()).map_err(bad_request)?;
        let page = self.jobs.list(req, &scope).await.map_err(job_error)?;
        let jobs = page
            .jobs
            .iter()
            .map(|j| {
                let outputs = j.record.outputs.iter().map(|o| convert::output_to_pb(o, None)).collect();
                convert::job_to_pb(j, outputs)
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs, next_page_token: page.next_page_token }))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let scope = auth::scope(&auth::principal(&req)?);
        let pb::CancelJobRequest { job_id, reason } = req.into_inner();
        let id = convert::job_id("job_id", &job_id).map_err(bad)?;
        if reason.len() > limits::MAX_REASON_BYTES {
            return Err(too_long("reason", &reason, limits::MAX_REASON_BYTES));
        }
        let job = self.jobs.engine()?.cancel(id, reason, &scope).await.map_err(job_error)?;
        Ok(Response::new(self.job_with_outputs(&job).await?))
    }

    type DownloadOutputStream = ChunkStream;

    async fn download_output(
        &self,
        req: Request<pb::DownloadOutputRequest>,
    ) -> Result<Response<Self::DownloadOutputStream>, Status> {
        let scope = auth::scope(&auth::principal(&req)?);
        let pb::DownloadOutputRequest { job_id, filename, chunk_size, offset } = req.into_inner();
        let id = convert::job_id("job_id", &job_id).map_err(bad)?;
        if filename.is_empty() {
            return Err(bad(Violation::new("filename", "must name an output of the job")));
        }
        if filename.len() > limits::MAX_FILENAME_BYTES {
            return Err(too_long("filename", &filename, limits::MAX_FILENAME_BYTES));
        }
        let chunk = match chunk_size {
            0 => 256 * 1024,
            n => n.clamp(1024, 4 * 1024 * 1024) as usize,
        };
        let (output, mut file) =
            self.jobs.open_output(id, &filename, offset, &scope).await.map_err(job_error)?;
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.shutdown.clone();
        // A per-call producer that ends at EOF, when the client goes away, or at shutdown (UNAVAILABLE:
        // DownloadOutput is a plain read, resumed elsewhere with `offset` at the bytes received).
        tokio::spawn(
            async move {
                let mut offset = offset;
                let mut first = Some(convert::output_to_pb(&output, None));
                loop {
                    let mut buf = vec![0u8; chunk];
                    let read = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => {
                            let _ = tx.send(Err(job_error(crate::jobs::JobError::ShuttingDown))).await;
                            return;
                        }
                        () = tx.closed() => return,
                        r = file.read(&mut buf) => r,
                    };
                    let n = match read {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(super::status::internal(&e))).await;
                            return;
                        }
                    };
                    if n == 0 && first.is_none() {
                        return;
                    }
                    buf.truncate(n);
                    let msg = pb::DownloadOutputResponse { output: first.take(), offset, data: buf.into() };
                    offset += n as u64;
                    if tx.send(Ok(msg)).await.is_err() || n == 0 {
                        return;
                    }
                }
            }
            .instrument(tracing::debug_span!("download_output", job_id = %id)),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
