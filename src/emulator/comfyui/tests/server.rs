//! End-to-end behaviour of the emulated server: message order, routing, queue and history shapes.

use super::harness::*;
use serde_json::json;

fn c2_prompt(prefix: &str, color: i64) -> serde_json::Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 32, "height": 24, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    })
}

#[tokio::test]
async fn c2_sequence_then_fully_cached_rerun() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("c-1")).await;
    let first = ws.next().await;
    assert_eq!(first.kind(), "status");
    assert_eq!(first.data()["sid"], "c-1");
    ws.send_flags().await;
    assert_eq!(ws.next().await.kind(), "feature_flags");

    let (status, body) = post_prompt(&emu, &json!({"prompt": c2_prompt("t", 77), "client_id": "c-1"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["number"], 0);
    let pid = body["prompt_id"].as_str().expect("id").to_string();
    let frames = ws.until_done(&pid).await;
    let executing: Vec<String> = frames
        .iter()
        .filter(|f| f.kind() == "executing")
        .map(|f| f.data()["node"].as_str().unwrap_or("null").to_string())
        .collect();
    assert_eq!(executing, vec!["1", "2", "5", "3", "4", "null"]);
    let k = kinds(&frames);
    assert_eq!(&k[..4], &["status", "status", "execution_start", "execution_cached"]);
    assert_eq!(&k[k.len() - 3..], &["execution_success", "status", "executing"]);

    let (_, body) = post_prompt(&emu, &json!({"prompt": c2_prompt("t", 77), "client_id": "c-1"})).await;
    let pid2 = body["prompt_id"].as_str().expect("id").to_string();
    let frames = ws.until_done(&pid2).await;
    assert_eq!(
        kinds(&frames),
        vec![
            "status", "status", "execution_start", "execution_cached", "executed", "progress_state", "executed",
            "progress_state", "execution_success", "status", "executing"
        ]
    );
    assert_eq!(frames[3].data()["nodes"], json!(["1", "2", "3", "4", "5"]));
    let hist = get_json(&emu, &format!("/history/{pid2}")).await;
    assert_eq!(hist[&pid2]["status"]["status_str"], "success");
    assert_eq!(hist[&pid2]["outputs"]["4"]["images"][0]["filename"], "t_00001_.png");
    ws.close().await;
}
