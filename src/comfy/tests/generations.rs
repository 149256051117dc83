//! The paths that differ between ComfyUI 0.3.64 and 0.38, each run against both emulated generations:
//! capability detection (and its refresh on reconnect), the submit that never queues twice nor sends a bad
//! id, partial validation, the cancel primitives (a wedged node included), `ExecutionBlocked`, and
//! reconciliation through the jobs API.

use super::*;

const ALL: [ComfyVersion; 2] = ComfyVersion::ALL;

fn partial_graph(color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "good"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 4, "height": 4, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}
    })
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn capabilities_name_the_generation() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        let caps = h.client.capabilities().await.unwrap();
        assert_eq!(caps.comfyui_version.as_deref(), Some(version.comfyui_version()));
        let newer = version == ComfyVersion::V0_38;
        assert_eq!(caps.jobs_api, newer, "{version}");
        assert_eq!(caps.generation(), if newer { Generation::Jobs } else { Generation::Legacy });
        assert_eq!((caps.features.assets, caps.features.node_replacements), (newer, newer), "{version}");
        assert!(caps.features.supports_preview_metadata);
        assert!(std::sync::Arc::ptr_eq(&caps, &h.client.capabilities().await.unwrap()), "detected once");
        // The connection detects them on its own once the socket is greeted.
        eventually("capabilities on the connection", async || h.conn.capabilities().is_some()).await;
    }
}

#[tokio::test]
async fn capabilities_are_detected_again_after_a_reconnect() {
    // A 0.3.64 server replaced by a 0.38 one on the same address.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let old = ComfyEmulator::start(listener, EmulatorConfig::default()).await.unwrap();
    let client = ComfyClient::new(&old.url(), options()).unwrap();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let conn = ComfyConnection::spawn(client.clone(), cancel);
    conn.wait_connected(WAIT).await.unwrap();
    assert!(!client.capabilities().await.unwrap().jobs_api);
    old.shutdown().await;
    drop(old);
    let listener = TcpListener::bind(addr).await.unwrap();
    let config = EmulatorConfig { comfyui_version: ComfyVersion::V0_38, ..EmulatorConfig::default() };
    let _new = ComfyEmulator::start(listener, config).await.unwrap();
    eventually("the 0.38 server detected", async || {
        conn.capabilities().is_some_and(|c| c.jobs_api && c.comfyui_version.as_deref() == Some("0.38.1"))
    })
    .await;
    assert!(conn.connects() >= 2);
}

#[tokio::test]
async fn every_request_names_comfyrelay_as_the_usage_source() {
    let h = harness_v(ComfyVersion::V0_38, options()).await;
    let id = pid();
    let (_, events) = h.conn.submit(&id, save_graph(40, 4)).await.unwrap();
    collect(events).await;
    let job = h.client.job(&id).await.unwrap().expect("job");
    assert_eq!(job["workflow"]["extra_data"]["comfy_usage_source"], "comfyrelay");
}

#[tokio::test]
async fn a_non_canonical_prompt_id_is_never_sent() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        let upper = pid().to_uppercase();
        for bad in ["not-a-uuid", upper.as_str(), "{67e55044-10b1-426f-9247-bb680e5fe0c8}", ""] {
            let err = h.conn.submit(bad, save_graph(41, 4)).await.unwrap_err();
            assert!(matches!(err, ComfyError::InvalidPromptId(_)), "{version} {bad:?}: {err:?}");
            assert_eq!(err.submit_failure(), SubmitFailure::Refused);
            let req =
                QueuePrompt { prompt_id: bad.to_owned(), graph: save_graph(41, 4), client_id: "c".into() };
            assert!(matches!(h.client.queue_prompt(&req).await, Err(ComfyError::InvalidPromptId(_))));
        }
        assert!(h.emu.posted_ids().is_empty(), "{version}: nothing reached the server");
        assert_eq!(h.conn.in_flight(), 0);
        // comfyrelay's own ids (UUIDv7) are canonical.
        let v7 = uuid::Uuid::now_v7().to_string();
        check_prompt_id(&v7).unwrap();
        let (_, events) = h.conn.submit(&v7, save_graph(42, 4)).await.unwrap();
        assert_eq!(collect(events).await.last(), Some(&PromptEvent::Succeeded), "{version}");
        assert_eq!(h.emu.posted_ids(), [v7]);
    }
}

#[tokio::test]
async fn a_lost_answer_is_looked_up_and_never_queued_twice() {
    for version in ALL {
        for how in [LostAnswer::Cut, LostAnswer::ServerError, LostAnswer::Hang(Duration::from_secs(30))] {
            let mut o = options();
            o.request_timeout = Duration::from_millis(700);
            let h = harness_v(version, o).await;
            h.client.capabilities().await.unwrap();
            h.emu.faults().lose_prompt_answers(1, how);
            let id = pid();
            let (queued, events) = h.conn.submit(&id, save_graph(43, 4)).await.unwrap();
            assert!(queued.recovered, "{version} {how:?}: found by the lookup");
            assert_eq!(queued.prompt_id, id);
            let events = collect(events).await;
            assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{version} {how:?}: {events:?}");
            assert_eq!(executed_nodes(&events), ["3"]);
            assert_eq!(
                (h.emu.posted_times(&id), h.emu.queued_times(&id)),
                (1, 1),
                "{version} {how:?}: sent once, queued once"
            );
        }
    }
}

#[tokio::test]
async fn a_lost_answer_that_no_lookup_can_settle_is_unconfirmed_not_resent() {
    for version in ALL {
        let mut o = options();
        o.max_retries = 2;
        let h = harness_v(version, o).await;
        h.client.capabilities().await.unwrap();
        h.emu.faults().lose_prompt_answers(1, LostAnswer::Cut);
        for path in ["/queue", "/history", "/api/jobs"] {
            h.emu.faults().fail_http(path, 1000);
        }
        let id = pid();
        let err = h.conn.submit(&id, save_graph(44, 4)).await.unwrap_err();
        assert!(
            matches!(&err, ComfyError::Unconfirmed { prompt_id, .. } if *prompt_id == id),
            "{version}: {err:?}"
        );
        assert_eq!(err.submit_failure(), SubmitFailure::AnswerLost);
        assert_eq!((h.emu.posted_times(&id), h.emu.queued_times(&id)), (1, 1), "{version}: never re-sent");
        assert_eq!(h.conn.in_flight(), 0);
    }
}

#[tokio::test]
async fn retry_classifier() {
    let e = |status: u16| ComfyError::from_status(status, "/prompt", "");
    assert_eq!(e(500).submit_failure(), SubmitFailure::AnswerLost);
    assert_eq!(e(502).submit_failure(), SubmitFailure::AnswerLost);
    assert_eq!(e(429).submit_failure(), SubmitFailure::AnswerLost);
    assert_eq!(e(400).submit_failure(), SubmitFailure::Refused);
    assert_eq!(e(403).submit_failure(), SubmitFailure::Refused);
    let timeout = ComfyError::Timeout { operation: "POST /prompt".into(), after: Duration::from_secs(1) };
    assert_eq!(timeout.submit_failure(), SubmitFailure::AnswerLost);
    // Connection refused: the request never left; sending again is safe.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut o = options();
    o.max_retries = 1;
    let client = ComfyClient::new(&format!("http://{addr}"), o).unwrap();
    let req = QueuePrompt { prompt_id: pid(), graph: save_graph(1, 4), client_id: "c".into() };
    let err = client.queue_prompt(&req).await.unwrap_err();
    assert!(matches!(err, ComfyError::Transport { .. }), "{err:?}");
    assert_eq!(err.submit_failure(), SubmitFailure::NotSent);
}

#[tokio::test]
async fn partial_validation_names_the_dropped_outputs() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        let (queued, events) = h.conn.submit(&pid(), partial_graph(45)).await.unwrap();
        assert!(queued.is_partial() && !queued.recovered);
        assert_eq!(queued.dropped_outputs.len(), 1, "{version}: {queued:?}");
        let dropped = &queued.dropped_outputs[0];
        assert_eq!((dropped.node_id.as_str(), dropped.class_type.as_str()), ("4", "SaveImage"));
        assert_eq!(dropped.errors.len(), 1);
        assert_eq!(
            (dropped.errors[0].node_id.as_str(), dropped.errors[0].error_type.as_str()),
            ("3", "value_not_in_list")
        );
        assert_eq!(queued.node_errors[0].dependent_outputs, ["4"]);
        let events = collect(events).await;
        assert_eq!(executed_nodes(&events), ["2"], "{version}: only the valid output ran");
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded));

        // Answer lost: the dropped outputs are read back from what ComfyUI runs.
        h.emu.faults().lose_prompt_answers(1, LostAnswer::Cut);
        let (queued, events) = h.conn.submit(&pid(), partial_graph(46)).await.unwrap();
        assert!(queued.recovered);
        let ids: Vec<&str> = queued.dropped_outputs.iter().map(|d| d.node_id.as_str()).collect();
        assert_eq!(ids, ["4"], "{version}: {queued:?}");
        collect(events).await;
        // Every output valid: nothing dropped.
        let (queued, events) = h.conn.submit(&pid(), save_graph(47, 4)).await.unwrap();
        assert!(!queued.is_partial());
        collect(events).await;
    }
}

#[tokio::test]
async fn cancel_dequeues_a_pending_prompt_and_interrupts_the_running_one() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        h.emu.faults().set_node_delay(Duration::from_millis(150));
        h.emu.faults().set_node_progress_steps(5);
        let (a, b) = (pid(), pid());
        let (_, mut ev_a) = h.conn.submit(&a, save_graph(48, 8)).await.unwrap();
        let (_, _ev_b) = h.conn.submit(&b, save_graph(49, 8)).await.unwrap();
        until(&mut ev_a, |e| matches!(e, PromptEvent::Executing { .. })).await;
        assert_eq!(h.client.prompt_state(&b).await.unwrap(), PromptState::Pending);
        assert_eq!(h.client.cancel_prompt(&b).await.unwrap(), CancelOutcome::Dequeued, "{version}");
        assert_eq!(h.client.prompt_state(&b).await.unwrap(), PromptState::Unknown);
        assert!(h.client.is_running(&a).await.unwrap());
        assert_eq!(h.client.cancel_prompt(&a).await.unwrap(), CancelOutcome::Interrupted, "{version}");
        let rest = collect(ev_a).await;
        assert!(matches!(rest.last(), Some(PromptEvent::Interrupted { .. })), "{version}: {rest:?}");
        // ComfyUI sends `execution_interrupted` before its worker writes the history entry (so does the
        // emulator): a read right after the event may still find the prompt running.
        eventually("the interrupted prompt in history", async || {
            matches!(
                h.client.prompt_state(&a).await.unwrap(),
                PromptState::Finished(HistoryStatus::Interrupted { .. })
            )
        })
        .await;
        assert_eq!(h.client.cancel_prompt(&a).await.unwrap(), CancelOutcome::NotActive);
        assert_eq!(h.client.cancel_prompt(&pid()).await.unwrap(), CancelOutcome::NotActive);
        assert_eq!(h.emu.queued_times(&b), 1);
    }
}

#[tokio::test]
async fn a_wedged_node_survives_cancel_and_ends_after_free_and_interrupt() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        h.emu.faults().wedge_node("ImageInvert", Duration::from_secs(60));
        let id = pid();
        let (_, mut events) = h.conn.submit(&id, save_graph(50, 8)).await.unwrap();
        until(&mut events, |e| matches!(e, PromptEvent::Executing { node, .. } if node == "2")).await;
        assert_eq!(h.client.cancel_prompt(&id).await.unwrap(), CancelOutcome::Interrupted, "{version}");
        // The grace period of an escalation: no terminal event, and the check says it still runs.
        let quiet = timeout(Duration::from_millis(300), events.recv()).await;
        assert!(quiet.is_err(), "{version}: the wedged node ignored the interrupt: {quiet:?}");
        assert!(h.client.is_running(&id).await.unwrap(), "{version}");
        assert_eq!(h.client.free_and_interrupt(&id).await.unwrap(), CancelOutcome::Interrupted, "{version}");
        let rest = collect(events).await;
        assert_eq!(
            rest.last(),
            Some(&PromptEvent::Interrupted {
                node_id: Some("2".into()),
                node_type: Some("ImageInvert".into())
            }),
            "{version}: {rest:?}"
        );
        assert_eq!(h.emu.free_calls(), 1);
        assert!(!h.client.is_running(&id).await.unwrap());
    }
}

#[tokio::test]
async fn execution_blocked_is_reported_but_not_terminal() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        h.emu.faults().block_outputs_of("ImageInvert", "switched off");
        let graph = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 51}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "blocked"}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "free"}}
        });
        let (_, events) = h.conn.submit(&pid(), graph).await.unwrap();
        let events = collect(events).await;
        let blocked = events.iter().find_map(|e| match e {
            PromptEvent::Other { kind, data } if kind == "execution_error" => Some(data.clone()),
            _ => None,
        });
        let blocked = blocked.unwrap_or_else(|| panic!("{version}: no ExecutionBlocked event: {events:?}"));
        assert_eq!(
            (blocked["exception_type"].as_str(), blocked["node_id"].as_str()),
            (Some("ExecutionBlocked"), Some("3"))
        );
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{version}");
        assert_eq!(executed_nodes(&events), ["4"]);
    }
}

#[tokio::test]
async fn reconcile_reads_the_jobs_api_where_there_is_one() {
    // With /queue and /history failing, only /api/jobs can settle a prompt whose socket went silent.
    let mut o = options();
    o.idle_probe = Duration::from_millis(150);
    o.probe_timeout = Duration::from_millis(150);
    o.request_timeout = Duration::from_millis(800);
    let h = harness_v(ComfyVersion::V0_38, o).await;
    h.client.capabilities().await.unwrap();
    h.emu.faults().set_silent(true);
    h.emu.faults().fail_http("/queue", 100_000);
    h.emu.faults().fail_http("/history", 100_000);
    let (_, events) = h.conn.submit(&pid(), save_graph(52, 8)).await.unwrap();
    let events = collect(events).await;
    assert_eq!(events.last(), Some(&PromptEvent::Succeeded), "{events:?}");
    assert_eq!(executed_nodes(&events), ["3"], "outputs from the job's detail: {events:?}");
    // 404 from /api/jobs/{id}, twice: lost.
    let events = collect(h.conn.attach(&pid())).await;
    assert!(matches!(events.last(), Some(PromptEvent::Lost { .. })), "{events:?}");
}

#[tokio::test]
async fn restart_and_attach_behave_alike_on_both_generations() {
    for version in ALL {
        let h = harness_v(version, options()).await;
        let done = pid();
        let (_, events) = h.conn.submit(&done, save_graph(53, 8)).await.unwrap();
        collect(events).await;
        let events = collect(h.conn.attach(&done)).await;
        assert_eq!(executed_nodes(&events), ["3"], "{version}");
        assert_eq!(events.last(), Some(&PromptEvent::Succeeded));

        h.emu.faults().set_node_delay(Duration::from_millis(300));
        let (_, mut running) = h.conn.submit(&pid(), save_graph(54, 8)).await.unwrap();
        until(&mut running, |e| matches!(e, PromptEvent::ExecutionStart)).await;
        h.emu.restart().await;
        let rest = collect(running).await;
        assert!(matches!(rest.last(), Some(PromptEvent::Lost { .. })), "{version}: {rest:?}");
    }
}
