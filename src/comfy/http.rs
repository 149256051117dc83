//! `ComfyClient`: ComfyUI's HTTP API (upload, queue, history, view, interrupt, info routes, the jobs API)
//! with timeouts, retry classification and capped exponential backoff with jitter; a submit that cannot
//! queue a prompt twice; the cancel primitives.
//!
//! Owns one `reqwest::Client` per server (every request says `Comfy-Usage-Source: comfyrelay`) and the
//! caches (object_info, [`Capabilities`]). Knows nothing about the WebSocket session or routing. Never logs
//! a URL that can carry credentials: errors and logs name the request path only.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OnceCell;
use url::Url;

use super::capabilities::{Capabilities, Features};
use super::error::{ComfyError, NodeError, SubmitFailure, parse_node_errors};
use super::sniff::{SIGNATURE_LEN, Sniffer};
use super::types::{
    CancelOutcome, ClientOptions, Downloaded, DroppedOutput, FileRef, FoundPrompt, HistoryEntry,
    HistoryStatus, PromptState, QueuePrompt, QueueSnapshot, QueuedPrompt, UploadedFile, outputs_list,
    queue_item,
};

/// The `Comfy-Usage-Source` header value (0.38 records it as `extra_data.comfy_usage_source`).
pub(crate) const USAGE_SOURCE: &str = "comfyrelay";

/// Checks a prompt id is in the form ComfyUI 0.38 accepts (`validate_job_id`: `str(uuid.UUID(v)) == v`, a
/// canonical lowercase hyphenated UUID). comfyrelay's job ids (UUIDv7, `Uuid::to_string`) are.
///
/// # Errors
/// `InvalidPromptId` for anything else (uppercase, braces, no hyphens, not a UUID).
pub fn check_prompt_id(prompt_id: &str) -> Result<(), ComfyError> {
    match uuid::Uuid::parse_str(prompt_id) {
        Ok(u) if u.hyphenated().to_string() == prompt_id => Ok(()),
        _ => Err(ComfyError::InvalidPromptId(prompt_id.chars().take(64).collect())),
    }
}

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
    /// The detected capabilities; `None` until detected and after a reconnect. A std mutex: held only to
    /// read or swap the `Arc`.
    capabilities: Mutex<Option<Arc<Capabilities>>>,
    /// Serialises detection, so concurrent callers share one round of requests.
    detecting: tokio::sync::Mutex<()>,
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
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("comfy-usage-source", reqwest::header::HeaderValue::from_static(USAGE_SOURCE));
        let http = reqwest::Client::builder()
            .default_headers(headers)
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
                capabilities: Mutex::new(None),
                detecting: tokio::sync::Mutex::new(()),
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

    /// Queues a prompt with our `prompt_id` and the socket's `client_id` (`POST /prompt`), so that it can
    /// never be queued twice on this server.
    ///
    /// The id is checked first ([`check_prompt_id`]): a non-canonical one is never sent. Each failed attempt
    /// is classified ([`ComfyError::submit_failure`]): a refusal is returned at once; an attempt that never
    /// reached ComfyUI is repeated; one whose answer was lost (timeout, cut connection, 5xx) makes every
    /// later attempt first look the id up ([`ComfyClient::find_prompt`]: the jobs API where present, else
    /// `/queue` then `/history`), because ComfyUI queues a repeated id again. Found: the prompt is reported
    /// queued (`recovered: true`) without sending it again. Attempts and delays follow the client's backoff.
    ///
    /// The one window left: a server that enqueues *after* the client gave up and after the lookup ran.
    ///
    /// # Errors
    /// `InvalidPromptId`; `Validation` for HTTP 400 (typed node errors); `Unconfirmed` when the answer was
    /// lost and no lookup could tell, within the retries, whether it was queued; otherwise the last error
    /// (`Server`, `Forbidden`, `Transport`, `Timeout`, `Protocol`).
    pub async fn queue_prompt(&self, req: &QueuePrompt) -> Result<QueuedPrompt, ComfyError> {
        check_prompt_id(&req.prompt_id)?;
        let op = "POST /prompt";
        let body = json!({"prompt": req.graph, "client_id": req.client_id, "prompt_id": req.prompt_id});
        let mut delays = self.backoff().build();
        let mut answer_lost = false;
        loop {
            let lookup = if answer_lost { self.recover_submitted(req).await } else { Ok(None) };
            let e = match lookup {
                Ok(Some(queued)) => return Ok(queued),
                Ok(None) => match self.post_prompt_once(req, &body).await {
                    Ok(queued) => return Ok(queued),
                    Err(e) => match e.submit_failure() {
                        // The server answered: not queued, and it will not be.
                        SubmitFailure::Refused => return Err(e),
                        SubmitFailure::AnswerLost => {
                            answer_lost = true;
                            e
                        }
                        SubmitFailure::NotSent => e,
                    },
                },
                // Still unknown: never send again without an answer.
                Err(e) => e,
            };
            let Some(delay) = delays.next() else {
                return Err(if answer_lost {
                    ComfyError::Unconfirmed { prompt_id: req.prompt_id.clone(), cause: Box::new(e) }
                } else {
                    e
                });
            };
            tracing::debug!(operation = op, error = %e, answer_lost, ?delay, "retrying POST /prompt");
            tokio::time::sleep(delay).await;
        }
    }

    /// One `POST /prompt`; the answer checked and turned into a [`QueuedPrompt`].
    async fn post_prompt_once(&self, req: &QueuePrompt, body: &Value) -> Result<QueuedPrompt, ComfyError> {
        let bytes = self.call(Method::POST, &["prompt"], &[], Body::Json(body.clone())).await?;
        let v = parse_json("POST /prompt", &bytes)?;
        let prompt_id = v.get("prompt_id").and_then(Value::as_str).unwrap_or(&req.prompt_id).to_owned();
        if prompt_id != req.prompt_id {
            // An old ComfyUI that ignores client-chosen ids: its events could never be routed to us, so
            // take the prompt back out (best effort) rather than leave it running unobserved.
            if let Err(e) = self.cancel_prompt(&prompt_id).await {
                tracing::warn!(error = %e, "could not withdraw a prompt queued under a server-chosen id");
            }
            return Err(ComfyError::Protocol(format!(
                "ComfyUI queued the prompt as {prompt_id} instead of {} (server ignores client prompt ids)",
                req.prompt_id
            )));
        }
        let node_errors = v.get("node_errors").map(parse_node_errors).unwrap_or_default();
        Ok(QueuedPrompt {
            prompt_id,
            number: v.get("number").and_then(Value::as_f64).unwrap_or(f64::NAN),
            dropped_outputs: dropped_from_errors(&req.graph, &node_errors),
            node_errors,
            recovered: false,
        })
    }

    /// After a lost answer: the prompt as ComfyUI holds it, if it does.
    async fn recover_submitted(&self, req: &QueuePrompt) -> Result<Option<QueuedPrompt>, ComfyError> {
        let Some(found) = self.find_prompt(&req.prompt_id).await? else { return Ok(None) };
        tracing::info!(prompt_id = %req.prompt_id, state = ?found.state, "an earlier POST /prompt attempt had queued it; not sending it again");
        let dropped_outputs = match &found.outputs_to_execute {
            Some(run) => self.dropped_from_plan(&req.graph, run).await,
            None => Vec::new(),
        };
        Ok(Some(QueuedPrompt {
            prompt_id: req.prompt_id.clone(),
            number: found.number,
            node_errors: Vec::new(),
            dropped_outputs,
            recovered: true,
        }))
    }

    /// The graph's output nodes (by `/object_info`) that ComfyUI does not run. Empty when `/object_info` is
    /// unreadable (then nothing is known to be dropped).
    async fn dropped_from_plan(&self, graph: &Value, run: &[String]) -> Vec<DroppedOutput> {
        let Ok(info) = self.object_info().await else { return Vec::new() };
        let mut out: Vec<DroppedOutput> = graph
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(id, node)| {
                let class_type = node.get("class_type").and_then(Value::as_str)?.to_owned();
                let output_node = info.get(&class_type).and_then(|c| c.get("output_node"));
                (output_node == Some(&Value::Bool(true)) && !run.contains(id)).then(|| DroppedOutput {
                    node_id: id.clone(),
                    class_type,
                    errors: Vec::new(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Looks a prompt up: with the jobs API `GET /api/jobs/{id}` (404: unknown), else `/queue` then
    /// `/history/{id}` (a prompt finishing between the two reads is in the second). The outputs ComfyUI runs
    /// for it are read from the queue or history entry. One attempt per request (callers retry).
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout`, `Protocol`, and any error of capability detection.
    pub async fn find_prompt(&self, prompt_id: &str) -> Result<Option<FoundPrompt>, ComfyError> {
        if self.capabilities().await?.jobs_api {
            let Some(job) = self.job_once(prompt_id).await? else { return Ok(None) };
            let state = job_state(prompt_id, &job)?;
            let number = job.get("priority").and_then(Value::as_f64).unwrap_or(f64::NAN);
            // The detail omits `outputs_to_execute`; the queue or history entry has it (best effort).
            let outputs_to_execute =
                self.legacy_find(prompt_id).await.ok().flatten().and_then(|f| f.outputs_to_execute);
            return Ok(Some(FoundPrompt { number, state, outputs_to_execute }));
        }
        self.legacy_find(prompt_id).await
    }

    async fn legacy_find(&self, prompt_id: &str) -> Result<Option<FoundPrompt>, ComfyError> {
        let q = self.call(Method::GET, &["queue"], &[], Body::Empty).await?;
        let q = parse_json("GET /queue", &q)?;
        if let Some((number, outputs_to_execute, running)) = queue_item(&q, prompt_id) {
            let state = if running { PromptState::Running } else { PromptState::Pending };
            return Ok(Some(FoundPrompt { number, state, outputs_to_execute }));
        }
        let h = self.call(Method::GET, &["history", prompt_id], &[], Body::Empty).await?;
        let h = parse_json("GET /history", &h)?;
        let Some(entry) = h.get(prompt_id) else { return Ok(None) };
        let parsed = HistoryEntry::parse(prompt_id, entry)?;
        let state = match parsed.status {
            HistoryStatus::Incomplete => PromptState::Running,
            status => PromptState::Finished(status),
        };
        Ok(Some(FoundPrompt {
            number: entry.pointer("/prompt/0").and_then(Value::as_f64).unwrap_or(f64::NAN),
            state,
            outputs_to_execute: outputs_list(entry.pointer("/prompt/4")),
        }))
    }

    /// Where ComfyUI has the prompt now (jobs API, else `/queue` then `/history`), retried like other reads.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol`.
    pub async fn prompt_state(&self, prompt_id: &str) -> Result<PromptState, ComfyError> {
        self.retrying("prompt state", || async {
            Ok(self.find_prompt(prompt_id).await?.map_or(PromptState::Unknown, |f| f.state))
        })
        .await
    }

    /// Whether the prompt is the one ComfyUI is executing right now.
    ///
    /// # Errors
    /// As [`ComfyClient::prompt_state`].
    pub async fn is_running(&self, prompt_id: &str) -> Result<bool, ComfyError> {
        Ok(self.prompt_state(prompt_id).await? == PromptState::Running)
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

    /// Cancels one prompt, wherever it is: the first step of a cancel escalation (see the module docs of
    /// [`super`]).
    ///
    /// With the jobs API: `POST /api/jobs/{id}/cancel`, which dequeues a pending prompt or interrupts it
    /// only if it is still the running one, atomically on the server. Without: like ComfyUI's own
    /// `cancel_job` on the old routes: a pending prompt is deleted from the queue (`POST /queue {delete}`);
    /// a running one (or one that started meanwhile) gets `POST /interrupt {prompt_id}`, which ComfyUI
    /// applies only if that prompt is running, though check-then-act: a prompt that ends in between can
    /// pass the interrupt on to the next one.
    ///
    /// Never affects other prompts' places in the queue. [`CancelOutcome::Interrupted`] means only that an
    /// interrupt was signalled: ComfyUI honours it between steps, so a node that ignores it keeps running.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Rejected`, `Protocol`.
    pub async fn cancel_prompt(&self, prompt_id: &str) -> Result<CancelOutcome, ComfyError> {
        if self.capabilities().await?.jobs_api {
            let segments = ["api", "jobs", prompt_id, "cancel"];
            let answer = self
                .retrying("POST /api/jobs/{id}/cancel", || async {
                    let bytes = self.call(Method::POST, &segments, &[], Body::Empty).await?;
                    parse_json("POST /api/jobs/{id}/cancel", &bytes)
                })
                .await?;
            if answer.get("cancelled").and_then(Value::as_bool) != Some(true) {
                return Ok(CancelOutcome::NotActive);
            }
            // Dispatched: a dequeued prompt is gone from everywhere; an interrupted one is running or ended.
            return Ok(match self.prompt_state(prompt_id).await? {
                PromptState::Unknown | PromptState::Pending => CancelOutcome::Dequeued,
                PromptState::Running | PromptState::Finished(_) => CancelOutcome::Interrupted,
            });
        }
        let before = self.queue().await?;
        if before.running.iter().any(|p| p == prompt_id) {
            self.interrupt(prompt_id).await?;
            return Ok(CancelOutcome::Interrupted);
        }
        if !before.pending.iter().any(|p| p == prompt_id) {
            return Ok(CancelOutcome::NotActive);
        }
        self.delete_pending(&[prompt_id.to_owned()]).await?;
        let after = self.queue().await?;
        if after.running.iter().any(|p| p == prompt_id) {
            // It left the pending queue by starting: interrupt it instead.
            self.interrupt(prompt_id).await?;
            return Ok(CancelOutcome::Interrupted);
        }
        Ok(CancelOutcome::Dequeued)
    }

    /// Same as [`ComfyClient::cancel_prompt`] (kept for callers that only need it done).
    ///
    /// # Errors
    /// As [`ComfyClient::cancel_prompt`].
    pub async fn cancel(&self, prompt_id: &str) -> Result<(), ComfyError> {
        self.cancel_prompt(prompt_id).await.map(drop)
    }

    /// `POST /free {"unload_models": true, "free_memory": true}`: asks ComfyUI to unload every model and
    /// free cached memory. Stock ComfyUI applies it when the worker is next between prompts; a node stuck
    /// moving weights is released by it.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Rejected`.
    pub async fn free_memory(&self) -> Result<(), ComfyError> {
        let body = json!({"unload_models": true, "free_memory": true});
        self.retrying("POST /free", || self.call(Method::POST, &["free"], &[], Body::Json(body.clone())))
            .await
            .map(drop)
    }

    /// The second step of a cancel escalation: [`ComfyClient::free_memory`], then
    /// [`ComfyClient::cancel_prompt`] again (an interrupt the stuck node ignored the first time is then
    /// signalled anew, after the free).
    ///
    /// # Errors
    /// As [`ComfyClient::free_memory`] and [`ComfyClient::cancel_prompt`].
    pub async fn free_and_interrupt(&self, prompt_id: &str) -> Result<CancelOutcome, ComfyError> {
        self.free_memory().await?;
        self.cancel_prompt(prompt_id).await
    }

    /// What this server can do (version, `/features`, the jobs API), detected on first use and kept until
    /// [`ComfyClient::invalidate_capabilities`] (the connection calls it on every new socket). Failures are
    /// not cached.
    ///
    /// # Errors
    /// `Server`, `Transport`, `Timeout` (after retries), `Protocol` while detecting.
    pub async fn capabilities(&self) -> Result<Arc<Capabilities>, ComfyError> {
        if let Some(c) = self.cached_capabilities() {
            return Ok(c);
        }
        let _one_at_a_time = self.inner.detecting.lock().await;
        if let Some(c) = self.cached_capabilities() {
            return Ok(c);
        }
        let features = match self.get_json(&["features"], &[]).await {
            Ok(v) => Features::parse(&v),
            // An old build without the route.
            Err(ComfyError::NotFound { .. }) => Features::default(),
            Err(e) => return Err(e),
        };
        let comfyui_version = match self.get_json(&["system_stats"], &[]).await {
            Ok(v) => Capabilities::version_of(&v),
            Err(ComfyError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let jobs_api = match self.get_json(&["api", "jobs"], &[("limit", "1")]).await {
            Ok(_) => true,
            Err(ComfyError::NotFound { .. } | ComfyError::Rejected { .. } | ComfyError::Protocol(_)) => false,
            Err(e) => return Err(e),
        };
        let caps = Arc::new(Capabilities { comfyui_version, features, jobs_api });
        tracing::debug!(version = ?caps.comfyui_version, jobs_api, "ComfyUI capabilities detected");
        *self.inner.capabilities.lock().unwrap_or_else(|p| p.into_inner()) = Some(caps.clone());
        Ok(caps)
    }

    /// The capabilities detected so far, without any request.
    pub fn cached_capabilities(&self) -> Option<Arc<Capabilities>> {
        self.inner.capabilities.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the detected capabilities (the server may have been replaced): the next use detects again.
    pub fn invalidate_capabilities(&self) {
        *self.inner.capabilities.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the server has the newer `/api/jobs` routes (from [`ComfyClient::capabilities`]).
    ///
    /// # Errors
    /// As [`ComfyClient::capabilities`].
    pub async fn has_jobs_api(&self) -> Result<bool, ComfyError> {
        Ok(self.capabilities().await?.jobs_api)
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
        self.retrying("GET /api/jobs/{id}", || self.job_once(prompt_id)).await
    }

    /// One `GET /api/jobs/{id}`; 404 is `None`.
    pub(crate) async fn job_once(&self, prompt_id: &str) -> Result<Option<Value>, ComfyError> {
        match self.call(Method::GET, &["api", "jobs", prompt_id], &[], Body::Empty).await {
            Ok(bytes) => parse_json("GET /api/jobs/{id}", &bytes).map(Some),
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

/// A job's `status` from `/api/jobs/{id}` as a [`PromptState`].
pub(crate) fn job_state(prompt_id: &str, job: &Value) -> Result<PromptState, ComfyError> {
    Ok(match job.get("status").and_then(Value::as_str) {
        Some("pending") => PromptState::Pending,
        Some("in_progress") => PromptState::Running,
        _ => match HistoryEntry::from_job(prompt_id, job)? {
            Some(entry) => PromptState::Finished(entry.status),
            None => PromptState::Running,
        },
    })
}

/// The output nodes ComfyUI's `node_errors` say will not run, with the errors that dropped each.
fn dropped_from_errors(graph: &Value, node_errors: &[NodeError]) -> Vec<DroppedOutput> {
    let mut ids: Vec<&String> = node_errors.iter().flat_map(|e| &e.dependent_outputs).collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .map(|id| DroppedOutput {
            node_id: id.clone(),
            class_type: graph
                .get(id)
                .and_then(|n| n.get("class_type"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            errors: node_errors.iter().filter(|e| e.dependent_outputs.contains(id)).cloned().collect(),
        })
        .collect()
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
