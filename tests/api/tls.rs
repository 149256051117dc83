//! The transport of issue 11, through real clients: TLS with certificates made here (rcgen), a plaintext
//! client refused, mTLS (no certificate or a foreign one refused; the subject reaches every call's span), a
//! certificate replaced on disk served to the next connection (a broken one keeps the old), and the
//! Host/Origin checks of gRPC-Web (a rebound DNS name refused).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tracing_subscriber::layer::SubscriberExt as _;

use crate::helpers::{collect_events, png, spawn_app_tls, spawn_app_with, submit_request, terminal};

/// A test certificate authority.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub(crate) struct Leaf {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        Self { issuer }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub(crate) fn server(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose subject CN is `cn`.
    pub(crate) fn client(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://test/{cn}").try_into().expect("uri"))];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// Writes `contents` to `path` as a new file renamed into place (what a certificate manager does), so
/// the server never reads half a file.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The server's TLS files in a directory of their own.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    fn new(leaf: &Leaf) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Self {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("client-ca.crt"),
            _dir: dir,
        };
        files.install(leaf);
        files
    }

    fn install(&self, leaf: &Leaf) {
        replace(&self.key, &leaf.key);
        replace(&self.cert, &leaf.cert);
    }

    fn configure(&self, config: &mut comfyrelay::Config) {
        config.grpc.tls.cert_file = Some(self.cert.clone());
        config.grpc.tls.key_file = Some(self.key.clone());
        config.grpc.tls.reload_interval = Duration::from_millis(20);
    }
}

/// A client TLS configuration trusting `ca`, naming the server `localhost`, with `identity` if given.
fn client_tls(ca: &Ca, identity: Option<&Leaf>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())).domain_name("localhost");
    match identity {
        Some(leaf) => tls.identity(Identity::from_pem(&leaf.cert, &leaf.key)),
        None => tls,
    }
}

/// A health check over a new connection to `addr` with `tls` (plaintext when `None`); any failure, of the
/// connection or the call, is an `Err`.
async fn health_over_new_connection(
    addr: std::net::SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<(), String> {
    let endpoint = match tls {
        None => Channel::from_shared(format!("http://{addr}")).expect("uri"),
        Some(tls) => {
            Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls).expect("tls")
        }
    };
    let check = async {
        let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map_err(|s| format!("call: {s:?}"))
    };
    tokio::time::timeout(Duration::from_secs(10), check).await.map_err(|_| "timed out".to_string())??;
    Ok(())
}

/// Polls `cond` until it holds (bounded).
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every log event and new span of this test's thread (the server runs on it: a current-thread runtime),
/// one line each: level or `span NAME`, then the fields.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(line);
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logs {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields(event.metadata().level().to_string());
        event.record(&mut fields);
        self.push(fields.0);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields(format!("span {}", attrs.metadata().name()));
        attrs.record(&mut fields);
        self.push(fields.0);
    }
}

#[tokio::test]
async fn a_tls_client_trusting_the_ca_runs_a_job_and_a_plaintext_client_is_refused() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server());
    let app = spawn_app_tls(|c| files.configure(c), client_tls(&ca, None)).await;

    let mut jobs = app.jobs.clone();
    let job =
        jobs.submit_job(submit_request("invert", png(8, 8))).await.expect("submit over TLS").into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");

    let plaintext = health_over_new_connection(app.addr, None).await;
    assert!(plaintext.is_err(), "a plaintext client is answered: {plaintext:?}");
    let other = health_over_new_connection(app.addr, Some(client_tls(&Ca::new("another CA"), None))).await;
    assert!(other.is_err(), "a client that does not trust the certificate connects: {other:?}");
    health_over_new_connection(app.addr, Some(client_tls(&ca, None))).await.expect("a second TLS client");
}

#[tokio::test]
async fn with_mtls_a_client_needs_a_certificate_of_the_client_ca_and_its_subject_reaches_every_call() {
    let logs = Logs::default();
    let _guard = logs.install();
    let (ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = Files::new(&ca.server());
    replace(&files.client_ca, &client_ca.pem());
    let team_a = client_ca.client("team-a-ci");
    let app = spawn_app_tls(
        |c| {
            files.configure(c);
            c.grpc.tls.client_ca_file = Some(files.client_ca.clone());
        },
        client_tls(&ca, Some(&team_a)),
    )
    .await;

    let listed =
        app.workflows.clone().list_workflows(comfyrelay::proto::pb::ListWorkflowsRequest::default()).await;
    assert!(listed.is_ok(), "a client with a certificate of the client CA is refused: {listed:?}");
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health with a client certificate");
    let calls: Vec<String> = logs.lines().into_iter().filter(|l| l.starts_with("span rpc")).collect();
    assert!(calls.len() >= 2, "{calls:?}");
    assert!(
        calls.iter().all(|l| l.contains("client=\"team-a-ci\"")),
        "a call without the subject: {calls:?}"
    );
    assert!(calls.iter().any(|l| l.contains("ListWorkflows")), "{calls:?}");

    let anonymous = health_over_new_connection(app.addr, Some(client_tls(&ca, None))).await;
    assert!(anonymous.is_err(), "a client without a certificate is answered: {anonymous:?}");
    let stranger = Ca::new("a stranger's CA").client("team-a-ci");
    let foreign = health_over_new_connection(app.addr, Some(client_tls(&ca, Some(&stranger)))).await;
    assert!(foreign.is_err(), "a certificate of another CA is accepted: {foreign:?}");
    let plaintext = health_over_new_connection(app.addr, None).await;
    assert!(plaintext.is_err(), "a plaintext client is answered: {plaintext:?}");
}

#[tokio::test]
async fn a_mapped_client_certificate_acts_as_its_tenant_without_a_key_and_an_unmapped_one_needs_a_key() {
    use comfyrelay::proto::pb::{self, job_service_client::JobServiceClient};
    let (ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = Files::new(&ca.server());
    replace(&files.client_ca, &client_ca.pem());
    let (team_a, team_b) = (client_ca.client("team-a-ci"), client_ca.client("team-b-ci"));
    let app = spawn_app_tls(
        |c| {
            files.configure(c);
            c.grpc.tls.client_ca_file = Some(files.client_ca.clone());
            c.auth.mode = Some(comfyrelay::config::AuthMode::Keys);
            c.auth.client_certificates = vec![comfyrelay::config::ClientCertificate {
                subject: "team-a-ci".into(),
                tenant: "team-a".into(),
                role: "submitter".into(),
            }];
        },
        client_tls(&ca, Some(&team_a)),
    )
    .await;

    // team-a-ci is mapped: it submits and reads its job with no key at all.
    let mut a = app.jobs.clone();
    let job = a.submit_job(submit_request("invert", png(8, 8))).await.expect("a mapped certificate submits");
    let job = job.into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &job.id, 0).await), "succeeded");
    a.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.expect("its own job");

    // team-b-ci is verified but not mapped: without a key it is nobody; health still answers.
    let b_channel = Channel::from_shared(format!("https://{}", app.addr))
        .expect("uri")
        .tls_config(client_tls(&ca, Some(&team_b)))
        .expect("tls")
        .connect()
        .await
        .expect("connect with team-b-ci");
    let refused = JobServiceClient::new(b_channel.clone())
        .submit_job(submit_request("invert", png(8, 8)))
        .await
        .expect_err("an unmapped certificate without a key submits");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    HealthClient::new(b_channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health needs no key");

    // With team-b's key it is team-b, which cannot see team-a's job.
    let key = app.create_key("team-b", comfyrelay::auth::Role::Submitter, false).await;
    let bearer = crate::helpers::Bearer(Some(format!("Bearer {key}").parse().expect("ascii")));
    let mut b =
        JobServiceClient::new(tonic::service::interceptor::InterceptedService::new(b_channel, bearer));
    let hidden = b.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.expect_err("team-a's job");
    assert_eq!(hidden.code(), tonic::Code::NotFound, "{hidden:?}");
    let listed = b.list_jobs(pb::ListJobsRequest::default()).await.expect("list").into_inner();
    assert!(listed.jobs.iter().all(|j| j.id != job.id), "team-b lists team-a's job: {listed:?}");
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_to_the_next_connection_and_a_broken_one_keeps_the_old() {
    let logs = Logs::default();
    let _guard = logs.install();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let old = old_ca.server();
    let files = Files::new(&old);
    let app = spawn_app_tls(|c| files.configure(c), client_tls(&old_ca, None)).await;
    health_over_new_connection(app.addr, Some(client_tls(&old_ca, None)))
        .await
        .expect("the first certificate");

    // A broken file: logged, and the previous certificate stays.
    replace(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    eventually("the broken certificate file is reported", async || {
        logs.lines().iter().any(|l| l.starts_with("WARN") && l.contains("grpc.tls.cert_file"))
    })
    .await;
    health_over_new_connection(app.addr, Some(client_tls(&old_ca, None)))
        .await
        .expect("the previous certificate is kept while the file is broken");

    let new = new_ca.server();
    files.install(&new);
    eventually("a client trusting only the new CA connects", async || {
        health_over_new_connection(app.addr, Some(client_tls(&new_ca, None))).await.is_ok()
    })
    .await;
    let stale = health_over_new_connection(app.addr, Some(client_tls(&old_ca, None))).await;
    assert!(stale.is_err(), "the old certificate is still served: {stale:?}");
    // The connection opened before the change still works.
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("an open connection keeps its session");

    // No key material in any log line.
    for key in [&old.key, &new.key] {
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let needle = &body[..40];
        assert!(logs.lines().iter().all(|l| !l.contains(needle)), "a private key was logged");
    }
}

/// A gRPC-Web unary call (HTTP/1.1) of `grpc.health.v1.Health/Check` to `host` (resolved to `addr`, as a
/// rebound DNS name would be), with `origin` if given: the HTTP status and the body.
async fn grpc_web_health(addr: std::net::SocketAddr, host: &str, origin: Option<&str>) -> (u16, Vec<u8>) {
    let client = reqwest::Client::builder().http1_only().resolve(host, addr).build().expect("client");
    let mut req = client
        .post(format!("http://{host}:{}/grpc.health.v1.Health/Check", addr.port()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(vec![0u8, 0, 0, 0, 0]); // one uncompressed frame: an empty HealthCheckRequest
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    let response = req.send().await.expect("HTTP/1.1 POST");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("body").to_vec())
}

fn answered(status: u16, body: &[u8]) -> bool {
    status == 200 && String::from_utf8_lossy(body).contains("grpc-status:0")
}

#[tokio::test]
async fn grpc_web_from_a_foreign_host_or_origin_is_refused_and_native_grpc_is_not_affected() {
    let app = spawn_app_with(|c| {
        c.grpc.allowed_hosts.push("relay.example".into());
        c.grpc.cors_origins = vec!["https://console.example".into()];
    })
    .await;
    let port = app.addr.port();

    let (status, body) = grpc_web_health(app.addr, "localhost", None).await;
    assert!(answered(status, &body), "{status} {}", String::from_utf8_lossy(&body));
    let (status, body) = grpc_web_health(app.addr, "relay.example", Some("https://console.example")).await;
    assert!(answered(status, &body), "{status} {}", String::from_utf8_lossy(&body));
    let same_origin = format!("http://localhost:{port}");
    let (status, body) = grpc_web_health(app.addr, "localhost", Some(&same_origin)).await;
    assert!(answered(status, &body), "same origin: {status} {}", String::from_utf8_lossy(&body));

    // DNS rebinding: a foreign name pointed at this server.
    let (status, body) = grpc_web_health(app.addr, "rebound.example", None).await;
    assert_eq!(status, 421, "{}", String::from_utf8_lossy(&body));
    assert!(!String::from_utf8_lossy(&body).contains("rebound"), "the refusal echoes the Host");
    let (status, _) =
        grpc_web_health(app.addr, "rebound.example", Some(&format!("http://rebound.example:{port}"))).await;
    assert_eq!(status, 421);
    // An allowed Host with a foreign page's Origin.
    let (status, body) = grpc_web_health(app.addr, "localhost", Some("https://evil.example")).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));

    // Native gRPC with a foreign authority and an Origin header is served.
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .expect("uri")
        .origin(format!("http://rebound.example:{port}").parse().expect("origin"))
        .connect()
        .await
        .expect("connect");
    let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
    req.metadata_mut().insert("origin", "https://evil.example".parse().expect("metadata"));
    HealthClient::new(channel).check(req).await.expect("native gRPC is not checked");
}

#[tokio::test]
async fn serve_does_not_start_with_tls_files_that_do_not_load_and_says_which() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server());
    for (broken, setting) in [(&files.key, "grpc.tls.key_file"), (&files.cert, "grpc.tls.cert_file")] {
        replace(broken, "not PEM\n");
        let mut config = crate::helpers::test_config(data_dir.path());
        files.configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let run = comfyrelay::run(listener, config, tokio_util::sync::CancellationToken::new());
        let e = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("run returns at once")
            .expect_err("starts with a broken TLS file");
        let text = format!("{e:#}");
        assert!(text.contains(setting), "{text}");
        files.install(&ca.server());
    }
}

/// Opens a connection that starts a TLS handshake (a record header announcing 512 bytes, then 30 of them)
/// and stalls: past the HTTP/2 preface's 24 bytes, so only the TLS handshake timeout can close it.
async fn stalled_handshake(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    hello.extend([0u8; 30]);
    stream.write_all(&hello).await.expect("write");
    stream
}

#[tokio::test]
async fn a_stalled_tls_handshake_holds_only_its_own_connection_and_is_closed_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt as _;
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server());

    // Handshakes run side by side: a stalled one does not keep the next client waiting.
    let patient = spawn_app_tls(
        |c| {
            files.configure(c);
            c.grpc.handshake_timeout = Duration::from_secs(120);
        },
        client_tls(&ca, None),
    )
    .await;
    let _stalled = stalled_handshake(patient.addr).await;
    health_over_new_connection(patient.addr, Some(client_tls(&ca, None)))
        .await
        .expect("a TLS client while another handshake stalls");

    // And the stalled one is closed once grpc.handshake_timeout has passed.
    let strict = spawn_app_tls(
        |c| {
            files.configure(c);
            c.grpc.handshake_timeout = Duration::from_millis(300);
        },
        client_tls(&ca, None),
    )
    .await;
    let mut stalled = stalled_handshake(strict.addr).await;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // an alert, then the close
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled TLS handshake stays open past grpc.handshake_timeout");
}
