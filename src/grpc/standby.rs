//! What a standby replica serves while another replica leads (README "Replicas on PostgreSQL"): health,
//! the job reads itself ([`SERVED_HERE`]: `StreamJob`, `GetJob`, `ListJobs`, `DownloadOutput`), the
//! workflows of its own catalog and server reflection ([`SERVED_WHOLE`]), and every other call forwarded
//! as it is to the leader, whose URL the leader writes into the shared database
//! (`replica_settings.leader_url`). A client may so call any replica.
//!
//! The reads come from the shared database and artifacts ([`crate::jobs::JobFollower`], through the same
//! `JobApi` as the leader's): a job as of its last commit, which is never behind what the leader has
//! answered (it answers after the commit); `StreamJob` replayed from the log, then each commit announced
//! by PostgreSQL's `NOTIFY` read from the log. So a standby's reads need no leader connection, go on while
//! no replica leads, and cost the leader nothing. The caller is authenticated here, against the keys in the
//! shared database, as the leader would (`auth` layer).
//!
//! The forwarding is transparent at the HTTP/2 level: the request's headers (`authorization` included)
//! and body go to the leader on one connection per standby, and the leader's response, trailers and
//! stream come back; the leader authenticates, validates and bounds every call as if it came directly.
//! With `grpc.tls` the standby connects to the leader over TLS and checks its certificate ([`ToLeader`]:
//! against `grpc.tls.leader_ca_file`, for `grpc.tls.leader_server_name`), so a caller's key goes only to a
//! leader that proves it holds a replica's certificate. A client certificate cannot be forwarded: with
//! mTLS (`grpc.tls.client_ca_file`) the standby presents its own replica certificate
//! (`grpc.tls.replica_cert_file`) and names the caller's verified subject in
//! [`connections::FORWARDED_CLIENT`], which the leader believes from a replica's connection only
//! (`grpc.tls.replica_subjects`); without a replica certificate it does not forward and answers
//! `UNAVAILABLE`. The standby's health follows the leader's, change by change ([`mirror_health`]): each
//! service it forwards is what the leader says it is, and `NOT_SERVING` while no leader answers; the
//! server as a whole (`""`, liveness) and `WorkflowService` are `SERVING`.
//!
//! In front of both sit the leader's connection layers that need no job engine: with `grpc.grpc_web`,
//! browsers' Host/Origin checks, the console's assets, CORS and gRPC-Web (a browser's call is translated
//! to gRPC, then served or forwarded like any other); and call tracking, so `grpc.idle_timeout` closes
//! only connections without open calls.

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Server};
use tonic_health::ServingStatus;

use super::{
    JOB_SERVICE, MACHINE_SERVICE, WORKFLOW_SERVICE, auth, browser, connections, console, cors, error_details,
    jobs, observe, status::NotForwarded, tls,
};
use crate::{
    config::{Config, TlsConfig},
    jobs::JobFollower,
    proto::pb,
    store::PgStore,
};

/// How long a standby's server waits, when the replica starts leading (or stops), for its calls to end and
/// its connections to close by themselves before it cuts the ones left.
const STANDBY_STOP: Duration = Duration::from_secs(2);
/// How often a standby pings its leader's connection, and asks for the leader's health again after its
/// watch broke.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How often a standby reads the leader's URL (one primary-key read): after a takeover, a standby that did
/// not take over forwards to the new leader within this.
const READ_LEADER_EVERY: Duration = Duration::from_millis(200);
/// The shared setting holding the leading replica's URL.
pub const LEADER_URL: &str = "leader_url";

/// What a standby serves from: the shared database.
#[derive(Debug, Clone)]
pub struct StandbyParts {
    /// The shared database (the leader's URL and health are read from it).
    pub store: Arc<PgStore>,
    /// Streams of the jobs the leader runs, from the shared log.
    pub jobs: JobFollower,
    /// Who is calling (the keys in the shared database).
    pub auth: crate::auth::Authenticator,
    /// The workflows, this replica's own (`WorkflowService` is served here, not forwarded).
    pub catalog: crate::catalog::Catalog,
}

/// Serves a standby on `listener` until `until` is cancelled (the replica leads, or shuts down): health,
/// the job reads from the shared database, and every other call forwarded to the leader (over TLS with
/// `grpc.tls`); with mTLS and no replica certificate every other call is UNAVAILABLE, which clients
/// retry. The listener stays open in between: a client's connection attempt during the switch waits in
/// its backlog, and every standby connection is closed at the switch (health watches, streams and
/// downloads included; a stream ends with `UNAVAILABLE` naming the sequence to resume after) so clients reconnect
/// to the leader's server.
///
/// # Errors
/// A transport failure while serving.
pub async fn serve_standby(
    listener: Arc<TcpListener>,
    config: &Config,
    tls: Option<tls::Tls>,
    parts: StandbyParts,
    until: CancellationToken,
) -> anyhow::Result<()> {
    let StandbyParts { store, jobs: follower, auth, catalog } = parts;
    let (mut health, health_service) = tonic_health::server::health_reporter();
    for service in FOLLOWED_HEALTH {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    health.set_service_status(WORKFLOW_SERVICE, ServingStatus::Serving).await;
    let g = &config.grpc;
    // Cancelled when the connections did not close by themselves within [`STANDBY_STOP`] of `until`.
    let cut = CancellationToken::new();
    let addr = listener.local_addr()?;
    let to_leader = ToLeader::of(&g.tls);
    if to_leader.is_none() {
        tracing::warn!(
            "standby: with client certificates (grpc.tls.client_ca_file) and no grpc.tls.replica_cert_file, \
             calls are not forwarded to the leader; callers get UNAVAILABLE here (health and the job reads are served)"
        );
    }
    let forward = to_leader.map(|how| (store, how));
    tracing::info!(%addr, forwards = forward.is_some(), "standby: serving health only until this replica leads");
    let leader = tokio::sync::watch::channel::<Option<Channel>>(None);
    // Owned by this call (aborted when it returns): follows the leader's URL and health.
    let follow = forward.map(|(store, how)| {
        let (tx, health) = (leader.0, health.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follow_leader(store, how, tx, health)))
    });
    let leader = leader.1;
    let fallback = tower::service_fn(move |req: http::Request<axum::body::Body>| {
        let channel = leader.borrow().clone();
        async move { Ok::<_, std::convert::Infallible>(forward_call(channel, req).await) }
    });
    let max = g.max_message_bytes;
    // The reads, served here from the shared database and artifacts (the rest goes to the leader).
    let here = tower::ServiceBuilder::new()
        .layer(error_details::ErrorDetailsLayer::new(max))
        .layer(auth::AuthLayer::new(auth));
    let reads = here.clone().service(
        pb::job_service_server::JobServiceServer::new(jobs::JobApi::new(
            jobs::Jobs::Follower(follower),
            until.clone(),
            config.jobs.request_limits(),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    );
    // What needs no database either: the workflows (this replica's catalog) and server reflection.
    let (reflection_v1, reflection_v1alpha) = super::reflection()?;
    let local = here.service(
        tonic::service::Routes::new(super::workflow_service(catalog, max))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha),
    );
    let mut routes = tonic::service::Routes::new(health_service).into_axum_router();
    for method in SERVED_HERE {
        routes = routes.route_service(&format!("/{JOB_SERVICE}/{method}"), reads.clone());
    }
    for service in SERVED_WHOLE {
        routes = routes.route_service(&format!("/{service}/{{*method}}"), local.clone());
    }
    let routes = routes.fallback_service(fallback);
    let max_connections =
        connections::effective_max_connections(g.max_connections, connections::open_file_limit());
    let incoming = tls::incoming(
        connections::incoming_until_cut(
            listener,
            connections::ConnectionLimits {
                max_connections,
                handshake_timeout: g.handshake_timeout,
                idle_timeout: g.idle_timeout,
            },
            Some(cut.clone()),
        ),
        tls,
        g.handshake_timeout,
        max_connections,
    );
    // The leader's layers that do not need the job engine: browsers' checks, the console's assets, CORS
    // and gRPC-Web (translated to gRPC before the route or the forwarder sees the call), the per-call span
    // and the call counter (served here or forwarded, each call is counted on the replica it reached), and
    // call tracking, without which `grpc.idle_timeout` would close connections whose calls are still open.
    let web = config.grpc.grpc_web;
    let served = Server::builder()
        .accept_http1(web)
        .http2_keepalive_interval(Some(g.keepalive_interval))
        .http2_keepalive_timeout(Some(g.keepalive_timeout))
        .max_concurrent_streams(Some(g.max_concurrent_streams))
        .trace_fn(observe::call_span)
        .layer(browser::BrowserCheckLayer::new(&g.allowed_hosts, &g.cors_origins))
        .layer(tower::util::option_layer(web.then_some(console::ConsoleLayer)))
        .layer(tower::util::option_layer(web.then(|| cors::layer(&g.cors_origins))))
        .layer(tower::util::option_layer(web.then(tonic_web::GrpcWebLayer::new)))
        .layer(super::calls_layer())
        .layer(connections::CallTrackingLayer::new(&g.tls.replica_subjects))
        .add_routes(tonic::service::Routes::from(routes))
        .serve_with_incoming_shutdown(incoming, until.clone().cancelled_owned());
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => result?,
        () = until.cancelled() => {
            // The graceful shutdown waits for the calls open on each connection, then closes it (its last
            // frames sent), so clients reconnect to the leader. `until` has ended every `StreamJob` with
            // `UNAVAILABLE` naming where to resume; the health watches, which never end by themselves, end
            // (OK) when their statuses go. Calls still open at the deadline have their connections cut.
            drop(follow);
            for service in ["", JOB_SERVICE, WORKFLOW_SERVICE, MACHINE_SERVICE] {
                health.clear_service_status(service).await;
            }
            match tokio::time::timeout(STANDBY_STOP, &mut served).await {
                Ok(result) => result?,
                Err(_) => {
                    tracing::debug!("standby: calls still open at the switch; cutting their connections");
                    cut.cancel();
                    match tokio::time::timeout(STANDBY_STOP, &mut served).await {
                        Ok(result) => result?,
                        Err(_) => tracing::warn!("standby: its server did not stop after its connections were cut"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// The services whose health a standby takes from its leader's: the ones it forwards calls of (the job
/// reads it serves itself are part of `JobService`, whose readiness is the leader's engine).
const FOLLOWED_HEALTH: [&str; 2] = [JOB_SERVICE, MACHINE_SERVICE];

/// The services a standby serves whole, needing neither the leader nor the database.
const SERVED_WHOLE: [&str; 3] =
    [WORKFLOW_SERVICE, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// The `JobService` methods a standby serves itself: the reads, from the shared database and artifacts.
const SERVED_HERE: [&str; 4] = ["StreamJob", "GetJob", "ListJobs", "DownloadOutput"];

/// How a standby connects to the leader it forwards calls to: as the leader's own clients do.
#[derive(Debug, Clone)]
enum ToLeader {
    /// In plaintext: the leader's port speaks no TLS.
    Plaintext,
    /// Over TLS, the leader's certificate checked against `grpc.tls.leader_ca_file` (the public web roots
    /// when unset) for `grpc.tls.leader_server_name` (the URL's host when unset). Without that check a
    /// caller's key could be forwarded to whoever wrote a URL into the database and answers on it.
    Tls {
        ca_file: Option<std::path::PathBuf>,
        server_name: Option<String>,
        /// With mTLS: the replica's client certificate and key (`grpc.tls.replica_cert_file`).
        identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    },
}

impl ToLeader {
    /// `None` with mTLS and no replica certificate: the leader would not let this standby in.
    fn of(tls: &TlsConfig) -> Option<Self> {
        let identity = tls.replica_cert_file.clone().zip(tls.replica_key_file.clone());
        match (&tls.cert_file, &tls.client_ca_file, identity) {
            (None, _, _) => Some(Self::Plaintext),
            (Some(_), Some(_), None) => None,
            (Some(_), _, identity) => Some(Self::Tls {
                ca_file: tls.leader_ca_file.clone(),
                server_name: tls.leader_server_name.clone(),
                identity,
            }),
        }
    }

    /// The endpoint of the leader at `url`. The CA and replica certificate files are read here, once per
    /// new leader, so replaced files are used from the next leader on.
    fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let endpoint =
            Channel::from_shared(url.to_string()).map_err(|e| format!("the URL does not parse: {e}"))?;
        let Self::Tls { ca_file, server_name, identity } = self else {
            return Ok(endpoint);
        };
        if !url.starts_with("https://") {
            return Err("with grpc.tls the leader's URL must be https://".into());
        }
        let mut tls = ClientTlsConfig::new();
        tls = match ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("grpc.tls.leader_ca_file ({}): cannot read it: {e}", path.display())
                })?;
                use rustls::pki_types::{CertificateDer, pem::PemObject as _};
                if !CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok()) {
                    return Err(format!(
                        "grpc.tls.leader_ca_file ({}): holds no PEM certificate",
                        path.display()
                    ));
                }
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        if let Some(name) = server_name {
            tls = tls.domain_name(name.clone());
        }
        if let Some((cert_file, key_file)) = identity {
            use secrecy::ExposeSecret as _;
            let read = |setting: &str, path: &std::path::Path| {
                std::fs::read(path)
                    .map_err(|e| format!("{setting} ({}): cannot read it: {e}", path.display()))
            };
            let cert = read("grpc.tls.replica_cert_file", cert_file)?;
            let key = secrecy::SecretSlice::from(read("grpc.tls.replica_key_file", key_file)?);
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key.expose_secret()));
        }
        endpoint.tls_config(tls).map_err(|e| format!("the TLS settings for the leader: {e}"))
    }
}

/// Every [`READ_LEADER_EVERY`]: reads the leader's URL (a new channel when it changed, or while the last one
/// could not be made: an unreadable CA file, say); beside it, one [`mirror_health`] task per followed
/// service copies the current leader's health into this standby's as each change comes.
async fn follow_leader(
    store: Arc<PgStore>,
    how: ToLeader,
    leader: tokio::sync::watch::Sender<Option<Channel>>,
    health: tonic_health::server::HealthReporter,
) {
    // Owned: aborted with this task.
    let _mirrors = FOLLOWED_HEALTH.map(|service| {
        let mirror = mirror_health(leader.subscribe(), service, health.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(mirror))
    });
    let mut current: Option<String> = None;
    // Why the current URL has no channel, logged once per reason.
    let mut refused: Option<String> = None;
    // Whether the last read failed: a database outage is logged once, not five times a second.
    let mut failing = false;
    loop {
        let read = store.setting(LEADER_URL).await;
        match &read {
            Err(e) if !std::mem::replace(&mut failing, true) => {
                tracing::warn!(error = %crate::telemetry::ErrorChain(e), "standby: reading the leader's URL failed; retrying");
            }
            Err(_) => {}
            Ok(_) if std::mem::take(&mut failing) => {
                tracing::info!("standby: reading the leader's URL again")
            }
            Ok(_) => {}
        }
        match read {
            Ok(url) if url != current || (url.is_some() && leader.borrow().is_none()) => {
                let channel = match url.as_deref().map(|u| (u, how.endpoint(u))) {
                    None => None,
                    Some((u, Ok(endpoint))) => {
                        tracing::info!(leader = u, "standby: forwarding calls to the leader");
                        refused = None;
                        // Pings find a leader that stopped answering (a paused process, a cut link) while
                        // the health watches on this channel are open and silent. The answer may take a
                        // few seconds on a loaded leader before the connection, and the forwarded calls on
                        // it, are given up.
                        let endpoint = endpoint
                            .connect_timeout(FOLLOW_EVERY * 2)
                            .http2_keep_alive_interval(FOLLOW_EVERY)
                            .keep_alive_timeout(FOLLOW_EVERY * 5);
                        Some(endpoint.connect_lazy())
                    }
                    Some((u, Err(why))) => {
                        if refused.as_ref() != Some(&why) {
                            tracing::warn!(url = u, "standby: cannot forward calls to the leader: {why}");
                        }
                        refused = Some(why);
                        None
                    }
                };
                current = url;
                leader.send_replace(channel);
            }
            Ok(_) | Err(_) => {}
        }
        tokio::time::sleep(READ_LEADER_EVERY).await;
    }
}

/// The one writer of this standby's health of `service`: the current leader's (a `Watch` on its channel,
/// each status as the leader sends it), `NOT_SERVING` while no leader is known or its watch is broken (the
/// leader is gone or cannot be reached; watched again every [`FOLLOW_EVERY`]). A watch is held only while
/// the leader says `SERVING`, so the change that matters (to `NOT_SERVING`: a drain, its backends gone)
/// comes at once, and a draining leader, which says `NOT_SERVING` first, is never kept waiting for it;
/// while it says `NOT_SERVING` it is asked again every [`FOLLOW_EVERY`]. Starts over on the new
/// channel when the leader changes. Exit policy: runs until aborted by [`follow_leader`], or until the
/// channel's sender is gone.
async fn mirror_health(
    mut leader: tokio::sync::watch::Receiver<Option<Channel>>,
    service: &'static str,
    health: tonic_health::server::HealthReporter,
) {
    // What this standby says now (`serve_standby` starts it NOT_SERVING): only a change is written, so a
    // watcher of the standby hears each change once.
    let last = tokio::sync::Mutex::new(ServingStatus::NotServing);
    let set = async |status: ServingStatus| {
        let mut last = last.lock().await;
        if *last != status {
            *last = status;
            health.set_service_status(service, status).await;
        }
    };
    loop {
        let channel = leader.borrow_and_update().clone();
        let mirrored = async {
            let Some(channel) = channel else {
                set(ServingStatus::NotServing).await;
                return std::future::pending::<()>().await;
            };
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            loop {
                let request = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
                if let Ok(watch) = client.watch(request).await {
                    let mut watch = watch.into_inner();
                    while let Ok(Some(answer)) = watch.message().await {
                        let serving = answer.status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
                        set(if serving { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
                        if !serving {
                            // Dropped (the call cancelled). A leader of this version ends its watches at
                            // its drain itself (`grpc::health`); one of an earlier version, during a
                            // rolling upgrade, would wait for this watch until its shutdown deadline.
                            // Asked again below.
                            break;
                        }
                    }
                }
                set(ServingStatus::NotServing).await;
                tokio::time::sleep(FOLLOW_EVERY).await;
            }
        };
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { return },
            () = mirrored => {}
        }
    }
}

/// Sends `req` to the leader as it is and returns its answer; `UNAVAILABLE` without a leader or when it
/// cannot be reached (clients retry).
async fn forward_call(
    channel: Option<Channel>,
    req: http::Request<axum::body::Body>,
) -> http::Response<axum::body::Body> {
    use tower::ServiceExt as _;
    let Some(channel) = channel else {
        return unavailable(NotForwarded::NoLeader);
    };
    let mut req = req;
    // With mTLS, the caller this standby verified (its own `CallTrackingLayer` removed any such header the
    // caller sent); the leader believes it from this replica's certificate only.
    if let Some(subject) = req.extensions().get::<tls::ClientSubject>() {
        match http::HeaderValue::from_str(&subject.0) {
            Ok(value) => {
                req.headers_mut().insert(connections::FORWARDED_CLIENT, value);
            }
            Err(_) => {
                return unavailable(NotForwarded::CallerNotForwardable);
            }
        }
    }
    match channel.oneshot(req.map(tonic::body::Body::new)).await {
        Ok(response) => response.map(axum::body::Body::new),
        Err(e) => {
            tracing::debug!(error = %crate::telemetry::ErrorChain(&e), "standby: the leader did not take a forwarded call");
            unavailable(NotForwarded::LeaderUnreachable)
        }
    }
}

/// A gRPC `UNAVAILABLE` answer, saying why the call was not forwarded.
fn unavailable(why: NotForwarded) -> http::Response<axum::body::Body> {
    let (parts, ()) = super::status::not_forwarded(why).into_http::<()>().into_parts();
    http::Response::from_parts(parts, axum::body::Body::empty())
}
