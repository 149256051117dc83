//! `comfyrelay.v1.WorkflowService`: the catalog's schemas. An adapter only: it reads the [`Catalog`] and
//! converts its domain types to `pb::` messages; it knows nothing of manifests or files.

use tonic::{Request, Response, Status};

use super::status::{bad_request, not_found};
use crate::catalog::{
    Catalog, InputKind, InputSpec, InputTarget, OutputSpec, Requirements, ScalarValue, Workflow,
};
use crate::{
    limits::{self, Exceeded, Unit},
    proto::pb,
};

/// The WorkflowService adapter.
#[derive(Debug, Clone)]
pub(crate) struct WorkflowApi {
    catalog: Catalog,
}

impl WorkflowApi {
    pub(crate) fn new(catalog: Catalog) -> Self {
        Self { catalog }
    }
}

#[tonic::async_trait]
impl pb::workflow_service_server::WorkflowService for WorkflowApi {
    async fn list_workflows(
        &self,
        req: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let pb::ListWorkflowsRequest {} = req.into_inner();
        let workflows = self.catalog.list().iter().map(|w| workflow_to_pb(w)).collect();
        Ok(Response::new(pb::ListWorkflowsResponse { workflows }))
    }

    async fn get_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let pb::GetWorkflowRequest { name } = req.into_inner();
        if name.len() > limits::MAX_NAME_BYTES {
            let e = Exceeded::new("name", name.len() as u64, limits::MAX_NAME_BYTES as u64, Unit::Bytes);
            return Err(bad_request(vec![e.into()]));
        }
        match self.catalog.get(&name) {
            Some(workflow) => Ok(Response::new(workflow_to_pb(&workflow))),
            None => {
                Err(not_found("WORKFLOW_NOT_FOUND", "workflow", &name, " in the catalog (see ListWorkflows)"))
            }
        }
    }
}

/// A catalog workflow as its proto message (the graph itself is not exposed).
pub(crate) fn workflow_to_pb(workflow: &Workflow) -> pb::Workflow {
    let Workflow { name, description, version, inputs, outputs, requirements, graph: _ } = workflow;
    let Requirements { runcomfy_workflow_version_id, server_type } = requirements;
    pb::Workflow {
        name: name.clone(),
        description: description.clone(),
        version: version.clone(),
        inputs: inputs.iter().map(input_to_pb).collect(),
        outputs: outputs.iter().map(output_to_pb).collect(),
        requirements: Some(pb::WorkflowRequirements {
            runcomfy_workflow_version_id: runcomfy_workflow_version_id.clone().unwrap_or_default(),
            server_type: server_type.clone().unwrap_or_default(),
        }),
    }
}

fn input_to_pb(input: &InputSpec) -> pb::WorkflowInput {
    let InputSpec { name, description, kind, required, default, min, max, choices, targets } = input;
    pb::WorkflowInput {
        name: name.clone(),
        description: description.clone(),
        r#type: kind_to_pb(*kind) as i32,
        required: *required,
        default_value: default.as_ref().map(scalar_to_pb),
        min: *min,
        max: *max,
        choices: choices.clone(),
        targets: targets
            .iter()
            .map(|InputTarget { node_id, input_name }| pb::InputTarget {
                node_id: node_id.clone(),
                input_name: input_name.clone(),
            })
            .collect(),
    }
}

fn output_to_pb(output: &OutputSpec) -> pb::WorkflowOutput {
    let OutputSpec { node_id, name, description } = output;
    pb::WorkflowOutput { node_id: node_id.clone(), name: name.clone(), description: description.clone() }
}

fn kind_to_pb(kind: InputKind) -> pb::InputType {
    match kind {
        InputKind::Image => pb::InputType::Image,
        InputKind::Text => pb::InputType::Text,
        InputKind::Int => pb::InputType::Int,
        InputKind::Float => pb::InputType::Float,
        InputKind::Bool => pb::InputType::Bool,
        InputKind::Seed => pb::InputType::Seed,
        InputKind::Choice => pb::InputType::Choice,
    }
}

fn scalar_to_pb(value: &ScalarValue) -> pb::ParameterValue {
    use pb::parameter_value::Kind;
    let kind = match value {
        ScalarValue::Text(s) => Kind::StringValue(s.clone()),
        ScalarValue::Int(i) => Kind::IntValue(*i),
        ScalarValue::Float(f) => Kind::FloatValue(*f),
        ScalarValue::Bool(b) => Kind::BoolValue(*b),
    };
    pb::ParameterValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use pb::workflow_service_server::WorkflowService;
    use tonic::Code;

    fn api() -> WorkflowApi {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
        WorkflowApi::new(Catalog::load(&dir).unwrap_or_else(|e| panic!("{e}")))
    }

    #[tokio::test]
    async fn lists_and_gets_the_typed_schema() {
        let api = api();
        let list = api
            .list_workflows(Request::new(pb::ListWorkflowsRequest {}))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        assert!(list.workflows.len() >= 6);
        let wf = api
            .get_workflow(Request::new(pb::GetWorkflowRequest { name: "scale-blur".into() }))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        let sigma = wf.inputs.iter().find(|i| i.name == "sigma").unwrap_or_else(|| panic!("sigma"));
        assert_eq!(sigma.r#type, pb::InputType::Float as i32);
        assert_eq!((sigma.min, sigma.max), (Some(0.1), Some(10.0)));
        assert_eq!(
            sigma.default_value.as_ref().and_then(|v| v.kind.clone()),
            Some(pb::parameter_value::Kind::FloatValue(1.0))
        );
        assert_eq!(sigma.targets, vec![pb::InputTarget { node_id: "3".into(), input_name: "sigma".into() }]);
        let image = wf.inputs.iter().find(|i| i.name == "image").unwrap_or_else(|| panic!("image"));
        assert!(image.required && image.default_value.is_none());
        assert_eq!(wf.outputs[0].node_id, "4");
        assert_eq!(wf.requirements.map(|r| r.server_type), Some(String::new()));
    }

    #[tokio::test]
    async fn an_unknown_workflow_is_not_found() {
        let err = api()
            .get_workflow(Request::new(pb::GetWorkflowRequest { name: "nope".into() }))
            .await
            .err()
            .unwrap_or_else(|| panic!("must fail"));
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("nope"));
    }
}
