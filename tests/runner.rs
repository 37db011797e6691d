//! The process pool, through real child processes. This test binary never spawns children of
//! its own (the pool reaps every child of the process); it inspects processes through /proc.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etask::model::{Attempt, ExecutionId, Status};
use etask::runner::{
    Ending, LogChunk, LogLimits, Outcome, Pool, PoolConfig, Program, Rlimits, RunAs, RunEvent,
    RunRequest, Stream, SubmitError,
};
use serde_json::json;

/// `ETASK_TEST_CGROUP=off` runs every case in the fallback (no cgroups, runs found by their
/// environment token); the default contains runs in cgroups where the host allows.
/// `ETASK_TEST_CLONE=vfork` spawns with clone(CLONE_VM|CLONE_VFORK) instead of clone3.
fn cfg() -> PoolConfig {
    if std::env::var("ETASK_TEST_CLONE").as_deref() == Ok("vfork") {
        etask::runner::spawn::disable_clone3();
    }
    let root = std::env::temp_dir().join(format!("etask-test-ws-{}", std::process::id()));
    let want = std::env::var("ETASK_TEST_CGROUP")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or_default();
    PoolConfig {
        workspace_root: root,
        kill_grace: Duration::from_millis(500),
        cgroup: etask::runner::CgroupConfig {
            want,
            ..Default::default()
        },
        ..PoolConfig::default()
    }
}

struct Ran {
    outcome: Outcome,
    logs: Vec<LogChunk>,
    pid: Option<i32>,
}

impl Ran {
    fn text(&self, s: Stream) -> String {
        self.logs
            .iter()
            .filter(|c| c.stream == s)
            .map(|c| c.data.as_str())
            .collect()
    }
    fn result(&self) -> serde_json::Value {
        serde_json::Value::Object(self.outcome.result.clone().expect("a result"))
    }
}

fn collect(rx: crossbeam_channel::Receiver<RunEvent>) -> Ran {
    let mut logs = Vec::new();
    let mut pid = None;
    loop {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("run finished within 60 s")
        {
            RunEvent::Started { pid: p, .. } => pid = Some(p),
            RunEvent::Log { chunk, .. } => logs.push(chunk),
            RunEvent::Finished { outcome, .. } => return Ran { outcome, logs, pid },
        }
    }
}

fn run_on(pool: &Pool, program: Program, timeout: Option<Duration>) -> Ran {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
    let mut req = RunRequest::new(
        ExecutionId(NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)),
        program,
    );
    req.timeout = timeout;
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit(req, tx).expect("submit");
    collect(rx)
}

fn run(program: Program) -> Ran {
    let pool = Pool::start(cfg()).expect("pool");
    run_on(&pool, program, Some(Duration::from_secs(30)))
}

/// Waits until no process with this pid exists (it was killed and reaped).
fn gone(pid: i32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pids_in(text: &str, key: &str) -> Vec<i32> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key))
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

#[test]
fn merged_multi_object_result() {
    let r = run(Program::shell(
        "echo '{\"a\": 1, \"b\": {\"x\": 1}}' >&3\nprintf '  {\"b\": 2}\\n\\n{\"c\": \"three\"}' >&3\n",
    ));
    assert_eq!(r.outcome.status(), Status::Succeeded);
    assert_eq!(r.result(), json!({"a": 1, "b": 2, "c": "three"}));
    assert_eq!(r.outcome.result_error, None);
}

#[test]
fn python_sees_result_fd_and_reference_name() {
    let r = run(Program::python(
        "import os, json\nfd = int(os.environ['EWORK_RESULT_FD'])\nassert fd == int(os.environ['ETASK_RESULT_FD']) == 3\nos.write(fd, json.dumps({'py': True}).encode())\n",
    ));
    assert_eq!(
        r.result(),
        json!({"py": true}),
        "stderr: {}",
        r.text(Stream::Stderr)
    );
}

#[test]
fn invalid_json_after_valid_object_keeps_object_exit_code_and_logs() {
    let r = run(Program::shell(
        "echo '{\"ok\": true}' >&3\necho 'oops {' >&3\necho still-logged\nexit 3\n",
    ));
    assert_eq!(r.outcome.ending, Ending::Exited(3));
    assert_eq!(r.outcome.exit_code, Some(3));
    assert_eq!(r.result(), json!({"ok": true}));
    let err = r.outcome.result_error.clone().expect("result_error");
    assert!(err.contains("invalid JSON on fd 3"), "{err}");
    assert_eq!(r.text(Stream::Stdout), "still-logged\n");
}

#[test]
fn result_over_cap_is_truncated_and_child_not_blocked() {
    let pool = Pool::start(PoolConfig {
        result_max_bytes: 1024,
        ..cfg()
    })
    .unwrap();
    // 5 MB to fd 3: far over the cap and over any pipe buffer; the child must still finish.
    let r = run_on(
        &pool,
        Program::shell(
            "echo '{\"first\": 1}' >&3\nhead -c 5000000 /dev/zero | tr '\\0' 'x' >&3\necho done\n",
        ),
        Some(Duration::from_secs(20)),
    );
    assert_eq!(r.outcome.status(), Status::Succeeded);
    assert!(r.outcome.result_truncated);
    assert_eq!(r.result(), json!({"first": 1}));
    assert!(r
        .outcome
        .result_error
        .as_deref()
        .unwrap()
        .contains("exceeded the limit of 1024 bytes"));
    assert_eq!(r.text(Stream::Stdout), "done\n");
}

#[test]
fn script_that_never_reads_stdin_finishes() {
    let mut p = Program::shell("echo ignoring-stdin\n");
    p.stdin = Some("y\n".repeat(2 << 20)); // 4 MiB: more than a pipe holds
    let r = run(p);
    assert_eq!(r.outcome.status(), Status::Succeeded);
    assert_eq!(r.text(Stream::Stdout), "ignoring-stdin\n");
}

#[test]
fn stdin_is_delivered() {
    let mut p = Program::shell("wc -c\n");
    p.stdin = Some("z".repeat(300_000));
    let r = run(p);
    assert_eq!(r.text(Stream::Stdout).trim(), "300000");
}

#[test]
fn stdout_and_stderr_are_kept_per_stream_in_order() {
    let r = run(Program::shell(
        "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done\n",
    ));
    assert_eq!(r.text(Stream::Stdout), "out1\nout2\nout3\nout4\nout5\n");
    assert_eq!(r.text(Stream::Stderr), "err1\nerr2\nerr3\nerr4\nerr5\n");
    let seqs: Vec<u64> = r.logs.iter().map(|c| c.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seq numbers are consecutive: {seqs:?}"
    );
}

#[test]
fn logs_stream_while_the_script_runs() {
    let pool = Pool::start(cfg()).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit(
        RunRequest::new(
            ExecutionId(900_001),
            Program::shell("echo early\nsleep 3\necho late\n"),
        ),
        tx,
    )
    .unwrap();
    let t0 = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            RunEvent::Log { chunk, .. } => {
                assert_eq!(chunk.data, "early\n");
                assert!(
                    t0.elapsed() < Duration::from_millis(2500),
                    "first line arrived before the script ended"
                );
                break;
            }
            RunEvent::Finished { .. } => panic!("finished before any log was streamed"),
            _ => {}
        }
    }
}

#[test]
fn output_flood_of_100_mb_is_capped() {
    let limits = LogLimits {
        run_max_bytes: 1 << 20,
        ..LogLimits::default()
    };
    let pool = Pool::start(PoolConfig {
        logs: limits,
        ..cfg()
    })
    .unwrap();
    let r = run_on(
        &pool,
        Program::shell("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 100000000\n"),
        Some(Duration::from_secs(60)),
    );
    assert_eq!(r.outcome.status(), Status::Succeeded);
    assert_eq!(r.outcome.log_bytes, 100_000_000, "every byte was drained");
    assert!(r.outcome.log_truncated);
    let kept: usize = r.logs.iter().map(|c| c.data.len()).sum();
    assert!(kept <= (1 << 20) + 200, "kept {kept} bytes, cap is 1 MiB");
    assert!(r
        .text(Stream::Stdout)
        .ends_with("further output is discarded]\n"));
}

#[test]
fn long_line_is_truncated_with_marker() {
    let limits = LogLimits {
        line_max_bytes: 100,
        ..LogLimits::default()
    };
    let pool = Pool::start(PoolConfig {
        logs: limits,
        ..cfg()
    })
    .unwrap();
    let r = run_on(
        &pool,
        Program::shell("head -c 5000 /dev/zero | tr '\\0' a; echo; echo short\n"),
        None,
    );
    let out = r.text(Stream::Stdout);
    assert_eq!(
        out,
        format!(
            "{} …[etask: line truncated at 100 bytes]\nshort\n",
            "a".repeat(100)
        )
    );
}

#[test]
fn timeout_kills_setsid_escapee_and_double_forked_grandchild() {
    let pool = Pool::start(cfg()).unwrap();
    let script = "setsid sleep 1000 &\necho escapee=$!\n( sleep 1001 & echo grandchild=$! ) \nsleep 1002 &\necho child=$!\nsleep 100\n";
    let t0 = Instant::now();
    let r = run_on(
        &pool,
        Program::shell(script),
        Some(Duration::from_millis(700)),
    );
    assert_eq!(r.outcome.ending, Ending::TimedOut);
    assert_eq!(r.outcome.status(), Status::TimedOut);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let out = r.text(Stream::Stdout);
    let mut pids = pids_in(&out, "escapee=");
    pids.extend(pids_in(&out, "grandchild="));
    pids.extend(pids_in(&out, "child="));
    pids.extend(r.pid);
    assert_eq!(pids.len(), 4, "all pids printed: {out}");
    for pid in pids {
        assert!(
            gone(pid, Duration::from_secs(3)),
            "pid {pid} survived the timeout"
        );
    }
}

#[test]
fn processes_left_behind_after_a_normal_exit_are_stopped() {
    let r = run(Program::shell(
        "setsid sleep 1000 > /dev/null 2>&1 &\necho left=$!\n",
    ));
    assert_eq!(r.outcome.status(), Status::Succeeded);
    let pid = pids_in(&r.text(Stream::Stdout), "left=")[0];
    assert!(
        gone(pid, Duration::from_secs(3)),
        "leftover {pid} still alive"
    );
}

#[test]
fn cancel_mid_run_stops_the_tree() {
    let pool = Pool::start(cfg()).unwrap();
    let req = RunRequest::new(
        ExecutionId(900_002),
        Program::shell("echo started\nsleep 1000\n"),
    );
    let key = req.key();
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit(req, tx).unwrap();
    let mut pid = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            RunEvent::Started { pid: p, .. } => pid = Some(p),
            RunEvent::Log { .. } => break,
            RunEvent::Finished { .. } => panic!("finished before cancel"),
        }
    }
    pool.cancel(key);
    pool.cancel(key); // idempotent
    let r = collect(rx);
    assert_eq!(r.outcome.ending, Ending::Cancelled);
    assert_eq!(r.outcome.status(), Status::Cancelled);
    assert!(gone(pid.unwrap(), Duration::from_secs(3)));
}

#[test]
fn sigterm_ignoring_script_is_killed_after_grace() {
    let pool = Pool::start(PoolConfig {
        kill_grace: Duration::from_millis(300),
        ..cfg()
    })
    .unwrap();
    let r = run_on(
        &pool,
        Program::shell("trap '' TERM\nsleep 1000\n"),
        Some(Duration::from_millis(300)),
    );
    assert_eq!(r.outcome.ending, Ending::TimedOut);
    assert_eq!(r.outcome.signal, Some(libc::SIGKILL));
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn uid_has_processes(uid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|s| {
            s.lines().any(|l| {
                l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())
            })
        })
        .count()
}

#[test]
fn fork_bomb_is_contained_by_the_process_limit() {
    assert!(
        is_root(),
        "this test drops to an unprivileged uid and needs root (CI runs as root)"
    );
    let uid = 64_000 + (std::process::id() % 1000);
    let pool = Pool::start(PoolConfig {
        run_as: Some(RunAs { uid, gid: uid }),
        limits: Rlimits {
            processes: Some(30),
            ..Rlimits::default()
        },
        kill_grace: Duration::from_millis(200),
        ..cfg()
    })
    .unwrap();
    let r = run_on(
        &pool,
        Program::shell("bomb() { bomb | bomb & }\nbomb\nsleep 5\n"),
        Some(Duration::from_secs(2)),
    );
    assert!(
        matches!(r.outcome.ending, Ending::TimedOut | Ending::Exited(_)),
        "the node survived and reported: {:?}",
        r.outcome.ending
    );
    let end = Instant::now() + Duration::from_secs(5);
    while uid_has_processes(uid) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        uid_has_processes(uid),
        0,
        "bomb processes of uid {uid} left behind"
    );
}

#[test]
fn run_as_drops_to_the_given_uid_and_gid() {
    assert!(is_root(), "needs root (CI runs as root)");
    let pool = Pool::start(PoolConfig {
        run_as: Some(RunAs {
            uid: 65534,
            gid: 65534,
        }),
        ..cfg()
    })
    .unwrap();
    let r = run_on(&pool, Program::shell("echo \"$(id -u) $(id -g) $(id -G)\"\ntouch \"$ETASK_WORKSPACE/can-write\" && echo ws-ok\n"), None);
    assert_eq!(
        r.text(Stream::Stdout),
        "65534 65534 65534\nws-ok\n",
        "stderr: {}",
        r.text(Stream::Stderr)
    );
}

#[test]
fn missing_interpreter_is_a_spawn_failure_not_a_panic() {
    let mut c = cfg();
    c.interpreters.python = "/nonexistent/python3".into();
    let pool = Pool::start(c).unwrap();
    let r = run_on(&pool, Program::python("print(1)"), None);
    match &r.outcome.ending {
        Ending::SpawnFailed(reason) => assert!(reason.contains("/nonexistent/python3"), "{reason}"),
        other => panic!("expected spawn failure, got {other:?}"),
    }
    assert_eq!(r.outcome.status(), Status::Failed);
    // The pool keeps working afterwards.
    assert_eq!(
        run_on(&pool, Program::shell("true"), None).outcome.status(),
        Status::Succeeded
    );
}

#[test]
fn environment_is_scrubbed_and_describes_the_run() {
    std::env::set_var("ETASK_TEST_LEAK", "must-not-leak");
    let mut p = Program::shell("env | sort\n");
    p.env = BTreeMap::from([("EXTRA".into(), "1".into())]);
    let pool = Pool::start(cfg()).unwrap();
    let mut req = RunRequest::new(ExecutionId(77), p);
    req.attempt = Attempt(3);
    req.task_id = etask::model::TaskId(5);
    req.shard_index = 2;
    req.shard_total = 4;
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit(req, tx).unwrap();
    let r = collect(rx);
    let env = r.text(Stream::Stdout);
    for want in [
        "ETASK_EXECUTION_ID=77",
        "ETASK_TASK_ID=5",
        "ETASK_ATTEMPT=3",
        "ETASK_SHARD_INDEX=2",
        "ETASK_SHARD_TOTAL=4",
        "ETASK_RESULT_FD=3",
        "EWORK_RESULT_FD=3",
        "EXTRA=1",
        "LANG=C.UTF-8",
    ] {
        assert!(env.lines().any(|l| l == want), "missing {want} in:\n{env}");
    }
    assert!(!env.contains("must-not-leak"));
    let ws = env
        .lines()
        .find_map(|l| l.strip_prefix("ETASK_WORKSPACE="))
        .unwrap();
    assert!(env.lines().any(|l| l == format!("HOME={ws}")));
    assert!(env.lines().any(|l| l == format!("TMPDIR={ws}/tmp")));
    assert!(
        !PathBuf::from(ws).exists(),
        "workspace removed after the run"
    );
}

#[test]
fn only_fds_0_to_3_reach_the_child() {
    // An fd the node holds without CLOEXEC must not leak into scripts.
    // (Moved above 3 with F_DUPFD: when this test runs alone, open() would return 3 itself.)
    let leaked = unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        libc::fcntl(fd, libc::F_DUPFD, 50)
    };
    assert!(leaked >= 50);
    let r = run(Program::exec(vec![
        "sh".into(),
        "-c".into(),
        "ls /proc/$$/fd".into(),
    ]));
    unsafe { libc::close(leaked) };
    let fds: Vec<i32> = r
        .text(Stream::Stdout)
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fds, vec![0, 1, 2, 3], "fds seen by the child");
}

/// A secret that ends up in the program itself (a path in its argv) is masked in the spawn
/// failure that quotes it, as in its output.
#[test]
fn a_secret_in_a_failing_argv_is_masked_in_the_error() {
    let mut p = Program::exec(vec!["/nonexistent/hunter2TopSecret".into()]);
    p.secret_env.insert("PW".into(), "hunter2TopSecret".into());
    let r = run(p);
    let err = r.outcome.error().unwrap_or_default();
    assert!(err.contains("spawn failed"), "{err}");
    assert!(!err.contains("hunter2TopSecret"), "{err}");
    assert!(err.contains("******"), "{err}");
}

#[test]
fn secret_env_values_are_masked_in_logs() {
    let mut p = Program::shell("echo \"token is $API_TOKEN\" >&2\n");
    p.secret_env.insert("API_TOKEN".into(), "tok-123456".into());
    let r = run(p);
    assert_eq!(r.text(Stream::Stderr), "token is ******\n");
}

#[test]
fn uploaded_executable_and_workdir() {
    let mut p = Program {
        code: Some("#!/bin/sh\necho \"in $(basename \"$PWD\") args=$*\"\n".into()),
        ..Program::exec(vec![])
    };
    p.argv = None;
    p.args = vec!["a".into(), "b c".into()];
    p.workdir = Some("sub/dir".into());
    let r = run(p);
    assert_eq!(
        r.text(Stream::Stdout),
        "in dir args=a b c\n",
        "stderr: {}",
        r.text(Stream::Stderr)
    );
}

#[test]
fn invalid_env_name_is_rejected_before_spawn() {
    let pool = Pool::start(cfg()).unwrap();
    let mut p = Program::shell("true");
    p.env.insert("BAD-NAME".into(), "x".into());
    let (tx, _rx) = crossbeam_channel::unbounded();
    let err = pool
        .submit(RunRequest::new(ExecutionId(1), p), tx)
        .unwrap_err();
    assert!(matches!(err, SubmitError::Invalid(_)));
    assert!(
        err.to_string()
            .contains("invalid env variable name \"BAD-NAME\""),
        "{err}"
    );
}

#[test]
fn full_pool_refuses_with_a_clear_error() {
    let pool = Pool::start(PoolConfig {
        max_concurrent: 1,
        queue_capacity: 1,
        ..cfg()
    })
    .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..2 {
        pool.submit(
            RunRequest::new(ExecutionId(500 + i), Program::shell("sleep 0.3")),
            tx.clone(),
        )
        .unwrap();
    }
    let err = pool
        .submit(
            RunRequest::new(ExecutionId(502), Program::shell("true")),
            tx.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            SubmitError::Full {
                in_flight: 2,
                capacity: 2
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("pool is full"));
    let mut finished = 0;
    while finished < 2 {
        if let RunEvent::Finished { outcome, .. } =
            rx.recv_timeout(Duration::from_secs(10)).unwrap()
        {
            assert_eq!(outcome.status(), Status::Succeeded);
            finished += 1;
        }
    }
    // Room again once they are done.
    pool.submit(
        RunRequest::new(ExecutionId(503), Program::shell("true")),
        tx,
    )
    .unwrap();
}

#[test]
fn two_hundred_concurrent_runs_get_their_own_results() {
    let pool = Pool::start(PoolConfig {
        max_concurrent: 200,
        ..cfg()
    })
    .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..200i64 {
        let p = Program::shell(format!(
            "echo line-{i}\nsleep 0.2\necho '{{\"n\": {i}, \"id\": '$ETASK_EXECUTION_ID'}}' >&3\n"
        ));
        pool.submit(RunRequest::new(ExecutionId(10_000 + i), p), tx.clone())
            .unwrap();
    }
    let mut logs: BTreeMap<i64, String> = BTreeMap::new();
    let mut done = 0;
    while done < 200 {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("all 200 finish")
        {
            RunEvent::Log { key, chunk } => logs
                .entry(key.execution.0)
                .or_default()
                .push_str(&chunk.data),
            RunEvent::Finished { key, outcome } => {
                let n = key.execution.0 - 10_000;
                assert_eq!(
                    outcome.status(),
                    Status::Succeeded,
                    "run {n}: {:?}",
                    outcome
                );
                assert_eq!(
                    serde_json::Value::Object(outcome.result.unwrap()),
                    json!({"n": n, "id": key.execution.0})
                );
                done += 1;
            }
            RunEvent::Started { .. } => {}
        }
    }
    for (id, text) in logs {
        assert_eq!(text, format!("line-{}\n", id - 10_000));
    }
}

#[test]
fn child_starts_with_no_blocked_or_ignored_signals() {
    // The node blocks SIGTERM/SIGINT/SIGHUP (read with sigwait) and Rust ignores SIGPIPE; a
    // pool started from such a thread must not pass either state on to scripts.
    let r = std::thread::spawn(|| {
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let pool = Pool::start(cfg()).unwrap();
        run_on(
            &pool,
            Program::exec(vec![
                "grep".into(),
                "-E".into(),
                "^Sig(Blk|Ign)".into(),
                "/proc/self/status".into(),
            ]),
            None,
        )
    })
    .join()
    .unwrap();
    let masks: Vec<u64> = r
        .text(Stream::Stdout)
        .lines()
        .map(|l| u64::from_str_radix(l.split('\t').nth(1).unwrap(), 16).unwrap())
        .collect();
    // Standard signals 1..=31 (bits 0..=30); the real-time ones reserved by libc are not ours.
    assert_eq!(
        masks.iter().map(|m| m & 0x7fff_ffff).collect::<Vec<_>>(),
        vec![0, 0],
        "SigBlk, SigIgn"
    );
}

#[test]
fn a_long_queue_drains_through_few_slots() {
    // Slots freed by timers must be refilled at once, not at the next unrelated wake-up
    // (a run that exits quietly frees its slot from the timer pass).
    let pool = Pool::start(PoolConfig {
        max_concurrent: 2,
        queue_capacity: 300,
        ..cfg()
    })
    .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..300i64 {
        pool.submit(
            RunRequest::new(ExecutionId(20_000 + i), Program::shell("true")),
            tx.clone(),
        )
        .unwrap();
    }
    let mut done = 0;
    while done < 300 {
        if let RunEvent::Finished { outcome, .. } = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("queue stalled after {done} runs"))
        {
            assert_eq!(outcome.status(), Status::Succeeded, "{outcome:?}");
            done += 1;
        }
    }
}

/// The reference ETask's inputs: params {"host"}, a plain and a secret variable (a value with
/// a space, a quote and a `$`, which must neither break `source` nor run as code).
fn with_reference_inputs(mut p: Program) -> Program {
    use etask::runner::Variable;
    p.params = Some(
        json!({"host": "10.0.0.7", "port": 22})
            .as_object()
            .unwrap()
            .clone(),
    );
    p.variables = vec![
        Variable {
            key: "DB_USER".into(),
            value: "ops".into(),
            secret: false,
        },
        Variable {
            key: "DB_PASSWORD".into(),
            value: "s3cr3t pa'ss$word".into(),
            secret: true,
        },
    ];
    p
}

fn script(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/scripts/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn scripts_of_each_reference_contract_run_unchanged_and_never_log_a_secret_variable() {
    use etask::runner::{ArgvStyle, ShellKind};
    let want = json!({"host": "10.0.0.7", "user": "ops", "password_len": 17});
    let mut legacy_sh = with_reference_inputs(Program::shell(script("legacy.sh")));
    legacy_sh.shell = Some(ShellKind::Bash);
    legacy_sh.argv_style = ArgvStyle::Legacy;
    let mut legacy_py = with_reference_inputs(Program::python(script("legacy.py")));
    legacy_py.argv_style = ArgvStyle::Legacy;
    let files_sh = with_reference_inputs(Program::shell(script("files.sh")));
    let files_py = with_reference_inputs(Program::python(script("files.py")));
    for (name, p) in [
        ("legacy.sh", legacy_sh),
        ("legacy.py", legacy_py),
        ("files.sh", files_sh),
        ("files.py", files_py),
    ] {
        let r = run(p);
        let logs = format!("{}{}", r.text(Stream::Stdout), r.text(Stream::Stderr));
        assert_eq!(
            r.outcome.status(),
            Status::Succeeded,
            "{name}: {:?} {logs}",
            r.outcome
        );
        assert_eq!(r.result(), want, "{name}: {logs}");
        assert!(logs.contains("checking 10.0.0.7 as ops"), "{name}: {logs}");
        assert!(!logs.contains("s3cr3t"), "{name} leaked the secret: {logs}");
        assert!(logs.contains("******"), "{name}: {logs}");
    }
}

#[test]
fn input_files_default_to_empty_json_and_variables_are_environment() {
    let mut p = Program::python(
        "import json, os\n\
         a = json.load(open(os.environ['ETASK_ARGS_FILE']))\n\
         v = json.load(open(os.environ['ETASK_VARIABLES_FILE']))\n\
         os.write(3, json.dumps({'args': a, 'vars': v, 'mode': oct(os.stat(os.environ['ETASK_ARGS_FILE']).st_mode & 0o777)}).encode())\n",
    );
    let r = run(p.clone());
    assert_eq!(r.result(), json!({"args": {}, "vars": [], "mode": "0o600"}));
    // A later variable of the same name wins, as in the reference.
    p = Program::shell("echo \"{\\\"v\\\": \\\"$K\\\"}\" >&3\n");
    p.variables = vec![
        etask::runner::Variable {
            key: "K".into(),
            value: "first".into(),
            secret: false,
        },
        etask::runner::Variable {
            key: "K".into(),
            value: "second".into(),
            secret: false,
        },
    ];
    assert_eq!(run(p).result(), json!({"v": "second"}));
}

/// Uploaded executables written and exec'd by several launcher threads at once, next to
/// shell runs being spawned: every one starts. Before, a clone by one launcher could hand the
/// write fd of another run's executable to its child, whose `execve` then failed ETXTBSY.
#[test]
fn uploaded_executables_spawned_concurrently_all_start() {
    let pool = Pool::start(PoolConfig {
        max_concurrent: 64,
        launchers: 4,
        ..cfg()
    })
    .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let n = 400i64;
    for i in 0..n {
        let p = if i % 4 == 3 {
            Program::shell("true\n")
        } else {
            let mut p = Program {
                // Large enough that writing it takes a moment.
                code: Some(format!(
                    "#!/bin/sh\n#{}\necho ok-{i}\n",
                    "x".repeat(64 * 1024)
                )),
                ..Program::exec(vec![])
            };
            p.argv = None;
            p
        };
        pool.submit(RunRequest::new(ExecutionId(50_000 + i), p), tx.clone())
            .unwrap();
    }
    let mut done = 0;
    while done < n {
        if let RunEvent::Finished { key, outcome } = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("all runs finish")
        {
            assert_eq!(
                outcome.status(),
                Status::Succeeded,
                "run {}: {:?}",
                key.execution.0 - 50_000,
                outcome
            );
            done += 1;
        }
    }
}
