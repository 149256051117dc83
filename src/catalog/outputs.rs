//! What a prepared graph produces: the class of each node, and which declared outputs arrive only over
//! ComfyUI's WebSocket. The job engine asks these questions here instead of reading graph JSON itself.

use std::collections::BTreeMap;

use serde_json::Value;

use super::Workflow;

/// The `class_type` of every node of an API-format graph.
pub fn node_classes(graph: &Value) -> BTreeMap<String, String> {
    graph
        .as_object()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|(id, node)| Some((id.clone(), node.get("class_type")?.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a node class sends its images as WebSocket binary frames instead of saving files (they are
/// then never in `/history`: a relay that missed the frames cannot recover them).
pub fn streams_over_websocket(class_type: &str) -> bool {
    class_type.to_ascii_lowercase().contains("websocket")
}

/// The outputs a catalog workflow declares, as `(node id, streamed over the WebSocket)`; empty for
/// inline graphs, whose outputs are whatever ComfyUI reports.
pub fn declared_outputs(workflow: Option<&Workflow>, graph: &Value) -> Vec<(String, bool)> {
    let classes = node_classes(graph);
    workflow
        .map(|w| {
            w.outputs
                .iter()
                .map(|o| {
                    let streamed = classes.get(&o.node_id).is_some_and(|c| streams_over_websocket(c));
                    (o.node_id.clone(), streamed)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_streamed_outputs() {
        let graph = serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "SaveImageWebsocket", "inputs": {}},
            "3": {"inputs": {}}
        });
        let classes = node_classes(&graph);
        assert_eq!(classes.len(), 2);
        assert_eq!(classes["2"], "SaveImageWebsocket");
        assert!(streams_over_websocket("SaveImageWebsocket"));
        assert!(!streams_over_websocket("SaveImage"));
        assert!(declared_outputs(None, &graph).is_empty());
    }
}
