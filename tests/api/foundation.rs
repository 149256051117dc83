//! Health, reflection, limits and shutdown, through real sockets.

use std::time::Duration;

use comfyrelay::proto::pb;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel.clone());
    // JobService is SERVING once a backend can take a job: wait (bounded) for the socket to its ComfyUI.
    let mut watch = health
        .watch(HealthCheckRequest { service: "comfyrelay.v1.JobService".into() })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while watch.message().await.expect("watch item").expect("watch open").status()
            != ServingStatus::Serving
        {}
    })
    .await
    .expect("JobService SERVING within 30 s");
    drop(watch);
    for service in
        ["", "comfyrelay.v1.JobService", "comfyrelay.v1.WorkflowService", "comfyrelay.v1.MachineService"]
    {
        let resp = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }
    let err = health.check(HealthCheckRequest { service: "nope.Service".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_every_public_service() {
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response: {resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "comfyrelay.v1.JobService",
        "comfyrelay.v1.WorkflowService",
        "comfyrelay.v1.MachineService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[tokio::test]
async fn reflection_v1alpha_is_served_too() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("comfyrelay.v1.JobService".into())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().expect("one response");
    assert!(
        matches!(resp.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{resp:?}"
    );
}

#[tokio::test]
async fn grpc_web_requests_are_answered() {
    // A browser speaks gRPC-Web over HTTP/1.1: frame = flag(0) + u32 length + message.
    let app = spawn_app().await;
    let body = vec![0u8, 0, 0, 0, 0]; // empty ListWorkflowsRequest
    let resp = reqwest::Client::new()
        .post(format!("http://{}/comfyrelay.v1.WorkflowService/ListWorkflows", app.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(body)
        .send()
        .await
        .expect("grpc-web request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/grpc-web+proto")
    );
}

#[tokio::test]
async fn shutdown_stops_the_server_promptly() {
    let mut app = spawn_app().await;
    let started = tokio::time::Instant::now();
    app.stop().await.expect("clean stop");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The port no longer accepts gRPC.
    let err =
        pb::workflow_service_client::WorkflowServiceClient::connect(format!("http://{}", app.addr)).await;
    assert!(err.is_err(), "server still accepting after stop");
}
