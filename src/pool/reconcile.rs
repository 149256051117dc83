//! Persistence of machine records, and reconciliation of the account's servers with them at start.

use backon::{ExponentialBuilder, Retryable as _};

use super::*;
use crate::{store::StoreError, telemetry::ErrorChain};

/// Retries of a machine-record write: the store is local, so a failure is a busy or failing disk; a few
/// quick retries ride out a busy database, and a disk that stays broken is reported.
fn store_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(5)
        .with_jitter()
}

impl Pool {
    /// Writes a machine row, retrying failures.
    ///
    /// # Errors
    /// The last store error once the retries are spent (already logged at each retry).
    pub(super) async fn put_row(&self, row: &MachineRow) -> Result<(), StoreError> {
        let store = &self.inner.store;
        (|| store.put_machine(row))
            .retry(store_backoff())
            .notify(|e, delay| {
                warn!(machine = %row.id, error = %ErrorChain(e), ?delay, "cannot write a machine record; retrying");
            })
            .await
    }

    /// Deletes a launch record, retrying failures; one that cannot be deleted is only logged (it claims
    /// nothing at the next start, see [`Pool::reconcile`]).
    pub(super) async fn forget_launch(&self, record_id: &str) {
        let store = &self.inner.store;
        let deleted = (|| store.delete_machine(record_id))
            .retry(store_backoff())
            .notify(|e, delay| {
                warn!(launch = %record_id, error = %ErrorChain(e), ?delay, "cannot delete a launch record; retrying");
            })
            .await;
        if let Err(e) = deleted {
            error!(launch = %record_id, error = %ErrorChain(&e), "cannot delete a launch record; it is ignored at the next start");
        }
    }

    pub(super) async fn persist(&self, id: &str) {
        let row = {
            let now = Instant::now();
            let st = self.state();
            let Some(e) = st.machines.get(id) else { return };
            MachineRow {
                id: e.id.clone(),
                kind: KIND_MACHINE.into(),
                state: serde_json::to_value(e.phase)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                created_ms: e.launched_ms,
                updated_ms: now_ms(),
                body: serde_json::to_string(&e.record(now)).unwrap_or_default(),
            }
        };
        if let Err(e) = self.put_row(&row).await {
            // The machine is still tracked in memory and its lease bounds the cost if we die now.
            error!(machine = %id, error = %ErrorChain(&e), "cannot record a machine's state; it stays tracked in memory, and its lease stops it if comfyrelay dies");
        }
    }

    pub(super) fn persist_later(&self, id: &str) {
        let pool = self.clone();
        let id = id.to_string();
        self.inner.tracker.spawn(async move { pool.persist(&id).await });
    }

    /// Lists the account's servers and settles each against the store. Returns the adopted machines ready
    /// for jobs.
    pub(super) async fn reconcile(&self) -> Result<Vec<Arc<Machine>>, ReconcileError> {
        let rows =
            self.inner.store.list_machines().await.map_err(|e| ReconcileError(ErrorChain(&e).to_string()))?;
        let servers =
            self.inner.client.list_servers().await.map_err(|e| ReconcileError(ErrorChain(&e).to_string()))?;
        let mut records: HashMap<String, (MachineRow, Record)> = HashMap::new();
        let mut launches: Vec<(String, LaunchRecord)> = Vec::new();
        for row in rows {
            match row.kind.as_str() {
                KIND_MACHINE => match serde_json::from_str::<Record>(&row.body) {
                    Ok(r) => {
                        records.insert(row.id.clone(), (row, r));
                    }
                    Err(e) => warn!(machine = %row.id, error = %e, "unreadable machine record"),
                },
                KIND_LAUNCH => {
                    if let Ok(r) = serde_json::from_str::<LaunchRecord>(&row.body) {
                        launches.push((row.id.clone(), r));
                    }
                }
                _ => {}
            }
        }
        // Probe the ComfyUI of every tracked Ready machine at once (each may take PROBE_TIMEOUT).
        let candidates: Vec<(String, String, MachineSpec)> = servers
            .iter()
            .filter(|s| s.current_status.is_ready())
            .filter_map(|s| {
                let (_, r) = records.get(&s.server_id)?;
                if matches!(r.phase, MachinePhase::Stopping | MachinePhase::Stopped | MachinePhase::Unhealthy)
                {
                    return None;
                }
                Some((s.server_id.clone(), s.main_service_url.clone()?, r.spec()))
            })
            .collect();
        let probes = candidates.into_iter().map(|(id, url, spec)| async move {
            match self.connect(&id, &url, &spec) {
                Ok(machine) => {
                    let ok = self.wait_comfyui(&machine, PROBE_TIMEOUT).await;
                    (id, (Some(machine), ok))
                }
                Err(_) => (id, (None, false)),
            }
        });
        let mut probed: HashMap<String, (Option<Arc<Machine>>, bool)> =
            futures::future::join_all(probes).await.into_iter().collect();
        let now = Instant::now();
        let mut adopted = Vec::new();
        let mut to_stop: Vec<(String, String)> = Vec::new();
        let mut to_bring_up: Vec<(String, MachineSpec)> = Vec::new();
        let mut seen = BTreeSet::new();
        for server in &servers {
            let id = server.server_id.clone();
            let settled = matches!(server.current_status, ServerStatus::Deleting | ServerStatus::Stopped);
            if settled || (server.current_status.is_terminal() && !records.contains_key(&id)) {
                // Being deleted or stopped (no longer billed): a tracked one is recorded as stopped below.
                continue;
            }
            seen.insert(id.clone());
            if let Some((_, record)) = records.get(&id) {
                let spec = record.spec();
                let mut entry = self.new_entry(&id, spec.clone(), MachinePhase::Starting, now);
                entry.launched_ms = record.launched_ms;
                entry.price = record.price_per_hour_usd;
                // To stop: what we were stopping, and what the provider reports `Stopping` or `Error` (values
                // only seen in client code; a DELETE is what confirms the billing has stopped).
                let leftover = if server.current_status.is_terminal() {
                    Some(format!("reported {} by RunComfy after a restart", server.current_status))
                } else if matches!(
                    record.phase,
                    MachinePhase::Stopping | MachinePhase::Stopped | MachinePhase::Unhealthy
                ) {
                    Some(format!("left running ({:?}) by an earlier run", record.phase))
                } else {
                    None
                };
                if let Some(reason) = leftover {
                    entry.phase = MachinePhase::Unhealthy;
                    entry.reason = reason.clone();
                    entry.busy = true;
                    adopt_timing(&mut entry, server, record, now);
                    self.state().machines.insert(id.clone(), entry);
                    to_stop.push((id.clone(), reason));
                    continue;
                }
                match record.phase {
                    _ if server.current_status.is_ready() && server.main_service_url.is_some() => {
                        adopt_timing(&mut entry, server, record, now);
                        let url = server.main_service_url.clone().unwrap_or_default();
                        entry.url = Some(url.clone());
                        let drained = record.phase == MachinePhase::Draining;
                        match probed.remove(&id).unwrap_or((None, false)) {
                            (Some(machine), true) => {
                                entry.phase =
                                    if drained { MachinePhase::Draining } else { MachinePhase::Ready };
                                entry.reason = record.reason.clone();
                                if drained {
                                    machine.drain();
                                }
                                // Its idle time died with the previous process: unless a recovered job
                                // uses it within ADOPT_GRACE (or it is part of the warm minimum), it is
                                // stopped rather than billed for another idle period.
                                let policy = self.policy(&spec);
                                let idle = policy.idle_stop.saturating_sub(ADOPT_GRACE);
                                machine.set_idle_since(now.checked_sub(idle).unwrap_or(now));
                                entry.machine = Some(machine.clone());
                                info!(machine = %id, "adopted a RunComfy machine launched before the restart");
                                adopted.push(machine);
                            }
                            (Some(machine), false) => {
                                machine.retire("its ComfyUI did not answer after a restart");
                                entry.phase = MachinePhase::Unhealthy;
                                entry.reason = "its ComfyUI did not answer after a restart".into();
                                entry.busy = true;
                                to_stop.push((id.clone(), entry.reason.clone()));
                            }
                            (None, _) => {
                                entry.phase = MachinePhase::Unhealthy;
                                entry.reason = "its ComfyUI URL is invalid".into();
                                entry.busy = true;
                                to_stop.push((id.clone(), entry.reason.clone()));
                            }
                        }
                        self.state().machines.insert(id.clone(), entry);
                    }
                    _ => {
                        // Still starting: wait for it as for a fresh launch.
                        entry.busy = true;
                        self.state().machines.insert(id.clone(), entry);
                        to_bring_up.push((id.clone(), spec));
                    }
                }
                continue;
            }
            // Not tracked: a launch we recorded but never learned the id of?
            let claim = launches.iter().position(|(_, l)| {
                server.server_type.as_ref().is_some_and(|t| t.as_str() == l.server_type)
                    && server.estimated_duration.is_none_or(|d| d == l.duration_secs)
            });
            let reason = match claim {
                Some(i) => {
                    launches.remove(i);
                    Some("launched by an earlier run that did not record it".to_string())
                }
                None if self.inner.config.stop_unknown_servers => {
                    Some("not launched by this comfyrelay (runcomfy.stop_unknown_servers)".to_string())
                }
                None => {
                    warn!(machine = %id, status = %server.current_status, "a RunComfy server this comfyrelay did not launch is running; left alone");
                    None
                }
            };
            if let Some(reason) = reason {
                let spec = MachineSpec {
                    workflow_version_id: String::new(),
                    server_type: server
                        .server_type
                        .as_ref()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                };
                let mut entry = self.new_entry(&id, spec, MachinePhase::Unhealthy, now);
                entry.reason = reason.clone();
                entry.busy = true;
                if server.current_status.is_ready() {
                    entry.ready_at = Some(now);
                    entry.ready_ms = Some(now_ms());
                }
                self.state().machines.insert(id.clone(), entry);
                to_stop.push((id.clone(), reason));
            }
        }
        // Tracked machines the API no longer lists stopped by themselves (lease) or were deleted; they and
        // the machines already stopped are kept as history for `ListMachines(include_stopped)`.
        let mut history: Vec<(String, Record)> = Vec::new();
        for (id, (row, record)) in &records {
            if seen.contains(id) {
                continue;
            }
            if record.phase == MachinePhase::Stopped {
                history.push((id.clone(), record.clone()));
                continue;
            }
            let mut record = record.clone();
            record.phase = MachinePhase::Stopped;
            let stopped = record.lease_until_ms.unwrap_or(row.updated_ms).min(now_ms());
            record.stopped_ms = Some(stopped);
            if let Some(r) = record.ready_ms {
                record.billed_seconds = ((stopped - r).max(0) as f64) / 1000.0;
            }
            if record.reason.is_empty() {
                record.reason = "stopped while comfyrelay was not running".into();
            }
            info!(machine = %id, "a machine tracked before the restart has stopped meanwhile");
            let row = MachineRow {
                state: "stopped".into(),
                updated_ms: now_ms(),
                body: serde_json::to_string(&record).unwrap_or_default(),
                ..row.clone()
            };
            if let Err(e) = self.put_row(&row).await {
                // The row keeps its old phase; the next start settles it again the same way.
                error!(machine = %id, error = %ErrorChain(&e), "cannot record a machine as stopped");
            }
            history.push((id.clone(), record));
        }
        {
            let mut st = self.state();
            for (id, record) in history {
                st.machines.entry(id.clone()).or_insert_with(|| self.stopped_entry(&id, &record, now));
            }
        }
        self.prune_stopped();
        for (launch_id, _) in launches {
            self.forget_launch(&launch_id).await;
        }
        self.state().reconciled = true;
        for id in adopted.iter().map(|m| m.id.clone()).collect::<Vec<_>>() {
            self.persist(&id).await;
        }
        for (id, reason) in to_stop {
            self.spawn_stop(id, reason);
        }
        for (id, spec) in to_bring_up {
            let pool = self.clone();
            let started = Instant::now();
            self.inner.tracker.spawn(
                async move { pool.bring_up(id, spec, started).await }
                    .instrument(tracing::info_span!("adopt_starting")),
            );
        }
        info!(servers = servers.len(), adopted = adopted.len(), "RunComfy machines reconciled");
        self.inner.wake.notify_one();
        Ok(adopted)
    }

    /// A machine stopped before this start, as history.
    fn stopped_entry(&self, id: &str, record: &Record, now: Instant) -> Entry {
        let mut e = self.new_entry(id, record.spec(), MachinePhase::Stopped, now);
        e.launched_ms = record.launched_ms;
        e.price = record.price_per_hour_usd;
        e.ready_ms = record.ready_ms;
        e.stopped_ms = record.stopped_ms;
        e.reason = record.reason.clone();
        // Only the span between these two instants is ever read: the billed time.
        let billed = Duration::from_secs_f64(record.billed_seconds.max(0.0));
        e.stopped_at = Some(now);
        e.ready_at = record.ready_ms.map(|_| now.checked_sub(billed).unwrap_or(now));
        e
    }
}
