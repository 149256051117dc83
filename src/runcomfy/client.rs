//! The RunComfy Server API client: one account-wide rate limiter, per-request timeouts, retries that
//! honour `Retry-After`, and launches that are never blindly repeated.
//!
//! Knows the API's paths, auth and quirks; knows nothing about pools, jobs or ComfyUI itself.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::{
    Method, StatusCode,
    header::{ACCEPT, AUTHORIZATION, HeaderValue, RETRY_AFTER},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, instrument, warn};
use url::Url;

use super::{
    clock::{self, DirectLimiter},
    error::RunComfyError,
    model::{LaunchRequest, Server, ServerStatus, Timestamp, Workflow, duration_secs},
};
use crate::{
    config::{RunComfyConfig, Secret},
    telemetry::ErrorChain,
};

/// How the client talks to the API. `Default` matches the documented limits (1 request/s).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// API base URL, without the `/prod/api/...` path (`https://api.runcomfy.net` and
    /// `https://beta-api.runcomfy.net` are aliases).
    pub base_url: String,
    /// The account's user id (a UUID from the dashboard URL).
    pub user_id: String,
    /// The Bearer token. Never logged.
    pub api_token: Secret,
    /// Requests per second for the whole account (all clones of the client share one limiter).
    pub requests_per_second: u32,
    /// Requests allowed back to back before the rate applies.
    pub burst: u32,
    /// Longest time one HTTP request (send and read the body) may take.
    pub request_timeout: Duration,
    /// Longest time to establish a connection.
    pub connect_timeout: Duration,
    /// Retries of an idempotent call after transport errors, timeouts and 5xx (capped exponential backoff
    /// with jitter between `min_backoff` and `max_backoff`).
    pub max_retries: usize,
    /// First backoff delay.
    pub min_backoff: Duration,
    /// Largest backoff delay.
    pub max_backoff: Duration,
    /// 429 answers tolerated per call before giving up.
    pub max_rate_limited_retries: usize,
    /// Pause after a 429 without `Retry-After`.
    pub default_retry_after: Duration,
    /// Upper bound on a `Retry-After` the client honours.
    pub max_retry_after: Duration,
    /// A server this client launched may answer 404 for this long after launch (eventual consistency);
    /// such 404s are retried instead of reported.
    pub not_found_grace: Duration,
    /// Pause between those retries.
    pub not_found_poll: Duration,
    /// After an ambiguous launch failure, how long to keep looking in the server list for the machine
    /// before concluding it was not launched.
    pub launch_confirm_grace: Duration,
    /// Pause between those looks.
    pub launch_confirm_poll: Duration,
    /// Launch attempts (only repeated after the server list showed the previous one did not happen).
    pub max_launch_attempts: usize,
    /// Pause between status polls in [`RunComfyClient::wait_ready`].
    pub ready_poll_interval: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            base_url: "https://beta-api.runcomfy.net".into(),
            user_id: String::new(),
            api_token: Secret::default(),
            requests_per_second: 1,
            burst: 1,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_retries: 5,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_rate_limited_retries: 20,
            default_retry_after: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(120),
            not_found_grace: Duration::from_secs(30),
            not_found_poll: Duration::from_secs(2),
            launch_confirm_grace: Duration::from_secs(20),
            launch_confirm_poll: Duration::from_secs(5),
            max_launch_attempts: 3,
            ready_poll_interval: Duration::from_secs(5),
        }
    }
}

impl ClientOptions {
    /// Options from the service configuration; the rest keep their defaults.
    pub fn from_config(config: &RunComfyConfig) -> Self {
        Self {
            base_url: config.base_url.clone(),
            user_id: config.user_id.clone(),
            api_token: config.api_token.clone(),
            requests_per_second: config.requests_per_second,
            burst: config.burst,
            request_timeout: config.request_timeout,
            ready_poll_interval: config.status_poll,
            not_found_poll: config.status_poll.min(Self::default().not_found_poll),
            launch_confirm_grace: config.launch_confirm_grace,
            launch_confirm_poll: config.status_poll.min(Self::default().launch_confirm_poll),
            ..Self::default()
        }
    }
}

/// What DELETE found.
#[derive(Debug, Clone, PartialEq)]
pub enum DeleteOutcome {
    /// The server is being deleted; billing stopped when this answer arrived.
    Deleting(Box<Server>),
    /// The API accepted the deletion with an empty body (200/202/204); billing stopped.
    Accepted,
    /// The API no longer knows the server (already deleted or stopped).
    AlreadyGone,
}

/// A RunComfy Server API client. Cheap to clone; every clone shares one rate limiter and one 429 back-off,
/// so the whole process stays within the account's limit.
#[derive(Debug, Clone)]
pub struct RunComfyClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{base}/prod/api/users/{user_id}`.
    user_url: Url,
    auth: HeaderValue,
    options: ClientOptions,
    limiter: DirectLimiter,
    /// Set after a 429: no call is sent before this instant.
    blocked_until: Mutex<Option<Instant>>,
    /// Servers this process launched and has not seen deleted, with their launch time until the API first
    /// answered a lookup of them (their grace for 404s ends then: a server the API knew and then forgot
    /// is gone, not freshly launched).
    launched: Mutex<HashMap<String, Option<Instant>>>,
    /// Serializes launches so reconciliation after an ambiguous failure can attribute new servers.
    launch_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunComfyClient").field("user_url", &self.user_url.as_str()).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunComfyClient {
    /// Builds a client.
    ///
    /// # Errors
    /// [`RunComfyError::Config`] for an unusable base URL, an empty user id or token, or a zero rate.
    pub fn new(options: ClientOptions) -> Result<Self, RunComfyError> {
        let config_err = |m: &str| Err(RunComfyError::Config(m.to_string()));
        if options.user_id.trim().is_empty() {
            return config_err("user_id is empty");
        }
        if options.api_token.is_empty() {
            return config_err("api_token is empty");
        }
        if options.requests_per_second == 0 {
            return config_err("requests_per_second must be at least 1");
        }
        let mut user_url = Url::parse(&options.base_url)
            .map_err(|e| RunComfyError::Config(format!("base_url is not a URL: {e}")))?;
        if !matches!(user_url.scheme(), "http" | "https") {
            return config_err("base_url must be http(s)");
        }
        user_url
            .path_segments_mut()
            .map_err(|()| RunComfyError::Config("base_url cannot be a base".into()))?
            .pop_if_empty()
            .extend(["prod", "api", "users", options.user_id.trim()]);
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", options.api_token.expose())).map_err(|_| {
                RunComfyError::Config("api_token contains characters not allowed in a header".into())
            })?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!("comfyrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RunComfyError::Config(format!("HTTP client: {e}")))?;
        let limiter = clock::limiter(options.requests_per_second, options.burst);
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                user_url,
                auth,
                options,
                limiter,
                blocked_until: Mutex::new(None),
                launched: Mutex::new(HashMap::new()),
                launch_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// `GET …/workflows`: the account's cloud-saved workflows (their `version_id` is what launches use).
    ///
    /// # Errors
    /// See [`RunComfyError`]; transient failures were already retried.
    #[instrument(skip_all)]
    pub async fn list_workflows(&self) -> Result<Vec<Workflow>, RunComfyError> {
        let v = self.call(Method::GET, self.url(&["workflows"]), None, true).await?;
        decode_list(v, "workflows")
    }

    /// `GET …/servers`: the account's machines.
    ///
    /// # Errors
    /// See [`RunComfyError`]; transient failures were already retried.
    #[instrument(skip_all)]
    pub async fn list_servers(&self) -> Result<Vec<Server>, RunComfyError> {
        let v = self.call(Method::GET, self.url(&["servers"]), None, true).await?;
        let servers: Vec<Server> = decode_list(v, "servers")?;
        servers.iter().for_each(note_unknown_status);
        Ok(servers)
    }

    /// `GET …/servers/{id}`. A 404 for a server this client launched less than `not_found_grace` ago is
    /// retried (the API may not know a brand-new server yet).
    ///
    /// # Errors
    /// [`RunComfyError::NotFound`] once the server is unknown past the grace period; see [`RunComfyError`].
    #[instrument(skip_all, fields(server_id = %server_id))]
    pub async fn get_server(&self, server_id: &str) -> Result<Server, RunComfyError> {
        let url = self.url(&["servers", server_id]);
        let v =
            self.with_not_found_grace(server_id, || self.call(Method::GET, url.clone(), None, true)).await?;
        decode_server(v)
    }

    /// `POST …/servers/{id}/update-estimated-duration`: sets the machine's total running duration, counted
    /// from `service_ready_at` (it replaces the old value; it does not add to it).
    ///
    /// # Errors
    /// See [`RunComfyError`].
    #[instrument(skip_all, fields(server_id = %server_id, duration_s = duration_secs(duration)))]
    pub async fn update_estimated_duration(
        &self,
        server_id: &str,
        duration: Duration,
    ) -> Result<Server, RunComfyError> {
        let url = self.url(&["servers", server_id, "update-estimated-duration"]);
        let body = json!({ "update_estimated_duration": duration_secs(duration) });
        let v = self
            .with_not_found_grace(server_id, || {
                self.call(Method::POST, url.clone(), Some(body.clone()), true)
            })
            .await?;
        decode_server(v)
    }

    /// `DELETE …/servers/{id}`: stops the machine; billing ends when this returns.
    ///
    /// # Errors
    /// See [`RunComfyError`]. An unknown server is `Ok(DeleteOutcome::AlreadyGone)`, not an error.
    #[instrument(skip_all, fields(server_id = %server_id))]
    pub async fn delete_server(&self, server_id: &str) -> Result<DeleteOutcome, RunComfyError> {
        let url = self.url(&["servers", server_id]);
        let result =
            self.with_not_found_grace(server_id, || self.call(Method::DELETE, url.clone(), None, true)).await;
        let outcome = match result {
            Ok(Value::Null) => DeleteOutcome::Accepted,
            Ok(v) => DeleteOutcome::Deleting(Box::new(decode_server(v)?)),
            Err(RunComfyError::NotFound { .. }) => DeleteOutcome::AlreadyGone,
            Err(e) => return Err(e),
        };
        lock(&self.inner.launched).remove(server_id);
        info!(already_gone = matches!(outcome, DeleteOutcome::AlreadyGone), "RunComfy server deleted");
        Ok(outcome)
    }

    /// `POST …/servers`: launches a machine and returns it (normally `Starting`).
    ///
    /// Never launches blindly twice: the server list is read first, and after an ambiguous failure
    /// (timeout, lost connection, 5xx, internal error in the body) the list is read again for up to
    /// `launch_confirm_grace`; the one new server matching the request (same `server_type` and duration,
    /// and `workflow_version_id`/creation time if the API reports them) is taken as this launch. Only if
    /// none appears is the launch repeated (after one more look), up to `max_launch_attempts` times in
    /// all. Launches through this client and its clones are serialized so that attribution among them is
    /// unambiguous; if several new servers match (another client of the account launched alike), none is
    /// taken.
    ///
    /// # Errors
    /// The last failure; [`RunComfyError::is_ambiguous`] errors mean the outcome could not be confirmed
    /// either way (the server list was unreadable, or several servers could be the one), so a machine may
    /// exist. [`RunComfyError::NotLaunched`]: every attempt failed and the list showed no machine after it.
    pub async fn launch(&self, request: &LaunchRequest) -> Result<Server, RunComfyError> {
        let before: HashSet<String> = self.list_servers().await?.into_iter().map(|s| s.server_id).collect();
        self.launch_from(request, before, &CancellationToken::new()).await
    }

    /// [`RunComfyClient::launch`] for a caller that listed the account's servers itself just before
    /// (`before`: their ids). Once `no_more_attempts` is cancelled (shutdown), a failed attempt is not
    /// repeated (an ambiguous one is still looked for in the list).
    ///
    /// # Errors
    /// As [`RunComfyClient::launch`].
    #[instrument(skip_all, fields(server_type = %request.server_type, workflow_version_id = %request.workflow_version_id))]
    pub async fn launch_from(
        &self,
        request: &LaunchRequest,
        before: HashSet<String>,
        no_more_attempts: &CancellationToken,
    ) -> Result<Server, RunComfyError> {
        let _serialized = self.inner.launch_lock.lock().await;
        let body = json!({
            "workflow_version_id": request.workflow_version_id,
            "server_type": request.server_type.as_str(),
            "estimated_duration": request.duration_secs(),
        });
        let url = self.url(&["servers"]);
        let mut backoff = self.backoff();
        // `before`: servers that existed before the first attempt. Kept for every attempt, so a server from
        // an earlier ambiguous attempt that shows up late is still recognised as ours.
        let started = SystemTime::now();
        let mut any_ambiguous = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.call(Method::POST, url.clone(), Some(body.clone()), false).await {
                Ok(v) => decode_server(v),
                Err(e) => Err(e),
            };
            let error = match result {
                Ok(server) => {
                    self.record_launched(&server.server_id);
                    info!(server_id = %server.server_id, status = %server.current_status, "RunComfy server launched");
                    return Ok(server);
                }
                Err(e) => e,
            };
            if error.is_ambiguous() {
                any_ambiguous = true;
                warn!(error = %ErrorChain(&error), attempt, "launch outcome unknown; checking the server list before launching again");
                let grace = self.inner.options.launch_confirm_grace;
                if let Some(server) = self.find_launched(request, &before, started, grace).await? {
                    info!(server_id = %server.server_id, "the ambiguous launch did happen; adopting its server");
                    return Ok(server);
                }
            } else if !error.is_retryable() {
                return Err(error);
            }
            if attempt >= self.inner.options.max_launch_attempts.max(1) || no_more_attempts.is_cancelled() {
                // An ambiguous failure was checked: the list showed no machine for it.
                return Err(match error.is_ambiguous() {
                    true => RunComfyError::NotLaunched { attempts: attempt, last: Box::new(error) },
                    false => error,
                });
            }
            let delay = backoff.next().unwrap_or(self.inner.options.max_backoff);
            warn!(error = %ErrorChain(&error), attempt, ?delay, "launch did not happen; launching again");
            tokio::time::sleep(delay).await;
            if any_ambiguous
                && let Some(server) = self.find_launched(request, &before, started, Duration::ZERO).await?
            {
                info!(server_id = %server.server_id, "an earlier ambiguous launch did happen; adopting its server");
                return Ok(server);
            }
        }
    }

    /// Polls the server until it is Ready with a `main_service_url`.
    ///
    /// Unknown statuses are logged and polled through, like `Starting`.
    ///
    /// # Errors
    /// [`RunComfyError::ServerEnded`] if it stops or disappears, [`RunComfyError::ReadyTimeout`] after
    /// `timeout`, or a non-retryable API error.
    #[instrument(skip_all, fields(server_id = %server_id))]
    pub async fn wait_ready(&self, server_id: &str, timeout: Duration) -> Result<Server, RunComfyError> {
        let start = Instant::now();
        let poll = self.inner.options.ready_poll_interval;
        let mut last_status = String::from("unknown");
        loop {
            match self.get_server(server_id).await {
                Ok(s) if s.current_status.is_ready() && s.main_service_url.is_some() => return Ok(s),
                Ok(s) if s.current_status.is_terminal() => {
                    return Err(RunComfyError::ServerEnded {
                        server_id: server_id.into(),
                        status: s.current_status.to_string(),
                    });
                }
                Ok(s) => last_status = s.current_status.to_string(),
                Err(RunComfyError::NotFound { .. }) => {
                    return Err(RunComfyError::ServerEnded {
                        server_id: server_id.into(),
                        status: "gone".into(),
                    });
                }
                Err(e) if e.is_retryable() => {
                    warn!(error = %ErrorChain(&e), "status poll failed; polling on")
                }
                Err(e) => return Err(e),
            }
            let waited = start.elapsed();
            if waited + poll > timeout {
                return Err(RunComfyError::ReadyTimeout { server_id: server_id.into(), waited, last_status });
            }
            tokio::time::sleep(poll).await;
        }
    }

    // ---- internals ----

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.user_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    /// The endpoint of a request as a metrics label: its method and path below the user, ids templated.
    fn endpoint(&self, method: &Method, url: &Url) -> &'static str {
        let base = self.inner.user_url.path().trim_end_matches('/');
        let rest = url.path().strip_prefix(base).unwrap_or_default();
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["workflows"]) => "GET /workflows",
            ("GET", ["servers"]) => "GET /servers",
            ("POST", ["servers"]) => "POST /servers",
            ("GET", ["servers", _]) => "GET /servers/{server_id}",
            ("DELETE", ["servers", _]) => "DELETE /servers/{server_id}",
            ("POST", ["servers", _, "update-estimated-duration"]) => {
                "POST /servers/{server_id}/update-estimated-duration"
            }
            _ => "other",
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        let o = &self.inner.options;
        ExponentialBuilder::default()
            .with_min_delay(o.min_backoff)
            .with_max_delay(o.max_backoff)
            .with_max_times(o.max_retries)
            .with_jitter()
            .build()
    }

    fn record_launched(&self, server_id: &str) {
        lock(&self.inner.launched).insert(server_id.to_string(), Some(Instant::now()));
    }

    /// Runs `op`, retrying its 404s while `server_id` is within its post-launch grace period.
    async fn with_not_found_grace<F, Fut>(&self, server_id: &str, op: F) -> Result<Value, RunComfyError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Value, RunComfyError>>,
    {
        let grace_end = lock(&self.inner.launched)
            .get(server_id)
            .copied()
            .flatten()
            .map(|t| t + self.inner.options.not_found_grace);
        loop {
            match op().await {
                Ok(v) => {
                    // The API knows it now: a later 404 means it is gone.
                    if let Some(launched) = lock(&self.inner.launched).get_mut(server_id) {
                        *launched = None;
                    }
                    return Ok(v);
                }
                Err(RunComfyError::NotFound { .. }) => {
                    if grace_end.is_some_and(|end| Instant::now() < end) {
                        debug!(server_id, "404 for a freshly launched server; retrying");
                        tokio::time::sleep(self.inner.options.not_found_poll).await;
                        continue;
                    }
                    return Err(RunComfyError::NotFound { server_id: server_id.to_string() });
                }
                other => return other,
            }
        }
    }

    /// After an ambiguous launch failure: looks for a server that appeared since `before`, matches the
    /// request and is not claimed, for up to `grace` (at least once). Several such servers are
    /// [`RunComfyError::Unattributable`]: one of them may be ours, but another client launched alike.
    async fn find_launched(
        &self,
        request: &LaunchRequest,
        before: &HashSet<String>,
        started: SystemTime,
        grace: Duration,
    ) -> Result<Option<Server>, RunComfyError> {
        let deadline = Instant::now() + grace;
        loop {
            // If even the list fails, the outcome stays unknown: report that rather than launch again.
            let servers = self.list_servers().await?;
            let claimed: HashSet<String> = lock(&self.inner.launched).keys().cloned().collect();
            let mut found: Vec<Server> = servers
                .into_iter()
                .filter(|s| {
                    !before.contains(&s.server_id)
                        && !claimed.contains(&s.server_id)
                        && !s.current_status.is_terminal()
                        && matches_launch(s, request, started)
                })
                .collect();
            if found.len() > 1 {
                return Err(RunComfyError::Unattributable { candidates: found.len() });
            }
            if let Some(server) = found.pop() {
                self.record_launched(&server.server_id);
                return Ok(Some(server));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(self.inner.options.launch_confirm_poll).await;
        }
    }

    /// Sends one request with retries: 429s wait for `Retry-After` (account-wide), and for idempotent
    /// calls transient failures back off exponentially.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        idempotent: bool,
    ) -> Result<Value, RunComfyError> {
        let mut backoff = self.backoff();
        let mut rate_limited = 0;
        loop {
            let span = tracing::debug_span!("runcomfy_request", method = %method, path = %url.path());
            let error = match self.send_once(&method, &url, body.as_ref()).instrument(span).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let delay = match &error {
                RunComfyError::RateLimited { .. } => {
                    rate_limited += 1;
                    if rate_limited > self.inner.options.max_rate_limited_retries {
                        return Err(error);
                    }
                    // `send_once` blocked the whole account for the server's delay; the next attempt waits.
                    Duration::ZERO
                }
                e if idempotent && e.is_retryable() => match backoff.next() {
                    Some(d) => d,
                    None => return Err(error),
                },
                _ => return Err(error),
            };
            warn!(method = %method, path = %url.path(), error = %ErrorChain(&error), ?delay, "RunComfy call failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Waits for the account's turn (429 back-off, then the rate limiter).
    async fn wait_turn(&self) {
        loop {
            let blocked = *lock(&self.inner.blocked_until);
            if let Some(until) = blocked.filter(|u| *u > Instant::now()) {
                tokio::time::sleep_until(until).await;
                continue;
            }
            clock::acquire(&self.inner.limiter).await;
            let still_clear = lock(&self.inner.blocked_until).is_none_or(|u| u <= Instant::now());
            if still_clear {
                return;
            }
        }
    }

    fn block_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut blocked = lock(&self.inner.blocked_until);
        if blocked.is_none_or(|b| b < until) {
            *blocked = Some(until);
        }
    }

    /// One HTTP exchange, typed. `Ok(Value::Null)` for an empty success body.
    async fn send_once(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<Value, RunComfyError> {
        let waited = Instant::now();
        self.wait_turn().await;
        crate::metrics::runcomfy_limiter_wait(waited.elapsed());
        let endpoint = self.endpoint(method, url);
        let mut request = self
            .inner
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, self.inner.auth.clone())
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let timeout = self.inner.options.request_timeout;
        let exchange = async {
            let response = request.send().await.map_err(RunComfyError::Transport)?;
            let status = response.status();
            let retry_after = response.headers().get(RETRY_AFTER).and_then(parse_retry_after);
            let bytes = response.bytes().await.map_err(RunComfyError::Transport)?;
            Ok::<_, RunComfyError>((status, retry_after, bytes))
        };
        let answered = tokio::time::timeout(timeout, exchange).await;
        let label = match &answered {
            Ok(Ok((status, _, _))) => status.as_str().to_owned(),
            Ok(Err(_)) => "transport".to_owned(),
            Err(_) => "timeout".to_owned(),
        };
        crate::metrics::runcomfy_request(endpoint, &label);
        let (status, retry_after, bytes) = answered.map_err(|_| RunComfyError::Timeout(timeout))??;
        debug!(status = status.as_u16(), "RunComfy answered");
        let result = interpret(status, retry_after, &bytes);
        if let Err(RunComfyError::RateLimited { retry_after }) = &result {
            let o = &self.inner.options;
            self.block_for(retry_after.unwrap_or(o.default_retry_after).min(o.max_retry_after));
        }
        result
    }
}

/// Whether `server` can be the result of `request` started at `started` (fields the API omits match).
fn matches_launch(server: &Server, request: &LaunchRequest, started: SystemTime) -> bool {
    const CLOCK_SLACK: Duration = Duration::from_secs(300);
    let type_ok = server.server_type.as_ref().is_none_or(|t| *t == request.server_type);
    let duration_ok = server.estimated_duration.is_none_or(|d| d == request.duration_secs());
    let version_ok = ["workflow_version_id", "version_id"]
        .iter()
        .filter_map(|k| server.extra_str(k))
        .all(|v| v == request.workflow_version_id);
    let created_ok = server.extra_str("created_at").and_then(Timestamp::parse).is_none_or(|created| {
        let earliest = started.checked_sub(CLOCK_SLACK).unwrap_or(started);
        created.0 >= earliest && created.0 <= SystemTime::now() + CLOCK_SLACK
    });
    type_ok && duration_ok && version_ok && created_ok
}

fn note_unknown_status(server: &Server) {
    if let ServerStatus::Unknown(status) = &server.current_status {
        warn!(server_id = %server.server_id, status = %status, "unknown RunComfy server status; treating the server as not usable");
    }
}

fn decode_server(v: Value) -> Result<Server, RunComfyError> {
    let server: Server =
        serde_json::from_value(v).map_err(|e| RunComfyError::Decode(format!("server: {e}")))?;
    note_unknown_status(&server);
    Ok(server)
}

/// Decodes a bare array, or `{key: [...]}` defensively; elements that do not decode are skipped and logged.
fn decode_list<T: serde::de::DeserializeOwned>(v: Value, key: &str) -> Result<Vec<T>, RunComfyError> {
    let items = match v {
        Value::Array(items) => items,
        Value::Object(mut map) => match map.remove(key) {
            Some(Value::Array(items)) => items,
            _ => return Err(RunComfyError::Decode(format!("expected a list of {key}"))),
        },
        _ => return Err(RunComfyError::Decode(format!("expected a list of {key}"))),
    };
    Ok(items
        .into_iter()
        .filter_map(|item| match serde_json::from_value(item) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(error = %e, "skipping an unreadable RunComfy {key} entry");
                None
            }
        })
        .collect())
}

/// `Retry-After` as delta-seconds (integer or decimal) or an HTTP date.
fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate_parse(s)?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn httpdate_parse(s: &str) -> Option<SystemTime> {
    // RFC 7231 IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT"; humantime reads the RFC 3339 form.
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else { return None };
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| m == month)? + 1;
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{time}Z")).ok()
}

/// Turns one HTTP answer into a value or a typed error, detecting errors carried in 2xx bodies.
fn interpret(
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
) -> Result<Value, RunComfyError> {
    let json: Option<Value> = if bytes.iter().all(u8::is_ascii_whitespace) {
        Some(Value::Null)
    } else {
        serde_json::from_slice(bytes).ok()
    };
    let message = json.as_ref().and_then(error_message).unwrap_or_else(|| text_prefix(bytes));
    if status.is_success() {
        let Some(value) = json else {
            return Err(RunComfyError::Decode(format!(
                "HTTP {status} body is not JSON: {}",
                text_prefix(bytes)
            )));
        };
        if let Some(code) = body_error_code(&value) {
            return Err(RunComfyError::Api { http_status: status.as_u16(), code, message });
        }
        return Ok(value);
    }
    Err(match status.as_u16() {
        429 => RunComfyError::RateLimited { retry_after },
        401 => RunComfyError::Unauthorized { message },
        403 => RunComfyError::Forbidden { message },
        404 => RunComfyError::NotFound { server_id: String::new() },
        s => match json.as_ref().and_then(body_error_code) {
            Some(code) => RunComfyError::Api { http_status: s, code, message },
            None => RunComfyError::Http { status: s, message },
        },
    })
}

/// `Some(code)` if `v` is an error body: an object with a non-null `error_code`, or an `error_message`.
fn body_error_code(v: &Value) -> Option<String> {
    let obj = v.as_object()?;
    match obj.get("error_code") {
        Some(Value::Null) | None => obj.get("error_message").filter(|m| !m.is_null()).map(|_| String::new()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    }
}

fn error_message(v: &Value) -> Option<String> {
    let obj = v.as_object()?;
    ["error_message", "message", "error", "detail"].iter().find_map(|k| match obj.get(*k)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        Value::Object(inner) => inner.get("message").and_then(Value::as_str).map(str::to_string),
        other => Some(other.to_string()),
    })
}

fn text_prefix(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_in_200_are_typed() {
        let body = br#"{"error_code": 10001, "error_message": "insufficient funds"}"#;
        match interpret(StatusCode::OK, None, body) {
            Err(RunComfyError::Api { http_status: 200, code, message }) => {
                assert_eq!(code, "10001");
                assert_eq!(message, "insufficient funds");
            }
            other => panic!("{other:?}"),
        }
        let ok = br#"{"server_id": "s", "error_code": null}"#;
        assert!(interpret(StatusCode::OK, None, ok).is_ok());
        assert_eq!(interpret(StatusCode::OK, None, b"").unwrap(), Value::Null);
    }

    #[test]
    fn statuses_are_typed() {
        let e = interpret(StatusCode::FORBIDDEN, None, br#"{"message": "Missing Authentication Token"}"#);
        assert!(
            matches!(e, Err(RunComfyError::Forbidden { message }) if message == "Missing Authentication Token")
        );
        let e = interpret(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(2)), b"{}");
        assert_eq!(e.unwrap_err().retry_after(), Some(Duration::from_secs(2)));
        let e = interpret(StatusCode::BAD_GATEWAY, None, b"<html>bad gateway</html>").unwrap_err();
        assert!(e.is_retryable() && e.is_ambiguous());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(&HeaderValue::from_static("3")), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("0.5")), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn token_is_not_in_debug_output() {
        let client = RunComfyClient::new(ClientOptions {
            user_id: "u".into(),
            api_token: Secret::new("tok-very-secret"),
            ..ClientOptions::default()
        })
        .unwrap();
        assert!(!format!("{client:?}").contains("tok-very-secret"));
    }
}
