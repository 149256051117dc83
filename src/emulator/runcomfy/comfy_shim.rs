//! TEMPORARY stand-in for `crate::emulator::comfyui` until branch `emu-comfyui` is merged: serves only
//! `GET /system_stats`, with the same start/url/shutdown surface (INTERFACES.md A).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

/// Options (none needed by the stand-in).
#[derive(Debug, Clone, Default)]
pub struct EmulatorConfig {}

/// A running stand-in server.
#[derive(Debug, Clone)]
pub struct ComfyEmulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

impl ComfyEmulator {
    /// Serves on `listener`.
    pub async fn start(listener: TcpListener, _config: EmulatorConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/system_stats",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({"system": {"comfyui_version": "0.3.64"}}))
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { inner: Arc::new(Inner { addr, task: Mutex::new(Some(task)) }) })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Stops serving.
    pub async fn shutdown(&self) {
        let task = self.inner.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }
}
