//! Several replicas on one real PostgreSQL database (`storage.database_url`), each the built binary in a
//! process of its own: one leads, the others wait as standbys that answer health only, and a standby takes
//! over when the leader is killed, re-attaching its prompts the way a restart does.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use comfyrelay::{emulator::comfyui::ComfyEmulator, proto::pb};
use futures::StreamExt as _;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};
use tonic::transport::Channel;

use crate::helpers::{assert_gap_free, collect_events, png, submit_request, terminal};

#[path = "../support/postgres.rs"]
mod pg_server;
#[path = "../support/s3.rs"]
mod s3_server;

/// One `comfyrelay serve` process; its JSON log lines arrive on `log`.
struct Replica {
    child: tokio::process::Child,
    log: mpsc::UnboundedReceiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    _data: tempfile::TempDir,
}

impl Replica {
    /// A replica whose configured ComfyUI servers are `comfys` (named `gpu0`, `gpu1`, …), with `env` added
    /// to the test's settings.
    fn spawn_with(
        database_url: &str,
        artifacts: &Path,
        comfys: &[&ComfyEmulator],
        env: &[(&str, &str)],
    ) -> Self {
        let servers: Vec<String> = comfys
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{{name = \"gpu{i}\", url = \"{}\"}}", c.url()))
            .collect();
        let data = tempfile::tempdir().unwrap();
        let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
            .env("COMFYRELAY_METRICS__LISTEN", "127.0.0.1:0")
            .env("COMFYRELAY_LOG__FORMAT", "json")
            .env("COMFYRELAY_LOG__FILTER", "info")
            .env("COMFYRELAY_DATA_DIR", data.path())
            .env("COMFYRELAY_WORKFLOWS_DIR", &workflows)
            .env("COMFYRELAY_STORAGE__DATABASE_URL", database_url)
            .env("COMFYRELAY_STORAGE__ARTIFACTS_DIR", artifacts)
            .env("COMFYRELAY_COMFYUI__SERVERS", format!("[{}]", servers.join(", ")))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn comfyrelay serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, log) = mpsc::unbounded_channel();
        // Reads the log until the process ends, so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Self { child, log, seen: Vec::new(), _data: data }
    }

    /// Waits (bounded) for a log line whose message is `message`; returns its `addr` field.
    async fn wait_for(&mut self, message: &str) -> SocketAddr {
        let v = self.wait_for_line(message).await;
        v["fields"]["addr"].as_str().expect("addr").parse().expect("socket addr")
    }

    /// Waits (bounded) for a log line whose message is `message`; returns it.
    async fn wait_for_line(&mut self, message: &str) -> serde_json::Value {
        let found = async {
            if let Some(v) = self.seen.iter().find(|v| v["fields"]["message"] == message) {
                return v.clone();
            }
            while let Some(v) = self.log.recv().await {
                self.seen.push(v.clone());
                if v["fields"]["message"] == message {
                    return v;
                }
            }
            panic!("comfyrelay exited before logging {message:?}: {:#?}", self.seen);
        };
        tokio::time::timeout(Duration::from_secs(60), found)
            .await
            .unwrap_or_else(|_| panic!("no {message:?} within 60 s"))
    }

    fn messages(&mut self) -> Vec<String> {
        while let Ok(v) = self.log.try_recv() {
            self.seen.push(v);
        }
        self.seen.iter().filter_map(|v| v["fields"]["message"].as_str().map(str::to_string)).collect()
    }
}

/// The value of `comfyrelay_replica_leading` on a replica's `/metrics`.
async fn leading(replica: &mut Replica) -> String {
    let addr = replica.wait_for("serving metrics").await;
    let scrape =
        reqwest::get(format!("http://{addr}/metrics")).await.expect("scrape").text().await.expect("body");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix("comfyrelay_replica_leading "))
        .unwrap_or_else(|| panic!("no comfyrelay_replica_leading in {scrape}"))
        .to_string()
}

/// Ends, as the database administrator, the sessions of `url`'s server selected by `from_where` (a `FROM`
/// clause with a `pid` column, without the `FROM`); one `true` per session ended.
async fn terminate_sessions(url: &str, from_where: &str) -> Vec<bool> {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(url).await.expect("connect as admin");
    sqlx::query_scalar(&format!("SELECT pg_terminate_backend(pid) FROM {from_where}"))
        .fetch_all(&mut admin)
        .await
        .expect("terminate sessions")
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect")
}

async fn health(channel: &Channel, service: &str) -> i32 {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    h.check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .expect("health check")
        .into_inner()
        .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_is_killed_and_runs_no_prompt_twice() {
    let comfy = crate::helpers::spawn_comfy().await;
    // Each node takes a while, so jobs are queued and running on ComfyUI when the leader dies.
    comfy.faults().set_node_delay(Duration::from_millis(40));
    let Some(mut cluster) = Cluster::start("takeover", &[&comfy], [&[], &[]]).await else { return };
    let ([a, b], [a_addr, b_addr]) = (&mut cluster.replicas, cluster.addrs);
    let b_channel = channel(b_addr).await;
    assert_eq!(health(&b_channel, "").await, SERVING, "a standby is alive");
    // and ready once it follows the leader.
    until_serving(&b_channel, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;

    // Jobs go in through the standby (it forwards them to the leader); the leader streams them.
    let mut jobs = pb::job_service_client::JobServiceClient::new(b_channel.clone());
    let mut ids = Vec::new();
    for i in 0..12u32 {
        let job =
            jobs.submit_job(submit_request("invert", png(8 + i, 8))).await.expect("submit").into_inner();
        ids.push(job.id);
    }
    let a_channel = channel(a_addr).await;
    let mut jobs = pb::job_service_client::JobServiceClient::new(a_channel.clone());
    // What a subscriber of the leader saw of each job before it died (at least the first event).
    let mut seen_before = Vec::new();
    for id in &ids {
        let mut stream = jobs
            .stream_job(pb::StreamJobRequest { job_id: id.clone(), ..Default::default() })
            .await
            .expect("stream")
            .into_inner();
        let first = stream.message().await.expect("event").expect("an event");
        seen_before.push(first.sequence);
    }
    // Kill the leader once ComfyUI has some of its prompts (one running, others queued).
    tokio::time::timeout(Duration::from_secs(30), async {
        while comfy.queued_total() < 3 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("prompts reach ComfyUI");
    let queued_at_kill = comfy.queued_total();
    a.child.start_kill().expect("SIGKILL the leader");
    a.child.wait().await.expect("the leader exits");

    // The standby leads on the same address, and finishes every job, each prompt queued once.
    b.wait_for("serving gRPC").await;
    let b_channel = channel(b_addr).await;
    let mut b_jobs = pb::job_service_client::JobServiceClient::new(b_channel.clone());
    for (id, after) in ids.iter().zip(seen_before) {
        let events = collect_events(&b_channel, id, after).await;
        assert_gap_free(&events, after);
        assert_eq!(terminal(&events), "succeeded", "{id}: {events:?}");
        let outputs = b_jobs
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .expect("get_job")
            .into_inner()
            .outputs;
        assert!(!outputs.is_empty(), "{id} has its outputs");
    }
    assert_eq!(comfy.queued_total(), ids.len(), "one prompt queued per job, none twice");
    for prompt in comfy.posted_ids() {
        assert_eq!(comfy.queued_times(&prompt), 1, "prompt {prompt} was queued once");
    }
    assert!(
        queued_at_kill < ids.len(),
        "the leader died with jobs left: {queued_at_kill} of {} queued",
        ids.len()
    );
    let messages = b.messages();
    assert!(
        messages.iter().any(|m| m.starts_with("re-attaching to a prompt")),
        "the new leader re-attached the prompts the old one had running: {messages:#?}"
    );
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_stops_and_a_standby_takes_over() {
    let comfy = crate::helpers::spawn_comfy().await;
    let Some(mut cluster) = Cluster::start("fencing", &[&comfy], [&[], &[]]).await else { return };
    let ([a, b], [_, b_addr], url) = (&mut cluster.replicas, cluster.addrs, &cluster.url);
    assert_eq!((leading(a).await, leading(b).await), ("1".into(), "0".into()), "who leads, by metrics");

    // The database ends the session that holds the lease (as it does when the leader is cut off).
    let ended = terminate_sessions(url, "pg_locks WHERE locktype = 'advisory' AND granted").await;
    assert_eq!(ended, vec![true], "one session held the lease");

    // The leader notices at its next check, stops, and says so with its exit status.
    let status = tokio::time::timeout(Duration::from_secs(30), a.child.wait())
        .await
        .expect("the old leader stops within 30 s")
        .expect("wait");
    assert!(!status.success(), "a lost lease is an error exit: {status:?}");
    assert!(a.messages().iter().any(|m| m.contains("giving the lead up")), "{:?}", a.messages());

    b.wait_for("serving gRPC").await;
    assert_eq!(leading(b).await, "1");
    let channel = channel(b_addr).await;
    let mut jobs = pb::job_service_client::JobServiceClient::new(channel.clone());
    let job = jobs.submit_job(submit_request("invert", png(8, 8))).await.expect("the new leader takes jobs");
    let events = collect_events(&channel, &job.into_inner().id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    // And it is ready (the readiness watch turns it SERVING once its ComfyUI socket is up).
    until_serving(&channel, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;
}

/// Waits (bounded) until `service` on `channel` reports SERVING, watching again when the watch breaks (as
/// it does when a standby starts leading: its connections close and the channel reconnects).
async fn until_serving(channel: &Channel, service: &str, limit: Duration) {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    tokio::time::timeout(limit, async {
        loop {
            let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
            let Ok(watch) = h.watch(request).await else {
                // Retry interval while the channel reconnects.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut watch = watch.into_inner();
            while let Ok(Some(status)) = watch.message().await {
                if status.status == SERVING {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{service} SERVING within {limit:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_leader_killed_a_standby_adopts_its_machine_and_leaks_none() {
    use crate::pool::{Account, Process, eventually, fast_emulator, submit};
    let Some(pg) = pg_server::PgServer::start().await else { return };
    let url = pg.database("pool").await;
    let artifacts = tempfile::tempdir().unwrap();
    let mut acc = Account::new(fast_emulator(Duration::from_millis(30))).await;
    acc.config.storage.database_url = Some(comfyrelay::config::Secret::new(url));
    acc.config.storage.artifacts_dir = Some(artifacts.path().to_path_buf());
    acc.config.runcomfy.lease = Duration::from_secs(5);
    let (a, a_channel) = acc.start().await;
    until_serving(&a_channel, "comfyrelay.v1.JobService", Duration::from_secs(30)).await;
    let b_data = tempfile::tempdir().unwrap();
    let mut b_config = acc.config.clone();
    b_config.data_dir = b_data.path().to_path_buf();
    let b = Process::start(b_config).await;
    let b_channel = b.channel().await;

    // The leader launches a machine and runs the first job on it; the others wait in its queue.
    let ids = [submit(&a).await, submit(&a).await, submit(&a).await];
    eventually("a machine runs a job", Duration::from_secs(30), || {
        acc.emu
            .running_machines()
            .iter()
            .any(|m| acc.emu.comfyui(&m.server_id).is_some_and(|c| c.queued_total() > 0))
    })
    .await;
    a.kill().await;

    // B leads, adopts the machine from its row, and finishes every job on it (its streams answer
    // UNAVAILABLE until it leads, and are resumed).
    for id in &ids {
        let events = follow_to_end(&b_channel, id).await;
        assert_gap_free(&events, 0);
        assert_eq!(terminal(&events), "succeeded", "{id}: {events:?}");
    }
    assert_eq!(acc.emu.machines_launched(), 1, "the machine was adopted, not launched again");
    let machine = acc.emu.running_machines()[0].server_id.clone();
    let comfy = acc.emu.comfyui(&machine).expect("the machine's ComfyUI");
    assert_eq!(comfy.queued_total(), ids.len(), "one prompt per job, none twice");

    // The last leader stops: it leaves the machine to its lease (a next leader would adopt it), which
    // stops it; nothing went over the account's rate.
    b.stop().await;
    assert_eq!(acc.emu.running_machines().len(), 1, "left for a next leader");
    eventually("the lease stops the machine", Duration::from_secs(15), || {
        acc.emu.running_machines().is_empty()
    })
    .await;
    assert_eq!(acc.emu.rate_limited_responses(), 0, "no 429 across the two leaders");
}

/// The index of the replica among `alive` that leads (its log says it serves), waiting for one. (Health
/// does not tell: a standby mirrors its leader's.)
async fn leader(replicas: &mut [Replica], alive: &[usize]) -> usize {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            for &i in alive {
                if replicas[i].messages().iter().any(|m| m == "serving gRPC") {
                    return i;
                }
            }
            // Retry interval while a standby takes over.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a replica leads within 60 s")
}

/// A job's whole stream through `channel`, resumed after the last sequence received when a call fails
/// with UNAVAILABLE (as the CLI and the Python client do: a standby answers so while its leader is gone).
async fn follow_to_end(channel: &Channel, job_id: &str) -> Vec<pb::JobEvent> {
    let mut client = pb::job_service_client::JobServiceClient::new(channel.clone());
    let mut events: Vec<pb::JobEvent> = Vec::new();
    let read = async {
        loop {
            let after = events.last().map_or(0, |e| e.sequence);
            let request =
                pb::StreamJobRequest { job_id: job_id.into(), after_sequence: after, skip_previews: false };
            let broke = match client.stream_job(request).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(e)) => events.push(e),
                            Ok(None) => return,
                            Err(status) => break status,
                        }
                    }
                }
                Err(status) => status,
            };
            assert_eq!(broke.code(), tonic::Code::Unavailable, "{broke:?}");
            // Retry interval while a standby takes over.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the stream ends within 60 s");
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_over_three_replicas_and_two_comfyuis_run_exactly_once_through_two_leader_kills() {
    const JOBS: usize = 1000;
    let comfys = [crate::helpers::spawn_comfy().await, crate::helpers::spawn_comfy().await];
    for c in &comfys {
        c.faults().set_node_delay(Duration::from_millis(1));
    }
    let Some(mut cluster) = Cluster::start("thousand", &[&comfys[0], &comfys[1]], [&[], &[], &[]]).await
    else {
        return;
    };
    let (replicas, addrs) = (&mut cluster.replicas, cluster.addrs);
    // Lazy: reconnects by itself after the switch from standby to leader.
    let channels: Vec<_> = addrs
        .iter()
        .map(|addr| Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
        .collect();
    let queued = || comfys.iter().map(ComfyEmulator::queued_total).sum::<usize>();

    // 8 clients submit, each job with its own request id, to whichever replica leads; a submit whose
    // answer was lost with a killed leader is sent again with the same id, and finds the job.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let submitters: Vec<_> = (0..8)
        .map(|_| {
            let (channels, next) = (channels.clone(), next.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= JOBS {
                        return ids;
                    }
                    let mut request = submit_request("invert", png(4, 4));
                    request.request_id = format!("job-{n}");
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    let id = 'submitted: loop {
                        for channel in &channels {
                            let mut jobs = pb::job_service_client::JobServiceClient::new(channel.clone());
                            if let Ok(job) = jobs.submit_job(request.clone()).await {
                                break 'submitted job.into_inner().id;
                            }
                        }
                        assert!(tokio::time::Instant::now() < deadline, "job-{n} was never accepted");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    };
                    ids.push((n, id));
                }
            })
        })
        .collect();

    // Kill the leader twice, each time once ComfyUI has another third of the jobs.
    let mut alive = vec![0, 1, 2];
    for third in 1..=2 {
        tokio::time::timeout(Duration::from_secs(120), async {
            while queued() < third * JOBS / 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("prompts reach ComfyUI");
        let leader = leader(replicas, &alive).await;
        replicas[leader].child.start_kill().expect("SIGKILL the leader");
        replicas[leader].child.wait().await.expect("the leader exits");
        alive.retain(|&i| i != leader);
    }

    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await.expect("submitter"));
    }
    let distinct: std::collections::HashSet<_> = ids.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!((ids.len(), distinct.len()), (JOBS, JOBS), "one job per request id");

    let last = leader(replicas, &alive).await;
    let finished = futures::stream::iter(ids.iter().map(|(_, id)| {
        let channel = channels[last].clone();
        async move { (id.clone(), collect_events(&channel, id, 0).await) }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    for (id, events) in &finished {
        assert_gap_free(events, 0);
        assert_eq!(terminal(events), "succeeded", "{id}: {:?}", events.last());
    }
    assert_eq!(queued(), JOBS, "one prompt queued per job across both ComfyUIs, none twice");
    for c in &comfys {
        for prompt in c.posted_ids() {
            assert_eq!(c.queued_times(&prompt), 1, "prompt {prompt} queued once");
        }
    }
}

#[tokio::test]
async fn any_replica_serves_any_call_by_forwarding_it_to_the_leader() {
    let comfy = crate::helpers::spawn_comfy().await;
    let Some(cluster) = Cluster::start("forwarding", &[&comfy], [&[], &[], &[]]).await else { return };
    let [a, b, c] = cluster.addrs;
    let [a, b, c] = [&channel(a).await, &channel(b).await, &channel(c).await];
    // A standby is ready while its leader is: it serves every call through it.
    until_serving(b, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;
    until_serving(c, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;

    // Submitted on B, the same request again on C (one job), streamed on C and on A, downloaded on A and B.
    let mut request = submit_request("invert", png(16, 16));
    request.request_id = "once".into();
    let job = pb::job_service_client::JobServiceClient::new(b.clone())
        .submit_job(request.clone())
        .await
        .expect("submit on a standby")
        .into_inner();
    let again = pb::job_service_client::JobServiceClient::new(c.clone())
        .submit_job(request)
        .await
        .expect("the same request on another standby")
        .into_inner();
    assert_eq!(again.id, job.id, "one job per request id, whichever replica is asked");
    let on_c = collect_events(c, &job.id, 0).await;
    let on_a = collect_events(a, &job.id, 0).await;
    assert_gap_free(&on_c, 0);
    assert_eq!(terminal(&on_c), "succeeded", "{on_c:?}");
    assert_eq!(on_c, on_a, "the same stream through a standby as from the leader");
    let output = pb::job_service_client::JobServiceClient::new(a.clone())
        .get_job(pb::GetJobRequest { job_id: job.id.clone() })
        .await
        .expect("get_job")
        .into_inner()
        .outputs
        .into_iter()
        .next()
        .expect("an output");
    let downloads =
        [download(a, &job.id, &output.filename).await, download(b, &job.id, &output.filename).await];
    assert_eq!(downloads[0].len() as u64, output.size_bytes);
    assert_eq!(downloads[0], downloads[1], "the same bytes through a standby");

    // Errors come back as the leader gave them.
    let status = pb::job_service_client::JobServiceClient::new(c.clone())
        .submit_job(submit_request("no-such-workflow", png(4, 4)))
        .await
        .expect_err("an unknown workflow");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = pb::job_service_client::JobServiceClient::new(b.clone())
        .get_job(pb::GetJobRequest { job_id: uuid::Uuid::new_v4().to_string() })
        .await
        .expect_err("an unknown job");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

/// A submitter key of `tenant`, made by `comfyrelay keys create` on the replicas' database `url` from a data
/// directory of its own (which it leaves empty).
async fn create_key(url: &str, tenant: &str) -> String {
    let cli_data = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"))
        .args(["keys", "create", "--tenant", tenant, "--role", "submitter"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMFYRELAY_DATA_DIR", cli_data.path())
        .env("COMFYRELAY_STORAGE__DATABASE_URL", url)
        .output()
        .await
        .expect("run comfyrelay keys create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!cli_data.path().join("comfyrelay.db").exists(), "the CLI wrote to the shared database only");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn a_key_made_by_the_cli_on_the_shared_database_is_accepted_through_any_replica() {
    let comfy = crate::helpers::spawn_comfy().await;
    let keys: &[_] = &[("COMFYRELAY_AUTH__MODE", "keys")];
    let Some(cluster) = Cluster::start("keys", &[&comfy], [keys, keys]).await else { return };
    let ([a_addr, b_addr], url) = (cluster.addrs, &cluster.url);

    let key = create_key(url, "team-r").await;

    let b_channel = channel(b_addr).await;
    until_serving(&b_channel, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;
    for (name, addr) in [("the leader", a_addr), ("a standby", b_addr)] {
        let bearer = crate::helpers::Bearer(Some(format!("Bearer {key}").parse().unwrap()));
        let svc = tonic::service::interceptor::InterceptedService::new(channel(addr).await, bearer);
        let mut jobs = pb::job_service_client::JobServiceClient::new(svc);
        let job = jobs
            .submit_job(submit_request("invert", png(8, 8)))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s:?}"));
        let id = job.into_inner().id;
        let got = jobs.get_job(pb::GetJobRequest { job_id: id.clone() }).await.expect("its own job");
        assert_eq!(got.into_inner().id, id, "{name}");
        let status = pb::job_service_client::JobServiceClient::new(channel(addr).await)
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .expect_err("no key");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{name}: {status:?}");
    }
}

/// Metadata sent on every call.
#[derive(Clone)]
struct Headers(Vec<(&'static str, String)>);

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        for (name, value) in &self.0 {
            req.metadata_mut().insert(*name, value.parse().unwrap());
        }
        Ok(req)
    }
}

type TlsChannel = tonic::service::interceptor::InterceptedService<Channel, Headers>;

/// A TLS channel to `addr` trusting `ca` (the server named `localhost`), presenting `identity` if given.
async fn tls_channel(addr: SocketAddr, ca: &crate::tls::Ca, identity: Option<&crate::tls::Leaf>) -> Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())).domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect over TLS")
}

/// The job service on `channel`, sending `headers` on every call.
fn with_headers(
    channel: Channel,
    headers: &[(&'static str, String)],
) -> pb::job_service_client::JobServiceClient<TlsChannel> {
    let intercepted =
        tonic::service::interceptor::InterceptedService::new(channel, Headers(headers.to_vec()));
    pb::job_service_client::JobServiceClient::new(intercepted)
}

/// The job service over [`tls_channel`], sending `headers` on every call.
async fn tls_jobs(
    addr: SocketAddr,
    ca: &crate::tls::Ca,
    identity: Option<&crate::tls::Leaf>,
    headers: &[(&'static str, String)],
) -> pb::job_service_client::JobServiceClient<TlsChannel> {
    with_headers(tls_channel(addr, ca, identity).await, headers)
}

/// A job's whole stream through `jobs` (bounded).
async fn stream_to_end(
    jobs: &mut pb::job_service_client::JobServiceClient<TlsChannel>,
    job_id: &str,
) -> Vec<pb::JobEvent> {
    let request = pb::StreamJobRequest { job_id: job_id.into(), after_sequence: 0, skip_previews: false };
    let mut stream = jobs.stream_job(request).await.expect("stream_job").into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(e) = stream.message().await.expect("stream item") {
            events.push(e);
        }
    })
    .await
    .expect("the stream ends within 60 s");
    events
}

/// Files in a directory of their own, named by their paths as strings (for settings).
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let p = self.0.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p.to_str().unwrap().to_string()
    }
}

/// `(name, value)` settings as `spawn_with` takes them.
fn as_env<'a>(vars: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn with_tls_a_standby_forwards_a_callers_key_only_to_a_leader_whose_certificate_it_checks() {
    let comfy = crate::helpers::spawn_comfy().await;
    // Every replica serves the replicas' certificate (for `localhost` and `127.0.0.1`) and checks the
    // leader's against the replicas' CA; replica C is configured with another CA, as if the URL in the
    // database led to a server that is not a replica.
    let (ca, other_ca) = (crate::tls::Ca::new("replicas CA"), crate::tls::Ca::new("another CA"));
    let leaf = ca.server();
    let files = Files::new();
    let (cert, key_file) = (files.write("tls.crt", &leaf.cert), files.write("tls.key", &leaf.key));
    let (replicas_ca, another_ca) =
        (files.write("ca.crt", &ca.pem()), files.write("other-ca.crt", &other_ca.pem()));
    let env = |leader_ca: &str| {
        vec![
            ("COMFYRELAY_AUTH__MODE", "keys".to_string()),
            ("COMFYRELAY_GRPC__TLS__CERT_FILE", cert.clone()),
            ("COMFYRELAY_GRPC__TLS__KEY_FILE", key_file.clone()),
            ("COMFYRELAY_GRPC__TLS__LEADER_CA_FILE", leader_ca.to_string()),
        ]
    };
    let (trusting, distrusting) = (env(&replicas_ca), env(&another_ca));
    let (trusting, distrusting) = (as_env(&trusting), as_env(&distrusting));
    let Some(mut cluster) =
        Cluster::start("tls_forwarding", &[&comfy], [&trusting, &trusting, &distrusting]).await
    else {
        return;
    };
    let ([_, _, c], [a_addr, b_addr, c_addr]) = (&mut cluster.replicas, cluster.addrs);
    let key = [("authorization", format!("Bearer {}", create_key(&cluster.url, "team-t").await))];

    // B reaches the leader over TLS: its health follows the leader's, and a keyed call goes through.
    let b_channel = tls_channel(b_addr, &ca, None).await;
    until_serving(&b_channel, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;
    let mut on_b = with_headers(b_channel, &key);
    let job =
        on_b.submit_job(submit_request("invert", png(8, 8))).await.expect("submit through B").into_inner();
    let events = stream_to_end(&mut on_b, &job.id).await;
    assert_gap_free(&events, 0);
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    let got = on_b.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.expect("get_job through B");
    assert_eq!(got.into_inner().state, pb::JobState::Succeeded as i32);

    // C cannot check the leader's certificate: once it has read the leader's URL it forwards nothing and
    // answers UNAVAILABLE, saying why.
    c.wait_for_line("standby: forwarding calls to the leader").await;
    let mut on_c = tls_jobs(c_addr, &ca, None, &key).await;
    let status = on_c.submit_job(submit_request("invert", png(8, 8))).await.expect_err("C forwards");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cannot reach the leader"), "{status:?}");
    // The workflows it serves itself, to a caller with a key only.
    let c_channel = tls_channel(c_addr, &ca, None).await;
    let workflows = |headers: &[(&'static str, String)]| {
        let intercepted = tonic::service::interceptor::InterceptedService::new(
            c_channel.clone(),
            Headers(headers.to_vec()),
        );
        pb::workflow_service_client::WorkflowServiceClient::new(intercepted)
    };
    let listed = workflows(&key).list_workflows(pb::ListWorkflowsRequest {}).await.expect("C's workflows");
    assert!(listed.into_inner().workflows.iter().any(|w| w.name == "invert"));
    let status = workflows(&[]).list_workflows(pb::ListWorkflowsRequest {}).await.expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let on_a = tls_jobs(a_addr, &ca, None, &key)
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list on the leader")
        .into_inner();
    assert_eq!(
        on_a.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [job.id.as_str()],
        "C's calls never reached the leader"
    );
}

#[tokio::test]
async fn with_mtls_a_standby_forwards_as_the_caller_it_verified_and_nobody_else_can_name_a_caller() {
    let comfy = crate::helpers::spawn_comfy().await;
    // The replicas serve a certificate of the server CA and take client certificates of the client CA:
    // their own (`comfyrelay-replica`, in grpc.tls.replica_subjects) and two teams', each mapped to a tenant.
    let (ca, client_ca) = (crate::tls::Ca::new("server CA"), crate::tls::Ca::new("client CA"));
    let (leaf, replica) = (ca.server(), client_ca.client("comfyrelay-replica"));
    let (team_a, team_b) = (client_ca.client("team-a-ci"), client_ca.client("team-b-ci"));
    let files = Files::new();
    let path = |name: &str, contents: &str| files.write(name, contents);
    let env = [
        ("COMFYRELAY_AUTH__MODE", "keys".to_string()),
        ("COMFYRELAY_GRPC__TLS__CERT_FILE", path("tls.crt", &leaf.cert)),
        ("COMFYRELAY_GRPC__TLS__KEY_FILE", path("tls.key", &leaf.key)),
        ("COMFYRELAY_GRPC__TLS__CLIENT_CA_FILE", path("client-ca.crt", &client_ca.pem())),
        ("COMFYRELAY_GRPC__TLS__LEADER_CA_FILE", path("ca.crt", &ca.pem())),
        ("COMFYRELAY_GRPC__TLS__REPLICA_CERT_FILE", path("replica.crt", &replica.cert)),
        ("COMFYRELAY_GRPC__TLS__REPLICA_KEY_FILE", path("replica.key", &replica.key)),
        ("COMFYRELAY_GRPC__TLS__REPLICA_SUBJECTS", r#"["comfyrelay-replica"]"#.to_string()),
        (
            "COMFYRELAY_AUTH__CLIENT_CERTIFICATES",
            r#"[{subject = "team-a-ci", tenant = "team-a"}, {subject = "team-b-ci", tenant = "team-b"}]"#
                .to_string(),
        ),
    ];
    let env = as_env(&env);
    let Some(mut cluster) = Cluster::start("mtls_forwarding", &[&comfy], [&env, &env]).await else { return };
    let ([_, b], [a_addr, b_addr]) = (&mut cluster.replicas, cluster.addrs);
    b.wait_for_line("standby: forwarding calls to the leader").await;

    // team-a through the standby: submitted, streamed and read as team-a.
    let mut on_b = tls_jobs(b_addr, &ca, Some(&team_a), &[]).await;
    let job =
        on_b.submit_job(submit_request("invert", png(8, 8))).await.expect("submit through B").into_inner();
    let events = stream_to_end(&mut on_b, &job.id).await;
    assert_gap_free(&events, 0);
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    let get = pb::GetJobRequest { job_id: job.id.clone() };
    let output =
        on_b.get_job(get.clone()).await.expect("team-a reads its job through B").into_inner().outputs;
    let output = output.first().expect("an output").filename.clone();
    tls_jobs(a_addr, &ca, Some(&team_a), &[])
        .await
        .get_job(get.clone())
        .await
        .expect("the job is team-a's on the leader");

    // team-b cannot pass for team-a by naming it, neither through the standby (which names the caller it
    // verified) nor on the leader (which believes the header from a replica's certificate only).
    let forged = [("x-comfyrelay-forwarded-client", "team-a-ci".to_string())];
    for (name, addr) in [("through the standby", b_addr), ("on the leader", a_addr)] {
        let mut as_b = tls_jobs(addr, &ca, Some(&team_b), &forged).await;
        let hidden = as_b.get_job(get.clone()).await.expect_err("team-b reads team-a's job");
        assert_eq!(hidden.code(), tonic::Code::NotFound, "{name}: {hidden:?}");
        let listed = as_b.list_jobs(pb::ListJobsRequest::default()).await.expect("list").into_inner();
        assert!(listed.jobs.is_empty(), "{name}: team-b lists {listed:?}");
        let download = pb::DownloadOutputRequest {
            job_id: job.id.clone(),
            filename: output.clone(),
            chunk_size: 0,
            offset: 0,
        };
        let hidden = as_b.download_output(download).await.expect_err("team-b downloads team-a's output");
        assert_eq!(hidden.code(), tonic::Code::NotFound, "{name}: {hidden:?}");
        // A cancel is forwarded by the standby, naming team-b: the leader does not find the job either.
        let cancel = pb::CancelJobRequest { job_id: job.id.clone(), reason: String::new() };
        let hidden = as_b.cancel_job(cancel).await.expect_err("team-b cancels team-a's job");
        assert_eq!(hidden.code(), tonic::Code::NotFound, "{name}: {hidden:?}");
    }
    // The replica's own certificate maps to no tenant: without a forwarded caller it is nobody.
    let status = tls_jobs(a_addr, &ca, Some(&replica), &[])
        .await
        .get_job(get)
        .await
        .expect_err("the replica certificate alone reads a job");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

/// `N` replicas on a fresh database `db` of their own PostgreSQL server, on the ComfyUI servers `comfys`,
/// sharing an artifact directory, each with its entry of `envs` added to its settings (`auth.mode = none`
/// unless given). The first leads (started first, it logs "serving gRPC"); the others are standbys.
struct Cluster<const N: usize> {
    replicas: [Replica; N],
    addrs: [SocketAddr; N],
    url: String,
    artifacts: tempfile::TempDir,
    _pg: pg_server::PgServer,
}

impl<const N: usize> Cluster<N> {
    /// `None` (the test returns) without PostgreSQL.
    async fn start(db: &str, comfys: &[&ComfyEmulator], envs: [&[(&str, &str)]; N]) -> Option<Self> {
        let pg = pg_server::PgServer::start().await?;
        let url = pg.database(db).await;
        let artifacts = tempfile::tempdir().unwrap();
        let (mut replicas, mut addrs) = (Vec::new(), Vec::new());
        for (i, extra) in envs.into_iter().enumerate() {
            // Later settings win: a test's `COMFYRELAY_AUTH__MODE` replaces this one.
            let env: Vec<_> =
                [("COMFYRELAY_AUTH__MODE", "none")].into_iter().chain(extra.iter().copied()).collect();
            let mut r = Replica::spawn_with(&url, artifacts.path(), comfys, &env);
            let message =
                if i == 0 { "serving gRPC" } else { "standby: serving health only until this replica leads" };
            addrs.push(r.wait_for(message).await);
            replicas.push(r);
        }
        let replicas = replicas.try_into().unwrap_or_else(|_| unreachable!("one replica per entry of envs"));
        let addrs = addrs.try_into().unwrap_or_else(|_| unreachable!("one address per replica"));
        Some(Self { replicas, addrs, url, artifacts, _pg: pg })
    }
}

/// A leader (`a`) and a standby (`b`) on one ComfyUI: a [`Cluster`] of two, with plaintext channels.
struct Pair {
    a: Replica,
    a_channel: Channel,
    b: Replica,
    b_addr: SocketAddr,
    b_channel: Channel,
    url: String,
    artifacts: tempfile::TempDir,
    pg: pg_server::PgServer,
}

impl Pair {
    /// `None` (the test returns) without PostgreSQL.
    async fn start(
        db: &str,
        comfy: &ComfyEmulator,
        a_env: &[(&str, &str)],
        b_env: &[(&str, &str)],
    ) -> Option<Self> {
        let Cluster { replicas: [a, b], addrs: [a_addr, b_addr], url, artifacts, _pg } =
            Cluster::start(db, &[comfy], [a_env, b_env]).await?;
        let (a_channel, b_channel) = (channel(a_addr).await, channel(b_addr).await);
        Some(Self { a, a_channel, b, b_addr, b_channel, url, artifacts, pg: _pg })
    }
}

#[tokio::test]
async fn a_standby_streams_reads_and_serves_downloads_from_the_shared_database_without_reaching_the_leader() {
    let comfy = crate::helpers::spawn_comfy().await;
    // Several progress events per node, so the stream has more than a handful of live events.
    comfy.faults().set_node_delay(Duration::from_millis(20));
    comfy.faults().set_node_progress_steps(4);
    // The leader advertises an address nobody answers: its standby cannot forward one call to it.
    let unreachable = [("COMFYRELAY_GRPC__ADVERTISE_URL", "http://127.0.0.1:9")];
    let Some(mut pair) = Pair::start("following", &comfy, &unreachable, &[]).await else { return };
    let (a_channel, b_channel, url) = (pair.a_channel.clone(), pair.b_channel.clone(), pair.url.clone());
    let mut on_b = pb::job_service_client::JobServiceClient::new(b_channel.clone());

    // The job cannot get past ComfyUI's queue until the stream on the standby is open and delivering.
    comfy.hold_queue(true);
    let job = pb::job_service_client::JobServiceClient::new(a_channel.clone())
        .submit_job(submit_request("invert", png(16, 16)))
        .await
        .expect("submit on the leader")
        .into_inner();
    let request =
        |after| pb::StreamJobRequest { job_id: job.id.clone(), after_sequence: after, skip_previews: false };
    let mut live = on_b.stream_job(request(0)).await.expect("StreamJob on the standby").into_inner();
    let mut streamed = vec![live.message().await.expect("an event").expect("a first event")];
    assert_eq!(streamed[0].sequence, 1, "{streamed:?}");

    // PostgreSQL ends the standby's LISTEN session: it listens again and re-reads the log, losing nothing.
    let ended = terminate_sessions(&url, "pg_stat_activity WHERE query ILIKE 'LISTEN%'").await;
    assert_eq!(ended, vec![true], "the standby listens on one session");
    comfy.hold_queue(false);

    let rest = async {
        while let Some(e) = live.message().await.expect("the standby's stream") {
            streamed.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), rest).await.expect("the stream ends within 30 s");
    assert_gap_free(&streamed, 0);
    assert_eq!(terminal(&streamed), "succeeded", "{streamed:?}");
    let progress =
        streamed.iter().filter(|e| matches!(e.kind, Some(pb::job_event::Kind::Progress(_)))).count();
    assert!(progress >= 4, "progress events reach the standby's subscriber live: {streamed:?}");
    let from_leader = collect_events(&a_channel, &job.id, 0).await;
    assert_eq!(streamed, from_leader, "the same events, inline outputs included, as from the leader");

    // Resumed mid-way on the standby: exactly the rest.
    let middle = streamed[streamed.len() / 2].sequence;
    let tail = collect_events(&b_channel, &job.id, middle).await;
    assert_gap_free(&tail, middle);
    assert_eq!(tail.as_slice(), &streamed[middle as usize..]);
    // Past the terminal event, a finished job streams nothing.
    assert!(collect_events(&b_channel, &job.id, u64::MAX).await.is_empty());

    // Bad requests get the leader's answers, from the standby itself.
    let status = on_b
        .stream_job(pb::StreamJobRequest { job_id: uuid::Uuid::new_v4().to_string(), ..request(0) })
        .await
        .expect_err("an unknown job");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = on_b
        .stream_job(pb::StreamJobRequest { job_id: "not-a-job-id".into(), ..request(0) })
        .await
        .expect_err("a malformed id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("job_id"), "{status:?}");

    // The reads are the standby's too, and answer as the leader does: the job, a page of jobs, an output.
    let mut on_a = pb::job_service_client::JobServiceClient::new(a_channel.clone());
    let get = pb::GetJobRequest { job_id: job.id.clone() };
    let got = on_b.get_job(get.clone()).await.expect("GetJob on the standby").into_inner();
    assert_eq!(got, on_a.get_job(get).await.expect("GetJob on the leader").into_inner());
    assert_eq!(got.state, pb::JobState::Succeeded as i32, "{got:?}");
    let output = got.outputs.first().expect("an output").clone();
    assert!(!output.inline_data.is_empty(), "a small output inline, as on the leader: {output:?}");
    let page = pb::ListJobsRequest { page_size: 1, ..Default::default() };
    let listed = on_b.list_jobs(page.clone()).await.expect("ListJobs on the standby").into_inner();
    assert_eq!(listed, on_a.list_jobs(page).await.expect("ListJobs on the leader").into_inner());
    assert_eq!(listed.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()]);
    let bytes = download(&b_channel, &job.id, &output.filename).await;
    assert_eq!(bytes, download(&a_channel, &job.id, &output.filename).await);
    assert_eq!(bytes, output.inline_data, "the download is the output's bytes");
    let status = on_b
        .list_jobs(pb::ListJobsRequest { page_token: "not-a-token".into(), ..Default::default() })
        .await
        .expect_err("a bad page token");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("page_token"), "{status:?}");
    let status = on_b
        .download_output(pb::DownloadOutputRequest {
            job_id: job.id.clone(),
            filename: "no-such-output.png".into(),
            chunk_size: 0,
            offset: 0,
        })
        .await
        .expect_err("an unknown output");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // The workflows are the standby's own catalog, the leader's too; so are reflection and their health.
    let mut workflows_b = pb::workflow_service_client::WorkflowServiceClient::new(b_channel.clone());
    let mut workflows_a = pb::workflow_service_client::WorkflowServiceClient::new(a_channel.clone());
    let listed = workflows_b.list_workflows(pb::ListWorkflowsRequest {}).await.expect("on the standby");
    let listed = listed.into_inner();
    assert_eq!(listed, workflows_a.list_workflows(pb::ListWorkflowsRequest {}).await.unwrap().into_inner());
    assert!(listed.workflows.iter().any(|w| w.name == "invert"), "{listed:?}");
    let invert = pb::GetWorkflowRequest { name: "invert".into() };
    assert_eq!(
        workflows_b.get_workflow(invert.clone()).await.expect("GetWorkflow on the standby").into_inner(),
        workflows_a.get_workflow(invert).await.expect("GetWorkflow on the leader").into_inner()
    );
    let status = workflows_b
        .get_workflow(pb::GetWorkflowRequest { name: "no-such-workflow".into() })
        .await
        .expect_err("an unknown workflow");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let health = tonic_health::pb::health_client::HealthClient::new(b_channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: "comfyrelay.v1.WorkflowService".into() })
        .await
        .expect("the standby's health")
        .into_inner();
    assert_eq!(health.status, SERVING, "the standby serves the workflows whatever its leader");
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut reflection = ServerReflectionClient::new(b_channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection on the standby")
            .into_inner();
        let answer = reflection.message().await.expect("a reflection answer").expect("one message");
        let Some(MessageResponse::ListServicesResponse(services)) = answer.message_response else {
            panic!("a list of services: {answer:?}");
        };
        let names: Vec<_> = services.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"comfyrelay.v1.JobService"), "{names:?}");
    }

    // What changes a job is the leader's, and this one cannot be reached: the answers above were the
    // standby's own.
    let status = on_b
        .cancel_job(pb::CancelJobRequest { job_id: job.id.clone(), reason: String::new() })
        .await
        .expect_err("no leader to ask");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    {
        use tonic_types::StatusExt as _;
        assert_eq!(status.get_details_error_info().expect("ErrorInfo").reason, "LEADER_UNREACHABLE");
        assert!(status.get_details_retry_info().is_some(), "RetryInfo: {status:?}");
    }
    let status = on_b.submit_job(submit_request("invert", png(8, 8))).await.expect_err("no leader to ask");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // Each call is counted on the replica it reached: served by the standby, or not forwarded by it.
    let scrape = metrics_of(&mut pair.b).await;
    for (method, code) in [
        ("JobService/GetJob", "OK"),
        ("JobService/ListJobs", "OK"),
        ("JobService/DownloadOutput", "OK"),
        ("JobService/CancelJob", "UNAVAILABLE"),
        ("WorkflowService/GetWorkflow", "NOT_FOUND"),
    ] {
        let (method, code) = (format!(r#"method="comfyrelay.v1.{method}""#), format!(r#"code="{code}""#));
        assert!(
            scrape.lines().any(|l| l.starts_with("comfyrelay_grpc_requests_total{")
                && l.contains(&method)
                && l.contains(&code)),
            "{method} {code} counted on the standby:\n{scrape}"
        );
    }
}

#[tokio::test]
async fn while_the_database_is_down_a_replica_answers_unavailable_with_a_retry_delay_and_loses_nothing() {
    use tonic_types::StatusExt as _;
    let comfy = crate::helpers::spawn_comfy().await;
    let Some(mut pair) = Pair::start("outage", &comfy, &[], &[]).await else { return };
    let job = pb::job_service_client::JobServiceClient::new(pair.a_channel.clone())
        .submit_job(submit_request("invert", png(8, 8)))
        .await
        .expect("submit")
        .into_inner();
    let events = collect_events(&pair.a_channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");

    // The database goes away. The standby reads jobs from it itself: it says to retry, and no more.
    pair.pg.stop().await;
    let get = pb::GetJobRequest { job_id: job.id.clone() };
    let status = pb::job_service_client::JobServiceClient::new(pair.b_channel.clone())
        .get_job(get.clone())
        .await
        .expect_err("a read without its database");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "STORAGE_UNAVAILABLE", "{status:?}");
    assert!(status.get_details_retry_info().and_then(|r| r.retry_delay).is_some(), "RetryInfo: {status:?}");
    let port = pair.url.rsplit(':').next().and_then(|p| p.split('/').next()).expect("the database's port");
    assert!(!status.message().contains(port), "the database's address is not echoed: {status:?}");

    // It comes back: the leader stopped when its lease connection broke, the standby takes the lease, and
    // the job is there, as it was.
    pair.pg.start_again().await;
    pair.b.wait_for("serving gRPC").await;
    let got = pb::job_service_client::JobServiceClient::new(channel(pair.b_addr).await)
        .get_job(get)
        .await
        .expect("GetJob once the database is back")
        .into_inner();
    assert_eq!(got.state, pb::JobState::Succeeded as i32, "{got:?}");
    assert!(!got.outputs.is_empty(), "{got:?}");
}

/// The CLI (the built binary) in `dir`, its `--json` lines read as they come.
struct Cli {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Cli {
    fn spawn(dir: &Path, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"))
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the CLI");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// The next JSON line (bounded).
    async fn next_json(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line()).await;
        let line = line.expect("a line within 60 s").expect("stdout").expect("the CLI ended early");
        serde_json::from_str(&line).expect("a JSON line")
    }
}

#[tokio::test]
async fn the_cli_submits_through_a_takeover_once_and_follows_the_job_to_its_end() {
    use sqlx::Connection as _;
    let comfy = crate::helpers::spawn_comfy().await;
    let Some(pg) = pg_server::PgServer::start().await else { return };
    let url = pg.database("cli_takeover").await;
    // The test holds the leader lease, as a leader that is going away does: the replica waits as a
    // standby that knows no leader, and answers UNAVAILABLE to everything it would forward.
    let mut lease = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(comfyrelay::store::LEADER_LOCK)
        .execute(&mut lease)
        .await
        .expect("take the lease");
    let artifacts = tempfile::tempdir().unwrap();
    let mut replica =
        Replica::spawn_with(&url, artifacts.path(), &[&comfy], &[("COMFYRELAY_AUTH__MODE", "none")]);
    let addr = replica.wait_for("standby: serving health only until this replica leads").await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.png"), png(8, 8)).unwrap();
    let server = format!("http://{addr}");
    // A cancel of a job nobody has (forwarded, so it waits for a leader too), and the run.
    let unknown = uuid::Uuid::new_v4().to_string();
    let mut cancel = Cli::spawn(dir.path(), &["cancel", &unknown, "--json", "--server", &server]);
    let mut cli =
        Cli::spawn(dir.path(), &["run", "invert", "in.png", "--out", "out", "--json", "--server", &server]);
    // Both say they are retrying; then the lease is free and the replica leads.
    let retry = cancel.next_json().await;
    assert_eq!((&retry["type"], &retry["call"]), (&"reconnecting".into(), &"CancelJob".into()), "{retry}");
    let retry = cli.next_json().await;
    assert_eq!(retry["type"], "reconnecting", "{retry}");
    assert!(retry["error"].as_str().is_some_and(|e| e.contains("knows no leader")), "{retry}");
    lease.close().await.expect("give the lease up");
    replica.wait_for("serving gRPC").await;

    // The cancel got the leader's answer: there is no such job.
    let mut answer = cancel.next_json().await;
    while answer["type"] == "reconnecting" {
        answer = cancel.next_json().await;
    }
    assert_eq!((&answer["type"], &answer["code"]), (&"error".into(), &"NotFound".into()), "{answer}");
    let status = cancel.child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(2), "{answer}");

    let mut seen = vec![retry];
    loop {
        let line = cli.next_json().await;
        let succeeded = line["type"] == "event" && line["kind"] == "succeeded";
        seen.push(line);
        if succeeded {
            break;
        }
    }
    let status =
        tokio::time::timeout(Duration::from_secs(30), cli.child.wait()).await.expect("exits").expect("wait");
    assert_eq!(status.code(), Some(0), "{seen:#?}");
    let job = seen.iter().find(|l| l["type"] == "job").expect("the job line");
    assert!(job["request_id"].as_str().is_some_and(|r| r.starts_with("cli-")), "an idempotency key: {job}");
    let listed = pb::job_service_client::JobServiceClient::new(channel(addr).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1, "one job for the retried submit: {listed:?}");
    assert_eq!(comfy.queued_total(), 1, "one prompt");
    assert_eq!(std::fs::read_dir(dir.path().join("out")).expect("out/").count(), 1, "the output is saved");
}

#[tokio::test]
async fn a_standby_that_starts_leading_ends_its_calls_cleanly_naming_where_to_resume() {
    let comfy = crate::helpers::spawn_comfy().await;
    let Some(Pair { mut a, a_channel, mut b, b_addr, b_channel, url: _, artifacts: _artifacts, pg: _pg }) =
        Pair::start("switch", &comfy, &[], &[]).await
    else {
        return;
    };

    // A job held in ComfyUI's queue, streamed from the standby, and a health watch on the standby.
    comfy.hold_queue(true);
    let job = pb::job_service_client::JobServiceClient::new(a_channel)
        .submit_job(submit_request("invert", png(16, 16)))
        .await
        .expect("submit on the leader")
        .into_inner();
    let mut live = pb::job_service_client::JobServiceClient::new(b_channel.clone())
        .stream_job(pb::StreamJobRequest { job_id: job.id.clone(), ..Default::default() })
        .await
        .expect("StreamJob on the standby")
        .into_inner();
    let mut streamed = vec![live.message().await.expect("an event").expect("a first event")];
    let mut watch = tonic_health::pb::health_client::HealthClient::new(b_channel)
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("Watch on the standby")
        .into_inner();
    assert_eq!(watch.message().await.expect("a status").map(|s| s.status), Some(SERVING));
    tokio::time::timeout(Duration::from_secs(30), async {
        while comfy.queued_total() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the prompt reaches ComfyUI");

    // The leader dies; the standby starts leading.
    a.child.start_kill().expect("SIGKILL the leader");
    a.child.wait().await.expect("the leader exits");
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match live.message().await {
                Ok(Some(e)) => streamed.push(e),
                Ok(None) => panic!("the stream ended without a terminal event or a status: {streamed:?}"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the standby's stream ends when it leads");
    // The stream ends with a status (not a cut connection) that says where to resume ...
    let last = streamed.last().expect("events").sequence;
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains(&format!("after_sequence={last}")), "{ended:?}");
    // ... and the health watch ends as a call that completed, not as a transport error.
    let watched = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => {}
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the watch ends when the standby leads");
    assert!(watched.is_ok(), "the watch ended with {watched:?}");

    // Resumed where it said, on the replica now leading: the rest, no gap, to the end.
    b.wait_for("serving gRPC").await;
    comfy.hold_queue(false);
    let b_channel = channel(b_addr).await;
    let rest = collect_events(&b_channel, &job.id, last).await;
    assert_gap_free(&rest, last);
    assert_eq!(terminal(&rest), "succeeded", "{rest:?}");
    assert_eq!(comfy.queued_total(), 1, "the prompt was queued once");
}

/// The value of the counter `name` on a replica's `/metrics` (0 while it has not been counted).
async fn counter(replica: &mut Replica, name: &str) -> f64 {
    let scrape = metrics_of(replica).await;
    scrape.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// A scrape of a replica's `/metrics`.
async fn metrics_of(replica: &mut Replica) -> String {
    let addr = replica.wait_for("serving metrics").await;
    reqwest::get(format!("http://{addr}/metrics")).await.expect("scrape").text().await.expect("body")
}

#[tokio::test]
async fn a_standby_reads_a_jobs_row_once_and_its_log_once_per_commit_for_all_of_its_subscribers() {
    let comfy = crate::helpers::spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(20));
    comfy.faults().set_node_progress_steps(4);
    let Some(mut pair) = Pair::start("sharing", &comfy, &[], &[]).await else { return };
    let (a_channel, b_channel) = (pair.a_channel.clone(), pair.b_channel.clone());

    // Twenty subscribers of one job on the standby, all open before it runs.
    comfy.hold_queue(true);
    let job = pb::job_service_client::JobServiceClient::new(a_channel.clone())
        .submit_job(submit_request("invert", png(16, 16)))
        .await
        .expect("submit on the leader")
        .into_inner();
    let mut streams = Vec::new();
    let reads_at_start = counter(&mut pair.b, "comfyrelay_follower_log_reads_total").await;
    for _ in 0..20 {
        let mut stream = pb::job_service_client::JobServiceClient::new(b_channel.clone())
            .stream_job(pb::StreamJobRequest { job_id: job.id.clone(), ..Default::default() })
            .await
            .expect("StreamJob on the standby")
            .into_inner();
        let first = stream.message().await.expect("an event").expect("a first event");
        streams.push((vec![first], stream));
    }
    let reads_before = counter(&mut pair.b, "comfyrelay_follower_log_reads_total").await;
    // Opening: the job's row once (its tenant) and its log once for all twenty, plus a read per commit
    // that landed meanwhile; each subscriber reading the row for itself would be twenty.
    let opening = reads_before - reads_at_start;
    assert!((1.0..10.0).contains(&opening), "{opening} reads to open 20 subscribers of one job");
    comfy.hold_queue(false);
    let all = futures::future::join_all(streams.into_iter().map(|(mut seen, mut stream)| async move {
        while let Some(e) = stream.message().await.expect("the standby's stream") {
            seen.push(e);
        }
        seen
    }));
    let all = tokio::time::timeout(Duration::from_secs(30), all).await.expect("the streams end within 30 s");
    let from_leader = collect_events(&a_channel, &job.id, 0).await;
    assert_eq!(terminal(&from_leader), "succeeded", "{from_leader:?}");
    for streamed in &all {
        assert_eq!(streamed, &from_leader, "every subscriber of the standby gets the leader's stream");
    }
    // Each commit is announced once and read once for all twenty: at most one read per event streamed
    // live (a notice per commit), and a second when a commit lands during a read; twenty subscribers each
    // reading for themselves would read at least twenty times per commit.
    let reads = counter(&mut pair.b, "comfyrelay_follower_log_reads_total").await - reads_before;
    let live = from_leader.len() as f64 - 1.0;
    assert!(live >= 6.0, "enough events to count: {from_leader:?}");
    assert!(reads >= 1.0, "the standby counts its reads");
    assert!(reads <= 2.0 * live, "{reads} reads of the log for {live} live events and 20 subscribers");
}

#[tokio::test]
async fn a_standby_keeps_a_connection_with_an_open_stream_past_the_idle_timeout() {
    let comfy = crate::helpers::spawn_comfy().await;
    // Three nodes of 700 ms: the job, and its stream on the standby, last twice the idle timeout.
    comfy.faults().set_node_delay(Duration::from_millis(700));
    let short = [("COMFYRELAY_GRPC__IDLE_TIMEOUT", "1s"), ("COMFYRELAY_GRPC__KEEPALIVE_INTERVAL", "200ms")];
    let Some(pair) = Pair::start("idle", &comfy, &[], &short).await else { return };
    let (a_channel, b_channel) = (pair.a_channel.clone(), pair.b_channel.clone());
    let job = pb::job_service_client::JobServiceClient::new(a_channel)
        .submit_job(submit_request("invert", png(8, 8)))
        .await
        .expect("submit on the leader")
        .into_inner();
    let mut stream = pb::job_service_client::JobServiceClient::new(b_channel)
        .stream_job(pb::StreamJobRequest { job_id: job.id, ..Default::default() })
        .await
        .expect("StreamJob on the standby")
        .into_inner();
    let read = async {
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.expect("the stream is not cut") {
            events.push(event);
        }
        events
    };
    let events = tokio::time::timeout(Duration::from_secs(60), read).await.expect("the job ends");
    assert_gap_free(&events, 0);
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
}

/// The frames of a gRPC-Web answer: its messages and its trailers.
fn grpc_web_frames(body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers, mut rest) = (Vec::new(), String::new(), body);
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = rest[5..5 + len].to_vec();
        if rest[0] & 0x80 == 0 {
            messages.push(frame);
        } else {
            trailers.push_str(&String::from_utf8_lossy(&frame));
        }
        rest = &rest[5 + len..];
    }
    (messages, trailers)
}

#[tokio::test]
async fn a_standby_answers_grpc_web_forwarding_calls_and_streaming_jobs_itself() {
    use prost::Message as _;
    let comfy = crate::helpers::spawn_comfy().await;
    let Some(pair) = Pair::start("web", &comfy, &[], &[]).await else { return };
    let (a_channel, b_addr) = (pair.a_channel.clone(), pair.b_addr);
    until_serving(&pair.b_channel, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;
    let job = pb::job_service_client::JobServiceClient::new(a_channel.clone())
        .submit_job(submit_request("invert", png(8, 8)))
        .await
        .expect("submit on the leader")
        .into_inner();
    let from_leader = collect_events(&a_channel, &job.id, 0).await;

    // A browser speaks gRPC-Web over HTTP/1.1 (frame = flag + u32 length + message).
    let web_call = |method: &str, message: Vec<u8>| {
        let mut body = vec![0u8];
        body.extend((message.len() as u32).to_be_bytes());
        body.extend(message);
        reqwest::Client::new()
            .post(format!("http://{b_addr}/{method}"))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(body)
            .send()
    };
    // Forwarded to the leader: its machines (the standby runs none).
    let resp = web_call("comfyrelay.v1.MachineService/ListMachines", Vec::new()).await.expect("grpc-web");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/grpc-web+proto")
    );
    let (messages, trailers) = grpc_web_frames(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let machines = pb::ListMachinesResponse::decode(messages[0].as_slice()).expect("a ListMachinesResponse");
    assert_eq!(machines.machines.len(), 1, "the leader's one ComfyUI: {machines:?}");

    // Served by the standby from the shared log: the job's whole stream, as the leader streams it.
    let request = pb::StreamJobRequest { job_id: job.id.clone(), ..Default::default() }.encode_to_vec();
    let resp = web_call("comfyrelay.v1.JobService/StreamJob", request).await.expect("grpc-web");
    assert_eq!(resp.status(), 200);
    let (messages, trailers) = grpc_web_frames(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let streamed: Vec<pb::JobEvent> =
        messages.iter().map(|m| pb::JobEvent::decode(m.as_slice()).expect("a JobEvent")).collect();
    assert_eq!(streamed, from_leader);
}

/// Submits an `invert` job of `image` through `channel`, follows it to its end there and returns its id
/// and first output.
async fn run_to_output(channel: &Channel, image: Vec<u8>) -> (String, pb::Output) {
    let mut jobs = pb::job_service_client::JobServiceClient::new(channel.clone());
    let job = jobs.submit_job(submit_request("invert", image)).await.expect("submit").into_inner();
    let events = collect_events(channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    let got = jobs.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.expect("get_job");
    (job.id, got.into_inner().outputs.into_iter().next().expect("an output"))
}

/// Downloads output `filename` of `job_id` through `channel`.
async fn download(channel: &Channel, job_id: &str, filename: &str) -> Vec<u8> {
    let mut stream = pb::job_service_client::JobServiceClient::new(channel.clone())
        .download_output(pb::DownloadOutputRequest {
            job_id: job_id.into(),
            filename: filename.into(),
            chunk_size: 1024,
            offset: 0,
        })
        .await
        .expect("download")
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        bytes.extend_from_slice(&chunk.data);
    }
    bytes
}

#[tokio::test]
async fn replicas_keep_artifacts_in_an_s3_compatible_store_and_the_next_leader_serves_them() {
    use sha2::Digest as _;
    let Some(s3) = s3_server::S3Server::start().await else { return };
    s3.create_bucket("comfyrelay").await;
    let comfy = crate::helpers::spawn_comfy().await;
    // Test values for the emulated S3 (it checks no signature); the directory is set but not used.
    let env = [
        ("COMFYRELAY_STORAGE__ARTIFACTS_URL", "s3://comfyrelay/artifacts"),
        ("COMFYRELAY_JOBS__INLINE_OUTPUT_MAX_BYTES", "0"),
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let Some(Pair { mut a, a_channel, mut b, b_addr, b_channel, url: _, artifacts: dir, pg: _pg }) =
        Pair::start("objects", &comfy, &env, &env).await
    else {
        return;
    };
    until_serving(&b_channel, "comfyrelay.v1.JobService", Duration::from_secs(10)).await;

    // Submitted through the standby, run by the leader: input and output are objects in the bucket.
    let input = png(32, 16);
    let (job, output) = run_to_output(&b_channel, input.clone()).await;
    let input_sha = hex::encode(sha2::Sha256::digest(&input));
    let keys = s3.keys("comfyrelay").await;
    let key_of = |sha: &str| format!("artifacts/{}/{sha}", &sha[..2]);
    assert!(keys.contains(&key_of(&input_sha)), "the input is in the bucket: {keys:?}");
    assert!(keys.contains(&key_of(&output.sha256)), "the output is in the bucket: {keys:?}");
    assert!(
        std::fs::read_dir(dir.path()).map_or(true, |mut d| d.next().is_none()),
        "nothing written to the directory"
    );
    let stored = download(&a_channel, &job, &output.filename).await;
    assert_eq!(stored.len() as u64, output.size_bytes);
    assert_eq!(hex::encode(sha2::Sha256::digest(&stored)), output.sha256, "read back as its digest says");

    // An output past 4 MiB goes up as a multipart upload (noise does not compress).
    let noise = image::RgbImage::from_fn(1400, 1200, |x, y| {
        let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        image::Rgb([(h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8])
    });
    let mut big = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut big, image::ImageFormat::Png).expect("encode png");
    let (job2, large) = run_to_output(&a_channel, big.into_inner()).await;
    assert!(large.size_bytes > 4 << 20, "an output past the spill size: {} bytes", large.size_bytes);
    assert!(s3.keys("comfyrelay").await.contains(&key_of(&large.sha256)));
    let large_bytes = download(&b_channel, &job2, &large.filename).await;
    assert_eq!(hex::encode(sha2::Sha256::digest(&large_bytes)), large.sha256);

    // The leader dies: the next one serves the same output from the bucket.
    a.child.start_kill().expect("SIGKILL the leader");
    a.child.wait().await.expect("the leader exits");
    b.wait_for("serving gRPC").await;
    let b_channel = channel(b_addr).await;
    assert_eq!(download(&b_channel, &job, &output.filename).await, stored);
}

#[tokio::test]
async fn a_standbys_job_service_health_follows_its_leaders_through_every_change() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut comfy = crate::helpers::spawn_comfy().await;
    // A long grace: a drain held open (by a watch of the standby's, say) would show as a late exit.
    let grace = [("COMFYRELAY_GRPC__SHUTDOWN_GRACE", "120s")];
    let Some(mut pair) = Pair::start("health", &comfy, &grace, &[]).await else { return };
    let mut watch = crate::helpers::HealthWatch::start(&pair.b_channel, "comfyrelay.v1.JobService").await;
    let mut next = async || watch.next().await;
    // SERVING once the leader is, whose socket to ComfyUI opens (bounded by `next`).
    while next().await != ServingStatus::Serving {}

    // The leader's only ComfyUI stops: no backend can take a job, on the leader nor through the standby.
    let addr = comfy.addr();
    comfy.shutdown().await;
    assert_eq!(next().await, ServingStatus::NotServing);
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind the emulator's port");
    comfy = ComfyEmulator::start(listener, Default::default()).await.expect("restart the emulator");
    assert_eq!(next().await, ServingStatus::Serving);

    // The leader drains (SIGTERM): it says NOT_SERVING first, and so does the standby, before it leads.
    let pid = pair.a.child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(sent.success(), "kill -TERM {pid}");
    assert_eq!(next().await, ServingStatus::NotServing);
    // Nothing of the standby's holds the leader's drain open: it ends well within its grace.
    let status = tokio::time::timeout(Duration::from_secs(30), pair.a.child.wait())
        .await
        .expect("the leader's drain is not held open: it exits within 30 s of a 120 s grace")
        .expect("wait");
    assert!(status.success(), "a drained leader exits 0: {status:?}");
    drop(comfy);
}
