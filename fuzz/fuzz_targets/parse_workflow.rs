//! Feeds arbitrary bytes to the catalog's parsers: a manifest and a graph (split at the first NUL byte),
//! and an inline graph request. None of them may panic, whatever the input.

#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use comfyrelay::catalog::{Catalog, JobInputs, ParamValue, WorkflowSource, parse_graph, parse_workflow};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (manifest, graph) = text.split_once('\0').unwrap_or((&text, &text));
    let _ = parse_graph(graph);
    let _ = parse_workflow("fuzz", manifest, graph);
    if let Ok(catalog) = Catalog::from_workflows(Path::new("."), Vec::new()) {
        // Use the manifest half as a parameter address and value, to reach the inline checks.
        let parameters = BTreeMap::from([(manifest.to_string(), ParamValue::String(manifest.to_string()))]);
        let inputs = JobInputs { image: None, prompt: Some(manifest.to_string()), parameters };
        let _ = catalog.prepare(WorkflowSource::Inline(graph.to_string()), inputs, None);
    }
});
