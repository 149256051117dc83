//! Checks a graph against a backend's `GET /object_info` (the node classes it has installed and their
//! input specs), so that problems ComfyUI would report later are reported at submission, per field.
//!
//! Knows the `/object_info` JSON shape only; nothing of manifests or requests. Unknown shapes are skipped
//! rather than reported: this check must never reject what ComfyUI itself would accept because of a
//! format change.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::graph::{GraphProblem, as_link, class_type, echo_json};
use super::model::InputTarget;
use crate::limits::echo;

/// Checks every node of `graph` against `object_info`: unknown classes, missing required inputs, unknown
/// inputs, literal values of the wrong type, combo values not in the list, numbers out of min/max, link
/// output indexes, and the presence of an output node. Inputs in `uploads` will receive an uploaded file
/// name later, so their combo list (the server's current input files) is not checked.
pub(crate) fn check(
    graph: &Map<String, Value>,
    object_info: &Value,
    uploads: &HashSet<InputTarget>,
) -> Vec<GraphProblem> {
    let Some(info) = object_info.as_object() else { return Vec::new() };
    let mut problems = Vec::new();
    let mut all_known = true;
    let mut has_output_node = false;
    for (id, node) in graph {
        let Some(class) = class_type(graph, id) else { continue };
        // Node ids, class types and input names of inline graphs come from the caller: quoted cut short.
        let (nid, ncls) = (echo(id), echo(class));
        let Some(class_info) = info.get(class).and_then(Value::as_object) else {
            all_known = false;
            problems.push(GraphProblem::node(
                id,
                format!(
                    "node {nid}: class_type `{ncls}` is not available on the backend (a missing custom node?)"
                ),
            ));
            continue;
        };
        has_output_node |= class_info.get("output_node").and_then(Value::as_bool).unwrap_or(false);
        let Some(inputs) = node.get("inputs").and_then(Value::as_object) else { continue };
        let section =
            |name: &str| class_info.get("input").and_then(|i| i.get(name)).and_then(Value::as_object);
        let (required, optional, hidden) = (section("required"), section("optional"), section("hidden"));
        if let Some(required) = required {
            for name in required.keys() {
                let nname = echo(name);
                if !inputs.contains_key(name) {
                    problems.push(GraphProblem::input(
                        id,
                        name,
                        format!("node {nid} ({ncls}): required input `{nname}` is missing"),
                    ));
                }
            }
        }
        for (name, value) in inputs {
            let nname = echo(name);
            let spec = required
                .and_then(|r| r.get(name))
                .or_else(|| optional.and_then(|o| o.get(name)))
                .or_else(|| hidden.and_then(|h| h.get(name)));
            let Some(spec) = spec else {
                // Only literals: links to undeclared inputs are how dynamic ("autogrow") inputs look, and
                // ComfyUI accepts them; a literal to an undeclared input is a typo ComfyUI would ignore.
                if class_info.get("input").is_some() && as_link(value).is_none() {
                    problems.push(GraphProblem::input(
                        id,
                        name,
                        format!("node {nid} ({ncls}) has no input `{nname}`"),
                    ));
                }
                continue;
            };
            match as_link(value) {
                Some(Ok((source, index))) => {
                    let nsrc = echo(source);
                    let outputs = class_type(graph, source)
                        .and_then(|c| info.get(c))
                        .and_then(|c| c.get("output"))
                        .and_then(Value::as_array);
                    if let Some(outputs) = outputs.filter(|o| index >= o.len() as u64) {
                        problems.push(GraphProblem::input(
                            id,
                            name,
                            format!(
                                "node {nid} ({ncls}) input `{nname}` reads output {index} of node {nsrc}, which has {} output(s)",
                                outputs.len()
                            ),
                        ));
                    }
                }
                Some(Err(_)) => {} // reported by the structure check
                None => {
                    let skip_combo = uploads.contains(&InputTarget::new(id.as_str(), name.as_str()));
                    if let Some(why) = check_literal(spec, value, skip_combo) {
                        problems.push(GraphProblem::input(
                            id,
                            name,
                            format!("node {nid} ({ncls}) input `{nname}`: {why}"),
                        ));
                    }
                }
            }
        }
    }
    if all_known && !has_output_node && !graph.is_empty() {
        problems.push(GraphProblem::graph(
            "the graph has no output node (such as SaveImage, PreviewImage or SaveImageWebsocket), so ComfyUI would run nothing",
        ));
    }
    problems
}

/// The input's declared type and its options, from an `/object_info` input spec such as
/// `["INT", {"min": 1}]`, `[["a", "b"], {}]` or `["COMBO", {"options": ["a", "b"]}]`.
pub(crate) enum SpecType<'a> {
    Combo(&'a [Value]),
    Int,
    Float,
    Boolean,
    String,
    Other(&'a str),
    Unknown,
}

pub(crate) fn spec_type(spec: &Value) -> (SpecType<'_>, Option<&Map<String, Value>>) {
    let options = spec.get(1).and_then(Value::as_object);
    let kind = match spec.get(0) {
        Some(Value::Array(list)) => SpecType::Combo(list),
        Some(Value::String(t)) => match t.as_str() {
            "COMBO" => match options.and_then(|o| o.get("options")).and_then(Value::as_array) {
                Some(list) => SpecType::Combo(list),
                None => SpecType::Unknown,
            },
            "INT" => SpecType::Int,
            "FLOAT" => SpecType::Float,
            "BOOLEAN" => SpecType::Boolean,
            "STRING" => SpecType::String,
            other => SpecType::Other(other),
        },
        _ => SpecType::Unknown,
    };
    (kind, options)
}

/// Why a literal value does not fit its spec, if it does not.
fn check_literal(spec: &Value, value: &Value, skip_combo: bool) -> Option<String> {
    let (kind, options) = spec_type(spec);
    let value_text = || echo_json(value);
    let bound = |key: &str| options.and_then(|o| o.get(key)).and_then(Value::as_f64);
    let in_range = |x: f64| -> Option<String> {
        if let Some(min) = bound("min").filter(|min| x < *min) {
            return Some(format!("value {x} is smaller than the minimum {min}"));
        }
        if let Some(max) = bound("max").filter(|max| x > *max) {
            return Some(format!("value {x} is bigger than the maximum {max}"));
        }
        None
    };
    match kind {
        SpecType::Combo(list) => {
            if skip_combo || list.contains(value) {
                return None;
            }
            let shown: Vec<String> = list.iter().take(10).map(Value::to_string).collect();
            let more = if list.len() > 10 { format!(", … ({} in all)", list.len()) } else { String::new() };
            Some(format!(
                "value {} is not among the backend's choices [{}{more}]",
                value_text(),
                shown.join(", ")
            ))
        }
        SpecType::Int => match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => in_range(n.as_f64().unwrap_or(0.0)),
            Value::Number(n) => match n.as_f64() {
                Some(x) if x.fract() == 0.0 => in_range(x),
                _ => Some(format!("value {} is not an integer (INT)", value_text())),
            },
            _ => Some(format!("value {} is not an integer (INT)", value_text())),
        },
        SpecType::Float => match value.as_f64() {
            Some(x) => in_range(x),
            None => Some(format!("value {} is not a number (FLOAT)", value_text())),
        },
        SpecType::Boolean => {
            (!value.is_boolean()).then(|| format!("value {} is not a boolean (BOOLEAN)", value_text()))
        }
        SpecType::String => {
            (!value.is_string()).then(|| format!("value {} is not a string (STRING)", value_text()))
        }
        SpecType::Other(t) if t.chars().all(|c| c.is_ascii_uppercase() || c == '_') && t != "*" => {
            Some(format!(
                "type {t} must come from another node's output (a link), not the literal {}",
                value_text()
            ))
        }
        SpecType::Other(_) | SpecType::Unknown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn info() -> Value {
        json!({
            "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": true}]}},
                          "output": ["IMAGE", "MASK"], "output_node": false},
            "ImageScale": {"input": {"required": {"image": ["IMAGE"],
                "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
                "width": ["INT", {"default": 512, "min": 0, "max": 16384}],
                "height": ["INT", {"default": 512, "min": 0, "max": 16384}],
                "crop": ["COMBO", {"options": ["disabled", "center"]}]}}, "output": ["IMAGE"], "output_node": false},
            "ImageBlur": {"input": {"required": {"image": ["IMAGE", {}],
                "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31}],
                "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0}]}}, "output": ["IMAGE"], "output_node": false},
            "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                "hidden": {"prompt": "PROMPT"}}, "output": [], "output_node": true}
        })
    }

    fn problems(graph: Value) -> Vec<String> {
        let graph = graph.as_object().cloned().unwrap_or_default();
        check(&graph, &info(), &HashSet::new()).into_iter().map(|p| p.message).collect()
    }

    #[test]
    fn a_fitting_graph_has_no_problems() {
        let p = problems(json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area", "width": 8, "height": 8, "crop": "center"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x", "dynamic_1": ["2", 0]}}
        }));
        assert!(p.is_empty(), "links to undeclared (dynamic) inputs are accepted: {p:?}");
    }

    #[test]
    fn every_mismatch_is_reported() {
        let p = problems(json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 5], "upscale_method": "bogus", "width": -1, "height": "8", "crop": "sideways", "extra": 1}},
            "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 3, "sigma": 99.0}},
            "4": {"class_type": "NoSuchNode", "inputs": {}},
            "5": {"class_type": "SaveImage", "inputs": {"images": 3}}
        }));
        let has = |needle: &str| p.iter().any(|m| m.contains(needle));
        assert!(has("value \"missing.png\" is not among the backend's choices"), "{p:?}");
        assert!(has("reads output 5 of node 1, which has 2 output(s)"), "{p:?}");
        assert!(has("input `upscale_method`: value \"bogus\""), "{p:?}");
        assert!(has("input `width`: value -1 is smaller than the minimum 0"), "{p:?}");
        assert!(has("input `height`: value \"8\" is not an integer"), "{p:?}");
        assert!(has("input `crop`: value \"sideways\""), "{p:?}");
        assert!(has("has no input `extra`"), "{p:?}");
        assert!(has("input `sigma`: value 99 is bigger than the maximum 10"), "{p:?}");
        assert!(has("class_type `NoSuchNode` is not available"), "{p:?}");
        assert!(has("required input `filename_prefix` is missing"), "{p:?}");
        assert!(has("type IMAGE must come from another node's output"), "{p:?}");
        assert_eq!(p.len(), 11, "{p:?}");
    }

    #[test]
    fn uploads_skip_the_combo_check_and_missing_outputs_are_reported() {
        let graph = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "later.png"}}});
        let graph = graph.as_object().cloned().unwrap_or_default();
        let uploads = HashSet::from([InputTarget::new("1", "image")]);
        let p: Vec<String> = check(&graph, &info(), &uploads).into_iter().map(|p| p.message).collect();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("no output node"), "{p:?}");
    }
}
