//! The `/ws` endpoint (`websocket_handler` in server.py): registration by `clientId` (a newer socket
//! replaces an older one; an older socket's close unregisters the newer one, as in ComfyUI), the
//! `status`+`sid` greeting, `executing {node}` on reconnect mid-run, first-message `feature_flags`
//! negotiation, no pings, and fault-driven drops without a close frame. Knows the socket table
//! ([`super::state`]) but not how prompts run.

use super::ComfyVersion;
use super::state::{Outgoing, Shared, SocketEntry};
use axum::extract::ws::{Message, WebSocket};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;

/// `feature_flags.get_server_features()` of the generation.
pub(crate) fn server_features(version: ComfyVersion) -> Value {
    match version {
        ComfyVersion::V0_3_64 => json!({"supports_preview_metadata": true, "max_upload_size": 104_857_600}),
        ComfyVersion::V0_38 => json!({
            "supports_preview_metadata": true,
            "supports_model_type_tags": true,
            "max_upload_size": 104_857_600,
            "extension": {"manager": {"supports_v4": true}},
            "node_replacements": true,
            "assets": true
        }),
    }
}

/// Serves one upgraded socket until the client leaves or a fault drops it.
///
/// Exit policy: returns on client close, transport error, or the fault kill switch (then the socket is
/// dropped without a close frame). Never panics.
pub(crate) async fn serve_socket(shared: Arc<Shared>, mut socket: WebSocket, client_id: String) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let kill = shared.faults.kill_token();
    let (sid, conn_id) = {
        let mut st = shared.lock();
        let sid = if client_id.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            st.sockets.remove(&client_id);
            client_id
        };
        st.next_conn_id += 1;
        let conn_id = st.next_conn_id;
        st.sockets
            .insert(sid.clone(), SocketEntry { conn_id, tx, feature_flags: json!({}), kill: kill.clone() });
        let info = st.queue_info();
        st.send_json(&shared.faults, "status", json!({"status": info, "sid": sid}), Some(&sid));
        if st.client_id.as_deref() == Some(sid.as_str())
            && let Some(node) = st.last_node_id.clone()
        {
            st.send_json(&shared.faults, "executing", json!({"node": node}), Some(&sid));
        }
        (sid, conn_id)
    };
    tracing::debug!(%sid, conn_id, "socket registered");
    let mut silent_rx = shared.faults.silent_watch();
    let mut first_message = true;
    let mut killed = false;
    // Unregistered (replaced by a newer socket with the same clientId): stays open, gets nothing more.
    let mut registered = true;
    loop {
        let silent = *silent_rx.borrow_and_update();
        tokio::select! {
            biased;
            out = rx.recv(), if registered => {
                let Some(out) = out else {
                    registered = false;
                    continue;
                };
                let msg = match out {
                    Outgoing::Text(t) => Message::Text(t.into()),
                    Outgoing::Binary(b) => Message::Binary(b),
                };
                if socket.send(msg).await.is_err() {
                    break;
                }
            }
            () = kill.cancelled() => {
                killed = true;
                break;
            }
            changed = silent_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            incoming = socket.recv(), if !silent => {
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        handle_text(&shared, &sid, text.as_str(), &mut first_message);
                    }
                    // A close frame is echoed by the WebSocket layer on the next read.
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
    }
    let mut st = shared.lock();
    if killed {
        // A simulated crash or network drop: do not let a stale cleanup unroute a socket that
        // reconnected meanwhile.
        if st.sockets.get(&sid).is_some_and(|e| e.conn_id == conn_id) {
            st.sockets.remove(&sid);
        }
    } else {
        // ComfyUI's `finally: self.sockets.pop(sid)`: removes whatever is registered under this sid,
        // even a newer socket (the unrouting bug captured in f2).
        st.sockets.remove(&sid);
    }
    drop(st);
    // Dropping the socket closes TCP without a close frame when killed.
    drop(socket);
}

/// Only the first text message is understood, and only if it is `feature_flags`.
fn handle_text(shared: &Shared, sid: &str, text: &str, first_message: &mut bool) {
    let Ok(data) = serde_json::from_str::<Value>(text) else {
        tracing::warn!(%sid, "invalid JSON received from client");
        return;
    };
    let Some(obj) = data.as_object() else { return };
    if *first_message && obj.get("type").and_then(Value::as_str) == Some("feature_flags") {
        let flags = obj.get("data").cloned().unwrap_or_else(|| json!({}));
        let mut st = shared.lock();
        if let Some(entry) = st.sockets.get_mut(sid) {
            entry.feature_flags = flags;
            st.send_json(&shared.faults, "feature_flags", server_features(shared.version), Some(sid));
        }
    }
    *first_message = false;
}
