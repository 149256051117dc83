//! The workflow catalog: API-format ComfyUI graphs in `workflows/` with manifests of their typed inputs;
//! validation of a request against them and injection of values into the graph.
