//! Test harness: an emulator on port 0, an HTTP client, and a WebSocket client that records frames.

use super::super::{ComfyEmulator, ComfyVersion, EmulatorConfig};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous bound for waiting on the emulator (it answers in milliseconds).
pub(crate) const WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn start() -> ComfyEmulator {
    start_version(ComfyVersion::V0_3_64).await
}

/// An emulator of the given generation on port 0.
pub(crate) async fn start_version(comfyui_version: ComfyVersion) -> ComfyEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = EmulatorConfig { comfyui_version, ..EmulatorConfig::default() };
    ComfyEmulator::start(listener, config).await.expect("start")
}

/// `method path` with a JSON body; returns (status, body as JSON, or the text as a JSON string).
pub(crate) async fn send_json(
    emu: &ComfyEmulator,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = http().request(method.parse().expect("method"), format!("{}{path}", emu.url()));
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("client")
}

/// A received frame.
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    Json(Value),
    Binary(Vec<u8>),
    /// The server closed the connection; `clean` is true when a close frame arrived.
    Closed {
        clean: bool,
    },
}

impl Frame {
    pub(crate) fn kind(&self) -> String {
        match self {
            Frame::Json(v) => v["type"].as_str().unwrap_or("?").to_string(),
            Frame::Binary(b) if b.len() >= 4 => {
                format!("binary{}", u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            Frame::Binary(_) => "binary?".into(),
            Frame::Closed { clean } => format!("closed(clean={clean})"),
        }
    }

    pub(crate) fn data(&self) -> &Value {
        match self {
            Frame::Json(v) => &v["data"],
            _ => &Value::Null,
        }
    }
}

pub(crate) struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub(crate) log: Vec<Frame>,
}

impl Ws {
    pub(crate) async fn connect(emu: &ComfyEmulator, client_id: Option<&str>) -> Ws {
        let url = match client_id {
            Some(id) => format!("ws://{}/ws?clientId={id}", emu.addr()),
            None => format!("ws://{}/ws", emu.addr()),
        };
        let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("ws connect");
        Ws { stream, log: Vec::new() }
    }

    pub(crate) async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("ws send");
    }

    pub(crate) async fn send_flags(&mut self) {
        self.send_text(r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true, "supports_manager_v4_ui": true}}"#)
            .await;
    }

    /// Next frame, or `None` after `timeout`.
    pub(crate) async fn next_within(&mut self, timeout: Duration) -> Option<Frame> {
        loop {
            let msg = match tokio::time::timeout(timeout, self.stream.next()).await {
                Err(_) => return None,
                Ok(m) => m,
            };
            let frame = match msg {
                None => Frame::Closed { clean: false },
                Some(Err(_)) => Frame::Closed { clean: false },
                Some(Ok(Message::Text(t))) => {
                    Frame::Json(serde_json::from_str(t.as_str()).expect("json frame"))
                }
                Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
                Some(Ok(Message::Close(_))) => Frame::Closed { clean: true },
                Some(Ok(_)) => continue,
            };
            self.log.push(frame.clone());
            return Some(frame);
        }
    }

    pub(crate) async fn next(&mut self) -> Frame {
        self.next_within(WAIT).await.expect("a frame within the wait bound")
    }

    /// Reads frames until one matches `pred` (inclusive); returns the frames read.
    pub(crate) async fn until(&mut self, pred: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let f = self.next().await;
            let done = pred(&f);
            let closed = matches!(f, Frame::Closed { .. });
            out.push(f);
            if done {
                return out;
            }
            assert!(!closed, "socket closed before the expected frame: {:?}", kinds(&out));
        }
    }

    /// Reads until `executing {node: null}` for `prompt_id`.
    pub(crate) async fn until_done(&mut self, prompt_id: &str) -> Vec<Frame> {
        let pid = prompt_id.to_string();
        self.until(move |f| {
            f.kind() == "executing" && f.data()["node"].is_null() && f.data()["prompt_id"] == pid.as_str()
        })
        .await
    }

    /// Asserts nothing arrives for `d` (used only to prove silence).
    pub(crate) async fn assert_quiet(&mut self, d: Duration) {
        if let Some(f) = self.next_within(d).await {
            panic!("expected silence, got {f:?}");
        }
    }

    /// Sends a normal close frame; the echo arrives as `Frame::Closed { clean: true }`.
    pub(crate) async fn send_close(&mut self) {
        let _ = self.stream.close(None).await;
    }

    pub(crate) async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

pub(crate) fn kinds(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(Frame::kind).collect()
}

/// POSTs `/prompt` and returns (status, body).
pub(crate) async fn post_prompt(emu: &ComfyEmulator, body: &Value) -> (u16, Value) {
    let resp = http().post(format!("{}/prompt", emu.url())).json(body).send().await.expect("post");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Uploads `bytes` as `name` to /upload/image.
pub(crate) async fn upload(emu: &ComfyEmulator, name: &str, bytes: Vec<u8>) -> Value {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_string())
        .mime_str("image/png")
        .expect("mime");
    let form = reqwest::multipart::Form::new().part("image", part);
    let resp =
        http().post(format!("{}/upload/image", emu.url())).multipart(form).send().await.expect("upload");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

pub(crate) async fn get_json(emu: &ComfyEmulator, path: &str) -> Value {
    let resp = http().get(format!("{}{path}", emu.url())).send().await.expect("get");
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.expect("json")
}

/// A small PNG with a known pattern.
pub(crate) fn test_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}
