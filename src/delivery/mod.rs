//! How a claimed execution reaches a node: one `Delivery` implementation per `DeliveryPath` —
//! local (the built-in node of `--mode all`), gRPC push (and the pull source), Kafka agent.
//! Nodes report back as `RunEvent`s.

pub mod grpc;
pub mod kafka;
pub mod local;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{Attempt, DeliveryPath, ExecutionId, Strategy, TaskId};
use crate::runner::{Ending, Outcome, Program, Resources, RunEvent};

/// One attempt of an execution, as handed to a node.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub execution_id: ExecutionId,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub program: Program,
    pub timeout: Option<Duration>,
    pub shard_index: u32,
    pub shard_total: u32,
    /// The target pool (`target.pool`), for paths that route by pool.
    pub pool: Option<String>,
    /// How to pick the node: `target.strategy`, `target.node` (pinned), `target.key`.
    pub route: Route,
    /// Node binding, validity and signature (`crate::trust`); default = unsigned.
    pub stamp: crate::trust::Stamp,
}

impl Dispatch {
    /// What a signature covers, with this dispatch's stamp (node, issued_at, expires_at).
    pub fn fields(&self) -> crate::trust::DispatchFields<'_> {
        crate::trust::DispatchFields {
            execution_id: self.execution_id.0,
            attempt: self.attempt.0,
            task_id: self.task_id.0,
            pool: self.pool.as_deref(),
            node: self.stamp.node.as_deref(),
            program: &self.program,
            timeout_ms: self.timeout.map(|t| t.as_millis() as u64),
            shard_index: self.shard_index,
            shard_total: self.shard_total,
            issued_at: self.stamp.issued_at,
            expires_at: self.stamp.expires_at,
        }
    }

    /// Stamps (and signs, when `signer` has a key) this dispatch for `node` (None = any node
    /// of its pool), valid for `ttl_ms` from now.
    pub fn sign(&mut self, signer: &crate::trust::Signer, node: Option<&str>, ttl_ms: i64) {
        self.stamp = signer.stamp(self.fields(), node, crate::now_ms(), ttl_ms);
    }

    /// The node-side checks before anything starts: signature, expiry, binding (`trust`),
    /// then the sealed secrets are opened with the node's pool keys.
    ///
    /// # Errors
    /// The refusal, to be reported (and dead-lettered on Kafka) with its reason.
    pub fn verify_and_open(
        &mut self,
        verifier: &crate::trust::Verifier,
        me: &crate::trust::NodeIdentity,
        open: &crate::trust::seal::OpenKeys,
    ) -> Result<(), crate::trust::Refusal> {
        verifier.check_dispatch(
            &self.fields(),
            self.stamp.sig.as_deref(),
            me,
            crate::now_ms(),
        )?;
        if open.is_empty() {
            if let Some(k) = self
                .program
                .secret_env
                .iter()
                .find(|(_, v)| crate::trust::seal::is_sealed(v))
                .map(|(k, _)| k.clone())
                .or_else(|| {
                    self.program
                        .variables
                        .iter()
                        .find(|v| crate::trust::seal::is_sealed(&v.value))
                        .map(|v| v.key.clone())
                })
            {
                return Err(crate::trust::Refusal::Sealed(format!(
                    "secret {k} is sealed and this node has no pool key \
                     (security.pool_private_keys)"
                )));
            }
            return Ok(());
        }
        open.open_program(&mut self.program)
            .map_err(|e| crate::trust::Refusal::Sealed(e.0))
    }

    /// The run the process pool executes for this dispatch.
    pub fn into_run_request(self) -> crate::runner::RunRequest {
        crate::runner::RunRequest {
            execution_id: self.execution_id,
            task_id: self.task_id,
            attempt: self.attempt,
            shard_index: self.shard_index,
            shard_total: self.shard_total,
            program: self.program,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    pub strategy: Option<Strategy>,
    pub node: Option<String>,
    pub key: Option<String>,
}

/// A node would not take a dispatch; the scheduler puts the execution back or fails it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    /// Try again later (the node is full or briefly unavailable).
    #[error("node busy: {0}")]
    Busy(String),
    /// This dispatch can never run there (e.g. an invalid program).
    #[error("rejected: {0}")]
    Rejected(String),
}

/// What a task submission created (or found, for a repeated `request_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub task_id: TaskId,
    /// The first execution (none for a cron task).
    pub execution_id: Option<ExecutionId>,
    /// The request id was seen before: these are the first call's ids.
    pub existed: bool,
    /// Every execution created (several for a broadcast).
    pub executions: Vec<ExecutionId>,
}

/// The task API as transports other than HTTP expose it (implemented by the scheduler core).
/// Errors are `(code, message)` with the HTTP API's codes.
pub trait TaskApi: Send + Sync {
    fn submit_json(&self, body: &[u8]) -> Result<Submitted, crate::scheduler::api::ApiError>;
    fn execution_json(&self, id: i64) -> Result<String, crate::scheduler::api::ApiError>;
    fn cancel_json(&self, id: i64) -> Result<String, crate::scheduler::api::ApiError>;
}

/// Where pulling nodes get work (implemented by the scheduler core; the transport only waits).
pub trait PullSource: Send + Sync {
    /// Up to `free` dispatches of `pool` for `node`, waiting at most `wait` for some.
    fn pull(&self, node: &str, pool: &str, free: u32, wait: std::time::Duration) -> Vec<Dispatch>;
    /// For each (execution, attempt): does `node` hold it? Reports are applied only for
    /// `Held::Running`; the others are dropped (`Finished` is the normal tail of a cancel or a
    /// timeout, `Not` an unknown id or another node's attempt).
    fn held(&self, node: &str, keys: &[(ExecutionId, Attempt)]) -> Vec<Held>;
    /// `node` took the attempt and never started it (its start journal says so after a
    /// crash): dispatch it again, free of the retry budget, if `node` still holds it.
    fn unstarted(&self, node: &str, id: ExecutionId, attempt: Attempt, why: &str);
}

/// Whether a node holds an attempt it reports on (see `PullSource::held`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The node holds it and it has not ended: its reports apply.
    Running,
    /// The node held it and it has ended (cancelled, timed out, lost): late reports.
    Finished,
    /// Unknown execution, another attempt, or another node's.
    Not,
}

/// Reports a `ReportSink` could not store (yet); the message is the store's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotStored(pub String);

/// Where transports that acknowledge what they received (Kafka offsets) hand node reports:
/// each call returns once the store has them (implemented by the scheduler core).
pub trait ReportSink: Send + Sync {
    /// Applies reports of `node` (it started, logged, finished attempts).
    ///
    /// # Errors
    /// Not all of it is stored yet; applying the same reports again is harmless.
    fn apply(&self, node: &str, events: &[RunEvent]) -> Result<(), NotStored>;
    /// `node` still runs these attempts.
    fn alive(&self, node: &str, running: &[(ExecutionId, Attempt)]);
    /// `node` did not start this attempt (e.g. its dispatch had expired): dispatch it anew.
    fn not_started(&self, node: &str, id: ExecutionId, attempt: Attempt, why: &str);
}

/// An outcome as the transports carry it (gRPC `Outcome`, Kafka `finished` events).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OutcomeWire {
    /// succeeded | failed | timed_out | cancelled
    pub status: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub result: Option<Map<String, Value>>,
    #[serde(default)]
    pub result_error: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub spawn_failed: bool,
    /// What the run used and what bounded it; absent from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Box<Resources>>,
}

impl From<&Outcome> for OutcomeWire {
    fn from(o: &Outcome) -> OutcomeWire {
        OutcomeWire {
            status: o.status().as_str().into(),
            exit_code: o.exit_code,
            signal: o.signal,
            result: o.result.clone(),
            result_error: o.result_error.clone(),
            error: o.error(),
            spawn_failed: matches!(o.ending, Ending::SpawnFailed(_)),
            resources: o.resources.clone(),
        }
    }
}

impl OutcomeWire {
    pub fn into_outcome(self) -> Outcome {
        let ending = match (self.status.as_str(), self.exit_code, self.signal) {
            ("timed_out", _, _) => Ending::TimedOut,
            ("cancelled", _, _) => Ending::Cancelled,
            _ if self.spawn_failed => Ending::SpawnFailed(self.error.unwrap_or_default()),
            ("succeeded", _, _) => Ending::Exited(0),
            (_, Some(c), _) => Ending::Exited(c),
            (_, None, Some(s)) => Ending::Signaled(s),
            _ => Ending::SpawnFailed(self.error.unwrap_or_else(|| "failed".into())),
        };
        Outcome {
            exit_code: self.exit_code,
            signal: self.signal,
            result: self.result,
            result_error: self.result_error,
            resources: self.resources,
            ..Outcome::not_started(ending)
        }
    }
}

pub trait Delivery: Send + Sync {
    /// The `target.path` this delivery serves.
    fn path(&self) -> DeliveryPath;
    /// The node id executions are recorded under.
    fn node(&self) -> &str;
    /// How many more dispatches it would accept now.
    fn free_slots(&self) -> usize;
    /// Scripts running now, and how many may run at once.
    fn load(&self) -> (u32, u32);
    /// Hands over one attempt. A path that chooses a node per dispatch calls `placed(node)`
    /// before it hands the attempt over, so the store names the node before any report of it
    /// can arrive.
    fn dispatch(&self, d: Dispatch, placed: &dyn Fn(&str)) -> Result<(), Refused>;
    /// Stops an attempt wherever it runs; unknown attempts are ignored.
    fn cancel(&self, id: ExecutionId, attempt: Attempt);
    /// For paths where a dispatch can wait in transit (Kafka): after this long, an attempt no
    /// node has started is dispatched anew. None = dispatch is synchronous.
    fn unstarted_after(&self) -> Option<Duration> {
        None
    }
    /// For a path that runs scripts in this process: how its pool contains runs ("cgroup2",
    /// "hybrid", "cgroup1" or "none").
    fn containment(&self) -> Option<String> {
        None
    }
}
