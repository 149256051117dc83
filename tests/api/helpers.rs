//! `spawn_app()`: a real comfyrelay on an ephemeral port, with connected clients and a private data dir.

use std::{path::PathBuf, time::Duration};

use comfyrelay::{
    Config,
    emulator::comfyui::{ComfyEmulator, ComfyVersion, EmulatorConfig},
    proto::pb,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A running comfyrelay and clients connected to it.
pub(crate) struct TestApp {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) channel: Channel,
    pub(crate) jobs: pb::job_service_client::JobServiceClient<Channel>,
    pub(crate) workflows: pb::workflow_service_client::WorkflowServiceClient<Channel>,
    pub(crate) machines: pb::machine_service_client::MachineServiceClient<Channel>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) server: Option<JoinHandle<anyhow::Result<()>>>,
    /// The emulated ComfyUI the app runs jobs on.
    pub(crate) comfy: ComfyEmulator,
    #[allow(dead_code, reason = "kept alive for the app's lifetime")]
    pub(crate) data_dir: tempfile::TempDir,
}

/// The default test configuration: ephemeral port, private data dir, the repo's workflows.
pub(crate) fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.grpc.listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = data_dir.to_path_buf();
    config.workflows_dir = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workflows"));
    config.grpc.shutdown_grace = Duration::from_secs(5);
    // The suite's default: no authentication (on loopback); `spawn_app_with_auth` turns keys on.
    config.auth.mode = Some(comfyrelay::config::AuthMode::None);
    config
}

/// Starts comfyrelay with the default test configuration.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts comfyrelay after `customize` adjusts the test configuration.
pub(crate) async fn spawn_app_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_on(comfyui_version(), customize).await
}

/// Starts comfyrelay against an emulated ComfyUI of `version`, after `customize` adjusts the configuration.
pub(crate) async fn spawn_app_on(version: ComfyVersion, customize: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_full(version, customize, None).await
}

/// Starts comfyrelay after `customize` adjusts the test configuration (turning TLS on), with clients
/// connected over TLS with `client_tls` (to `127.0.0.1`; name the server with `domain_name`).
pub(crate) async fn spawn_app_tls(
    customize: impl FnOnce(&mut Config),
    client_tls: tonic::transport::ClientTlsConfig,
) -> TestApp {
    spawn_app_full(comfyui_version(), customize, Some(client_tls)).await
}

async fn spawn_app_full(
    version: ComfyVersion,
    customize: impl FnOnce(&mut Config),
    client_tls: Option<tonic::transport::ClientTlsConfig>,
) -> TestApp {
    comfyrelay::telemetry::init_for_tests(std::env::var_os("TEST_LOG").is_some());
    let data_dir = tempfile::tempdir().expect("tempdir");
    let comfy = spawn_comfy_version(version).await;
    let mut config = test_config(data_dir.path());
    config.comfyui.servers[0].url = comfy.url();
    customize(&mut config);
    // Bind before spawning: the port accepts connections as soon as we return, no sleep needed.
    let listener = tokio::net::TcpListener::bind(config.grpc.listen).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(comfyrelay::run(listener, config, shutdown.clone()));
    let endpoint = match client_tls {
        None => Channel::from_shared(format!("http://{addr}")).expect("uri"),
        Some(tls) => {
            Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls).expect("tls")
        }
    };
    let channel = endpoint.connect().await.expect("connect to comfyrelay");
    TestApp {
        addr,
        jobs: pb::job_service_client::JobServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        workflows: pb::workflow_service_client::WorkflowServiceClient::new(channel.clone()),
        machines: pb::machine_service_client::MachineServiceClient::new(channel.clone()),
        channel,
        shutdown,
        server: Some(server),
        comfy,
        data_dir,
    }
}

/// The ComfyUI generation the emulators of this test run reproduce: `COMFYRELAY_TEST_COMFYUI_VERSION`
/// (`0.3.64` or `0.38`; read here only, by the test helper), 0.3.64 when unset. `.ci/run` runs the suite
/// once more with `0.38`, so every job, stream, recovery and pool test runs against both generations.
pub(crate) fn comfyui_version() -> ComfyVersion {
    match std::env::var("COMFYRELAY_TEST_COMFYUI_VERSION") {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("COMFYRELAY_TEST_COMFYUI_VERSION: {e}")),
        Err(_) => ComfyVersion::default(),
    }
}

/// The emulated ComfyUI's configuration for this test run (see [`comfyui_version`]).
pub(crate) fn emulator_config() -> EmulatorConfig {
    EmulatorConfig { comfyui_version: comfyui_version(), ..EmulatorConfig::default() }
}

/// Starts an emulated ComfyUI on an ephemeral port, of the generation this run tests.
pub(crate) async fn spawn_comfy() -> ComfyEmulator {
    spawn_comfy_version(comfyui_version()).await
}

/// Starts an emulated ComfyUI of a given generation on an ephemeral port.
pub(crate) async fn spawn_comfy_version(comfyui_version: ComfyVersion) -> ComfyEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind emulator");
    let config = EmulatorConfig { comfyui_version, ..EmulatorConfig::default() };
    ComfyEmulator::start(listener, config).await.expect("start emulator")
}

/// A PNG of `w`×`h` pixels with a gradient, so every pixel differs from its inverse.
pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 77])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// A SubmitJobRequest for a catalog workflow with an input image.
pub(crate) fn submit_request(workflow: &str, image: Vec<u8>) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow(workflow.into())),
        image: Some(pb::InputImage {
            data: image.into(),
            filename: "in.png".into(),
            content_type: "image/png".into(),
        }),
        ..Default::default()
    }
}

/// Reads a job's whole event stream from `after` until it ends (bounded by a generous timeout).
pub(crate) async fn collect_events(channel: &Channel, job_id: &str, after: u64) -> Vec<pb::JobEvent> {
    let mut client =
        pb::job_service_client::JobServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut stream = client
        .stream_job(pb::StreamJobRequest {
            job_id: job_id.into(),
            after_sequence: after,
            skip_previews: false,
        })
        .await
        .expect("stream_job")
        .into_inner();
    let mut events = Vec::new();
    let read = async {
        while let Some(e) = stream.message().await.expect("stream item") {
            events.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("stream ends within 60 s");
    events
}

/// The state of the terminal event of a stream, as a short name.
pub(crate) fn terminal(events: &[pb::JobEvent]) -> &'static str {
    use pb::job_event::Kind;
    match events.last().and_then(|e| e.kind.as_ref()) {
        Some(Kind::Succeeded(_)) => "succeeded",
        Some(Kind::Failed(_)) => "failed",
        Some(Kind::Cancelled(_)) => "cancelled",
        _ => "none",
    }
}

/// Asserts sequences are 1.. (or after+1..) without gaps or duplicates.
pub(crate) fn assert_gap_free(events: &[pb::JobEvent], after: u64) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.sequence, after + 1 + i as u64, "sequence gap or duplicate at index {i}: {events:?}");
    }
}

impl TestApp {
    /// Cancels the shutdown token and waits for the server to return (bounded).
    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let server = self.server.take().expect("server running");
        tokio::time::timeout(Duration::from_secs(20), server).await.expect("server stops within 20 s")?
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Asserts `status` is INVALID_ARGUMENT whose BadRequest names every one of `fields`; returns all fields named.
pub(crate) fn assert_violations(status: &tonic::Status, fields: &[&str]) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let named: Vec<String> = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    for f in fields {
        assert!(named.iter().any(|x| x == f), "{f} missing from {named:?}");
    }
    named
}

/// Follows a job's stream until an event matches `pred` (bounded); panics if the stream ends first.
pub(crate) async fn wait_for_event(channel: &Channel, job_id: &str, pred: impl Fn(&pb::JobEvent) -> bool) {
    let mut client = pb::job_service_client::JobServiceClient::new(channel.clone());
    let mut stream = client
        .stream_job(pb::StreamJobRequest { job_id: job_id.into(), ..Default::default() })
        .await
        .expect("stream_job")
        .into_inner();
    let found = async {
        while let Some(e) = stream.message().await.expect("stream item") {
            if pred(&e) {
                return;
            }
        }
        panic!("the stream of {job_id} ended before the awaited event");
    };
    tokio::time::timeout(Duration::from_secs(30), found).await.expect("event within 30 s");
}

/// Starts comfyrelay with API keys required (`auth.mode = "keys"`), after `customize` adjusts the
/// configuration. Create keys with [`TestApp::create_key`]; call with [`TestApp::clients`].
pub(crate) async fn spawn_app_with_auth(customize: impl FnOnce(&mut Config)) -> TestApp {
    let app = spawn_app_with(|c| {
        c.auth.mode = Some(comfyrelay::config::AuthMode::Keys);
        customize(c);
    })
    .await;
    // Health (open without a key) answers once the server serves, so its database is migrated before a
    // test opens it to create keys.
    tonic_health::pb::health_client::HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers");
    app
}

/// Sends `authorization: Bearer <key>` on every call (nothing when there is no key).
#[derive(Clone)]
pub(crate) struct Bearer(pub(crate) Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends a key.
pub(crate) type Keyed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// The three service clients, calling with one key.
pub(crate) struct Clients {
    pub(crate) jobs: pb::job_service_client::JobServiceClient<Keyed>,
    pub(crate) workflows: pb::workflow_service_client::WorkflowServiceClient<Keyed>,
    pub(crate) machines: pb::machine_service_client::MachineServiceClient<Keyed>,
}

impl TestApp {
    /// Creates an API key in the app's database, as `comfyrelay keys create` does; `expired` makes one
    /// that expired a second ago.
    pub(crate) async fn create_key(
        &self,
        tenant: &str,
        role: comfyrelay::auth::Role,
        expired: bool,
    ) -> String {
        let store = comfyrelay::store::SqliteStore::open(self.data_dir.path(), Default::default())
            .await
            .expect("open the app's database");
        let now = comfyrelay::jobs::model::now_ms();
        let (expires, at) = if expired { (Some(Duration::from_secs(1)), now - 2_000) } else { (None, now) };
        let created =
            comfyrelay::auth::create_key(&store, tenant, role, expires, at).await.expect("create a key");
        created.key.expose().to_string()
    }

    /// Revokes a key in the app's database, as `comfyrelay keys revoke` does.
    pub(crate) async fn revoke_key(&self, key: &str) {
        use comfyrelay::store::KeyStore;
        let store = comfyrelay::store::SqliteStore::open(self.data_dir.path(), Default::default())
            .await
            .expect("open the app's database");
        let prefix = comfyrelay::auth::parse_key(key).expect("a key");
        assert!(store.revoke_key(prefix, comfyrelay::jobs::model::now_ms()).await.expect("revoke"));
    }

    /// Clients that send `authorization` with this raw value (`Bearer <key>`), or none.
    pub(crate) fn clients_with_header(&self, authorization: Option<&str>) -> Clients {
        let bearer = Bearer(authorization.map(|v| v.parse().expect("ascii metadata")));
        let keyed =
            || tonic::service::interceptor::InterceptedService::new(self.channel.clone(), bearer.clone());
        Clients {
            jobs: pb::job_service_client::JobServiceClient::new(keyed())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            workflows: pb::workflow_service_client::WorkflowServiceClient::new(keyed()),
            machines: pb::machine_service_client::MachineServiceClient::new(keyed()),
        }
    }

    /// Clients that call with `key`.
    pub(crate) fn clients(&self, key: &str) -> Clients {
        self.clients_with_header(Some(&format!("Bearer {key}")))
    }
}

/// A `Watch` of one service's health on `channel`; [`HealthWatch::next`] is its next status (bounded).
pub(crate) struct HealthWatch(tonic::Streaming<tonic_health::pb::HealthCheckResponse>);

impl HealthWatch {
    pub(crate) async fn start(channel: &Channel, service: &str) -> Self {
        let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let watch = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .watch(request)
            .await
            .expect("watch the health");
        Self(watch.into_inner())
    }

    /// Asserts that the watch ends (cleanly) within 10 s, with no status before.
    pub(crate) async fn ended(&mut self) {
        let end =
            tokio::time::timeout(Duration::from_secs(10), self.0.message()).await.expect("the watch ends");
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    /// The next status sent, within 30 s.
    pub(crate) async fn next(&mut self) -> tonic_health::pb::health_check_response::ServingStatus {
        tokio::time::timeout(Duration::from_secs(30), self.0.message())
            .await
            .expect("a health change within 30 s")
            .expect("watch item")
            .expect("watch open")
            .status()
    }
}
