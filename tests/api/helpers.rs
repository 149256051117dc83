//! `spawn_app()`: a real comfyrelay on an ephemeral port, with connected clients and a private data dir.

use std::{path::PathBuf, time::Duration};

use comfyrelay::{Config, proto::pb};
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
    #[allow(dead_code, reason = "kept alive for the app's lifetime")]
    pub(crate) data_dir: tempfile::TempDir,
}

/// The default test configuration: ephemeral port, private data dir, the repo's workflows.
pub(crate) fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.grpc.listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = data_dir.to_path_buf();
    config.workflows_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workflows");
    config.grpc.shutdown_grace = Duration::from_secs(5);
    config
}

/// Starts comfyrelay with the default test configuration.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts comfyrelay after `customize` adjusts the test configuration.
pub(crate) async fn spawn_app_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    comfyrelay::telemetry::init_for_tests(std::env::var_os("TEST_LOG").is_some());
    let data_dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(data_dir.path());
    customize(&mut config);
    // Bind before spawning: the port accepts connections as soon as we return, no sleep needed.
    let listener = tokio::net::TcpListener::bind(config.grpc.listen).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(comfyrelay::run(listener, config, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to comfyrelay");
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
        data_dir,
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
