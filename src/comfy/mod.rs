//! ComfyUI client: HTTP calls and the per-server WebSocket connection that routes events to prompts.
//!
//! Owns everything about speaking ComfyUI's protocol. Knows nothing of gRPC, jobs or the store.
//!
//! # Layout
//! - [`ComfyClient`] (`http`): the HTTP API with timeouts, typed errors and retries; `/view` downloads
//!   checked against Content-Length and the image signature (`sniff`).
//! - [`ComfyConnection`] (`connection`): one WebSocket per server; reconnects, idle probe, reconciliation
//!   of in-flight prompts from `/api/jobs/{id}` where available, else /queue then /history.
//! - `router`: routes each parsed frame ([`ServerMessage`], `messages`) to its prompt's [`PromptEvents`];
//!   guarantees one terminal event per prompt and no duplicates across reconnects.
//! - [`Capabilities`] (`capabilities`): version, `/features` and the jobs API of one server, detected per
//!   socket, so the per-job routes are used where they exist (ComfyUI 0.38) and the old ones where not
//!   (0.3.64).
//! - [`ComfyError`] (`error`, with the submit retry classifier [`SubmitFailure`]), data types (`types`).
//!
//! # Submitting: never twice, never a bad id
//! ComfyUI queues a repeated `prompt_id` again (no duplicate check in any generation) and 0.38 refuses an id
//! that is not a canonical lowercase UUID. [`ComfyClient::queue_prompt`] therefore checks the id before
//! sending anything ([`check_prompt_id`]) and, once an answer was lost (timeout, cut connection, 5xx), looks
//! the id up ([`ComfyClient::find_prompt`]) before any further attempt. A graph accepted with some outputs
//! dropped (partial validation: HTTP 200 *with* `node_errors`) is reported as such in
//! [`QueuedPrompt::dropped_outputs`]; callers must not report a plain success for it.
//!
//! # Cancelling: the escalation
//! ComfyUI honours an interrupt only between steps, so a wedged node never stops on its own. The
//! primitives here (also on [`crate::machine::Machine`]) are the steps; the policy (grace periods, events,
//! replacing a machine) belongs to the job runner:
//! 1. [`ComfyClient::cancel_prompt`]: per-job cancel (atomic `/api/jobs/{id}/cancel` where present, else
//!    dequeue a pending prompt or `/interrupt {prompt_id}` a running one). [`CancelOutcome::Dequeued`] and
//!    [`CancelOutcome::NotActive`] end it at once; [`CancelOutcome::Interrupted`] means "signalled".
//! 2. Wait a grace period for the prompt's terminal event (`Interrupted`), checking
//!    [`ComfyClient::prompt_state`] (or [`ComfyClient::is_running`]) when it is late.
//! 3. Still running: [`ComfyClient::free_and_interrupt`] (`/free` unloading models and memory, then the
//!    per-job cancel again), and wait a second grace period.
//! 4. Still running: the machine cannot be trusted with new work. A RunComfy machine is replaced (stopped,
//!    so it is billed no further); a static server is never stopped, but takes no new jobs until the prompt
//!    ends. The job ends `CANCELLED` either way (at `jobs.cancel_deadline` at the latest), its events saying
//!    which step ended it.

mod capabilities;
mod connection;
mod error;
mod http;
mod messages;
mod router;
mod sniff;
mod types;

#[cfg(test)]
mod tests;

pub use capabilities::{Capabilities, Features, Generation};
pub use connection::ComfyConnection;
pub use error::{ComfyError, NodeError, SubmitFailure};
pub use http::{ComfyClient, check_prompt_id};
pub use messages::{PromptEvent, ServerMessage};
pub use router::PromptEvents;
pub use types::{
    CancelOutcome, ClientOptions, Downloaded, DroppedOutput, ExecutionError, FileRef, FoundPrompt,
    HistoryEntry, HistoryStatus, PromptState, QueuePrompt, QueueSnapshot, QueuedPrompt, UploadedFile,
};
