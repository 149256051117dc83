//! Domain types of the job engine: ids, the immutable [`JobSpec`], the [`JobState`] with its per-state
//! data, the [`JobRecord`] that `apply::apply` moves from event to event, events and
//! failures.
//!
//! Serialized as JSON into the store's opaque bodies; never exposed as protobuf here.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A job's id: a UUID (v7, so ids sort by creation), also used as ComfyUI's `prompt_id` (printed in the
/// canonical lowercase hyphenated form ComfyUI requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The text is not a job id.
#[derive(Debug, thiserror::Error)]
#[error("not a job id (expected a UUID)")]
pub struct InvalidJobId;

impl FromStr for JobId {
    type Err = InvalidJobId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s.trim()).map(Self).map_err(|_| InvalidJobId)
    }
}

/// The name of a job's state, without its data (what callers filter on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for capacity.
    Queued,
    /// A machine is being prepared.
    Provisioning,
    /// On a machine.
    Running,
    /// Finished with every output stored.
    Succeeded,
    /// Failed; see the job's error.
    Failed,
    /// Cancelled by a caller.
    Cancelled,
}

impl JobStatus {
    /// Every state.
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Provisioning,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// Whether no further change can happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "QUEUED",
            JobStatus::Provisioning => "PROVISIONING",
            JobStatus::Running => "RUNNING",
            JobStatus::Succeeded => "SUCCEEDED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
        }
    }
}

/// Why a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureReason {
    /// ComfyUI rejected the graph (or dropped some of its outputs).
    Validation,
    /// A node raised.
    Execution,
    /// The backend forgot the prompt.
    Lost,
    /// No backend could be reached.
    BackendUnavailable,
    /// Waited too long in the queue.
    QueueTimeout,
    /// Upload too slow.
    UploadTimeout,
    /// Execution too slow.
    ExecutionTimeout,
    /// Download too slow.
    DownloadTimeout,
    /// The caller's deadline passed.
    DeadlineExceeded,
    /// An output failed verification.
    OutputInvalid,
    /// A machine could not be provisioned.
    Provisioning,
    /// The machine died.
    MachineLost,
    /// A comfyrelay bug or storage failure.
    Internal,
    /// ComfyUI interrupted the prompt without our cancel.
    Interrupted,
    /// ComfyUI finished but outputs the job declared could not be stored or recovered.
    OutputsMissing,
}

/// An error ComfyUI reported for a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NodeErrorInfo {
    /// Node id.
    pub node_id: String,
    /// Node class.
    pub class_type: String,
    /// Error type.
    pub error_type: String,
    /// Message.
    pub message: String,
    /// Details.
    pub details: String,
}

/// A job's failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailure {
    /// The reason.
    pub reason: FailureReason,
    /// A message for people.
    pub message: String,
    /// Per-node details.
    #[serde(default)]
    pub node_errors: Vec<NodeErrorInfo>,
}

impl JobFailure {
    /// A failure with no node details.
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), node_errors: Vec::new() }
    }
}

/// An input image kept in the artifact store until the job is uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImage {
    /// The workflow input it fills.
    pub input: String,
    /// Artifact digest.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// File name to upload as.
    pub filename: String,
    /// MIME type.
    pub content_type: String,
    /// `(node_id, input_name)` pairs that receive ComfyUI's upload name.
    pub targets: Vec<(String, String)>,
}

/// An output the workflow declares: the job succeeds only when each has stored at least one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredOutput {
    /// The output node.
    pub node_id: String,
    /// Its images arrive only over the WebSocket (never in ComfyUI's history), so a stream with a gap
    /// cannot be completed from history.
    pub streamed: bool,
}

/// A stored output file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Producing node.
    pub node_id: String,
    /// Unique file name within the job.
    pub filename: String,
    /// MIME type.
    pub mime_type: String,
    /// Size.
    pub size: u64,
    /// Artifact digest.
    pub sha256: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// ComfyUI folder type (`output`, `temp`, `websocket`).
    pub kind: String,
}

/// Per-stage durations in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Queue wait.
    pub queue_wait_ms: Option<u64>,
    /// Provisioning.
    pub provisioning_ms: Option<u64>,
    /// Upload.
    pub upload_ms: Option<u64>,
    /// Execution.
    pub execution_ms: Option<u64>,
    /// Download.
    pub download_ms: Option<u64>,
}

/// What a job is: written once at submit, never changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Id.
    pub id: JobId,
    /// The tenant it belongs to, with its events, outputs, labels and idempotency key (`default` for jobs
    /// submitted before tenants existed, the tenant of `auth.mode = "none"`).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Workflow name (`inline` for inline graphs).
    pub workflow: String,
    /// Workflow version.
    pub workflow_version: String,
    /// Inputs summary.
    pub inputs: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Priority.
    pub priority: i32,
    /// Idempotency key.
    pub request_id: Option<String>,
    /// The graph to run (opaque here: built by the catalog, sent by the ComfyUI client), every
    /// non-image value injected.
    pub graph: serde_json::Value,
    /// Images to upload before queueing.
    pub images: Vec<StoredImage>,
    /// The outputs the workflow declares (empty for inline graphs: every `output` file ComfyUI reports).
    pub outputs: Vec<DeclaredOutput>,
    /// Class of each node, for the events (from the catalog).
    pub node_classes: BTreeMap<String, String>,
    /// RunComfy workflow version id the workflow needs, if any.
    pub runcomfy_workflow_version_id: Option<String>,
    /// RunComfy server type the workflow needs, if any.
    pub server_type: Option<String>,
    /// Creation, ms since the epoch.
    pub created_ms: i64,
    /// Caller's deadline, ms since the epoch.
    pub deadline_ms: Option<i64>,
}

fn default_tenant() -> String {
    crate::auth::DEFAULT_TENANT.to_string()
}

impl JobSpec {
    /// Whether an output file of `node` is kept.
    pub fn keeps(&self, node: &str, kind: &str) -> bool {
        if self.outputs.is_empty() {
            kind == "output"
        } else {
            self.outputs.iter().any(|o| o.node_id == node)
        }
    }

    /// Whether `node` is a declared output whose images arrive over the WebSocket.
    pub fn streams(&self, node: &str) -> bool {
        self.outputs.iter().any(|o| o.node_id == node && o.streamed)
    }
}

/// A job's state, with what exists only in that state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Waiting for capacity.
    Queued {
        /// 1 = next; 0 = not yet known.
        position: u32,
        /// Why it waits, when not simply behind other jobs.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// A machine is being prepared for it.
    Provisioning {
        /// Queue position among the jobs waiting for its kind of machine.
        position: u32,
        /// The last phase heard.
        phase: String,
        /// The machine being prepared.
        machine_id: String,
        /// Since when, ms.
        since_ms: i64,
    },
    /// On a machine.
    Running {
        /// The machine.
        machine_id: String,
        /// ComfyUI's prompt id.
        prompt_id: String,
        /// Since when, ms.
        since_ms: i64,
        /// Whether `POST /prompt` may have reached ComfyUI (a restart re-attaches rather than re-sends).
        submitted: bool,
    },
    /// Finished with every output stored.
    Succeeded,
    /// Failed.
    Failed {
        /// Why.
        error: JobFailure,
    },
    /// Cancelled.
    Cancelled {
        /// The reason given.
        reason: String,
    },
}

impl JobState {
    /// The state's name.
    pub fn status(&self) -> JobStatus {
        match self {
            JobState::Queued { .. } => JobStatus::Queued,
            JobState::Provisioning { .. } => JobStatus::Provisioning,
            JobState::Running { .. } => JobStatus::Running,
            JobState::Succeeded => JobStatus::Succeeded,
            JobState::Failed { .. } => JobStatus::Failed,
            JobState::Cancelled { .. } => JobStatus::Cancelled,
        }
    }

    /// Whether no further change can happen.
    pub fn is_terminal(&self) -> bool {
        self.status().is_terminal()
    }
}

/// Everything about a job that changes: moved only by `apply::apply`, one event at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The state.
    pub state: JobState,
    /// The last event's sequence.
    pub last_sequence: u64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Outputs stored by the current attempt (all of them once succeeded).
    pub outputs: Vec<OutputFile>,
    /// Set once a caller asked to cancel, with the reason given.
    pub cancel_reason: Option<String>,
    /// Stage durations.
    pub timings: Timings,
    /// Provisioning start, ms.
    pub provision_ms: Option<i64>,
    /// Start on a machine (last attempt), ms.
    pub started_ms: Option<i64>,
    /// End, ms.
    pub ended_ms: Option<i64>,
    /// The machine of the last attempt.
    pub machine_id: Option<String>,
    /// Machine seconds attributed.
    pub machine_seconds: f64,
    /// Cost attributed, in USD.
    pub cost_usd: f64,
}

impl JobRecord {
    /// The record of a job just submitted (before event 1).
    pub fn new() -> Self {
        Self {
            state: JobState::Queued { position: 0, reason: String::new() },
            last_sequence: 0,
            attempt: 1,
            outputs: Vec::new(),
            cancel_reason: None,
            timings: Timings::default(),
            provision_ms: None,
            started_ms: None,
            ended_ms: None,
            machine_id: None,
            machine_seconds: 0.0,
            cost_usd: 0.0,
        }
    }

    /// Queue position while queued or provisioning.
    pub fn queue_position(&self) -> u32 {
        match self.state {
            JobState::Queued { position, .. } | JobState::Provisioning { position, .. } => position,
            _ => 0,
        }
    }
}

impl Default for JobRecord {
    fn default() -> Self {
        Self::new()
    }
}

/// A job as readers see it: its spec and its record at one moment. Cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// What it is.
    pub spec: Arc<JobSpec>,
    /// Where it is.
    pub record: Arc<JobRecord>,
}

impl Job {
    /// Its id.
    pub fn id(&self) -> JobId {
        self.spec.id
    }

    /// Its state's name.
    pub fn status(&self) -> JobStatus {
        self.record.state.status()
    }

    /// Its failure, when failed.
    pub fn error(&self) -> Option<&JobFailure> {
        match &self.record.state {
            JobState::Failed { error } => Some(error),
            _ => None,
        }
    }
}

/// Machine time and stage durations a terminal event records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Execution on ComfyUI, ms.
    pub execution_ms: Option<u64>,
    /// Output downloads, ms.
    pub download_ms: Option<u64>,
    /// Machine seconds attributed (billed machines only).
    pub machine_seconds: f64,
    /// Cost attributed, USD.
    pub cost_usd: f64,
}

/// What happened, as logged and streamed. Every change of a job's state is one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// Waiting, at a position.
    Queued {
        /// 1 = next.
        position: u32,
        /// Why it waits, when not simply behind other jobs (e.g. every server drained).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Provisioning progress.
    Provisioning {
        /// Phase name (`launch_requested`, `starting`, `ready`, `comfyui_reachable`, `waiting_for_machine`).
        phase: String,
        /// Machine.
        machine_id: String,
        /// Server type.
        server_type: String,
        /// Since provisioning began.
        elapsed_ms: u64,
    },
    /// Handed to a machine.
    Started {
        /// Machine.
        machine_id: String,
        /// Prompt id.
        prompt_id: String,
    },
    /// Inputs uploaded; the prompt is being queued on ComfyUI (from here a restart re-attaches to it).
    PromptSubmitted {
        /// Upload time, ms.
        upload_ms: u64,
    },
    /// A node began.
    NodeStarted {
        /// Node.
        node_id: String,
        /// Display node.
        display_node_id: String,
        /// Class, from the graph.
        class_type: String,
    },
    /// Nodes reused from cache.
    NodesCached {
        /// Ids.
        node_ids: Vec<String>,
    },
    /// Progress of a node.
    Progress {
        /// Node.
        node_id: String,
        /// Done.
        value: f64,
        /// Total.
        max: f64,
    },
    /// A preview image.
    Preview {
        /// MIME type.
        mime_type: String,
        /// Node, if known.
        node_id: String,
        /// Bytes.
        #[serde(with = "b64")]
        data: Bytes,
    },
    /// An output was stored.
    OutputReady {
        /// The output.
        output: OutputFile,
    },
    /// A node's UI output.
    NodeExecuted {
        /// Node.
        node_id: String,
        /// `output` as JSON text.
        output_json: String,
    },
    /// Progress text.
    ProgressText {
        /// Node.
        node_id: String,
        /// Text.
        text: String,
    },
    /// Something the caller should know that does not end the job (e.g. outputs ComfyUI dropped).
    Warning {
        /// A stable code, e.g. `OUTPUTS_DROPPED`.
        code: String,
        /// For people.
        message: String,
        /// The nodes concerned.
        node_ids: Vec<String>,
    },
    /// A caller asked to cancel; the job ends `cancelled` once its machine stopped it.
    CancelRequested {
        /// The reason given.
        reason: String,
    },
    /// A step of the escalation that stops a cancelled job's prompt (the last one before `cancelled` is the
    /// step that ended it). Changes nothing but the log.
    CancelStep {
        /// The step taken.
        step: CancelStepKind,
        /// Since the cancel began on the machine (the first step), ms.
        elapsed_ms: u64,
    },
    /// Retried after the attempt was lost.
    Retrying {
        /// The next attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// Back in the queue before anything reached ComfyUI (no attempt counted), e.g. at shutdown.
    Requeued {
        /// Why.
        reason: String,
    },
    /// An unmodelled ComfyUI message.
    Comfy {
        /// Its type.
        kind: String,
        /// Its data as JSON text.
        data_json: String,
    },
    /// Terminal: success.
    Succeeded {
        /// Every output.
        outputs: Vec<OutputFile>,
        /// Machine time and stage durations.
        #[serde(default)]
        usage: Usage,
    },
    /// Terminal: failure.
    Failed {
        /// Why.
        error: JobFailure,
        /// Machine time and stage durations.
        #[serde(default)]
        usage: Usage,
    },
    /// Terminal: cancelled.
    Cancelled {
        /// Reason.
        reason: String,
        /// Machine time and stage durations.
        #[serde(default)]
        usage: Usage,
    },
}

impl EventKind {
    /// Whether this event ends the job.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::Succeeded { .. } | EventKind::Failed { .. } | EventKind::Cancelled { .. })
    }

    /// Whether a lagging subscriber may skip this event when a later one supersedes it.
    pub fn is_coalescable(&self) -> bool {
        matches!(self, EventKind::Progress { .. } | EventKind::Preview { .. } | EventKind::Queued { .. })
    }

    /// A short name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Queued { .. } => "queued",
            EventKind::Provisioning { .. } => "provisioning",
            EventKind::Started { .. } => "started",
            EventKind::PromptSubmitted { .. } => "prompt_submitted",
            EventKind::NodeStarted { .. } => "node_started",
            EventKind::NodesCached { .. } => "nodes_cached",
            EventKind::Progress { .. } => "progress",
            EventKind::Preview { .. } => "preview",
            EventKind::OutputReady { .. } => "output_ready",
            EventKind::NodeExecuted { .. } => "node_executed",
            EventKind::ProgressText { .. } => "progress_text",
            EventKind::Warning { .. } => "warning",
            EventKind::CancelRequested { .. } => "cancel_requested",
            EventKind::CancelStep { .. } => "cancel_step",
            EventKind::Retrying { .. } => "retrying",
            EventKind::Requeued { .. } => "requeued",
            EventKind::Comfy { .. } => "comfy",
            EventKind::Succeeded { .. } => "succeeded",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled { .. } => "cancelled",
        }
    }
}

/// The steps of a cancel on a running job, in the order they are tried: each waits `jobs.cancel_grace` for
/// ComfyUI to confirm before the next, and at `jobs.cancel_deadline` the job is cancelled regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelStepKind {
    /// The per-job cancel (`POST /api/jobs/{id}/cancel` where the server has it), else `/interrupt`.
    Interrupt,
    /// `POST /free` (unload models, free memory), then the interrupt again.
    Free,
    /// The RunComfy machine is stopped (billed no further) and replaced if demand needs one.
    ReplaceMachine,
    /// The deadline passed: the job is cancelled without ComfyUI's confirmation.
    Abandoned,
}

impl CancelStepKind {
    /// The step's name.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelStepKind::Interrupt => "interrupt",
            CancelStepKind::Free => "free",
            CancelStepKind::ReplaceMachine => "replace_machine",
            CancelStepKind::Abandoned => "abandoned",
        }
    }
}

/// One logged event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Job.
    pub job_id: JobId,
    /// Sequence, from 1, gap-free per job.
    pub seq: u64,
    /// Time, ms since the epoch.
    pub time_ms: i64,
    /// What happened.
    pub kind: EventKind,
}

mod b64 {
    use base64::Engine;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map(Bytes::from).map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_parse_and_print_in_the_canonical_form() {
        let id = JobId::new();
        let text = id.to_string();
        assert_eq!(text.parse::<JobId>().unwrap(), id);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.len(), 36);
        assert!("nope".parse::<JobId>().is_err());
    }

    #[test]
    fn events_and_records_round_trip_through_json() {
        let e = Event {
            job_id: JobId::new(),
            seq: 3,
            time_ms: 5,
            kind: EventKind::Preview {
                mime_type: "image/png".into(),
                node_id: "2".into(),
                data: Bytes::from_static(b"\x89PNG"),
            },
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        let mut r = JobRecord::new();
        r.state =
            JobState::Running { machine_id: "m".into(), prompt_id: "p".into(), since_ms: 1, submitted: true };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<JobRecord>(&json).unwrap(), r);
    }

    #[test]
    fn terminal_events_written_before_usage_existed_still_decode() {
        let old = r#"{"type":"succeeded","outputs":[]}"#;
        let kind: EventKind = serde_json::from_str(old).unwrap();
        assert_eq!(kind, EventKind::Succeeded { outputs: vec![], usage: Usage::default() });
    }
}
