//! How a claimed execution reaches a node: one `Delivery` implementation per path. Today the
//! in-process path (`local`, the built-in node of `--mode all`); gRPC push/pull and Kafka add
//! implementations, not a rewrite. Nodes report back as `RunEvent`s on one channel.

pub mod grpc;
pub mod local;

use std::time::Duration;

use crate::model::{Attempt, ExecutionId, TaskId};
use crate::runner::Program;

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
}

impl Dispatch {
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
    pub strategy: Option<String>,
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

/// The task API as transports other than HTTP expose it (implemented by the scheduler core).
/// Errors are `(code, message)` with the HTTP API's codes.
pub trait TaskApi: Send + Sync {
    /// Returns (task id, first execution id, existed, all execution ids).
    fn submit_json(
        &self,
        body: &[u8],
    ) -> Result<(i64, Option<i64>, bool, Vec<i64>), (&'static str, String)>;
    fn execution_json(&self, id: i64) -> Result<String, (&'static str, String)>;
    fn cancel_json(&self, id: i64) -> Result<String, (&'static str, String)>;
}

/// Where pulling nodes get work (implemented by the scheduler core; the transport only waits).
pub trait PullSource: Send + Sync {
    /// Up to `free` dispatches of `pool` for `node`, waiting at most `wait` for some.
    fn pull(&self, node: &str, pool: &str, free: u32, wait: std::time::Duration) -> Vec<Dispatch>;
}

pub trait Delivery: Send + Sync {
    /// The `target.path` this delivery serves.
    fn path(&self) -> &'static str;
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
}
