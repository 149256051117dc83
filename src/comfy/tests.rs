//! Tests of the client against the ComfyUI emulator over real sockets on 127.0.0.1: the happy path, every
//! fault the emulator can inject, and 200 back-to-back fast jobs; `generations` runs the submit, cancel,
//! capability and reconcile paths against both ComfyUI generations.

mod generations;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::emulator::comfyui::{ComfyEmulator, ComfyVersion, EmulatorConfig, LostAnswer};

const WAIT: Duration = Duration::from_secs(20);

async fn emulator() -> ComfyEmulator {
    emulator_v(ComfyVersion::V0_3_64).await
}

async fn emulator_v(comfyui_version: ComfyVersion) -> ComfyEmulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = EmulatorConfig { comfyui_version, ..EmulatorConfig::default() };
    ComfyEmulator::start(listener, config).await.expect("emulator")
}

fn options() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        max_retries: 3,
        idle_probe: Duration::from_secs(10),
        probe_timeout: Duration::from_secs(1),
        silence_reconcile: Duration::from_secs(10),
        orphan_poll: Duration::from_millis(100),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
    }
}

struct Harness {
    emu: ComfyEmulator,
    client: ComfyClient,
    conn: ComfyConnection,
    cancel: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn harness(options: ClientOptions) -> Harness {
    harness_v(ComfyVersion::V0_3_64, options).await
}

async fn harness_v(version: ComfyVersion, options: ClientOptions) -> Harness {
    let emu = emulator_v(version).await;
    let client = ComfyClient::new(&emu.url(), options).expect("client");
    let cancel = CancellationToken::new();
    let conn = ComfyConnection::spawn(client.clone(), cancel.clone());
    conn.wait_connected(WAIT).await.expect("connected");
    Harness { emu, client, conn, cancel }
}

fn pid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// EmptyImage → ImageInvert → SaveImage (color varies so nothing is cached).
fn save_graph(color: u32, size: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}}
    })
}

/// Reads a prompt's stream to its end; asserts exactly one terminal event, last.
async fn collect(mut events: PromptEvents) -> Vec<PromptEvent> {
    let mut out = Vec::new();
    loop {
        match timeout(WAIT, events.recv()).await {
            Ok(Some(e)) => out.push(e),
            Ok(None) => break,
            Err(_) => panic!("prompt {} did not end; events so far: {out:?}", events.prompt_id()),
        }
    }
    let terminals = out.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "exactly one terminal event: {out:?}");
    assert!(out.last().is_some_and(PromptEvent::is_terminal), "terminal event last: {out:?}");
    out
}

/// Reads until `pred` matches (returns the events read so far, including the match).
async fn until(events: &mut PromptEvents, pred: impl Fn(&PromptEvent) -> bool) -> Vec<PromptEvent> {
    let mut seen = Vec::new();
    loop {
        let e = timeout(WAIT, events.recv()).await.expect("event in time").expect("stream open");
        let hit = pred(&e);
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

fn executed_nodes(events: &[PromptEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            PromptEvent::Executed { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn assert_no_duplicate_nodes(events: &[PromptEvent]) {
    let mut executing = HashSet::new();
    for e in events {
        if let PromptEvent::Executing { node, .. } = e {
            assert!(executing.insert(node.clone()), "Executing {node} delivered twice: {events:?}");
        }
    }
    let outs = executed_nodes(events);
    let unique: HashSet<_> = outs.iter().collect();
    assert_eq!(unique.len(), outs.len(), "Executed duplicated: {events:?}");
}

fn png(w: u32, h: u32, rgb: [u8; 3]) -> Bytes {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode");
    Bytes::from(out.into_inner())
}

#[tokio::test]
async fn upload_run_and_download_an_output() {
    let h = harness(options()).await;
    let up = h.client.upload_image(png(20, 10, [1, 2, 3]), "in.png", "image/png").await.unwrap();
    assert_eq!((up.name.as_str(), up.kind.as_str()), ("in.png", "input"));
    // Same name, different bytes: ComfyUI renames; the answered name is what counts.
    let up2 = h.client.upload_image(png(20, 10, [9, 9, 9]), "in.png", "image/png").await.unwrap();
    assert_ne!(up2.name, "in.png");

    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": up2.name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
    });
    let id = pid();
    let (queued, events) = h.conn.submit(&id, graph).await.unwrap();
    assert_eq!(queued.prompt_id, id);
    assert!(queued.node_errors.is_empty());
    let events = collect(events).await;
    assert_eq!(events.first(), Some(&PromptEvent::ExecutionStart));
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded));
    assert_no_duplicate_nodes(&events);
    let output = events
        .iter()
        .find_map(|e| match e {
            PromptEvent::Executed { node, output, .. } if node == "3" => Some(output.clone()),
            _ => None,
        })
        .expect("SaveImage output");
    let files = FileRef::from_output(&output);
    assert_eq!(files.len(), 1);

    let mut sink = Vec::new();
    let d = h.client.download(&files[0], &mut sink).await.unwrap();
    assert_eq!((d.mime.as_str(), d.width, d.height), ("image/png", 20, 10));
    assert_eq!(d.size, sink.len() as u64);
    let on_disk =
        std::fs::read(h.emu.output_dir().join(&files[0].subfolder).join(&files[0].filename)).unwrap();
    assert_eq!(sink, on_disk);
    use sha2::Digest;
    assert_eq!(d.sha256, hex::encode(sha2::Sha256::digest(&on_disk)));

    let hist = h.client.history(&id).await.unwrap().expect("history entry");
    assert_eq!(hist.status, HistoryStatus::Success);
    assert!(hist.outputs.contains_key("3"));
    assert!(h.client.history(&pid()).await.unwrap().is_none());
    assert_eq!(h.conn.in_flight(), 0);
}

#[tokio::test]
async fn download_rejects_non_images_and_missing_files() {
    let h = harness(options()).await;
    let up = h
        .client
        .upload_image(Bytes::from_static(b"definitely not a png"), "junk.png", "image/png")
        .await
        .unwrap();
    let file = FileRef { filename: up.name, subfolder: String::new(), kind: "input".into() };
    let mut sink = Vec::new();
    let err = h.client.download(&file, &mut sink).await.unwrap_err();
    assert!(matches!(err, ComfyError::NotAnImage { .. }), "{err:?}");
    assert!(sink.is_empty(), "nothing written before the signature check");
    let missing = FileRef { filename: "nope.png".into(), subfolder: String::new(), kind: "output".into() };
    let err = h.client.download(&missing, &mut sink).await.unwrap_err();
    assert!(matches!(err, ComfyError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn info_routes_and_jobs_api_fallback() {
    let h = harness(options()).await;
    let a = h.client.object_info().await.unwrap();
    let b = h.client.object_info().await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b), "object_info is cached");
    assert!(a.get("SaveImage").is_some());
    assert!(h.client.system_stats().await.unwrap().pointer("/system/comfyui_version").is_some());
    assert_eq!(h.client.features().await.unwrap()["supports_preview_metadata"], json!(true));
    // The emulated 0.3.64 has no /api/jobs: detected once, every caller falls back.
    assert!(!h.client.has_jobs_api().await.unwrap());
    assert_eq!(h.client.job(&pid()).await.unwrap(), None);
    assert_eq!(h.client.queue().await.unwrap(), QueueSnapshot::default());
}

#[tokio::test]
async fn validation_errors_are_typed_and_nothing_stays_registered() {
    let h = harness(options()).await;
    let bad = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let err = h.conn.submit(&pid(), bad).await.unwrap_err();
    let ComfyError::Validation { error_type, node_errors, .. } = &err else { panic!("{err:?}") };
    assert_eq!(error_type, "prompt_outputs_failed_validation");
    let ne = node_errors.iter().find(|n| n.node_id == "1").expect("node 1 error");
    assert_eq!(ne.class_type, "EmptyImage");
    assert_eq!(ne.error_type, "value_smaller_than_min");
    assert_eq!(ne.input_name.as_deref(), Some("width"));
    assert!(!err.is_retryable());

    let unknown = json!({"1": {"class_type": "NoSuchNode", "inputs": {}}});
    let err = h.conn.submit(&pid(), unknown).await.unwrap_err();
    assert!(
        matches!(&err, ComfyError::Validation { error_type, .. } if error_type == "invalid_prompt"),
        "{err:?}"
    );
    assert_eq!(h.conn.in_flight(), 0);
}

#[tokio::test]
async fn plain_text_500s_are_retried_then_typed() {
    let h = harness(options()).await;
    h.emu.faults().fail_http("/prompt", 2);
    let (_, events) = h.conn.submit(&pid(), save_graph(1, 8)).await.expect("retried past two 500s");
    assert_eq!(collect(events).await.last(), Some(&PromptEvent::Succeeded));

    h.emu.faults().fail_http("/queue", 10);
    let err = h.client.queue().await.unwrap_err();
    assert!(matches!(err, ComfyError::Server { status: 500, .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn execution_error_is_failed_with_fields() {
    let h = harness(options()).await;
    h.emu.faults().fail_node("ImageInvert", "boom from the test");
    let (_, events) = h.conn.submit(&pid(), save_graph(2, 8)).await.unwrap();
    let events = collect(events).await;
    let Some(PromptEvent::Failed(e)) = events.last() else { panic!("{events:?}") };
    assert_eq!(e.node_id, "2");
    assert_eq!(e.node_type, "ImageInvert");
    assert!(e.exception_message.contains("boom from the test"), "{e:?}");
    assert!(!e.exception_type.is_empty());
}

#[tokio::test]
async fn interrupt_hits_only_the_named_prompt() {
    let h = harness(options()).await;
    h.emu.faults().set_node_delay(Duration::from_millis(150));
    h.emu.faults().set_node_progress_steps(5);
    let (a, b) = (pid(), pid());
    let (_, mut ev_a) = h.conn.submit(&a, save_graph(3, 8)).await.unwrap();
    let (_, ev_b) = h.conn.submit(&b, save_graph(4, 8)).await.unwrap();
    until(&mut ev_a, |e| matches!(e, PromptEvent::Executing { .. })).await;
    // Naming a prompt that is not running does nothing.
    h.client.interrupt(&b).await.unwrap();
    h.client.interrupt(&a).await.unwrap();
    let rest = collect(ev_a).await;
    assert!(matches!(rest.last(), Some(PromptEvent::Interrupted { .. })), "{rest:?}");
    h.emu.faults().clear();
    assert_eq!(collect(ev_b).await.last(), Some(&PromptEvent::Succeeded));
}

#[tokio::test]
async fn previews_and_text_frames_are_routed() {
    let h = harness(options()).await;
    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 3, "color": 5}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    });
    let (_, events) = h.conn.submit(&pid(), graph).await.unwrap();
    let events = collect(events).await;
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded));
    let previews: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            PromptEvent::Preview { node, mime, data } => Some((node.clone(), mime.clone(), data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(previews.len(), 3, "{events:?}");
    // We send supports_preview_metadata first, so previews are type 4 and name their node.
    assert!(previews.iter().all(|(n, m, len)| n.as_deref() == Some("2") && m == "image/png" && *len > 8));
    assert!(events.iter().any(|e| matches!(e, PromptEvent::Progress { node, .. } if node == "2")));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PromptEvent::Text { node, text } if node == "3" && text.contains("16")))
    );
    assert!(events.iter().any(|e| matches!(e, PromptEvent::ProgressState { .. })));
}

#[tokio::test]
async fn two_hundred_fast_jobs_back_to_back_each_end_once() {
    let h = harness(options()).await;
    // About 5 ms per job (three nodes), like trivial prompts on a real ComfyUI.
    h.emu.faults().set_node_delay(Duration::from_millis(1));
    let mut streams = Vec::new();
    for i in 0..200u32 {
        let (_, ev) = h.conn.submit(&pid(), save_graph(1000 + i, 4)).await.unwrap();
        streams.push(ev);
    }
    for ev in streams {
        let events = collect(ev).await;
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded));
        assert_eq!(executed_nodes(&events), ["3"]);
        assert_no_duplicate_nodes(&events);
    }
    assert_eq!(h.conn.connects(), 1);
    assert_eq!(h.conn.in_flight(), 0);
    let mut remaining = h.conn.queue_remaining();
    timeout(WAIT, remaining.wait_for(|n| *n == Some(0))).await.unwrap().unwrap();
}

#[tokio::test]
async fn constant_reconciling_never_declares_a_finishing_prompt_lost() {
    // Reconcile every in-flight prompt almost continuously while fast jobs finish: a prompt leaving
    // /queue between the two reads must be found in /history, never reported Lost.
    let mut o = options();
    o.silence_reconcile = Duration::from_millis(1);
    let h = harness(o).await;
    h.emu.faults().set_node_delay(Duration::from_millis(2));
    let mut streams = Vec::new();
    for i in 0..100u32 {
        let (_, ev) = h.conn.submit(&pid(), save_graph(5000 + i, 4)).await.unwrap();
        streams.push(ev);
    }
    for ev in streams {
        let events = collect(ev).await;
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{events:?}");
        assert_eq!(executed_nodes(&events), ["3"], "{events:?}");
    }
}

#[tokio::test]
async fn socket_dropped_mid_run_loses_nothing_and_duplicates_nothing() {
    let h = harness(options()).await;
    h.emu.faults().set_node_delay(Duration::from_millis(120));
    let (_, mut events) = h.conn.submit(&pid(), save_graph(6, 8)).await.unwrap();
    let mut seen =
        until(&mut events, |e| matches!(e, PromptEvent::Executing { node, .. } if node == "1")).await;
    h.emu.faults().drop_sockets_now();
    seen.extend(collect(events).await);
    assert_eq!(seen.last(), Some(&PromptEvent::Succeeded), "{seen:?}");
    assert_eq!(executed_nodes(&seen), ["3"], "the output is delivered exactly once: {seen:?}");
    assert_no_duplicate_nodes(&seen);
    // The nodes after the drop were streamed live over the new socket (same clientId), not recovered.
    assert!(seen.iter().any(|e| matches!(e, PromptEvent::Executing { node, .. } if node == "3")), "{seen:?}");
    assert!(h.conn.connects() >= 2);
    assert_eq!(h.conn.socket_client_id(), h.conn.client_id(), "server-side drop: same clientId reused");
}

#[tokio::test]
async fn drops_during_a_burst_of_fast_jobs_miss_no_completion() {
    let h = harness(options()).await;
    let mut streams = Vec::new();
    for round in 0..4u32 {
        h.emu.faults().drop_sockets_after(7 + round as usize * 5);
        for i in 0..15u32 {
            let (_, ev) = h.conn.submit(&pid(), save_graph(round * 100 + i, 4)).await.unwrap();
            streams.push(ev);
        }
        h.conn.wait_connected(WAIT).await.unwrap();
    }
    for ev in streams {
        let events = collect(ev).await;
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{events:?}");
        assert_eq!(executed_nodes(&events), ["3"], "{events:?}");
        assert_no_duplicate_nodes(&events);
    }
    assert!(h.conn.connects() >= 2);
}

#[tokio::test]
async fn silent_socket_is_detected_and_replaced() {
    let mut o = options();
    o.idle_probe = Duration::from_millis(150);
    o.probe_timeout = Duration::from_millis(150);
    // Also the deadline for a new socket's greeting (never sent while the server is silent).
    o.request_timeout = Duration::from_millis(800);
    let h = harness(o).await;
    h.emu.faults().set_silent(true);
    let (_, events) = h.conn.submit(&pid(), save_graph(7, 8)).await.unwrap();
    // Nothing arrives over the socket; the probe replaces it and the orphaned prompt is polled.
    let events = collect(events).await;
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{events:?}");
    assert_eq!(executed_nodes(&events), ["3"], "outputs recovered from history: {events:?}");
    assert!(h.conn.connects() >= 2);
    assert_ne!(h.conn.socket_client_id(), h.conn.client_id(), "abandoned socket: fresh clientId");

    h.emu.faults().set_silent(false);
    // Once the server talks again a socket is greeted and streams normally (`ExecutionStart` only comes
    // over the socket). A socket opened during the silence may still be replaced once, so allow a retry.
    let mut streamed = false;
    for _ in 0..3 {
        h.conn.wait_connected(WAIT).await.unwrap();
        let (_, events) = h.conn.submit(&pid(), save_graph(8, 8)).await.unwrap();
        let events = collect(events).await;
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded));
        if events.first() == Some(&PromptEvent::ExecutionStart) {
            streamed = true;
            break;
        }
    }
    assert!(streamed, "the replacement socket never streamed events");
}

#[tokio::test]
async fn duplicate_client_id_cleanup_is_detected_and_loses_no_completion() {
    // ComfyUI's duplicate-clientId bug (f2): when an older socket with our clientId closes after we
    // registered, the server's cleanup unregisters our socket, which stays open and silently unrouted.
    let emu = emulator().await;
    let id = format!("dup-{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/ws?clientId={id}", emu.url().replace("http://", "ws://"));
    let (mut older, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(timeout(WAIT, older.next()).await.unwrap().is_some(), "older socket greeted");

    let client = ComfyClient::new(&emu.url(), options()).unwrap();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let conn = ComfyConnection::spawn_with_client_id(client, id.clone(), cancel);
    conn.wait_connected(WAIT).await.unwrap();
    // The older socket closes cleanly; the server's cleanup removes the entry, which is now ours.
    older.close(None).await.unwrap();
    while let Some(Ok(_)) = timeout(WAIT, older.next()).await.unwrap() {}

    let (_, events) = conn.submit(&pid(), save_graph(19, 8)).await.unwrap();
    let events = collect(events).await;
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{events:?}");
    assert_eq!(executed_nodes(&events), ["3"], "outputs recovered from history: {events:?}");
    assert!(conn.connects() >= 2, "the unrouted socket was replaced");
    assert_ne!(conn.socket_client_id(), id, "replaced under a fresh clientId");
    conn.wait_connected(WAIT).await.unwrap();
    let (_, events) = conn.submit(&pid(), save_graph(20, 8)).await.unwrap();
    let events = collect(events).await;
    assert_eq!(events.first(), Some(&PromptEvent::ExecutionStart), "the new socket is routed: {events:?}");
}

#[tokio::test]
async fn no_frame_after_queueing_replaces_the_socket() {
    // A socket that stays open but is no longer routed gets no frame (not even the `status` broadcast)
    // when our prompt is queued: detected within probe_timeout, long before the idle probe would fire.
    let mut o = options();
    o.idle_probe = Duration::from_secs(30);
    o.probe_timeout = Duration::from_millis(300);
    let h = harness(o).await;
    h.emu.faults().set_silent(true);
    let started = tokio::time::Instant::now();
    let (_, events) = h.conn.submit(&pid(), save_graph(23, 8)).await.unwrap();
    let events = collect(events).await;
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{events:?}");
    assert_eq!(executed_nodes(&events), ["3"], "outputs recovered from history: {events:?}");
    assert!(h.conn.connects() >= 2);
    assert_ne!(h.conn.socket_client_id(), h.conn.client_id(), "replaced under a fresh clientId");
    assert!(started.elapsed() < Duration::from_secs(10), "detected by the routing check, not the idle probe");
}

#[tokio::test]
async fn restart_with_wiped_queue_and_history_reports_lost() {
    let h = harness(options()).await;
    h.emu.faults().set_node_delay(Duration::from_millis(300));
    let (_, mut running) = h.conn.submit(&pid(), save_graph(9, 8)).await.unwrap();
    let (_, pending) = h.conn.submit(&pid(), save_graph(10, 8)).await.unwrap();
    until(&mut running, |e| matches!(e, PromptEvent::ExecutionStart)).await;
    h.emu.restart().await;
    let rest = collect(running).await;
    assert!(matches!(rest.last(), Some(PromptEvent::Lost { .. })), "{rest:?}");
    let pending = collect(pending).await;
    assert!(matches!(pending.last(), Some(PromptEvent::Lost { .. })), "{pending:?}");
}

#[tokio::test]
async fn vanished_prompt_is_lost_without_a_reconnect() {
    let mut o = options();
    o.silence_reconcile = Duration::from_millis(200);
    let h = harness(o).await;
    h.emu.faults().vanish_next_prompt();
    let (_, events) = h.conn.submit(&pid(), save_graph(11, 8)).await.unwrap();
    let events = collect(events).await;
    assert!(matches!(events.last(), Some(PromptEvent::Lost { .. })), "{events:?}");
    assert_eq!(h.conn.connects(), 1);
    // A normal prompt afterwards is not affected.
    let (_, events) = h.conn.submit(&pid(), save_graph(12, 8)).await.unwrap();
    assert_eq!(collect(events).await.last(), Some(&PromptEvent::Succeeded));
}

#[tokio::test]
async fn slow_history_is_waited_for_not_taken_as_lost() {
    let mut o = options();
    o.silence_reconcile = Duration::from_millis(150);
    let h = harness(o).await;
    let id = pid();
    let (_, events) = h.conn.submit(&id, save_graph(13, 8)).await.unwrap();
    collect(events).await;

    h.emu.faults().set_history_delay(Duration::from_millis(400));
    // A fresh connection re-attaching to the finished prompt gets its output, then success.
    let other = ComfyConnection::spawn(h.client.clone(), h.cancel.clone());
    let events = collect(other.attach(&id)).await;
    assert_eq!(executed_nodes(&events), ["3"]);
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded));

    // A drop mid-run while history is slow: success is confirmed from (slow) history with the output.
    h.emu.faults().set_node_delay(Duration::from_millis(100));
    let (_, mut events) = h.conn.submit(&pid(), save_graph(14, 8)).await.unwrap();
    let mut seen = until(&mut events, |e| matches!(e, PromptEvent::ExecutionStart)).await;
    h.emu.faults().drop_sockets_now();
    seen.extend(collect(events).await);
    assert_eq!(seen.last(), Some(&PromptEvent::Succeeded), "{seen:?}");
    assert_eq!(executed_nodes(&seen), ["3"]);

    // History slower than the request timeout: a retryable timeout, never a verdict.
    let mut o = options();
    o.request_timeout = Duration::from_millis(100);
    o.max_retries = 1;
    let impatient = ComfyClient::new(&h.emu.url(), o).unwrap();
    let err = impatient.history(&id).await.unwrap_err();
    assert!(matches!(err, ComfyError::Timeout { .. }) && err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn attach_recovers_finished_prompts_and_reports_unknown_ones_lost() {
    let h = harness(options()).await;
    let id = pid();
    let (_, events) = h.conn.submit(&id, save_graph(15, 8)).await.unwrap();
    collect(events).await;
    let events = collect(h.conn.attach(&id)).await;
    assert_eq!(executed_nodes(&events), ["3"]);
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded));
    let events = collect(h.conn.attach(&pid())).await;
    assert!(matches!(events.last(), Some(PromptEvent::Lost { .. })), "{events:?}");
}

#[tokio::test]
async fn connection_retries_until_the_server_appears() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = ComfyClient::new(&format!("http://{addr}"), options()).unwrap();
    let cancel = CancellationToken::new();
    let conn = ComfyConnection::spawn(client, cancel.clone());
    assert!(matches!(
        conn.wait_connected(Duration::from_millis(100)).await,
        Err(ComfyError::NotConnected(_))
    ));
    let listener = TcpListener::bind(addr).await.unwrap();
    let _emu = ComfyEmulator::start(listener, EmulatorConfig::default()).await.unwrap();
    conn.wait_connected(WAIT).await.unwrap();
    let (_, events) = conn.submit(&pid(), save_graph(18, 4)).await.unwrap();
    assert_eq!(collect(events).await.last(), Some(&PromptEvent::Succeeded));
    cancel.cancel();
    assert!(matches!(conn.wait_connected(WAIT).await, Err(ComfyError::Closed)));
}

#[tokio::test]
async fn shutdown_ends_every_stream() {
    let h = harness(options()).await;
    h.emu.faults().set_node_delay(Duration::from_millis(500));
    let (_, mut events) = h.conn.submit(&pid(), save_graph(16, 8)).await.unwrap();
    h.conn.shutdown().await;
    while let Some(e) = timeout(WAIT, events.recv()).await.expect("stream ends") {
        assert!(!e.is_terminal(), "no invented terminal on shutdown: {e:?}");
    }
    assert!(!h.conn.is_connected());
    assert!(matches!(h.conn.submit(&pid(), save_graph(17, 8)).await, Err(ComfyError::Closed)));
}

/// Faults the emulator cannot inject (an answer that never comes, a body cut short), served by small
/// fakes on 127.0.0.1.
mod fakes {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::State;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn an_unanswered_post_is_not_queued_twice_on_retry() {
        let posts = Arc::new(AtomicUsize::new(0));
        let id = pid();
        let queue = json!({"queue_running": [], "queue_pending": [[7, id, {}, {"client_id": "c"}, []]]});
        let app = Router::new()
            .route(
                "/prompt",
                post(|State(posts): State<Arc<AtomicUsize>>| async move {
                    // Queued, but the answer never makes it back.
                    posts.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }),
            )
            .route("/queue", get(move || async move { axum::Json(queue) }))
            .route("/history/{id}", get(|| async { axum::Json(json!({})) }))
            .with_state(posts.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let mut o = options();
        o.request_timeout = Duration::from_millis(200);
        let client = ComfyClient::new(&format!("http://{addr}"), o).unwrap();
        let req = QueuePrompt { prompt_id: id.clone(), graph: json!({}), client_id: "c".into() };
        let queued = client.queue_prompt(&req).await.unwrap();
        assert_eq!((queued.prompt_id.as_str(), queued.number), (id.as_str(), 7.0));
        assert_eq!(posts.load(Ordering::SeqCst), 1, "found in /queue instead of being posted again");
        server.abort();
    }

    #[tokio::test]
    async fn a_download_cut_short_is_an_error_not_a_file() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let body = png(64, 64, [1, 2, 3]);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
                    body.len() + 500
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            }
        });
        let client = ComfyClient::new(&format!("http://{addr}"), options()).unwrap();
        let file = FileRef { filename: "x.png".into(), subfolder: String::new(), kind: "output".into() };
        let err = client.download(&file, &mut Vec::new()).await.unwrap_err();
        assert!(matches!(err, ComfyError::Transport { .. } | ComfyError::Truncated { .. }), "{err:?}");
        assert!(err.is_retryable());
        server.abort();
    }
}
