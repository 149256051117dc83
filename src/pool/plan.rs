//! The planning loop: what to launch, stop, renew and check, decided without awaiting.

use super::*;

impl Pool {
    /// Exit policy: runs until shutdown; every failure is handled inside the action that met it.
    pub(super) async fn run(self) {
        let mut tick = tokio::time::interval(PLAN_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                () = self.inner.wake.notified() => {}
                _ = tick.tick() => {}
            }
            let actions = self.plan();
            self.observe();
            for action in actions {
                match action {
                    Action::Launch(spec) => self.spawn_launch(spec),
                    Action::Stop { id, reason } => self.spawn_stop(id, reason),
                    Action::Renew(id) => self.spawn_renew(id),
                    Action::Health(id) => self.spawn_health(id),
                    Action::Reconcile => self.spawn_reconcile(),
                    Action::Survey => self.spawn_survey(),
                }
            }
        }
    }

    /// Tells the engine that jobs waiting for RunComfy machines cannot get one while the credentials are
    /// refused (the engine fails them with the reason); not those of a spec with a machine taking jobs,
    /// which still serves them.
    fn fail_waiting_jobs(&self, st: &State, reason: &str) {
        for (spec, queued) in &st.demand {
            let served = st
                .machines
                .values()
                .any(|e| &e.spec == spec && e.phase == MachinePhase::Ready && e.machine.is_some());
            if *queued > 0 && !served {
                self.send(PoolEvent::ProvisioningFailed {
                    spec: spec.clone(),
                    reason: reason.to_string(),
                    gave_up: true,
                });
            }
        }
    }

    /// Decides what to do now. Never awaits; marks machines busy for the actions it returns.
    pub(super) fn plan(&self) -> Vec<Action> {
        let now = Instant::now();
        let config = &self.inner.config;
        let mut st = self.state();
        if st.closing {
            return Vec::new();
        }
        if let Some((reason, _)) = &st.misconfigured {
            // No launch can succeed; the survey (or the reconciliation) checks the credentials again.
            self.fail_waiting_jobs(&st, reason);
        }
        if !st.reconciled {
            // Retried with backoff (while misconfigured, it doubles as the check of the credentials).
            if !st.reconciling && st.reconcile_retry_at.is_none_or(|t| now >= t) {
                st.reconciling = true;
                return vec![Action::Reconcile];
            }
            return Vec::new();
        }
        let mut actions = Vec::new();
        let st = &mut *st;
        if !st.surveying && st.next_survey.is_none_or(|t| now >= t) {
            st.surveying = true;
            actions.push(Action::Survey);
        }
        // With the credentials refused no launch can succeed (the survey checks them again); machines
        // already running are still checked, renewed and stopped as usual.
        let misconfigured = st.misconfigured.is_some();

        // Specs to look at: those with demand, with a warm minimum, and with machines.
        let mut specs: BTreeSet<MachineSpec> = st.demand.keys().cloned().collect();
        for p in &config.pools {
            let server_type = if p.server_type.is_empty() {
                config.default_server_type.clone()
            } else {
                p.server_type.clone()
            };
            specs.insert(MachineSpec { workflow_version_id: p.workflow_version_id.clone(), server_type });
        }
        specs.extend(st.machines.values().filter(|e| e.phase.is_live()).map(|e| e.spec.clone()));

        let mut total: usize = st.machines.values().filter(|e| e.phase != MachinePhase::Stopped).count()
            + st.launching.values().sum::<usize>();
        let demand_changed = std::mem::take(&mut st.demand_changed);

        for spec in specs {
            let policy = self.policy(&spec);
            let queued = st.demand.get(&spec).copied().unwrap_or(0);
            let live: Vec<&Entry> =
                st.machines.values().filter(|e| e.spec == spec && e.phase.is_live()).collect();
            let assigned: usize = live.iter().filter_map(|e| e.machine.as_ref()).map(|m| m.assigned()).sum();
            let launching = st.launching.get(&spec).copied().unwrap_or(0);
            let have = live.len() + launching;
            let needed = (queued + assigned).div_ceil(policy.jobs_per_machine);
            let target = needed.max(policy.min_warm).min(policy.max_machines);

            // Jobs that start waiting while a machine is launching hear that they wait for it (and its later
            // phases as they come); the scheduler tells each job each (machine, phase) once.
            if demand_changed && queued > 0 {
                for e in live.iter().filter(|e| e.phase != MachinePhase::Ready) {
                    self.send(PoolEvent::Provisioning {
                        spec: spec.clone(),
                        machine_id: e.id.clone(),
                        phase: ProvisionPhase::WaitingForMachine,
                        elapsed: now.saturating_duration_since(e.launched_at),
                    });
                }
            }

            if have < target && !misconfigured {
                let backoff = st.failures.get(&spec).and_then(|f| f.retry_at).is_some_and(|t| now < t);
                let room = config.max_machines_total.saturating_sub(total);
                let n = (target - have).min(room);
                if backoff {
                    debug!(?spec, "launch postponed after failures");
                } else if n == 0 {
                    debug!(?spec, "at runcomfy.max_machines_total; not launching");
                } else {
                    for _ in 0..n {
                        *st.launching.entry(spec.clone()).or_default() += 1;
                        actions.push(Action::Launch(spec.clone()));
                    }
                    total += n;
                }
            }

            // Scale down: idle machines above the warm minimum, oldest idle first; and machines too old.
            let mut ready: Vec<(&String, Option<Instant>)> = st
                .machines
                .values()
                .filter(|e| e.spec == spec && e.phase == MachinePhase::Ready && !e.busy)
                .filter_map(|e| e.machine.as_ref().map(|m| (&e.id, m.idle_since())))
                .collect();
            ready.sort_by_key(|(_, idle)| *idle);
            let mut keep =
                st.machines.values().filter(|e| e.spec == spec && e.phase == MachinePhase::Ready).count();
            let mut stop_idle = Vec::new();
            for (id, idle_since) in ready {
                let Some(idle_since) = idle_since else { continue };
                if keep <= policy.min_warm || queued > 0 {
                    break;
                }
                if now.saturating_duration_since(idle_since) >= policy.idle_stop {
                    stop_idle.push(id.clone());
                    keep -= 1;
                }
            }
            for id in stop_idle {
                let Some(e) = st.machines.get_mut(&id) else { continue };
                if e.machine.as_ref().is_some_and(|m| m.drain_if_idle()) {
                    // Stopping from this decision on: an operator's undrain can no longer revive it.
                    e.phase = MachinePhase::Stopping;
                    e.reason = format!("idle for {}", humantime::format_duration(policy.idle_stop));
                    e.busy = true;
                    actions.push(Action::Stop { id, reason: e.reason.clone() });
                }
            }
            for e in st.machines.values_mut().filter(|e| e.spec == spec && e.phase == MachinePhase::Ready) {
                if e.ready_at.is_some_and(|r| now.saturating_duration_since(r) >= policy.max_lifetime) {
                    info!(machine = %e.id, "machine reached its maximum lifetime; draining");
                    e.phase = MachinePhase::Draining;
                    e.reason =
                        format!("reached max_lifetime {}", humantime::format_duration(policy.max_lifetime));
                    if let Some(m) = &e.machine {
                        m.drain();
                    }
                }
            }
        }

        for e in st.machines.values_mut() {
            if e.busy {
                continue;
            }
            match e.phase {
                MachinePhase::Draining => {
                    // `drain_if_idle`: a job assigned after this check would be a job on a stopped machine.
                    let idle = e.machine.as_ref().is_none_or(|m| m.drain_if_idle());
                    if idle {
                        e.phase = MachinePhase::Stopping;
                        e.busy = true;
                        actions.push(Action::Stop { id: e.id.clone(), reason: e.reason.clone() });
                        continue;
                    }
                }
                MachinePhase::Unhealthy => {
                    e.phase = MachinePhase::Stopping;
                    e.busy = true;
                    actions.push(Action::Stop { id: e.id.clone(), reason: e.reason.clone() });
                    continue;
                }
                _ => {}
            }
            if !matches!(e.phase, MachinePhase::Ready | MachinePhase::Draining | MachinePhase::Checking) {
                continue;
            }
            let renew_due = e
                .lease_until
                .is_some_and(|l| l.saturating_duration_since(now) < config.lease / 2 && now >= e.next_renew);
            if renew_due {
                e.busy = true;
                actions.push(Action::Renew(e.id.clone()));
            } else if e.phase != MachinePhase::Checking && now >= e.next_health {
                e.busy = true;
                actions.push(Action::Health(e.id.clone()));
            }
        }
        actions
    }
}
