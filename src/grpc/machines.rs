//! `comfyrelay.v1.MachineService`: operators' view of the machines jobs run on (configured ComfyUI servers
//! and the RunComfy pool's machines, with their billing).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert::ts, status::not_found};
use crate::{
    machine::{Machine, MachineKind},
    pool::{MachinePhase, MachineView, Pool},
    proto::pb,
};

/// The MachineService adapter.
#[derive(Debug, Clone)]
pub(crate) struct MachineApi {
    jobs: crate::jobs::JobManager,
    pool: Option<Pool>,
}

impl MachineApi {
    pub(crate) fn new(jobs: crate::jobs::JobManager, pool: Option<Pool>) -> Self {
        Self { jobs, pool }
    }

    /// Every machine: configured ones, then the pool's (stopped ones only when asked).
    fn all(&self, include_stopped: bool) -> Vec<pb::Machine> {
        let mut out: Vec<pb::Machine> = self
            .jobs
            .machines()
            .iter()
            .filter(|m| m.kind == MachineKind::Static)
            .map(|m| static_to_pb(m))
            .collect();
        if let Some(pool) = &self.pool {
            out.extend(
                pool.machines()
                    .iter()
                    .filter(|v| include_stopped || v.phase != MachinePhase::Stopped)
                    .map(pool_to_pb),
            );
        }
        out
    }

    fn find(&self, id: &str) -> Result<Found, Status> {
        if id.is_empty() {
            return Err(super::status::invalid_field("machine_id", "must name a machine"));
        }
        if id.len() > crate::limits::MAX_NAME_BYTES {
            let e = crate::limits::Exceeded::new(
                "machine_id",
                id.len() as u64,
                crate::limits::MAX_NAME_BYTES as u64,
                crate::limits::Unit::Bytes,
            );
            return Err(super::status::bad_request(vec![e.into()]));
        }
        if let Some(view) = self.pool.as_ref().and_then(|p| p.machine(id)) {
            return Ok(Found::Pool(Box::new(view)));
        }
        self.jobs
            .machines()
            .into_iter()
            .find(|m| m.id == id && m.kind == MachineKind::Static)
            .map(Found::Static)
            .ok_or_else(|| not_found("NOT_FOUND", "machine", id, ""))
    }
}

impl MachineApi {
    fn pool(&self) -> Result<&Pool, Status> {
        // `find` answered a pool machine, so the pool exists.
        self.pool
            .as_ref()
            .ok_or_else(|| super::status::with_reason(tonic::Code::NotFound, "NOT_FOUND", "no RunComfy pool"))
    }
}

enum Found {
    Static(Arc<Machine>),
    Pool(Box<MachineView>),
}

fn jobs_fields(m: Option<&Machine>) -> (u32, u32, String, u64) {
    match m {
        Some(m) => (
            m.assigned().min(1) as u32,
            m.assigned().saturating_sub(1) as u32,
            m.last_workflow(),
            m.completed(),
        ),
        None => (0, 0, String::new(), 0),
    }
}

/// A static server is `UNHEALTHY` while unreachable, and while a cancelled prompt that ignored every
/// interrupt still runs on it (it takes no jobs then either).
fn static_to_pb(m: &Machine) -> pb::Machine {
    let state = if m.is_draining() {
        pb::MachineState::Draining
    } else if m.conn.is_connected() && !m.holds_abandoned() {
        pb::MachineState::Ready
    } else {
        pb::MachineState::Unhealthy
    };
    let (running_jobs, queued_jobs, last_workflow, jobs_completed) = jobs_fields(Some(m));
    pb::Machine {
        id: m.id.clone(),
        kind: pb::MachineKind::Static as i32,
        state: state as i32,
        comfy_url: crate::config::redact_url(m.client.base_url().as_str()),
        server_type: String::new(),
        workflow_version_id: String::new(),
        running_jobs,
        queued_jobs,
        draining: m.is_draining(),
        create_time: Some(ts(m.created_ms)),
        ready_time: None,
        stop_time: None,
        lease_expire_time: None,
        billed_seconds: 0.0,
        cost: None,
        last_workflow,
        jobs_completed,
    }
}

fn pool_to_pb(v: &MachineView) -> pb::Machine {
    let state = match v.phase {
        MachinePhase::Starting => pb::MachineState::Starting,
        MachinePhase::Checking => pb::MachineState::Checking,
        MachinePhase::Ready => pb::MachineState::Ready,
        MachinePhase::Draining => pb::MachineState::Draining,
        MachinePhase::Stopping => pb::MachineState::Stopping,
        MachinePhase::Stopped => pb::MachineState::Stopped,
        MachinePhase::Unhealthy => pb::MachineState::Unhealthy,
        MachinePhase::Unmanaged => pb::MachineState::Unmanaged,
    };
    let (running_jobs, queued_jobs, last_workflow, jobs_completed) = jobs_fields(v.machine.as_deref());
    pb::Machine {
        id: v.id.clone(),
        kind: pb::MachineKind::Runcomfy as i32,
        state: state as i32,
        comfy_url: v.url.as_deref().map(crate::config::redact_url).unwrap_or_default(),
        server_type: v.spec.server_type.clone(),
        workflow_version_id: v.spec.workflow_version_id.clone(),
        running_jobs,
        queued_jobs,
        draining: v.machine.as_ref().is_some_and(|m| m.is_draining())
            || matches!(v.phase, MachinePhase::Draining | MachinePhase::Stopping),
        create_time: Some(ts(v.launched_ms)),
        ready_time: v.ready_ms.map(ts),
        stop_time: v.stopped_ms.map(ts),
        lease_expire_time: v.lease_until_ms.map(ts),
        billed_seconds: v.billed_seconds,
        cost: Some(pb::Cost { amount: v.cost_usd, currency: "USD".into() }),
        last_workflow,
        jobs_completed,
    }
}

#[tonic::async_trait]
impl pb::machine_service_server::MachineService for MachineApi {
    async fn list_machines(
        &self,
        req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let pb::ListMachinesRequest { page_size, page_token, include_stopped } = req.into_inner();
        let size = match page_size {
            0 => 100,
            n if n < 0 => {
                return Err(super::status::invalid_field("page_size", "must not be negative"));
            }
            n => n as usize,
        };
        let mut machines = self.all(include_stopped);
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
        Ok(Response::new(match self.find(&machine_id)? {
            Found::Static(m) => static_to_pb(&m),
            Found::Pool(v) => pool_to_pb(&v),
        }))
    }

    async fn drain_machine(
        &self,
        req: Request<pb::DrainMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let pb::DrainMachineRequest { machine_id } = req.into_inner();
        match self.find(&machine_id)? {
            Found::Static(m) => {
                m.drain();
                tracing::info!(machine = %m.id, "machine drained by an operator");
                Ok(Response::new(static_to_pb(&m)))
            }
            Found::Pool(_) => {
                let view = self.pool()?.drain(&machine_id).map_err(super::status::pool_error)?;
                Ok(Response::new(pool_to_pb(&view)))
            }
        }
    }

    async fn undrain_machine(
        &self,
        req: Request<pb::UndrainMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let pb::UndrainMachineRequest { machine_id } = req.into_inner();
        match self.find(&machine_id)? {
            Found::Static(m) => {
                m.undrain();
                tracing::info!(machine = %m.id, "machine undrained by an operator");
                Ok(Response::new(static_to_pb(&m)))
            }
            Found::Pool(_) => {
                let view = self.pool()?.undrain(&machine_id).map_err(super::status::pool_error)?;
                Ok(Response::new(pool_to_pb(&view)))
            }
        }
    }
}
