//! ComfyUI client: HTTP calls and the per-server WebSocket connection that routes events to prompts.
//!
//! Owns everything about speaking ComfyUI's protocol. Knows nothing of gRPC, jobs or the store.
//!
//! # Layout
//! - [`ComfyClient`] (`http`): the HTTP API with timeouts, typed errors and retries; `/view` downloads
//!   checked against Content-Length and the image signature (`sniff`).
//! - [`ComfyConnection`] (`connection`): one WebSocket per server; reconnects, idle probe, reconciliation
//!   of in-flight prompts from /queue then /history.
//! - `router`: routes each parsed frame ([`ServerMessage`], `messages`) to its prompt's [`PromptEvents`];
//!   guarantees one terminal event per prompt and no duplicates across reconnects.
//! - [`ComfyError`] (`error`), data types (`types`).

mod connection;
mod error;
mod http;
mod messages;
mod router;
mod sniff;
mod types;

#[cfg(test)]
mod tests;

pub use connection::ComfyConnection;
pub use error::{ComfyError, NodeError};
pub use http::ComfyClient;
pub use messages::{PromptEvent, ServerMessage};
pub use router::PromptEvents;
pub use types::{
    ClientOptions, Downloaded, ExecutionError, FileRef, HistoryEntry, HistoryStatus, QueuePrompt,
    QueueSnapshot, QueuedPrompt, UploadedFile,
};
