//! The process pool: runs one script per isolated child process, streams its stdout/stderr as
//! log chunks and reads its JSON result from fd 3. It takes `RunRequest`s and emits `RunEvent`s
//! on crossbeam channels, and knows nothing of transports, storage or the scheduler.

pub mod cgroup;
pub mod journal;
mod launcher;
pub mod logs;
pub mod mask;
pub mod pool;
pub mod program;
pub mod result;
pub mod spawn;
pub mod tree;

pub use cgroup::{CgroupConfig, Want as CgroupWant};
pub use journal::{Previous, StartJournal};
pub use logs::{LogChunk, LogLimits, Stream};
pub use pool::{
    Ending, Outcome, Pool, PoolConfig, Resources, RunEvent, RunKey, RunRequest, SubmitError,
};
pub use program::{
    ArgvStyle, Interpreters, Limits, Program, ProgramError, ProgramKind, ShellKind, Variable,
};
pub use spawn::{Rlimits, RunAs};
