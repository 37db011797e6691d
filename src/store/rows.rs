//! The store's rows: what it hands the scheduler (tasks, executions with their attempts, log
//! chunks, claims, outbox entries) and what it is given (new tasks, attempt outcomes, cron
//! fires), and how a result row is decoded — by column name (`Row`), with each select list
//! (`*_COLS`) next to its decoder. No SQL is run here.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Result, StoreError, V};
use crate::model::{Attempt, DeliveryPath, ExecutionId, Overlap, Status, TaskId};

/// A task as stored: the submitted spec (JSON, as accepted by the intake) plus scheduling state.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub id: TaskId,
    pub name: String,
    pub request_id: Option<String>,
    pub spec: Value,
    pub cron_expr: Option<String>,
    pub next_fire_at: Option<i64>,
    pub paused: bool,
    pub deleted: bool,
    pub created_at: i64,
    /// Cron fires the overlap policy skipped.
    pub skipped_fires: i64,
}

impl TaskRow {
    /// The API shape of a task: its spec with secret values masked, and for cron tasks the
    /// zone and the next fire time in it.
    pub fn to_json(&self) -> Value {
        let mut spec = self.spec.clone();
        // Secret values never leave the store through the API.
        if let Some(secrets) = spec
            .pointer_mut("/program/secret_env")
            .and_then(Value::as_object_mut)
        {
            for v in secrets.values_mut() {
                *v = json!("******");
            }
        }
        if let Some(vars) = spec
            .pointer_mut("/program/variables")
            .and_then(Value::as_array_mut)
        {
            for v in vars.iter_mut().filter(|v| v["secret"] == json!(true)) {
                v["value"] = json!("******");
            }
        }
        let mut out = json!({
            "id": self.id, "name": self.name, "request_id": self.request_id, "spec": spec,
            "next_fire_at": self.next_fire_at, "paused": self.paused, "deleted": self.deleted,
            "created_at": self.created_at,
        });
        if self.cron_expr.is_some() {
            // Stored before zones existed: read in UTC, as they were.
            let zone = self
                .spec
                .pointer("/schedule/timezone")
                .and_then(Value::as_str)
                .unwrap_or("UTC");
            let overlap = self
                .spec
                .pointer("/schedule/overlap")
                .and_then(Value::as_str)
                .unwrap_or("forbid");
            let local = crate::cron::zone(zone)
                .ok()
                .zip(self.next_fire_at)
                .and_then(|(tz, at)| crate::cron::local_rfc3339(at, tz));
            out["timezone"] = json!(zone);
            out["next_fire_local"] = json!(local);
            out["overlap"] = json!(overlap);
            out["skipped_fires"] = json!(self.skipped_fires);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRow {
    pub attempt: u32,
    pub status: Status,
    pub node: Option<String>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionRow {
    pub id: ExecutionId,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub status: Status,
    pub node: Option<String>,
    pub due_at: i64,
    pub deadline_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub result: Option<Value>,
    pub result_error: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub attempts: Vec<AttemptRow>,
    /// What the last finished attempt used and what bounded it (the runner's `Resources`).
    pub resources: Option<Value>,
}

impl ExecutionRow {
    /// The API shape of an execution (also the callback body).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "task_id": self.task_id, "attempt": self.attempt, "status": self.status,
            "node": self.node, "exit_code": self.exit_code, "signal": self.signal,
            "result": self.result, "result_error": self.result_error, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "error": self.error,
            "attempts": self.attempts, "resources": self.resources,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    /// Position in the execution's log, from 1, across attempts (`after_seq` in the API).
    pub seq: i64,
    /// The store's own id of the chunk: where `logs_continue` goes on without counting again.
    pub chunk_id: i64,
    pub attempt: u32,
    pub stream: String,
    pub data: String,
}

/// A new task. `first_due_at` creates its first execution at once (a `once` task); `cron`
/// carries the expression and its first fire time.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub name: String,
    pub request_id: Option<String>,
    pub spec: Value,
    pub cron: Option<(String, i64)>,
    pub first_due_at: Option<i64>,
    pub deadline_ms: Option<i64>,
    /// The delivery path (`target.path`) of its executions.
    pub path: DeliveryPath,
    /// The target pool (`target.pool`, "" for none).
    pub pool: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    pub task_id: TaskId,
    pub execution_id: Option<ExecutionId>,
    /// The request id was seen before: nothing was created, these are the first call's ids.
    pub existed: bool,
    /// With `existed`: the first call's task spec differs from this call's (same request id,
    /// another body), which the API answers with 409 instead of the first call's ids.
    pub differs: bool,
}

/// One cron fire (see `Store::fire_cron`).
#[derive(Debug, Clone)]
pub struct Fire<'a> {
    pub task: TaskId,
    /// The fire time as read (the compare-and-set's expected value).
    pub expected: i64,
    pub next: Option<i64>,
    pub overlap: Overlap,
    /// Broadcast: one execution per node, pinned and told its shard; the policy applies per node.
    pub nodes: Option<&'a [String]>,
    pub deadline_ms: Option<i64>,
}

/// What a cron fire did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fired {
    pub created: Vec<ExecutionId>,
    /// Executions (or broadcast shards) not created because of the overlap policy.
    pub skipped: u32,
    /// Executions `replace` cancelled: their nodes must be told, their callbacks queued.
    pub cancelled: Vec<(ExecutionId, Attempt, Status)>,
}

/// An execution claimed for dispatch, with the spec of its task.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: ExecutionId,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub due_at: i64,
    pub spec: Value,
    /// Broadcast executions are pinned to one node and told their shard.
    pub pin_node: Option<String>,
    pub shard_index: u32,
    pub shard_total: u32,
}

/// How an attempt ended, as reported by its node.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    pub status: Option<Status>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub result: Option<Map<String, Value>>,
    pub result_error: Option<String>,
    pub error: Option<String>,
    /// What the attempt used and what bounded it (JSON object), when its node said.
    pub resources: Option<Value>,
    /// Set when the attempt failed and the retry policy allows another: the next attempt is due
    /// then (the execution waits in `retry_wait`).
    pub retry_at: Option<i64>,
    /// Queue a callback to this URL when the execution reaches its terminal state.
    pub callback_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    Cancelled {
        was: Status,
        node: Option<String>,
        attempt: Attempt,
    },
    AlreadyFinal(Status),
    NotFound,
}

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub execution_id: ExecutionId,
    pub url: String,
    pub attempts: i64,
}

/// An execution whose node went silent, for the sweeper to retry or end.
#[derive(Debug, Clone)]
pub struct Silent {
    pub id: ExecutionId,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub status: Status,
    pub deadline_passed: bool,
    /// The node that held it.
    pub node: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// The columns [`task`] decodes.
pub(super) const TASK_COLS: &str = "id, name, request_id, spec, cron_expr, next_fire_at, paused, \
                                    deleted, created_at, skipped_fires";
/// The columns [`execution`] decodes.
pub(super) const EXEC_COLS: &str =
    "id, task_id, attempt, status, node, due_at, deadline_at, exit_code, `signal`, result, \
     result_error, error, created_at, started_at, finished_at, resources";
/// The columns [`attempt`] decodes (of `attempts`).
pub(super) const ATTEMPT_COLS: &str =
    "attempt, status, node, exit_code, `signal`, error, started_at, finished_at";
/// The columns [`logs`] decodes (of `log_chunks`).
pub(super) const LOG_COLS: &str = "id, attempt, stream, data";
/// The columns [`claimed`] decodes (executions `e` joined with their task `t`).
pub(super) const CLAIM_COLS: &str =
    "e.id, e.task_id, e.attempt, e.due_at, t.spec, e.pin_node, e.shard_index, e.shard_total";
/// The columns [`silent`] decodes.
pub(super) const SILENT_COLS: &str = "id, task_id, attempt, status, deadline_at, node";
/// The columns [`outbox`] decodes.
pub(super) const OUTBOX_COLS: &str = "id, execution_id, url, attempts";

pub(super) fn bad(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected row shape: {what}"))
}

/// A status as stored.
pub(super) fn status_of(v: &V) -> Result<Status> {
    v.s()
        .and_then(|s| Status::parse(&s))
        .ok_or_else(|| bad("status"))
}

/// One result row, read by column name. `cols` is the statement's select list, so a decoder
/// does not depend on where a column sits in it; a column missing from the list reads as NULL.
#[derive(Clone, Copy)]
pub(super) struct Row<'a> {
    cols: &'a str,
    vals: &'a [V],
}

impl<'a> Row<'a> {
    pub fn new(cols: &'a str, vals: &'a [V]) -> Row<'a> {
        Row { cols, vals }
    }

    fn get(&self, name: &str) -> Option<&'a V> {
        self.cols
            .split(',')
            .map(|c| {
                let c = c.trim();
                c.rsplit('.').next().unwrap_or(c).trim_matches('`')
            })
            .position(|c| c == name)
            .and_then(|i| self.vals.get(i))
    }

    pub fn i(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(V::i)
    }

    pub fn s(&self, name: &str) -> Option<String> {
        self.get(name).and_then(V::s)
    }

    /// A column that must be there (an id).
    pub fn id(&self, name: &str) -> Result<i64> {
        self.i(name).ok_or_else(|| bad(name))
    }

    pub fn status(&self, name: &str) -> Result<Status> {
        self.get(name).map_or_else(|| Err(bad(name)), status_of)
    }

    pub fn attempt(&self) -> Attempt {
        Attempt(self.i("attempt").unwrap_or(1) as u32)
    }

    /// A JSON column that must parse (a task spec).
    pub fn json(&self, name: &str) -> Result<Value> {
        let text = self.s(name).ok_or_else(|| bad(name))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Internal(format!("task {name}: {e}")))
    }

    /// A JSON column read leniently (a result: unreadable is absent).
    pub fn json_opt(&self, name: &str) -> Option<Value> {
        self.s(name).and_then(|s| serde_json::from_str(&s).ok())
    }
}

/// Rows of `SELECT LOG_COLS FROM log_chunks`, numbered on after `after_seq`.
pub(super) fn logs(rows: &[Vec<V>], after_seq: i64) -> Vec<LogRow> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| (r, after_seq.saturating_add(1 + i as i64)))
        .map(|(r, seq)| {
            let r = Row::new(LOG_COLS, r);
            LogRow {
                seq,
                chunk_id: r.i("id").unwrap_or(0),
                attempt: r.i("attempt").unwrap_or(0) as u32,
                stream: r.s("stream").unwrap_or_default(),
                data: r.s("data").unwrap_or_default(),
            }
        })
        .collect()
}

pub(super) fn task(r: &[V]) -> Result<TaskRow> {
    let r = Row::new(TASK_COLS, r);
    Ok(TaskRow {
        id: TaskId(r.id("id")?),
        name: r.s("name").unwrap_or_default(),
        request_id: r.s("request_id"),
        spec: r.json("spec")?,
        cron_expr: r.s("cron_expr"),
        next_fire_at: r.i("next_fire_at"),
        paused: r.i("paused") == Some(1),
        deleted: r.i("deleted") == Some(1),
        created_at: r.i("created_at").unwrap_or(0),
        skipped_fires: r.i("skipped_fires").unwrap_or(0),
    })
}

/// An execution without its attempts (`load_execution` adds them).
pub(super) fn execution(r: &[V]) -> Result<ExecutionRow> {
    let r = Row::new(EXEC_COLS, r);
    Ok(ExecutionRow {
        id: ExecutionId(r.id("id")?),
        task_id: TaskId(r.id("task_id")?),
        attempt: r.attempt(),
        status: r.status("status")?,
        node: r.s("node"),
        due_at: r.i("due_at").unwrap_or(0),
        deadline_at: r.i("deadline_at"),
        exit_code: r.i("exit_code"),
        signal: r.i("signal"),
        result: r.json_opt("result"),
        result_error: r.s("result_error"),
        error: r.s("error"),
        created_at: r.i("created_at").unwrap_or(0),
        started_at: r.i("started_at"),
        finished_at: r.i("finished_at"),
        attempts: Vec::new(),
        resources: r.json_opt("resources"),
    })
}

pub(super) fn attempt(r: &[V]) -> Result<AttemptRow> {
    let r = Row::new(ATTEMPT_COLS, r);
    Ok(AttemptRow {
        attempt: r.i("attempt").unwrap_or(0) as u32,
        status: r.status("status")?,
        node: r.s("node"),
        exit_code: r.i("exit_code"),
        signal: r.i("signal"),
        error: r.s("error"),
        started_at: r.i("started_at"),
        finished_at: r.i("finished_at"),
    })
}

/// A claimed execution, `now` standing in for a missing due time.
pub(super) fn claimed(r: &[V], now: i64) -> Result<Claimed> {
    let r = Row::new(CLAIM_COLS, r);
    Ok(Claimed {
        id: ExecutionId(r.id("id")?),
        task_id: TaskId(r.i("task_id").unwrap_or(0)),
        attempt: r.attempt(),
        due_at: r.i("due_at").unwrap_or(now),
        spec: r.json("spec")?,
        pin_node: r.s("pin_node"),
        shard_index: r.i("shard_index").unwrap_or(0) as u32,
        shard_total: r.i("shard_total").unwrap_or(1).max(1) as u32,
    })
}

pub(super) fn silent(r: &[V], now: i64) -> Result<Silent> {
    let r = Row::new(SILENT_COLS, r);
    Ok(Silent {
        id: ExecutionId(r.id("id")?),
        task_id: TaskId(r.i("task_id").unwrap_or(0)),
        attempt: r.attempt(),
        status: r.status("status")?,
        deadline_passed: r.i("deadline_at").is_some_and(|d| d <= now),
        node: r.s("node"),
    })
}

pub(super) fn outbox(r: &[V]) -> OutboxRow {
    let r = Row::new(OUTBOX_COLS, r);
    OutboxRow {
        id: r.i("id").unwrap_or(0),
        execution_id: ExecutionId(r.i("execution_id").unwrap_or(0)),
        url: r.s("url").unwrap_or_default(),
        attempts: r.i("attempts").unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_by_column_name() {
        let vals = [V::I(7), V::S("x".into()), V::Null];
        let r = Row::new("e.id, `signal`, node", &vals);
        assert_eq!(r.i("id"), Some(7));
        assert_eq!(r.s("signal").as_deref(), Some("x"));
        assert_eq!(r.s("node"), None);
        assert_eq!(r.s("missing"), None);
        assert!(r.id("missing").is_err());
    }
}
