//! Result ingest: node reports (`RunEvent`s from in-process nodes, gRPC `Report`s, Kafka events
//! through `ReportSink`) → the store, in batches: starts, log chunks, outcomes.

use std::time::Duration;

use crossbeam_channel::Receiver;

use super::core::LostLogs;
use super::{kick, Core, LOG};
use crate::model::{Attempt, ExecutionId, Status};
use crate::now_ms;
use crate::runner::{Outcome, RunEvent};
use crate::store::{Finish, StoreError};

impl Core {
    /// Node reports → store. Whatever arrived together is written together: all `Started` of
    /// the batch in one transaction (recorded under `node` when given, heartbeat dated
    /// `silence_allowance` ms ahead), all log chunks in one, all outcomes in one.
    /// An error means some of it may not be stored (reapplying is harmless). With
    /// `note_lost_logs` (reports nobody will send again) log chunks the store refuses are
    /// remembered, and a note in their place says how many were lost and why
    /// (`store_lost_log_notes`), so the logs never look whole when they are not.
    pub(super) fn apply_events(
        &self,
        node: Option<&str>,
        silence_allowance: i64,
        batch: &[RunEvent],
        note_lost_logs: bool,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut failed = None;
        let mut started = Vec::new();
        let mut logs = Vec::new();
        let mut finished = Vec::new();
        for ev in batch {
            match ev {
                RunEvent::Started { key, pid } => {
                    log::debug!(target: LOG, "execution={} attempt={} running pid={pid}", key.execution, key.attempt);
                    started.push((key.execution, key.attempt));
                }
                RunEvent::Log { key, chunk } => logs.push((
                    key.execution,
                    key.attempt,
                    chunk.seq,
                    chunk.stream.as_str(),
                    chunk.data.as_str(),
                )),
                RunEvent::Finished { key, outcome } => {
                    finished.push((key.execution, key.attempt, finish_of(outcome)))
                }
            }
        }
        if !finished.is_empty() {
            // Node slots are free again: let the dispatcher fill them now, not at its next poll.
            kick(&self.kick_dispatch);
        }
        if !started.is_empty() {
            if let Err(e) = self
                .store
                .mark_running(&started, node, now, now + silence_allowance)
            {
                log::error!(target: LOG, "cannot mark {} executions running: {e}", started.len());
                failed = Some(e);
            }
        }
        if !logs.is_empty() {
            if let Err(e) = self.store.append_logs(&logs, now) {
                log::error!(target: LOG, "cannot store {} log chunks: {e}", logs.len());
                if note_lost_logs {
                    let mut lost = self.lost_logs.lock().unwrap_or_else(|p| p.into_inner());
                    for (id, attempt, seq, _, _) in &logs {
                        let l = lost.entry((*id, *attempt)).or_insert(LostLogs {
                            first_seq: *seq,
                            chunks: 0,
                            reason: String::new(),
                        });
                        l.first_seq = l.first_seq.min(*seq);
                        l.chunks += 1;
                        l.reason = e.to_string();
                    }
                }
                failed = Some(e);
            }
        }
        if note_lost_logs {
            self.store_lost_log_notes(now);
        }
        if !finished.is_empty() {
            if let Err(e) = self.finish_all(finished) {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Stores, for each attempt with lost log chunks, one `stderr` chunk in the first lost
    /// chunk's place: `[etask: N log chunk(s) … lost: REASON]`. Kept and tried again (at the
    /// next batch or idle tick) while the store still refuses.
    pub(super) fn store_lost_log_notes(&self, now: i64) {
        let mut lost = self.lost_logs.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((&(id, attempt), l)) = lost.iter().next() {
            let note = format!(
                "[etask: {} log chunk(s) of this attempt could not be stored and are lost: {}]\n",
                l.chunks, l.reason
            );
            match self
                .store
                .append_logs(&[(id, attempt, l.first_seq, "stderr", note.as_str())], now)
            {
                Ok(()) => {
                    log::warn!(target: LOG, "execution={id} attempt={attempt}: {} log chunks were lost; a note says so in their place", l.chunks);
                    lost.remove(&(id, attempt));
                }
                Err(_) => return, // still refused: the next tick tries again
            }
        }
    }
}

impl crate::delivery::ReportSink for Core {
    fn apply(&self, node: &str, events: &[RunEvent]) -> Result<(), crate::delivery::NotStored> {
        // A run just started gets the agents' silence allowance at once, not only from the
        // agent's next heartbeat.
        self.apply_events(Some(node), self.agent_silence_allowance(), events, false)
            .map_err(|e| crate::delivery::NotStored(e.to_string()))
    }

    fn alive(&self, node: &str, running: &[(ExecutionId, Attempt)]) {
        let at = now_ms() + self.agent_silence_allowance();
        if let Err(e) = self.store.heartbeat_runs(running, at) {
            log::warn!(target: LOG, "node={node} heartbeat not recorded: {e}");
        }
    }

    fn not_started(&self, node: &str, id: ExecutionId, attempt: Attempt, why: &str) {
        if crate::trust::Refusal::is_refusal_text(why) {
            // The node did not trust the dispatch: trying it again unchanged would be refused
            // again, so the attempt fails (and is retried per the task's policy) with why.
            log::warn!(target: LOG, "execution={id} attempt={attempt} refused by {node}: {why}");
            let fin = Finish {
                status: Some(Status::Failed),
                error: Some(format!("refused by {node}: {why}")),
                ..Finish::default()
            };
            self.finish(id, attempt, fin);
            return;
        }
        self.requeue(id, attempt, &format!("by {node}: {why}"), None);
    }
}

fn finish_of(outcome: &Outcome) -> Finish {
    Finish {
        status: Some(outcome.status()),
        exit_code: outcome.exit_code.map(i64::from),
        signal: outcome.signal.map(i64::from),
        result: outcome.result.clone(),
        result_error: outcome.result_error.clone(),
        error: outcome.error(),
        resources: outcome
            .resources
            .as_ref()
            .and_then(|r| serde_json::to_value(r).ok()),
        retry_at: None,
        callback_url: None,
    }
}

/// Reports of in-process nodes and gRPC executors → store, in batches.
pub(super) fn ingest(core: &Core, reports: &Receiver<RunEvent>) {
    const BATCH: usize = 256;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        crossbeam_channel::select! {
            recv(reports) -> ev => match ev {
                Ok(ev) => batch.push(ev),
                Err(_) => return, // every sender is gone
            },
            recv(core.shutdown.channel()) -> _ => return,
            default(Duration::from_millis(200)) => {
                core.store_lost_log_notes(now_ms());
                continue;
            }
        }
        if core.stopping() {
            return; // what is still running is recovered as lost on the next start
        }
        while batch.len() < BATCH {
            match reports.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        // Errors are logged where they happen; a gRPC executor's reports were acknowledged
        // when queued here.
        let _ = core.apply_events(None, 0, &batch, true);
        batch.clear();
    }
}
