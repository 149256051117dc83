//! What an operator sees: `/metrics` moved by exactly the jobs run, one OTLP trace per job continuing the
//! caller's `traceparent`, and health that follows the backend.
//!
//! The metrics and trace tests run the built binary: the metrics registry and the tracing subscriber are
//! process-wide, and other tests of this binary run jobs at the same time.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use comfyrelay::{emulator::comfyui::ComfyEmulator, proto::pb};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use pb::job_event::Kind;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{collect_events, png, spawn_app, spawn_comfy, submit_request, terminal, wait_for_event};

/// `comfyrelay serve` as a child process, with the addresses it logged and every JSON log line it wrote.
struct Relay {
    child: tokio::process::Child,
    channel: Channel,
    metrics: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    log_done: tokio::task::JoinHandle<()>,
}

async fn start_relay(data_dir: &Path, comfy_url: &str, extra: &[(&str, String)]) -> Relay {
    let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("COMFYRELAY_AUTH__MODE", "none")
        .env("COMFYRELAY_LOG__FORMAT", "json")
        .env("COMFYRELAY_LOG__FILTER", "info,comfyrelay=debug")
        .env("COMFYRELAY_DATA_DIR", data_dir)
        .env("COMFYRELAY_WORKFLOWS_DIR", &workflows)
        .env("COMFYRELAY_COMFYUI__SERVERS", format!("[{{name = \"local\", url = \"{comfy_url}\"}}]"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn comfyrelay");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let echo = std::env::var_os("TEST_LOG").is_some();
    let (mut metrics, mut grpc) = (None, None);
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if echo {
                eprintln!("relay: {line}");
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let addr = || v["fields"]["addr"].as_str().and_then(|a| a.parse().ok());
            match v["fields"]["message"].as_str() {
                Some("serving metrics") => metrics = addr(),
                Some("serving gRPC") => grpc = addr(),
                _ => {}
            }
            logs.lock().unwrap().push(v);
            if grpc.is_some() {
                return;
            }
        }
        panic!("comfyrelay exited before serving");
    })
    .await
    .expect("comfyrelay serves within 60 s");
    // Keep reading (and keeping) the log so the child never blocks on a full pipe.
    let keep = logs.clone();
    let log_done = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("relay: {line}");
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                keep.lock().unwrap().push(v);
            }
        }
    });
    let addr: SocketAddr = grpc.expect("gRPC address");
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
    Relay { child, channel, metrics, logs, log_done }
}

impl Relay {
    fn jobs(&self) -> pb::job_service_client::JobServiceClient<Channel> {
        pb::job_service_client::JobServiceClient::new(self.channel.clone())
    }

    /// SIGTERM, then waits for a clean exit (bounded) and for the last log line.
    async fn stop(mut self) -> Vec<serde_json::Value> {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s");
        assert!(status.expect("wait").success(), "comfyrelay exits 0 after SIGTERM");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.log_done).await;
        self.logs.lock().unwrap().clone()
    }
}

/// Waits (bounded) until `service` reports `want` on `channel`.
async fn wait_for_health(channel: &Channel, service: &str, want: ServingStatus) {
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest { service: service.into() })
        .await
        .expect("health watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(r) = watch.message().await.expect("health watch item") {
            if r.status() == want {
                return;
            }
        }
        panic!("health watch of {service} ended");
    })
    .await
    .unwrap_or_else(|_| panic!("{service} is {want:?} within 30 s"));
}

// ---- metrics ----

/// A scrape: every sample by its name and sorted labels.
#[derive(Debug, Default)]
struct Scrape {
    text: String,
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never contain `",` (no free text in labels), so a split is exact.
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").expect("label");
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            samples.insert((name.to_string(), map), value.parse().expect("sample value"));
        }
        Self { text, samples }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.get(&(name.to_string(), key)).copied().unwrap_or(0.0)
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .error_for_status()
        .expect("200")
        .text()
        .await
        .expect("body");
    Scrape::parse(body)
}

/// The target directory (where `.ci/run` finds the scrape for `promtool check metrics`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Checks the exposition with `promtool check metrics` when promtool is installed; under CI it must be.
fn promtool_check_metrics(text: &str) {
    use std::io::Write as _;
    let dir = target_dir().join("observability");
    std::fs::create_dir_all(&dir).expect("target dir");
    let file = dir.join("metrics.prom");
    std::fs::write(&file, text).expect("write scrape");
    let spawned = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required under CI (.ci/run installs it): {e}"
            );
            eprintln!("promtool not installed; the scrape is in {}", file.display());
            return;
        }
    };
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_move_by_exactly_the_jobs_run() {
    let comfy = spawn_comfy().await;
    let data = tempfile::tempdir().unwrap();
    let relay =
        start_relay(data.path(), &comfy.url(), &[("COMFYRELAY_METRICS__LISTEN", "127.0.0.1:0".into())]).await;
    let metrics = relay.metrics.expect("the metrics address is logged");
    wait_for_health(&relay.channel, "comfyrelay.v1.JobService", ServingStatus::Serving).await;
    let before = scrape(metrics).await;
    let mut jobs = relay.jobs();

    // A success.
    let ok = jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&relay.channel, &ok.id, 0).await), "succeeded");
    // A failure: the node raises.
    comfy.faults().fail_node("ImageInvert", "boom: out of memory");
    let failed = jobs.submit_job(submit_request("invert", png(5, 5))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&relay.channel, &failed.id, 0).await), "failed");
    comfy.faults().clear();
    // A cancel, once it runs.
    comfy.faults().set_node_delay(Duration::from_millis(500));
    let cancelled = jobs.submit_job(submit_request("invert", png(6, 6))).await.unwrap().into_inner();
    wait_for_event(&relay.channel, &cancelled.id, |e| matches!(e.kind, Some(Kind::NodeStarted(_)))).await;
    jobs.cancel_job(pb::CancelJobRequest { job_id: cancelled.id.clone(), reason: "enough".into() })
        .await
        .unwrap();
    assert_eq!(terminal(&collect_events(&relay.channel, &cancelled.id, 0).await), "cancelled");
    comfy.faults().clear();

    // Stream producers end just after their last event: wait (bounded) for the subscriber gauge to settle.
    let mut after = scrape(metrics).await;
    for _ in 0..100 {
        if after.get("comfyrelay_stream_subscribers", &[]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(metrics).await;
    }
    let moved = |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let wf = ("workflow", "invert");

    assert_eq!(moved("comfyrelay_jobs_submitted_total", &[wf]), 3.0);
    for (state, reason) in [("succeeded", ""), ("failed", "execution"), ("cancelled", "")] {
        let labels = [wf, ("state", state), ("reason", reason)];
        assert_eq!(moved("comfyrelay_jobs_finished_total", &labels), 1.0, "{state}\n{}", after.text);
    }
    // All three started: each waited in the queue once and uploaded once; only the success ran to the end.
    assert_eq!(moved("comfyrelay_job_queue_wait_seconds_count", &[wf]), 3.0);
    assert_eq!(moved("comfyrelay_job_stage_seconds_count", &[wf, ("stage", "upload")]), 3.0);
    assert_eq!(moved("comfyrelay_job_stage_seconds_count", &[wf, ("stage", "execution")]), 1.0);
    assert_eq!(moved("comfyrelay_job_stage_seconds_count", &[wf, ("stage", "download")]), 1.0);
    for kind in ["succeeded", "failed", "cancelled", "started"] {
        let expected = if kind == "started" { 3.0 } else { 1.0 };
        assert_eq!(moved("comfyrelay_events_relayed_total", &[("kind", kind)]), expected, "events {kind}");
    }
    let submit = [("method", "comfyrelay.v1.JobService/SubmitJob"), ("code", "OK")];
    assert_eq!(moved("comfyrelay_grpc_requests_total", &submit), 3.0);
    let cancel = [("method", "comfyrelay.v1.JobService/CancelJob"), ("code", "OK")];
    assert_eq!(moved("comfyrelay_grpc_requests_total", &cancel), 1.0);
    let streams = [("method", "comfyrelay.v1.JobService/StreamJob"), ("code", "OK")];
    assert_eq!(moved("comfyrelay_grpc_requests_total", &streams), 3.0, "the 3 streams read to their end");
    assert_eq!(
        moved(
            "comfyrelay_grpc_request_duration_seconds_count",
            &[("method", "comfyrelay.v1.JobService/SubmitJob")]
        ),
        3.0
    );
    assert_eq!(after.get("comfyrelay_comfyui_connected", &[("server", "local")]), 1.0);
    assert_eq!(after.get("comfyrelay_stream_subscribers", &[]), 0.0);
    assert_eq!(after.get("comfyrelay_queue_depth", &[]), 0.0);
    assert!(moved("comfyrelay_store_commit_seconds_count", &[]) > 0.0);
    assert!(after.text.contains("# HELP comfyrelay_jobs_finished_total"), "help text is exported");

    promtool_check_metrics(&after.text);
    relay.stop().await;
}

// ---- traces ----

/// An in-process OTLP collector: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: HashMap<String, String>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for s in scope.spans {
                    let attributes = s
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => s.clone(),
                                Some(Value::IntValue(i)) => i.to_string(),
                                Some(Value::BoolValue(b)) => b.to_string(),
                                Some(Value::DoubleValue(d)) => d.to_string(),
                                _ => String::new(),
                            };
                            (kv.key.clone(), v)
                        })
                        .collect();
                    spans.push(Span {
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent_span_id: hex::encode(&s.parent_span_id),
                        name: s.name,
                        attributes,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_collector() -> (Collector, SocketAddr, tokio_util::sync::CancellationToken) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let serve = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
    tokio::spawn(serve);
    (collector, addr, stop)
}

#[tokio::test]
async fn each_job_is_one_trace_continuing_the_callers_traceparent() {
    let (collector, otlp, stop_collector) = start_collector().await;
    let comfy = spawn_comfy().await;
    let data = tempfile::tempdir().unwrap();
    let relay = start_relay(
        data.path(),
        &comfy.url(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
            ("OTEL_SERVICE_NAME", "relay-test".into()),
        ],
    )
    .await;
    wait_for_health(&relay.channel, "comfyrelay.v1.JobService", ServingStatus::Serving).await;

    // Two callers, each with its own trace.
    let callers = [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
    ];
    let mut jobs = Vec::new();
    for (i, (trace, span)) in callers.iter().enumerate() {
        let mut request = tonic::Request::new(submit_request("invert", png(4 + i as u32, 4)));
        request.metadata_mut().insert("traceparent", format!("00-{trace}-{span}-01").parse().unwrap());
        let job = relay.jobs().submit_job(request).await.unwrap().into_inner();
        assert_eq!(terminal(&collect_events(&relay.channel, &job.id, 0).await), "succeeded");
        jobs.push(job.id);
    }
    // A graceful stop flushes the exporter.
    let logs = relay.stop().await;
    stop_collector.cancel();
    let spans = collector.spans.lock().unwrap().clone();

    for ((trace, caller_span), job_id) in callers.iter().zip(&jobs) {
        let in_trace: Vec<&Span> = spans.iter().filter(|s| &s.trace_id == trace).collect();
        let named = |name: &str| in_trace.iter().filter(|s| s.name == name).copied().collect::<Vec<_>>();
        let rpc = named("comfyrelay.v1.JobService/SubmitJob");
        assert_eq!(rpc.len(), 1, "one SubmitJob span in trace {trace}: {in_trace:#?}");
        assert_eq!(&rpc[0].parent_span_id, caller_span, "SubmitJob continues the caller's span");
        let job = named("job");
        assert_eq!(job.len(), 1, "one job span: {in_trace:#?}");
        assert_eq!(job[0].attributes.get("job_id"), Some(job_id));
        assert_eq!(job[0].attributes.get("machine").map(String::as_str), Some("local"));
        assert_eq!(job[0].attributes.get("state").map(String::as_str), Some("SUCCEEDED"));
        // The job span is inside the call; its phases and stages are inside the job.
        let ids: Vec<&str> = in_trace.iter().map(|s| s.span_id.as_str()).collect();
        assert!(ids.contains(&job[0].parent_span_id.as_str()), "job span's parent is in the trace");
        for name in ["queue", "run"] {
            let s = named(name);
            assert_eq!(s.len(), 1, "one {name} span: {in_trace:#?}");
            assert_eq!(s[0].parent_span_id, job[0].span_id, "{name} is a child of the job");
        }
        let run = &named("run")[0];
        assert_eq!(run.attributes.get("machine").map(String::as_str), Some("local"));
        assert_eq!(run.attributes.get("job_id"), Some(job_id));
        assert_eq!(named("upload").len(), 1);
        let nodes: Vec<&str> = named("node")
            .iter()
            .map(|s| s.attributes.get("class_type").map(String::as_str).unwrap_or(""))
            .collect();
        for class in ["LoadImage", "ImageInvert", "SaveImage"] {
            assert!(nodes.contains(&class), "a node span for {class}: {nodes:?}");
        }
        assert_eq!(named("download").len(), 1, "one output downloaded");
        for s in named("upload").iter().chain(&named("node")).chain(&named("download")) {
            assert_eq!(s.parent_span_id, run.span_id, "{} is a child of the run", s.name);
        }
        // No span of this job lives in another trace (StreamJob calls are the caller's other traces).
        let elsewhere = spans
            .iter()
            .filter(|s| ["job", "queue", "provisioning", "run"].contains(&s.name.as_str()))
            .filter(|s| &s.trace_id != trace && s.attributes.get("job_id") == Some(job_id))
            .count();
        assert_eq!(elsewhere, 0, "job {job_id} is one trace");
        // Its log lines carry the trace id.
        let line = logs
            .iter()
            .find(|l| l["fields"]["message"] == "job finished" && l["fields"]["job_id"] == job_id.as_str())
            .unwrap_or_else(|| panic!("a 'job finished' log line for {job_id}"));
        assert_eq!(line["openTelemetry"]["traceId"], *trace, "{line}");
    }
}

// ---- health ----

#[tokio::test]
async fn job_service_health_follows_its_only_comfyui() {
    let mut app = spawn_app().await;
    let mut watch = crate::helpers::HealthWatch::start(&app.channel, "comfyrelay.v1.JobService").await;
    let mut next = async || watch.next().await;
    // NOT_SERVING until the socket to ComfyUI is open (bounded by `next`).
    while next().await != ServingStatus::Serving {}

    // The only ComfyUI stops: no backend can take a job.
    let addr = app.comfy.addr();
    app.comfy.shutdown().await;
    assert_eq!(next().await, ServingStatus::NotServing);
    let mut health = HealthClient::new(app.channel.clone());
    let now = health.check(HealthCheckRequest { service: "comfyrelay.v1.JobService".into() }).await.unwrap();
    assert_eq!(now.into_inner().status(), ServingStatus::NotServing);
    let overall = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(overall.into_inner().status(), ServingStatus::Serving, "the process itself is fine");

    // It comes back on the same address.
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind the emulator's port");
    app.comfy = ComfyEmulator::start(listener, Default::default()).await.expect("restart emulator");
    assert_eq!(next().await, ServingStatus::Serving);
    let job = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &job.id, 0).await), "succeeded");

    // Drain: the overall service turns NOT_SERVING too.
    let mut overall = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    app.shutdown.cancel();
    assert_eq!(next().await, ServingStatus::NotServing);
    let drained = tokio::time::timeout(Duration::from_secs(10), overall.message()).await.expect("drain seen");
    assert_eq!(drained.unwrap().unwrap().status(), ServingStatus::NotServing);
    // Then the watches end, so that they do not hold the graceful stop open until its deadline.
    let ended =
        tokio::time::timeout(Duration::from_secs(10), overall.message()).await.expect("the watch ends");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    watch.ended().await;
    app.stop().await.unwrap();
}
