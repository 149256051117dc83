//! What the client shows: live progress of a job (a job bar and one bar per executing node with
//! `indicatif`, queue position, machine provisioning phases) on a terminal; plain lines when stderr is not
//! a terminal; one JSON object per line on stdout with `--json`.
//!
//! Progress goes to stderr and results (job ids, saved files, listings) to stdout, so
//! `JOB=$(comfyrelay submit ...)` and pipes see only results.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::follow::{End, Notice};
use super::json;
use crate::proto::pb;

/// Prints results: JSON lines or human lines on stdout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Printer {
    pub(crate) json: bool,
}

impl Printer {
    /// A JSON line (with `--json`) or else the human text.
    pub(crate) fn result(&self, value: &serde_json::Value, human: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", human());
        }
    }
}

/// A call (or stream) that broke and is tried again: one shape for every command, as a JSON line
/// (`{"type": "reconnecting", "call": ..., "error": ..., "retry_in_seconds": ...}`, plus where a stream
/// resumes) or a human line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reconnect {
    /// The RPC.
    pub(crate) call: &'static str,
    /// Why it broke (the status message; never a key).
    pub(crate) error: String,
    /// The delay before the next attempt.
    pub(crate) retry_in: Duration,
    /// Where it resumes.
    pub(crate) resume: Resume,
}

/// Where a broken call resumes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resume {
    /// A one-shot call, repeated whole.
    Repeat,
    /// `StreamJob`, after this sequence.
    AfterSequence(u64),
    /// `DownloadOutput` of this file, at this byte.
    AtByte { filename: String, offset: u64 },
}

impl Reconnect {
    /// The `--json` line.
    pub(crate) fn json(&self) -> serde_json::Value {
        let mut line = serde_json::json!({
            "type": "reconnecting",
            "call": self.call,
            "error": self.error,
            "retry_in_seconds": self.retry_in.as_secs_f64(),
        });
        match &self.resume {
            Resume::Repeat => {}
            Resume::AfterSequence(sequence) => line["after_sequence"] = (*sequence).into(),
            Resume::AtByte { filename, offset } => {
                line["filename"] = filename.as_str().into();
                line["offset"] = (*offset).into();
            }
        }
        line
    }

    /// The human line.
    pub(crate) fn human(&self) -> String {
        let retry = humantime::format_duration(self.retry_in);
        match &self.resume {
            Resume::Repeat => format!("{}: {}; retrying in {retry}", self.call, self.error),
            Resume::AfterSequence(sequence) => {
                format!("connection lost ({}); resuming after event {sequence} in {retry}", self.error)
            }
            Resume::AtByte { filename, offset } => {
                format!("{filename}: download cut ({}); resuming at byte {offset} in {retry}", self.error)
            }
        }
    }

    /// Prints it: the JSON line on stdout with `--json`, else the human line on stderr.
    pub(crate) fn print(&self, printer: Printer) {
        if printer.json {
            println!("{}", self.json());
        } else {
            eprintln!("{}", self.human());
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Shows one job's events as they come.
#[derive(Debug)]
pub(crate) struct JobProgress {
    json: bool,
    /// Whether bars are drawn (human output on a terminal).
    bars: bool,
    multi: MultiProgress,
    job: ProgressBar,
    node: Option<(String, ProgressBar)>,
    nodes_done: u64,
    state: String,
}

impl JobProgress {
    /// Progress for `job_id` (of `workflow`, when known).
    pub(crate) fn new(json: bool, job_id: &str, workflow: &str) -> Self {
        let bars = !json && std::io::stderr().is_terminal();
        let target = if bars { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let multi = MultiProgress::with_draw_target(target);
        let job = multi.add(ProgressBar::no_length());
        job.set_style(style("{spinner:.cyan} {prefix:.bold} [{elapsed_precise}] {msg}"));
        let short_id: String = job_id.chars().take(8).collect();
        job.set_prefix(if workflow.is_empty() {
            format!("job {short_id}")
        } else {
            format!("{workflow} {short_id}")
        });
        if bars {
            job.enable_steady_tick(Duration::from_millis(120));
        }
        let mut p = Self { json, bars, multi, job, node: None, nodes_done: 0, state: "waiting".into() };
        p.update_message();
        p
    }

    /// A lifecycle line: above the bars on a terminal, plain on stderr otherwise (never with `--json`).
    fn line(&self, text: String) {
        if self.json {
            return;
        }
        if self.bars {
            let _ = self.multi.println(text);
        } else {
            eprintln!("{text}");
        }
    }

    fn update_message(&mut self) {
        let nodes = match self.nodes_done {
            0 => String::new(),
            1 => " · 1 node done".into(),
            n => format!(" · {n} nodes done"),
        };
        self.job.set_message(format!("{}{nodes}", self.state));
    }

    fn finish_node(&mut self) {
        if let Some((_, bar)) = self.node.take() {
            // Finished nodes leave the screen (a large graph would fill it); the job bar counts them.
            bar.finish_and_clear();
            self.multi.remove(&bar);
            self.nodes_done += 1;
        }
    }

    fn node_bar(&mut self, node_id: &str, class_type: &str) -> &ProgressBar {
        if self.node.as_ref().is_none_or(|(id, _)| id != node_id) {
            self.finish_node();
            let bar = self.multi.add(ProgressBar::no_length());
            bar.set_style(style("  {prefix:<24} {wide_bar:.cyan/blue} {pos}/{len} {msg}"));
            let label = if class_type.is_empty() {
                format!("node {node_id}")
            } else {
                format!("{node_id} {class_type}")
            };
            bar.set_prefix(label);
            self.node = Some((node_id.to_string(), bar));
        }
        &self.node.as_ref().expect("set above").1
    }

    /// Shows one notice from the follower.
    pub(crate) fn notice(&mut self, notice: Notice<'_>) {
        match notice {
            Notice::Event(e) => self.event(e),
            Notice::Reconnecting(reconnect) => {
                if self.json {
                    println!("{}", reconnect.json());
                } else {
                    self.line(reconnect.human());
                }
            }
        }
    }

    fn event(&mut self, e: &pb::JobEvent) {
        use pb::job_event::Kind;
        if self.json {
            println!("{}", json::event(e));
            return;
        }
        match &e.kind {
            Some(Kind::Queued(q)) => {
                self.state = if q.reason.is_empty() {
                    format!("queued (position {})", q.position)
                } else {
                    format!("queued (position {}): {}", q.position, q.reason)
                };
                self.update_message();
            }
            Some(Kind::Warning(w)) => self.line(format!("warning {}: {}", w.code, w.message)),
            Some(Kind::CancelRequested(c)) => {
                self.line(format!("cancel requested: {}", c.reason));
                self.state = "cancelling".into();
                self.update_message();
            }
            Some(Kind::CancelStep(c)) => {
                let step = json::cancel_step_name(c.step).replace('_', " ");
                let elapsed = c.elapsed.as_ref().map_or(0, |d| d.seconds);
                self.line(format!("cancel: {step} after {elapsed}s"));
            }
            Some(Kind::Requeued(r)) => {
                self.line(format!("back in the queue: {}", r.reason));
                self.state = "queued".into();
                self.update_message();
            }
            Some(Kind::Provisioning(p)) => {
                let phase = json::phase_name(p.phase).replace('_', " ");
                let elapsed = p.elapsed.as_ref().map_or(0, |d| d.seconds);
                let machine =
                    if p.machine_id.is_empty() { String::new() } else { format!(" {}", p.machine_id) };
                self.line(format!("machine{machine}: {phase} after {elapsed}s"));
                self.state = format!("provisioning: {phase}");
                self.update_message();
            }
            Some(Kind::Started(s)) => {
                self.line(format!("started on {}", s.machine_id));
                self.state = "running".into();
                self.update_message();
            }
            Some(Kind::NodeStarted(n)) => {
                let bar = self.node_bar(&n.node_id, &n.class_type).clone();
                bar.tick();
                self.update_message();
            }
            Some(Kind::NodesCached(n)) => {
                if !n.node_ids.is_empty() {
                    self.nodes_done += n.node_ids.len() as u64;
                    self.line(format!("cached: {}", n.node_ids.join(", ")));
                    self.update_message();
                }
            }
            Some(Kind::Progress(p)) => {
                let bar = self.node_bar(&p.node_id, "").clone();
                bar.set_length(p.max.max(0.0) as u64);
                bar.set_position(p.value.max(0.0) as u64);
            }
            Some(Kind::ProgressText(t)) => {
                let bar = self.node_bar(&t.node_id, "").clone();
                bar.set_message(t.text.clone());
            }
            Some(Kind::OutputReady(o)) => {
                if let Some(o) = &o.output {
                    self.line(format!("output {} ({} bytes)", o.filename, o.size_bytes));
                }
            }
            Some(Kind::Retrying(r)) => self.line(format!("retrying (attempt {}): {}", r.attempt, r.reason)),
            Some(Kind::Succeeded(_) | Kind::Failed(_) | Kind::Cancelled(_)) => self.finish_node(),
            Some(
                Kind::Preview(_) | Kind::NodeExecuted(_) | Kind::ComfyMessage(_) | Kind::PromptSubmitted(_),
            )
            | None => {}
        }
    }

    /// Ends the display with the job's outcome.
    pub(crate) fn finish(mut self, end: &End) {
        self.finish_node();
        let text = match end {
            End::Succeeded(outputs) => format!("succeeded · {} output(s)", outputs.len()),
            End::Failed(error) => match error {
                Some(e) => format!("failed ({}): {}", json::reason_name(e.reason), e.message),
                None => "failed".into(),
            },
            End::Cancelled(reason) if reason.is_empty() => "cancelled".into(),
            End::Cancelled(reason) => format!("cancelled: {reason}"),
        };
        self.job.finish_with_message(text.clone());
        if !self.bars && !self.json {
            eprintln!("{text}");
        }
        if let End::Failed(Some(e)) = end {
            for n in &e.node_errors {
                self.line(format!("  node {} {}: {} {}", n.node_id, n.class_type, n.error_type, n.message));
            }
        }
    }

    /// Stops drawing without an outcome (the follow failed).
    pub(crate) fn abandon(self) {
        if let Some((_, bar)) = &self.node {
            bar.abandon();
        }
        self.job.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reconnect_notice_has_one_shape_plus_where_it_resumes() {
        let notice = |resume| Reconnect {
            call: "X",
            error: "gone".into(),
            retry_in: Duration::from_millis(250),
            resume,
        };
        assert_eq!(
            notice(Resume::Repeat).json(),
            serde_json::json!({ "type": "reconnecting", "call": "X", "error": "gone", "retry_in_seconds": 0.25 })
        );
        assert_eq!(notice(Resume::AfterSequence(7)).json()["after_sequence"], 7);
        let download = notice(Resume::AtByte { filename: "a.png".into(), offset: 1024 });
        assert_eq!(
            (&download.json()["filename"], &download.json()["offset"]),
            (&"a.png".into(), &1024.into())
        );
        assert_eq!(download.human(), "a.png: download cut (gone); resuming at byte 1024 in 250ms");
        assert_eq!(notice(Resume::Repeat).human(), "X: gone; retrying in 250ms");
    }
}
