//! Domain types of the job engine: ids, states, the job record, events and failures.
//!
//! Serialized as JSON into the store's opaque bodies; never exposed as protobuf here.

use std::{collections::BTreeMap, fmt, str::FromStr};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A job's id: a UUID (v7, so ids sort by creation), also used as ComfyUI's `prompt_id`.
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

/// A job's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
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

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Provisioning,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Whether no further change can happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Provisioning => "PROVISIONING",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }
}

/// Why a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureReason {
    /// ComfyUI rejected the graph.
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

/// The durable record of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// State.
    pub state: JobState,
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
    /// The graph to run, every non-image value injected.
    pub graph: serde_json::Value,
    /// Images to upload before queueing.
    pub images: Vec<StoredImage>,
    /// Node ids whose outputs are kept (empty: every `output`-type image).
    pub output_nodes: Vec<String>,
    /// RunComfy workflow version id the workflow needs, if any.
    pub runcomfy_workflow_version_id: String,
    /// RunComfy server type the workflow needs, if any.
    pub server_type: String,
    /// Creation, ms since the epoch.
    pub created_ms: i64,
    /// Provisioning start.
    pub provision_ms: Option<i64>,
    /// Start on a machine.
    pub started_ms: Option<i64>,
    /// End.
    pub ended_ms: Option<i64>,
    /// Stage durations.
    pub timings: Timings,
    /// Machine.
    pub machine_id: Option<String>,
    /// ComfyUI prompt id.
    pub comfy_prompt_id: Option<String>,
    /// Whether `POST /prompt` may have reached ComfyUI for the current attempt.
    pub submitted: bool,
    /// Stored outputs.
    pub outputs: Vec<OutputFile>,
    /// Failure.
    pub error: Option<JobFailure>,
    /// Last event sequence.
    pub last_sequence: u64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Caller's deadline, ms since the epoch.
    pub deadline_ms: Option<i64>,
    /// Reason given with a cancel.
    pub cancel_reason: Option<String>,
    /// Whether a cancel was requested.
    pub cancel_requested: bool,
    /// Queue position (1 = next) while queued.
    pub queue_position: u32,
    /// Machine seconds attributed.
    pub machine_seconds: f64,
    /// Cost attributed, in USD.
    pub cost_usd: f64,
}

/// What happened, as logged and streamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// Waiting, at a position.
    Queued {
        /// 1 = next.
        position: u32,
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
    /// Retried after a loss.
    Retrying {
        /// The next attempt.
        attempt: u32,
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
    },
    /// Terminal: failure.
    Failed {
        /// Why.
        error: JobFailure,
    },
    /// Terminal: cancelled.
    Cancelled {
        /// Reason.
        reason: String,
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
    fn job_ids_parse_and_print() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("nope".parse::<JobId>().is_err());
    }

    #[test]
    fn events_round_trip_through_json() {
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
    }
}
