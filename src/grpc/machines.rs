//! `comfyrelay.v1.MachineService`: operators' view of the machines jobs run on.

use tonic::{Request, Response, Status};

use super::{convert::ts, status::with_reason};
use crate::{
    jobs::{JobError, JobManager, Violation},
    machine::{Machine, MachineKind},
    proto::pb,
};

/// The MachineService adapter.
#[derive(Debug, Clone)]
pub(crate) struct MachineApi {
    jobs: JobManager,
}

impl MachineApi {
    pub(crate) fn new(jobs: JobManager) -> Self {
        Self { jobs }
    }

    fn find(&self, id: &str) -> Result<std::sync::Arc<Machine>, Status> {
        if id.is_empty() {
            return Err(super::status::job_error(JobError::InvalidArgument(vec![Violation::new(
                "machine_id",
                "must name a machine",
            )])));
        }
        self.jobs.machines().into_iter().find(|m| m.id == id).ok_or_else(|| {
            with_reason(tonic::Code::NotFound, "NOT_FOUND", format!("machine {id:?} not found"))
        })
    }
}

fn to_pb(m: &Machine) -> pb::Machine {
    let state = if m.is_draining() {
        pb::MachineState::Draining
    } else if m.conn.is_connected() {
        pb::MachineState::Ready
    } else {
        pb::MachineState::Unhealthy
    };
    pb::Machine {
        id: m.id.clone(),
        kind: match m.kind {
            MachineKind::Static => pb::MachineKind::Static,
            MachineKind::RunComfy => pb::MachineKind::Runcomfy,
        } as i32,
        state: state as i32,
        comfy_url: crate::config::redact_url(m.client.base_url().as_str()),
        server_type: m.spec.as_ref().map(|s| s.server_type.clone()).unwrap_or_default(),
        workflow_version_id: m.spec.as_ref().map(|s| s.workflow_version_id.clone()).unwrap_or_default(),
        running_jobs: m.assigned().min(1) as u32,
        queued_jobs: m.assigned().saturating_sub(1) as u32,
        draining: m.is_draining(),
        create_time: Some(ts(m.created_ms)),
        ready_time: None,
        stop_time: None,
        lease_expire_time: None,
        billed_seconds: 0.0,
        cost: None,
        last_workflow: m.last_workflow(),
        jobs_completed: m.completed(),
    }
}

#[tonic::async_trait]
impl pb::machine_service_server::MachineService for MachineApi {
    async fn list_machines(
        &self,
        req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let pb::ListMachinesRequest { page_size, page_token, include_stopped: _ } = req.into_inner();
        let size = match page_size {
            0 => 100,
            n if n < 0 => {
                return Err(super::status::invalid_field("page_size", "must not be negative"));
            }
            n => n as usize,
        };
        let mut machines: Vec<pb::Machine> = self.jobs.machines().iter().map(|m| to_pb(m)).collect();
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        let start = if page_token.is_empty() {
            0
        } else {
            machines.iter().position(|m| m.id > page_token).unwrap_or(machines.len())
        };
        let page: Vec<pb::Machine> = machines.iter().skip(start).take(size).cloned().collect();
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < machines.len() => last.id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListMachinesResponse { machines: page, next_page_token }))
    }

    async fn get_machine(
        &self,
        req: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let pb::GetMachineRequest { machine_id } = req.into_inner();
        let machine = self.find(&machine_id)?;
        Ok(Response::new(to_pb(&machine)))
    }

    async fn drain_machine(
        &self,
        req: Request<pb::DrainMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let pb::DrainMachineRequest { machine_id } = req.into_inner();
        let machine = self.find(&machine_id)?;
        machine.drain();
        tracing::info!(machine = %machine.id, "machine drained by an operator");
        Ok(Response::new(to_pb(&machine)))
    }
}
