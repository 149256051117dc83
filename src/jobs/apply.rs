//! The one function through which a job's state changes: [`apply`] takes a record and an event and returns
//! the next record, or refuses the event. Runner, scheduler, cancel and recovery only emit events; the
//! log writer applies them (and stores only those `apply` accepts), so replaying a job's log from zero
//! rebuilds exactly the record that is stored.
//!
//! Pure and synchronous: no I/O, no clock (times come from the event).

use super::model::Event;
use super::model::{EventKind, JobRecord, JobSpec, JobState, Usage};

/// Why an event does not apply to a job in its current state. Refused events are not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejected {
    /// The job already ended.
    #[error("the job has already ended")]
    Ended,
    /// The event's sequence is not the next one.
    #[error("sequence {got} is not the next ({expected})")]
    OutOfOrder {
        /// The next sequence.
        expected: u64,
        /// The event's.
        got: u64,
    },
    /// The event does not fit the job's state (e.g. a queue position for a running job).
    #[error("a {event} event does not apply to a {state} job")]
    NotInState {
        /// The event.
        event: &'static str,
        /// The state.
        state: &'static str,
    },
    /// A retry must name the attempt after the current one.
    #[error("attempt {got} does not follow attempt {current}")]
    WrongAttempt {
        /// The current attempt.
        current: u32,
        /// The event's.
        got: u32,
    },
    /// Success without a stored output for every declared output node: never falsely done.
    #[error("outputs of node(s) {} are missing", .0.join(", "))]
    MissingOutputs(Vec<String>),
}

/// Applies `event` to `record` (a job of `spec`), returning the next record.
///
/// # Errors
/// [`Rejected`] when the event does not apply; the record is then unchanged.
pub(crate) fn apply(spec: &JobSpec, record: &JobRecord, event: &Event) -> Result<JobRecord, Rejected> {
    if record.state.is_terminal() {
        return Err(Rejected::Ended);
    }
    if event.seq != record.last_sequence + 1 {
        return Err(Rejected::OutOfOrder { expected: record.last_sequence + 1, got: event.seq });
    }
    let mut next = record.clone();
    next.last_sequence = event.seq;
    let t = event.time_ms;
    let not_in_state =
        || Rejected::NotInState { event: event.kind.name(), state: record.state.status().as_str() };
    match &event.kind {
        EventKind::Queued { position, reason } => match &mut next.state {
            JobState::Queued { position: p, reason: r } => {
                *p = *position;
                r.clone_from(reason);
            }
            JobState::Provisioning { position: p, .. } => *p = *position,
            _ => return Err(not_in_state()),
        },
        EventKind::Provisioning { phase, machine_id, .. } => match &record.state {
            JobState::Queued { position, .. } => {
                next.state = JobState::Provisioning {
                    position: *position,
                    phase: phase.clone(),
                    machine_id: machine_id.clone(),
                    since_ms: t,
                };
                next.provision_ms.get_or_insert(t);
            }
            JobState::Provisioning { position, since_ms, .. } => {
                next.state = JobState::Provisioning {
                    position: *position,
                    phase: phase.clone(),
                    machine_id: machine_id.clone(),
                    since_ms: *since_ms,
                };
            }
            _ => return Err(not_in_state()),
        },
        EventKind::Started { machine_id, prompt_id } => {
            let provisioned_since = match &record.state {
                JobState::Queued { .. } => None,
                JobState::Provisioning { since_ms, .. } => Some(*since_ms),
                _ => return Err(not_in_state()),
            };
            next.state = JobState::Running {
                machine_id: machine_id.clone(),
                prompt_id: prompt_id.clone(),
                since_ms: t,
                submitted: false,
            };
            next.started_ms = Some(t);
            next.machine_id = Some(machine_id.clone());
            next.timings.queue_wait_ms = Some((t - spec.created_ms).max(0) as u64);
            if let Some(since) = provisioned_since {
                next.timings.provisioning_ms = Some((t - since).max(0) as u64);
            }
        }
        EventKind::PromptSubmitted { upload_ms } => match &mut next.state {
            JobState::Running { submitted, .. } if !*submitted => {
                *submitted = true;
                next.timings.upload_ms = Some(*upload_ms);
            }
            _ => return Err(not_in_state()),
        },
        EventKind::NodeStarted { .. }
        | EventKind::NodesCached { .. }
        | EventKind::Progress { .. }
        | EventKind::Preview { .. }
        | EventKind::NodeExecuted { .. }
        | EventKind::ProgressText { .. }
        | EventKind::Comfy { .. } => {
            if !matches!(record.state, JobState::Running { .. }) {
                return Err(not_in_state());
            }
        }
        EventKind::OutputReady { output } => {
            if !matches!(record.state, JobState::Running { .. }) {
                return Err(not_in_state());
            }
            next.outputs.push(output.clone());
        }
        EventKind::Warning { .. } => {}
        EventKind::CancelRequested { reason } => next.cancel_reason = Some(reason.clone()),
        EventKind::CancelStep { .. } => {
            // Only a runner escalating a cancel emits it: the job is on a machine, and its cancel was asked.
            if !matches!(record.state, JobState::Running { .. }) || record.cancel_reason.is_none() {
                return Err(not_in_state());
            }
        }
        EventKind::Retrying { attempt, .. } => {
            if *attempt != record.attempt + 1 {
                return Err(Rejected::WrongAttempt { current: record.attempt, got: *attempt });
            }
            next.attempt = *attempt;
            next.state = JobState::Queued { position: 0, reason: String::new() };
            next.outputs.clear();
        }
        EventKind::Requeued { .. } => {
            if !matches!(record.state, JobState::Running { .. }) {
                return Err(not_in_state());
            }
            next.state = JobState::Queued { position: 0, reason: String::new() };
            next.outputs.clear();
        }
        EventKind::Succeeded { outputs, usage } => {
            if !matches!(record.state, JobState::Running { .. }) {
                return Err(not_in_state());
            }
            let missing: Vec<String> = spec
                .outputs
                .iter()
                .filter(|d| !outputs.iter().any(|o| o.node_id == d.node_id))
                .map(|d| d.node_id.clone())
                .collect();
            if !missing.is_empty() {
                return Err(Rejected::MissingOutputs(missing));
            }
            next.state = JobState::Succeeded;
            next.outputs = outputs.clone();
            finish(&mut next, t, usage);
        }
        EventKind::Failed { error, usage } => {
            next.state = JobState::Failed { error: error.clone() };
            finish(&mut next, t, usage);
        }
        EventKind::Cancelled { reason, usage } => {
            next.state = JobState::Cancelled { reason: reason.clone() };
            finish(&mut next, t, usage);
        }
    }
    Ok(next)
}

fn finish(record: &mut JobRecord, t: i64, usage: &Usage) {
    record.ended_ms = Some(t);
    if usage.execution_ms.is_some() {
        record.timings.execution_ms = usage.execution_ms;
    }
    if usage.download_ms.is_some() {
        record.timings.download_ms = usage.download_ms;
    }
    record.machine_seconds = usage.machine_seconds;
    record.cost_usd = usage.cost_usd;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::jobs::model::{CancelStepKind, DeclaredOutput, FailureReason, JobFailure, JobId, OutputFile};

    pub(crate) fn spec(declared: &[&str]) -> JobSpec {
        JobSpec {
            id: JobId::new(),
            tenant: String::new(),
            workflow: "w".into(),
            workflow_version: "1".into(),
            inputs: BTreeMap::new(),
            labels: BTreeMap::new(),
            priority: 0,
            request_id: None,
            graph: serde_json::json!({}),
            images: Vec::new(),
            outputs: declared
                .iter()
                .map(|n| DeclaredOutput { node_id: n.to_string(), streamed: false })
                .collect(),
            node_classes: BTreeMap::new(),
            runcomfy_workflow_version_id: None,
            server_type: None,
            created_ms: 0,
            deadline_ms: None,
        }
    }

    pub(crate) fn output(node: &str, n: u32) -> OutputFile {
        OutputFile {
            node_id: node.into(),
            filename: format!("{node}_{n}.png"),
            mime_type: "image/png".into(),
            size: 1,
            sha256: format!("{:064x}", n),
            width: 1,
            height: 1,
            kind: "output".into(),
        }
    }

    /// Any event kind, including ones that rarely apply (so refusals are exercised).
    pub(crate) fn any_kind() -> impl Strategy<Value = EventKind> {
        let node = prop::sample::select(vec!["1", "2", "3"]);
        prop_oneof![
            (0u32..5).prop_map(|position| EventKind::Queued { position, reason: String::new() }),
            Just(EventKind::Provisioning {
                phase: "starting".into(),
                machine_id: "m1".into(),
                server_type: "medium".into(),
                elapsed_ms: 5,
            }),
            Just(EventKind::Started { machine_id: "m1".into(), prompt_id: "p".into() }),
            (0u64..50).prop_map(|upload_ms| EventKind::PromptSubmitted { upload_ms }),
            node.clone().prop_map(|n| EventKind::NodeStarted {
                node_id: n.into(),
                display_node_id: n.into(),
                class_type: String::new(),
            }),
            node.clone().prop_map(|n| EventKind::Progress { node_id: n.into(), value: 1.0, max: 2.0 }),
            (node.clone(), 0u32..100).prop_map(|(n, k)| EventKind::OutputReady { output: output(n, k) }),
            Just(EventKind::Warning { code: "X".into(), message: "x".into(), node_ids: vec![] }),
            Just(EventKind::CancelRequested { reason: "r".into() }),
            (
                prop::sample::select(vec![
                    CancelStepKind::Interrupt,
                    CancelStepKind::Free,
                    CancelStepKind::ReplaceMachine,
                    CancelStepKind::Abandoned,
                ]),
                0u64..60_000
            )
                .prop_map(|(step, elapsed_ms)| EventKind::CancelStep { step, elapsed_ms }),
            (1u32..4).prop_map(|attempt| EventKind::Retrying { attempt, reason: "lost".into() }),
            Just(EventKind::Requeued { reason: "shutdown".into() }),
            prop::collection::vec((node.clone(), 0u32..100), 0..3).prop_map(|o| EventKind::Succeeded {
                outputs: o.into_iter().map(|(n, k)| output(n, k)).collect(),
                usage: Usage { execution_ms: Some(3), ..Usage::default() },
            }),
            Just(EventKind::Failed {
                error: JobFailure::new(FailureReason::Lost, "gone"),
                usage: Usage::default(),
            }),
            Just(EventKind::Cancelled { reason: "r".into(), usage: Usage::default() }),
        ]
    }

    fn ev(seq: u64, kind: EventKind) -> Event {
        Event { job_id: JobId::new(), seq, time_ms: seq as i64 * 10, kind }
    }

    #[test]
    fn a_job_runs_through_its_states() {
        let spec = spec(&["3"]);
        let mut r = JobRecord::new();
        let kinds = [
            EventKind::Queued { position: 1, reason: String::new() },
            EventKind::Started { machine_id: "m".into(), prompt_id: "p".into() },
            EventKind::PromptSubmitted { upload_ms: 4 },
            EventKind::OutputReady { output: output("3", 1) },
        ];
        for (i, k) in kinds.into_iter().enumerate() {
            r = apply(&spec, &r, &ev(i as u64 + 1, k)).unwrap();
        }
        assert!(matches!(r.state, JobState::Running { submitted: true, .. }));
        assert_eq!(r.timings.queue_wait_ms, Some(20));
        // A queue position that arrives after the start is stale: refused.
        assert!(matches!(
            apply(&spec, &r, &ev(5, EventKind::Queued { position: 2, reason: String::new() })),
            Err(Rejected::NotInState { .. })
        ));
        let done = EventKind::Succeeded { outputs: r.outputs.clone(), usage: Usage::default() };
        let r = apply(&spec, &r, &ev(5, done)).unwrap();
        assert_eq!(r.state, JobState::Succeeded);
        assert_eq!(r.ended_ms, Some(50));
        assert_eq!(
            apply(&spec, &r, &ev(6, EventKind::Queued { position: 1, reason: String::new() })),
            Err(Rejected::Ended)
        );
    }

    #[test]
    fn success_without_every_declared_output_is_refused() {
        let spec = spec(&["3", "4"]);
        let mut r = JobRecord::new();
        r = apply(&spec, &r, &ev(1, EventKind::Started { machine_id: "m".into(), prompt_id: "p".into() }))
            .unwrap();
        let done = EventKind::Succeeded { outputs: vec![output("3", 1)], usage: Usage::default() };
        assert_eq!(apply(&spec, &r, &ev(2, done)), Err(Rejected::MissingOutputs(vec!["4".into()])));
    }

    #[test]
    fn a_cancel_step_applies_only_to_a_running_job_being_cancelled_and_changes_nothing_else() {
        let spec = spec(&["3"]);
        let step = || EventKind::CancelStep { step: CancelStepKind::Free, elapsed_ms: 300 };
        let queued =
            apply(&spec, &JobRecord::new(), &ev(1, EventKind::Queued { position: 1, reason: String::new() }))
                .unwrap();
        assert!(matches!(apply(&spec, &queued, &ev(2, step())), Err(Rejected::NotInState { .. })));
        let started = EventKind::Started { machine_id: "m".into(), prompt_id: "p".into() };
        let running = apply(&spec, &queued, &ev(2, started)).unwrap();
        assert!(
            matches!(apply(&spec, &running, &ev(3, step())), Err(Rejected::NotInState { .. })),
            "no cancel was asked"
        );
        let asked =
            apply(&spec, &running, &ev(3, EventKind::CancelRequested { reason: "r".into() })).unwrap();
        let stepped = apply(&spec, &asked, &ev(4, step())).unwrap();
        assert_eq!(stepped, JobRecord { last_sequence: 4, ..asked });
    }

    proptest! {
        /// Whatever is thrown at it: sequences stay gap-free, nothing follows a terminal state, attempts
        /// only grow, and a success always holds every declared output.
        #[test]
        fn invariants_hold_for_any_event_sequence(kinds in prop::collection::vec(any_kind(), 0..60)) {
            let spec = spec(&["3"]);
            let mut r = JobRecord::new();
            for kind in kinds {
                let e = ev(r.last_sequence + 1, kind);
                if let Ok(next) = apply(&spec, &r, &e) {
                    prop_assert_eq!(next.last_sequence, r.last_sequence + 1);
                    prop_assert!(!r.state.is_terminal());
                    prop_assert!(next.attempt >= r.attempt);
                    if next.state == JobState::Succeeded {
                        prop_assert!(next.outputs.iter().any(|o| o.node_id == "3"));
                    }
                    r = next;
                }
            }
        }
    }
}
