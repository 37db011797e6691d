//! The task and execution model: identifiers, statuses and the legal transitions between them,
//! and the closed sets of names every layer shares (delivery paths, routing strategies, node
//! roles, server modes, cron policies), each spelled once here. Pure data and rules, no I/O: the
//! store enforces the transitions with compare-and-set (`store::sql::Cas`), built from
//! `Status::can_move_to`.

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

/// A plain name: 1 to 200 of ASCII letters, digits, `-`, `_` and `.`, not starting with `.`.
/// What a pool must be where it becomes a Kafka topic (`etask.dispatch.<pool>`) or a key file
/// name (`pool-<pool>.key`); Kafka's own rule for topic names is the same alphabet.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The most items one page of a list holds (`limit` of the list endpoints, `etask tasks
/// --limit`).
pub const PAGE_MAX: u32 = 500;
/// Items per page when no `limit` is given.
pub const PAGE_DEFAULT: u32 = 50;

/// A page size as the list endpoints take it: `None` = `PAGE_DEFAULT`; 1 to `PAGE_MAX`.
/// The server and the CLI both use this rule.
///
/// # Errors
/// Out of range: the message names `limit=N` and the range.
pub fn page_limit(limit: Option<u32>) -> Result<u32, String> {
    match limit {
        None => Ok(PAGE_DEFAULT),
        Some(n @ 1..=PAGE_MAX) => Ok(n),
        Some(n) => Err(format!("limit={n}: a page holds 1 to {PAGE_MAX} items")),
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name outside a closed set (a path, strategy, role, …): what was given and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?}; use one of {allowed}")]
pub struct UnknownName {
    /// Which set: "path", "strategy", …
    pub what: &'static str,
    pub given: String,
    /// The allowed names, comma-separated.
    pub allowed: String,
}

/// A closed set of names: the enum, its one string mapping (`as_str`), and `FromStr`,
/// `Display`, `Serialize`, `Deserialize` all derived from that mapping, so a name is spelled
/// once.
macro_rules! names {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($body:tt)* }) => {
        names!(@enum $(#[$doc])* $name { $($body)* });

        impl std::str::FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<$name, UnknownName> {
                $name::from_name(s).ok_or_else(|| UnknownName {
                    what: $what,
                    given: s.to_owned(),
                    allowed: $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }
    };
    // Without `FromStr`: the type writes its own (a message that is part of the CLI's output).
    (@enum $(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every member, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The member's name on every wire (JSON, TOML, SQL, CLI).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The member named `s`, if any.
            pub fn from_name(s: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }


        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

names!(
    /// How an execution reaches its node (`target.path`; README "The paths to a node").
    DeliveryPath, "target.path" {
        /// The built-in node of `--mode all`, in-process.
        Local = "local",
        /// gRPC: the scheduler calls the executor's `Execute`.
        Push = "push",
        /// gRPC: the executor long-polls the scheduler.
        Pull = "pull",
        /// Kafka: the agents of a pool consume its dispatch topic.
        Agent = "agent",
    }
);

impl DeliveryPath {
    /// The gRPC paths, where executors register and routing strategies apply.
    pub fn is_grpc(self) -> bool {
        matches!(self, DeliveryPath::Push | DeliveryPath::Pull)
    }
}

names!(
    /// How the push path picks a node of the pool (`target.strategy`).
    Strategy, "target.strategy" {
        RoundRobin = "round_robin",
        Random = "random",
        LeastBusy = "least_busy",
        /// Same `target.key` → same node while it lives (rendezvous hashing).
        ConsistentHash = "consistent_hash",
        /// The node named by `target.node`.
        Pinned = "pinned",
        /// One execution per live node of the pool, each told its shard.
        Broadcast = "broadcast",
    }
);

names!(
    /// What a cron fire does while the task's previous execution has not ended (README
    /// "Overlap"; `schedule.overlap`, `etask submit --overlap`). The store decides it inside
    /// the fire's compare-and-set, so several schedulers agree.
    Overlap, "schedule.overlap" {
        /// The fire is skipped and counted (`skipped_fires`), like the reference ETask.
        Forbid = "forbid",
        /// Runs start regardless.
        Allow = "allow",
        /// At most one execution waits; it starts when the earlier ones have ended.
        Queue = "queue",
        /// The executions that have not ended are cancelled, then the new one starts.
        Replace = "replace",
    }
);

impl Default for Overlap {
    /// `forbid`, as the reference ETask.
    fn default() -> Overlap {
        Overlap::Forbid
    }
}

names!(
    /// What a node registers as (`/etask/nodes/<role>/…` in etcd).
    NodeRole, "role" {
        /// A gRPC node (push or pull), or the built-in node of `--mode all`.
        Executor = "executor",
        /// A Kafka consumer node.
        Agent = "agent",
    }
);

names!(
    /// What a cron task does with fires missed while no scheduler ran
    /// (`[scheduler] cron_missed`).
    CronMissed, "scheduler.cron_missed" {
        /// One catch-up fire, then on schedule.
        Once = "once",
        /// No catch-up: the fire time moves on.
        Skip = "skip",
    }
);

names!(@enum
    /// The roles `etask server --mode` runs.
    Mode {
        Scheduler = "scheduler",
        Agent = "agent",
        Executor = "executor",
        /// All three in one process.
        All = "all",
    }
);

/// A `--mode` that is none of the server's modes (argh prints the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: use scheduler, agent, executor or all")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Mode, UnknownMode> {
        Mode::from_name(s).ok_or_else(|| UnknownMode(s.to_owned()))
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

    #[test]
    fn closed_names_round_trip_through_str_and_json() {
        fn check<T>(all: &[T])
        where
            T: Copy + PartialEq + fmt::Debug + fmt::Display + Serialize,
            T: std::str::FromStr<Err = UnknownName> + for<'de> Deserialize<'de>,
        {
            for &v in all {
                let name = v.to_string();
                assert_eq!(name.parse::<T>(), Ok(v));
                assert_eq!(serde_json::to_string(&v).unwrap(), format!("{name:?}"));
                assert_eq!(serde_json::from_str::<T>(&format!("{name:?}")).unwrap(), v);
            }
            assert!("bogus".parse::<T>().is_err());
            assert!(serde_json::from_str::<T>("\"bogus\"").is_err());
        }
        check(DeliveryPath::ALL);
        check(Strategy::ALL);
        check(NodeRole::ALL);
        check(CronMissed::ALL);
        for &m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        let e = "sideways".parse::<DeliveryPath>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown target.path \"sideways\"; use one of local, push, pull, agent"
        );
    }
}

/// The API's error codes, the one list both intakes answer with: `{"error": {"code", ...}}`
/// on HTTP with `http_status()`, a gRPC status of the same meaning on the gRPC task API
/// (`delivery/grpc/tasks.rs`). README "API" documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request is malformed or a value is out of range.
    InvalidArgument,
    /// 401: missing or wrong token.
    Unauthenticated,
    /// 404: no such route, task or execution.
    NotFound,
    /// 405: the route exists, not with this method.
    MethodNotAllowed,
    /// 408: the request did not arrive in time.
    RequestTimeout,
    /// 409: the state forbids it (a repeated `request_id` with another body, pausing a `once`).
    Conflict,
    /// 413: over `server.max_body_bytes`.
    PayloadTooLarge,
    /// 431: head over `server.max_header_bytes` or `max_headers`.
    HeadersTooLarge,
    /// 503: the store, a node or the server itself cannot take it now; retry.
    Unavailable,
    /// 500: a bug or an unexpected failure (logged by the server).
    Internal,
}

impl ErrorCode {
    /// The code as the API writes it (`"invalid_argument"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status the code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
