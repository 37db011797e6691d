//! Durable state of the scheduler: tasks, executions (with their attempts), log chunks and the
//! callback outbox. `Store` is the interface the scheduler uses; `SqlStore` implements it once,
//! in SQL both back ends understand, over a small `Backend` (SQLite or MySQL/MariaDB) that only
//! runs statements. Every state change is a compare-and-set on (status, attempt).

mod mysql;
mod sql;
mod sqlite;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::model::{Attempt, DeliveryPath, ExecutionId, Overlap, Status, TaskId};
use sql::{status_in, status_is, Cas, EXEC_COLS, HELD, TASK_COLS};

pub use self::mysql::Mysql;
pub use self::sqlite::Sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
    /// A transaction lost a lock conflict and may simply be run again (handled inside the
    /// back end; callers see `Unavailable` if it keeps happening).
    #[error("store busy: {0}")]
    Retry(String),
    #[error("invalid store URL {0:?}: use sqlite:PATH or mysql://user:pass@host:port/db")]
    BadUrl(String),
    /// An INSERT hit a unique key (MySQL 1062, SQLite `SQLITE_CONSTRAINT_UNIQUE`): the row
    /// exists already. Only `create_task` expects it (a repeated `request_id`).
    #[error("duplicate key: {0}")]
    Duplicate(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The start of the error recorded for an attempt that provably never started (requeued by the
/// scheduler): such attempts are free, the retry budget counts only the others.
pub const NOT_STARTED: &str = "not started: ";

/// A value bound to or read from a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum V {
    Null,
    I(i64),
    S(String),
}

impl V {
    pub fn i(&self) -> Option<i64> {
        match self {
            V::I(i) => Some(*i),
            V::S(s) => s.parse().ok(),
            V::Null => None,
        }
    }
    pub fn s(&self) -> Option<String> {
        match self {
            V::S(s) => Some(s.clone()),
            V::I(i) => Some(i.to_string()),
            V::Null => None,
        }
    }
}

impl From<i64> for V {
    fn from(v: i64) -> V {
        V::I(v)
    }
}
impl From<&str> for V {
    fn from(v: &str) -> V {
        V::S(v.to_owned())
    }
}
impl From<String> for V {
    fn from(v: String) -> V {
        V::S(v)
    }
}
impl<T: Into<V>> From<Option<T>> for V {
    fn from(v: Option<T>) -> V {
        v.map_or(V::Null, Into::into)
    }
}

/// One connection inside a transaction.
pub trait Conn {
    /// Runs a statement; returns the number of rows it changed.
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64>;
    /// Runs an INSERT; returns the new row id.
    fn insert(&mut self, sql: &str, params: &[V]) -> Result<i64>;
    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>>;
}

/// What differs between the SQL back ends.
pub trait Backend: Send + Sync {
    /// Runs `f` in one transaction: committed when it returns Ok, rolled back otherwise.
    fn tx(&self, f: &mut dyn FnMut(&mut dyn Conn) -> Result<()>) -> Result<()>;
    /// Applies the migrations not applied yet (under a lock where several processes may race).
    fn migrate(&self) -> Result<Vec<u32>>;
    /// `INSERT OR IGNORE` (SQLite) / `INSERT IGNORE` (MySQL).
    fn insert_ignore(&self) -> &'static str;
    /// The suffix that makes a SELECT a locking read of the latest committed rows
    /// (`" FOR UPDATE"` on MySQL; empty on SQLite, whose writers are serialised anyway).
    fn locking_read(&self) -> &'static str;
    fn describe(&self) -> String;
}

/// Migrations of one back end, in order: (version, sql).
pub fn migrations(dir: &str) -> Vec<(u32, &'static str)> {
    match dir {
        "sqlite" => vec![
            (1, include_str!("../../sql/sqlite/0001_init.sql")),
            (2, include_str!("../../sql/sqlite/0002_target_path.sql")),
            (3, include_str!("../../sql/sqlite/0003_target_pool.sql")),
            (4, include_str!("../../sql/sqlite/0004_broadcast.sql")),
            (5, include_str!("../../sql/sqlite/0005_cron_overlap.sql")),
            (6, include_str!("../../sql/sqlite/0006_run_resources.sql")),
        ],
        _ => vec![
            (1, include_str!("../../sql/mysql/0001_init.sql")),
            (2, include_str!("../../sql/mysql/0002_target_path.sql")),
            (3, include_str!("../../sql/mysql/0003_target_pool.sql")),
            (4, include_str!("../../sql/mysql/0004_broadcast.sql")),
            (5, include_str!("../../sql/mysql/0005_cron_overlap.sql")),
            (6, include_str!("../../sql/mysql/0006_run_resources.sql")),
        ],
    }
}

/// Splits a migration file into statements (a `;` at the end of a line ends one).
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let t = line.trim();
        if t.starts_with("--") || t.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if t.ends_with(';') {
            out.push(cur.trim().trim_end_matches(';').to_owned());
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// Opens the store named by a URL: `sqlite:PATH` or `mysql://user:pass@host:port/db`.
/// Checks a store URL without connecting: what `open` would refuse before any I/O.
///
/// # Errors
/// `BadUrl` for anything but `sqlite:PATH` or a parseable `mysql://…/db` URL.
pub fn check_url(url: &str) -> Result<()> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        if path.trim_start_matches("//").is_empty() {
            return Err(StoreError::BadUrl(url.to_owned()));
        }
        Ok(())
    } else if url.starts_with("mysql://") {
        self::mysql::opts(url).map(|_| ())
    } else {
        Err(StoreError::BadUrl(url.to_owned()))
    }
}

/// Creates the store's database when it is missing (MySQL; SQLite creates its file when it
/// opens it); true when it was created. What `etask migrate` does first.
///
/// # Errors
/// As `open`; also when the MySQL user may not create databases.
pub fn create_database(url: &str) -> Result<bool> {
    check_url(url)?;
    if url.starts_with("mysql://") {
        self::mysql::create_database(url)
    } else {
        Ok(false)
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

pub fn open(url: &str) -> Result<SqlStore> {
    let backend: Box<dyn Backend> = if let Some(path) = url.strip_prefix("sqlite:") {
        Box::new(Sqlite::open(path.trim_start_matches("//"))?)
    } else if url.starts_with("mysql://") {
        Box::new(Mysql::open(url)?)
    } else {
        return Err(StoreError::BadUrl(url.to_owned()));
    };
    Ok(SqlStore { b: backend })
}

// ---------------------------------------------------------------------------------------------
// Domain rows

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

/// The scheduler's view of durable state. Both back ends pass the same suite (tests/store.rs).
pub trait Store: Send + Sync {
    fn migrate(&self) -> Result<Vec<u32>>;
    fn describe(&self) -> String;
    fn create_task(&self, t: &NewTask, now: i64) -> Result<Created>;
    fn get_task(&self, id: TaskId) -> Result<Option<TaskRow>>;
    fn list_tasks(
        &self,
        name: Option<&str>,
        limit: u32,
        before: Option<TaskId>,
    ) -> Result<Vec<TaskRow>>;
    fn set_paused(&self, id: TaskId, paused: bool) -> Result<bool>;
    /// Marks the task deleted and cancels its executions that have not started.
    fn delete_task(&self, id: TaskId, now: i64) -> Result<bool>;
    fn add_execution(
        &self,
        task: TaskId,
        due_at: i64,
        deadline_ms: Option<i64>,
        now: i64,
    ) -> Result<ExecutionId>;
    /// Cron tasks due at `now`.
    /// One pending execution per node, each pinned to it and told its shard (broadcast).
    fn add_broadcast(
        &self,
        task: TaskId,
        nodes: &[String],
        deadline_ms: Option<i64>,
        now: i64,
    ) -> Result<Vec<ExecutionId>>;
    fn due_cron(&self, now: i64, limit: u32) -> Result<Vec<TaskRow>>;
    /// Moves a cron task's fire time from `expected` to `next` (the compare-and-set that makes
    /// one scheduler fire each time) and, in the same transaction, applies the overlap policy
    /// to the task's executions that have not ended (per node for a broadcast) and creates the
    /// executions of this fire. `None` if another scheduler fired it first.
    fn fire_cron(&self, f: &Fire<'_>, now: i64) -> Result<Option<Fired>>;
    /// Tasks whose overlap policy skipped fires: (id, name, skipped fires).
    fn skipped_fires(&self) -> Result<Vec<(TaskId, String, i64)>>;
    /// Moves a cron task's fire time on without firing (missed fires with `cron_missed = "skip"`).
    fn skip_cron(&self, task: TaskId, expected: i64, next: Option<i64>) -> Result<bool>;
    fn get_execution(&self, id: ExecutionId) -> Result<Option<ExecutionRow>>;
    fn list_executions(
        &self,
        task: Option<TaskId>,
        status: Option<Status>,
        limit: u32,
        before: Option<ExecutionId>,
    ) -> Result<Vec<ExecutionRow>>;
    /// Claims up to `limit` pending executions due by `now` for `node` (compare-and-set: two
    /// schedulers never claim the same attempt).
    fn claim_due(
        &self,
        now: i64,
        limit: u32,
        node: &str,
        path: DeliveryPath,
    ) -> Result<Vec<Claimed>> {
        self.claim_due_in(now, limit, node, path, None)
    }
    /// `claim_due` limited to one target pool (pulling executors claim their pool's work).
    fn claim_due_in(
        &self,
        now: i64,
        limit: u32,
        node: &str,
        path: DeliveryPath,
        pool: Option<&str>,
    ) -> Result<Vec<Claimed>>;
    /// Records which node an attempt was actually handed to (paths that choose per dispatch).
    fn set_node(&self, id: ExecutionId, attempt: Attempt, node: &str) -> Result<()>;
    /// Puts a claimed execution back (the node refused it).
    fn unclaim(&self, id: ExecutionId, attempt: Attempt, now: i64) -> Result<bool>;
    /// Marks dispatched attempts as running at `now` (on `node` when given: paths where the
    /// node that took the work is known only when it starts it), their heartbeat dated
    /// `heartbeat_at`; returns how many moved.
    fn mark_running(
        &self,
        items: &[(ExecutionId, Attempt)],
        node: Option<&str>,
        now: i64,
        heartbeat_at: i64,
    ) -> Result<u64>;
    /// Records that `node` is still alive for everything it holds.
    fn heartbeat(&self, node: &str, now: i64) -> Result<u64>;
    /// Records that these attempts are still alive (a node that lists what it runs), dated
    /// `at`.
    fn heartbeat_runs(&self, items: &[(ExecutionId, Attempt)], at: i64) -> Result<u64>;
    /// Dispatched attempts of `path` still held by the placeholder `node` (no node started
    /// them) that were claimed before `claimed_before`.
    fn unstarted(
        &self,
        path: DeliveryPath,
        node: &str,
        claimed_before: i64,
        limit: u32,
    ) -> Result<Vec<(ExecutionId, Attempt)>>;
    /// An attempt that was dispatched but never started (its dispatch expired or was lost in
    /// transit) is recorded as `lost` with `error`, and the execution goes back to `pending`
    /// under the next attempt number (its due time unchanged, so at once and ahead of newer
    /// work): the old dispatch can never run, the new one is fenced from it. False when the
    /// attempt is no longer the dispatched one.
    fn requeue(&self, id: ExecutionId, attempt: Attempt, error: &str, now: i64) -> Result<bool>;
    /// [`Store::requeue`], only while `node` still holds the attempt (recovery of a crashed
    /// node's unstarted attempts must not touch one that moved on to another node).
    fn requeue_held(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        node: &str,
        error: &str,
        now: i64,
    ) -> Result<bool>;
    /// How many attempts of an execution were recorded as never started (their error begins
    /// with [`NOT_STARTED`]): they do not count against the retry budget.
    fn unstarted_attempts(&self, id: ExecutionId) -> Result<u32>;
    /// Ends attempts, in one transaction; for each, the new status, or `None` when the report
    /// is stale (older attempt, or the execution already final).
    fn finish(
        &self,
        items: &[(ExecutionId, Attempt, Finish)],
        now: i64,
    ) -> Result<Vec<Option<Status>>>;
    fn cancel(&self, id: ExecutionId, now: i64) -> Result<CancelOutcome>;
    /// Stores log chunks `(execution, attempt, run_seq, stream, data)`; a chunk already stored
    /// (same execution, attempt and run_seq) is ignored, so a resent batch is harmless.
    fn append_logs(
        &self,
        chunks: &[(ExecutionId, Attempt, u64, &str, &str)],
        now: i64,
    ) -> Result<()>;
    /// The chunks of an execution after position `after_seq` (0 = from the start), in the
    /// order they were stored, numbered from 1 per execution.
    fn logs_after(&self, id: ExecutionId, after_seq: i64, limit: u32) -> Result<Vec<LogRow>>;
    /// The chunks after `last` (a row this reader already has), numbered on from its `seq`:
    /// what a follower polls, so it never counts the chunks it already read.
    fn logs_continue(&self, id: ExecutionId, last: &LogRow, limit: u32) -> Result<Vec<LogRow>>;
    /// `retry_wait` executions whose backoff is over become `pending` with the next attempt.
    fn promote_retries(&self, now: i64) -> Result<u64>;
    /// Dispatched/running executions whose node stopped heartbeating before `silent_before`.
    fn silent(&self, silent_before: i64, now: i64, limit: u32) -> Result<Vec<Silent>>;
    /// Fails `pending` executions of `path` due before `due_before` that no node took
    /// (bounded wait for a node), queueing their callbacks; returns them.
    fn fail_unplaced(
        &self,
        path: DeliveryPath,
        due_before: i64,
        error: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<ExecutionId>>;
    fn enqueue_callback(&self, id: ExecutionId, url: &str, now: i64) -> Result<()>;
    fn outbox_due(&self, now: i64, limit: u32) -> Result<Vec<OutboxRow>>;
    fn outbox_result(
        &self,
        id: i64,
        delivered: bool,
        error: Option<&str>,
        next_at: Option<i64>,
    ) -> Result<()>;
    fn outbox_pending(&self) -> Result<i64>;
    fn status_counts(&self) -> Result<Vec<(Status, i64)>>;
    /// A cheap round trip, for health checks.
    fn ping(&self) -> Result<()>;
    /// Deletes up to `limit` executions that ended before `finished_before`, with their
    /// attempts, logs and delivered callbacks (not those with a callback still pending).
    /// Task definitions stay. Returns how many executions went.
    fn purge(&self, finished_before: i64, limit: u32) -> Result<u64>;
}

pub struct SqlStore {
    b: Box<dyn Backend>,
}

fn bad(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected row shape: {what}"))
}

fn status_of(v: &V) -> Result<Status> {
    v.s()
        .and_then(|s| Status::parse(&s))
        .ok_or_else(|| bad("status"))
}

/// Rows of `SELECT id, attempt, stream, data FROM log_chunks`, numbered on after `after_seq`.
fn log_rows(rows: &[Vec<V>], after_seq: i64) -> Vec<LogRow> {
    rows.iter()
        .zip(after_seq + 1..)
        .map(|(r, seq)| LogRow {
            seq,
            chunk_id: r[0].i().unwrap_or(0),
            attempt: r[1].i().unwrap_or(0) as u32,
            stream: r[2].s().unwrap_or_default(),
            data: r[3].s().unwrap_or_default(),
        })
        .collect()
}

fn task_row(r: &[V]) -> Result<TaskRow> {
    let spec = r[3].s().ok_or_else(|| bad("spec"))?;
    Ok(TaskRow {
        id: TaskId(r[0].i().ok_or_else(|| bad("id"))?),
        name: r[1].s().unwrap_or_default(),
        request_id: r[2].s(),
        spec: serde_json::from_str(&spec)
            .map_err(|e| StoreError::Internal(format!("task spec: {e}")))?,
        cron_expr: r[4].s(),
        next_fire_at: r[5].i(),
        paused: r[6].i() == Some(1),
        deleted: r[7].i() == Some(1),
        created_at: r[8].i().unwrap_or(0),
        skipped_fires: r[9].i().unwrap_or(0),
    })
}

fn exec_row(r: &[V]) -> Result<ExecutionRow> {
    Ok(ExecutionRow {
        id: ExecutionId(r[0].i().ok_or_else(|| bad("id"))?),
        task_id: TaskId(r[1].i().ok_or_else(|| bad("task_id"))?),
        attempt: Attempt(r[2].i().unwrap_or(1) as u32),
        status: status_of(&r[3])?,
        node: r[4].s(),
        due_at: r[5].i().unwrap_or(0),
        deadline_at: r[6].i(),
        exit_code: r[7].i(),
        signal: r[8].i(),
        result: r[9].s().and_then(|s| serde_json::from_str(&s).ok()),
        result_error: r[10].s(),
        error: r[11].s(),
        created_at: r[12].i().unwrap_or(0),
        started_at: r[13].i(),
        finished_at: r[14].i(),
        attempts: Vec::new(),
        resources: r
            .get(15)
            .and_then(V::s)
            .and_then(|s| serde_json::from_str(&s).ok()),
    })
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
        SqlStore { b }
    }

    fn tx<T>(&self, mut f: impl FnMut(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let mut out = None;
        self.b.tx(&mut |c| {
            out = Some(f(c)?);
            Ok(())
        })?;
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
        let mut e = exec_row(r)?;
        let atts = c.query(
            "SELECT attempt, status, node, exit_code, `signal`, error, started_at, finished_at FROM attempts \
             WHERE execution_id = ? ORDER BY attempt",
            &[id.0.into()],
        )?;
        for a in atts {
            e.attempts.push(AttemptRow {
                attempt: a[0].i().unwrap_or(0) as u32,
                status: status_of(&a[1])?,
                node: a[2].s(),
                exit_code: a[3].i(),
                signal: a[4].i(),
                error: a[5].s(),
                started_at: a[6].i(),
                finished_at: a[7].i(),
            });
        }
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
                &sql::REQUEUE.update(
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
            rows.first().map(|r| task_row(r)).transpose()
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
            rows.iter().map(|r| task_row(r)).collect()
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
                    &sql::CANCEL_UNSTARTED.update(
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
            rows.iter().map(|r| task_row(r)).collect()
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
                     AND (? IS NULL OR pin_node = ?) ORDER BY id", status_in("", &sql::live())),
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
            rows.iter().map(|r| exec_row(r)).collect()
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
        let claim = sql::CLAIM.update(
            "node = ?, heartbeat_at = ?, updated_at = ?, deadline_at = ? + timeout_ms",
            "id = ? AND attempt = ?",
        )?;
        self.tx(|c| {
            let candidates = c.query(
                &format!("SELECT e.id, e.task_id, e.attempt, e.due_at, t.spec, e.pin_node, e.shard_index, e.shard_total \
                 FROM executions e JOIN tasks t ON t.id = e.task_id \
                 WHERE e.path = ? AND (? IS NULL OR e.pool = ?) AND (? IS NULL OR e.pin_node IS NULL OR e.pin_node = ?) \
                 AND {} AND e.due_at <= ? AND {} ORDER BY e.due_at, e.id LIMIT ?", status_is("e", Status::Pending), sql::waits_for_none()),
                &[path.as_str().into(), pool.into(), pool.into(), pin.into(), pin.into(), now.into(), i64::from(limit).into()],
            )?;
            let mut out = Vec::new();
            for r in candidates {
                let (id, attempt) = (r[0].i().ok_or_else(|| bad("id"))?, r[2].i().unwrap_or(1));
                // The compare-and-set that makes a claim exclusive across schedulers: the
                // UPDATE re-reads the row under its lock, so a row another scheduler claimed
                // since our SELECT no longer matches.
                let won = c.exec(
                    &claim,
                    &[node.into(), now.into(), now.into(), now.into(), id.into(), attempt.into()],
                )?;
                if won == 1 {
                    let spec = r[4].s().ok_or_else(|| bad("spec"))?;
                    out.push(Claimed {
                        id: ExecutionId(id),
                        task_id: TaskId(r[1].i().unwrap_or(0)),
                        attempt: Attempt(attempt as u32),
                        due_at: r[3].i().unwrap_or(now),
                        spec: serde_json::from_str(&spec).map_err(|e| StoreError::Internal(format!("task spec: {e}")))?,
                        pin_node: r[5].s(),
                        shard_index: r[6].i().unwrap_or(0) as u32,
                        shard_total: r[7].i().unwrap_or(1).max(1) as u32,
                    });
                }
            }
            Ok(out)
        })
    }

    fn unclaim(&self, id: ExecutionId, attempt: Attempt, now: i64) -> Result<bool> {
        self.tx(|c| {
            c.exec(
                &sql::UNCLAIM.update("node = NULL, updated_at = ?", "id = ? AND attempt = ?")?,
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
        let start = sql::START.update(
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
                "SELECT id, attempt, stream, data FROM log_chunks WHERE execution_id = ? ORDER BY id LIMIT ? OFFSET ?",
                &[id.0.into(), i64::from(limit).into(), after_seq.into()],
            )?;
            Ok(log_rows(&rows, after_seq))
        })
    }

    fn logs_continue(&self, id: ExecutionId, last: &LogRow, limit: u32) -> Result<Vec<LogRow>> {
        self.tx(|c| {
            let rows = c.query(
                "SELECT id, attempt, stream, data FROM log_chunks WHERE execution_id = ? AND id > ? ORDER BY id LIMIT ?",
                &[id.0.into(), last.chunk_id.into(), i64::from(limit).into()],
            )?;
            Ok(log_rows(&rows, last.seq))
        })
    }

    fn promote_retries(&self, now: i64) -> Result<u64> {
        self.tx(|c| {
            c.exec(
                &sql::PROMOTE.update("attempt = attempt + 1, node = NULL, exit_code = NULL, `signal` = NULL, \
                 result = NULL, result_error = NULL, resources = NULL, started_at = NULL, updated_at = ?", "due_at <= ?")?,
                &[now.into(), now.into()],
            )
        })
    }

    fn silent(&self, silent_before: i64, now: i64, limit: u32) -> Result<Vec<Silent>> {
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT id, task_id, attempt, status, deadline_at, node FROM executions WHERE {} \
                 AND (heartbeat_at IS NULL OR heartbeat_at < ?) ORDER BY id LIMIT ?", status_in("", HELD)),
                &[silent_before.into(), i64::from(limit).into()],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(Silent {
                        id: ExecutionId(r[0].i().ok_or_else(|| bad("id"))?),
                        task_id: TaskId(r[1].i().unwrap_or(0)),
                        attempt: Attempt(r[2].i().unwrap_or(1) as u32),
                        status: status_of(&r[3])?,
                        deadline_passed: r[4].i().is_some_and(|d| d <= now),
                        node: r[5].s(),
                    })
                })
                .collect()
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
        let fail = sql::FAIL_UNPLACED.update(
            "error = ?, finished_at = ?, updated_at = ?",
            "id = ? AND attempt = ?",
        )?;
        self.tx(|c| {
            let rows = c.query(
                &format!("SELECT e.id, e.attempt, t.spec FROM executions e JOIN tasks t ON t.id = e.task_id \
                 WHERE e.path = ? AND {} AND e.due_at < ? AND {} ORDER BY e.id LIMIT ?", status_is("e", Status::Pending), sql::waits_for_none()),
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
                "SELECT id, execution_id, url, attempts FROM outbox WHERE done = 0 AND next_at <= ? ORDER BY next_at, id LIMIT ?",
                &[now.into(), i64::from(limit).into()],
            )?;
            Ok(rows
                .iter()
                .map(|r| OutboxRow { id: r[0].i().unwrap_or(0), execution_id: ExecutionId(r[1].i().unwrap_or(0)), url: r[2].s().unwrap_or_default(), attempts: r[3].i().unwrap_or(0) })
                .collect())
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
                 ORDER BY e.id LIMIT ?", status_in("e", &sql::terminal())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_line_end_semicolons() {
        let s = statements("-- c\nCREATE TABLE a (x INT);\n\nCREATE TABLE b (\n y INT\n);\n");
        assert_eq!(
            s,
            vec![
                "CREATE TABLE a (x INT)".to_string(),
                "CREATE TABLE b (\n y INT\n)".to_string()
            ]
        );
    }
}
