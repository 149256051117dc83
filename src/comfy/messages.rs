//! ComfyUI WebSocket frames → typed [`ServerMessage`]s, and the per-prompt [`PromptEvent`]s they become.
//!
//! Owns the wire format of text messages (`{"type", "data"}`) and binary frames (big-endian u32 event
//! type; 1 = preview, 3 = text, 4 = preview with metadata). Pure functions, no I/O, no routing state.

use bytes::Bytes;
use serde_json::Value;

use super::error::ComfyError;
use super::types::ExecutionError;

/// One frame from ComfyUI, parsed. `prompt_id` is `None` when the frame does not name its prompt
/// (`executing` re-sent after a reconnect, legacy previews, text frames).
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Queue length changed (broadcast), or the greeting on connect (which carries `sid`).
    Status {
        /// `status.exec_info.queue_remaining`.
        queue_remaining: Option<u64>,
        /// The socket's clientId (only in the greeting).
        sid: Option<String>,
    },
    /// The server's answer to our `feature_flags`.
    FeatureFlags(Value),
    /// A prompt started.
    ExecutionStart {
        /// Prompt.
        prompt_id: Option<String>,
    },
    /// Nodes served from cache.
    ExecutionCached {
        /// Prompt.
        prompt_id: Option<String>,
        /// Cached node ids.
        nodes: Vec<String>,
    },
    /// A node started; `node: None` marks the end of the prompt.
    Executing {
        /// Prompt (absent when re-sent to a reconnecting socket).
        prompt_id: Option<String>,
        /// Node id, `None` at the end.
        node: Option<String>,
        /// Display node id.
        display_node: Option<String>,
    },
    /// Progress of one node.
    Progress {
        /// Prompt.
        prompt_id: Option<String>,
        /// Node id.
        node: String,
        /// Current value.
        value: f64,
        /// Maximum.
        max: f64,
    },
    /// Per-node progress snapshot (`data` verbatim).
    ProgressState {
        /// Prompt.
        prompt_id: Option<String>,
        /// The whole `data` object.
        data: Value,
    },
    /// An output node produced UI output.
    Executed {
        /// Prompt.
        prompt_id: Option<String>,
        /// Node id.
        node: String,
        /// Display node id.
        display_node: Option<String>,
        /// UI output (`null` for a cached node without UI output).
        output: Value,
    },
    /// The prompt succeeded.
    ExecutionSuccess {
        /// Prompt.
        prompt_id: Option<String>,
    },
    /// The prompt failed. Never an `ExecutionBlocked` error: that one is not terminal and is parsed as
    /// [`ServerMessage::Other`] with kind `execution_error` (a prompt's stream gets it as
    /// [`PromptEvent::Other`]).
    ExecutionError {
        /// Prompt.
        prompt_id: Option<String>,
        /// The error.
        error: ExecutionError,
    },
    /// The prompt was interrupted.
    ExecutionInterrupted {
        /// Prompt.
        prompt_id: Option<String>,
        /// Interrupted node.
        node_id: Option<String>,
        /// Its class.
        node_type: Option<String>,
    },
    /// Server log lines (only to subscribed clients).
    Logs(Value),
    /// Any other type (`display_component`, custom nodes' messages, 0.38's `assets.seed.*` broadcasts, a
    /// non-terminal `execution_error` with `ExecutionBlocked`), verbatim.
    Other {
        /// `type`.
        kind: String,
        /// `data.prompt_id`, when present.
        prompt_id: Option<String>,
        /// `data`.
        data: Value,
    },
    /// Binary type 1: an image preview without metadata (attributed to the running prompt).
    Preview {
        /// `image/jpeg` or `image/png`.
        mime: String,
        /// The encoded image.
        data: Bytes,
    },
    /// Binary type 4: an image preview with its prompt and node.
    PreviewWithMetadata {
        /// Prompt.
        prompt_id: Option<String>,
        /// `display_node_id`, else `node_id`.
        node: Option<String>,
        /// `image_type`.
        mime: String,
        /// The encoded image.
        data: Bytes,
    },
    /// Binary type 3: a node's progress text (broadcast by ComfyUI; attributed to the running prompt).
    Text {
        /// Node id.
        node: String,
        /// Text.
        text: String,
    },
}

fn opt_str(data: &Value, key: &str) -> Option<String> {
    match data.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl ServerMessage {
    /// Parses a text frame.
    ///
    /// # Errors
    /// `Protocol` when the frame is not `{"type": <string>, "data": ...}` JSON.
    pub fn parse_text(text: &str) -> Result<Self, ComfyError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ComfyError::Protocol(format!("websocket text is not JSON: {e}")))?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| ComfyError::Protocol("websocket message without a string `type`".to_owned()))?
            .to_owned();
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        let pid = opt_str(&data, "prompt_id");
        Ok(match kind.as_str() {
            "status" => Self::Status {
                queue_remaining: data.pointer("/status/exec_info/queue_remaining").and_then(Value::as_u64),
                sid: opt_str(&data, "sid"),
            },
            "feature_flags" => Self::FeatureFlags(data),
            "execution_start" => Self::ExecutionStart { prompt_id: pid },
            "execution_cached" => Self::ExecutionCached {
                prompt_id: pid,
                nodes: data
                    .get("nodes")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
            },
            "executing" => Self::Executing {
                prompt_id: pid,
                node: opt_str(&data, "node"),
                display_node: opt_str(&data, "display_node"),
            },
            "progress" => Self::Progress {
                prompt_id: pid,
                node: opt_str(&data, "node").unwrap_or_default(),
                value: data.get("value").and_then(Value::as_f64).unwrap_or(0.0),
                max: data.get("max").and_then(Value::as_f64).unwrap_or(0.0),
            },
            "progress_state" => Self::ProgressState { prompt_id: pid, data },
            "executed" => Self::Executed {
                prompt_id: pid,
                node: opt_str(&data, "node").unwrap_or_default(),
                display_node: opt_str(&data, "display_node"),
                output: data.get("output").cloned().unwrap_or(Value::Null),
            },
            "execution_success" => Self::ExecutionSuccess { prompt_id: pid },
            // An `ExecutionBlocker` reached a node: ComfyUI reports it as an error but goes on and ends the
            // prompt with `execution_success`. Not terminal, so it travels as a message of its own kind.
            "execution_error"
                if data.get("exception_type").and_then(Value::as_str) == Some("ExecutionBlocked") =>
            {
                Self::Other { kind, prompt_id: pid, data }
            }
            "execution_error" => {
                Self::ExecutionError { prompt_id: pid, error: ExecutionError::from_data(&data) }
            }
            "execution_interrupted" => Self::ExecutionInterrupted {
                prompt_id: pid,
                node_id: opt_str(&data, "node_id"),
                node_type: opt_str(&data, "node_type"),
            },
            "logs" => Self::Logs(data),
            _ => Self::Other { kind, prompt_id: pid, data },
        })
    }

    /// Parses a binary frame.
    ///
    /// # Errors
    /// `Protocol` for a frame too short for its header, an unknown event type or bad metadata.
    pub fn parse_binary(frame: &Bytes) -> Result<Self, ComfyError> {
        let u32_at = |at: usize| -> Result<u32, ComfyError> {
            frame
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| {
                    ComfyError::Protocol(format!("binary frame of {} bytes is too short", frame.len()))
                })
        };
        match u32_at(0)? {
            1 => {
                let mime = match u32_at(4)? {
                    1 => "image/jpeg",
                    2 => "image/png",
                    other => {
                        return Err(ComfyError::Protocol(format!("unknown preview image format {other}")));
                    }
                };
                Ok(Self::Preview { mime: mime.to_owned(), data: frame.slice(8..) })
            }
            3 => {
                let len = u32_at(4)? as usize;
                let node = frame
                    .get(8..8 + len)
                    .ok_or_else(|| ComfyError::Protocol("text frame shorter than its node id".to_owned()))?;
                Ok(Self::Text {
                    node: String::from_utf8_lossy(node).into_owned(),
                    text: String::from_utf8_lossy(&frame[8 + len..]).into_owned(),
                })
            }
            4 => {
                let len = u32_at(4)? as usize;
                let meta = frame.get(8..8 + len).ok_or_else(|| {
                    ComfyError::Protocol("preview frame shorter than its metadata".to_owned())
                })?;
                let meta: Value = serde_json::from_slice(meta)
                    .map_err(|e| ComfyError::Protocol(format!("preview metadata is not JSON: {e}")))?;
                Ok(Self::PreviewWithMetadata {
                    prompt_id: opt_str(&meta, "prompt_id"),
                    node: opt_str(&meta, "display_node_id").or_else(|| opt_str(&meta, "node_id")),
                    mime: opt_str(&meta, "image_type").unwrap_or_else(|| "image/png".to_owned()),
                    data: frame.slice(8 + len..),
                })
            }
            other => Err(ComfyError::Protocol(format!("unknown binary event type {other}"))),
        }
    }
}

/// Something that happened to one prompt. Exactly one terminal event (`Succeeded`, `Failed`,
/// `Interrupted`, `Lost`) ends each prompt's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptEvent {
    /// The prompt started running.
    ExecutionStart,
    /// Nodes served from cache (`[]` on a first run).
    Cached {
        /// Node ids.
        nodes: Vec<String>,
    },
    /// A node started.
    Executing {
        /// Node id.
        node: String,
        /// Display node id.
        display_node: Option<String>,
    },
    /// Progress of a node.
    Progress {
        /// Node id.
        node: String,
        /// Current value.
        value: f64,
        /// Maximum.
        max: f64,
    },
    /// ComfyUI's per-node progress snapshot, verbatim.
    ProgressState {
        /// The `progress_state` data.
        data: Value,
    },
    /// An output node's UI output (files to download are listed in it; see [`super::FileRef::from_output`]).
    Executed {
        /// Node id.
        node: String,
        /// Display node id.
        display_node: Option<String>,
        /// UI output.
        output: Value,
    },
    /// An image preview. For legacy (type 1) frames `node` is the node executing at the time.
    Preview {
        /// Node id when known.
        node: Option<String>,
        /// `image/png` or `image/jpeg`.
        mime: String,
        /// Encoded image.
        data: Bytes,
    },
    /// A node's progress text (binary type 3).
    Text {
        /// Node id.
        node: String,
        /// Text.
        text: String,
    },
    /// A message type this client does not model, verbatim.
    Other {
        /// `type`.
        kind: String,
        /// `data`.
        data: Value,
    },
    /// Terminal: finished successfully (every output was delivered as `Executed` before).
    Succeeded,
    /// Terminal: a node raised.
    Failed(ExecutionError),
    /// Terminal: interrupted.
    Interrupted {
        /// Node that was interrupted.
        node_id: Option<String>,
        /// Its class.
        node_type: Option<String>,
    },
    /// Terminal: the server no longer knows the prompt (not queued, not in history): it restarted, or the
    /// process died without reporting an error.
    Lost {
        /// Why we concluded so.
        reason: String,
    },
}

impl PromptEvent {
    /// True for the four terminal variants.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed(_) | Self::Interrupted { .. } | Self::Lost { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Samples copied from the traces in shared/reference/comfyui/traces.
    #[test]
    fn text_messages_from_traces() {
        let m = ServerMessage::parse_text(r#"{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "x-d2aa367a13a2"}}"#).unwrap();
        assert_eq!(m, ServerMessage::Status { queue_remaining: Some(0), sid: Some("x-d2aa367a13a2".into()) });
        let m = ServerMessage::parse_text(r#"{"type": "executing", "data": {"node": "10"}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Executing { prompt_id: None, node: Some("10".into()), display_node: None }
        );
        let m = ServerMessage::parse_text(
            r#"{"type": "executing", "data": {"node": null, "prompt_id": "f8bc"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::Executing { prompt_id: Some("f8bc".into()), node: None, display_node: None }
        );
        let m = ServerMessage::parse_text(
            r#"{"type": "progress", "data": {"value": 0, "max": 3, "prompt_id": "p", "node": "2"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::Progress { prompt_id: Some("p".into()), node: "2".into(), value: 0.0, max: 3.0 }
        );
        let m = ServerMessage::parse_text(r#"{"type": "execution_cached", "data": {"nodes": ["1", "2"], "prompt_id": "p", "timestamp": 1}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::ExecutionCached {
                prompt_id: Some("p".into()),
                nodes: vec!["1".into(), "2".into()]
            }
        );
        let m = ServerMessage::parse_text(r#"{"type": "executed", "data": {"node": "3", "display_node": "3", "output": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}, "prompt_id": "p"}}"#).unwrap();
        assert!(matches!(m, ServerMessage::Executed { ref node, .. } if node == "3"));
        let m = ServerMessage::parse_text(r#"{"type": "execution_error", "data": {"prompt_id": "p", "node_id": "1", "node_type": "LoadImage", "executed": [], "exception_message": "cannot identify image file\n", "exception_type": "PIL.UnidentifiedImageError", "traceback": ["  File a", "  File b"], "current_inputs": {}, "current_outputs": ["2"], "timestamp": 1}}"#).unwrap();
        let ServerMessage::ExecutionError { prompt_id, error } = m else { panic!() };
        assert_eq!(prompt_id.as_deref(), Some("p"));
        assert_eq!(error.exception_type, "PIL.UnidentifiedImageError");
        assert_eq!(error.traceback.len(), 2);
        let m = ServerMessage::parse_text(r#"{"type": "execution_interrupted", "data": {"prompt_id": "p", "node_id": "11", "node_type": "ImageBlur", "executed": ["1", "10"], "timestamp": 1}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::ExecutionInterrupted {
                prompt_id: Some("p".into()),
                node_id: Some("11".into()),
                node_type: Some("ImageBlur".into())
            }
        );
        let m = ServerMessage::parse_text(
            r#"{"type": "logs", "data": {"entries": [{"t": "x", "m": "got prompt\n"}], "size": null}}"#,
        )
        .unwrap();
        assert!(matches!(m, ServerMessage::Logs(_)));
        let m = ServerMessage::parse_text(r#"{"type": "display_component", "data": {"node_id": "4", "component": "ChatHistoryWidget", "props": {}}}"#).unwrap();
        assert!(
            matches!(m, ServerMessage::Other { ref kind, prompt_id: None, .. } if kind == "display_component")
        );
        let blocked = r#"{"type": "execution_error", "data": {"prompt_id": "p", "node_id": "3", "node_type": "ImageBlur", "executed": ["1"], "exception_message": "Execution Blocked: off", "exception_type": "ExecutionBlocked", "traceback": [], "current_inputs": [], "current_outputs": []}}"#;
        assert!(matches!(ServerMessage::parse_text(blocked).unwrap(),
            ServerMessage::Other { ref kind, prompt_id: Some(ref p), .. } if kind == "execution_error" && p == "p"));
        let seed = r#"{"type": "assets.seed.started", "data": {"roots": ["models"], "total": 1}}"#;
        assert!(matches!(
            ServerMessage::parse_text(seed).unwrap(),
            ServerMessage::Other { prompt_id: None, .. }
        ));
        assert!(ServerMessage::parse_text("not json at all").is_err());
        assert!(ServerMessage::parse_text(r#"{"data": {}}"#).is_err());
    }

    #[test]
    fn binary_frames() {
        let png = [0x89u8, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
        let mut f1 = vec![0, 0, 0, 1, 0, 0, 0, 2];
        f1.extend_from_slice(&png);
        let m = ServerMessage::parse_binary(&Bytes::from(f1)).unwrap();
        assert_eq!(
            m,
            ServerMessage::Preview { mime: "image/png".into(), data: Bytes::copy_from_slice(&png) }
        );

        let mut f3 = vec![0, 0, 0, 3, 0, 0, 0, 1, b'2'];
        f3.extend_from_slice(b"width: 67, height: 30\n batch size: 2");
        let m = ServerMessage::parse_binary(&Bytes::from(f3)).unwrap();
        assert_eq!(
            m,
            ServerMessage::Text { node: "2".into(), text: "width: 67, height: 30\n batch size: 2".into() }
        );

        let meta = br#"{"node_id": "2", "prompt_id": "b270", "display_node_id": "2", "parent_node_id": null, "real_node_id": "2", "image_type": "image/png"}"#;
        let mut f4 = vec![0, 0, 0, 4];
        f4.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        f4.extend_from_slice(meta);
        f4.extend_from_slice(&png);
        let m = ServerMessage::parse_binary(&Bytes::from(f4)).unwrap();
        assert_eq!(
            m,
            ServerMessage::PreviewWithMetadata {
                prompt_id: Some("b270".into()),
                node: Some("2".into()),
                mime: "image/png".into(),
                data: Bytes::copy_from_slice(&png)
            }
        );
        assert!(ServerMessage::parse_binary(&Bytes::from_static(&[0, 0, 0, 9, 0, 0, 0, 0])).is_err());
        assert!(ServerMessage::parse_binary(&Bytes::from_static(&[0, 0])).is_err());
        assert!(ServerMessage::parse_binary(&Bytes::from_static(&[0, 0, 0, 4, 0, 0, 0, 50, b'{'])).is_err());
    }
}
