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
            "status",
            "status",
            "execution_start",
            "execution_cached",
            "executed",
            "progress_state",
            "executed",
            "progress_state",
            "execution_success",
            "status",
            "executing"
        ]
    );
    assert_eq!(frames[3].data()["nodes"], json!(["1", "2", "3", "4", "5"]));
    let hist = get_json(&emu, &format!("/history/{pid2}")).await;
    assert_eq!(hist[&pid2]["status"]["status_str"], "success");
    assert_eq!(hist[&pid2]["outputs"]["4"]["images"][0]["filename"], "t_00001_.png");
    ws.close().await;
}

#[tokio::test]
async fn back_to_back_trivial_prompts_each_finish_before_the_next_is_sent() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("fast")).await;
    ws.next().await;
    for i in 0..200 {
        let prompt = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": i % 7}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
        });
        let (status, body) = post_prompt(&emu, &json!({"prompt": prompt, "client_id": "fast"})).await;
        assert_eq!(status, 200);
        ws.until_done(body["prompt_id"].as_str().expect("id")).await;
    }
    // How fast is for the bench to say (benches/throughput.rs, the direct client), never a test.
    assert_eq!(emu.history_ids().len(), 200);
}

#[tokio::test]
async fn interrupt_targets_only_the_running_prompt() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("i")).await;
    ws.next().await;
    emu.faults().set_node_delay(std::time::Duration::from_millis(300));
    let prompt = c2_prompt("i", 5);
    let (_, body) = post_prompt(&emu, &json!({"prompt": prompt, "client_id": "i"})).await;
    let pid = body["prompt_id"].as_str().expect("id").to_string();
    ws.until(|f| f.kind() == "executing").await;
    // Not the running prompt: ignored.
    let resp = http()
        .post(format!("{}/interrupt", emu.url()))
        .json(&json!({"prompt_id": "other"}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(0));
    http()
        .post(format!("{}/interrupt", emu.url()))
        .json(&json!({"prompt_id": pid}))
        .send()
        .await
        .expect("post");
    let frames = ws.until_done(&pid).await;
    let k = kinds(&frames);
    let i = k.iter().position(|t| t == "execution_interrupted").expect("interrupted");
    assert_eq!(k[i - 1], "executing", "the interrupt lands when the next node starts");
    assert_eq!(frames[i].data()["node_id"], frames[i - 1].data()["node"]);
    assert_eq!(frames[i].data()["executed"], json!(["1"]));
    let h = get_json(&emu, &format!("/history/{pid}")).await;
    assert_eq!(h[&pid]["status"]["status_str"], "error");
    assert_eq!(h[&pid]["status"]["messages"][2][0], "execution_interrupted");
}

#[tokio::test]
async fn duplicate_client_id_old_close_unroutes_the_new_socket() {
    let emu = start().await;
    let mut old = Ws::connect(&emu, Some("dup")).await;
    old.next().await;
    let mut new = Ws::connect(&emu, Some("dup")).await;
    new.next().await;
    old.send_close().await;
    assert!(matches!(old.next().await, Frame::Closed { clean: true }));
    let (_, body) = post_prompt(&emu, &json!({"prompt": c2_prompt("dup", 1), "client_id": "dup"})).await;
    let pid = body["prompt_id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + WAIT;
    while !emu.history_ids().contains(&pid) {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    new.assert_quiet(std::time::Duration::from_millis(100)).await;
}

#[tokio::test]
async fn http_error_shapes() {
    let emu = start().await;
    let c = http();
    let resp = c.post(format!("{}/system_stats", emu.url())).send().await.expect("post");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.text().await.expect("text"), "405: Method Not Allowed");
    let resp = c.get(format!("{}/no/such/route", emu.url())).send().await.expect("get");
    assert_eq!(resp.status(), 404);
    let resp = c.get(format!("{}/ws", emu.url())).send().await.expect("get");
    assert_eq!(resp.status(), 400);
    let resp = c
        .post(format!("{}/prompt", emu.url()))
        .header("Origin", "http://evil.example")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 403);
    let resp = c.get(format!("{}/api/internal/logs", emu.url())).send().await.expect("get");
    assert_eq!(resp.status(), 404);
    let resp = c.get(format!("{}/queue", emu.url())).send().await.expect("get");
    assert_eq!(resp.headers()["server"], "Python/3.11 aiohttp/3.14.5");
    let info = get_json(&emu, "/api/object_info").await;
    assert_eq!(info.as_object().expect("object").len(), 10);
    assert_eq!(get_json(&emu, "/features").await["max_upload_size"], 104857600);
}

#[tokio::test]
async fn view_serves_files_with_aiohttp_headers() {
    let emu = start().await;
    let png = test_png(4, 4);
    upload(&emu, "v.png", png.clone()).await;
    let resp =
        http().get(format!("{}/view?filename=v.png&type=input", emu.url())).send().await.expect("view");
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-disposition"], "filename=\"v.png\"");
    assert_eq!(h["content-length"], png.len().to_string().as_str());
    assert!(h.contains_key("etag") && h.contains_key("last-modified"));
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(resp.bytes().await.expect("bytes").as_ref(), png.as_slice());
    // Annotated names pick the folder; traversal is refused.
    let resp =
        http().get(format!("{}/view?filename=v.png%20%5Binput%5D", emu.url())).send().await.expect("view");
    assert_eq!(resp.status(), 200);
    let resp = http().get(format!("{}/view?filename=../x.png", emu.url())).send().await.expect("view");
    assert_eq!(resp.status(), 400);
    let resp = http()
        .get(format!("{}/view?filename=v.png&type=input&subfolder=../..", emu.url()))
        .send()
        .await
        .expect("view");
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn history_paging_delete_and_clear() {
    let emu = start().await;
    let mut ws = Ws::connect(&emu, Some("h")).await;
    ws.next().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, body) = post_prompt(
            &emu,
            &json!({"prompt": c2_prompt("h", i), "client_id": "h", "prompt_id": format!("p{i}")}),
        )
        .await;
        assert_eq!(body["prompt_id"], format!("p{i}"));
        ids.push(format!("p{i}"));
        ws.until_done(&format!("p{i}")).await;
    }
    let last_two = get_json(&emu, "/history?max_items=2").await;
    assert_eq!(last_two.as_object().expect("object").keys().collect::<Vec<_>>(), vec!["p1", "p2"]);
    let paged = get_json(&emu, "/history?max_items=1&offset=0").await;
    assert_eq!(paged.as_object().expect("object").keys().collect::<Vec<_>>(), vec!["p0"]);
    let entry = &get_json(&emu, "/history/p0").await["p0"];
    assert_eq!(
        entry.as_object().expect("entry").keys().collect::<Vec<_>>(),
        vec!["prompt", "outputs", "status", "meta"]
    );
    let resp = http()
        .post(format!("{}/history", emu.url()))
        .json(&json!({"delete": ["p0"]}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    assert_eq!(emu.history_ids(), vec!["p1", "p2"]);
    http().post(format!("{}/history", emu.url())).json(&json!({"clear": true})).send().await.expect("post");
    assert!(emu.history_ids().is_empty());
}

#[tokio::test]
async fn run_standalone_serves_until_cancelled() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(super::super::run_standalone(
        addr,
        super::super::EmulatorConfig::default(),
        cancel.clone(),
    ));
    let url = format!("http://{addr}/system_stats");
    let deadline = std::time::Instant::now() + WAIT;
    let stats: serde_json::Value = loop {
        match http().get(&url).send().await {
            Ok(r) => break r.json().await.expect("json"),
            Err(_) => {
                assert!(std::time::Instant::now() < deadline, "standalone never came up");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
    cancel.cancel();
    tokio::time::timeout(WAIT, task).await.expect("returns on cancel").expect("join").expect("ok");
}

/// i_ws_handshake: the raw upgrade, and the first frame byte for byte.
#[tokio::test]
async fn raw_websocket_handshake_and_first_frame_match_the_capture() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = start().await;
    let mut tcp = tokio::net::TcpStream::connect(emu.addr()).await.expect("connect");
    let req = format!(
        "GET /ws?clientId=raw-1 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        emu.addr()
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let expected_frame = "815d7b2274797065223a2022737461747573222c202264617461223a207b22737461747573223a207b22657865635f696e666f223a207b2271756575655f72656d61696e696e67223a20307d7d2c2022736964223a20227261772d31227d7d";
    let want = expected_frame.len() / 2;
    loop {
        let mut chunk = [0u8; 512];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk)).await.expect("read in time").expect("read");
        assert!(n > 0, "closed early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
            && buf.len() >= end + 4 + want
        {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 101"), "{head}");
            assert!(head.contains("upgrade: websocket"));
            assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));
            assert_eq!(hex::encode(&buf[end + 4..end + 4 + want]), expected_frame);
            break;
        }
    }
    let resp = http()
        .get(format!("{}/ws?clientId=raw-4", emu.url()))
        .header("Origin", "http://evil.example")
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Version", "13")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.bytes().await.expect("body").len(), 0);
}

#[tokio::test]
async fn validation_edge_shapes() {
    let emu = start().await;
    // A link that is not [node, slot].
    let (status, body) = post_prompt(
        &emu,
        &json!({"prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0, 5]}}
        }}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(
        body["error"]["details"],
        "Bad linked input, must be a length-2 list of [node_id, slot_index]: images"
    );
    assert_eq!(body["node_errors"]["2"]["errors"][0]["type"], "bad_linked_input");
    // An output node without `inputs` raises while validating the output itself.
    let (status, body) = post_prompt(&emu, &json!({"prompt": {"9": {"class_type": "PreviewImage"}}})).await;
    assert_eq!(status, 400);
    assert_eq!(body["node_errors"]["9"]["errors"][0]["type"], "exception_during_validation");
    assert_eq!(body["node_errors"]["9"]["errors"][0]["extra_info"]["exception_type"], "KeyError");
    // Widget values are converted in place: the queued prompt carries int() / float() / str() results.
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": "8", "height": 8.9, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": 7}}
    });
    let (status, body) =
        post_prompt(&emu, &json!({"prompt": prompt, "prompt_id": "conv", "number": 5})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["number"], json!(5.0));
    let deadline = std::time::Instant::now() + WAIT;
    while !emu.history_ids().contains(&"conv".to_string()) {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let h = get_json(&emu, "/history/conv").await;
    let queued = &h["conv"]["prompt"][2];
    assert_eq!(queued["1"]["inputs"]["width"], json!(8));
    assert_eq!(queued["1"]["inputs"]["height"], json!(8));
    assert_eq!(queued["2"]["inputs"]["sigma"], json!(1.0));
    assert_eq!(queued["3"]["inputs"]["filename_prefix"], json!("7"));
    assert_eq!(h["conv"]["outputs"]["3"]["images"][0]["filename"], "7_00001_.png");
    // `front` negates the server counter; rejected prompts advanced it too.
    let (_, body) =
        post_prompt(&emu, &json!({"prompt": {"1": {"class_type": "PreviewImage", "inputs": {}}}})).await;
    assert!(body.get("error").is_some());
    let (_, body) = post_prompt(
        &emu,
        &json!({"front": true, "prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
        }}),
    )
    .await;
    assert_eq!(body["number"], json!(-3));
}
