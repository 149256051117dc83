//! Each fault's observable effect, through real sockets.

use super::harness::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn trivial(color: i64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    })
}

fn ws_save(color: i64, batch: i64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": batch, "color": color}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    })
}

async fn submit(emu: &super::super::ComfyEmulator, prompt: Value, client: &str) -> String {
    let (status, body) = post_prompt(emu, &json!({"prompt": prompt, "client_id": client})).await;
    assert_eq!(status, 200, "{body}");
    body["prompt_id"].as_str().expect("prompt_id").to_string()
}

async fn wait_history(emu: &super::super::ComfyEmulator, pid: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = get_json(emu, &format!("/history/{pid}")).await;
        if h.get(pid).is_some() {
            return h[pid].clone();
        }
        assert!(Instant::now() < deadline, "{pid} never reached history");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn drop_sockets_now_closes_without_close_frame_and_reconnect_works() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("d")).await;
    assert_eq!(ws.next().await.kind(), "status");
    emu.faults().drop_sockets_now();
    assert!(matches!(ws.next().await, Frame::Closed { clean: false }));
    let mut again = Ws::connect(&emu, Some("d")).await;
    assert_eq!(again.next().await.kind(), "status");
    let pid = submit(&emu, trivial(1), "d").await;
    again.until_done(&pid).await;
}

#[tokio::test]
async fn drop_sockets_after_n_messages() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("n")).await;
    assert_eq!(ws.next().await.kind(), "status");
    emu.faults().drop_sockets_after(4);
    submit(&emu, trivial(2), "n").await;
    // status (put), status (get), execution_start, execution_cached, then the drop.
    let frames = ws.until(|f| matches!(f, Frame::Closed { .. })).await;
    assert_eq!(
        kinds(&frames),
        vec!["status", "status", "execution_start", "execution_cached", "closed(clean=false)"]
    );
}

#[tokio::test]
async fn silent_socket_stays_open_but_says_nothing_then_recovers() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("s")).await;
    assert_eq!(ws.next().await.kind(), "status");
    emu.faults().set_silent(true);
    let pid = submit(&emu, trivial(3), "s").await;
    wait_history(&emu, &pid).await;
    ws.assert_quiet(Duration::from_millis(200)).await;
    emu.faults().set_silent(false);
    let pid2 = submit(&emu, trivial(4), "s").await;
    let frames = ws.until_done(&pid2).await;
    assert_eq!(frames[0].kind(), "status");
}

#[tokio::test]
async fn fail_node_reports_execution_error_with_the_full_field_set() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("f")).await;
    ws.next().await;
    emu.faults().fail_node("PreviewImage", "boom");
    let pid = submit(&emu, trivial(5), "f").await;
    let frames = ws.until_done(&pid).await;
    let err = frames.iter().find(|f| f.kind() == "execution_error").expect("execution_error");
    let keys: Vec<&String> = err.data().as_object().expect("object").keys().collect();
    assert_eq!(
        keys,
        vec![
            "prompt_id",
            "node_id",
            "node_type",
            "executed",
            "exception_message",
            "exception_type",
            "traceback",
            "current_inputs",
            "current_outputs",
            "timestamp"
        ]
    );
    assert_eq!(err.data()["node_id"], "2");
    assert_eq!(err.data()["exception_message"], "boom\n");
    assert_eq!(err.data()["executed"], json!(["1"]));
    let tail: Vec<String> = kinds(&frames[frames.len() - 3..]);
    assert_eq!(tail, vec!["execution_error", "status", "executing"]);
    let h = wait_history(&emu, &pid).await;
    assert_eq!(h["status"]["status_str"], "error");
    assert_eq!(h["status"]["completed"], false);

    emu.faults().clear();
    let pid = submit(&emu, trivial(5), "f").await;
    let frames = ws.until_done(&pid).await;
    assert!(frames.iter().any(|f| f.kind() == "execution_success"));
}

#[tokio::test]
async fn vanished_prompt_leaves_no_trace_and_the_next_one_runs() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("v")).await;
    ws.next().await;
    emu.faults().vanish_next_prompt();
    let gone = submit(&emu, trivial(6), "v").await;
    let pid = submit(&emu, trivial(7), "v").await;
    let frames = ws.until_done(&pid).await;
    assert!(frames.iter().all(|f| f.data()["prompt_id"] != gone.as_str()));
    assert_eq!(get_json(&emu, &format!("/history/{gone}")).await, json!({}));
    let q = get_json(&emu, "/queue").await;
    assert!(!q.to_string().contains(&gone));
    assert_eq!(emu.history_ids(), vec![pid]);
}

#[tokio::test]
async fn history_delay_slows_history_only() {
    let emu = start().await;
    let delay = Duration::from_millis(800);
    emu.faults().set_history_delay(delay);
    let t = Instant::now();
    get_json(&emu, "/queue").await;
    let queue_took = t.elapsed();
    let t = Instant::now();
    get_json(&emu, "/history").await;
    get_json(&emu, "/history/any").await;
    assert!(t.elapsed() >= 2 * delay);
    assert!(queue_took < delay);
}

#[tokio::test]
async fn fail_http_returns_comfyui_plain_500_for_the_next_n_matching_requests() {
    let emu = start().await;
    emu.faults().fail_http("/prompt", 2);
    for path in ["/prompt", "/api/prompt"] {
        let resp = http()
            .post(format!("{}{path}", emu.url()))
            .json(&json!({"prompt": trivial(1)}))
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(
            resp.text().await.expect("text"),
            "500 Internal Server Error\n\nServer got itself in trouble"
        );
    }
    let (status, _) = post_prompt(&emu, &json!({"prompt": trivial(1)})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn node_delay_with_progress_steps_reports_progress_and_honours_interrupt() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("p")).await;
    ws.next().await;
    emu.faults().set_node_delay(Duration::from_millis(40));
    emu.faults().set_node_progress_steps(4);
    let pid = submit(&emu, trivial(8), "p").await;
    let frames = ws.until_done(&pid).await;
    let progress: Vec<(u64, u64)> = frames
        .iter()
        .filter(|f| f.kind() == "progress")
        .map(|f| (f.data()["value"].as_u64().unwrap_or(99), f.data()["max"].as_u64().unwrap_or(99)))
        .collect();
    // Two nodes, four steps each.
    assert_eq!(progress, vec![(0, 4), (1, 4), (2, 4), (3, 4), (0, 4), (1, 4), (2, 4), (3, 4)]);

    emu.faults().set_node_delay(Duration::from_secs(5));
    emu.faults().set_node_progress_steps(50);
    let pid = submit(&emu, trivial(9), "p").await;
    ws.until(|f| f.kind() == "progress").await;
    let t = Instant::now();
    let resp = http()
        .post(format!("{}/interrupt", emu.url()))
        .json(&json!({"prompt_id": pid}))
        .send()
        .await
        .expect("interrupt");
    assert_eq!(resp.status(), 200);
    let frames = ws.until_done(&pid).await;
    assert!(t.elapsed() < Duration::from_secs(3), "interrupt honoured at the next progress step");
    let int = frames.iter().find(|f| f.kind() == "execution_interrupted").expect("interrupted");
    assert_eq!(int.data()["node_id"], "1");
}

#[tokio::test]
async fn restart_wipes_queue_history_counter_and_drops_sockets() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("r")).await;
    ws.next().await;
    let pid = submit(&emu, trivial(10), "r").await;
    ws.until_done(&pid).await;
    emu.faults().set_node_delay(Duration::from_secs(30));
    let slow = submit(&emu, trivial(11), "r").await;
    ws.until(|f| f.kind() == "executing").await;
    emu.restart().await;
    assert!(matches!(
        ws.until(|f| matches!(f, Frame::Closed { .. })).await.last(),
        Some(Frame::Closed { clean: false })
    ));
    emu.faults().clear();
    assert_eq!(get_json(&emu, &format!("/history/{pid}")).await, json!({}));
    assert_eq!(get_json(&emu, "/queue").await, json!({"queue_running": [], "queue_pending": []}));
    let mut again = Ws::connect(&emu, Some("r")).await;
    let status = again.next().await;
    assert_eq!(status.data()["status"]["exec_info"]["queue_remaining"], 0);
    let (_, body) = post_prompt(&emu, &json!({"prompt": trivial(12), "client_id": "r"})).await;
    assert_eq!(body["number"], 0);
    let pid = body["prompt_id"].as_str().expect("id").to_string();
    let frames = again.until_done(&pid).await;
    assert!(frames.iter().all(|f| f.data()["prompt_id"] != slow.as_str()));
    assert!(!emu.history_ids().contains(&slow));
}

#[tokio::test]
async fn shutdown_drops_sockets_without_close_frame_and_stops_serving() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("x")).await;
    ws.next().await;
    let url = emu.url();
    emu.shutdown().await;
    assert!(matches!(ws.next().await, Frame::Closed { clean: false }));
    assert!(http().get(format!("{url}/queue")).send().await.is_err());
}

#[tokio::test]
async fn save_image_websocket_is_never_cached() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("w")).await;
    ws.next().await;
    for _ in 0..2 {
        let pid = submit(&emu, ws_save(3, 2), "w").await;
        let frames = ws.until_done(&pid).await;
        let cached = frames.iter().find(|f| f.kind() == "execution_cached").expect("cached");
        assert!(!cached.data()["nodes"].as_array().expect("nodes").iter().any(|n| n == "2"));
        assert_eq!(frames.iter().filter(|f| f.kind() == "binary1").count(), 2);
    }
}
