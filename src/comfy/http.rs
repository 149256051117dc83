//! `ComfyClient`: ComfyUI's HTTP API (upload, queue, history, view, interrupt, info routes) with
//! timeouts, retry classification and capped exponential backoff with jitter.
//!
//! Owns one `reqwest::Client` per server and the caches (object_info, `/api/jobs` detection). Knows
//! nothing about the WebSocket session or routing. Never logs a URL that can carry credentials: errors and
//! logs name the request path only.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OnceCell;
use url::Url;

use super::error::{ComfyError, parse_node_errors};
use super::sniff::{SIGNATURE_LEN, Sniffer};
use super::types::{
    ClientOptions, Downloaded, FileRef, HistoryEntry, QueuePrompt, QueueSnapshot, QueuedPrompt, UploadedFile,
};

/// HTTP client for one ComfyUI server. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct ComfyClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// Base URL without credentials, path ending in `/`.
    base: Url,
    /// Basic-auth credentials taken out of the configured URL.
    credentials: Option<(String, Option<String>)>,
    options: ClientOptions,
    object_info: OnceCell<Arc<Value>>,
    jobs_api: OnceCell<bool>,
}

impl fmt::Debug for ComfyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComfyClient")
            .field("base_url", &self.inner.base.as_str())
            .field("credentials", &self.inner.credentials.as_ref().map(|_| "<redacted>"))
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

enum Body {
    Empty,
    Json(Value),
    Form(reqwest::multipart::Form),
}

impl ComfyClient {
    /// Builds a client for `base_url` (`http://host:port[/prefix]`, credentials allowed as `user:pass@`).
    ///
    /// # Errors
    /// `InvalidUrl` when the URL does not parse or is not http(s); `Transport` when the TLS stack fails to
    /// initialise.
    pub fn new(base_url: &str, options: ClientOptions) -> Result<Self, ComfyError> {
        let mut base = Url::parse(base_url).map_err(|e| ComfyError::InvalidUrl(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ComfyError::InvalidUrl(format!("scheme {:?} is not http or https", base.scheme())));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(ComfyError::InvalidUrl("URL has no host".to_owned()));
        }
        let credentials = (!base.username().is_empty() || base.password().is_some())
            .then(|| (percent_decode(base.username()), base.password().map(percent_decode)));
        // Infallible for http(s) URLs with a host.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_query(None);
        base.set_fragment(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.request_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ComfyError::transport("building the HTTP client", options.request_timeout, e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                credentials,
                options,
                object_info: OnceCell::new(),
                jobs_api: OnceCell::new(),
            }),
        })
    }

    /// The server's base URL, without credentials.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    pub(crate) fn credentials(&self) -> Option<&(String, Option<String>)> {
        self.inner.credentials.as_ref()
    }

    /// `base + segments`, each segment percent-encoded.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base.clone();
        if let Ok(mut s) = url.path_segments_mut() {
            s.pop_if_empty().extend(segments);
        }
        url
    }

    fn timeout(&self) -> Duration {
        self.inner.options.request_timeout
    }

    fn backoff(&self) -> ExponentialBuilder {
        let o = &self.inner.options;
        ExponentialBuilder::default()
            .with_min_delay(o.backoff_min)
            .with_max_delay(o.backoff_max)
            .with_max_times(o.max_retries as usize)
            .with_jitter()
    }

    /// Runs `f` with retries for retryable errors.
    async fn retrying<T, F, Fut>(&self, operation: &str, f: F) -> Result<T, ComfyError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ComfyError>>,
    {
        f.retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(ComfyError::is_retryable)
            .notify(|e, delay| tracing::debug!(operation, error = %e, ?delay, "retrying ComfyUI call"))
            .await
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let mut rb = self.inner.http.request(method, url);
        if let Some((user, pass)) = &self.inner.credentials {
            rb = rb.basic_auth(user, pass.as_ref());
        }
        rb
    }

    /// One attempt: sends, reads the whole body, maps non-2xx statuses to errors.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Body,
    ) -> Result<Bytes, ComfyError> {
        let path = format!("/{}", segments.join("/"));
        let op = format!("{method} {path}");
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let t = self.timeout();
        let rb = self.request(method, url).timeout(t);
        let rb = match body {
            Body::Empty => rb,
            Body::Json(v) => rb.json(&v),
            Body::Form(form) => rb.multipart(form),
        };
        let resp = rb.send().await.map_err(|e| ComfyError::transport(&op, t, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ComfyError::transport(&op, t, e))?;
        if !status.is_success() {
            return Err(ComfyError::from_status(status.as_u16(), &path, &String::from_utf8_lossy(&bytes)));
        }
        Ok(bytes)
    }

    async fn get_json(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Value, ComfyError> {
        let op = format!("GET /{}", segments.join("/"));
        self.retrying(&op, || async {
            let bytes = self.call(Method::GET, segments, query, Body::Empty).await?;
            parse_json(&op, &bytes)
        })
        .await
    }

    /// Uploads an input image (`POST /upload/image`, type `input`, no overwrite). Identical bytes under the
    /// same name are deduplicated by ComfyUI; different bytes get a new name (`x (1).png`), which is why the
    /// answered name must be used.
    ///
    /// # Errors
    /// `Rejected` (400: bad filename/subfolder), `Server`, `Transport`, `Timeout`, `Protocol`.
    pub async fn upload_image(
        &self,
        data: Bytes,
        filename: &str,
        content_type: &str,
    ) -> Result<UploadedFile, ComfyError> {
        let op = "POST /upload/image";
        let v = self
            .retrying(op, || async {
                let part = reqwest::multipart::Part::stream(reqwest::Body::from(data.clone()))
                    .file_name(filename.to_owned())
                    .mime_str(content_type)
                    .map_err(|e| {
                        ComfyError::Protocol(format!("invalid content type {content_type:?}: {e}"))
                    })?;
                let form = reqwest::multipart::Form::new().part("image", part).text("type", "input");
                let bytes = self.call(Method::POST, &["upload", "image"], &[], Body::Form(form)).await?;
                parse_json(op, &bytes)
            })
            .await?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(UploadedFile {
            name: s("name").ok_or_else(|| ComfyError::Protocol("upload answer without `name`".to_owned()))?,
            subfolder: s("subfolder").unwrap_or_default(),
            kind: s("type").unwrap_or_else(|| "input".to_owned()),
        })
    }

    /// Queues a prompt with our `prompt_id` and the socket's `client_id` (`POST /prompt`).
    ///
    /// Safe to retry: when an attempt failed ambiguously (timeout, connection cut), the next attempt first
    /// looks the prompt id up in /queue and /history so the prompt is never queued twice.
    ///
    /// # Errors
    /// `Validation` for HTTP 400 (typed node errors), `Server` for ComfyUI's plain-text 500 (after
    /// retries), `Forbidden`, `Transport`, `Timeout`, `Protocol`.
    pub async fn queue_prompt(&self, req: &QueuePrompt) -> Result<QueuedPrompt, ComfyError> {
        let op = "POST /prompt";
        let body = json!({"prompt": req.graph, "client_id": req.client_id, "prompt_id": req.prompt_id});
        let uncertain = AtomicBool::new(false);
        let v = self
            .retrying(op, || async {
                if uncertain.load(Ordering::Relaxed)
                    && let Some(number) = self.locate(&req.prompt_id).await? {
                        tracing::debug!(prompt_id = %req.prompt_id, "an earlier POST /prompt attempt had queued it");
                        return Ok(json!({"prompt_id": req.prompt_id, "number": number, "node_errors": {}}));
                    }
                match self.call(Method::POST, &["prompt"], &[], Body::Json(body.clone())).await {
                    Ok(bytes) => parse_json(op, &bytes),
                    Err(e) => {
                        if e.is_ambiguous() {
                            uncertain.store(true, Ordering::Relaxed);
                        }
                        Err(e)
                    }
                }
            })
            .await?;
        let prompt_id = v.get("prompt_id").and_then(Value::as_str).unwrap_or(&req.prompt_id).to_owned();
        if prompt_id != req.prompt_id {
            // An old ComfyUI that ignores client-chosen ids: its events could never be routed to us, so
            // take the prompt back out (best effort) rather than leave it running unobserved.
            if let Err(e) = self.cancel(&prompt_id).await {
                tracing::warn!(error = %e, "could not withdraw a prompt queued under a server-chosen id");
            }
            return Err(ComfyError::Protocol(format!(
                "ComfyUI queued the prompt as {prompt_id} instead of {} (server ignores client prompt ids)",
                req.prompt_id
            )));
        }
        Ok(QueuedPrompt {
            prompt_id,
            number: v.get("number").and_then(Value::as_f64).unwrap_or(f64::NAN),
            node_errors: v.get("node_errors").map(parse_node_errors).unwrap_or_default(),
        })
    }

    /// The queue number of a prompt ComfyUI knows (queued or in history), if any.
    async fn locate(&self, prompt_id: &str) -> Result<Option<f64>, ComfyError> {
        let q = self.call(Method::GET, &["queue"], &[], Body::Empty).await?;
        let q = parse_json("GET /queue", &q)?;
        for key in ["queue_running", "queue_pending"] {
            for item in q.get(key).and_then(Value::as_array).into_iter().flatten() {
                if item.get(1).and_then(Value::as_str) == Some(prompt_id) {
                    return Ok(Some(item.get(0).and_then(Value::as_f64).unwrap_or(f64::NAN)));
                }
            }
        }
        let h = self.call(Method::GET, &["history", prompt_id], &[], Body::Empty).await?;
        let h = parse_json("GET /history", &h)?;
        Ok(h.get(prompt_id).map(|e| e.pointer("/prompt/0").and_then(Value::as_f64).unwrap_or(f64::NAN)))
    }

    /// `GET /history/{id}`: `None` when ComfyUI has no entry (not finished yet, or unknown).
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let v = self.get_json(&["history", prompt_id], &[]).await?;
        match v.get(prompt_id) {
            Some(entry) => HistoryEntry::parse(prompt_id, entry).map(Some),
            None => Ok(None),
        }
    }

    /// `GET /queue`: running and pending prompt ids.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn queue(&self) -> Result<QueueSnapshot, ComfyError> {
        QueueSnapshot::parse(&self.get_json(&["queue"], &[]).await?)
    }

    /// Streams `/view` into `sink`: checks the image signature before writing anything, hashes with sha256
    /// on the way, checks the byte count against Content-Length and reads width/height from the header.
    /// The request is retried only until the first byte is written; a failure after that is returned
    /// (retry with a fresh sink).
    ///
    /// # Errors
    /// `NotFound`, `NotAnImage`, `Truncated`, `Sink`, `Timeout` (headers or any chunk), `Transport`, `Server`.
    pub async fn download<W: AsyncWrite + Unpin + Send>(
        &self,
        file: &FileRef,
        sink: &mut W,
    ) -> Result<Downloaded, ComfyError> {
        let op = "GET /view";
        let t = self.timeout();
        let query =
            [("filename", file.filename.as_str()), ("subfolder", &file.subfolder), ("type", &file.kind)];
        let resp = self
            .retrying(op, || async {
                let mut url = self.url(&["view"]);
                url.query_pairs_mut().extend_pairs(&query);
                let fut = self.request(Method::GET, url).send();
                let resp = tokio::time::timeout(t, fut)
                    .await
                    .map_err(|_| ComfyError::Timeout { operation: op.to_owned(), after: t })?
                    .map_err(|e| ComfyError::transport(op, t, e))?;
                let status = resp.status();
                if !status.is_success() {
                    let body = resp.text().await.unwrap_or_default();
                    return Err(ComfyError::from_status(status.as_u16(), "/view", &body));
                }
                Ok(resp)
            })
            .await?;
        let expected = resp.content_length();
        let mut stream = resp.bytes_stream();
        let mut hasher = Sha256::new();
        let mut sniffer = Sniffer::default();
        let mut held: Vec<u8> = Vec::new(); // bytes held back until the signature is checked
        let mut checked = false;
        let mut size: u64 = 0;
        let not_image = |reason: String| ComfyError::NotAnImage { filename: file.filename.clone(), reason };
        loop {
            let next = tokio::time::timeout(t, stream.next())
                .await
                .map_err(|_| ComfyError::Timeout { operation: format!("{op} (body)"), after: t })?;
            let chunk = match next {
                None => break,
                Some(Err(e)) => return Err(ComfyError::transport(op, t, e)),
                Some(Ok(c)) => c,
            };
            size += chunk.len() as u64;
            hasher.update(&chunk);
            sniffer.feed(&chunk);
            if checked {
                sink.write_all(&chunk).await.map_err(ComfyError::Sink)?;
                continue;
            }
            held.extend_from_slice(&chunk);
            if held.len() >= SIGNATURE_LEN {
                sniffer.check_signature().map_err(not_image)?;
                checked = true;
                sink.write_all(&held).await.map_err(ComfyError::Sink)?;
                held = Vec::new();
            }
        }
        if expected.is_some_and(|e| e != size) {
            let expected = expected.unwrap_or_default();
            return Err(ComfyError::Truncated { filename: file.filename.clone(), expected, received: size });
        }
        if !checked {
            sniffer.check_signature().map_err(not_image)?;
            sink.write_all(&held).await.map_err(ComfyError::Sink)?;
        }
        sink.flush().await.map_err(ComfyError::Sink)?;
        let (mime, width, height) = sniffer.finish().map_err(not_image)?;
        Ok(Downloaded { size, sha256: hex::encode(hasher.finalize()), mime: mime.to_owned(), width, height })
    }

    /// Interrupts `prompt_id` if (and only if) it is the running prompt (`POST /interrupt {prompt_id}`).
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Rejected`.
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), ComfyError> {
        let body = json!({ "prompt_id": prompt_id });
        self.retrying("POST /interrupt", || {
            self.call(Method::POST, &["interrupt"], &[], Body::Json(body.clone()))
        })
        .await
        .map(drop)
    }

    /// Removes pending prompts from the queue (`POST /queue {delete}`); running or unknown ids are ignored
    /// by ComfyUI.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Rejected`.
    pub async fn delete_pending(&self, prompt_ids: &[String]) -> Result<(), ComfyError> {
        let body = json!({ "delete": prompt_ids });
        self.retrying("POST /queue", || self.call(Method::POST, &["queue"], &[], Body::Json(body.clone())))
            .await
            .map(drop)
    }

    /// Cancels a prompt wherever it is: `POST /api/jobs/{id}/cancel` when the server has the jobs API,
    /// otherwise removes it from the pending queue and interrupts it if it is running.
    ///
    /// # Errors
    /// As [`ComfyClient::delete_pending`] and [`ComfyClient::interrupt`].
    pub async fn cancel(&self, prompt_id: &str) -> Result<(), ComfyError> {
        if self.has_jobs_api().await.unwrap_or(false) {
            let segments = ["api", "jobs", prompt_id, "cancel"];
            let r = self
                .retrying("POST /api/jobs/{id}/cancel", || {
                    self.call(Method::POST, &segments, &[], Body::Empty)
                })
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(ComfyError::NotFound { .. } | ComfyError::Rejected { status: 405, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.delete_pending(&[prompt_id.to_owned()]).await?;
        self.interrupt(prompt_id).await
    }

    /// Whether the server has the newer `/api/jobs` routes (detected once with `GET /api/jobs?limit=1`;
    /// 404/405 mean no). Errors are not cached.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` during detection.
    pub async fn has_jobs_api(&self) -> Result<bool, ComfyError> {
        self.inner
            .jobs_api
            .get_or_try_init(|| async {
                match self.get_json(&["api", "jobs"], &[("limit", "1")]).await {
                    Ok(_) => Ok(true),
                    Err(
                        ComfyError::NotFound { .. } | ComfyError::Rejected { .. } | ComfyError::Protocol(_),
                    ) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await
            .copied()
    }

    /// `GET /api/jobs/{id}` when the server has the jobs API: `Ok(None)` when the route is absent or the job
    /// unknown. The answer is returned verbatim.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn job(&self, prompt_id: &str) -> Result<Option<Value>, ComfyError> {
        if !self.has_jobs_api().await? {
            return Ok(None);
        }
        match self.get_json(&["api", "jobs", prompt_id], &[]).await {
            Ok(v) => Ok(Some(v)),
            Err(ComfyError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /object_info`, fetched once and cached (failures are not cached).
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn object_info(&self) -> Result<Arc<Value>, ComfyError> {
        self.inner
            .object_info
            .get_or_try_init(|| async { self.get_json(&["object_info"], &[]).await.map(Arc::new) })
            .await
            .cloned()
    }

    /// `GET /system_stats`.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn system_stats(&self) -> Result<Value, ComfyError> {
        self.get_json(&["system_stats"], &[]).await
    }

    /// `GET /features`.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn features(&self) -> Result<Value, ComfyError> {
        self.get_json(&["features"], &[]).await
    }
}

fn parse_json(op: &str, bytes: &[u8]) -> Result<Value, ComfyError> {
    serde_json::from_slice(bytes).map_err(|e| ComfyError::Protocol(format!("{op}: answer is not JSON: {e}")))
}

fn percent_decode(s: &str) -> String {
    // Userinfo in URLs is percent-encoded; reqwest's basic auth wants the raw text.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = if bytes[i] == b'%' {
            s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        } else {
            None
        };
        if let Some(b) = escaped {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_is_normalised_and_credentials_taken_out() {
        let c =
            ComfyClient::new("https://us%40er:p%3Ass@host.example:8443/prefix?x=1", ClientOptions::default())
                .unwrap();
        assert_eq!(c.base_url().as_str(), "https://host.example:8443/prefix/");
        assert_eq!(c.credentials(), Some(&("us@er".to_owned(), Some("p:ss".to_owned()))));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("p:ss") && !dbg.contains("p%3Ass") && dbg.contains("<redacted>"));
        assert_eq!(
            c.url(&["history", "a b/c"]).as_str(),
            "https://host.example:8443/prefix/history/a%20b%2Fc"
        );
        let c = ComfyClient::new("http://127.0.0.1:8188", ClientOptions::default()).unwrap();
        assert_eq!(c.url(&["queue"]).as_str(), "http://127.0.0.1:8188/queue");
        assert!(matches!(
            ComfyClient::new("ftp://x", ClientOptions::default()),
            Err(ComfyError::InvalidUrl(_))
        ));
        assert!(matches!(ComfyClient::new("nope", ClientOptions::default()), Err(ComfyError::InvalidUrl(_))));
    }
}
