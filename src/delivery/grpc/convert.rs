//! Conversions between the gRPC wire (`pb`) and the sync core's types: programs, dispatches,
//! run events. Pure: no runtime, no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::pb;
use crate::delivery::Dispatch;
use crate::model::{Attempt, ExecutionId, TaskId};
use crate::runner::{
    ArgvStyle, LogChunk, Program, ProgramKind, RunEvent, RunKey, ShellKind, Stream, Variable,
};

pub fn program_to_pb(p: &Program) -> pb::Program {
    pb::Program {
        kind: match p.kind {
            ProgramKind::Shell => "shell",
            ProgramKind::Python => "python",
            ProgramKind::Exec => "exec",
        }
        .into(),
        code: p.code.clone(),
        argv: p.argv.clone().unwrap_or_default(),
        shell: match p.shell {
            Some(ShellKind::Bash) => "bash".into(),
            _ => String::new(),
        },
        args: p.args.clone(),
        env: p.env.clone().into_iter().collect(),
        secret_env: p.secret_env.clone().into_iter().collect(),
        stdin: p.stdin.clone(),
        workdir: p.workdir.clone(),
        params_json: p
            .params
            .as_ref()
            .map(|m| Value::Object(m.clone()).to_string()),
        variables: p
            .variables
            .iter()
            .map(|v| pb::Variable {
                key: v.key.clone(),
                value: v.value.clone(),
                secret: v.secret,
            })
            .collect(),
        argv_style: match p.argv_style {
            ArgvStyle::Files => String::new(),
            ArgvStyle::Legacy => "legacy".into(),
        },
        limits: p.limits.map(|l| pb::Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_millicores: l.cpu_millicores,
        }),
    }
}

/// A message from the wire that does not describe a valid program or dispatch; the text says
/// what is wrong (it goes back to the sender in an `Ack`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMessage(pub String);

/// A program from the wire.
///
/// # Errors
/// An unknown kind or argv style, params that are not a JSON object, or a program that does not
/// validate.
pub fn program_from_pb(p: pb::Program) -> Result<Program, InvalidMessage> {
    let kind = match p.kind.as_str() {
        "shell" => ProgramKind::Shell,
        "python" => ProgramKind::Python,
        "exec" => ProgramKind::Exec,
        k => return Err(InvalidMessage(format!("unknown program kind {k:?}"))),
    };
    let prog = Program {
        kind,
        code: p.code,
        argv: (!p.argv.is_empty()).then_some(p.argv),
        shell: (p.shell == "bash").then_some(ShellKind::Bash),
        args: p.args,
        env: p.env.into_iter().collect::<BTreeMap<_, _>>(),
        secret_env: p.secret_env.into_iter().collect::<BTreeMap<_, _>>(),
        stdin: p.stdin,
        workdir: p.workdir,
        params: match p.params_json.as_deref() {
            None => None,
            Some(j) => match serde_json::from_str::<Value>(j) {
                Ok(Value::Object(m)) => Some(m),
                _ => {
                    return Err(InvalidMessage(
                        "program params must be a JSON object".into(),
                    ))
                }
            },
        },
        variables: p
            .variables
            .into_iter()
            .map(|v| Variable {
                key: v.key,
                value: v.value,
                secret: v.secret,
            })
            .collect(),
        argv_style: match p.argv_style.as_str() {
            "" | "files" => ArgvStyle::Files,
            "legacy" => ArgvStyle::Legacy,
            s => return Err(InvalidMessage(format!("unknown argv_style {s:?}"))),
        },
        limits: p.limits.map(|l| crate::runner::Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_millicores: l.cpu_millicores,
        }),
    };
    prog.validate().map_err(|e| InvalidMessage(e.0))?;
    Ok(prog)
}

/// A dispatch as the gRPC wire carries it. An unstamped dispatch (tests, tools) is given
/// `now` and the gRPC TTL; a stamped one keeps its stamp, which its signature covers.
pub fn dispatch_to_pb(d: &Dispatch, now: i64) -> pb::Dispatch {
    let (issued_at, expires_at) = if d.stamp.issued_at > 0 {
        (d.stamp.issued_at, d.stamp.expires_at)
    } else {
        (now, now + crate::trust::GRPC_TTL_MS)
    };
    pb::Dispatch {
        execution_id: d.execution_id.0,
        attempt: d.attempt.0,
        task_id: d.task_id.0,
        program: Some(program_to_pb(&d.program)),
        timeout_ms: d.timeout.map_or(0, |t| t.as_millis() as u64),
        shard_index: d.shard_index,
        shard_total: d.shard_total,
        issued_at,
        expires_at,
        signature: d.stamp.sig.clone().unwrap_or_default().into_bytes(),
        pool: d.pool.clone().unwrap_or_default(),
        node: d.stamp.node.clone().unwrap_or_default(),
    }
}

/// A dispatch from the gRPC wire, with its stamp (unverified: the node checks it).
///
/// # Errors
/// No program, or a program that does not validate.
pub fn dispatch_from_pb(d: pb::Dispatch) -> Result<Dispatch, InvalidMessage> {
    let program = d
        .program
        .ok_or_else(|| InvalidMessage("dispatch without a program".into()))?;
    let program = program_from_pb(program)?;
    Ok(Dispatch {
        execution_id: ExecutionId(d.execution_id),
        task_id: TaskId(d.task_id),
        attempt: Attempt(d.attempt),
        program,
        timeout: (d.timeout_ms > 0).then(|| Duration::from_millis(d.timeout_ms)),
        shard_index: d.shard_index,
        shard_total: d.shard_total.max(1),
        pool: (!d.pool.is_empty()).then_some(d.pool),
        route: Default::default(),
        stamp: crate::trust::Stamp {
            node: (!d.node.is_empty()).then_some(d.node),
            issued_at: d.issued_at,
            expires_at: d.expires_at,
            sig: (!d.signature.is_empty())
                .then(|| String::from_utf8_lossy(&d.signature).into_owned()),
        },
    })
}

/// A pool event as a report item (what an executor sends back).
pub fn event_to_pb(ev: &RunEvent) -> pb::ReportItem {
    use pb::report_item::Kind;
    let key = ev.key();
    let kind = match ev {
        RunEvent::Started { .. } => Kind::Started(true),
        RunEvent::Log { chunk, .. } => Kind::Log(pb::LogChunk {
            seq: chunk.seq,
            stream: chunk.stream.as_str().into(),
            data: chunk.data.clone(),
        }),
        RunEvent::Finished { outcome, .. } => {
            let o = crate::delivery::OutcomeWire::from(outcome);
            Kind::Finished(pb::Outcome {
                status: o.status,
                exit_code: o.exit_code,
                signal: o.signal,
                result_json: o
                    .result
                    .map(|m| Value::Object(m).to_string())
                    .unwrap_or_default(),
                result_error: o.result_error,
                error: o.error,
                spawn_failed: o.spawn_failed,
                resources_json: o
                    .resources
                    .and_then(|r| serde_json::to_string(&r).ok())
                    .unwrap_or_default(),
            })
        }
    };
    pb::ReportItem {
        execution_id: key.execution.0,
        attempt: key.attempt.0,
        kind: Some(kind),
    }
}

/// A report item back into the pool event the scheduler's ingest understands.
pub fn event_from_pb(item: pb::ReportItem) -> Option<RunEvent> {
    use pb::report_item::Kind;
    let key = RunKey {
        execution: ExecutionId(item.execution_id),
        attempt: Attempt(item.attempt),
    };
    Some(match item.kind? {
        Kind::Started(_) => RunEvent::Started { key, pid: 0 },
        // Not an event of a run: the Report handler deals with it before this.
        Kind::NotStarted(_) => return None,
        Kind::Log(l) => RunEvent::Log {
            key,
            chunk: LogChunk {
                seq: l.seq,
                stream: if l.stream == "stderr" {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                },
                data: l.data,
            },
        },
        Kind::Finished(o) => RunEvent::Finished {
            key,
            outcome: crate::delivery::OutcomeWire {
                status: o.status,
                exit_code: o.exit_code,
                signal: o.signal,
                result: serde_json::from_str::<Value>(&o.result_json)
                    .ok()
                    .and_then(|v| v.as_object().cloned()),
                result_error: o.result_error,
                error: o.error,
                spawn_failed: o.spawn_failed,
                // Optional on the wire: an older node sends none.
                resources: serde_json::from_str(&o.resources_json).ok(),
            }
            .into_outcome(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_inputs_of_the_reference_survive_the_wire() {
        let mut p = Program::python("print(1)");
        p.params = serde_json::from_str(r#"{"host": "h", "n": [1, 2]}"#).unwrap();
        p.variables = vec![Variable {
            key: "K".into(),
            value: "v".into(),
            secret: true,
        }];
        p.argv_style = ArgvStyle::Legacy;
        assert_eq!(program_from_pb(program_to_pb(&p)).unwrap(), p);
        let plain = Program::shell("true");
        assert_eq!(program_from_pb(program_to_pb(&plain)).unwrap(), plain);
    }

    #[test]
    fn limits_and_resources_survive_the_wire() {
        let mut p = Program::shell("true");
        p.limits = Some(crate::runner::Limits {
            memory_bytes: Some(64 << 20),
            pids: Some(50),
            cpu_millicores: None,
        });
        assert_eq!(program_from_pb(program_to_pb(&p)).unwrap(), p);
        let key = RunKey {
            execution: ExecutionId(3),
            attempt: Attempt(2),
        };
        let mut outcome = crate::runner::Outcome::not_started(crate::runner::Ending::Signaled(9));
        outcome.signal = Some(9);
        outcome.resources = Some(Box::new(crate::runner::Resources {
            containment: "hybrid".into(),
            oom_killed: true,
            limits: p.limits.unwrap_or_default(),
            ..Default::default()
        }));
        let back = event_from_pb(event_to_pb(&RunEvent::Finished {
            key,
            outcome: outcome.clone(),
        }));
        let Some(RunEvent::Finished { outcome: b, .. }) = back else {
            panic!("not a Finished event: {back:?}");
        };
        assert_eq!(b.resources, outcome.resources);
        assert!(b.error().unwrap_or_default().contains("OOM killer"));
    }
}
