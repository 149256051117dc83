//! The one configuration struct, read once at start from defaults, an optional TOML file and
//! `COMFYRELAY_*` environment variables (nested keys joined by `__`, e.g. `COMFYRELAY_GRPC__LISTEN`).
//!
//! Nothing below `main` reads the environment: this struct is passed down.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// Everything comfyrelay can be configured with. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the SQLite database and stored artifacts.
    pub data_dir: PathBuf,
    /// A directory of workflows (manifests and graphs) added to the bundled ones, replacing any of the
    /// same name, and reloaded on change; `None`: the bundled workflows only.
    pub workflows_dir: Option<PathBuf>,
    /// gRPC server settings.
    pub grpc: GrpcConfig,
    /// Logging settings.
    pub log: LogConfig,
    /// ComfyUI servers and client behaviour.
    pub comfyui: ComfyUiConfig,
    /// Job engine settings.
    pub jobs: JobsConfig,
    /// RunComfy machine pool.
    pub runcomfy: RunComfyConfig,
    /// Prometheus metrics listener.
    pub metrics: MetricsConfig,
    /// What the database and artifacts survive.
    pub storage: StorageConfig,
    /// Who may call, as which tenant, and how much each tenant may use.
    pub auth: AuthConfig,
}

/// Storage settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `crash` (default): what was acknowledged survives a crash of the process, with no fsync on the job
    /// path; `power`: it also survives a power loss, for an fsync per commit and per artifact.
    pub durability: crate::store::Durability,
    /// A PostgreSQL database shared by several replicas (`postgres://user:password@host:5432/comfyrelay`),
    /// instead of the SQLite file in `data_dir`. One replica at a time leads (runs jobs, holds the ComfyUI
    /// sockets and the RunComfy pool); the others wait as standbys and take over when it stops. A secret:
    /// never logged (it may hold a password).
    pub database_url: Option<Secret>,
    /// Where input images and outputs are stored (default `<data_dir>/artifacts`). With `database_url`,
    /// a directory every replica mounts (a ReadWriteMany volume), so the replica that takes over finds the
    /// artifacts of the one that stopped.
    pub artifacts_dir: Option<PathBuf>,
    /// An object store for input images and outputs instead of `artifacts_dir`, shared by every replica:
    /// `s3://bucket/prefix` (credentials, region and endpoint from the standard AWS environment variables:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for S3-compatible
    /// stores such as MinIO; never in the URL) or `file:///absolute/path`.
    pub artifacts_url: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            workflows_dir: None,
            grpc: GrpcConfig::default(),
            log: LogConfig::default(),
            comfyui: ComfyUiConfig::default(),
            jobs: JobsConfig::default(),
            runcomfy: RunComfyConfig::default(),
            storage: StorageConfig::default(),
            metrics: MetricsConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every call but those of `auth.open_services` carries `authorization: Bearer <API key>` (or a client
    /// certificate mapped by `auth.client_certificates`).
    Keys,
    /// No authentication: every call is tenant `default`, role admin. Loopback only, unless
    /// `auth.allow_none_on_network`.
    None,
}

/// Authentication, tenants and their quotas.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `keys` or `none`; unset: `keys` for `serve`, `none` for `dev`.
    pub mode: Option<AuthMode>,
    /// Accept `mode = "none"` on an address other than loopback (a warning at start says so).
    pub allow_none_on_network: bool,
    /// gRPC services answered without a key (full names, e.g. `grpc.health.v1.Health`).
    pub open_services: Vec<String>,
    /// The quotas of every tenant not named in `tenants`, and the defaults of those named.
    pub tenant_defaults: TenantQuota,
    /// Per-tenant quotas (only the keys given replace the defaults), by tenant name.
    pub tenants: std::collections::BTreeMap<String, TenantOverride>,
    /// Verified client-certificate subjects (mTLS) that act as a tenant without a key.
    pub client_certificates: Vec<ClientCertificate>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: None,
            allow_none_on_network: false,
            open_services: vec![
                "grpc.health.v1.Health".into(),
                "grpc.reflection.v1.ServerReflection".into(),
                "grpc.reflection.v1alpha.ServerReflection".into(),
            ],
            tenant_defaults: TenantQuota::default(),
            tenants: Default::default(),
            client_certificates: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// The mode in effect: `mode`, or `keys` when unset.
    pub fn effective_mode(&self) -> AuthMode {
        self.mode.unwrap_or(AuthMode::Keys)
    }

    /// Whether any tenant has a `machine_seconds_per_day` quota.
    pub fn limits_machine_seconds(&self) -> bool {
        self.tenant_defaults.machine_seconds_per_day.is_some()
            || self.tenants.values().any(|t| t.machine_seconds_per_day.is_some())
    }

    /// The quotas of `tenant`.
    pub fn quota(&self, tenant: &str) -> TenantQuota {
        match self.tenants.get(tenant) {
            Some(o) => o.apply(&self.tenant_defaults),
            None => self.tenant_defaults.clone(),
        }
    }
}

/// What one tenant may use (with `auth.mode = "keys"`; with `none` only `jobs.max_unfinished` applies).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantQuota {
    /// Jobs waiting (queued or provisioning) at most; a submit beyond is `RESOURCE_EXHAUSTED`.
    pub max_queued: usize,
    /// Jobs running at once at most; more wait in the queue (other tenants' jobs go first).
    pub max_running: usize,
    /// Submits per second, sustained (bursts of twice as many pass).
    pub submits_per_second: u32,
    /// Machine-seconds (RunComfy machine time attributed to the tenant's finished jobs) over the last 24
    /// hours at most; unset: no limit.
    pub machine_seconds_per_day: Option<f64>,
}

impl Default for TenantQuota {
    fn default() -> Self {
        Self { max_queued: 1000, max_running: 64, submits_per_second: 20, machine_seconds_per_day: None }
    }
}

/// One tenant's quotas that differ from `auth.tenant_defaults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantOverride {
    /// Replaces `tenant_defaults.max_queued`.
    pub max_queued: Option<usize>,
    /// Replaces `tenant_defaults.max_running`.
    pub max_running: Option<usize>,
    /// Replaces `tenant_defaults.submits_per_second`.
    pub submits_per_second: Option<u32>,
    /// Replaces `tenant_defaults.machine_seconds_per_day`.
    pub machine_seconds_per_day: Option<f64>,
}

impl TenantOverride {
    /// These values over `defaults`.
    pub fn apply(&self, defaults: &TenantQuota) -> TenantQuota {
        TenantQuota {
            max_queued: self.max_queued.unwrap_or(defaults.max_queued),
            max_running: self.max_running.unwrap_or(defaults.max_running),
            submits_per_second: self.submits_per_second.unwrap_or(defaults.submits_per_second),
            machine_seconds_per_day: self.machine_seconds_per_day.or(defaults.machine_seconds_per_day),
        }
    }
}

/// A client certificate subject (as verified by the TLS layer) and whom it acts as.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificate {
    /// The certificate's subject, exactly as the TLS layer reports it.
    pub subject: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// `admin`, `submitter` or `viewer` (default `submitter`).
    #[serde(default = "default_certificate_role")]
    pub role: String,
}

fn default_certificate_role() -> String {
    "submitter".into()
}

/// Prometheus metrics settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` HTTP listener, off the gRPC port; unset, no metrics are served (or kept).
    pub listen: Option<SocketAddr>,
}

/// gRPC server settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request or response message, in bytes. The default fits 32 MiB images with room to spare.
    pub max_message_bytes: usize,
    /// How long shutdown waits for open calls and running work before cutting them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Serve gRPC-Web (HTTP/1.1, for browsers) next to gRPC.
    pub grpc_web: bool,
    /// Open client connections at most; further ones wait in the listen backlog until one closes. It is
    /// lowered at start (with a warning) when the process's open-file limit would leave fewer than a
    /// quarter of its descriptors (at least 64) to the database, artifacts and ComfyUI sockets.
    pub max_connections: usize,
    /// Concurrent calls (HTTP/2 streams) on one connection. A backend that multiplexes many StreamJob calls
    /// over one channel needs room: an open StreamJob holds a few KiB (it is pulled, not buffered).
    pub max_concurrent_streams: u32,
    /// A new connection must send its first 24 bytes (the HTTP/2 preface) within this, or it is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no call open for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 pings to each client, so dead peers are noticed.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A client that does not answer a ping within this is disconnected.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// TLS on the gRPC port (and mTLS); off unless `cert_file` is set.
    pub tls: TlsConfig,
    /// Host names (optionally `name:port`) a browser may call gRPC-Web or HTTP/1 under; any other `Host`
    /// is refused with 421, which closes DNS rebinding. The IP address a connection arrived on is always
    /// allowed. Native gRPC (HTTP/2, `application/grpc`) is not checked.
    pub allowed_hosts: Vec<String>,
    /// Web origins (`scheme://host[:port]`, exactly as browsers send them in `Origin`) whose pages may
    /// call the gRPC-Web API cross-origin (CORS); a browser request with another `Origin` is refused
    /// with 403. Empty: none; the console served at `/console` is same-origin and needs no entry.
    pub cors_origins: Vec<String>,
    /// With replicas (`storage.database_url`): the URL the other replicas forward calls to while this one
    /// leads (`http://10.0.0.5:50051`; `https://` with `grpc.tls`). Unset: `http://<grpc.listen>` (or
    /// `https://`) when that is a specific address; with `0.0.0.0` standbys cannot reach this leader and
    /// answer `UNAVAILABLE` instead of forwarding.
    pub advertise_url: Option<String>,
}

/// TLS settings of the gRPC port. The files are PEM, re-read when they change (new connections get the
/// new certificate; a file that does not load keeps the previous one, with a warning saying why).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (leaf first); setting it (with `key_file`) turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates client certificates must be signed by; set, every client must present one (mTLS)
    /// and its subject (CN, else the first SAN) is the caller's identity.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes (modification time and size).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// With replicas: the CA certificates (PEM) a standby checks the leader's certificate against when it
    /// forwards calls to it over TLS; usually the CA that signs the replicas' own certificates. Unset: the
    /// public web roots. Read again each time the standby connects to a new leader.
    pub leader_ca_file: Option<PathBuf>,
    /// With replicas: the name a standby expects in the leader's certificate (a DNS SAN), for
    /// certificates issued to the service's name rather than to each replica's address
    /// (`comfyrelay.prod.svc`). Unset: the host of the leader's advertised URL.
    pub leader_server_name: Option<String>,
    /// With replicas and mTLS: the client certificate (PEM chain) a standby presents to the leader when it
    /// forwards a call; its subject must be in the leader's `replica_subjects`. Unset: with mTLS a standby
    /// does not forward.
    pub replica_cert_file: Option<PathBuf>,
    /// The key of `replica_cert_file`.
    pub replica_key_file: Option<PathBuf>,
    /// With replicas and mTLS: the client-certificate subjects of the replicas themselves. A call on a
    /// connection with one of these certificates acts as the caller the standby names
    /// (`x-comfyrelay-forwarded-client`, the subject of the certificate it verified); on any other
    /// connection that header is dropped.
    pub replica_subjects: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            reload_interval: Duration::from_secs(10),
            leader_ca_file: None,
            leader_server_name: None,
            replica_cert_file: None,
            replica_key_file: None,
            replica_subjects: Vec::new(),
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 48 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            grpc_web: true,
            max_connections: 512,
            max_concurrent_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            tls: TlsConfig::default(),
            allowed_hosts: ["localhost", "127.0.0.1", "[::1]"].map(String::from).to_vec(),
            cors_origins: Vec::new(),
            advertise_url: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// `EnvFilter` directives; `RUST_LOG` overrides them.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, filter: "info,comfyrelay=debug".into() }
    }
}

/// A ComfyUI server named by the operator.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticServer {
    /// A short unique name, used as the machine id.
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:8188`.
    pub url: String,
}

impl fmt::Debug for StaticServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticServer").field("name", &self.name).field("url", &redact_url(&self.url)).finish()
    }
}

/// Returns `url` with any user-info (credentials) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<invalid url>".into(),
    }
}

/// ComfyUI servers and client behaviour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ComfyUiConfig {
    /// Static ComfyUI servers jobs run on.
    pub servers: Vec<StaticServer>,
    /// Timeout of one HTTP request to ComfyUI.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A socket with no frame for this long is probed; one that fails the probe is reconnected.
    #[serde(with = "humantime_serde")]
    pub idle_probe: Duration,
    /// A prompt silent this long is checked against `/queue` and `/history` (a prompt that vanished
    /// without an error is found this way even when the socket is healthy).
    #[serde(with = "humantime_serde")]
    pub silence_reconcile: Duration,
    /// Prompts queued on one server ahead of the running one (ComfyUI runs one at a time).
    pub prequeue: usize,
}

impl Default for ComfyUiConfig {
    fn default() -> Self {
        Self {
            servers: vec![StaticServer { name: "local".into(), url: "http://127.0.0.1:8188".into() }],
            request_timeout: Duration::from_secs(30),
            idle_probe: Duration::from_secs(10),
            silence_reconcile: Duration::from_secs(10),
            prequeue: 1,
        }
    }
}

/// Job engine settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Outputs at most this large are sent inline in events and `Job.outputs`.
    pub inline_output_max_bytes: u64,
    /// Finished jobs, their events and artifacts are deleted this long after they end.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Attempts for a job whose backend lost it (1 = no retry).
    pub max_attempts: u32,
    /// Longest wait in the queue.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Longest input upload.
    #[serde(with = "humantime_serde")]
    pub upload_timeout: Duration,
    /// Longest execution on ComfyUI.
    #[serde(with = "humantime_serde")]
    pub execution_timeout: Duration,
    /// Longest output download.
    #[serde(with = "humantime_serde")]
    pub download_timeout: Duration,
    /// How long each step of a running job's cancel (interrupt; `/free` and interrupt again; replacing a
    /// RunComfy machine) waits for ComfyUI to confirm that the prompt stopped before the next step.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// A cancelled job is `CANCELLED` by this long after its cancel began on the machine, whether ComfyUI
    /// confirmed it or not.
    #[serde(with = "humantime_serde")]
    pub cancel_deadline: Duration,
    /// Jobs not finished (queued and running) at most; a submit beyond is `RESOURCE_EXHAUSTED`.
    pub max_unfinished: usize,
    /// Bytes of an inline graph (`graph_json`); larger ones are refused before they are parsed.
    pub max_graph_bytes: usize,
    /// Bytes of the prompt and of each text parameter.
    pub max_text_bytes: usize,
    /// Pixels (width × height, as the image header declares them) of each input image; larger images are
    /// refused at submit without being decoded. The default (64 MP, e.g. 8192×8192) fits SDXL and
    /// upscaler inputs.
    pub max_image_pixels: u64,
}

impl JobsConfig {
    /// The bounds on one request's fields.
    pub fn request_limits(&self) -> crate::limits::RequestLimits {
        crate::limits::RequestLimits {
            max_graph_bytes: self.max_graph_bytes,
            max_text_bytes: self.max_text_bytes,
            max_image_pixels: self.max_image_pixels,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            inline_output_max_bytes: 1024 * 1024,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 2,
            queue_timeout: Duration::from_secs(3600),
            upload_timeout: Duration::from_secs(120),
            execution_timeout: Duration::from_secs(1800),
            download_timeout: Duration::from_secs(300),
            cancel_grace: Duration::from_secs(10),
            cancel_deadline: Duration::from_secs(60),
            max_unfinished: 100_000,
            max_graph_bytes: crate::limits::RequestLimits::default().max_graph_bytes,
            max_text_bytes: crate::limits::RequestLimits::default().max_text_bytes,
            max_image_pixels: crate::limits::RequestLimits::default().max_image_pixels,
        }
    }
}

/// A secret string (an API key, the RunComfy token): a `secrecy::SecretString`, so it is never shown by
/// `Debug`, `Display` or serialization and is zeroed when dropped.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(secrecy::SecretString::from(s.into()))
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret as _;
        self.0.expose_secret()
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Serialized only to seed figment's defaults; never write the secret out.
        s.serialize_str("")
    }
}

/// RunComfy machine pool settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunComfyConfig {
    /// Launch and use RunComfy machines.
    pub enabled: bool,
    /// API base URL.
    pub base_url: String,
    /// The account's user id.
    pub user_id: String,
    /// The API token (Bearer). Set it through `COMFYRELAY_RUNCOMFY__API_TOKEN`.
    pub api_token: Secret,
    /// Requests per second allowed for the whole account.
    pub requests_per_second: u32,
    /// Extra requests allowed in a burst.
    pub burst: u32,
    /// Longest time one RunComfy API request may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Pause between status polls while a machine starts.
    #[serde(with = "humantime_serde")]
    pub status_poll: Duration,
    /// Server type for workflows whose requirements name none.
    pub default_server_type: String,
    /// The pool policy for every (workflow version, server type); `pools` overrides it per pair.
    pub default_pool: PoolPolicy,
    /// Per (workflow version, server type) overrides of the policy, e.g. a warm minimum for one workflow.
    pub pools: Vec<PoolOverride>,
    /// Machines running at once across all pools (a spending cap).
    pub max_machines_total: usize,
    /// Each machine is launched with this `estimated_duration` and extended while comfyrelay wants it, so
    /// that if comfyrelay dies every machine stops itself within this time.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often each Ready machine's status and ComfyUI are checked.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// A machine whose ComfyUI has not answered for this long is unhealthy: it is stopped and replaced.
    #[serde(with = "humantime_serde")]
    pub unhealthy_after: Duration,
    /// After `Ready`, how long its ComfyUI may take to answer before the machine is given up.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    /// Consecutive failed launches of one pool after which jobs waiting for it fail.
    pub max_launch_failures: u32,
    /// Pause before launching again after a failed launch (doubling per failure, at most 5 min).
    #[serde(with = "humantime_serde")]
    pub launch_retry_backoff: Duration,
    /// After a launch answered ambiguously (5xx, timeout), how long the server list is watched for the
    /// machine before the launch counts as not done (and may be sent again).
    #[serde(with = "humantime_serde")]
    pub launch_confirm_grace: Duration,
    /// Delete every machine on a graceful shutdown (otherwise they stop at their lease, or are adopted by
    /// the next start).
    pub stop_on_shutdown: bool,
    /// Delete servers of the account this comfyrelay did not launch (off: they are only reported).
    pub stop_unknown_servers: bool,
    /// Price per hour in USD by server type (RunComfy's published pay-as-you-go rates, Sep 2025; prices
    /// drift, so set your own).
    pub prices: std::collections::BTreeMap<String, f64>,
}

/// How one pool of machines (same workflow version and server type) grows and shrinks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolPolicy {
    /// Machines kept running even without jobs.
    pub min_warm: usize,
    /// Most machines at once.
    pub max_machines: usize,
    /// Jobs (running and waiting) one machine should carry before another is launched.
    pub jobs_per_machine: usize,
    /// Idle time before a machine above the warm minimum is stopped.
    #[serde(with = "humantime_serde")]
    pub idle_stop: Duration,
    /// Age (from Ready) after which a machine takes no new jobs and is stopped once idle.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Longest wait from launch to `Ready`.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            min_warm: 0,
            max_machines: 2,
            jobs_per_machine: 4,
            idle_stop: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(12 * 3600),
            ready_timeout: Duration::from_secs(600),
        }
    }
}

/// The policy of one (workflow version, server type) pool; unset fields take the global policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PoolOverride {
    /// The RunComfy workflow version.
    pub workflow_version_id: String,
    /// The server type (empty: `default_server_type`).
    pub server_type: String,
    /// See [`PoolPolicy::min_warm`].
    pub min_warm: Option<usize>,
    /// See [`PoolPolicy::max_machines`].
    pub max_machines: Option<usize>,
    /// See [`PoolPolicy::jobs_per_machine`].
    pub jobs_per_machine: Option<usize>,
    /// See [`PoolPolicy::idle_stop`].
    #[serde(with = "humantime_serde::option")]
    pub idle_stop: Option<Duration>,
    /// See [`PoolPolicy::max_lifetime`].
    #[serde(with = "humantime_serde::option")]
    pub max_lifetime: Option<Duration>,
    /// See [`PoolPolicy::ready_timeout`].
    #[serde(with = "humantime_serde::option")]
    pub ready_timeout: Option<Duration>,
}

impl PoolOverride {
    /// `base` with this override's fields applied.
    pub fn apply(&self, base: &PoolPolicy) -> PoolPolicy {
        PoolPolicy {
            min_warm: self.min_warm.unwrap_or(base.min_warm),
            max_machines: self.max_machines.unwrap_or(base.max_machines),
            jobs_per_machine: self.jobs_per_machine.unwrap_or(base.jobs_per_machine),
            idle_stop: self.idle_stop.unwrap_or(base.idle_stop),
            max_lifetime: self.max_lifetime.unwrap_or(base.max_lifetime),
            ready_timeout: self.ready_timeout.unwrap_or(base.ready_timeout),
        }
    }
}

/// RunComfy's published pay-as-you-go rates (USD/hour, Sep 2025) by `server_type`; the mapping of
/// `2xl-turbo` to the H100 tier is a guess (the reference marks it undocumented).
pub fn default_prices() -> std::collections::BTreeMap<String, f64> {
    [("medium", 0.99), ("large", 1.75), ("extra-large", 2.50), ("2x-large", 4.99), ("2xl-turbo", 7.49)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

impl Default for RunComfyConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            base_url: "https://beta-api.runcomfy.net".into(),
            user_id: String::new(),
            api_token: Secret::default(),
            requests_per_second: 1,
            burst: 1,
            request_timeout: Duration::from_secs(30),
            status_poll: Duration::from_secs(5),
            default_server_type: "medium".into(),
            default_pool: PoolPolicy::default(),
            pools: Vec::new(),
            max_machines_total: 8,
            lease: Duration::from_secs(15 * 60),
            health_interval: Duration::from_secs(15),
            unhealthy_after: Duration::from_secs(45),
            health_timeout: Duration::from_secs(120),
            max_launch_failures: 3,
            launch_retry_backoff: Duration::from_secs(10),
            launch_confirm_grace: Duration::from_secs(20),
            stop_on_shutdown: true,
            stop_unknown_servers: false,
            prices: default_prices(),
        }
    }
}

/// `COMFYRELAY_*` variables that are not server settings: the config file's path, and the CLI client's
/// server address, API key and TLS files (read by the client's flags, never by the server).
pub const NOT_SERVER_SETTINGS: &[&str] = &[
    "COMFYRELAY_CONFIG",
    "COMFYRELAY_SERVER",
    "COMFYRELAY_API_KEY",
    "COMFYRELAY_CA_CERT",
    "COMFYRELAY_CLIENT_CERT",
    "COMFYRELAY_CLIENT_KEY",
];

/// A configuration error that names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads defaults, then `file` (TOML) if given, then `COMFYRELAY_*` variables from `env`, and validates.
    ///
    /// `env` is passed in (rather than read here) so tests can supply their own.
    ///
    /// # Errors
    /// A message naming the key and what is wrong with it.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        if let Some(path) = file
            && !path.exists()
        {
            return Err(ConfigError(format!("config file {} does not exist", path.display())));
        }
        // The environment is injected (not read here, so tests can supply their own); each
        // `COMFYRELAY_A__B` becomes the key `a.b`, its value parsed like a TOML value.
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("COMFYRELAY_") && !NOT_SERVER_SETTINGS.contains(&k.as_str()))
            .collect();
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file(path));
        }
        for (key, value) in vars.clone() {
            let path = key["COMFYRELAY_".len()..].to_ascii_lowercase().replace("__", ".");
            let parsed: figment::value::Value =
                value.parse().unwrap_or_else(|_| figment::value::Value::from(value.clone()));
            figment = figment.merge(Serialized::global(&path, parsed));
        }
        let config: Config = figment.extract().map_err(|e| ConfigError(describe(e, &vars)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot.
    ///
    /// # Errors
    /// A message naming the first key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("key `{key}`: {why}")));
        if self.grpc.max_message_bytes < 1024 * 1024 {
            return bad("grpc.max_message_bytes", "must be at least 1048576 (1 MiB)");
        }
        if self.jobs.max_unfinished == 0 {
            return bad("jobs.max_unfinished", "must be at least 1");
        }
        if let Some(url) = &self.storage.database_url
            && !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://"))
        {
            // Never the value: it may hold a password.
            return bad(
                "storage.database_url",
                "must be a PostgreSQL URL (postgres://user:password@host:5432/db)",
            );
        }
        if let Some(url) = &self.storage.artifacts_url
            && let Err(why) = crate::store::check_artifacts_url(url)
        {
            // Never the value.
            return bad("storage.artifacts_url", why);
        }
        if let Some(url) = &self.grpc.advertise_url {
            // Standbys reach the leader as its own clients do: over TLS when its port speaks TLS.
            if self.grpc.tls.cert_file.is_some() && !url.starts_with("https://") {
                return bad(
                    "grpc.advertise_url",
                    "must be an https:// URL with grpc.tls on (https://10.0.0.5:50051)",
                );
            }
            if self.grpc.tls.cert_file.is_none() && !url.starts_with("http://") {
                return bad("grpc.advertise_url", "must be an http:// URL (http://10.0.0.5:50051)");
            }
        }
        if self.jobs.max_attempts == 0 {
            return bad("jobs.max_attempts", "must be at least 1");
        }
        if self.jobs.cancel_grace.is_zero() {
            return bad("jobs.cancel_grace", "must be positive");
        }
        if self.jobs.cancel_deadline < self.jobs.cancel_grace {
            return bad("jobs.cancel_deadline", "must be at least jobs.cancel_grace");
        }
        let g = &self.grpc;
        if g.max_connections == 0 {
            return bad("grpc.max_connections", "must be at least 1");
        }
        if g.max_concurrent_streams == 0 {
            return bad("grpc.max_concurrent_streams", "must be at least 1");
        }
        for (key, d) in [
            ("grpc.handshake_timeout", g.handshake_timeout),
            ("grpc.idle_timeout", g.idle_timeout),
            ("grpc.keepalive_interval", g.keepalive_interval),
            ("grpc.keepalive_timeout", g.keepalive_timeout),
        ] {
            if d.is_zero() {
                return bad(key, "must be positive");
            }
        }
        let tls = &g.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return bad("grpc.tls.cert_file", "and grpc.tls.key_file must be set together");
        }
        if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
            return bad("grpc.tls.client_ca_file", "needs TLS on (grpc.tls.cert_file and grpc.tls.key_file)");
        }
        if tls.reload_interval.is_zero() {
            return bad("grpc.tls.reload_interval", "must be positive");
        }
        for (key, set) in [
            ("grpc.tls.leader_ca_file", tls.leader_ca_file.is_some()),
            ("grpc.tls.leader_server_name", tls.leader_server_name.is_some()),
        ] {
            if set && tls.cert_file.is_none() {
                return bad(key, "needs TLS on (grpc.tls.cert_file and grpc.tls.key_file)");
            }
        }
        if tls.replica_cert_file.is_some() != tls.replica_key_file.is_some() {
            return bad("grpc.tls.replica_cert_file", "and grpc.tls.replica_key_file must be set together");
        }
        for (key, set) in [
            ("grpc.tls.replica_cert_file", tls.replica_cert_file.is_some()),
            ("grpc.tls.replica_subjects", !tls.replica_subjects.is_empty()),
        ] {
            if set && tls.client_ca_file.is_none() {
                return bad(key, "needs client certificates on (grpc.tls.client_ca_file)");
            }
        }
        if tls.replica_subjects.iter().any(|s| s.is_empty()) {
            return bad("grpc.tls.replica_subjects", "must not hold an empty subject");
        }
        if let Some(name) = &tls.leader_server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return bad("grpc.tls.leader_server_name", "must be a DNS name or IP address");
        }
        for (i, h) in g.allowed_hosts.iter().enumerate() {
            if h.is_empty() || h.contains(['/', ' ', '@', '*']) {
                return bad(
                    &format!("grpc.allowed_hosts[{i}]"),
                    "must be a host name or address, optionally with :port",
                );
            }
        }
        for (i, origin) in g.cors_origins.iter().enumerate() {
            if !is_origin(origin) {
                return bad(
                    &format!("grpc.cors_origins[{i}]"),
                    "must be a web origin like `https://console.example.com` (http(s) scheme, host and \
                     optional port; no path, no trailing slash, no wildcard)",
                );
            }
        }
        if self.jobs.max_graph_bytes < 1024 || self.jobs.max_graph_bytes > g.max_message_bytes {
            return bad("jobs.max_graph_bytes", "must be between 1024 and grpc.max_message_bytes");
        }
        if self.jobs.max_text_bytes == 0 || self.jobs.max_text_bytes > g.max_message_bytes {
            return bad("jobs.max_text_bytes", "must be between 1 and grpc.max_message_bytes");
        }
        if self.jobs.max_image_pixels == 0 {
            return bad("jobs.max_image_pixels", "must be at least 1");
        }
        self.validate_auth()?;
        if self.comfyui.prequeue > 16 {
            return bad("comfyui.prequeue", "must be at most 16");
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.comfyui.servers.iter().enumerate() {
            if s.name.is_empty() || !names.insert(s.name.as_str()) {
                return bad(&format!("comfyui.servers[{i}].name"), "must be non-empty and unique");
            }
            match url::Url::parse(&s.url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => return bad(&format!("comfyui.servers[{i}].url"), "must be an http(s) URL"),
            }
        }
        if self.runcomfy.enabled {
            if self.runcomfy.user_id.is_empty() {
                return bad("runcomfy.user_id", "is required when runcomfy.enabled is true");
            }
            if self.runcomfy.api_token.is_empty() {
                return bad("runcomfy.api_token", "is required when runcomfy.enabled is true");
            }
            if self.runcomfy.requests_per_second == 0 {
                return bad("runcomfy.requests_per_second", "must be at least 1");
            }
            if self.runcomfy.request_timeout.is_zero() {
                return bad("runcomfy.request_timeout", "must be positive");
            }
            let r = &self.runcomfy;
            if r.lease < Duration::from_secs(2) {
                return bad("runcomfy.lease", "must be at least 2s (the API counts whole seconds)");
            }
            if r.status_poll.is_zero() {
                return bad("runcomfy.status_poll", "must be positive");
            }
            if r.max_machines_total == 0 {
                return bad("runcomfy.max_machines_total", "must be at least 1");
            }
            if r.health_interval.is_zero() || r.unhealthy_after < r.health_interval {
                return bad("runcomfy.unhealthy_after", "must be at least runcomfy.health_interval (> 0)");
            }
            let mut policies = vec![("runcomfy.default_pool".to_string(), r.default_pool.clone())];
            for (i, p) in r.pools.iter().enumerate() {
                if p.workflow_version_id.is_empty() {
                    return bad(&format!("runcomfy.pools[{i}].workflow_version_id"), "must not be empty");
                }
                policies.push((format!("runcomfy.pools[{i}]"), p.apply(&r.default_pool)));
            }
            for (key, p) in policies {
                if p.max_machines == 0 || p.min_warm > p.max_machines {
                    return bad(&format!("{key}.max_machines"), "must be at least 1 and at least min_warm");
                }
                if p.jobs_per_machine == 0 {
                    return bad(&format!("{key}.jobs_per_machine"), "must be at least 1");
                }
                if p.ready_timeout.is_zero() {
                    return bad(&format!("{key}.ready_timeout"), "must be positive");
                }
            }
            for (server_type, price) in &r.prices {
                if !price.is_finite() || *price < 0.0 {
                    return bad(&format!("runcomfy.prices.{server_type}"), "must be a non-negative number");
                }
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("key `{key}`: {why}")));
        let check = |key: &str, q: &TenantQuota| {
            if q.max_queued == 0 {
                return bad(&format!("{key}.max_queued"), "must be at least 1");
            }
            if q.max_running == 0 {
                return bad(&format!("{key}.max_running"), "must be at least 1");
            }
            if q.submits_per_second == 0 {
                return bad(&format!("{key}.submits_per_second"), "must be at least 1");
            }
            if q.machine_seconds_per_day.is_some_and(|s| !s.is_finite() || s <= 0.0) {
                return bad(&format!("{key}.machine_seconds_per_day"), "must be a positive number");
            }
            Ok(())
        };
        let a = &self.auth;
        check("auth.tenant_defaults", &a.tenant_defaults)?;
        for (name, o) in &a.tenants {
            check(&format!("auth.tenants.{}", crate::limits::echo(name)), &o.apply(&a.tenant_defaults))?;
        }
        for (i, c) in a.client_certificates.iter().enumerate() {
            if c.subject.is_empty() || c.tenant.is_empty() {
                return bad(
                    &format!("auth.client_certificates[{i}]"),
                    "subject and tenant must not be empty",
                );
            }
            if !matches!(c.role.as_str(), "admin" | "submitter" | "viewer") {
                return bad(
                    &format!("auth.client_certificates[{i}].role"),
                    "must be admin, submitter or viewer",
                );
            }
        }
        Ok(())
    }

    /// Refuses `auth.mode = "none"` on `addr` unless it is loopback or `auth.allow_none_on_network` is set.
    ///
    /// # Errors
    /// A message naming both settings.
    pub fn check_auth_for(&self, addr: SocketAddr) -> Result<(), ConfigError> {
        if self.auth.effective_mode() == AuthMode::None
            && !addr.ip().is_loopback()
            && !self.auth.allow_none_on_network
        {
            return Err(ConfigError(format!(
                "key `auth.mode`: \"none\" (no authentication) is refused on {addr}, which is not loopback: \
                 use auth.mode = \"keys\" (COMFYRELAY_AUTH__MODE), or set auth.allow_none_on_network = true \
                 to serve without authentication anyway"
            )));
        }
        Ok(())
    }
}

/// One line per error, naming the key and where its value came from, and never the value itself: a value
/// under the wrong key may be a secret (a token pasted into `runcomfy.lease`), so only its type is said.
fn describe(e: figment::Error, env: &[(String, String)]) -> String {
    e.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() { "<root>".to_string() } else { e.path.join(".") };
            // The variable that set this key or a table holding it (`COMFYRELAY_COMFYUI__SERVERS` for
            // `comfyui.servers.0.url`).
            let var = env.iter().map(|(k, _)| k).find(|k| {
                let path = k["COMFYRELAY_".len()..].to_ascii_lowercase().replace("__", ".");
                key == path || key.starts_with(&format!("{path}."))
            });
            let source = match (var, e.metadata.as_ref().and_then(|m| m.source.as_ref())) {
                (Some(var), _) => format!(" (from environment variable {var})"),
                (None, Some(figment::Source::File(path))) => format!(" (from {})", path.display()),
                (None, _) => String::new(),
            };
            let mut kind = describe_kind(&e.kind);
            // Belt and braces for free-text messages of custom deserializers: blank out any value given.
            for (_, value) in env {
                if value.len() >= 4 && kind.contains(value.as_str()) {
                    kind = kind.replace(value.as_str(), "<value>");
                }
            }
            format!("key `{}`{source}: {kind}", crate::limits::echo(&key))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What is wrong, without the offending value (figment's own `Display` quotes it).
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let one_of = |names: &[&str]| names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    match kind {
        // Custom messages (socket addresses, TOML syntax) say what is wrong on their first line; the
        // lines after it quote the source text.
        Kind::Message(m) => crate::limits::clip(m.lines().next().unwrap_or_default(), 120).into_owned(),
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {}", actual_kind(actual)),
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value ({}), expected {expected}", actual_kind(actual))
        }
        Kind::InvalidLength(n, expected) => format!("expected {expected}, found {n} elements"),
        Kind::UnknownVariant(_, expected) => format!("unknown value, expected one of {}", one_of(expected)),
        Kind::UnknownField(_, []) => "unknown key".to_string(),
        Kind::UnknownField(_, expected) => format!("unknown key, expected one of {}", one_of(expected)),
        Kind::MissingField(name) => format!("missing key `{name}`"),
        Kind::DuplicateField(name) => format!("duplicate key `{name}`"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "number out of range".to_string(),
        Kind::Unsupported(actual) => format!("unsupported value ({})", actual_kind(actual)),
        Kind::UnsupportedKey(actual, expected) => {
            format!("unsupported key ({}), expected {expected}", actual_kind(actual))
        }
    }
}

/// The type of a value given, never the value.
fn actual_kind(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit => "nothing",
        Actual::Option => "an option",
        Actual::NewtypeStruct => "a new-type struct",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        Actual::Enum
        | Actual::UnitVariant
        | Actual::NewtypeVariant
        | Actual::TupleVariant
        | Actual::StructVariant => "an enum",
        Actual::Other(_) => "a value of another type",
    }
}

/// Whether `s` is a serialized web origin as browsers send it in `Origin` (`http(s)://host[:port]`).
fn is_origin(s: &str) -> bool {
    match url::Url::parse(s) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => u.origin().ascii_serialization() == s,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = Config::load(
            None,
            env(&[
                ("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0"),
                ("COMFYRELAY_JOBS__RETENTION", "2h"),
                ("COMFYRELAY_LOG__FORMAT", "json"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.grpc.listen.port(), 0);
        assert_eq!(c.jobs.retention, Duration::from_secs(7200));
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn servers_list_from_env() {
        let c = Config::load(
            None,
            env(&[(
                "COMFYRELAY_COMFYUI__SERVERS",
                r#"[{name = "a", url = "http://127.0.0.1:1"}, {name = "b", url = "http://127.0.0.1:2"}]"#,
            )]),
        )
        .unwrap();
        assert_eq!(c.comfyui.servers.len(), 2);
        assert_eq!(c.comfyui.servers[1].url, "http://127.0.0.1:2");
    }

    #[test]
    fn cors_origins_must_be_exact_origins() {
        let c = Config::load(
            None,
            env(&[(
                "COMFYRELAY_GRPC__CORS_ORIGINS",
                r#"["http://127.0.0.1:8080", "https://ops.example.com"]"#,
            )]),
        )
        .unwrap();
        assert_eq!(c.grpc.cors_origins, ["http://127.0.0.1:8080", "https://ops.example.com"]);
        for bad in [
            "*",
            "https://ops.example.com/",
            "https://ops.example.com/console",
            "ops.example.com",
            "file:///x",
        ] {
            let value = format!(r#"["http://127.0.0.1:1", "{bad}"]"#);
            let e =
                Config::load(None, env(&[("COMFYRELAY_GRPC__CORS_ORIGINS", value.as_str())])).unwrap_err();
            assert!(e.to_string().contains("grpc.cors_origins[1]"), "{bad}: {e}");
        }
    }

    #[test]
    fn tls_and_browser_settings_load_from_env_and_are_checked() {
        let c = Config::load(
            None,
            env(&[
                ("COMFYRELAY_GRPC__TLS__CERT_FILE", "/etc/comfyrelay/tls.crt"),
                ("COMFYRELAY_GRPC__TLS__KEY_FILE", "/etc/comfyrelay/tls.key"),
                ("COMFYRELAY_GRPC__TLS__RELOAD_INTERVAL", "1m"),
                ("COMFYRELAY_GRPC__ALLOWED_HOSTS", r#"["relay.example.com", "relay:8443"]"#),
                ("COMFYRELAY_GRPC__CORS_ORIGINS", r#"["https://console.example.com"]"#),
            ]),
        )
        .unwrap();
        assert_eq!(c.grpc.tls.cert_file.as_deref(), Some(std::path::Path::new("/etc/comfyrelay/tls.crt")));
        assert_eq!(c.grpc.tls.reload_interval, Duration::from_secs(60));
        assert_eq!(c.grpc.allowed_hosts, ["relay.example.com", "relay:8443"]);
        assert_eq!(c.grpc.cors_origins, ["https://console.example.com"]);
        let replicas = Config::load(
            None,
            env(&[
                ("COMFYRELAY_GRPC__TLS__CERT_FILE", "/c"),
                ("COMFYRELAY_GRPC__TLS__KEY_FILE", "/k"),
                ("COMFYRELAY_GRPC__TLS__LEADER_CA_FILE", "/etc/comfyrelay/replicas-ca.crt"),
                ("COMFYRELAY_GRPC__TLS__LEADER_SERVER_NAME", "comfyrelay.prod.svc"),
                ("COMFYRELAY_GRPC__ADVERTISE_URL", "https://10.0.0.5:50051"),
                ("COMFYRELAY_GRPC__TLS__CLIENT_CA_FILE", "/etc/comfyrelay/client-ca.crt"),
                ("COMFYRELAY_GRPC__TLS__REPLICA_CERT_FILE", "/etc/comfyrelay/replica.crt"),
                ("COMFYRELAY_GRPC__TLS__REPLICA_KEY_FILE", "/etc/comfyrelay/replica.key"),
                ("COMFYRELAY_GRPC__TLS__REPLICA_SUBJECTS", r#"["comfyrelay-replica"]"#),
            ]),
        )
        .unwrap();
        assert_eq!(replicas.grpc.tls.leader_server_name.as_deref(), Some("comfyrelay.prod.svc"));
        assert_eq!(replicas.grpc.tls.replica_subjects, ["comfyrelay-replica"]);

        for (vars, key) in [
            (&[("COMFYRELAY_GRPC__TLS__CERT_FILE", "/c")][..], "grpc.tls.cert_file"),
            (&[("COMFYRELAY_GRPC__TLS__CLIENT_CA_FILE", "/ca")][..], "grpc.tls.client_ca_file"),
            (&[("COMFYRELAY_GRPC__TLS__RELOAD_INTERVAL", "0s")][..], "grpc.tls.reload_interval"),
            (&[("COMFYRELAY_GRPC__ALLOWED_HOSTS", r#"["http://x/"]"#)][..], "grpc.allowed_hosts[0]"),
            (
                &[("COMFYRELAY_GRPC__CORS_ORIGINS", r#"["https://a.example/app"]"#)][..],
                "grpc.cors_origins[0]",
            ),
            (&[("COMFYRELAY_GRPC__CORS_ORIGINS", r#"["a.example"]"#)][..], "grpc.cors_origins[0]"),
            (&[("COMFYRELAY_GRPC__TLS__LEADER_CA_FILE", "/ca")][..], "grpc.tls.leader_ca_file"),
            (&[("COMFYRELAY_GRPC__TLS__REPLICA_CERT_FILE", "/r.crt")][..], "grpc.tls.replica_cert_file"),
            (
                &[("COMFYRELAY_GRPC__TLS__REPLICA_SUBJECTS", r#"["replica"]"#)][..],
                "grpc.tls.replica_subjects",
            ),
            (
                &[
                    ("COMFYRELAY_GRPC__TLS__CERT_FILE", "/c"),
                    ("COMFYRELAY_GRPC__TLS__KEY_FILE", "/k"),
                    ("COMFYRELAY_GRPC__TLS__CLIENT_CA_FILE", "/ca"),
                    ("COMFYRELAY_GRPC__TLS__REPLICA_SUBJECTS", r#"[""]"#),
                ][..],
                "grpc.tls.replica_subjects",
            ),
            (&[("COMFYRELAY_GRPC__TLS__LEADER_SERVER_NAME", "relay")][..], "grpc.tls.leader_server_name"),
            (&[("COMFYRELAY_GRPC__ADVERTISE_URL", "https://10.0.0.5:50051")][..], "grpc.advertise_url"),
            (
                &[
                    ("COMFYRELAY_GRPC__TLS__CERT_FILE", "/c"),
                    ("COMFYRELAY_GRPC__TLS__KEY_FILE", "/k"),
                    ("COMFYRELAY_GRPC__ADVERTISE_URL", "http://10.0.0.5:50051"),
                ][..],
                "grpc.advertise_url",
            ),
            (
                &[
                    ("COMFYRELAY_GRPC__TLS__CERT_FILE", "/c"),
                    ("COMFYRELAY_GRPC__TLS__KEY_FILE", "/k"),
                    ("COMFYRELAY_GRPC__TLS__LEADER_SERVER_NAME", "not a name"),
                ][..],
                "grpc.tls.leader_server_name",
            ),
        ] {
            let e = Config::load(None, env(vars)).expect_err(key);
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn client_variables_are_not_server_settings() {
        let c = Config::load(
            None,
            env(&[("COMFYRELAY_SERVER", "http://127.0.0.1:1"), ("COMFYRELAY_API_KEY", "k-secret")]),
        )
        .unwrap();
        assert_eq!(c, Config::default());
        let c = Config::load(None, env(&[("COMFYRELAY_WORKFLOWS_DIR", "my-workflows")])).unwrap();
        assert_eq!(c.workflows_dir.as_deref(), Some(std::path::Path::new("my-workflows")));
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = Config::load(None, env(&[("COMFYRELAY_GRPC__MAX_MESSAGE_BYTES", "lots")])).unwrap_err();
        assert!(e.to_string().contains("grpc.max_message_bytes"), "{e}");
        let e = Config::load(None, env(&[("COMFYRELAY_JOBS__MAX_ATTEMPTS", "0")])).unwrap_err();
        assert!(e.to_string().contains("jobs.max_attempts"), "{e}");
        let short = [("COMFYRELAY_JOBS__CANCEL_GRACE", "10s"), ("COMFYRELAY_JOBS__CANCEL_DEADLINE", "5s")];
        let e = Config::load(None, env(&short)).unwrap_err();
        assert!(e.to_string().contains("jobs.cancel_deadline"), "{e}");
        for url in [
            "gs://private-bucket/x",
            "s3://",
            "s3://key:secret@bucket/x",
            "file://relative/dir",
            "file:///",
            "/plain/path",
            "s3://b/p?x=1",
        ] {
            let e = Config::load(None, env(&[("COMFYRELAY_STORAGE__ARTIFACTS_URL", url)])).unwrap_err();
            assert!(e.to_string().contains("storage.artifacts_url"), "{url}: {e}");
            // Never the value (the short ones are part of the hint).
            assert!(url.len() < 10 || !e.to_string().contains(url), "{url}: {e}");
        }
        for url in ["s3://bucket", "s3://bucket/some/prefix", "file:///var/lib/comfyrelay/objects"] {
            let c = Config::load(None, env(&[("COMFYRELAY_STORAGE__ARTIFACTS_URL", url)])).unwrap();
            assert_eq!(c.storage.artifacts_url.as_deref(), Some(url));
        }
    }

    #[test]
    fn the_env_example_lists_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/comfyrelay.env.example");
        let text = std::fs::read_to_string(path).unwrap();
        let vars: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = Config::load(None, vars).unwrap();
        assert_eq!(c, Config::default());
    }

    /// The Kubernetes manifests parse (one object per document, no key twice in a mapping), hold the objects
    /// the README names, and the comfyrelay settings of their containers load.
    #[test]
    fn the_kubernetes_manifests_parse_and_their_settings_load() {
        use serde::Deserialize as _;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s");
        use std::collections::BTreeMap;
        let mut kinds = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
                .map(serde_yaml::Value::deserialize)
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            // Secret values of the same file, as `name/key`.
            let secrets: BTreeMap<String, String> = docs
                .iter()
                .filter(|d| d["kind"] == "Secret")
                .flat_map(|d| {
                    let name = d["metadata"]["name"].as_str().unwrap_or_default().to_string();
                    d["stringData"].as_mapping().into_iter().flatten().map(move |(k, v)| {
                        (format!("{name}/{}", k.as_str().unwrap()), v.as_str().unwrap().to_string())
                    })
                })
                .collect();
            for doc in &docs {
                let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: a document without kind"));
                assert!(doc["metadata"]["name"].is_string(), "{file}: a {kind} without a name");
                kinds.entry(file.clone()).or_insert_with(Vec::new).push(kind.to_string());
                let containers = doc["spec"]["template"]["spec"]["containers"].as_sequence();
                for container in containers.into_iter().flatten() {
                    let vars: Vec<(String, String)> = container["env"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .filter_map(|var| {
                            let name = var["name"].as_str()?.to_string();
                            let value = match (&var["value"], &var["valueFrom"]["secretKeyRef"]) {
                                (serde_yaml::Value::String(v), _) => v.replace("$(POD_IP)", "10.0.0.5"),
                                (_, serde_yaml::Value::Mapping(r)) => {
                                    let key = format!("{}/{}", r["name"].as_str()?, r["key"].as_str()?);
                                    secrets.get(&key).cloned().unwrap_or_else(|| "from-a-secret".into())
                                }
                                _ => return None,
                            };
                            name.starts_with("COMFYRELAY_").then_some((name, value))
                        })
                        .collect();
                    assert!(!vars.is_empty(), "{file}: {kind} sets no comfyrelay settings");
                    Config::load(None, vars).unwrap_or_else(|e| panic!("{file}: {kind}'s settings: {e}"));
                }
                if kind == "Deployment" {
                    assert!(
                        doc["spec"]["replicas"].as_u64() >= Some(2),
                        "{file}: a Deployment of one replica"
                    );
                }
            }
        }
        assert_eq!(kinds["comfyrelay.yaml"], ["StatefulSet", "Service"]);
        assert_eq!(
            kinds["comfyrelay-replicas.yaml"],
            ["Secret", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget", "Service"]
        );
    }

    #[test]
    fn pool_policies_are_checked_by_key() {
        let e = Config::load(
            None,
            env(&[
                ("COMFYRELAY_RUNCOMFY__ENABLED", "true"),
                ("COMFYRELAY_RUNCOMFY__USER_ID", "u"),
                ("COMFYRELAY_RUNCOMFY__API_TOKEN", "t"),
                ("COMFYRELAY_RUNCOMFY__POOLS", r#"[{workflow_version_id = "v", min_warm = 3}]"#),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("runcomfy.pools[0].max_machines"), "{e}");
        let c = Config::load(
            None,
            env(&[
                (
                    "COMFYRELAY_RUNCOMFY__POOLS",
                    r#"[{workflow_version_id = "v", min_warm = 1, idle_stop = "1m"}]"#,
                ),
                ("COMFYRELAY_RUNCOMFY__PRICES", r#"{medium = 0.5}"#),
            ]),
        )
        .unwrap();
        let p = c.runcomfy.pools[0].apply(&c.runcomfy.default_pool);
        assert_eq!((p.min_warm, p.idle_stop, p.max_machines), (1, Duration::from_secs(60), 2));
        assert_eq!(c.runcomfy.prices.get("medium"), Some(&0.5));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Config::default();
        c.runcomfy.api_token = Secret::new("tok-very-secret");
        c.comfyui.servers[0].url = "http://user:pw@127.0.0.1:8188".into();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("tok-very-secret"));
        assert!(!dbg.contains("pw@"));
    }
}
