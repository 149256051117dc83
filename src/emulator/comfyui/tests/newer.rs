//! The 0.38 generation's differences (NEWER.md), each against the 0.3.64 behaviour where both exist, and
//! the faults that the cancel and submit paths of comfyrelay are tested with.

use super::super::{ComfyEmulator, ComfyVersion, LostAnswer};
use super::harness::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const NEW: ComfyVersion = ComfyVersion::V0_38;
const OLD: ComfyVersion = ComfyVersion::V0_3_64;

fn save(color: i64, prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

fn pid() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn submit(emu: &ComfyEmulator, body: Value) -> String {
    let (status, answer) = post_prompt(emu, &body).await;
    assert_eq!(status, 200, "{answer}");
    answer["prompt_id"].as_str().expect("prompt_id").to_string()
}

async fn wait_history(emu: &ComfyEmulator, pid: &str) -> Value {
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

async fn wait_running(emu: &ComfyEmulator, pid: &str) {
    let deadline = Instant::now() + WAIT;
    while emu.running_prompt().await.as_deref() != Some(pid) {
        assert!(Instant::now() < deadline, "{pid} never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn prompt_ids_must_be_canonical_uuids_and_a_repeated_id_queues_twice() {
    let emu = start_version(NEW).await;
    for bad in
        [json!("my-own-id-85c6c9"), json!(pid().to_uppercase()), json!(pid().replace('-', "")), json!(7)]
    {
        let (status, body) = post_prompt(&emu, &json!({"prompt": save(1, "x"), "prompt_id": bad})).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_prompt_id");
        assert_eq!(body["node_errors"], json!({}));
    }
    assert_eq!(emu.queued_total(), 0);
    assert_eq!(emu.posted_times("my-own-id-85c6c9"), 1, "counted as posted, never queued");
    // `number` advanced on every rejected POST, as on 0.3.64.
    let (_, body) = post_prompt(&emu, &json!({"prompt": save(1, "x"), "prompt_id": null})).await;
    assert_eq!(body["number"], 4);
    assert!(uuid::Uuid::parse_str(body["prompt_id"].as_str().unwrap()).is_ok(), "null: the server mints one");

    // No duplicate check: the same id is queued again.
    let id = pid();
    for _ in 0..2 {
        assert_eq!(submit(&emu, json!({"prompt": save(2, "dup"), "prompt_id": id})).await, id);
    }
    assert_eq!((emu.posted_times(&id), emu.queued_times(&id)), (2, 2));

    // 0.3.64 takes any string.
    let old = start_version(OLD).await;
    assert_eq!(
        submit(&old, json!({"prompt": save(1, "x"), "prompt_id": "my-own-id-85c6c9"})).await,
        "my-own-id-85c6c9"
    );
    assert_eq!(old.queued_times("my-own-id-85c6c9"), 1);
}

#[tokio::test]
async fn extra_data_gains_create_time_and_the_usage_source() {
    let emu = start_version(NEW).await;
    emu.faults().set_node_delay(Duration::from_millis(300));
    let resp = http()
        .post(format!("{}/prompt", emu.url()))
        .header("Comfy-Usage-Source", "comfyrelay")
        .json(&json!({"prompt": save(3, "u"), "client_id": "c"}))
        .send()
        .await
        .unwrap();
    let id = resp.json::<Value>().await.unwrap()["prompt_id"].as_str().unwrap().to_string();
    let q = get_json(&emu, "/queue").await;
    let item = q["queue_running"].get(0).or_else(|| q["queue_pending"].get(0)).expect("queued").clone();
    let keys: Vec<&String> = item[3].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["client_id", "comfy_usage_source", "create_time"]);
    assert_eq!(item[3]["comfy_usage_source"], "comfyrelay");
    assert!(item[3]["create_time"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(wait_history(&emu, &id).await["prompt"][3]["comfy_usage_source"], "comfyrelay");
}

#[tokio::test]
async fn jobs_api_lists_filters_paginates_and_details() {
    let old = start_version(OLD).await;
    let (status, _) = send_json(&old, "GET", "/api/jobs?limit=1", None).await;
    assert_eq!(status, 404, "0.3.64 has no jobs API");

    let emu = start_version(NEW).await;
    let done = submit(&emu, json!({"prompt": save(4, "j"), "client_id": "c"})).await;
    wait_history(&emu, &done).await;
    emu.faults().set_node_delay(Duration::from_millis(400));
    let running = submit(&emu, json!({"prompt": save(5, "j"), "client_id": "c"})).await;
    let pending = submit(&emu, json!({"prompt": save(6, "j"), "client_id": "c"})).await;
    wait_running(&emu, &running).await;

    let (status, all) = send_json(&emu, "GET", "/api/jobs", None).await;
    assert_eq!(status, 200, "{all}");
    let jobs = all["jobs"].as_array().unwrap();
    let status_of = |id: &str| jobs.iter().find(|j| j["id"] == id).map(|j| j["status"].clone());
    assert_eq!(
        [status_of(&pending), status_of(&running), status_of(&done)],
        [Some(json!("pending")), Some(json!("in_progress")), Some(json!("completed"))]
    );
    let times: Vec<i64> = jobs.iter().map(|j| j["create_time"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    assert_eq!(jobs.last().unwrap()["id"], done.as_str());
    assert_eq!(all["pagination"], json!({"offset": 0, "limit": null, "total": 3, "has_more": false}));
    assert_eq!(jobs[2]["outputs_count"], 1);
    assert_eq!(jobs[2]["preview_output"]["nodeId"], "3");

    let (_, page) = send_json(&emu, "GET", "/api/jobs?limit=1&offset=1&sort_order=asc", None).await;
    assert_eq!(page["jobs"][0]["id"], running.as_str());
    assert_eq!(page["pagination"], json!({"offset": 1, "limit": 1, "total": 3, "has_more": true}));
    let (_, active) = send_json(&emu, "GET", "/api/jobs?status=pending,in_progress", None).await;
    assert_eq!(active["pagination"]["total"], 2);
    for (query, message) in [
        (
            "status=bogus",
            "Invalid status value(s): bogus. Valid values: pending, in_progress, completed, failed, cancelled",
        ),
        ("sort_by=name", "sort_by must be 'created_at' or 'execution_duration'"),
        ("limit=0", "limit must be a positive integer"),
        ("limit=x", "limit must be an integer"),
        ("offset=x", "offset must be an integer"),
    ] {
        let (status, body) = send_json(&emu, "GET", &format!("/api/jobs?{query}"), None).await;
        assert_eq!((status, body), (400, json!({"error": message})), "{query}");
    }

    let (status, job) = send_json(&emu, "GET", &format!("/api/jobs/{running}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(job["status"], "in_progress");
    assert_eq!(job["workflow"]["prompt"]["3"]["class_type"], "SaveImage");
    let (status, body) = send_json(&emu, "GET", &format!("/api/jobs/{}", pid()), None).await;
    assert_eq!((status, body), (404, json!({"error": "Job not found"})));
    // Like every route, also one `/api` deeper.
    assert_eq!(send_json(&emu, "GET", &format!("/api/api/jobs/{done}"), None).await.0, 200);

    let (_, job) = send_json(&emu, "GET", &format!("/api/jobs/{done}"), None).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["outputs"]["3"]["images"][0]["type"], "output");
    assert_eq!(job["execution_status"]["status_str"], "success");
    assert!(job["execution_end_time"].as_i64() >= job["execution_start_time"].as_i64());
    assert!(job["create_time"].is_i64());
}

#[tokio::test]
async fn job_cancel_dequeues_or_interrupts_only_that_job() {
    let emu = start_version(NEW).await;
    emu.faults().set_node_delay(Duration::from_millis(200));
    emu.faults().set_node_progress_steps(4);
    let mut ws = Ws::connect(&emu, Some("c")).await;
    ws.next().await;
    let running = submit(&emu, json!({"prompt": save(7, "c"), "client_id": "c"})).await;
    let pending = submit(&emu, json!({"prompt": save(8, "c"), "client_id": "c"})).await;
    let other = submit(&emu, json!({"prompt": save(9, "c"), "client_id": "c"})).await;
    // Executing, not just taken: ComfyUI clears a pending interrupt when the execution starts.
    ws.until(|f| f.kind() == "executing" && f.data()["prompt_id"] == running.as_str()).await;

    let cancel = |id: &str| format!("/api/jobs/{id}/cancel");
    assert_eq!(send_json(&emu, "POST", &cancel(&pending), None).await, (200, json!({"cancelled": true})));
    assert!(!emu.pending_prompts().await.contains(&pending), "dequeued");
    assert_eq!(send_json(&emu, "POST", &cancel(&running), None).await, (200, json!({"cancelled": true})));
    let frames = ws.until_done(&running).await;
    assert!(frames.iter().any(|f| f.kind() == "execution_interrupted"), "{:?}", kinds(&frames));
    let (_, job) = send_json(&emu, "GET", &format!("/api/jobs/{running}"), None).await;
    assert_eq!(job["status"], "cancelled");
    // Finished or unknown ids: 200, nothing cancelled.
    assert_eq!(send_json(&emu, "POST", &cancel(&running), None).await, (200, json!({"cancelled": false})));
    assert_eq!(
        send_json(&emu, "POST", &cancel("not-a-uuid"), None).await,
        (200, json!({"cancelled": false}))
    );

    let (status, body) =
        send_json(&emu, "POST", "/api/jobs/cancel", Some(&json!({"job_ids": [other, "nope", 5]}))).await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"error": "job_ids contains invalid id(s)", "invalid_ids": ["nope", "5"]}));
    assert!(
        emu.pending_prompts().await.contains(&other) || emu.running_prompt().await.as_deref() == Some(&other)
    );
    let (status, body) =
        send_json(&emu, "POST", "/api/jobs/cancel", Some(&json!({"job_ids": [other, pid()]}))).await;
    assert_eq!((status, body), (200, json!({"cancelled": true})));
    let (status, body) = send_json(&emu, "POST", "/api/jobs/cancel", Some(&json!({"ids": []}))).await;
    assert_eq!((status, body), (400, json!({"error": "job_ids must be a list"})));
}

#[tokio::test]
async fn features_and_system_stats_name_the_generation() {
    for (version, stats_version, flags) in [
        (OLD, "0.3.64", json!({"supports_preview_metadata": true, "max_upload_size": 104857600})),
        (
            NEW,
            "0.38.1",
            json!({"supports_preview_metadata": true, "supports_model_type_tags": true, "max_upload_size": 104857600,
                   "extension": {"manager": {"supports_v4": true}}, "node_replacements": true, "assets": true}),
        ),
    ] {
        let emu = start_version(version).await;
        assert_eq!(get_json(&emu, "/features").await, flags);
        let stats = get_json(&emu, "/system_stats").await;
        assert_eq!(stats["system"]["comfyui_version"], stats_version);
        assert_eq!(stats["system"].get("deploy_environment").is_some(), version == NEW);
        let mut ws = Ws::connect(&emu, Some("f")).await;
        ws.next().await;
        ws.send_flags().await;
        let reply = ws.next().await;
        assert_eq!((reply.kind().as_str(), reply.data()), ("feature_flags", &flags));
    }
}

#[tokio::test]
async fn node_replacement_runs_before_validation() {
    let legacy = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 10}},
        "2": {"class_type": "InvertImageLegacy", "inputs": {"pixels": ["1", 0]}, "_meta": {"title": "Old invert"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "r"}}
    });
    let replacement = json!({"new_node_id": "ImageInvert", "old_node_id": "InvertImageLegacy", "old_widget_ids": null,
        "input_mapping": [{"new_id": "image", "old_id": "pixels"}], "output_mapping": null});

    let old = start_version(OLD).await;
    old.register_node_replacement(replacement.clone());
    let (status, body) = post_prompt(&old, &json!({"prompt": legacy})).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (400, Some("invalid_prompt")),
        "0.3.64 has no replacement"
    );

    let emu = start_version(NEW).await;
    let listed = get_json(&emu, "/node_replacements").await;
    assert_eq!(listed["ResizeImagesByLongerEdge"][0]["new_node_id"], "ImageScaleToMaxDimension");
    emu.register_node_replacement(replacement);
    assert_eq!(
        get_json(&emu, "/node_replacements").await["InvertImageLegacy"][0]["new_node_id"],
        "ImageInvert"
    );
    let id = submit(&emu, json!({"prompt": legacy})).await;
    let entry = wait_history(&emu, &id).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["prompt"][2]["2"]["class_type"], "ImageInvert", "queued as replaced");
    assert_eq!(entry["prompt"][2]["2"]["inputs"], json!({"image": ["1", 0]}));
}

#[tokio::test]
async fn validation_reports_missing_node_type_and_dependency_cycles() {
    let emu = start_version(NEW).await;
    let unknown = json!({"1": {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "Mystery"}}});
    let (status, body) = post_prompt(&emu, &json!({"prompt": unknown})).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        json!({"type": "missing_node_type", "message": "Node 'Mystery' not found. The custom node may not be installed.",
               "details": "Node ID '#1'", "extra_info": {"node_id": "1", "class_type": "NoSuchNode", "node_title": "Mystery"}})
    );
    let (_, body) = post_prompt(&emu, &json!({"prompt": {"7": {"inputs": {}}}})).await;
    assert_eq!(body["error"]["type"], "missing_node_type");
    assert_eq!(body["error"]["extra_info"], json!({"node_id": "7", "class_type": null, "node_title": null}));

    let cycle = json!({
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}}
    });
    let (status, body) = post_prompt(&emu, &json!({"prompt": cycle})).await;
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("prompt_outputs_failed_validation")));
    let ne = body["node_errors"].as_object().expect("node_errors");
    let mut ids: Vec<&String> = ne.keys().collect();
    ids.sort();
    assert_eq!(ids, ["1", "2"]);
    for id in ids {
        assert_eq!(ne[id]["errors"][0]["type"], "dependency_cycle");
        assert_eq!(ne[id]["dependent_outputs"], json!(["3"]));
    }
    assert!(ne["1"]["errors"][0]["details"].as_str().unwrap().contains("(ImageInvert) ->"));

    // 0.3.64: the same cycle fails with no node errors at all.
    let old = start_version(OLD).await;
    let (_, body) = post_prompt(&old, &json!({"prompt": cycle})).await;
    assert_eq!(body["node_errors"], json!({}));
}

#[tokio::test]
async fn partial_validation_runs_only_the_valid_outputs() {
    for version in ComfyVersion::ALL {
        let emu = start_version(version).await;
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 11}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "good"}},
            "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 4, "height": 4, "crop": "disabled"}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}
        });
        let (status, body) = post_prompt(&emu, &json!({"prompt": graph})).await;
        assert_eq!(status, 200, "{version}: {body}");
        assert_eq!(body["node_errors"]["3"]["dependent_outputs"], json!(["4"]), "{version}");
        let id = body["prompt_id"].as_str().unwrap().to_string();
        let entry = wait_history(&emu, &id).await;
        assert_eq!(entry["prompt"][4], json!(["2"]), "{version}: only the valid output is executed");
        let outputs: Vec<&String> = entry["outputs"].as_object().unwrap().keys().collect();
        assert_eq!(outputs, ["2"], "{version}");
    }
}

#[tokio::test]
async fn assets_are_on_by_default_with_blake3_hashes() {
    let png = test_png(6, 4);
    let old = start_version(OLD).await;
    assert!(upload(&old, "a.png", png.clone()).await.get("asset").is_none());
    assert_eq!(send_json(&old, "GET", "/api/assets", None).await.0, 404);

    let emu = start_version(NEW).await;
    let mut ws = Ws::connect(&emu, Some("seed")).await;
    ws.next().await;
    let answer = upload(&emu, "a.png", png.clone()).await;
    let hash = format!("blake3:{}", blake3::hash(&png).to_hex());
    assert_eq!(answer["name"], "a.png");
    assert_eq!(answer["asset"]["asset_hash"], hash.as_str());
    assert_eq!(
        (answer["asset"]["size"].as_u64(), answer["asset"]["mime_type"].as_str()),
        (Some(png.len() as u64), Some("image/png"))
    );
    let id = answer["asset"]["id"].as_str().unwrap().to_string();

    let head = |h: String| http().head(format!("{}/api/assets/hash/{h}", emu.url())).send();
    assert_eq!(head(hash.clone()).await.unwrap().status(), 200);
    assert_eq!(head(format!("blake3:{}", "0".repeat(64))).await.unwrap().status(), 404);
    assert_eq!(head("sha256:abc".into()).await.unwrap().status(), 400);
    let (status, detail) = send_json(&emu, "GET", &format!("/api/assets/{id}"), None).await;
    assert_eq!((status, detail["hash"].as_str()), (200, Some(hash.as_str())));
    let content = http().get(format!("{}/api/assets/{id}/content", emu.url())).send().await.unwrap();
    assert_eq!(content.bytes().await.unwrap().to_vec(), png);
    let view = http().get(format!("{}/view?filename={hash}", emu.url())).send().await.unwrap();
    assert_eq!(view.status(), 200);
    assert_eq!(view.bytes().await.unwrap().to_vec(), png);
    let (status, body) = send_json(&emu, "GET", &format!("/api/assets/{}", pid()), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("ASSET_NOT_FOUND")));

    // The first /object_info starts the seeder, which tells every socket.
    get_json(&emu, "/object_info").await;
    let started = ws.next().await;
    assert_eq!(started.kind(), "assets.seed.started");
    assert_eq!(started.data()["roots"], json!(["models", "input", "output"]));
    assert_eq!(ws.next().await.kind(), "assets.seed.completed");
    let (_, list) = send_json(&emu, "GET", "/api/assets", None).await;
    assert!(list["total"].as_u64().unwrap() >= 2, "the upload and the seeded example.png: {list}");
    get_json(&emu, "/object_info").await;
    ws.assert_quiet(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn progress_state_reports_loading_as_activity_on_0_38_only() {
    for version in ComfyVersion::ALL {
        let emu = start_version(version).await;
        emu.faults().set_node_loading(Duration::from_millis(20));
        let mut ws = Ws::connect(&emu, Some("a")).await;
        ws.next().await;
        let id = submit(&emu, json!({"prompt": save(12, "a"), "client_id": "a"})).await;
        let frames = ws.until_done(&id).await;
        let activities: Vec<Value> = frames
            .iter()
            .filter(|f| f.kind() == "progress_state")
            .map(|f| f.data()["nodes"]["1"]["activity"].clone())
            .collect();
        if version == NEW {
            assert_eq!(activities[..3], [Value::Null, json!("loading"), Value::Null], "{activities:?}");
        } else {
            assert!(activities.iter().all(Value::is_null), "{activities:?}");
        }
    }
}

#[tokio::test]
async fn an_execution_blocker_reports_execution_blocked_and_the_prompt_goes_on() {
    for version in ComfyVersion::ALL {
        let emu = start_version(version).await;
        emu.faults().block_outputs_of("ImageInvert", "switched off");
        let mut ws = Ws::connect(&emu, Some("b")).await;
        ws.next().await;
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 13}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 1, "sigma": 1.0}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "blocked"}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "free"}}
        });
        let id = submit(&emu, json!({"prompt": graph, "client_id": "b"})).await;
        let frames = ws.until_done(&id).await;
        let errors: Vec<&Frame> = frames.iter().filter(|f| f.kind() == "execution_error").collect();
        assert_eq!(errors.len(), 1, "{version}: only the first blocked node reports: {:?}", kinds(&frames));
        let e = errors[0].data();
        assert_eq!(
            (e["exception_type"].as_str(), e["node_id"].as_str()),
            (Some("ExecutionBlocked"), Some("3"))
        );
        assert_eq!(e["exception_message"], "Execution Blocked: switched off");
        assert!(e.get("timestamp").is_none() && e["traceback"] == json!([]));
        assert!(frames.iter().any(|f| f.kind() == "execution_success"), "{version}: not terminal");
        let executed: Vec<&str> = frames
            .iter()
            .filter(|f| f.kind() == "executed")
            .map(|f| f.data()["node"].as_str().unwrap())
            .collect();
        assert_eq!(executed, ["5"], "{version}: the blocked output produced nothing");
        let entry = wait_history(&emu, &id).await;
        assert_eq!(entry["status"]["status_str"], "success");
        let recorded: Vec<&str> =
            entry["status"]["messages"].as_array().unwrap().iter().map(|m| m[0].as_str().unwrap()).collect();
        assert!(!recorded.contains(&"execution_error"), "{version}: not in history: {recorded:?}");
    }
}

#[tokio::test]
async fn a_wedged_node_ignores_interrupts_until_free() {
    for version in ComfyVersion::ALL {
        let emu = start_version(version).await;
        emu.faults().wedge_node("ImageInvert", Duration::from_secs(30));
        let mut ws = Ws::connect(&emu, Some("w")).await;
        ws.next().await;
        let id = submit(&emu, json!({"prompt": save(14, "w"), "client_id": "w"})).await;
        ws.until(|f| f.kind() == "executing" && f.data()["node"] == "2").await;
        let (status, _) = send_json(&emu, "POST", "/interrupt", Some(&json!({"prompt_id": id}))).await;
        assert_eq!(status, 200);
        // Still running: the node does not look at the flag. (Silence over a short window: the proof that
        // nothing happens, not a synchronisation.)
        ws.assert_quiet(Duration::from_millis(300)).await;
        assert_eq!(emu.running_prompt().await.as_deref(), Some(id.as_str()));
        let (status, _) =
            send_json(&emu, "POST", "/free", Some(&json!({"unload_models": true, "free_memory": true})))
                .await;
        assert_eq!(status, 200);
        let frames = ws.until_done(&id).await;
        let int =
            frames.iter().find(|f| f.kind() == "execution_interrupted").expect("interrupted after /free");
        assert_eq!(int.data()["node_id"], "2", "{version}");
        assert_eq!(emu.free_calls(), 1);
    }
}

#[tokio::test]
async fn a_node_wedged_past_free_ignores_interrupts_until_its_bound() {
    for version in ComfyVersion::ALL {
        let emu = start_version(version).await;
        emu.faults().wedge_node_past_free("ImageInvert", Duration::from_millis(800));
        let mut ws = Ws::connect(&emu, Some("p")).await;
        ws.next().await;
        let id = submit(&emu, json!({"prompt": save(16, "p"), "client_id": "p"})).await;
        ws.until(|f| f.kind() == "executing" && f.data()["node"] == "2").await;
        let free = json!({"unload_models": true, "free_memory": true});
        assert_eq!(send_json(&emu, "POST", "/free", Some(&free)).await.0, 200);
        assert_eq!(send_json(&emu, "POST", "/interrupt", Some(&json!({"prompt_id": id}))).await.0, 200);
        // Neither released it (silence over a short window is the proof, not a synchronisation)...
        ws.assert_quiet(Duration::from_millis(200)).await;
        assert_eq!(emu.running_prompt().await.as_deref(), Some(id.as_str()), "{version}");
        // ...and after its bound the node finishes; the next node honours the interrupt it ignored.
        let frames = ws.until_done(&id).await;
        let int = frames.iter().find(|f| f.kind() == "execution_interrupted").expect("interrupted");
        assert_eq!(int.data()["node_id"], "3", "{version}: {frames:?}");
        assert_eq!(emu.free_calls(), 1);
    }
}

#[tokio::test]
async fn lost_prompt_answers_leave_the_prompt_queued() {
    for version in ComfyVersion::ALL {
        let emu = start_version(version).await;
        emu.faults().lose_prompt_answers(1, LostAnswer::Cut);
        emu.faults().lose_prompt_answers(1, LostAnswer::ServerError);
        emu.faults().lose_prompt_answers(1, LostAnswer::Hang(Duration::from_secs(30)));
        let post = |id: String| {
            http()
                .post(format!("{}/prompt", emu.url()))
                .timeout(Duration::from_millis(300))
                .json(&json!({"prompt": save(15, "l"), "prompt_id": id}))
                .send()
        };
        let (a, b, c) = (pid(), pid(), pid());
        let cut = match post(a.clone()).await {
            Ok(resp) => resp.bytes().await.is_err(),
            Err(_) => true,
        };
        assert!(cut, "{version}: the answer was cut");
        assert_eq!(post(b.clone()).await.unwrap().status(), 500);
        assert!(post(c.clone()).await.unwrap_err().is_timeout(), "{version}");
        for id in [&a, &b, &c] {
            assert_eq!(emu.queued_times(id), 1, "{version}: queued although the answer was lost");
            wait_history(&emu, id).await;
        }
        let (status, _) = post_prompt(&emu, &json!({"prompt": save(15, "l"), "prompt_id": pid()})).await;
        assert_eq!(status, 200, "faults are consumed");
    }
}
