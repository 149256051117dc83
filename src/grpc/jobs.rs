//! `comfyrelay.v1.JobService`: decode, call the job engine, encode.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::status::unimplemented;
use crate::proto::pb;

/// The JobService adapter.
#[derive(Debug, Clone, Default)]
pub(crate) struct JobApi {}

impl JobApi {
    pub(crate) fn new() -> Self {
        Self {}
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send + 'static>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadOutputResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(&self, _req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(unimplemented("SubmitJob"))
    }

    type StreamJobStream = EventStream;

    async fn stream_job(
        &self,
        _req: Request<pb::StreamJobRequest>,
    ) -> Result<Response<Self::StreamJobStream>, Status> {
        Err(unimplemented("StreamJob"))
    }

    async fn get_job(&self, _req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(unimplemented("GetJob"))
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(unimplemented("ListJobs"))
    }

    async fn cancel_job(&self, _req: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(unimplemented("CancelJob"))
    }

    type DownloadOutputStream = ChunkStream;

    async fn download_output(
        &self,
        _req: Request<pb::DownloadOutputRequest>,
    ) -> Result<Response<Self::DownloadOutputStream>, Status> {
        Err(unimplemented("DownloadOutput"))
    }
}
