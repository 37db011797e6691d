//! `SqlStore`, the one implementation of `Store`, in SQL both back ends understand, and the
//! text its statements share: status sets and the one compare-and-set (`Cas`) through which
//! every status change of an execution is written. The sets are rendered from the model
//! (`Status::is_terminal`, `Status::can_move_to`), so no statement spells a status name.
//! Rows are decoded in `rows`; connections and transactions belong to the back ends.

use serde_json::Value;

use super::rows::{
    self, bad, status_of, CancelOutcome, Claimed, Created, ExecutionRow, Finish, Fire, Fired,
    LogRow, NewTask, OutboxRow, Silent, TaskRow, ATTEMPT_COLS, CLAIM_COLS, EXEC_COLS, LOG_COLS,
    OUTBOX_COLS, SILENT_COLS, TASK_COLS,
};
use super::{Backend, Conn, Result, Store, StoreError, NOT_STARTED};
use crate::model::Status::{Cancelled, Dispatched, Failed, Pending, RetryWait, Running};
use crate::model::{Attempt, DeliveryPath, ExecutionId, Overlap, Status, TaskId};

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

// ---------------------------------------------------------------------------------------------
// The one SQL implementation of `Store`

/// The store over one SQL back end.
pub struct SqlStore {
    b: Box<dyn Backend>,
    writes: WriteHealth,
}

/// When transactions that wrote last failed for want of the store and last succeeded, and
/// when the last probe ran (ms since the epoch; 0 = never): `Store::refusing_writes`.
#[derive(Default)]
struct WriteHealth {
    failed_at: std::sync::atomic::AtomicI64,
    ok_at: std::sync::atomic::AtomicI64,
    probed_at: std::sync::atomic::AtomicI64,
}

impl WriteHealth {
    fn record(&self, ok: bool) {
        let at = if ok { &self.ok_at } else { &self.failed_at };
        at.fetch_max(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The newest write failed: a success in the same millisecond as a failure counts as
    /// newer (the write after the failure went through).
    fn refusing(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let failed = self.failed_at.load(Relaxed);
        failed > 0 && failed > self.ok_at.load(Relaxed)
    }
}

/// A connection that notes whether its transaction wrote (`exec`, `insert`).
struct Noting<'a> {
    c: &'a mut dyn Conn,
    wrote: &'a mut bool,
}

impl Conn for Noting<'_> {
    /// A statement that changed no row (a heartbeat of nobody, a sweep with nothing due) needs
    /// no space and says nothing about whether writes go through: only one that changed rows,
    /// or failed, counts (counting every UPDATE cleared "refusing writes" on a full disk).
    fn exec(&mut self, sql: &str, params: &[crate::store::V]) -> Result<u64> {
        let r = self.c.exec(sql, params);
        if !matches!(r, Ok(0)) {
            *self.wrote = true;
        }
        r
    }
    fn insert(&mut self, sql: &str, params: &[crate::store::V]) -> Result<i64> {
        *self.wrote = true;
        self.c.insert(sql, params)
    }
    fn query(
        &mut self,
        sql: &str,
        params: &[crate::store::V],
    ) -> Result<Vec<Vec<crate::store::V>>> {
        self.c.query(sql, params)
    }
}

/// How one attempt ended, as its `attempts` row records it.
struct AttemptEnd<'a> {
    status: Status,
    /// The node that held it.
    node: Option<String>,
    /// Exit code, signal and error of the attempt.
    fin: &'a Finish,
    started: Option<i64>,
}

impl SqlStore {
    pub fn new(b: Box<dyn Backend>) -> SqlStore {
        SqlStore {
            b,
            writes: WriteHealth::default(),
        }
    }

    /// Runs `f` in one transaction of the back end. A transaction that wrote is recorded for
    /// `refusing_writes`: committed, or failed as `Unavailable` (other failures — a conflict,
    /// a duplicate key, a refused transition — say nothing about the store's health).
    fn tx<T>(&self, mut f: impl FnMut(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let mut out = None;
        let mut wrote = false;
        let r = self.b.tx(&mut |c| {
            let mut c = Noting {
                c,
                wrote: &mut wrote,
            };
            out = Some(f(&mut c)?);
            Ok(())
        });
        match &r {
            Ok(()) if wrote => self.writes.record(true),
            Err(StoreError::Unavailable(_)) if wrote => self.writes.record(false),
            _ => {}
        }
        r?;
        out.ok_or_else(|| StoreError::Internal("transaction produced no value".into()))
    }

    fn insert_execution(
        c: &mut dyn Conn,
        task: TaskId,
        due_at: i64,
        deadline_ms: Option<i64>,
        now: i64,
    ) -> Result<ExecutionId> {
        // The deadline itself is set when an attempt is claimed (claim time + timeout), so
        // every attempt gets the full timeout.
        c.insert(
            &format!("INSERT INTO executions (task_id, attempt, status, due_at, timeout_ms, created_at, updated_at, path, pool) \
             VALUES (?, 1, '{}', ?, ?, ?, ?, (SELECT t.path FROM tasks t WHERE t.id = ?), (SELECT t.pool FROM tasks t WHERE t.id = ?))",
             Status::Pending.as_str()),
            &[task.0.into(), due_at.into(), deadline_ms.into(), now.into(), now.into(), task.0.into(), task.0.into()],
        )
        .map(ExecutionId)
    }

    fn load_execution(c: &mut dyn Conn, id: ExecutionId) -> Result<Option<ExecutionRow>> {
        let rows = c.query(
            &format!("SELECT {EXEC_COLS} FROM executions WHERE id = ?"),
            &[id.0.into()],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let mut e = rows::execution(r)?;
        let atts = c.query(
            &format!("SELECT {ATTEMPT_COLS} FROM attempts WHERE execution_id = ? ORDER BY attempt"),
            &[id.0.into()],
        )?;
        e.attempts = atts
            .iter()
            .map(|a| rows::attempt(a))
            .collect::<Result<_>>()?;
        Ok(Some(e))
    }

    fn record_attempt(
        c: &mut dyn Conn,
        id: ExecutionId,
        attempt: Attempt,
        end: AttemptEnd<'_>,
        now: i64,
    ) -> Result<()> {
        let AttemptEnd {
            status: st,
            node,
            fin,
            started,
        } = end;
        c.exec(
            "DELETE FROM attempts WHERE execution_id = ? AND attempt = ?",
            &[id.0.into(), i64::from(attempt.0).into()],
        )?;
        c.exec(
            "INSERT INTO attempts (execution_id, attempt, status, node, exit_code, `signal`, error, started_at, finished_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            &[id.0.into(), i64::from(attempt.0).into(), st.as_str().into(), node.into(), fin.exit_code.into(),
              fin.signal.into(), fin.error.clone().into(), started.into(), now.into()],
        )?;
        Ok(())
    }

    /// Cancels an execution inside a transaction (see `Store::cancel`).
    fn cancel_in(c: &mut dyn Conn, id: ExecutionId, why: &str, now: i64) -> Result<CancelOutcome> {
        let rows = c.query(
            "SELECT status, node, attempt, started_at FROM executions WHERE id = ?",
            &[id.0.into()],
        )?;
        let Some(r) = rows.first() else {
            return Ok(CancelOutcome::NotFound);
        };
        let (cur, node, attempt) = (
            status_of(&r[0])?,
            r[1].s(),
            Attempt(r[2].i().unwrap_or(1) as u32),
        );
        if cur == Status::Cancelled {
            return Ok(CancelOutcome::Cancelled {
                was: cur,
                node,
                attempt,
            });
        }
        if cur.is_terminal() {
            return Ok(CancelOutcome::AlreadyFinal(cur));
        }
        let cas = Cas {
            from: &[cur],
            to: Status::Cancelled,
        };
        let n = c.exec(
            &cas.update("error = ?, finished_at = ?, updated_at = ?", "id = ?")?,
            &[why.into(), now.into(), now.into(), id.0.into()],
        )?;
        if n != 1 {
            return Err(StoreError::Unavailable(
                "execution changed while cancelling; retry".into(),
            ));
        }
        if matches!(cur, Status::Dispatched | Status::Running) {
            let fin = Finish {
                error: Some(why.into()),
                ..Finish::default()
            };
            let end = AttemptEnd {
                status: Status::Cancelled,
                node: node.clone(),
                fin: &fin,
                started: r[3].i(),
            };
            Self::record_attempt(c, id, attempt, end, now)?;
        }
        Ok(CancelOutcome::Cancelled {
            was: cur,
            node,
            attempt,
        })
    }

    /// One attempt's outcome inside a transaction (see `Store::finish`).
    fn finish_in(
        c: &mut dyn Conn,
        id: ExecutionId,
        attempt: Attempt,
        fin: &Finish,
        now: i64,
    ) -> Result<Option<Status>> {
        let reported = fin
            .status
            .ok_or_else(|| StoreError::Internal("finish without a status".into()))?;

        let rows = c.query(
            "SELECT status, attempt, node, started_at FROM executions WHERE id = ?",
            &[id.0.into()],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let (cur, cur_attempt, node, started) =
            (status_of(&r[0])?, r[1].i().unwrap_or(0), r[2].s(), r[3].i());
        if cur_attempt != i64::from(attempt.0)
            || cur.is_terminal()
            || cur == Status::RetryWait
            || cur == Status::Pending
        {
            return Ok(None); // stale: an older attempt, or already decided
        }
        let retry = fin
            .retry_at
            .filter(|_| !matches!(reported, Status::Succeeded | Status::Cancelled));
        let new = if retry.is_some() {
            Status::RetryWait
        } else {
            reported
        };
        if cur.transition(new).is_err() {
            return Ok(None);
        }
        let result = fin
            .result
            .as_ref()
            .map(|m| Value::Object(m.clone()).to_string());
        let resources = fin.resources.as_ref().map(Value::to_string);
        let cas = Cas {
            from: &[cur],
            to: new,
        };
        let n = c.exec(
            &cas.update(
                "exit_code = ?, `signal` = ?, result = ?, result_error = ?, error = ?, \
                 resources = ?, finished_at = ?, due_at = ?, updated_at = ?",
                "id = ? AND attempt = ?",
            )?,
            &[
                fin.exit_code.into(),
                fin.signal.into(),
                result.into(),
                fin.result_error.clone().into(),
                fin.error.clone().into(),
                resources.into(),
                if new.is_terminal() { Some(now) } else { None }.into(),
                retry.unwrap_or(now).into(),
                now.into(),
                id.0.into(),
                i64::from(attempt.0).into(),
            ],
        )?;
        if n != 1 {
            return Ok(None);
        }
        let end = AttemptEnd {
            status: reported,
            node,
            fin,
            started,
        };
        Self::record_attempt(c, id, attempt, end, now)?;
        if new.is_terminal() {
            if let Some(url) = &fin.callback_url {
                c.insert(
                        "INSERT INTO outbox (execution_id, url, next_at, created_at) VALUES (?, ?, ?, ?)",
                        &[id.0.into(), url.as_str().into(), now.into(), now.into()],
                    )?;
            }
        }
        Ok(Some(new))
    }
}

impl SqlStore {
    /// `requeue`, optionally only while `holder` holds the attempt.
    fn requeue_in(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        holder: Option<&str>,
        error: &str,
        now: i64,
    ) -> Result<bool> {
        self.tx(|c| {
            let rows = c.query(
                &format!(
                    "SELECT node FROM executions WHERE id = ? AND attempt = ? AND {}",
                    status_is("", Status::Dispatched)
                ),
                &[id.0.into(), i64::from(attempt.0).into()],
            )?;
            let Some(r) = rows.first() else {
                return Ok(false);
            };
            if holder.is_some_and(|h| r[0].s().as_deref() != Some(h)) {
                return Ok(false);
            }
            let n = c.exec(
                &REQUEUE.update(
                    "attempt = attempt + 1, node = NULL, heartbeat_at = NULL, updated_at = ?",
                    "id = ? AND attempt = ?",
                )?,
                &[now.into(), id.0.into(), i64::from(attempt.0).into()],
            )?;
            if n != 1 {
                return Ok(false);
            }
            let fin = Finish {
                error: Some(error.to_owned()),
                ..Finish::default()
            };
            let end = AttemptEnd {
                status: Status::Lost,
                node: r[0].s(),
                fin: &fin,
                started: None,
            };
            Self::record_attempt(c, id, attempt, end, now)?;
            Ok(true)
        })
    }
}

impl Store for SqlStore {
    fn migrate(&self) -> Result<Vec<u32>> {
        self.b.migrate()
    }

    fn describe(&self) -> String {
        self.b.describe()
    }

    fn create_task(&self, t: &NewTask, now: i64) -> Result<Created> {
        let spec = t.spec.to_string();
        let lock = self.b.locking_read();
        self.tx(|c| {
            let (cron_expr, next) = match &t.cron {
                Some((e, n)) => (Some(e.clone()), Some(*n)),
                None => (None, None),
            };
            let params = [t.name.as_str().into(), t.request_id.clone().into(), spec.as_str().into(), cron_expr.into(),
                          next.into(), now.into(), t.path.as_str().into(), t.pool.as_str().into()];
            // The id is the one this INSERT created, never read back by another column: a
            // read-back by name once handed concurrent callers each other's tasks. A repeated
            // request id fails on its unique key; under MySQL that failure waits for the
            // winner's commit, and the locking reads below see the winner's rows (a plain read
            // could use an older snapshot and find nothing).
            let inserted = c.insert(
                "INSERT INTO tasks (name, request_id, spec, cron_expr, next_fire_at, created_at, path, pool) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                &params,
            );
            let task_id = match (inserted, &t.request_id) {
                (Ok(id), _) => TaskId(id),
                (Err(StoreError::Duplicate(_)), Some(rid)) => {
                    let got = c.query(&format!("SELECT id, spec FROM tasks WHERE request_id = ?{lock}"), &[rid.as_str().into()])?;
                    let r = got.first().ok_or_else(|| bad("task of a duplicate request_id"))?;
                    let task_id = TaskId(r[0].i().ok_or_else(|| bad("id"))?);
                    let first: Option<Value> = r[1].s().and_then(|s| serde_json::from_str(&s).ok());
                    let ex = c.query(&format!("SELECT MIN(id) FROM executions WHERE task_id = ?{lock}"), &[task_id.0.into()])?;
                    let execution_id = ex.first().and_then(|r| r[0].i()).map(ExecutionId);
                    // Sealed secrets differ on every sealing (a fresh ephemeral key): compared
                    // by name, not by value.
                    let differs = first.as_ref().map(comparable) != Some(comparable(&t.spec));
                    return Ok(Created { task_id, execution_id, existed: true, differs });
                }
                (Err(e), _) => return Err(e),
            };
            let execution_id = match t.first_due_at {
                Some(due) => Some(Self::insert_execution(c, task_id, due, t.deadline_ms, now)?),
                None => None,
            };
            Ok(Created { task_id, execution_id, existed: false, differs: false })
        })
    }

    fn get_task(&self, id: TaskId) -> Result<Option<TaskRow>> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?"),
                &[id.0.into()],
            )?;
            rows.first().map(|r| rows::task(r)).transpose()
        })
    }

    fn list_tasks(
        &self,
        name: Option<&str>,
        limit: u32,
        before: Option<TaskId>,
    ) -> Result<Vec<TaskRow>> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE deleted = 0 AND (? IS NULL OR name = ?) AND id < ? ORDER BY id DESC LIMIT ?"),
                &[name.into(), name.into(), before.map_or(i64::MAX, |b| b.0).into(), i64::from(limit).into()],
            )?;
            rows.iter().map(|r| rows::task(r)).collect()
        })
    }

    fn set_paused(&self, id: TaskId, paused: bool) -> Result<bool> {
        self.tx(|c| {
            let found = c.query(
                "SELECT id FROM tasks WHERE id = ? AND deleted = 0",
                &[id.0.into()],
            )?;
            if found.is_empty() {
                return Ok(false);
            }
            c.exec(
                "UPDATE tasks SET paused = ? WHERE id = ?",
                &[i64::from(paused).into(), id.0.into()],
            )?;
            Ok(true)
        })
    }

    fn delete_task(&self, id: TaskId, now: i64) -> Result<bool> {
        self.tx(|c| {
            let n = c.exec(
                "UPDATE tasks SET deleted = 1, next_fire_at = NULL WHERE id = ? AND deleted = 0",
                &[id.0.into()],
            )?;
            if n > 0 {
                c.exec(
                    &CANCEL_UNSTARTED.update(
                        "error = 'task deleted', finished_at = ?, updated_at = ?",
                        "task_id = ?",
                    )?,
                    &[now.into(), now.into(), id.0.into()],
                )?;
            }
            Ok(n > 0)
        })
    }

    fn add_execution(
        &self,
        task: TaskId,
        due_at: i64,
        deadline_ms: Option<i64>,
        now: i64,
    ) -> Result<ExecutionId> {
        self.tx(|c| Self::insert_execution(c, task, due_at, deadline_ms, now))
    }

    fn add_broadcast(
        &self,
        task: TaskId,
        nodes: &[String],
        deadline_ms: Option<i64>,
        now: i64,
    ) -> Result<Vec<ExecutionId>> {
        self.tx(|c| {
            let mut ids = Vec::new();
            for (i, node) in nodes.iter().enumerate() {
                let id = Self::insert_execution(c, task, now, deadline_ms, now)?;
                c.exec(
                    "UPDATE executions SET pin_node = ?, shard_index = ?, shard_total = ? WHERE id = ?",
                    &[node.as_str().into(), (i as i64).into(), (nodes.len() as i64).into(), id.0.into()],
                )?;
                ids.push(id);
            }
            Ok(ids)
        })
    }

    fn due_cron(&self, now: i64, limit: u32) -> Result<Vec<TaskRow>> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE next_fire_at IS NOT NULL AND next_fire_at <= ? \
                          AND paused = 0 AND deleted = 0 ORDER BY next_fire_at LIMIT ?"),
                &[now.into(), i64::from(limit).into()],
            )?;
            rows.iter().map(|r| rows::task(r)).collect()
        })
    }

    fn fire_cron(&self, f: &Fire<'_>, now: i64) -> Result<Option<Fired>> {
        self.tx(|c| {
            let n = c.exec(
                "UPDATE tasks SET next_fire_at = ? WHERE id = ? AND next_fire_at = ? AND deleted = 0",
                &[f.next.into(), f.task.0.into(), f.expected.into()],
            )?;
            if n == 0 {
                return Ok(None);
            }
            // The task row is now locked by this transaction until it commits, so no other
            // fire of this task reads the executions below before this one's are written.
            let mut fired = Fired::default();
            let shards: Vec<Option<&str>> = match f.nodes {
                Some(nodes) => nodes.iter().map(|n| Some(n.as_str())).collect(),
                None => vec![None],
            };
            let total = shards.len() as i64;
            for (i, node) in shards.into_iter().enumerate() {
                let live = c.query(
                    &format!("SELECT id, status FROM executions WHERE task_id = ? AND {} \
                     AND (? IS NULL OR pin_node = ?) ORDER BY id", status_in("", &live())),
                    &[f.task.0.into(), node.into(), node.into()],
                )?;
                let serial = match f.overlap {
                    Overlap::Allow => false,
                    Overlap::Queue if live.is_empty() => true,
                    _ if live.is_empty() => false,
                    Overlap::Forbid => {
                        fired.skipped += 1;
                        continue;
                    }
                    Overlap::Queue => {
                        // At most one waits: one not started yet is already waiting.
                        if live.iter().any(|r| status_of(&r[1]).ok() == Some(Status::Pending)) {
                            fired.skipped += 1;
                            continue;
                        }
                        true
                    }
                    Overlap::Replace => {
                        for r in &live {
                            let id = ExecutionId(r[0].i().ok_or_else(|| bad("id"))?);
                            if let CancelOutcome::Cancelled { was, attempt, .. } =
                                Self::cancel_in(c, id, "cancelled: replaced by a newer cron fire (overlap = replace)", now)?
                            {
                                fired.cancelled.push((id, attempt, was));
                            }
                        }
                        false
                    }
                };
                let id = Self::insert_execution(c, f.task, now, f.deadline_ms, now)?;
                if node.is_some() || serial {
                    c.exec(
                        "UPDATE executions SET pin_node = ?, shard_index = ?, shard_total = ?, serial = ? WHERE id = ?",
                        &[node.into(), (i as i64).into(), if node.is_some() { total } else { 1 }.into(),
                          i64::from(serial).into(), id.0.into()],
                    )?;
                }
                fired.created.push(id);
            }
            if fired.skipped > 0 {
                c.exec(
                    "UPDATE tasks SET skipped_fires = skipped_fires + ? WHERE id = ?",
                    &[i64::from(fired.skipped).into(), f.task.0.into()],
                )?;
            }
            Ok(Some(fired))
        })
    }

    fn skipped_fires(&self) -> Result<Vec<(TaskId, String, i64)>> {
        self.tx(|c| {
            let rows = c.query(
                "SELECT id, name, skipped_fires FROM tasks WHERE skipped_fires > 0 AND deleted = 0 ORDER BY id",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    Ok((
                        TaskId(r[0].i().ok_or_else(|| bad("id"))?),
                        r[1].s().unwrap_or_default(),
                        r[2].i().unwrap_or(0),
                    ))
                })
                .collect()
        })
    }

    fn skip_cron(&self, task: TaskId, expected: i64, next: Option<i64>) -> Result<bool> {
        self.tx(|c| {
            c.exec(
                "UPDATE tasks SET next_fire_at = ? WHERE id = ? AND next_fire_at = ?",
                &[next.into(), task.0.into(), expected.into()],
            )
            .map(|n| n == 1)
        })
    }

    fn get_execution(&self, id: ExecutionId) -> Result<Option<ExecutionRow>> {
        self.tx(|c| Self::load_execution(c, id))
    }

    fn list_executions(
        &self,
        task: Option<TaskId>,
        status: Option<Status>,
        limit: u32,
        before: Option<ExecutionId>,
    ) -> Result<Vec<ExecutionRow>> {
        self.tx(|c| {
            let st = status.map(Status::as_str);
            let rows = c.query(
                &format!("SELECT {EXEC_COLS} FROM executions WHERE (? IS NULL OR task_id = ?) AND (? IS NULL OR status = ?) \
                          AND id < ? ORDER BY id DESC LIMIT ?"),
                &[task.map(|t| t.0).into(), task.map(|t| t.0).into(), st.into(), st.into(),
                  before.map_or(i64::MAX, |b| b.0).into(), i64::from(limit).into()],
            )?;
            rows.iter().map(|r| rows::execution(r)).collect()
        })
    }

    fn set_node(&self, id: ExecutionId, attempt: Attempt, node: &str) -> Result<()> {
        self.tx(|c| {
            c.exec(
                &format!(
                    "UPDATE executions SET node = ? WHERE id = ? AND attempt = ? AND {}",
                    status_in("", HELD)
                ),
                &[node.into(), id.0.into(), i64::from(attempt.0).into()],
            )
            .map(|_| ())
        })
    }

    fn claim_due_in(
        &self,
        now: i64,
        limit: u32,
        node: &str,
        path: DeliveryPath,
        pool: Option<&str>,
    ) -> Result<Vec<Claimed>> {
        // A pulling node (pool given) takes unpinned work and work pinned to itself.
        let pin = pool.map(|_| node);
        let claim = CLAIM.update(
            "node = ?, heartbeat_at = ?, updated_at = ?, deadline_at = ? + timeout_ms",
            "id = ? AND attempt = ?",
        )?;
        self.tx(|c| {
            let candidates = c.query(
                &format!("SELECT {CLAIM_COLS} FROM executions e JOIN tasks t ON t.id = e.task_id \
                 WHERE e.path = ? AND (? IS NULL OR e.pool = ?) AND (? IS NULL OR e.pin_node IS NULL OR e.pin_node = ?) \
                 AND {} AND e.due_at <= ? AND {} ORDER BY e.due_at, e.id LIMIT ?", status_is("e", Status::Pending), waits_for_none()),
                &[path.as_str().into(), pool.into(), pool.into(), pin.into(), pin.into(), now.into(), i64::from(limit).into()],
            )?;
            let mut out = Vec::new();
            for r in candidates {
                // Any error rolls the whole claim back, so the row is read before it is won.
                let claimed = rows::claimed(&r, now)?;
                // The compare-and-set that makes a claim exclusive across schedulers: the
                // UPDATE re-reads the row under its lock, so a row another scheduler claimed
                // since our SELECT no longer matches.
                let won = c.exec(
                    &claim,
                    &[node.into(), now.into(), now.into(), now.into(), claimed.id.0.into(),
                      i64::from(claimed.attempt.0).into()],
                )?;
                if won == 1 {
                    out.push(claimed);
                }
            }
            Ok(out)
        })
    }

    fn unclaim(&self, id: ExecutionId, attempt: Attempt, now: i64) -> Result<bool> {
        self.tx(|c| {
            c.exec(
                &UNCLAIM.update("node = NULL, updated_at = ?", "id = ? AND attempt = ?")?,
                &[now.into(), id.0.into(), i64::from(attempt.0).into()],
            )
            .map(|n| n == 1)
        })
    }

    fn mark_running(
        &self,
        items: &[(ExecutionId, Attempt)],
        node: Option<&str>,
        now: i64,
        heartbeat_at: i64,
    ) -> Result<u64> {
        let start = START.update(
            "node = COALESCE(?, node), started_at = COALESCE(started_at, ?), heartbeat_at = ?, updated_at = ?",
            "id = ? AND attempt = ?",
        )?;
        self.tx(|c| {
            let mut n = 0;
            for (id, attempt) in items {
                n += c.exec(
                    &start,
                    &[
                        node.into(),
                        now.into(),
                        heartbeat_at.into(),
                        now.into(),
                        id.0.into(),
                        i64::from(attempt.0).into(),
                    ],
                )?;
            }
            Ok(n)
        })
    }

    fn heartbeat_runs(&self, items: &[(ExecutionId, Attempt)], at: i64) -> Result<u64> {
        self.tx(|c| {
            let mut n = 0;
            for (id, attempt) in items {
                n += c.exec(
                    &format!("UPDATE executions SET heartbeat_at = ? WHERE id = ? AND attempt = ? AND {}", status_in("", HELD)),
                    &[at.into(), id.0.into(), i64::from(attempt.0).into()],
                )?;
            }
            Ok(n)
        })
    }

    fn unstarted(
        &self,
        path: DeliveryPath,
        node: &str,
        claimed_before: i64,
        limit: u32,
    ) -> Result<Vec<(ExecutionId, Attempt)>> {
        self.tx(|c| {
            let rows = c.query(
                &format!(
                    "SELECT id, attempt FROM executions WHERE path = ? AND {} AND node = ? \
                 AND updated_at < ? ORDER BY id LIMIT ?",
                    status_is("", Status::Dispatched)
                ),
                &[
                    path.as_str().into(),
                    node.into(),
                    claimed_before.into(),
                    i64::from(limit).into(),
                ],
            )?;
            rows.iter()
                .map(|r| {
                    Ok((
                        ExecutionId(r[0].i().ok_or_else(|| bad("id"))?),
                        Attempt(r[1].i().unwrap_or(1) as u32),
                    ))
                })
                .collect()
        })
    }

    fn requeue(&self, id: ExecutionId, attempt: Attempt, error: &str, now: i64) -> Result<bool> {
        self.requeue_in(id, attempt, None, error, now)
    }

    fn requeue_held(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        node: &str,
        error: &str,
        now: i64,
    ) -> Result<bool> {
        self.requeue_in(id, attempt, Some(node), error, now)
    }

    fn unstarted_attempts(&self, id: ExecutionId) -> Result<u32> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT COUNT(*) FROM attempts WHERE execution_id = ? AND {} AND started_at IS NULL AND error LIKE ?", status_is("", Status::Lost)),
                &[id.0.into(), format!("{NOT_STARTED}%").into()],
            )?;
            Ok(rows.first().and_then(|r| r[0].i()).unwrap_or(0) as u32)
        })
    }

    fn heartbeat(&self, node: &str, now: i64) -> Result<u64> {
        self.tx(|c| {
            c.exec(
                &format!(
                    "UPDATE executions SET heartbeat_at = ? WHERE node = ? AND {}",
                    status_in("", HELD)
                ),
                &[now.into(), node.into()],
            )
        })
    }

    fn finish(
        &self,
        items: &[(ExecutionId, Attempt, Finish)],
        now: i64,
    ) -> Result<Vec<Option<Status>>> {
        self.tx(|c| {
            items
                .iter()
                .map(|(id, attempt, fin)| Self::finish_in(c, *id, *attempt, fin, now))
                .collect()
        })
    }

    fn cancel(&self, id: ExecutionId, now: i64) -> Result<CancelOutcome> {
        self.tx(|c| Self::cancel_in(c, id, "cancelled", now))
    }

    fn append_logs(
        &self,
        chunks: &[(ExecutionId, Attempt, u64, &str, &str)],
        now: i64,
    ) -> Result<()> {
        let ignore = self.b.insert_ignore();
        let sql = format!(
            "{ignore} INTO log_chunks (execution_id, attempt, run_seq, stream, data, created_at) VALUES (?, ?, ?, ?, ?, ?)"
        );
        self.tx(|c| {
            for (id, attempt, seq, stream, data) in chunks {
                c.exec(
                    &sql,
                    &[
                        id.0.into(),
                        i64::from(attempt.0).into(),
                        (*seq as i64).into(),
                        (*stream).into(),
                        (*data).into(),
                        now.into(),
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn logs_after(&self, id: ExecutionId, after_seq: i64, limit: u32) -> Result<Vec<LogRow>> {
        // Positions are stable: chunks are only ever appended (ids grow) and deleted with
        // their whole execution.
        let after_seq = after_seq.max(0);
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT {LOG_COLS} FROM log_chunks WHERE execution_id = ? ORDER BY id LIMIT ? OFFSET ?"),
                &[id.0.into(), i64::from(limit).into(), after_seq.into()],
            )?;
            Ok(rows::logs(&rows, after_seq))
        })
    }

    fn logs_continue(&self, id: ExecutionId, last: &LogRow, limit: u32) -> Result<Vec<LogRow>> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT {LOG_COLS} FROM log_chunks WHERE execution_id = ? AND id > ? ORDER BY id LIMIT ?"),
                &[id.0.into(), last.chunk_id.into(), i64::from(limit).into()],
            )?;
            Ok(rows::logs(&rows, last.seq))
        })
    }

    fn promote_retries(&self, now: i64) -> Result<u64> {
        self.tx(|c| {
            c.exec(
                &PROMOTE.update("attempt = attempt + 1, node = NULL, exit_code = NULL, `signal` = NULL, \
                 result = NULL, result_error = NULL, resources = NULL, started_at = NULL, updated_at = ?", "due_at <= ?")?,
                &[now.into(), now.into()],
            )
        })
    }

    fn silent(&self, silent_before: i64, now: i64, limit: u32) -> Result<Vec<Silent>> {
        self.tx(|c| {
            let rows = c.query(
                &format!(
                    "SELECT {SILENT_COLS} FROM executions WHERE {} \
                 AND (heartbeat_at IS NULL OR heartbeat_at < ?) ORDER BY id LIMIT ?",
                    status_in("", HELD)
                ),
                &[silent_before.into(), i64::from(limit).into()],
            )?;
            rows.iter().map(|r| rows::silent(r, now)).collect()
        })
    }

    fn fail_unplaced(
        &self,
        path: DeliveryPath,
        due_before: i64,
        error: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<ExecutionId>> {
        let fail = FAIL_UNPLACED.update(
            "error = ?, finished_at = ?, updated_at = ?",
            "id = ? AND attempt = ?",
        )?;
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT e.id, e.attempt, t.spec FROM executions e JOIN tasks t ON t.id = e.task_id \
                 WHERE e.path = ? AND {} AND e.due_at < ? AND {} ORDER BY e.id LIMIT ?", status_is("e", Status::Pending), waits_for_none()),
                &[path.as_str().into(), due_before.into(), i64::from(limit).into()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let id = r[0].i().ok_or_else(|| bad("id"))?;
                let n = c.exec(
                    &fail,
                    &[error.into(), now.into(), now.into(), id.into(), r[1].clone()],
                )?;
                if n != 1 {
                    continue;
                }
                let spec: Value = r[2].s().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null);
                if let Some(url) = spec.get("callback_url").and_then(Value::as_str) {
                    c.insert(
                        "INSERT INTO outbox (execution_id, url, next_at, created_at) VALUES (?, ?, ?, ?)",
                        &[id.into(), url.into(), now.into(), now.into()],
                    )?;
                }
                out.push(ExecutionId(id));
            }
            Ok(out)
        })
    }

    fn enqueue_callback(&self, id: ExecutionId, url: &str, now: i64) -> Result<()> {
        self.tx(|c| {
            c.insert(
                "INSERT INTO outbox (execution_id, url, next_at, created_at) VALUES (?, ?, ?, ?)",
                &[id.0.into(), url.into(), now.into(), now.into()],
            )?;
            Ok(())
        })
    }

    fn outbox_due(&self, now: i64, limit: u32) -> Result<Vec<OutboxRow>> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT {OUTBOX_COLS} FROM outbox WHERE done = 0 AND next_at <= ? ORDER BY next_at, id LIMIT ?"),
                &[now.into(), i64::from(limit).into()],
            )?;
            Ok(rows.iter().map(|r| rows::outbox(r)).collect())
        })
    }

    fn outbox_result(
        &self,
        id: i64,
        delivered: bool,
        error: Option<&str>,
        next_at: Option<i64>,
    ) -> Result<()> {
        self.tx(|c| {
            // done: 1 delivered, 2 given up.
            let done = if delivered { 1 } else if next_at.is_none() { 2 } else { 0 };
            c.exec(
                "UPDATE outbox SET attempts = attempts + 1, done = ?, last_error = ?, next_at = ? WHERE id = ?",
                &[i64::from(done).into(), error.into(), next_at.unwrap_or(0).into(), id.into()],
            )?;
            Ok(())
        })
    }

    fn outbox_pending(&self) -> Result<i64> {
        self.tx(|c| {
            Ok(c.query("SELECT COUNT(*) FROM outbox WHERE done = 0", &[])?
                .first()
                .and_then(|r| r[0].i())
                .unwrap_or(0))
        })
    }

    fn purge(&self, finished_before: i64, limit: u32) -> Result<u64> {
        self.tx(|c| {
            let ids = c.query(
                &format!("SELECT e.id FROM executions e WHERE e.finished_at IS NOT NULL AND e.finished_at < ? \
                 AND {} \
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.execution_id = e.id AND o.done = 0) \
                 ORDER BY e.id LIMIT ?", status_in("e", &terminal())),
                &[finished_before.into(), i64::from(limit).into()],
            )?;
            for r in &ids {
                let id = r[0].clone();
                for stmt in [
                    "DELETE FROM log_chunks WHERE execution_id = ?",
                    "DELETE FROM attempts WHERE execution_id = ?",
                    "DELETE FROM outbox WHERE execution_id = ?",
                    "DELETE FROM executions WHERE id = ?",
                ] {
                    c.exec(stmt, std::slice::from_ref(&id))?;
                }
            }
            Ok(ids.len() as u64)
        })
    }

    fn ping(&self) -> Result<()> {
        self.tx(|c| c.query("SELECT 1", &[]).map(|_| ()))
    }

    fn refusing_writes(&self) -> bool {
        if !self.writes.refusing() {
            return false;
        }
        // Nothing else may write for a while (an idle scheduler): try a write the size of a
        // log chunk, at most once a second — a 64 KiB row of execution 0 (ids start at 1),
        // inserted and deleted in one committed transaction. (A one-page write that changed
        // nothing succeeded on a disk that still refused every task.)
        // (The time of the last probe moves only when one runs: swapping it on every call let
        // a /healthz polled more often than once a second starve the probe for good.)
        use std::sync::atomic::Ordering::Relaxed;
        let now = crate::now_ms();
        let last = self.writes.probed_at.load(Relaxed);
        if now - last >= 1_000
            && self
                .writes
                .probed_at
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            let _ = self.probe_write();
        }
        self.writes.refusing()
    }

    fn probe_write(&self) -> Result<()> {
        let filler = " ".repeat(64 << 10);
        self.tx(|c| {
            c.exec(
                "INSERT INTO log_chunks (execution_id, attempt, run_seq, stream, data, created_at) \
                 VALUES (0, 0, 0, 'stderr', ?, 0)",
                &[filler.as_str().into()],
            )?;
            c.exec(
                "DELETE FROM log_chunks WHERE execution_id = 0 AND attempt = 0 AND run_seq = 0",
                &[],
            )
            .map(|_| ())
        })
    }

    fn status_counts(&self) -> Result<Vec<(Status, i64)>> {
        self.tx(|c| {
            let rows = c.query(
                "SELECT status, COUNT(*) FROM executions GROUP BY status",
                &[],
            )?;
            rows.iter()
                .map(|r| Ok((status_of(&r[0])?, r[1].i().unwrap_or(0))))
                .collect()
        })
    }
}

/// A task spec with sealed secret values blanked, for the idempotency comparison.
fn comparable(spec: &Value) -> Value {
    let mut v = spec.clone();
    let blank = |x: &mut Value| {
        if x.as_str().is_some_and(crate::trust::seal::is_sealed) {
            *x = Value::from("sealed");
        }
    };
    if let Some(m) = v
        .pointer_mut("/program/secret_env")
        .and_then(Value::as_object_mut)
    {
        m.values_mut().for_each(blank);
    }
    if let Some(a) = v
        .pointer_mut("/program/variables")
        .and_then(Value::as_array_mut)
    {
        for var in a {
            if let Some(x) = var.get_mut("value") {
                blank(x);
            }
        }
    }
    v
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
