//! `grpc.health.v1.Health` as the leader serves it: tonic-health's service, whose `Watch` streams end once
//! the drain has begun and they have carried its `NOT_SERVING`.
//!
//! A graceful stop waits for every open call, and a `Watch` never ends by itself: a client that health-
//! checks by watching (gRPC's client-side health checking, a standby's mirror) would hold the drain open
//! until `grpc.shutdown_grace`, and with replicas hold the lease, and the takeover, that long. `Check`
//! answers as before, `NOT_SERVING` through the drain.

use std::pin::Pin;

use futures::{FutureExt as _, Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health},
    server::{HealthReporter, HealthService},
};

/// The health service; `drained` is cancelled after the drain's statuses were set.
pub(crate) struct DrainingHealth {
    inner: HealthService,
    drained: CancellationToken,
}

impl DrainingHealth {
    pub(crate) fn new(reporter: HealthReporter, drained: CancellationToken) -> Self {
        Self { inner: HealthService::from_health_reporter(reporter), drained }
    }
}

impl std::fmt::Debug for DrainingHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainingHealth").field("drained", &self.drained.is_cancelled()).finish()
    }
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = Statuses;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let drained = self.drained.clone();
        // Each status as it comes; once drained, the one already set (the drain's) if not sent yet, then the
        // end of the stream.
        let statuses = futures::stream::unfold(Some((statuses, drained)), |state| async move {
            let (mut statuses, drained) = state?;
            tokio::select! {
                biased;
                next = statuses.next() => next.map(|status| (status, Some((statuses, drained)))),
                () = drained.cancelled() => statuses.next().now_or_never().flatten().map(|status| (status, None)),
            }
        });
        Ok(Response::new(Box::pin(statuses)))
    }
}
