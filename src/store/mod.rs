//! Durable state of the scheduler: tasks, executions (with their attempts), log chunks and the
//! callback outbox. This file holds the `Store` trait the scheduler uses, the `Backend`/`Conn`
//! interface a back end implements, the error type and `open`. `sql.rs` implements `Store` once
//! over any back end (every state change a compare-and-set on status and attempt), `rows.rs`
//! holds the rows and their decoding, `migrate.rs` the migrations, `sqlite.rs`/`mysql.rs` the
//! back ends.

mod migrate;
mod mysql;
mod rows;
mod sql;
mod sqlite;

use crate::model::{Attempt, DeliveryPath, ExecutionId, Status, TaskId};

pub use self::migrate::{migrations, statements};
pub use self::mysql::Mysql;
pub use self::rows::{
    AttemptRow, CancelOutcome, Claimed, Created, ExecutionRow, Finish, Fire, Fired, LogRow,
    NewTask, OutboxRow, Silent, TaskRow,
};
pub use self::sql::SqlStore;
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
    /// The URL (its password masked, see [`redact_url`]) and what is wrong with it.
    #[error("invalid store URL {0:?}: use sqlite:PATH or mysql://user:pass@host:port/db")]
    BadUrl(String),
    /// An INSERT hit a unique key (MySQL 1062, SQLite `SQLITE_CONSTRAINT_UNIQUE`): the row
    /// exists already. Only `create_task` expects it (a repeated `request_id`).
    #[error("duplicate key: {0}")]
    Duplicate(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    /// `BadUrl` for `url`, its password masked; `why` (when given) follows the URL.
    pub fn bad_url(url: &str, why: Option<&dyn std::fmt::Display>) -> StoreError {
        let shown = redact_url(url);
        StoreError::BadUrl(match why {
            Some(w) => format!("{shown}: {w}"),
            None => shown,
        })
    }
}

/// A store URL fit for messages and logs: the password of `scheme://user:password@host…` is
/// replaced by `***` (also in a URL too broken to parse).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    // The userinfo ends at the last '@' (a password may itself hold '@' or '/'); an '@' further
    // on masks more than needed, never less.
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

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
    /// The suffix that makes a SELECT a shared-lock read of the latest committed rows
    /// (`" LOCK IN SHARE MODE"` on MySQL; empty on SQLite, whose writers are serialised
    /// anyway). Shared, not `FOR UPDATE`: a duplicate-key INSERT already holds a shared lock
    /// on the winner's row, and several losers each upgrading theirs to exclusive is an
    /// InnoDB deadlock every time (seen as 1213 under 12 concurrent creates of one request).
    fn locking_read(&self) -> &'static str;
    fn describe(&self) -> String;
}

/// Opens the store named by a URL: `sqlite:PATH` or `mysql://user:pass@host:port/db`.
/// Checks a store URL without connecting: what `open` would refuse before any I/O.
///
/// # Errors
/// `BadUrl` for anything but `sqlite:PATH` or a parseable `mysql://…/db` URL.
pub fn check_url(url: &str) -> Result<()> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        if path.trim_start_matches("//").is_empty() {
            return Err(StoreError::bad_url(url, None));
        }
        Ok(())
    } else if url.starts_with("mysql://") {
        self::mysql::opts(url).map(|_| ())
    } else {
        Err(StoreError::bad_url(url, None))
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

pub fn open(url: &str) -> Result<SqlStore> {
    let backend: Box<dyn Backend> = if let Some(path) = url.strip_prefix("sqlite:") {
        Box::new(Sqlite::open(path.trim_start_matches("//"))?)
    } else if url.starts_with("mysql://") {
        Box::new(Mysql::open(url)?)
    } else {
        return Err(StoreError::bad_url(url, None));
    };
    Ok(SqlStore::new(backend))
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
    /// True while the newest transaction that wrote (or tried to) failed for want of the
    /// store (`Unavailable`: a full disk, an I/O error, a lost connection): the store may
    /// answer reads and `ping` and still take no write. Every write of the process counts —
    /// tasks, claims, cron fires, reports, heartbeats — so it clears with the next write that
    /// succeeds; an idle process probes with a 64 KiB write (a log chunk of execution 0, inserted
    /// and deleted) at most once a second while it is set, so it also clears when nothing else
    /// writes. For `/healthz`.
    fn refusing_writes(&self) -> bool;
    /// The write `refusing_writes` probes with: a 64 KiB log chunk of execution 0 (no
    /// execution has id 0) inserted and deleted in one committed transaction; leaves nothing.
    fn probe_write(&self) -> Result<()>;
    /// Deletes up to `limit` executions that ended before `finished_before`, with their
    /// attempts, logs and delivered callbacks (not those with a callback still pending).
    /// Task definitions stay. Returns how many executions went.
    fn purge(&self, finished_before: i64, limit: u32) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact_url("mysql://etask:s3cr:et@db.example:3306/etask"),
            "mysql://etask:***@db.example:3306/etask"
        );
        assert_eq!(
            redact_url("mysql://p@ss:w@rd/x@h/db"),
            "mysql://p@ss:***@h/db"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1/db"),
            "mysql://root@127.0.0.1/db"
        );
        assert_eq!(
            redact_url("sqlite:/var/lib/etask/db"),
            "sqlite:/var/lib/etask/db"
        );
    }
}
