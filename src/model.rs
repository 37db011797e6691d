//! The task and execution model: identifiers, statuses and the legal transitions between them.
//! Pure data and rules, no I/O: the store enforces these transitions with compare-and-set, the
//! scheduler and nodes only ever move an execution through `Status::transition`.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A task definition (what to run, where, when).
    TaskId
);
id_type!(
    /// One run of a task; retries are further attempts of the same execution.
    ExecutionId
);

/// Attempt number of an execution, starting at 1. It is the fencing token: a report carrying an
/// older attempt never changes the execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl Attempt {
    pub const FIRST: Attempt = Attempt(1);
    pub fn next(self) -> Attempt {
        Attempt(self.0 + 1)
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// State of an execution. `retry_wait` sits between attempts; `lost` is set when the node that
/// held the execution disappeared (and no retry is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Dispatched,
    Running,
    RetryWait,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Lost,
}

/// An attempt to move an execution along an edge the model does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal status transition {from} -> {to}")]
pub struct IllegalTransition {
    pub from: Status,
    pub to: Status,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Pending,
        Status::Dispatched,
        Status::Running,
        Status::RetryWait,
        Status::Succeeded,
        Status::Failed,
        Status::TimedOut,
        Status::Cancelled,
        Status::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Dispatched => "dispatched",
            Status::Running => "running",
            Status::RetryWait => "retry_wait",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
            Status::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.iter().copied().find(|st| st.as_str() == s)
    }

    /// Terminal states are final: nothing moves an execution out of them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded
                | Status::Failed
                | Status::TimedOut
                | Status::Cancelled
                | Status::Lost
        )
    }

    /// Whether `self -> to` is an edge of the state machine.
    pub fn can_move_to(self, to: Status) -> bool {
        use Status::*;
        match (self, to) {
            (from, _) if from.is_terminal() => false,
            // Any live state may be cancelled, or fail (e.g. no node could take it).
            (_, Cancelled) | (_, Failed) => true,
            (Pending, Dispatched) | (Pending, Running) => true,
            (Dispatched, Running) | (Dispatched, Pending) => true,
            (Dispatched | Running, Succeeded | TimedOut | Lost | RetryWait) => true,
            (Running, Running) => false,
            (RetryWait, Pending) => true,
            // A pending execution whose deadline passed before any node took it.
            (Pending, TimedOut) => true,
            _ => false,
        }
    }

    /// Checked transition: the only way code should compute a new status.
    pub fn transition(self, to: Status) -> Result<Status, IllegalTransition> {
        if self.can_move_to(to) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

/// What a cron fire does while the task's previous execution has not ended (README "Overlap").
/// The store decides it inside the fire's compare-and-set, so several schedulers agree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// The fire is skipped and counted (`skipped_fires`), like the reference ETask.
    #[default]
    Forbid,
    /// Runs start regardless.
    Allow,
    /// At most one execution waits; it starts when the earlier ones have ended.
    Queue,
    /// The executions that have not ended are cancelled, then the new one starts.
    Replace,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Forbid => "forbid",
            Overlap::Allow => "allow",
            Overlap::Queue => "queue",
            Overlap::Replace => "replace",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_move() {
        for from in Status::ALL.iter().copied().filter(|s| s.is_terminal()) {
            for to in Status::ALL {
                assert!(
                    from.transition(to).is_err(),
                    "{from} -> {to} must be refused"
                );
            }
        }
    }

    #[test]
    fn happy_path_and_retry_are_legal() {
        let s = Status::Pending
            .transition(Status::Dispatched)
            .and_then(|s| s.transition(Status::Running))
            .and_then(|s| s.transition(Status::RetryWait))
            .and_then(|s| s.transition(Status::Pending))
            .and_then(|s| s.transition(Status::Running))
            .and_then(|s| s.transition(Status::Succeeded));
        assert_eq!(s, Ok(Status::Succeeded));
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(Status::parse("bogus"), None);
    }
}
