//! API-format ComfyUI graphs: parsing JSON text and checking the structure ComfyUI relies on
//! (every node has a `class_type` and an `inputs` object; links point at existing nodes; no cycles).
//!
//! Knows nothing of manifests, requests or a backend's `/object_info` (see `object_info`).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde_json::{Map, Value};

use crate::limits::{MAX_JSON_DEPTH, echo, exceeds_json_depth};

/// One problem found in a graph, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphProblem {
    /// The node concerned, if any.
    pub node_id: Option<String>,
    /// The input concerned, if any.
    pub input: Option<String>,
    /// What is wrong, as a full sentence that names the node and input.
    pub message: String,
}

impl GraphProblem {
    pub(crate) fn graph(message: impl Into<String>) -> Self {
        Self { node_id: None, input: None, message: message.into() }
    }

    pub(crate) fn node(node_id: &str, message: impl Into<String>) -> Self {
        Self { node_id: Some(node_id.to_string()), input: None, message: message.into() }
    }

    pub(crate) fn input(node_id: &str, input: &str, message: impl Into<String>) -> Self {
        Self { node_id: Some(node_id.to_string()), input: Some(input.to_string()), message: message.into() }
    }
}

impl fmt::Display for GraphProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The message for a graph saved in the UI ("workflow") format instead of the API format.
pub(crate) const UI_FORMAT_MESSAGE: &str = "this is a UI-format workflow (it has top-level `nodes` and \
    `links`); comfyrelay needs the API format: in ComfyUI use Workflow → Export (API), or enable dev mode \
    in the settings and use \"Save (API Format)\"";

/// Parses API-format graph text and checks its structure.
///
/// # Errors
/// Every problem found: not JSON, not an object, UI format, no nodes, and everything [`check_structure`]
/// reports.
pub fn parse_graph(text: &str) -> Result<Map<String, Value>, Vec<GraphProblem>> {
    // Before building a tree: a deep nesting costs the parser stack and memory for nothing.
    if exceeds_json_depth(text, MAX_JSON_DEPTH) {
        return Err(vec![GraphProblem::graph(format!(
            "the graph nests more than {MAX_JSON_DEPTH} levels deep (API-format graphs need 5)"
        ))]);
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| vec![GraphProblem::graph(format!("the graph is not valid JSON: {e}"))])?;
    let graph = as_graph(value)?;
    let problems = check_structure(&graph);
    if problems.is_empty() { Ok(graph) } else { Err(problems) }
}

/// Accepts a JSON value as an API-format graph object, recognising the usual mistakes.
fn as_graph(value: Value) -> Result<Map<String, Value>, Vec<GraphProblem>> {
    let Value::Object(map) = value else {
        return Err(vec![GraphProblem::graph(
            "the graph must be a JSON object mapping node ids to {\"class_type\", \"inputs\"} (ComfyUI's API format)",
        )]);
    };
    if map.contains_key("nodes") && map.contains_key("links") {
        return Err(vec![GraphProblem::graph(UI_FORMAT_MESSAGE)]);
    }
    let prompt_body = map.len() == 1
        && map
            .get("prompt")
            .and_then(Value::as_object)
            .is_some_and(|inner| !inner.contains_key("class_type"));
    if prompt_body {
        return Err(vec![GraphProblem::graph(
            "this looks like a POST /prompt request body; pass only the graph (the value of its `prompt` field)",
        )]);
    }
    if map.is_empty() {
        return Err(vec![GraphProblem::graph("the graph has no nodes")]);
    }
    Ok(map)
}

/// The link an input value denotes, if it is one. ComfyUI treats every JSON array as a link
/// `[source_node_id, output_index]`; `Err` carries why a malformed one is malformed.
pub(crate) fn as_link(value: &Value) -> Option<Result<(&str, u64), &'static str>> {
    let Value::Array(items) = value else { return None };
    Some(match items.as_slice() {
        [Value::String(node), Value::Number(n)] => match n.as_u64() {
            Some(index) => Ok((node.as_str(), index)),
            None => Err("its output index must be a non-negative integer"),
        },
        [_, _] => Err("a link must be [\"node_id\", output_index] with a string node id"),
        _ => Err("a link must be a two-element array [\"node_id\", output_index]"),
    })
}

/// The `class_type` of a node, if it has a valid one.
pub(crate) fn class_type<'a>(graph: &'a Map<String, Value>, node_id: &str) -> Option<&'a str> {
    graph.get(node_id)?.get("class_type")?.as_str()
}

/// The `inputs` object of a node, if it has one.
pub(crate) fn node_inputs<'a>(
    graph: &'a Map<String, Value>,
    node_id: &str,
) -> Option<&'a Map<String, Value>> {
    graph.get(node_id)?.get("inputs")?.as_object()
}

/// `node 3 (KSampler)`, for messages (ids and class types cut short: an inline graph's come from the caller).
pub(crate) fn describe_node(graph: &Map<String, Value>, node_id: &str) -> String {
    match class_type(graph, node_id) {
        Some(class) => format!("node {} ({})", echo(node_id), echo(class)),
        None => format!("node {}", echo(node_id)),
    }
}

/// A JSON value as text for a message, cut short.
pub(crate) fn echo_json(value: &Value) -> String {
    echo(&value.to_string()).into_owned()
}

/// Checks what ComfyUI needs of every graph: node shape, link targets and acyclicity.
/// Reports every problem; never panics, whatever the JSON.
pub fn check_structure(graph: &Map<String, Value>) -> Vec<GraphProblem> {
    let mut problems = Vec::new();
    // node -> the nodes it reads from (only valid links to existing nodes).
    let mut edges: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for (id, node) in graph {
        let nid = echo(id);
        let Value::Object(node) = node else {
            problems.push(GraphProblem::node(
                id,
                format!("node {nid} must be an object with `class_type` and `inputs`"),
            ));
            continue;
        };
        match node.get("class_type") {
            Some(Value::String(c)) if !c.trim().is_empty() => {}
            Some(_) => problems
                .push(GraphProblem::node(id, format!("node {nid}: `class_type` must be a non-empty string"))),
            None => problems.push(GraphProblem::node(id, format!("node {nid} has no `class_type`"))),
        }
        let inputs = match node.get("inputs") {
            Some(Value::Object(inputs)) => inputs,
            Some(_) => {
                problems.push(GraphProblem::node(id, format!("node {nid}: `inputs` must be an object")));
                continue;
            }
            None => {
                problems.push(GraphProblem::node(id, format!("node {nid} has no `inputs` object")));
                continue;
            }
        };
        let sources = edges.entry(id.as_str()).or_default();
        for (name, value) in inputs {
            let nname = echo(name);
            match as_link(value) {
                None => {}
                Some(Err(why)) => problems.push(GraphProblem::input(
                    id,
                    name,
                    format!("node {nid} input `{nname}` is a malformed link {}: {why}", echo_json(value)),
                )),
                Some(Ok((source, _))) if !graph.contains_key(source) => problems.push(GraphProblem::input(
                    id,
                    name,
                    format!(
                        "node {nid} input `{nname}` links to node {}, which is not in the graph",
                        echo(source)
                    ),
                )),
                Some(Ok((source, _))) => {
                    sources.insert(source);
                }
            }
        }
    }
    problems.extend(find_cycles(graph, &edges));
    problems
}

/// Finds cycles with an iterative depth-first search (no recursion, so deep graphs cannot overflow the
/// stack). Each cycle is reported once, in graph order.
fn find_cycles(graph: &Map<String, Value>, edges: &HashMap<&str, BTreeSet<&str>>) -> Vec<GraphProblem> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        InProgress,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    let mut problems = Vec::new();
    for start in graph.keys() {
        let start = start.as_str();
        if marks.contains_key(start) {
            continue;
        }
        // Stack of (node, its remaining sources).
        let mut stack: Vec<(&str, Vec<&str>)> = Vec::new();
        marks.insert(start, Mark::InProgress);
        stack.push((start, sources_of(edges, start)));
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            let Some(next) = pending.pop() else {
                marks.insert(node, Mark::Done);
                stack.pop();
                continue;
            };
            match marks.get(next) {
                Some(Mark::Done) => {}
                Some(Mark::InProgress) => {
                    let from = stack.iter().position(|(n, _)| *n == next).unwrap_or(0);
                    let mut path: Vec<&str> = stack[from..].iter().map(|(n, _)| *n).collect();
                    path.push(next);
                    let mut shown: Vec<String> = path.iter().take(12).map(|n| echo(n).into_owned()).collect();
                    if path.len() > 12 {
                        shown.push(format!("… ({} nodes)", path.len()));
                    }
                    problems.push(GraphProblem::node(
                        next,
                        format!("the graph has a cycle: {}", shown.join(" → ")),
                    ));
                }
                None => {
                    marks.insert(next, Mark::InProgress);
                    stack.push((next, sources_of(edges, next)));
                }
            }
        }
    }
    problems
}

fn sources_of<'a>(edges: &HashMap<&'a str, BTreeSet<&'a str>>, node: &str) -> Vec<&'a str> {
    // Reversed so that popping visits sources in ascending order.
    edges.get(node).map(|s| s.iter().rev().copied().collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn problems(text: &str) -> Vec<String> {
        match parse_graph(text) {
            Ok(_) => Vec::new(),
            Err(p) => p.into_iter().map(|p| p.message).collect(),
        }
    }

    #[test]
    fn a_valid_graph_parses() {
        let g = r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
                    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}"#;
        assert!(parse_graph(g).is_ok());
    }

    #[test]
    fn ui_format_is_recognised_and_explained() {
        let p = problems(r#"{"nodes": [], "links": [], "version": 0.4}"#);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("UI-format"), "{p:?}");
        assert!(p[0].contains("Export (API)") && p[0].contains("Save (API Format)"), "{p:?}");
    }

    #[test]
    fn a_prompt_body_is_recognised() {
        let p = problems(r#"{"prompt": {"1": {"class_type": "X", "inputs": {}}}}"#);
        assert!(p[0].contains("POST /prompt"), "{p:?}");
    }

    #[test]
    fn every_structural_problem_is_reported_at_once() {
        let g = r#"{"1": {"inputs": {}},
                    "2": {"class_type": "A", "inputs": {"x": ["9", 0], "y": ["1"], "z": [1, 0]}},
                    "3": {"class_type": "B", "inputs": {"a": ["4", 0]}},
                    "4": {"class_type": "C", "inputs": {"b": ["3", 0]}},
                    "5": 7}"#;
        let p = problems(g);
        assert!(p.iter().any(|m| m.contains("node 1 has no `class_type`")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("links to node 9, which is not in the graph")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("input `y` is a malformed link")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("input `z` is a malformed link")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("cycle") && m.contains("3 → 4 → 3")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("node 5 must be an object")), "{p:?}");
        assert_eq!(p.len(), 6, "{p:?}");
    }

    #[test]
    fn self_loops_are_cycles() {
        let p = problems(r#"{"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}"#);
        assert_eq!(p, vec!["the graph has a cycle: 1 → 1".to_string()]);
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let mut g = Map::new();
        for i in 0..20_000 {
            let inputs = if i == 0 {
                serde_json::json!({})
            } else {
                serde_json::json!({"x": [(i - 1).to_string(), 0]})
            };
            g.insert(i.to_string(), serde_json::json!({"class_type": "A", "inputs": inputs}));
        }
        assert!(check_structure(&g).is_empty());
    }

    #[test]
    fn not_an_object_and_empty_graphs_are_rejected() {
        assert_eq!(problems("[]").len(), 1);
        assert_eq!(problems("{}"), vec!["the graph has no nodes".to_string()]);
        assert!(problems("{").first().is_some_and(|m| m.contains("not valid JSON")));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[0-9a-z_]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[0-9a-z_]{0,3}|class_type|inputs", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = parse_graph(&text);
        }

        #[test]
        fn arbitrary_json_never_panics(value in arb_json()) {
            let _ = parse_graph(&value.to_string());
        }
    }
}
