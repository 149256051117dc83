//! The contract as reflection clients see it: the `google.rpc` detail types are served, so `buf curl` and
//! grpcurl print an error's details decoded.

use prost::Message as _;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::helpers::Dev;

#[tokio::test]
async fn reflection_serves_the_google_rpc_detail_types() {
    let dev = Dev::start(&["--comfy-port", "0"]);
    let channel = tonic::transport::Endpoint::from_shared(dev.server.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    for symbol in
        ["google.rpc.BadRequest", "google.rpc.ErrorInfo", "google.rpc.RetryInfo", "google.rpc.Status"]
    {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection call")
            .into_inner();
        let answer = answers.message().await.expect("answer").expect("one answer");
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
            panic!("{symbol} is not served: {:?}", answer.message_response);
        };
        let files: Vec<prost_types::FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).expect("descriptor"))
            .collect();
        let message = symbol.trim_start_matches("google.rpc.");
        assert!(
            files
                .iter()
                .any(|f| f.package() == "google.rpc" && f.message_type.iter().any(|m| m.name() == message)),
            "{symbol} must be declared in the answer: {:?}",
            files.iter().map(|f| f.name()).collect::<Vec<_>>()
        );
    }
}
