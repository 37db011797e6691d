//! The SQL text the store's statements share: column lists, status sets, and the one
//! compare-and-set through which every status change of an execution is written. The sets are
//! rendered from the model (`Status::is_terminal`, `Status::can_move_to`), so no statement
//! spells a status name. Pure: no connection here.

use crate::model::Status;
use crate::model::Status::{Cancelled, Dispatched, Failed, Pending, RetryWait, Running};

use super::{Result, StoreError};

/// The columns `rows::execution` decodes.
pub(super) const EXEC_COLS: &str =
    "id, task_id, attempt, status, node, due_at, deadline_at, exit_code, `signal`, result, \
     result_error, error, created_at, started_at, finished_at, resources";
/// The columns `rows::task` decodes.
pub(super) const TASK_COLS: &str = "id, name, request_id, spec, cron_expr, next_fire_at, paused, \
                                    deleted, created_at, skipped_fires";

/// Statuses of an execution a node holds (its heartbeat keeps them alive).
pub(super) const HELD: &[Status] = &[Dispatched, Running];

/// `'a', 'b'`: a status set as the inside of an SQL `IN (…)`.
fn status_list(set: &[Status]) -> String {
    set.iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `status IN ('a', 'b')`, the column qualified by `alias` when one is given.
pub(super) fn status_in(alias: &str, set: &[Status]) -> String {
    let dot = if alias.is_empty() { "" } else { "." };
    format!("{alias}{dot}status IN ({})", status_list(set))
}

/// The statuses that have not ended.
pub(super) fn live() -> Vec<Status> {
    Status::ALL
        .into_iter()
        .filter(|s| !s.is_terminal())
        .collect()
}

/// The statuses that are final.
pub(super) fn terminal() -> Vec<Status> {
    Status::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect()
}

/// `status = 'x'`, the column qualified by `alias` when one is given.
pub(super) fn status_is(alias: &str, s: Status) -> String {
    status_in(alias, &[s])
}

/// A pending execution `e` that may be claimed: not a `queue` execution (serial) still waiting
/// for an earlier execution of its task (of its node, for a broadcast shard) to end.
pub(super) fn waits_for_none() -> String {
    format!(
        "(e.serial = 0 OR NOT EXISTS (SELECT 1 FROM executions p WHERE p.task_id = e.task_id \
         AND p.id < e.id AND {} AND (e.pin_node IS NULL OR p.pin_node = e.pin_node)))",
        status_in("p", &live())
    )
}

/// A status change of executions, from any status of `from` to `to`: every `UPDATE
/// executions` that writes a status is rendered by [`Cas::update`], which refuses an edge the
/// model does not allow. The fixed ones are named below; cancel and finish build theirs from
/// the status they just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cas<'a> {
    pub from: &'a [Status],
    pub to: Status,
}

/// A claim: pending work handed to a node.
pub(super) const CLAIM: Cas<'static> = Cas {
    from: &[Pending],
    to: Dispatched,
};
/// A node refused a claimed dispatch: the work waits again.
pub(super) const UNCLAIM: Cas<'static> = Cas {
    from: &[Dispatched],
    to: Pending,
};
/// A dispatched attempt that never started goes back, under the next attempt number.
pub(super) const REQUEUE: Cas<'static> = Cas {
    from: &[Dispatched],
    to: Pending,
};
/// A node started the attempt.
pub(super) const START: Cas<'static> = Cas {
    from: &[Dispatched],
    to: Running,
};
/// A retry's backoff is over: the next attempt waits to be claimed.
pub(super) const PROMOTE: Cas<'static> = Cas {
    from: &[RetryWait],
    to: Pending,
};
/// No node took the work in time.
pub(super) const FAIL_UNPLACED: Cas<'static> = Cas {
    from: &[Pending],
    to: Failed,
};
/// The task was deleted: its executions that have not started are cancelled.
pub(super) const CANCEL_UNSTARTED: Cas<'static> = Cas {
    from: &[Pending, RetryWait],
    to: Cancelled,
};

impl Cas<'_> {
    /// `UPDATE executions SET status = '<to>', <set> WHERE <cond> AND status IN (<from>)`:
    /// `set` and `cond` are the statement's other assignments and conditions (`?` parameters
    /// bound by the caller, in that order).
    ///
    /// # Errors
    /// `Internal` when some status of `from` may not move to `to` (a bug in the caller).
    pub fn update(&self, set: &str, cond: &str) -> Result<String> {
        if let Some(bad) = self.from.iter().find(|f| !f.can_move_to(self.to)) {
            return Err(StoreError::Internal(
                crate::model::IllegalTransition {
                    from: *bad,
                    to: self.to,
                }
                .to_string(),
            ));
        }
        let comma = if set.is_empty() { "" } else { ", " };
        Ok(format!(
            "UPDATE executions SET status = '{}'{comma}{set} WHERE {cond} AND {}",
            self.to.as_str(),
            status_in("", self.from)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status::*;

    /// Every status change the store's SQL writes, and that each is an edge of the model.
    #[test]
    fn every_status_change_the_sql_writes_is_a_model_transition() {
        let fixed = [
            (CLAIM, &[Pending][..], Dispatched),
            (UNCLAIM, &[Dispatched][..], Pending),
            (REQUEUE, &[Dispatched][..], Pending),
            (START, &[Dispatched][..], Running),
            (PROMOTE, &[RetryWait][..], Pending),
            (FAIL_UNPLACED, &[Pending][..], Failed),
            (CANCEL_UNSTARTED, &[Pending, RetryWait][..], Cancelled),
        ];
        for (cas, from, to) in fixed {
            assert_eq!((cas.from, cas.to), (from, to));
            for f in from {
                assert!(f.can_move_to(to), "{f} -> {to}");
            }
            let sql = cas.update("node = ?", "id = ?").unwrap();
            assert!(sql.starts_with(&format!("UPDATE executions SET status = '{to}', node = ?")));
            assert!(sql.ends_with(&format!("WHERE id = ? AND {}", status_in("", from))));
        }
        // cancel: any live status it read (a terminal one is answered without an UPDATE).
        for from in live() {
            assert!(Cas {
                from: &[from],
                to: Cancelled
            }
            .update("", "id = ?")
            .is_ok());
        }
        // finish: a held attempt ends as its node reported, or waits for a retry.
        for from in [Dispatched, Running] {
            for to in [Succeeded, Failed, TimedOut, Cancelled, Lost, RetryWait] {
                assert!(
                    Cas { from: &[from], to }.update("", "id = ?").is_ok(),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn an_edge_the_model_forbids_is_never_rendered() {
        for from in terminal() {
            for to in Status::ALL {
                assert!(Cas { from: &[from], to }.update("", "id = ?").is_err());
            }
        }
        assert!(Cas {
            from: &[Pending, Running],
            to: Running
        }
        .update("", "1 = 1")
        .is_err());
    }

    #[test]
    fn status_sets_render_as_sql() {
        assert_eq!(status_in("", HELD), "status IN ('dispatched', 'running')");
        assert_eq!(
            status_in("e", &live()),
            "e.status IN ('pending', 'dispatched', 'running', 'retry_wait')"
        );
        assert_eq!(
            status_in("e", &terminal()),
            "e.status IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'lost')"
        );
    }
}
