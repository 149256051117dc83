//! The connection to a comfyrelay server: its address and API key (from flags or `COMFYRELAY_SERVER` /
//! `COMFYRELAY_API_KEY`, parsed by clap in `main`), one channel, and the three service clients. An
//! `https://` server is reached over TLS (the public roots, or `--ca-cert`; `--client-cert`/`--client-key`
//! for mTLS).
//!
//! The key is sent as `authorization: Bearer <key>` metadata on every call, marked sensitive, and never
//! printed (`Debug` redacts it, and clap hides its value in `--help`).
//!
//! Every one-shot call goes through [`Clients::call`], which retries it while the server is unavailable
//! (`--retry-for`): each is safe to repeat (reads, a cancel, a submit with its idempotency key). A
//! download cut midway resumes at the byte it reached, under the same budget ([`Clients::retry`]).

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{
    error::{CliError, chain},
    follow::Retry,
    render::{Printer, Resume},
};
use crate::{config::Secret, proto::pb};

/// Largest message the client accepts: outputs inline in events can be large.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Flags every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The comfyrelay server's gRPC address.
    #[arg(long, env = "COMFYRELAY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "COMFYRELAY_API_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub api_key: Option<Secret>,
    /// Print one JSON object per line on stdout (for scripts) instead of human output.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the connection.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Retry a call this long while the server answers UNAVAILABLE or the connection breaks (a restart,
    /// a replica taking over, its database away); every call retried is safe to repeat.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
    /// For an `https://` server: a PEM CA certificate to trust instead of the public roots.
    #[arg(long, env = "COMFYRELAY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// For an `https://` server that asks for client certificates (mTLS): this PEM certificate...
    #[arg(long, env = "COMFYRELAY_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// ...and its PEM private key.
    #[arg(long, env = "COMFYRELAY_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// The TLS configuration of the flags: the CA (else the public roots) and the client identity.
fn client_tls(args: &ConnectArgs) -> Result<ClientTlsConfig, CliError> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &args.ca_cert {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read("--ca-cert", path)?)),
        None => tls.with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        tls = tls.identity(Identity::from_pem(read("--client-cert", cert)?, read("--client-key", key)?));
    }
    Ok(tls)
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

/// Adds the API key to every call.
#[derive(Clone)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Auth(Bearer ***)" } else { "Auth(none)" })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, Auth>;

/// Connected clients of the three services, sharing one channel.
#[derive(Debug, Clone)]
pub(crate) struct Clients {
    pub(crate) jobs: pb::job_service_client::JobServiceClient<Svc>,
    pub(crate) workflows: pb::workflow_service_client::WorkflowServiceClient<Svc>,
    pub(crate) machines: pb::machine_service_client::MachineServiceClient<Svc>,
    /// `--retry-for`.
    retry_for: Duration,
    /// How retries are told (`--json`).
    printer: Printer,
    /// Whether the server has answered a call of this process (see [`Retry`]).
    answered: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `host:port` becomes `http://host:port`.
fn normalize(server: &str) -> String {
    if server.contains("://") { server.to_string() } else { format!("http://{server}") }
}

impl Clients {
    /// Connects to the server (the channel reconnects by itself after a lost connection).
    ///
    /// # Errors
    /// [`CliError::Usage`] for a malformed address or key, [`CliError::Unreachable`] when the server
    /// cannot be reached within the connect timeout.
    pub(crate) async fn connect(args: &ConnectArgs) -> Result<Self, CliError> {
        let server = normalize(&args.server);
        let endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| CliError::Usage(format!("--server {server:?} is not a valid address: {e}")))?
            .connect_timeout(args.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        let endpoint = if server.starts_with("https://") {
            endpoint
                .tls_config(client_tls(args)?)
                .map_err(|e| CliError::Usage(format!("TLS: {}", chain(&e))))?
        } else {
            endpoint
        };
        let auth = match &args.api_key {
            Some(key) => {
                let mut value: MetadataValue<Ascii> = format!("Bearer {}", key.expose())
                    .parse()
                    .map_err(|_| CliError::Usage("the API key must be printable ASCII".into()))?;
                value.set_sensitive(true);
                Auth(Some(value))
            }
            None => Auth(None),
        };
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Unreachable { server: server.clone(), cause: chain(&e) })?;
        Ok(Self {
            jobs: pb::job_service_client::JobServiceClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            workflows: pb::workflow_service_client::WorkflowServiceClient::with_interceptor(
                channel.clone(),
                auth.clone(),
            )
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
            machines: pb::machine_service_client::MachineServiceClient::with_interceptor(channel, auth)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            retry_for: args.retry_for,
            printer: Printer { json: args.json },
            answered: Default::default(),
        })
    }

    /// A retry budget of `--retry-for` for one call (`name` in notices).
    pub(crate) fn retry(&self, name: &'static str) -> Retry<'_> {
        self.retry_within(name, self.retry_for)
    }

    /// A retry budget of `budget` (a stream's `--reconnect-for`) for one call or stream.
    pub(crate) fn retry_within(&self, name: &'static str, budget: Duration) -> Retry<'_> {
        Retry::new(name, budget, self.printer, &self.answered)
    }

    /// One call (`name` in retry notices) of `request`, repeated while the server is unavailable or the
    /// connection breaks, for up to `--retry-for` ([`Retry`]). Only for calls safe to repeat.
    ///
    /// # Errors
    /// The first error not worth a retry, or the last one once `--retry-for` has passed.
    pub(crate) async fn call<R: Clone, T, Fut>(
        &self,
        name: &'static str,
        request: R,
        call: impl Fn(Self, R) -> Fut,
    ) -> Result<T, CliError>
    where
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut retry = self.retry(name);
        loop {
            match call(self.clone(), request.clone()).await {
                Ok(response) => {
                    retry.answered();
                    return Ok(response.into_inner());
                }
                Err(status) => retry.again(status, Resume::Repeat).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_sent_as_bearer_and_never_shown() {
        let mut value: MetadataValue<Ascii> = "Bearer k-123".parse().expect("ascii");
        value.set_sensitive(true);
        let mut auth = Auth(Some(value));
        assert!(!format!("{auth:?}").contains("k-123"));
        let request = auth.call(tonic::Request::new(())).expect("intercept");
        assert_eq!(
            request.metadata().get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer k-123")
        );
        assert_eq!(normalize("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(normalize("https://relay.example:443"), "https://relay.example:443");
    }
}
