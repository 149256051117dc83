//! ComfyUI client: HTTP calls and the per-server WebSocket connection that routes events to prompts.
//!
//! Owns everything about speaking ComfyUI's protocol. Knows nothing of gRPC, jobs or the store.
