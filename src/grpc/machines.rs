//! `comfyrelay.v1.MachineService`: operators' view of machines.

use tonic::{Request, Response, Status};

use super::status::unimplemented;
use crate::proto::pb;

/// The MachineService adapter.
#[derive(Debug, Clone, Default)]
pub(crate) struct MachineApi {}

impl MachineApi {
    pub(crate) fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl pb::machine_service_server::MachineService for MachineApi {
    async fn list_machines(
        &self,
        _req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        Err(unimplemented("ListMachines"))
    }

    async fn get_machine(
        &self,
        _req: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        Err(unimplemented("GetMachine"))
    }

    async fn drain_machine(
        &self,
        _req: Request<pb::DrainMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        Err(unimplemented("DrainMachine"))
    }
}
