//! The gRPC server adapter: the only server module (with `proto`) that knows tonic and `pb::` types
//! (`cli` is its client-side counterpart).
//!
//! Serves `comfyrelay.v1` (jobs, workflows, machines), `grpc.health.v1`, server reflection (v1 and
//! v1alpha, with the `google.rpc` error detail types) and gRPC-Web, and stops gracefully when the
//! shutdown token is cancelled. With gRPC-Web on, it also serves the web console at `/console`
//! ([`crate::console`]) and answers CORS for the origins in `grpc.cors_origins` (`cors`).
//!
//! Health tells the truth: `comfyrelay.v1.JobService` follows [`crate::health`] (NOT_SERVING while no
//! backend can take a job), and at drain every service and the overall one (`""`) turn NOT_SERVING, after
//! which every `Watch` ends (`health`), so none holds the graceful stop open. Every
//! call is counted and timed (`observe`) and runs in a span that continues the caller's `traceparent`.
//!
//! Every call but those of `auth.open_services` (health, reflection) is authenticated once by the `auth`
//! layer, which leaves the caller's `Principal` in the request for the handlers: they scope every job read
//! to its tenant.
//!
//! Bounded by default (README "Limits"): connections, handshake and idle time (`connections`), HTTP/2
//! keepalive and streams per connection (tonic's builder, below), message size, and every error carries
//! an `ErrorInfo` (`error_details`).
//!
//! TLS and mTLS (`tls`, with certificate reload) wrap the bounded connections; browser requests (gRPC-Web,
//! HTTP/1) must name an allowed `Host` and `Origin` (`browser`).

mod auth;
mod browser;
mod connections;
mod console;
mod convert;
mod cors;
mod error_details;
mod health;
mod jobs;
mod machines;
mod observe;
mod standby;
pub mod status;
pub mod tls;
mod workflows;

pub use standby::{LEADER_URL, StandbyParts, serve_standby};

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{catalog::Catalog, config::Config, jobs::JobManager, proto::pb};

/// The health-checked name of the job service (what the Kubernetes readiness probe asks about).
const JOB_SERVICE: &str = "comfyrelay.v1.JobService";
const WORKFLOW_SERVICE: &str = "comfyrelay.v1.WorkflowService";
const MACHINE_SERVICE: &str = "comfyrelay.v1.MachineService";

/// The domain handles the services call.
#[derive(Debug, Clone)]
pub struct Services {
    /// The job engine.
    pub jobs: JobManager,
    /// The workflow catalog.
    pub catalog: Catalog,
    /// The RunComfy pool, when enabled.
    pub pool: Option<crate::pool::Pool>,
    /// Who is calling (checked once per call by the auth layer).
    pub auth: crate::auth::Authenticator,
}

/// The call counter of every server of a replica (leader or standby), knowing every method either serves
/// or forwards.
fn calls_layer() -> observe::MetricsLayer {
    observe::MetricsLayer::new(&[
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
}

/// Server reflection (v1 and v1alpha) of `comfyrelay.v1`, health and the `google.rpc` error detail types
/// (so reflection clients, `buf curl` and grpcurl, decode an error's details instead of printing bytes):
/// what the leader and every standby serve.
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let sets = [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ];
    let v1 = sets
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, set| {
            b.register_encoded_file_descriptor_set(set)
        })
        .build_v1()?;
    let v1alpha = sets
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, set| {
            b.register_encoded_file_descriptor_set(set)
        })
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// `WorkflowService` over `catalog`, bounded to `max` bytes a message: served by the leader and by every
/// standby (the catalog is each replica's own, loaded from its configuration).
fn workflow_service(
    catalog: Catalog,
    max: usize,
) -> pb::workflow_service_server::WorkflowServiceServer<workflows::WorkflowApi> {
    pb::workflow_service_server::WorkflowServiceServer::new(workflows::WorkflowApi::new(catalog))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

/// Serves every service on `listener` until `shutdown` is cancelled, over TLS when `tls` is given (from
/// [`tls::Tls::load`], before anything else starts, so files that do not load stop the start at once).
///
/// # Errors
/// A transport failure while serving.
pub async fn serve(
    listener: Arc<TcpListener>,
    config: &Config,
    services: Services,
    tls: Option<tls::Tls>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Services { jobs: job_manager, catalog, pool, auth } = services;
    let auth = auth::AuthLayer::new(auth);
    let max = config.grpc.max_message_bytes;
    let health = tonic_health::server::HealthReporter::new();
    // Cancelled once the drain's statuses are set: then every health watch ends (`health`).
    let drained = CancellationToken::new();
    let health_service = tonic_health::pb::health_server::HealthServer::new(health::DrainingHealth::new(
        health.clone(),
        drained.clone(),
    ));
    // JobService starts NOT_SERVING: the readiness watch turns it SERVING once a backend can take a job.
    health.set_not_serving::<pb::job_service_server::JobServiceServer<jobs::JobApi>>().await;
    health.set_serving::<pb::workflow_service_server::WorkflowServiceServer<workflows::WorkflowApi>>().await;
    health.set_serving::<pb::machine_service_server::MachineServiceServer<machines::MachineApi>>().await;

    let (reflection_v1, reflection_v1alpha) = reflection()?;

    let jobs = pb::job_service_server::JobServiceServer::new(jobs::JobApi::new(
        jobs::Jobs::Engine(job_manager.clone()),
        shutdown.clone(),
        config.jobs.request_limits(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let workflows = workflow_service(catalog, max);
    let pool_for_health = pool.clone();
    let machines = pb::machine_service_server::MachineServiceServer::new(machines::MachineApi::new(
        job_manager.clone(),
        pool,
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);

    let addr = listener.local_addr()?;
    tracing::info!(%addr, grpc_web = config.grpc.grpc_web, "serving gRPC");

    let g = &config.grpc;
    let file_limit = connections::open_file_limit();
    let max_connections = connections::effective_max_connections(g.max_connections, file_limit);
    if max_connections < g.max_connections {
        tracing::warn!(
            configured = g.max_connections,
            open_file_limit = file_limit,
            using = max_connections,
            "grpc.max_connections leaves too few open files for the rest of the service; lowered (raise the \
             open-file limit, e.g. LimitNOFILE=, to allow more)"
        );
    }
    if let Some(tls) = &tls {
        tracing::info!(mutual = tls.mutual(), "gRPC over TLS");
    }
    let incoming = tls::incoming(
        connections::incoming(
            listener,
            connections::ConnectionLimits {
                max_connections,
                handshake_timeout: g.handshake_timeout,
                idle_timeout: g.idle_timeout,
            },
        ),
        tls.clone(),
        g.handshake_timeout,
        max_connections,
    );
    // Owned by this call (aborted when it returns): polls the TLS files while the server runs.
    let _reload = tls.map(|tls| {
        let watch = tracing::Instrument::instrument(tls.watch(), tracing::info_span!("tls_reload"));
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch))
    });
    // The one writer of health statuses: readiness changes until the drain, then NOT_SERVING for good. It is
    // the server's shutdown future, so the drain starts only after load balancers were told.
    let token = shutdown.clone();
    let signal = async move {
        let reporter = health.clone();
        crate::health::watch(job_manager, pool_for_health, token, move |ready| {
            let reporter = reporter.clone();
            async move {
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(JOB_SERVICE, status).await;
            }
        })
        .await;
        // Tell load balancers first, so no new work arrives while we drain: every service, and the
        // server as a whole ("").
        for service in [JOB_SERVICE, WORKFLOW_SERVICE, MACHINE_SERVICE, ""] {
            health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
        }
        drained.cancel();
        tracing::info!("draining gRPC connections");
    };

    let calls = calls_layer();
    let builder = Server::builder()
        .accept_http1(config.grpc.grpc_web)
        .http2_keepalive_interval(Some(g.keepalive_interval))
        .http2_keepalive_timeout(Some(g.keepalive_timeout))
        .max_concurrent_streams(Some(g.max_concurrent_streams))
        .trace_fn(observe::call_span);
    let browser = browser::BrowserCheckLayer::new(&g.allowed_hosts, &g.cors_origins);
    let router = if config.grpc.grpc_web {
        builder
            // Outermost: a browser request with a foreign Host or Origin is refused before anything
            // (even the console's assets) answers it.
            .layer(browser)
            .layer(console::ConsoleLayer)
            .layer(cors::layer(&config.grpc.cors_origins))
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(calls)
            .layer(connections::CallTrackingLayer::new(&g.tls.replica_subjects))
            .layer(error_details::ErrorDetailsLayer::new(max))
            .layer(auth.clone())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(jobs)
            .add_service(workflows)
            .add_service(machines)
            .serve_with_incoming_shutdown(incoming, signal)
            .await
    } else {
        builder
            .layer(browser)
            .layer(calls)
            .layer(connections::CallTrackingLayer::new(&g.tls.replica_subjects))
            .layer(error_details::ErrorDetailsLayer::new(max))
            .layer(auth.clone())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(jobs)
            .add_service(workflows)
            .add_service(machines)
            .serve_with_incoming_shutdown(incoming, signal)
            .await
    };
    router?;
    tracing::info!("gRPC server stopped");
    Ok(())
}
