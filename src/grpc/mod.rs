//! The gRPC adapter: the only module (with `proto`) that knows tonic and `pb::` types.
//!
//! Serves `comfyrelay.v1` (jobs, workflows, machines), `grpc.health.v1`, server reflection (v1 and
//! v1alpha) and gRPC-Web, and stops gracefully when the shutdown token is cancelled.
//!
//! Bounded by default (README "Limits"): connections, handshake and idle time (`connections`), HTTP/2
//! keepalive and streams per connection (tonic's builder, below), message size, and every error carries
//! an `ErrorInfo` (`error_details`).

mod connections;
mod convert;
mod error_details;
mod jobs;
mod machines;
pub mod status;
mod workflows;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{catalog::Catalog, config::Config, jobs::JobManager, proto::pb};

/// The domain handles the services call.
#[derive(Debug, Clone)]
pub struct Services {
    /// The job engine.
    pub jobs: JobManager,
    /// The workflow catalog.
    pub catalog: Catalog,
    /// The RunComfy pool, when enabled.
    pub pool: Option<crate::pool::Pool>,
}

/// Serves every service on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// A transport failure while serving.
pub async fn serve(
    listener: TcpListener,
    config: &Config,
    services: Services,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Services { jobs: job_manager, catalog, pool } = services;
    let max = config.grpc.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::job_service_server::JobServiceServer<jobs::JobApi>>().await;
    health.set_serving::<pb::workflow_service_server::WorkflowServiceServer<workflows::WorkflowApi>>().await;
    health.set_serving::<pb::machine_service_server::MachineServiceServer<machines::MachineApi>>().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let jobs = pb::job_service_server::JobServiceServer::new(jobs::JobApi::new(
        job_manager.clone(),
        shutdown.clone(),
        config.jobs.request_limits(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let workflows =
        pb::workflow_service_server::WorkflowServiceServer::new(workflows::WorkflowApi::new(catalog))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
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
    let incoming = connections::incoming(
        listener,
        connections::ConnectionLimits {
            max_connections,
            handshake_timeout: g.handshake_timeout,
            idle_timeout: g.idle_timeout,
        },
    );
    let health_for_shutdown = health.clone();
    let token = shutdown.clone();
    let signal = async move {
        token.cancelled().await;
        // Tell load balancers first, so no new work arrives while we drain.
        health_for_shutdown.set_not_serving::<pb::job_service_server::JobServiceServer<jobs::JobApi>>().await;
        tracing::info!("draining gRPC connections");
    };

    let builder = Server::builder()
        .accept_http1(config.grpc.grpc_web)
        .http2_keepalive_interval(Some(g.keepalive_interval))
        .http2_keepalive_timeout(Some(g.keepalive_timeout))
        .max_concurrent_streams(Some(g.max_concurrent_streams))
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()));
    let router = if config.grpc.grpc_web {
        builder
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(connections::CallTrackingLayer)
            .layer(error_details::ErrorDetailsLayer::new(max))
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
            .layer(connections::CallTrackingLayer)
            .layer(error_details::ErrorDetailsLayer::new(max))
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
