//! `comfyrelay.v1.WorkflowService`: the catalog's schemas.

use tonic::{Request, Response, Status};

use super::status::unimplemented;
use crate::proto::pb;

/// The WorkflowService adapter.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkflowApi {}

impl WorkflowApi {
    pub(crate) fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl pb::workflow_service_server::WorkflowService for WorkflowApi {
    async fn list_workflows(
        &self,
        _req: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        Err(unimplemented("ListWorkflows"))
    }

    async fn get_workflow(
        &self,
        _req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        Err(unimplemented("GetWorkflow"))
    }
}
