//! The JSON envelopes on the Kafka topics. Every message carries `"v": 1`; a message of another
//! version, or one that does not parse, is dead-lettered by whoever reads it, with the reason.
//!
//! - dispatch topic (`<prefix><pool>`), key = execution id: `DispatchMsg`, the same content as
//!   the gRPC `Dispatch`; `sig` is the scheduler's Ed25519 signature (`crate::trust`).
//! - events topic, key = execution id: `EventMsg` — started, log batch (with seq), finished,
//!   not_started, and the agents' heartbeats (key = agent id).
//! - control topic, key = execution id: `ControlMsg` (cancel), signed like dispatches.
//! - dead-letter topic: `DeadLetter`, what could not be read and why.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::delivery::{Dispatch, OutcomeWire};
use crate::model::{Attempt, ExecutionId, TaskId};
use crate::runner::{LogChunk, Program, RunEvent, Stream};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchMsg {
    pub v: u32,
    pub execution_id: i64,
    pub attempt: u32,
    pub task_id: i64,
    pub pool: String,
    pub program: Program,
    /// None = no timeout.
    pub timeout_ms: Option<u64>,
    pub shard_index: u32,
    pub shard_total: u32,
    /// Unix ms.
    pub issued_at: i64,
    /// Unix ms; an agent does not start the dispatch after it.
    pub expires_at: i64,
    /// The scheduler's signature (`crate::trust`), null when it signs nothing.
    pub sig: Option<String>,
    /// The node it is for; absent = any agent of the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl DispatchMsg {
    /// The envelope of `d`; an unstamped dispatch is given `now` and `ttl_ms`, a stamped one
    /// keeps its stamp (which its signature covers).
    pub fn new(d: &Dispatch, pool: &str, now: i64, ttl_ms: i64) -> DispatchMsg {
        let (issued_at, expires_at) = if d.stamp.issued_at > 0 {
            (d.stamp.issued_at, d.stamp.expires_at)
        } else {
            (now, now + ttl_ms)
        };
        DispatchMsg {
            v: VERSION,
            execution_id: d.execution_id.0,
            attempt: d.attempt.0,
            task_id: d.task_id.0,
            pool: pool.to_owned(),
            program: d.program.clone(),
            timeout_ms: d.timeout.map(|t| t.as_millis() as u64),
            shard_index: d.shard_index,
            shard_total: d.shard_total,
            issued_at,
            expires_at,
            sig: d.stamp.sig.clone(),
            node: d.stamp.node.clone(),
        }
    }

    pub fn into_dispatch(self) -> Dispatch {
        Dispatch {
            execution_id: ExecutionId(self.execution_id),
            task_id: TaskId(self.task_id),
            attempt: Attempt(self.attempt),
            program: self.program,
            timeout: self.timeout_ms.map(std::time::Duration::from_millis),
            shard_index: self.shard_index,
            shard_total: self.shard_total.max(1),
            pool: Some(self.pool),
            route: Default::default(),
            stamp: crate::trust::Stamp {
                node: self.node,
                issued_at: self.issued_at,
                expires_at: self.expires_at,
                sig: self.sig,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventBody {
    Started {
        pid: i32,
    },
    Log {
        seq: u64,
        stream: Stream,
        data: String,
    },
    Finished {
        outcome: OutcomeWire,
    },
    /// The agent did not start this attempt (e.g. its dispatch had expired).
    NotStarted {
        reason: String,
    },
    /// The attempts the agent holds now (taken, running or queued in its pool).
    Heartbeat {
        pool: String,
        capacity: u32,
        running: Vec<(i64, u32)>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMsg {
    pub v: u32,
    pub agent: String,
    /// 0 for heartbeats.
    #[serde(default)]
    pub execution_id: i64,
    #[serde(default)]
    pub attempt: u32,
    #[serde(flatten)]
    pub body: EventBody,
}

impl EventMsg {
    pub fn from_run_event(agent: &str, ev: &RunEvent) -> EventMsg {
        let key = ev.key();
        let body = match ev {
            RunEvent::Started { pid, .. } => EventBody::Started { pid: *pid },
            RunEvent::Log { chunk, .. } => EventBody::Log {
                seq: chunk.seq,
                stream: chunk.stream,
                data: chunk.data.clone(),
            },
            RunEvent::Finished { outcome, .. } => EventBody::Finished {
                outcome: OutcomeWire::from(outcome),
            },
        };
        EventMsg {
            v: VERSION,
            agent: agent.to_owned(),
            execution_id: key.execution.0,
            attempt: key.attempt.0,
            body,
        }
    }

    /// The pool event this message reports, for started/log/finished.
    pub fn to_run_event(&self) -> Option<RunEvent> {
        let key = crate::runner::RunKey {
            execution: ExecutionId(self.execution_id),
            attempt: Attempt(self.attempt),
        };
        Some(match &self.body {
            EventBody::Started { pid } => RunEvent::Started { key, pid: *pid },
            EventBody::Log { seq, stream, data } => RunEvent::Log {
                key,
                chunk: LogChunk {
                    seq: *seq,
                    stream: *stream,
                    data: data.clone(),
                },
            },
            EventBody::Finished { outcome } => RunEvent::Finished {
                key,
                outcome: outcome.clone().into_outcome(),
            },
            EventBody::NotStarted { .. } | EventBody::Heartbeat { .. } => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlMsg {
    pub v: u32,
    /// "cancel"
    pub kind: String,
    pub execution_id: i64,
    pub attempt: u32,
    /// Unix ms (0 in envelopes of schedulers that sign nothing).
    #[serde(default)]
    pub issued_at: i64,
    #[serde(default)]
    pub expires_at: i64,
    /// The scheduler's signature over the cancel (`crate::trust`); null = unsigned.
    #[serde(default)]
    pub sig: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u32,
    pub reason: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The payload as text (invalid UTF-8 replaced), at most 64 KiB of it.
    pub payload: String,
    /// The node or scheduler that gave up on it.
    pub by: String,
    pub at: i64,
}
/// A record that is not a message of this version (bad JSON, wrong shape, empty payload):
/// the text says what is wrong; such records are dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

impl From<WireError> for String {
    fn from(e: WireError) -> String {
        e.0
    }
}

/// Parses one envelope; the error is the reason written to the dead-letter topic.
pub fn parse<T: DeserializeOwned>(payload: Option<&[u8]>) -> Result<T, WireError> {
    parse_text::<T>(payload).map_err(WireError)
}

/// `parse` with its refusal as text.
fn parse_text<T: DeserializeOwned>(payload: Option<&[u8]>) -> Result<T, String> {
    let bytes = payload.ok_or("empty message (no payload)")?;
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("v").and_then(serde_json::Value::as_u64) {
        Some(n) if n == u64::from(VERSION) => {}
        Some(n) => {
            return Err(format!(
                "unsupported envelope version {n} (this node reads 1)"
            ))
        }
        None => return Err("no envelope version field \"v\"".into()),
    }
    serde_json::from_value(v).map_err(|e| format!("bad envelope: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{Ending, Outcome, RunKey};

    fn program() -> Program {
        serde_json::from_str(r#"{"kind":"shell","code":"echo hi"}"#).unwrap()
    }

    #[test]
    fn dispatch_round_trips_and_carries_a_null_sig() {
        let d = Dispatch {
            execution_id: ExecutionId(7),
            task_id: TaskId(3),
            attempt: Attempt(2),
            program: program(),
            timeout: Some(std::time::Duration::from_secs(5)),
            shard_index: 1,
            shard_total: 2,
            pool: Some("edge".into()),
            route: Default::default(),
            stamp: Default::default(),
        };
        let m = DispatchMsg::new(&d, "edge", 1_000, 60_000);
        let text = serde_json::to_string(&m).unwrap();
        assert!(
            text.contains("\"v\":1") && text.contains("\"sig\":null"),
            "{text}"
        );
        let back: DispatchMsg = parse(Some(text.as_bytes())).unwrap();
        assert_eq!(back.expires_at, 61_000);
        let d2 = back.into_dispatch();
        assert_eq!(
            (d2.execution_id, d2.attempt, d2.shard_total),
            (d.execution_id, d.attempt, 2)
        );
        assert_eq!(d2.timeout, d.timeout);
    }

    #[test]
    fn garbage_truncated_and_foreign_versions_are_refused_with_a_reason() {
        assert!(parse::<DispatchMsg>(None).unwrap_err().0.contains("empty"));
        assert!(parse::<DispatchMsg>(Some(b"\xff\x00garbage"))
            .unwrap_err()
            .0
            .contains("not JSON"));
        assert!(
            parse::<DispatchMsg>(Some(br#"{"v":1,"execution_id":5,"att"#))
                .unwrap_err()
                .0
                .contains("not JSON")
        );
        assert!(parse::<DispatchMsg>(Some(br#"{"v":2}"#))
            .unwrap_err()
            .0
            .contains("version 2"));
        assert!(parse::<DispatchMsg>(Some(br#"{"execution_id":1}"#))
            .unwrap_err()
            .0
            .contains("\"v\""));
        assert!(parse::<DispatchMsg>(Some(br#"{"v":1,"execution_id":1}"#))
            .unwrap_err()
            .0
            .contains("bad envelope"));
        assert!(parse::<EventMsg>(Some(br#"{"v":1,"agent":"a","kind":"exploded"}"#)).is_err());
    }

    #[test]
    fn events_round_trip_through_json() {
        let key = RunKey {
            execution: ExecutionId(9),
            attempt: Attempt(1),
        };
        let mut outcome = Outcome::not_started(Ending::Exited(3));
        outcome.exit_code = Some(3);
        outcome.result = serde_json::from_str(r#"{"a":1}"#).unwrap();
        let evs = [
            RunEvent::Started { key, pid: 42 },
            RunEvent::Log {
                key,
                chunk: LogChunk {
                    seq: 4,
                    stream: Stream::Stderr,
                    data: "x\n".into(),
                },
            },
            RunEvent::Finished { key, outcome },
        ];
        for ev in evs {
            let m = EventMsg::from_run_event("agent-1", &ev);
            let text = serde_json::to_vec(&m).unwrap();
            let back: EventMsg = parse(Some(&text)).unwrap();
            assert_eq!(back.agent, "agent-1");
            let ev2 = back.to_run_event().unwrap();
            match (&ev, &ev2) {
                (RunEvent::Finished { outcome: a, .. }, RunEvent::Finished { outcome: b, .. }) => {
                    assert_eq!(
                        (a.status(), a.exit_code, &a.result),
                        (b.status(), b.exit_code, &b.result)
                    )
                }
                _ => assert_eq!(ev, ev2),
            }
        }
        let hb = EventMsg {
            v: 1,
            agent: "a".into(),
            execution_id: 0,
            attempt: 0,
            body: EventBody::Heartbeat {
                pool: "p".into(),
                capacity: 4,
                running: vec![(1, 2)],
            },
        };
        let back: EventMsg = parse(Some(&serde_json::to_vec(&hb).unwrap())).unwrap();
        assert_eq!(back, hb);
        assert!(back.to_run_event().is_none());
    }
}
