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

/// Whether a failed machine-row write may succeed when tried again: not when it was fenced (another
/// replica leads, so no attempt can succeed and the caller must not act on the machine).
fn worth_retrying(e: &StoreError) -> bool {
    !matches!(e, StoreError::Fenced { .. })
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
            .when(worth_retrying)
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
            .when(worth_retrying)
            .notify(|e, delay| {
                warn!(launch = %record_id, error = %ErrorChain(e), ?delay, "cannot delete a launch record; retrying");
            })
            .await;
        if let Err(e) = deleted {
            error!(launch = %record_id, error = %ErrorChain(&e), "cannot delete a launch record; it is ignored at the next start");
        }
    }

    /// Writes a machine's row as it is in memory. `false` when the write was fenced: another replica
    /// leads now and manages the machine, so this one must not act on it (no DELETE, no lease extension).
    /// Other failures are logged and return `true`: the machine stays tracked in memory.
    pub(super) async fn persist(&self, id: &str) -> bool {
        let row = {
            let now = Instant::now();
            let st = self.state();
            let Some(e) = st.machines.get(id) else { return true };
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
        match self.put_row(&row).await {
            Ok(()) => true,
            Err(StoreError::Fenced { .. }) => {
                warn!(machine = %id, "another replica leads now and manages this machine; leaving it alone");
                false
            }
            Err(e) => {
                // The machine is still tracked in memory and its lease bounds the cost if we die now.
                error!(machine = %id, error = %ErrorChain(&e), "cannot record a machine's state; it stays tracked in memory, and its lease stops it if comfyrelay dies");
                true
            }
        }
    }

    pub(super) fn persist_later(&self, id: &str) {
        let pool = self.clone();
        let id = id.to_string();
        self.inner.tracker.spawn(async move {
            pool.persist(&id).await;
        });
    }

    pub(super) fn spawn_reconcile(&self) {
        let pool = self.clone();
        let span = tracing::info_span!("reconcile");
        self.inner.tracker.spawn(async move { pool.reconcile_once().await }.instrument(span));
    }

    /// One start-up reconciliation. Exit policy: on failure the planner retries it with backoff (1 s
    /// doubling to a minute); cut by shutdown.
    async fn reconcile_once(&self) {
        let result = self.reconcile().await;
        let now = Instant::now();
        let mut st = self.state();
        st.reconciling = false;
        match result {
            Ok(()) | Err(ReconcileError::ShuttingDown) => {}
            Err(e) => {
                st.reconcile_failures += 1;
                let delay = RECONCILE_RETRY.0.saturating_mul(2u32.saturating_pow(st.reconcile_failures - 1));
                let delay = delay.min(RECONCILE_RETRY.1);
                st.reconcile_retry_at = Some(now + delay);
                drop(st);
                warn!(error = %ErrorChain(&e), retry_in = ?delay, "cannot reconcile the account's RunComfy servers; launching nothing until it succeeds");
            }
        }
        self.inner.wake.notify_one();
    }

    pub(super) fn spawn_survey(&self) {
        let pool = self.clone();
        let span = tracing::debug_span!("survey");
        self.inner.tracker.spawn(async move { pool.survey().await }.instrument(span));
    }

    /// Reads the account's server list again: servers this comfyrelay does not track are listed as
    /// unmanaged (and a success after a 401/403 shows the credentials work again). Exit policy: one read;
    /// the planner schedules the next one.
    async fn survey(&self) {
        let listed = tokio::select! {
            r = self.inner.client.list_servers() => r,
            () = self.inner.shutdown.cancelled() => return,
        };
        match &listed {
            Ok(_) => self.api_ok(),
            Err(e) => {
                self.api_failed("listing the account's servers", e);
                debug!(error = %ErrorChain(e), "cannot list the account's servers");
            }
        }
        let mut st = self.state();
        st.surveying = false;
        st.next_survey = Some(Instant::now() + SURVEY_INTERVAL);
        if let Ok(servers) = listed {
            let notes = HashMap::new();
            let unmanaged = unmanaged_servers(&st, &servers, &notes);
            st.unmanaged = unmanaged;
        }
    }

    /// Lists the account's servers and settles each against the store, then tells the engine which adopted
    /// machines are ready for jobs ([`PoolEvent::Reconciled`], before any machine it brings up is `Ready`).
    pub(super) async fn reconcile(&self) -> Result<(), ReconcileError> {
        let read = async {
            let rows = self.inner.store.list_machines().await.map_err(ReconcileError::Store)?;
            match self.inner.client.list_servers().await {
                Ok(servers) => Ok((rows, servers)),
                Err(e) => {
                    self.api_failed("reconciling the account's servers", &e);
                    Err(ReconcileError::Api(e))
                }
            }
        };
        let (rows, servers) = tokio::select! {
            r = read => r?,
            () = self.inner.shutdown.cancelled() => return Err(ReconcileError::ShuttingDown),
        };
        self.api_ok();
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
        let mut probed: HashMap<String, (Option<Arc<Machine>>, bool)> = tokio::select! {
            probed = futures::future::join_all(probes) => probed.into_iter().collect(),
            () = self.inner.shutdown.cancelled() => return Err(ReconcileError::ShuttingDown),
        };
        // From here to the insertion below nothing awaits: what is settled is inserted at once.
        let now = Instant::now();
        let mut entries: Vec<Entry> = Vec::new();
        let mut adopted = Vec::new();
        let mut to_stop: Vec<(String, String)> = Vec::new();
        let mut to_bring_up: Vec<(String, MachineSpec)> = Vec::new();
        let mut notes: HashMap<String, String> = HashMap::new();
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
                entry.seen_at = Some(now);
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
                    entries.push(entry);
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
                        entries.push(entry);
                    }
                    _ => {
                        // Still starting: wait for it as for a fresh launch.
                        entry.busy = true;
                        entries.push(entry);
                        to_bring_up.push((id.clone(), spec));
                    }
                }
                continue;
            }
            // Not tracked. A launch record whose answer never came does not make it ours: another client of
            // the account may have launched the same server type and duration meanwhile.
            let maybe_ours = launches.iter().any(|(_, l)| may_be_launch_of(server, l));
            if self.inner.config.stop_unknown_servers {
                let reason = "not launched by this comfyrelay (runcomfy.stop_unknown_servers)".to_string();
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
                entries.push(entry);
                to_stop.push((id.clone(), reason));
            } else {
                let note = if maybe_ours {
                    "may be the machine of a launch an earlier run sent just before it stopped (its answer \
                     never came, so it cannot be told from another client's); left alone: if it is, its \
                     lease stops it"
                } else {
                    "on the account but not launched by this comfyrelay; left alone"
                };
                warn!(machine = %id, status = %server.current_status, maybe_ours, "a RunComfy server this comfyrelay does not track is running; left alone");
                notes.insert(id.clone(), note.to_string());
            }
        }
        // Tracked machines the API no longer lists stopped by themselves (lease) or were deleted; they and
        // the machines already stopped are kept as history for `ListMachines(include_stopped)`.
        let mut history: Vec<(String, Record)> = Vec::new();
        let mut settled_rows: Vec<MachineRow> = Vec::new();
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
            settled_rows.push(MachineRow {
                state: "stopped".into(),
                updated_ms: now_ms(),
                body: serde_json::to_string(&record).unwrap_or_default(),
                ..row.clone()
            });
            history.push((id.clone(), record));
        }
        {
            let mut st = self.state();
            if st.closing {
                // Shutdown began: adopt nothing (the next start does), stop nothing.
                return Err(ReconcileError::ShuttingDown);
            }
            for entry in entries {
                st.machines.insert(entry.id.clone(), entry);
            }
            for (id, record) in history {
                st.machines.entry(id.clone()).or_insert_with(|| self.stopped_entry(&id, &record, now));
            }
            st.unmanaged = unmanaged_servers(&st, &servers, &notes);
            st.reconciled = true;
            st.reconcile_failures = 0;
            st.reconcile_retry_at = None;
            st.next_survey = Some(now + SURVEY_INTERVAL);
        }
        self.prune_stopped();
        for row in settled_rows {
            if let Err(e) = self.put_row(&row).await {
                // The row keeps its old phase; the next start settles it again the same way.
                error!(machine = %row.id, error = %ErrorChain(&e), "cannot record a machine as stopped");
            }
        }
        for (launch_id, _) in launches {
            self.forget_launch(&launch_id).await;
        }
        for id in adopted.iter().map(|m| m.id.clone()).collect::<Vec<_>>() {
            self.persist(&id).await;
        }
        info!(servers = servers.len(), adopted = adopted.len(), "RunComfy machines reconciled");
        self.send(PoolEvent::Reconciled { adopted });
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
        self.inner.wake.notify_one();
        Ok(())
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

/// Whether `server` may be the machine of the interrupted launch `launch`: not listed before it was sent,
/// and of its server type and duration (where the API reports them).
pub(super) fn may_be_launch_of(server: &Server, launch: &LaunchRecord) -> bool {
    !launch.known_before.contains(&server.server_id)
        && server.server_type.as_ref().is_none_or(|t| t.as_str() == launch.server_type)
        && server.estimated_duration.is_none_or(|d| d == launch.duration_secs)
}

/// The account's running servers that `st` does not track, keeping what was known of each (first sighting,
/// note) and taking new notes from `notes`.
fn unmanaged_servers(
    st: &State,
    servers: &[Server],
    notes: &HashMap<String, String>,
) -> BTreeMap<String, Unmanaged> {
    let now = now_ms();
    servers
        .iter()
        .filter(|s| !matches!(s.current_status, ServerStatus::Deleting | ServerStatus::Stopped))
        .filter(|s| !st.machines.contains_key(&s.server_id))
        .map(|s| {
            let known = st.unmanaged.get(&s.server_id);
            let note =
                notes.get(&s.server_id).cloned().or_else(|| known.map(|k| k.note.clone())).unwrap_or_else(
                    || "on the account but not launched by this comfyrelay; left alone".into(),
                );
            let unmanaged = Unmanaged {
                server_type: s.server_type.as_ref().map(|t| t.as_str().to_string()).unwrap_or_default(),
                ready_ms: s.service_ready_at.map(|t| system_to_ms(t.0)),
                stopping_ms: s.estimated_stopping_at.map(|t| system_to_ms(t.0)),
                first_seen_ms: known.map_or(now, |k| k.first_seen_ms),
                note,
            };
            (s.server_id.clone(), unmanaged)
        })
        .collect()
}
