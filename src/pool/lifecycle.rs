//! A machine's life: launch, bring-up (Ready, ComfyUI health), stop, lease renewals, health checks.

use std::collections::HashSet;

use backon::{BackoffBuilder as _, ExponentialBuilder};

use super::*;
use crate::telemetry::ErrorChain;

impl Pool {
    pub(super) fn spawn_launch(&self, spec: MachineSpec) {
        let pool = self.clone();
        let span = tracing::info_span!("launch", workflow_version_id = %spec.workflow_version_id, server_type = %spec.server_type);
        self.inner.tracker.spawn(async move { pool.launch(spec).await }.instrument(span));
    }

    pub(super) async fn launch(&self, spec: MachineSpec) {
        let started = Instant::now();
        self.send(PoolEvent::Provisioning {
            spec: spec.clone(),
            machine_id: String::new(),
            phase: ProvisionPhase::LaunchRequested,
            elapsed: Duration::ZERO,
        });
        let lease = self.inner.config.lease;
        // The account's servers before the launch: only a server not among them can be its machine.
        let listed = tokio::select! {
            r = self.inner.client.list_servers() => r,
            () = self.inner.shutdown.cancelled() => return self.launch_done(&spec),
        };
        let before: HashSet<String> = match listed {
            Ok(servers) => servers.into_iter().map(|s| s.server_id).collect(),
            Err(e) => {
                self.launch_done(&spec);
                if !self.api_failed("listing the account's servers before a launch", &e) {
                    let reason =
                        format!("cannot list the account's servers before launching: {}", ErrorChain(&e));
                    self.launch_failed(&spec, reason, false);
                }
                return;
            }
        };
        let record_id = format!("launch-{}", uuid::Uuid::new_v4().simple());
        let mut known_before: Vec<String> = before.iter().cloned().collect();
        known_before.sort();
        let record = LaunchRecord {
            workflow_version_id: spec.workflow_version_id.clone(),
            server_type: spec.server_type.clone(),
            duration_secs: lease.as_secs(),
            requested_ms: now_ms(),
            known_before,
        };
        // Written before the call. If comfyrelay dies before it learns the server id, the next start cannot
        // tell its machine from another client's launch of the same type, so it claims none; the record
        // only explains the servers that may be it (their lease stops them if they are).
        let row = MachineRow {
            id: record_id.clone(),
            kind: KIND_LAUNCH.into(),
            state: "launching".into(),
            created_ms: record.requested_ms,
            updated_ms: record.requested_ms,
            body: serde_json::to_string(&record).unwrap_or_default(),
        };
        if let Err(e) = self.put_row(&row).await {
            error!(error = %ErrorChain(&e), "cannot record a launch before sending it; not launching");
            self.launch_done(&spec);
            self.launch_failed(&spec, format!("cannot record the launch: {e}"), false);
            return;
        }
        if self.inner.shutdown.is_cancelled() {
            // Shutdown began meanwhile: a machine launched now would only be deleted again.
            self.forget_launch(&record_id).await;
            return self.launch_done(&spec);
        }
        let request = LaunchRequest {
            workflow_version_id: spec.workflow_version_id.clone(),
            server_type: ServerType::parse(&spec.server_type),
            estimated_duration: lease,
        };
        // Not cut by shutdown: once sent, the answer names a machine that must be stopped (see `close`,
        // which waits for it within the shutdown deadline). Shutdown only stops further attempts.
        let result = self.inner.client.launch_from(&request, before, &self.inner.shutdown).await;
        let server = match result {
            Err(e) => {
                self.launch_done(&spec);
                if !e.is_ambiguous() {
                    self.forget_launch(&record_id).await;
                }
                // A 401/403 fails the waiting jobs through the misconfiguration; otherwise a refusal the
                // API was certain of (a 4xx, or 5xx answers after which the list showed no machine) fails
                // them at once, and an uncertain failure counts towards max_launch_failures.
                if !self.api_failed("launching a machine", &e) {
                    let certain = !e.is_ambiguous() && !e.is_retryable();
                    self.launch_failed(&spec, format!("launch failed: {}", ErrorChain(&e)), certain);
                }
                return;
            }
            Ok(server) => server,
        };
        self.api_ok();
        let id = server.server_id.clone();
        let closing = {
            let mut st = self.state();
            if let Some(n) = st.launching.get_mut(&spec) {
                *n = n.saturating_sub(1);
            }
            st.counters.launched += 1;
            crate::metrics::machine_launched(&spec);
            let mut entry = self.new_entry(&id, spec.clone(), MachinePhase::Starting, started);
            entry.busy = true;
            entry.seen_at = Some(Instant::now());
            st.unmanaged.remove(&id);
            st.machines.insert(id.clone(), entry);
            // Under the same lock `close` takes to list what it stops: either it listed this machine, or
            // this task sees `closing` and stops it.
            st.closing
        };
        self.persist(&id).await;
        self.forget_launch(&record_id).await;
        if closing {
            if self.inner.config.stop_on_shutdown {
                info!(machine = %id, "RunComfy machine launched during shutdown; stopping it");
                self.stop(id, "comfyrelay is shutting down".into()).await;
            } else {
                // Recorded: the next start adopts it, or its lease stops it.
                self.release(&id);
            }
            return;
        }
        info!(machine = %id, "RunComfy machine launched; waiting for Ready");
        self.announce(&spec, &id, ProvisionPhase::Starting, started);
        self.bring_up(id, spec, started).await;
    }

    pub(super) fn launch_done(&self, spec: &MachineSpec) {
        let mut st = self.state();
        if let Some(n) = st.launching.get_mut(spec) {
            *n = n.saturating_sub(1);
        }
    }

    pub(super) fn new_entry(
        &self,
        id: &str,
        spec: MachineSpec,
        phase: MachinePhase,
        launched_at: Instant,
    ) -> Entry {
        let now = Instant::now();
        Entry {
            id: id.to_string(),
            price: self.price(&spec.server_type),
            spec,
            phase,
            launched_ms: now_ms() - now.saturating_duration_since(launched_at).as_millis() as i64,
            launched_at,
            ready_ms: None,
            ready_at: None,
            stopped_ms: None,
            stopped_at: None,
            lease_until: None,
            url: None,
            reason: String::new(),
            machine: None,
            busy: false,
            next_health: now + self.inner.config.health_interval,
            next_renew: now,
            health_checks: 0,
            unreachable_since: None,
            seen_at: None,
        }
    }

    /// Starting → Ready at the provider → ComfyUI answers → jobs. On failure the machine is stopped.
    pub(super) async fn bring_up(&self, id: String, spec: MachineSpec, started: Instant) {
        let policy = self.policy(&spec);
        let left = policy.ready_timeout.saturating_sub(started.elapsed());
        let waited = tokio::select! {
            r = self.inner.client.wait_ready(&id, left) => r,
            () = self.inner.shutdown.cancelled() => return self.release(&id),
        };
        let server = match waited {
            Ok(server) => server,
            Err(e) => {
                let reason = format!("did not become ready: {}", ErrorChain(&e));
                if !self.api_failed("waiting for a machine to be ready", &e) {
                    self.launch_failed(&spec, format!("machine {id} {reason}"), false);
                }
                self.mark_for_stop(&id, MachinePhase::Unhealthy, reason);
                return;
            }
        };
        let Some(url) = server.main_service_url.clone() else { return self.release(&id) };
        {
            let now = Instant::now();
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            if e.phase == MachinePhase::Starting {
                e.phase = MachinePhase::Checking;
            }
            e.ready_at = Some(now);
            e.ready_ms = Some(now_ms());
            e.seen_at = Some(now);
            e.url = Some(url.clone());
            e.lease_until = Some(lease_end(&server, now, self.inner.client.options().ready_poll_interval));
        }
        self.persist(&id).await;
        self.announce(&spec, &id, ProvisionPhase::Ready, started);
        let machine = match self.connect(&id, &url, &spec) {
            Ok(m) => m,
            Err(e) => {
                self.launch_failed(&spec, format!("machine {id}: bad ComfyUI URL: {e}"), false);
                self.mark_for_stop(&id, MachinePhase::Unhealthy, "its ComfyUI URL is invalid".into());
                return;
            }
        };
        let healthy = tokio::select! {
            ok = self.wait_comfyui(&machine, self.inner.config.health_timeout) => ok,
            () = self.inner.shutdown.cancelled() => return self.release(&id),
        };
        if !healthy {
            machine.retire("its ComfyUI never answered");
            let timeout = humantime::format_duration(self.inner.config.health_timeout);
            self.launch_failed(
                &spec,
                format!("machine {id}: ComfyUI did not answer within {timeout}"),
                false,
            );
            self.mark_for_stop(&id, MachinePhase::Unhealthy, "its ComfyUI never answered".into());
            return;
        }
        let announce = {
            let now = Instant::now();
            let mut st = self.state();
            st.failures.remove(&spec);
            match st.machines.get_mut(&id) {
                Some(e) => {
                    e.machine = Some(machine.clone());
                    e.busy = false;
                    e.next_health = now + self.inner.config.health_interval;
                    if e.phase == MachinePhase::Checking {
                        e.phase = MachinePhase::Ready;
                        true
                    } else {
                        // Drained while starting: it gets no jobs and the planner stops it.
                        machine.drain();
                        false
                    }
                }
                None => false,
            }
        };
        self.persist(&id).await;
        if announce {
            info!(machine = %id, after = ?started.elapsed(), "RunComfy machine ready for jobs");
            self.announce(&spec, &id, ProvisionPhase::ComfyuiReachable, started);
            self.send(PoolEvent::Ready(machine));
        }
        self.inner.wake.notify_one();
    }

    pub(super) fn connect(
        &self,
        id: &str,
        url: &str,
        spec: &MachineSpec,
    ) -> Result<Arc<Machine>, comfy::ComfyError> {
        Machine::connect_runcomfy(
            id,
            url,
            spec.clone(),
            self.price(&spec.server_type),
            self.inner.comfy.clone(),
            Some(stable_client_id(&self.inner.instance, id)),
            self.inner.prequeue,
            self.inner.shutdown.child_token(),
        )
    }

    /// Whether the machine's ComfyUI answers `/system_stats` and accepts the WebSocket within `timeout`.
    pub(super) async fn wait_comfyui(&self, machine: &Machine, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pauses = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if comfyui_answers(machine, left.min(PROBE_TIMEOUT)).await {
                let left = deadline.saturating_duration_since(Instant::now());
                return machine.conn.wait_connected(left).await.is_ok();
            }
            tokio::time::sleep(pauses.next().unwrap_or(left).min(left)).await;
        }
    }

    /// A launch (or bring-up) failed: back off, and tell the engine whether waiting jobs should fail: at
    /// once when the failure is `certain` (the API refused the launch and no machine exists, so waiting
    /// cannot help them), else after `max_launch_failures` failures in a row.
    pub(super) fn launch_failed(&self, spec: &MachineSpec, reason: String, certain: bool) {
        let gave_up = {
            let mut st = self.state();
            st.counters.launch_failures += 1;
            crate::metrics::machine_launch_failed(spec);
            let f = st.failures.entry(spec.clone()).or_default();
            f.consecutive += 1;
            let backoff = self.inner.config.launch_retry_backoff * 2u32.saturating_pow(f.consecutive - 1);
            f.retry_at = Some(Instant::now() + backoff.min(Duration::from_secs(300)));
            let since = f.last.as_ref().map_or_else(now_ms, |(_, since)| *since);
            f.last = Some((truncate(&reason, 300), since));
            let spent = f.consecutive >= self.inner.config.max_launch_failures;
            if spent {
                f.consecutive = 0;
            }
            certain || spent
        };
        warn!(?spec, %reason, gave_up, certain, "provisioning failed");
        self.send(PoolEvent::ProvisioningFailed { spec: spec.clone(), reason, gave_up });
        self.inner.wake.notify_one();
    }

    /// Clears the busy flag of a machine whose task ended without a verdict (shutdown).
    pub(super) fn release(&self, id: &str) {
        if let Some(e) = self.state().machines.get_mut(id) {
            e.busy = false;
        }
    }

    /// Hands the machine to the planner for stopping (it spawns the DELETE on its next round).
    pub(super) fn mark_for_stop(&self, id: &str, phase: MachinePhase, reason: String) {
        let machine = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(id) else { return };
            if matches!(e.phase, MachinePhase::Stopping | MachinePhase::Stopped) {
                return;
            }
            e.phase = phase;
            e.reason = reason.clone();
            e.busy = false;
            e.machine.clone()
        };
        if let Some(m) = machine {
            m.retire(&reason);
        }
        self.inner.wake.notify_one();
    }

    pub(super) fn spawn_stop(&self, id: String, reason: String) {
        let pool = self.clone();
        let span = tracing::info_span!("stop", machine = %id);
        self.inner.tracker.spawn(async move { pool.stop(id, reason).await }.instrument(span));
    }

    /// DELETEs the machine until the API confirms it. Not cut by shutdown (a stop must finish); bounded by
    /// the caller of [`Pool::close`].
    pub(super) async fn stop(&self, id: String, reason: String) {
        let (machine, was_ready) = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            if e.phase == MachinePhase::Stopped {
                return;
            }
            let was_ready = e.machine.is_some();
            e.phase = MachinePhase::Stopping;
            e.busy = true;
            if e.reason.is_empty() {
                e.reason = reason.clone();
            }
            (e.machine.clone(), was_ready)
        };
        if let Some(m) = &machine {
            m.retire(&reason);
        }
        if was_ready {
            self.send(PoolEvent::Removed { machine_id: id.clone(), reason: reason.clone() });
        }
        // Written ahead of the DELETE, which a deposed leader (its write fenced) must not send: the machine
        // is the next leader's now.
        if !self.persist(&id).await {
            return;
        }
        info!(machine = %id, %reason, "stopping RunComfy machine");
        // The client already retried transient failures; these pauses are between its attempts.
        let mut pauses = ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(2))
            .with_max_delay(STOP_RETRY)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        let already_gone = loop {
            match self.inner.client.delete_server(&id).await {
                Ok(outcome) => {
                    // Not the whole answer: it carries the machine's URL, which is its only credential.
                    let status = match &outcome {
                        DeleteOutcome::Deleting(server) => server.current_status.to_string(),
                        DeleteOutcome::Accepted => "accepted".into(),
                        DeleteOutcome::AlreadyGone => "already gone".into(),
                    };
                    debug!(%status, "DELETE confirmed");
                    break matches!(outcome, DeleteOutcome::AlreadyGone);
                }
                Err(e) => {
                    attempt += 1;
                    self.api_failed("deleting a machine", &e);
                    error!(error = %ErrorChain(&e), attempt, "DELETE failed; the machine is still billed; retrying");
                    tokio::time::sleep(pauses.next().unwrap_or(STOP_RETRY)).await;
                }
            }
        };
        let now = Instant::now();
        let billed = {
            let mut st = self.state();
            st.counters.stopped += 1;
            let Some(e) = st.machines.get_mut(&id) else { return };
            // Gone before the DELETE: the provider stopped billing it by itself, at the latest when its API
            // last reported it running.
            let end = match (already_gone, e.seen_at) {
                (true, Some(seen)) => e.ready_at.map_or(seen, |r| seen.max(r)).min(now),
                _ => now,
            };
            e.phase = MachinePhase::Stopped;
            e.stopped_at = Some(end);
            e.stopped_ms = Some(now_ms() - now.saturating_duration_since(end).as_millis() as i64);
            e.busy = false;
            e.billed(end)
        };
        self.persist(&id).await;
        self.prune_stopped();
        info!(machine = %id, billed_s = billed.as_secs(), "RunComfy machine stopped");
        if let Some(m) = machine {
            m.conn.shutdown().await;
        }
        self.inner.wake.notify_one();
    }

    pub(super) fn prune_stopped(&self) {
        let mut st = self.state();
        let stopped: Vec<(i64, String)> = st
            .machines
            .values()
            .filter(|e| e.phase == MachinePhase::Stopped)
            .map(|e| (e.stopped_ms.unwrap_or_default(), e.id.clone()))
            .collect();
        if stopped.len() > KEEP_STOPPED {
            let mut stopped = stopped;
            stopped.sort();
            for (_, id) in stopped.iter().take(stopped.len() - KEEP_STOPPED) {
                st.machines.remove(id);
            }
        }
    }

    pub(super) fn spawn_renew(&self, id: String) {
        let pool = self.clone();
        let span = tracing::debug_span!("renew", machine = %id);
        self.inner.tracker.spawn(async move { pool.renew(id).await }.instrument(span));
    }

    /// Extends the lease: the total duration becomes (time since Ready) + lease.
    pub(super) async fn renew(&self, id: String) {
        let lease = self.inner.config.lease;
        let Some(ready_at) = self.state().machines.get(&id).and_then(|e| e.ready_at) else {
            return self.release(&id);
        };
        let total = Instant::now().saturating_duration_since(ready_at) + lease;
        let total = Duration::from_secs(total.as_secs_f64().ceil() as u64);
        let result = tokio::select! {
            r = self.inner.client.update_estimated_duration(&id, total) => r,
            () = self.inner.shutdown.cancelled() => return self.release(&id),
        };
        match result {
            Ok(_) => {
                self.api_ok();
                {
                    let mut st = self.state();
                    st.counters.renewals += 1;
                    if let Some(e) = st.machines.get_mut(&id) {
                        e.seen_at = Some(Instant::now());
                        // Ready was seen up to one status poll late: count the lease from a poll earlier.
                        let slack = self.inner.client.options().ready_poll_interval;
                        e.lease_until =
                            Some((ready_at + total).checked_sub(slack).unwrap_or_else(Instant::now));
                        e.busy = false;
                    }
                }
                debug!(total_s = total.as_secs(), "lease extended");
                self.persist(&id).await;
            }
            Err(RunComfyError::NotFound { .. }) => {
                self.gone(&id, "the provider no longer knows it".into());
            }
            Err(e) => {
                self.api_failed("extending a machine's lease", &e);
                warn!(error = %ErrorChain(&e), "cannot extend the lease; retrying");
                if let Some(e) = self.state().machines.get_mut(&id) {
                    e.busy = false;
                    e.next_renew = Instant::now() + RENEW_RETRY;
                }
            }
        }
    }

    pub(super) fn spawn_health(&self, id: String) {
        let pool = self.clone();
        let span = tracing::debug_span!("health", machine = %id);
        self.inner.tracker.spawn(async move { pool.health(id).await }.instrument(span));
    }

    /// Probes the machine's ComfyUI (every time) and its provider status (every [`STATUS_EVERY`] times).
    pub(super) async fn health(&self, id: String) {
        let (machine, check_status) = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            e.health_checks += 1;
            (e.machine.clone(), e.health_checks % STATUS_EVERY == 0)
        };
        let Some(machine) = machine else { return self.release(&id) };
        if check_status {
            let status = tokio::select! {
                r = self.inner.client.get_server(&id) => r,
                () = self.inner.shutdown.cancelled() => return self.release(&id),
            };
            match status {
                Ok(s) if s.current_status.is_terminal() => {
                    return self.gone(&id, format!("the provider reports it {}", s.current_status));
                }
                Err(RunComfyError::NotFound { .. }) => {
                    return self.gone(&id, "the provider no longer knows it".into());
                }
                Ok(_) => {
                    self.api_ok();
                    if let Some(e) = self.state().machines.get_mut(&id) {
                        e.seen_at = Some(Instant::now());
                    }
                }
                Err(e) => {
                    self.api_failed("checking a machine's status", &e);
                    debug!(error = %ErrorChain(&e), "status check failed; not counted against the machine")
                }
            }
        }
        let answered = comfyui_answers(&machine, PROBE_TIMEOUT).await;
        let now = Instant::now();
        let unhealthy = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            e.busy = false;
            e.next_health = now + self.inner.config.health_interval;
            if answered {
                e.unreachable_since = None;
                None
            } else {
                let since = *e.unreachable_since.get_or_insert(now);
                let down = now.saturating_duration_since(since);
                warn!(machine = %id, down = ?down, "ComfyUI health check failed");
                (down >= self.inner.config.unhealthy_after
                    && matches!(e.phase, MachinePhase::Ready | MachinePhase::Draining))
                .then(|| format!("its ComfyUI did not answer for {}", humantime::format_duration(down)))
            }
        };
        if let Some(reason) = unhealthy {
            self.state().counters.unhealthy += 1;
            error!(machine = %id, %reason, "machine unhealthy; replacing it");
            self.mark_for_stop(&id, MachinePhase::Unhealthy, reason);
        }
    }

    /// The provider stopped the machine by itself (lease ran out, failure): retire it and confirm.
    pub(super) fn gone(&self, id: &str, reason: String) {
        warn!(machine = %id, %reason, "RunComfy machine gone");
        self.state().counters.unhealthy += 1;
        self.mark_for_stop(id, MachinePhase::Unhealthy, reason);
    }
}
