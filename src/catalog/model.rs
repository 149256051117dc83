//! The catalog's domain types: a workflow, its typed inputs and outputs, and what it needs to run.
//!
//! Plain data; parsing lives in `manifest`, validation of requests in `prepare`. Knows nothing of files,
//! protos or ComfyUI servers.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// One catalog workflow: an API-format ComfyUI graph plus the typed schema of its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    /// The name callers submit (also the directory name under `workflows/`).
    pub name: String,
    /// What it does.
    pub description: String,
    /// The manifest's version label.
    pub version: String,
    /// The typed inputs, in manifest order.
    pub inputs: Vec<InputSpec>,
    /// The outputs that matter.
    pub outputs: Vec<OutputSpec>,
    /// What it needs to run on.
    pub requirements: Requirements,
    /// The API-format graph (a JSON object of node id → `{class_type, inputs}`) with its default values.
    pub graph: Value,
}

impl Workflow {
    /// The input called `name`, if the workflow has one.
    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// The names of every input, comma-separated (for error messages).
    pub(crate) fn input_names(&self) -> String {
        if self.inputs.is_empty() {
            return "(none)".to_string();
        }
        self.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The type of a workflow input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// Image bytes, uploaded to ComfyUI; the target receives the uploaded file name.
    Image,
    /// Free text.
    Text,
    /// A 64-bit integer.
    Int,
    /// A number (integers accepted).
    Float,
    /// A boolean.
    Bool,
    /// An integer seed; randomised when unset, and the seed used is recorded.
    Seed,
    /// One string among `choices`.
    Choice,
}

impl InputKind {
    /// The lowercase name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Text => "text",
            Self::Int => "int",
            Self::Float => "float",
            Self::Bool => "bool",
            Self::Seed => "seed",
            Self::Choice => "choice",
        }
    }

    /// How a caller must send a value of this kind (the `ParameterValue` case).
    pub(crate) fn expected(self) -> &'static str {
        match self {
            Self::Image => "an image (image_value)",
            Self::Text => "a string (string_value)",
            Self::Int => "an integer (int_value)",
            Self::Float => "a number (float_value or int_value)",
            Self::Bool => "a boolean (bool_value)",
            Self::Seed => "an integer seed (int_value)",
            Self::Choice => "one of the choices as a string (string_value)",
        }
    }

    /// Whether min/max apply.
    pub(crate) fn is_numeric(self) -> bool {
        matches!(self, Self::Int | Self::Float | Self::Seed)
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed input of a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// The name callers use in `parameters` (`image` and `prompt` also come from the request fields).
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its type.
    pub kind: InputKind,
    /// Whether a value must be given. Never true together with a default.
    pub required: bool,
    /// The value used when none is given (never set for images and seeds).
    pub default: Option<ScalarValue>,
    /// Inclusive minimum for numbers.
    pub min: Option<f64>,
    /// Inclusive maximum for numbers.
    pub max: Option<f64>,
    /// The allowed values of a `choice`.
    pub choices: Vec<String>,
    /// Where the value is written in the graph (at least one).
    pub targets: Vec<InputTarget>,
}

/// A non-image value: a default, or a value ready to be written into a graph.
#[derive(Debug, Clone, PartialEq)]
pub enum ScalarValue {
    /// Text or a choice.
    Text(String),
    /// An integer or seed.
    Int(i64),
    /// A number.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl ScalarValue {
    /// The JSON value written into the graph. Non-finite floats (rejected earlier) become `null`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Text(s) => Value::String(s.clone()),
            Self::Int(i) => Value::from(*i),
            Self::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Self::Bool(b) => Value::Bool(*b),
        }
    }
}

impl fmt::Display for ScalarValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(s) => f.write_str(s),
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => write!(f, "{x}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Where a value goes: one input of one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputTarget {
    /// The node id in the API-format graph.
    pub node_id: String,
    /// The node's input name.
    pub input_name: String,
}

impl InputTarget {
    /// A target from its parts.
    pub fn new(node_id: impl Into<String>, input_name: impl Into<String>) -> Self {
        Self { node_id: node_id.into(), input_name: input_name.into() }
    }
}

impl fmt::Display for InputTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node_id, self.input_name)
    }
}

/// An output a workflow produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// The output node's id.
    pub node_id: String,
    /// A short name.
    pub name: String,
    /// What it is.
    pub description: String,
}

/// What a workflow needs to run on. Empty for model-free workflows that run on any ComfyUI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// The RunComfy workflow version whose machines have this workflow's models and custom nodes.
    pub runcomfy_workflow_version_id: Option<String>,
    /// The RunComfy server type, e.g. `medium`.
    pub server_type: Option<String>,
}
