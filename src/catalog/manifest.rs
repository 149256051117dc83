//! Workflow manifests (`manifest.toml`): parsing them and checking them against their graph
//! (`workflow.json`) into a [`Workflow`]. The format is documented in `workflows/README.md`.
//!
//! Knows nothing of the file system layout (see `loader`) or of requests.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use super::graph::{self, as_link, describe_node, node_inputs};
use super::model::{InputKind, InputSpec, InputTarget, OutputSpec, Requirements, ScalarValue, Workflow};
use super::values::{describe, fit, scalar_from_json};

/// Which file of a workflow a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFile {
    /// `manifest.toml`.
    Manifest,
    /// `workflow.json`.
    Graph,
}

/// One problem in a workflow's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    /// The file it is in.
    pub file: SourceFile,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    #[serde(default)]
    description: String,
    version: String,
    #[serde(default)]
    requirements: RequirementsFile,
    #[serde(default)]
    inputs: Vec<InputFile>,
    #[serde(default)]
    outputs: Vec<OutputFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequirementsFile {
    runcomfy_workflow_version_id: Option<String>,
    server_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(rename = "type")]
    kind: InputKind,
    required: Option<bool>,
    default: Option<toml::Value>,
    min: Option<f64>,
    max: Option<f64>,
    #[serde(default)]
    choices: Vec<String>,
    targets: Vec<TargetFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    node: String,
    input: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputFile {
    node: String,
    name: String,
    #[serde(default)]
    description: String,
}

/// Parses a workflow from its manifest and graph texts and checks them against each other.
/// `dir_name` is the workflow's directory name, which must equal the manifest's `name`.
///
/// # Errors
/// Every problem found in either file. Never panics, whatever the input.
pub fn parse_workflow(
    dir_name: &str,
    manifest_text: &str,
    graph_text: &str,
) -> Result<Workflow, Vec<ManifestProblem>> {
    let manifest_err = |reason: String| ManifestProblem { file: SourceFile::Manifest, reason };
    let graph = graph::parse_graph(graph_text).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| ManifestProblem { file: SourceFile::Graph, reason: p.message })
            .collect::<Vec<_>>()
    });
    let manifest: Result<ManifestFile, _> = toml::from_str(manifest_text)
        .map_err(|e| vec![manifest_err(format!("invalid manifest: {}", e.message()))]);
    let (manifest, graph) = match (manifest, graph) {
        (Ok(m), Ok(g)) => (m, g),
        (m, g) => {
            let mut problems = m.err().unwrap_or_default();
            problems.extend(g.err().unwrap_or_default());
            return Err(problems);
        }
    };
    let mut problems = Vec::new();
    let mut err = |reason: String| problems.push(manifest_err(reason));

    let ManifestFile { name, description, version, requirements, inputs, outputs } = manifest;
    if name != dir_name {
        err(format!("`name` is {name:?} but the directory is {dir_name:?}; they must be equal"));
    }
    if !valid_name(&name) {
        err(format!(
            "`name` {name:?} must be 1-64 characters of a-z, 0-9, `-` and `_`, starting with a letter or digit"
        ));
    }
    if version.trim().is_empty() {
        err("`version` must not be empty".to_string());
    }
    let RequirementsFile { runcomfy_workflow_version_id, server_type } = requirements;
    let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let requirements = Requirements {
        runcomfy_workflow_version_id: non_empty(runcomfy_workflow_version_id),
        server_type: non_empty(server_type),
    };

    let mut specs = Vec::new();
    let mut names = HashSet::new();
    let mut claimed: HashSet<InputTarget> = HashSet::new();
    for (index, input) in inputs.into_iter().enumerate() {
        let label = format!("inputs[{index}] ({})", input.name);
        if !names.insert(input.name.clone()) {
            err(format!("{label}: another input has the same name"));
        }
        match build_input(input, &graph, &mut claimed) {
            Ok(spec) => specs.push(spec),
            Err(reasons) => reasons.into_iter().for_each(|r| err(format!("{label}: {r}"))),
        }
    }

    let mut output_specs = Vec::new();
    let mut output_names = BTreeSet::new();
    for (index, OutputFile { node, name, description }) in outputs.into_iter().enumerate() {
        if !graph.contains_key(&node) {
            err(format!("outputs[{index}] ({name}): node {node} is not in the graph"));
        }
        if !output_names.insert(name.clone()) {
            err(format!("outputs[{index}] ({name}): another output has the same name"));
        }
        output_specs.push(OutputSpec { node_id: node, name, description });
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Workflow {
        name,
        description,
        version,
        inputs: specs,
        outputs: output_specs,
        requirements,
        graph: Value::Object(graph),
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Checks one manifest input against the graph and turns it into an [`InputSpec`].
fn build_input(
    input: InputFile,
    graph: &serde_json::Map<String, Value>,
    claimed: &mut HashSet<InputTarget>,
) -> Result<InputSpec, Vec<String>> {
    let InputFile { name, description, kind, required, default, min, max, choices, targets } = input;
    let mut errors = Vec::new();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        errors.push("the name must be non-empty and use only letters, digits, `_` and `-`".to_string());
    }
    if targets.is_empty() {
        errors.push("`targets` must name at least one node input".to_string());
    }
    let targets: Vec<InputTarget> = targets.into_iter().map(|t| InputTarget::new(t.node, t.input)).collect();
    for target in &targets {
        if !claimed.insert(target.clone()) {
            errors.push(format!("target {target} is also the target of another input"));
        }
        let Some(inputs) = node_inputs(graph, &target.node_id) else {
            errors.push(format!("target node {} is not in the graph", target.node_id));
            continue;
        };
        let node = describe_node(graph, &target.node_id);
        match inputs.get(&target.input_name) {
            None => errors.push(format!("target {node} has no input `{}` in the graph", target.input_name)),
            Some(v) if as_link(v).is_some() => errors.push(format!(
                "target {node} input `{}` is a link to another node, not a value that can be set",
                target.input_name
            )),
            Some(v) if !compatible(kind, v) => errors.push(format!(
                "target {node} input `{}` holds {v}, which is not a {kind} value",
                target.input_name
            )),
            Some(_) => {}
        }
    }
    if (min.is_some() || max.is_some()) && !kind.is_numeric() {
        errors.push(format!("`min` and `max` apply only to int, float and seed inputs, not {kind}"));
    }
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo > hi || lo.is_nan() || hi.is_nan() {
            errors.push(format!("`min` ({lo}) must not be greater than `max` ({hi})"));
        }
    } else if min.is_some_and(f64::is_nan) || max.is_some_and(f64::is_nan) {
        errors.push("`min` and `max` must be numbers".to_string());
    }
    if kind == InputKind::Choice {
        if choices.is_empty() {
            errors.push("a choice input needs a non-empty `choices` list".to_string());
        }
        if choices.iter().collect::<HashSet<_>>().len() != choices.len() {
            errors.push("`choices` has duplicates".to_string());
        }
    } else if !choices.is_empty() {
        errors.push(format!("`choices` applies only to choice inputs, not {kind}"));
    }
    let mut spec = InputSpec {
        name,
        description,
        kind,
        required: required.unwrap_or(kind == InputKind::Image),
        default: None,
        min,
        max,
        choices,
        targets,
    };
    match kind {
        InputKind::Image | InputKind::Seed if default.is_some() => errors.push(format!(
            "{kind} inputs take no `default` ({})",
            if kind == InputKind::Seed {
                "an unset seed is randomised"
            } else {
                "images are uploaded per job"
            }
        )),
        InputKind::Image if !spec.required => errors.push("image inputs must be required".to_string()),
        InputKind::Seed if spec.required => {
            errors.push("seed inputs cannot be required: an unset seed is randomised".to_string())
        }
        _ => {}
    }
    if spec.required && default.is_some() {
        errors.push("an input cannot be both required and have a default".to_string());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // The default: the manifest's, or else (for optional inputs) the graph's value at the first target.
    let default = match default {
        Some(value) => match scalar_from_toml(&value) {
            Some(v) => Some((v, "the default".to_string())),
            None => {
                return Err(vec![format!("the default {value} is not a string, integer, float or boolean")]);
            }
        },
        None if spec.required || matches!(kind, InputKind::Seed | InputKind::Image) => None,
        None => {
            let first = &spec.targets[0];
            let value = node_inputs(graph, &first.node_id).and_then(|i| i.get(&first.input_name));
            match value.and_then(|v| scalar_from_json(kind, v)) {
                Some(v) => Some((v, format!("the graph's value at {first} (used as the default)"))),
                None => {
                    return Err(vec![format!(
                        "it has no `default` and the graph's value at {first} is not a {kind}; set `default` or `required = true`"
                    )]);
                }
            }
        }
    };
    if let Some((value, what)) = default {
        let shown = format!("{} {value}", describe(&value));
        match fit(&spec, value) {
            Ok(v) => spec.default = Some(v),
            Err(why) => return Err(vec![format!("{what} ({shown}) does not fit the input: {why}")]),
        }
    }
    Ok(spec)
}

/// Whether a graph literal can be replaced by a value of `kind` without changing its JSON type.
fn compatible(kind: InputKind, value: &Value) -> bool {
    match kind {
        InputKind::Image | InputKind::Text | InputKind::Choice => value.is_string(),
        InputKind::Int | InputKind::Seed => value.is_i64() || value.is_u64(),
        InputKind::Float => value.is_number(),
        InputKind::Bool => value.is_boolean(),
    }
}

fn scalar_from_toml(value: &toml::Value) -> Option<ScalarValue> {
    match value {
        toml::Value::String(s) => Some(ScalarValue::Text(s.clone())),
        toml::Value::Integer(i) => Some(ScalarValue::Int(*i)),
        toml::Value::Float(f) => Some(ScalarValue::Float(*f)),
        toml::Value::Boolean(b) => Some(ScalarValue::Bool(*b)),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRAPH: &str = r#"{
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.5}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "sampler_name": "euler", "model": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
    }"#;

    fn reasons(manifest: &str) -> Vec<String> {
        match parse_workflow("w", manifest, GRAPH) {
            Ok(_) => Vec::new(),
            Err(p) => p.into_iter().map(|p| p.reason).collect(),
        }
    }

    #[test]
    fn a_good_manifest_loads_with_defaults_from_the_graph() {
        let wf = parse_workflow(
            "w",
            r#"
            name = "w"
            version = "1"
            [[inputs]]
            name = "image"
            type = "image"
            targets = [{ node = "1", input = "image" }]
            [[inputs]]
            name = "radius"
            type = "int"
            min = 1
            max = 31
            targets = [{ node = "2", input = "blur_radius" }]
            [[inputs]]
            name = "sigma"
            type = "float"
            default = 2
            targets = [{ node = "2", input = "sigma" }]
            [[inputs]]
            name = "seed"
            type = "seed"
            targets = [{ node = "3", input = "seed" }]
            [[outputs]]
            node = "4"
            name = "image"
            "#,
            GRAPH,
        );
        let wf = wf.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(wf.input("image").is_some_and(|i| i.required));
        assert_eq!(wf.input("radius").and_then(|i| i.default.clone()), Some(ScalarValue::Int(3)));
        assert_eq!(wf.input("sigma").and_then(|i| i.default.clone()), Some(ScalarValue::Float(2.0)));
        assert_eq!(wf.input("seed").map(|i| (i.required, i.default.clone())), Some((false, None)));
    }

    #[test]
    fn every_manifest_problem_is_reported() {
        let r = reasons(
            r#"
            name = "other"
            version = ""
            [[inputs]]
            name = "image"
            type = "image"
            default = "x.png"
            targets = [{ node = "9", input = "image" }]
            [[inputs]]
            name = "radius"
            type = "int"
            min = 5
            max = 31
            targets = [{ node = "2", input = "blur_radius" }]
            [[inputs]]
            name = "sampler"
            type = "choice"
            choices = ["a", "b"]
            targets = [{ node = "3", input = "sampler_name" }, { node = "2", input = "image" }]
            [[inputs]]
            name = "sampler"
            type = "text"
            default = 3
            targets = [{ node = "3", input = "nope" }]
            [[outputs]]
            node = "42"
            name = "image"
            "#,
        );
        let has = |needle: &str| r.iter().any(|m| m.contains(needle));
        assert!(has("`name` is \"other\" but the directory is \"w\""), "{r:?}");
        assert!(has("`version` must not be empty"), "{r:?}");
        assert!(has("inputs[0] (image): target node 9 is not in the graph"), "{r:?}");
        assert!(has("inputs[0] (image): image inputs take no `default`"), "{r:?}");
        assert!(
            has(
                "inputs[1] (radius): the graph's value at 2.blur_radius (used as the default) (an integer 3) does not fit"
            ),
            "{r:?}"
        );
        assert!(has("inputs[2] (sampler): target node 2 (ImageBlur) input `image` is a link"), "{r:?}");
        assert!(has("inputs[3] (sampler): another input has the same name"), "{r:?}");
        assert!(has("inputs[3] (sampler): target node 3 (KSampler) has no input `nope`"), "{r:?}");
        assert!(has("outputs[0] (image): node 42 is not in the graph"), "{r:?}");
    }

    #[test]
    fn defaults_must_fit_their_type_range_and_choices() {
        let r = reasons(
            r#"
            name = "w"
            version = "1"
            [[inputs]]
            name = "radius"
            type = "int"
            default = 2.5
            targets = [{ node = "2", input = "blur_radius" }]
            [[inputs]]
            name = "sigma"
            type = "float"
            default = 11.0
            max = 10
            targets = [{ node = "2", input = "sigma" }]
            [[inputs]]
            name = "sampler"
            type = "choice"
            choices = ["a", "b"]
            targets = [{ node = "3", input = "sampler_name" }]
            [[inputs]]
            name = "seed"
            type = "seed"
            required = true
            targets = [{ node = "3", input = "seed" }]
            "#,
        );
        let has = |needle: &str| r.iter().any(|m| m.contains(needle));
        assert!(
            has("inputs[0] (radius): the default (a float 2.5) does not fit the input: wrong type"),
            "{r:?}"
        );
        assert!(
            has("inputs[1] (sigma): the default (a float 11) does not fit the input: 11 is out of range"),
            "{r:?}"
        );
        assert!(
            has(
                "inputs[2] (sampler): the graph's value at 3.sampler_name (used as the default) (a string euler) does not fit"
            ),
            "{r:?}"
        );
        assert!(has("inputs[3] (seed): seed inputs cannot be required"), "{r:?}");
        assert_eq!(r.len(), 4, "{r:?}");
    }

    #[test]
    fn unknown_manifest_keys_and_types_are_rejected() {
        let r = reasons("name = \"w\"\nversion = \"1\"\nmystery = 1\n");
        assert!(r[0].contains("unknown field `mystery`"), "{r:?}");
        let r = reasons(
            "name = \"w\"\nversion = \"1\"\n[[inputs]]\nname = \"a\"\ntype = \"colour\"\ntargets = []\n",
        );
        assert!(r[0].contains("unknown variant `colour`"), "{r:?}");
    }

    #[test]
    fn graph_problems_are_attributed_to_the_graph_file() {
        let Err(p) = parse_workflow("w", "name = \"w\"\nversion = \"1\"\n", r#"{"nodes": [], "links": []}"#)
        else {
            panic!("a UI-format graph must be rejected");
        };
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].file, SourceFile::Graph);
        assert!(p[0].reason.contains("Export (API)"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let (manifest, graph) = text.split_once('\0').unwrap_or((&text, &text));
            let _ = parse_workflow("w", manifest, graph);
        }

        #[test]
        fn arbitrary_manifests_never_panic(manifest in ".{0,300}", graph in ".{0,300}") {
            let _ = parse_workflow("w", &manifest, &graph);
            let _ = parse_workflow("w", &manifest, GRAPH);
        }

        #[test]
        fn arbitrary_toml_shaped_manifests_never_panic(
            kind in "image|text|int|float|bool|seed|choice|x",
            default in "1|2.5|\"a\"|true|\\[1\\]|-9223372036854775808|1e400",
            min in "-1e308|0|5|nan",
            node in "1|2|3|4|9",
            input in "image|blur_radius|sigma|seed|sampler_name|images",
            required in "true|false",
        ) {
            let manifest = format!(
                "name = \"w\"\nversion = \"1\"\n[[inputs]]\nname = \"a\"\ntype = \"{kind}\"\ndefault = {default}\nmin = {min}\nrequired = {required}\nchoices = [\"a\"]\ntargets = [{{ node = \"{node}\", input = \"{input}\" }}]\n"
            );
            let _ = parse_workflow("w", &manifest, GRAPH);
        }
    }
}
