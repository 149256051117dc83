//! Validating a job request against a catalog workflow (or an inline graph) and building the graph to
//! run, reporting every problem at once as field violations.
//!
//! Field names of violations (what the gRPC layer puts in `BadRequest.field_violations[].field`):
//! - `workflow`: unknown workflow name; or a catalog graph that does not fit the backend's `/object_info`
//!   at a node no input targets;
//! - `graph_json`: an inline graph that is not valid JSON, is in the UI format, has dangling links,
//!   cycles or nodes without `class_type`, or does not fit `/object_info` where no parameter is involved;
//! - `image` / `prompt`: problems with the request fields of those names (including a missing required
//!   `image`/`prompt` input of a catalog workflow);
//! - `parameters[NAME]`: an unknown, missing, mistyped, out-of-range or not-a-choice parameter (`NAME` is
//!   the input name for catalog workflows, `node_id.input_name` for inline graphs).
//!
//! Knows nothing of gRPC, uploads or ComfyUI servers; the job engine uploads each [`ImageSlot`] and calls
//! [`inject_uploaded`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use rand::Rng;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::graph::{self, GraphProblem, as_link, class_type, describe_node, node_inputs};
use super::model::{InputKind, InputSpec, InputTarget, Requirements, ScalarValue, Workflow};
use super::object_info::{self, SpecType, spec_type};
use super::values::fit;
use crate::limits::echo;

/// The workflow name recorded for inline graphs.
pub const INLINE_WORKFLOW: &str = "inline";

/// The largest seed chosen at random: 2^53 - 1, so the seed survives any JSON reader exactly.
pub const MAX_RANDOM_SEED: i64 = (1 << 53) - 1;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkflowSource {
    /// A catalog workflow by name.
    Named(String),
    /// An API-format graph as JSON text.
    Inline(String),
}

/// The inputs of a job request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobInputs {
    /// The request's `image` field: fills the input named `image` (inline graphs: the only LoadImage).
    pub image: Option<ImageInput>,
    /// The request's `prompt` field: fills the input named `prompt` (inline graphs: the positive prompt).
    /// An empty string counts as unset.
    pub prompt: Option<String>,
    /// Further values by input name (inline graphs: by `node_id.input_name`).
    pub parameters: BTreeMap<String, ParamValue>,
}

/// A typed parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// For text and choice inputs.
    String(String),
    /// For int and seed inputs (float inputs accept it too).
    Int(i64),
    /// For float inputs.
    Float(f64),
    /// For bool inputs.
    Bool(bool),
    /// For image inputs.
    Image(ImageInput),
}

impl ParamValue {
    fn describe(&self) -> &'static str {
        match self {
            Self::String(_) => "a string",
            Self::Int(_) => "an integer",
            Self::Float(_) => "a float",
            Self::Bool(_) => "a boolean",
            Self::Image(_) => "an image",
        }
    }

    fn into_scalar(self) -> Result<ScalarValue, ImageInput> {
        match self {
            Self::String(s) => Ok(ScalarValue::Text(s)),
            Self::Int(i) => Ok(ScalarValue::Int(i)),
            Self::Float(f) => Ok(ScalarValue::Float(f)),
            Self::Bool(b) => Ok(ScalarValue::Bool(b)),
            Self::Image(i) => Err(i),
        }
    }
}

/// An image given with a request.
#[derive(Clone, PartialEq)]
pub struct ImageInput {
    /// The raw bytes (PNG, JPEG or WebP).
    pub data: Bytes,
    /// The file name to give ComfyUI; derived from the content when empty.
    pub filename: String,
    /// The MIME type; sniffed from the bytes when empty.
    pub content_type: String,
}

impl fmt::Debug for ImageInput {
    // Not derived: the bytes would flood logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageInput")
            .field("data", &format_args!("{} bytes", self.data.len()))
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .finish()
    }
}

/// One problem with a request: the field it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// `workflow`, `graph_json`, `image`, `prompt` or `parameters[NAME]` (see the module docs).
    pub field: String,
    /// What is wrong and, where it helps, how to fix it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// An image to upload before the prompt is queued, and where its uploaded name goes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSlot {
    /// The input's name (`image`, a manifest input name, or `node_id.input_name` for inline graphs).
    pub input: String,
    /// The image, with `filename` and `content_type` always filled in.
    pub image: ImageInput,
    /// The graph inputs that receive the uploaded file name (see [`inject_uploaded`]).
    pub targets: Vec<InputTarget>,
}

/// A validated request: the graph to run and what is left to do before queueing it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedJob {
    /// The catalog workflow's name, or [`INLINE_WORKFLOW`].
    pub workflow: String,
    /// The catalog workflow's version, or `sha256:<16 hex>` of an inline graph's text.
    pub workflow_version: String,
    /// The API-format graph with every non-image value injected. Image targets hold
    /// `comfyrelay:pending-upload:<input>` until [`inject_uploaded`] replaces them.
    pub graph: Value,
    /// The images to upload.
    pub images: Vec<ImageSlot>,
    /// Every input used, by name, as short text (images: name, type, size and sha256; the seed used).
    pub summary: BTreeMap<String, String>,
    /// What the workflow needs to run on (empty for inline graphs).
    pub requirements: Requirements,
}

/// After uploading an image: writes the name ComfyUI answered with into each of its targets.
/// Targets that are not in the graph are skipped.
pub fn inject_uploaded(graph: &mut Value, targets: &[InputTarget], uploaded_name: &str) {
    for target in targets {
        set_input(graph, target, Value::String(uploaded_name.to_string()));
    }
}

fn set_input(graph: &mut Value, target: &InputTarget, value: Value) {
    if let Some(inputs) =
        graph.get_mut(&target.node_id).and_then(|n| n.get_mut("inputs")).and_then(Value::as_object_mut)
    {
        inputs.insert(target.input_name.clone(), value);
    }
}

fn pending_upload(input: &str) -> Value {
    Value::String(format!("comfyrelay:pending-upload:{input}"))
}

fn param_field(name: &str) -> String {
    format!("parameters[{name}]")
}

/// Checks an image's bytes, fills in its content type and file name, and summarises it.
fn check_image(mut image: ImageInput) -> Result<(ImageInput, String), String> {
    if image.data.is_empty() {
        return Err("the image is empty".to_string());
    }
    // The header, not only the signature: a PNG signature followed by junk fails here, not in LoadImage.
    let header = super::image_header::read_image_header(&image.data).map_err(|e| e.to_string())?;
    let (mime, ext) = (header.mime, header.extension);
    let sha = hex::encode(Sha256::digest(&image.data));
    if image.content_type.trim().is_empty() {
        image.content_type = mime.to_string();
    }
    // ComfyUI rejects path separators and leading dots; keep a safe base name.
    let base: String = image
        .filename
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ' ' | '(' | ')'))
        .collect();
    let base = base.trim().trim_start_matches('.').to_string();
    image.filename = if base.is_empty() { format!("input-{}.{ext}", &sha[..12]) } else { base };
    let summary =
        format!("{} ({}, {} bytes, sha256 {sha})", image.filename, image.content_type, image.data.len());
    Ok((image, summary))
}

/// Short text for the summary; long text is cut.
fn summarise(value: &ScalarValue) -> String {
    let text = value.to_string();
    if text.chars().count() <= 200 {
        return text;
    }
    let cut: String = text.chars().take(200).collect();
    format!("{cut}… ({} characters)", text.chars().count())
}

/// Validates a request against a catalog workflow and builds its graph.
pub(crate) fn prepare_named(
    workflow: &Workflow,
    inputs: JobInputs,
    object_info: Option<&Value>,
) -> Result<PreparedJob, Vec<FieldViolation>> {
    let JobInputs { image, prompt, parameters } = inputs;
    let mut violations = Vec::new();
    // Input name -> (field it came from, value).
    let mut given: BTreeMap<String, (String, ParamValue)> =
        parameters.into_iter().map(|(name, value)| (name.clone(), (param_field(&name), value))).collect();
    let request_fields = [
        ("image", image.map(ParamValue::Image)),
        ("prompt", prompt.filter(|p| !p.is_empty()).map(ParamValue::String)),
    ];
    for (field, value) in request_fields {
        let Some(value) = value else { continue };
        if workflow.input(field).is_none() {
            violations.push(FieldViolation::new(
                field,
                format!(
                    "workflow `{}` has no input named `{field}` (its inputs: {})",
                    workflow.name,
                    workflow.input_names()
                ),
            ));
        } else if given.contains_key(field) {
            violations.push(FieldViolation::new(
                field,
                format!(
                    "`{field}` is given both as the `{field}` field and as parameters[{field}]; give it once"
                ),
            ));
        } else {
            given.insert(field.to_string(), (field.to_string(), value));
        }
    }
    for (name, (field, _)) in &given {
        if workflow.input(name).is_none() && field.starts_with("parameters[") {
            violations.push(FieldViolation::new(
                field.clone(),
                format!(
                    "unknown input `{}`; workflow `{}` takes: {}",
                    echo(name),
                    workflow.name,
                    workflow.input_names()
                ),
            ));
        }
    }

    let mut graph = workflow.graph.clone();
    let mut images = Vec::new();
    let mut summary = BTreeMap::new();
    // Graph input -> the field whose value landed there, to attribute /object_info problems.
    let mut origin: HashMap<InputTarget, String> = HashMap::new();
    for spec in &workflow.inputs {
        let field = match given.remove(&spec.name) {
            Some((field, value)) => match resolve(spec, value) {
                Ok(Resolved::Scalar(v)) => {
                    summary.insert(spec.name.clone(), summarise(&v));
                    write_targets(&mut graph, spec, &v);
                    field
                }
                Ok(Resolved::Image(image, text)) => {
                    summary.insert(spec.name.clone(), text);
                    spec.targets.iter().for_each(|t| set_input(&mut graph, t, pending_upload(&spec.name)));
                    images.push(ImageSlot { input: spec.name.clone(), image, targets: spec.targets.clone() });
                    field
                }
                Err(why) => {
                    violations.push(FieldViolation::new(field, why));
                    continue;
                }
            },
            None if spec.kind == InputKind::Seed => {
                let seed = random_seed(spec);
                summary.insert(spec.name.clone(), seed.to_string());
                write_targets(&mut graph, spec, &ScalarValue::Int(seed));
                param_field(&spec.name)
            }
            None => {
                let field = missing_field(spec);
                match &spec.default {
                    Some(default) => {
                        summary.insert(spec.name.clone(), format!("{} (default)", summarise(default)));
                        write_targets(&mut graph, spec, default);
                    }
                    None if spec.required => violations.push(FieldViolation::new(
                        field.clone(),
                        format!(
                            "missing required input `{}` ({}): {}",
                            spec.name, spec.kind, spec.description
                        ),
                    )),
                    None => {}
                }
                field
            }
        };
        for target in &spec.targets {
            origin.insert(target.clone(), field.clone());
        }
    }

    if let (Some(info), Some(map)) = (object_info, graph.as_object()) {
        let uploads: HashSet<InputTarget> = workflow
            .inputs
            .iter()
            .filter(|s| s.kind == InputKind::Image)
            .flat_map(|s| s.targets.iter().cloned())
            .collect();
        for problem in object_info::check(map, info, &uploads) {
            let field = problem_target(&problem).and_then(|t| origin.get(&t)).cloned();
            violations.push(match field {
                Some(field) => FieldViolation::new(field, problem.message),
                None => FieldViolation::new(
                    "workflow",
                    format!("workflow `{}` does not fit the backend: {}", workflow.name, problem.message),
                ),
            });
        }
    }

    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(PreparedJob {
        workflow: workflow.name.clone(),
        workflow_version: workflow.version.clone(),
        graph,
        images,
        summary,
        requirements: workflow.requirements.clone(),
    })
}

fn problem_target(problem: &GraphProblem) -> Option<InputTarget> {
    Some(InputTarget::new(problem.node_id.clone()?, problem.input.clone()?))
}

/// The field a missing input is reported on: the request field for `image`/`prompt`.
fn missing_field(spec: &InputSpec) -> String {
    match (spec.name.as_str(), spec.kind) {
        ("image", InputKind::Image) => "image".to_string(),
        ("prompt", InputKind::Text) => "prompt".to_string(),
        (name, _) => param_field(name),
    }
}

enum Resolved {
    Scalar(ScalarValue),
    Image(ImageInput, String),
}

fn resolve(spec: &InputSpec, value: ParamValue) -> Result<Resolved, String> {
    match (spec.kind, value) {
        (InputKind::Image, ParamValue::Image(image)) => {
            let (image, text) = check_image(image)?;
            Ok(Resolved::Image(image, text))
        }
        (InputKind::Image, other) => Err(format!(
            "wrong type: `{}` takes {}, got {}",
            spec.name,
            spec.kind.expected(),
            other.describe()
        )),
        (_, value) => match value.into_scalar() {
            Ok(v) => fit(spec, v).map(Resolved::Scalar),
            Err(_) => {
                Err(format!("wrong type: `{}` takes {}, got an image", spec.name, spec.kind.expected()))
            }
        },
    }
}

fn write_targets(graph: &mut Value, spec: &InputSpec, value: &ScalarValue) {
    let json = value.to_json();
    for target in &spec.targets {
        set_input(graph, target, json.clone());
    }
}

/// A seed within the input's range, capped to [0, 2^53 - 1] unless the range says otherwise.
fn random_seed(spec: &InputSpec) -> i64 {
    let lo = spec.min.map_or(0, |m| m.ceil().clamp(i64::MIN as f64, i64::MAX as f64) as i64);
    let hi = spec.max.map_or(MAX_RANDOM_SEED, |m| m.floor().clamp(i64::MIN as f64, i64::MAX as f64) as i64);
    let hi = hi.min(lo.saturating_add(MAX_RANDOM_SEED)).max(lo);
    rand::rng().random_range(lo..=hi)
}

/// Validates a request for an inline API-format graph and builds the graph to run.
///
/// Parameters are addressed as `node_id.input_name`; an image parameter may target any input that holds
/// a file name. The `image` field fills `image` of the graph's only `LoadImage` node; the `prompt` field
/// fills `text` of the only CLIPTextEncode node feeding a sampler's `positive` input (or of the only
/// CLIPTextEncode node, if no sampler has one). Seeds are not randomised: the graph runs as given.
pub(crate) fn prepare_inline(
    text: &str,
    inputs: JobInputs,
    object_info: Option<&Value>,
) -> Result<PreparedJob, Vec<FieldViolation>> {
    let map = graph::parse_graph(text).map_err(|problems| {
        problems.into_iter().map(|p| FieldViolation::new("graph_json", p.message)).collect::<Vec<_>>()
    })?;
    let JobInputs { image, prompt, parameters } = inputs;
    let mut violations = Vec::new();
    let mut graph = map.clone();
    let mut images = Vec::new();
    let mut summary = BTreeMap::new();
    let mut origin: HashMap<InputTarget, String> = HashMap::new();
    let class_info = |node: &str| class_type(&map, node).and_then(|c| object_info?.get(c));

    for (key, value) in parameters {
        let field = param_field(&key);
        let target = match address(&map, &key, &class_info) {
            Ok(t) => t,
            Err(why) => {
                violations.push(FieldViolation::new(field, why));
                continue;
            }
        };
        let spec = class_info(&target.node_id).and_then(|c| input_spec(c, &target.input_name));
        let current = node_inputs(&map, &target.node_id).and_then(|i| i.get(&target.input_name));
        match check_inline_value(&map, &target, current, spec, value) {
            Ok(Resolved::Scalar(v)) => {
                summary.insert(key.clone(), summarise(&v));
                set_in_map(&mut graph, &target, v.to_json());
            }
            Ok(Resolved::Image(image, text)) => {
                summary.insert(key.clone(), text);
                set_in_map(&mut graph, &target, pending_upload(&key));
                images.push(ImageSlot { input: key.clone(), image, targets: vec![target.clone()] });
            }
            Err(why) => violations.push(FieldViolation::new(field.clone(), why)),
        }
        origin.insert(target, field);
    }

    if let Some(image) = image {
        match only_load_image(&map) {
            Err(why) => violations.push(FieldViolation::new("image", why)),
            Ok(target) if origin.contains_key(&target) => violations.push(FieldViolation::new(
                "image",
                format!(
                    "the `image` field and parameters[{t}] both fill {t}; give one",
                    t = echo(&target.to_string())
                ),
            )),
            Ok(target) => match check_image(image) {
                Ok((image, text)) => {
                    summary.insert("image".to_string(), text);
                    set_in_map(&mut graph, &target, pending_upload("image"));
                    images.push(ImageSlot {
                        input: "image".to_string(),
                        image,
                        targets: vec![target.clone()],
                    });
                    origin.insert(target, "image".to_string());
                }
                Err(why) => violations.push(FieldViolation::new("image", why)),
            },
        }
    }
    if let Some(prompt) = prompt.filter(|p| !p.is_empty()) {
        match positive_prompt(&map) {
            Err(why) => violations.push(FieldViolation::new("prompt", why)),
            Ok(target) if origin.contains_key(&target) => violations.push(FieldViolation::new(
                "prompt",
                format!(
                    "the `prompt` field and parameters[{t}] both fill {t}; give one",
                    t = echo(&target.to_string())
                ),
            )),
            Ok(target) => {
                summary.insert("prompt".to_string(), summarise(&ScalarValue::Text(prompt.clone())));
                set_in_map(&mut graph, &target, Value::String(prompt));
                origin.insert(target, "prompt".to_string());
            }
        }
    }

    if let Some(info) = object_info {
        let uploads: HashSet<InputTarget> = images.iter().flat_map(|s| s.targets.iter().cloned()).collect();
        for problem in object_info::check(&graph, info, &uploads) {
            let field = problem_target(&problem).and_then(|t| origin.get(&t)).cloned();
            violations.push(FieldViolation::new(
                field.unwrap_or_else(|| "graph_json".to_string()),
                problem.message,
            ));
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    Ok(PreparedJob {
        workflow: INLINE_WORKFLOW.to_string(),
        workflow_version: format!("sha256:{}", &digest[..16]),
        graph: Value::Object(graph),
        images,
        summary,
        requirements: Requirements::default(),
    })
}

fn set_in_map(graph: &mut Map<String, Value>, target: &InputTarget, value: Value) {
    if let Some(inputs) =
        graph.get_mut(&target.node_id).and_then(|n| n.get_mut("inputs")).and_then(Value::as_object_mut)
    {
        inputs.insert(target.input_name.clone(), value);
    }
}

/// Resolves `node_id.input_name` against the graph (node ids may themselves contain dots).
fn address<'a>(
    map: &Map<String, Value>,
    key: &str,
    class_info: &dyn Fn(&str) -> Option<&'a Value>,
) -> Result<InputTarget, String> {
    let split = key
        .match_indices('.')
        .map(|(i, _)| (&key[..i], &key[i + 1..]))
        .find(|(node, _)| map.contains_key(*node));
    let Some((node, input)) = split else {
        return Err(format!(
            "no node matches `{}`; inline graph inputs are addressed as `node_id.input_name` (nodes: {})",
            echo(key),
            shown_ids(map.keys().map(String::as_str), map.len())
        ));
    };
    let target = InputTarget::new(node, input);
    let node_desc = describe_node(map, node);
    let input = echo(input);
    match node_inputs(map, node).and_then(|i| i.get(target.input_name.as_str())) {
        Some(v) if as_link(v).is_some() => Err(format!(
            "{node_desc} input `{input}` is connected to another node; only literal inputs can be set"
        )),
        Some(_) => Ok(target),
        None if class_info(node).and_then(|c| input_spec(c, &target.input_name)).is_some() => Ok(target),
        None => Err(format!("{node_desc} has no input `{input}`")),
    }
}

fn input_spec<'a>(class_info: &'a Value, input: &str) -> Option<&'a Value> {
    let inputs = class_info.get("input")?;
    inputs
        .get("required")
        .and_then(|r| r.get(input))
        .or_else(|| inputs.get("optional").and_then(|o| o.get(input)))
}

/// Checks an inline parameter against the backend's spec for the input when known, else against the
/// JSON type of the graph's current value.
fn check_inline_value(
    map: &Map<String, Value>,
    target: &InputTarget,
    current: Option<&Value>,
    spec: Option<&Value>,
    value: ParamValue,
) -> Result<Resolved, String> {
    let node_desc = describe_node(map, &target.node_id);
    let input = echo(&target.input_name);
    let expected = match spec.map(spec_type) {
        Some((SpecType::Int, _)) => "INT",
        Some((SpecType::Float, _)) => "FLOAT",
        Some((SpecType::Boolean, _)) => "BOOLEAN",
        Some((SpecType::String | SpecType::Combo(_), _)) => "STRING",
        Some((SpecType::Other(_) | SpecType::Unknown, _)) | None => match current {
            Some(Value::Number(n)) if n.is_f64() => "FLOAT",
            Some(Value::Number(_)) => "NUMBER",
            Some(Value::Bool(_)) => "BOOLEAN",
            Some(Value::String(_)) => "STRING",
            _ => "ANY",
        },
    };
    let uploadable = spec
        .and_then(|s| s.get(1))
        .and_then(|o| o.get("image_upload"))
        .and_then(Value::as_bool)
        .unwrap_or(expected == "STRING");
    let wrong = |got: &str| format!("wrong type: {node_desc} input `{input}` takes {expected}, got {got}");
    match (expected, value) {
        (_, ParamValue::Image(image)) if uploadable => {
            let (image, text) = check_image(image)?;
            Ok(Resolved::Image(image, text))
        }
        (_, ParamValue::Image(_)) => Err(wrong("an image")),
        ("INT", ParamValue::Int(i)) => Ok(Resolved::Scalar(ScalarValue::Int(i))),
        ("FLOAT" | "NUMBER", ParamValue::Int(i)) => Ok(Resolved::Scalar(ScalarValue::Int(i))),
        ("FLOAT" | "NUMBER", ParamValue::Float(f)) if f.is_finite() => {
            Ok(Resolved::Scalar(ScalarValue::Float(f)))
        }
        ("FLOAT" | "NUMBER", ParamValue::Float(f)) => Err(format!("{f} is not a finite number")),
        ("BOOLEAN", ParamValue::Bool(b)) => Ok(Resolved::Scalar(ScalarValue::Bool(b))),
        ("STRING", ParamValue::String(s)) => Ok(Resolved::Scalar(ScalarValue::Text(s))),
        ("ANY", ParamValue::Float(f)) if !f.is_finite() => Err(format!("{f} is not a finite number")),
        ("ANY", value) => value.into_scalar().map(Resolved::Scalar).map_err(|_| wrong("an image")),
        (_, value) => Err(wrong(value.describe())),
    }
}

/// Up to ten node ids, each cut short, for messages (`total` counts them all).
fn shown_ids<'a>(ids: impl Iterator<Item = &'a str>, total: usize) -> String {
    let mut shown: Vec<String> = ids.take(10).map(|id| echo(id).into_owned()).collect();
    if total > shown.len() {
        shown.push(format!("… ({total} in all)"));
    }
    shown.join(", ")
}

fn is_load_image(map: &Map<String, Value>, node: &str) -> bool {
    class_type(map, node) == Some("LoadImage")
}

/// The `image` input of the graph's only LoadImage node.
fn only_load_image(map: &Map<String, Value>) -> Result<InputTarget, String> {
    let nodes: Vec<&String> = map.keys().filter(|id| is_load_image(map, id)).collect();
    match nodes.as_slice() {
        [node] => Ok(InputTarget::new(node.as_str(), "image")),
        [] => Err("the graph has no LoadImage node to take the image".to_string()),
        many => Err(format!(
            "the graph has {} LoadImage nodes ({}); pass each image as parameters[<node_id>.image]",
            many.len(),
            shown_ids(many.iter().map(|s| s.as_str()), many.len())
        )),
    }
}

fn is_text_encoder(map: &Map<String, Value>, node: &str) -> bool {
    class_type(map, node).is_some_and(|c| c.starts_with("CLIPTextEncode"))
        && node_inputs(map, node).and_then(|i| i.get("text")).is_some_and(Value::is_string)
}

/// The `text` input of the prompt encoder feeding the samplers' `positive` input.
fn positive_prompt(map: &Map<String, Value>) -> Result<InputTarget, String> {
    let positive: BTreeSet<&str> = map
        .keys()
        .filter_map(|id| node_inputs(map, id)?.get("positive").and_then(as_link)?.ok())
        .map(|(source, _)| source)
        .filter(|source| is_text_encoder(map, source))
        .collect();
    let candidates: Vec<&str> = if positive.is_empty() {
        map.keys().map(String::as_str).filter(|id| is_text_encoder(map, id)).collect()
    } else {
        positive.into_iter().collect()
    };
    match candidates.as_slice() {
        [node] => Ok(InputTarget::new(*node, "text")),
        [] => {
            Err("the graph has no CLIPTextEncode node with a literal `text` to take the prompt".to_string())
        }
        many => Err(format!(
            "the prompt could go to several text encoders ({}); pass it as parameters[<node_id>.text]",
            shown_ids(many.iter().copied(), many.len())
        )),
    }
}
