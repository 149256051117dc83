//! One subscriber's view of a job's events: the log from a sequence, then the live feed, with no gap and no
//! duplicate at the switch.
//!
//! The subscriber attaches to the live broadcast *before* it reads the log (the other order loses events
//! that commit in between: pitfall "snapshot, then subscribe"). Events are de-duplicated by sequence. A
//! subscriber that falls behind the live buffer catches up from the log, where progress and previews
//! superseded by later ones may be coalesced; lifecycle and terminal events are never dropped.
//!
//! On a standby the same stream follows the shared log instead ([`super::follow`]): woken by the
//! notification of each commit, it reads what was committed after its last sequence.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::broadcast;

use super::{Event, EventKind, JobError, JobId, JobManager, OutputFile, OutputView, follow};

// Per subscriber this holds a broadcast receiver, a cursor and at most one page of the log: a slow
// subscriber costs a few hundred bytes plus what it has not read of one page, however far behind it is.

/// Events read from the log at a time.
const PAGE: u32 = 64;

/// Where a stream reads a job's events.
#[derive(Debug)]
enum Source {
    /// This replica runs the job.
    Engine(JobManager),
    /// Another replica runs it; its events are read from the shared log.
    Shared(follow::JobFollower),
}

/// How a stream learns of new events once it has read the log.
#[derive(Debug)]
enum Live {
    /// The engine's broadcast of each committed event.
    Broadcast(broadcast::Receiver<Arc<Event>>),
    /// A wake-up after each commit on another replica; the events are read from the log.
    Woken(follow::Wake),
}

/// A subscriber's stream of one job's events.
#[derive(Debug)]
pub struct EventStream {
    source: Source,
    id: JobId,
    last: u64,
    skip_previews: bool,
    live: Option<Live>,
    /// (Shared log) The last page was read after a wake-up: an empty one means the job may have ended.
    woken: bool,
    backlog: VecDeque<Arc<Event>>,
    /// Whether the log has been read up to the live feed.
    caught_up: bool,
    /// Whether the next catch-up may coalesce (after lagging).
    coalesce: bool,
    done: bool,
}

impl EventStream {
    pub(super) fn new(
        manager: JobManager,
        id: JobId,
        after: u64,
        skip_previews: bool,
        live: Option<broadcast::Receiver<Arc<Event>>>,
    ) -> Self {
        Self::with(Source::Engine(manager), id, after, skip_previews, live.map(Live::Broadcast))
    }

    pub(super) fn following(
        follower: follow::JobFollower,
        id: JobId,
        after: u64,
        skip_previews: bool,
        wake: Option<follow::Wake>,
    ) -> Self {
        Self::with(Source::Shared(follower), id, after, skip_previews, wake.map(Live::Woken))
    }

    fn with(source: Source, id: JobId, after: u64, skip_previews: bool, live: Option<Live>) -> Self {
        Self {
            source,
            id,
            last: after,
            skip_previews,
            live,
            woken: false,
            backlog: VecDeque::new(),
            caught_up: false,
            coalesce: false,
            done: false,
        }
    }

    /// The next event, or `None` after the terminal event (or when the job has no more events).
    ///
    /// # Errors
    /// Storage failures while reading the log.
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, JobError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(e) = self.backlog.pop_front() {
                if e.seq <= self.last {
                    continue;
                }
                self.last = e.seq;
                if e.kind.is_terminal() {
                    self.done = true;
                }
                if self.skip_previews && matches!(e.kind, EventKind::Preview { .. }) {
                    continue;
                }
                return Some(Ok(e));
            }
            if !self.caught_up {
                // A live job holds its recent events: most subscribers catch up without reading the store.
                if let (Source::Engine(manager), Some(Live::Broadcast(_))) = (&self.source, &self.live)
                    && let Some(recent) =
                        manager.inner.log.live(self.id).and_then(|l| l.events_after(self.last))
                {
                    self.backlog.extend(recent);
                    self.caught_up = true;
                    self.coalesce = false;
                    continue;
                }
                let page = match &self.source {
                    Source::Engine(manager) => manager
                        .events_after(self.id, self.last, PAGE)
                        .await
                        .map(|page| page.into_iter().map(Arc::new).collect()),
                    Source::Shared(follower) => follower.events_after(self.id, self.last, PAGE).await,
                };
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                };
                if page.is_empty() {
                    self.caught_up = true;
                    self.coalesce = false;
                    // Woken with nothing after our sequence: merged notices, or a job that has ended (maybe
                    // just after that read, or before our sequence). An ended job's log is read once more,
                    // since its terminal event may have committed after the page: then the stream ends.
                    if let Source::Shared(follower) = &self.source
                        && std::mem::take(&mut self.woken)
                    {
                        match follower.has_ended(self.id).await {
                            Ok(true) => {
                                self.live = None;
                                self.caught_up = false;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                self.done = true;
                                return Some(Err(e));
                            }
                        }
                    }
                } else {
                    self.backlog.extend(if self.coalesce { coalesce(page) } else { page });
                }
                continue;
            }
            let rx = match self.live.as_mut() {
                // The job is finished and its whole log was read.
                None => {
                    self.done = true;
                    return None;
                }
                Some(Live::Woken(wake)) => {
                    wake.woken().await;
                    self.caught_up = false;
                    self.woken = true;
                    continue;
                }
                Some(Live::Broadcast(rx)) => rx,
            };
            match rx.recv().await {
                Ok(e) if e.seq <= self.last => {}
                Ok(e) if e.seq == self.last + 1 => self.backlog.push_back(e),
                Ok(_) => self.caught_up = false, // a gap: the log has what we missed
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(job_id = %self.id, skipped = n, "subscriber lagged; catching up from the log");
                    self.caught_up = false;
                    self.coalesce = true;
                    crate::metrics::subscriber_coalesced();
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.live = None;
                    self.caught_up = false;
                }
            }
        }
    }
}

impl EventStream {
    /// An output's metadata, with its bytes when small enough to send inline.
    ///
    /// # Errors
    /// Artifact failures.
    pub async fn output_view(&self, output: &OutputFile) -> Result<OutputView, JobError> {
        match &self.source {
            Source::Engine(manager) => manager.output_view(output).await,
            Source::Shared(follower) => follower.output_view(output).await,
        }
    }
}

/// Drops progress, previews and queue positions that a later event of the same kind (and node) supersedes.
fn coalesce(page: Vec<Arc<Event>>) -> Vec<Arc<Event>> {
    let key = |e: &Event| -> Option<(u8, String)> {
        match &e.kind {
            EventKind::Progress { node_id, .. } => Some((0, node_id.clone())),
            EventKind::Preview { node_id, .. } => Some((1, node_id.clone())),
            EventKind::Queued { .. } => Some((2, String::new())),
            _ => None,
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut keep = vec![true; page.len()];
    for (i, e) in page.iter().enumerate().rev() {
        if let Some(k) = key(e)
            && !seen.insert(k)
        {
            keep[i] = false;
        }
    }
    page.into_iter().zip(keep).filter_map(|(e, k)| k.then_some(e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, kind: EventKind) -> Arc<Event> {
        Arc::new(Event { job_id: JobId::new(), seq, time_ms: 0, kind })
    }

    #[test]
    fn coalesce_keeps_the_last_progress_per_node_and_every_lifecycle_event() {
        let p =
            |seq, node: &str, v| ev(seq, EventKind::Progress { node_id: node.into(), value: v, max: 10.0 });
        let page = vec![
            p(1, "a", 1.0),
            p(2, "b", 1.0),
            p(3, "a", 2.0),
            ev(
                4,
                EventKind::NodeStarted {
                    node_id: "c".into(),
                    display_node_id: "c".into(),
                    class_type: String::new(),
                },
            ),
            p(5, "a", 3.0),
            ev(6, EventKind::Succeeded { outputs: vec![], usage: Default::default() }),
        ];
        let kept: Vec<u64> = coalesce(page).iter().map(|e| e.seq).collect();
        assert_eq!(kept, vec![2, 4, 5, 6]);
    }
}
