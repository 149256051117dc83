//! End-to-end figures: comfyrelay in front of the emulated ComfyUI, in one process, over real loopback
//! sockets. Prints latency percentiles, throughput and memory; asserts nothing.
//!
//! Run: `cargo bench --bench throughput` (release build). `BENCH_JOBS=N` changes the job count.

use std::time::{Duration, Instant};

use comfyrelay::{
    Config,
    comfy::{ClientOptions, ComfyClient, ComfyConnection, PromptEvent},
    emulator::comfyui::ComfyEmulator,
    proto::pb,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 77]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn percentiles(label: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<44} n={:<5} p50={:>7.2?} p90={:>7.2?} p99={:>7.2?} max={:>7.2?}  {:.0} jobs/s",
        samples.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        samples[samples.len() - 1],
        samples.len() as f64 / wall.as_secs_f64()
    );
}

async fn run_to_end(
    client: &mut pb::job_service_client::JobServiceClient<Channel>,
    req: pb::SubmitJobRequest,
) {
    let job = client.submit_job(req).await.expect("submit").into_inner();
    let mut stream = client
        .stream_job(pb::StreamJobRequest { job_id: job.id, after_sequence: 0, skip_previews: false })
        .await
        .expect("stream")
        .into_inner();
    let mut last = None;
    while let Some(e) = stream.message().await.expect("event") {
        last = e.kind;
    }
    assert!(matches!(last, Some(pb::job_event::Kind::Succeeded(_))), "job did not succeed: {last:?}");
}

fn request(image: &[u8]) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("invert".into())),
        image: Some(pb::InputImage {
            data: image.to_vec().into(),
            filename: "b.png".into(),
            content_type: String::new(),
        }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::var("BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let image = png();
    let emulator =
        ComfyEmulator::start(tokio::net::TcpListener::bind("127.0.0.1:0").await?, Default::default()).await?;

    // Baseline: the ComfyUI client alone (socket + POST /prompt + events to the terminal one).
    {
        let client = ComfyClient::new(&emulator.url(), ClientOptions::default())?;
        let cancel = CancellationToken::new();
        let conn = ComfyConnection::spawn(client.clone(), cancel.clone());
        conn.wait_connected(Duration::from_secs(10)).await?;
        let graph = serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}
        });
        let mut samples = Vec::with_capacity(jobs);
        let start = Instant::now();
        for i in 0..jobs {
            let mut g = graph.clone();
            g["1"]["inputs"]["color"] = serde_json::json!(i % 16_000_000);
            let t = Instant::now();
            let (_, mut events) = conn.submit(&uuid::Uuid::new_v4().to_string(), g).await?;
            while let Some(e) = events.recv().await {
                if matches!(e, PromptEvent::Succeeded) {
                    break;
                }
            }
            samples.push(t.elapsed());
        }
        percentiles("ComfyUI client alone, sequential", samples, start.elapsed());
        cancel.cancel();
    }

    let data = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: data.path().to_path_buf(),
        workflows_dir: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows")),
        ..Config::default()
    };
    config.comfyui.servers[0].url = emulator.url();
    config.log.filter = "warn".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(comfyrelay::run(listener, config, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = pb::job_service_client::JobServiceClient::new(channel.clone());
    let rss_start = rss_kib();

    // Sequential: submit, stream to the terminal event, next.
    let mut samples = Vec::with_capacity(jobs);
    let start = Instant::now();
    for _ in 0..jobs {
        let t = Instant::now();
        run_to_end(&mut client, request(&image)).await;
        samples.push(t.elapsed());
    }
    percentiles("comfyrelay submit→terminal, sequential", samples, start.elapsed());

    // Concurrent: every job submitted at once, one subscriber each.
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let mut c = client.clone();
        let req = request(&image);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            run_to_end(&mut c, req).await;
            t.elapsed()
        }));
    }
    let mut samples = Vec::with_capacity(jobs);
    for t in tasks {
        samples.push(t.await?);
    }
    percentiles("comfyrelay submit→terminal, all at once", samples, start.elapsed());

    // Replay: a finished job's whole log, read by a late subscriber.
    let page =
        client.list_jobs(pb::ListJobsRequest { page_size: 100, ..Default::default() }).await?.into_inner();
    let start = Instant::now();
    let mut events = 0usize;
    for job in &page.jobs {
        let mut s = client
            .stream_job(pb::StreamJobRequest {
                job_id: job.id.clone(),
                after_sequence: 0,
                skip_previews: false,
            })
            .await?
            .into_inner();
        while s.message().await?.is_some() {
            events += 1;
        }
    }
    let wall = start.elapsed();
    println!(
        "{:<44} {} streams, {events} events in {wall:.2?} ({:.0} events/s)",
        "replay of finished jobs",
        page.jobs.len(),
        events as f64 / wall.as_secs_f64()
    );
    println!(
        "{:<44} {} KiB at start, {} KiB after {} jobs (relay + emulator + client in one process)",
        "resident memory",
        rss_start,
        rss_kib(),
        2 * jobs
    );

    shutdown.cancel();
    let _ = server.await;
    emulator.shutdown().await;
    Ok(())
}
