//! RPCs whose capability belongs to a later issue answer `UNIMPLEMENTED`, with a reason, not a hang.

use comfyrelay::proto::pb;

use crate::helpers::spawn_app;

#[tokio::test]
async fn machine_service_is_unimplemented_until_the_pool_lands() {
    let mut app = spawn_app().await;
    let err = app.machines.list_machines(pb::ListMachinesRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let err = app.machines.get_machine(pb::GetMachineRequest { machine_id: "m".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let err =
        app.machines.drain_machine(pb::DrainMachineRequest { machine_id: "m".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}
