//! End to end through the real binary and its HTTP API: `etask server --mode all` on a free
//! port, with the embedded store (and MariaDB for the two-scheduler test).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{pid_alive, shell, Server};

/// Submits a script that records its pid and sleeps; returns its execution and pid once running.
fn start_long_script(s: &Server, dir: &Path) -> (i64, i32) {
    let pidfile = dir.join("pid");
    let (_, e) = s.submit(shell(
        "long",
        &format!("echo $$ > {}\nexec sleep 60\n", pidfile.display()),
    ));
    s.wait_for(e, Duration::from_secs(20), |v| {
        v["status"] == "running" && pidfile.exists()
    });
    std::thread::sleep(Duration::from_millis(100)); // the pid is written
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (e, pid)
}

#[test]
fn submitted_script_succeeds_with_merged_result() {
    let s = Server::start(&support::temp_dir("e2e-ok"), &[], "");
    let (_, e) = s.submit(shell(
        "disk",
        "echo checking\necho '{\"disk_free_gb\": 41, \"a\": 1}' >&3\necho '{\"a\": 2}' >&3\n",
    ));
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"disk_free_gb": 41, "a": 2}));
    assert_eq!(v["exit_code"], 0);
    assert!(v["node"].as_str().unwrap().starts_with("local-"));
    let (code, _) = s.call("GET", "/healthz", None);
    assert_eq!(code, 200);
}

#[test]
fn failing_script_is_retried_then_fails_with_attempts_recorded() {
    let s = Server::start(&support::temp_dir("e2e-retry"), &[], "");
    let mut body = shell("flaky", "echo \"attempt $ETASK_ATTEMPT\" >&2\nexit 3\n");
    body["retry"] = json!({"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 200});
    let (_, e) = s.submit(body);
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["attempt"], 3);
    assert_eq!(v["exit_code"], 3);
    let atts: Vec<(i64, String)> = v["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["attempt"].as_i64().unwrap(),
                a["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        atts,
        vec![
            (1, "failed".into()),
            (2, "failed".into()),
            (3, "failed".into())
        ]
    );
    let (_, logs) = (
        0,
        ureq::get(&format!("{}/api/v1/executions/{e}/logs", s.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    );
    for n in 1..=3 {
        assert!(logs.contains(&format!("attempt {n}")), "{logs}");
    }
}

#[test]
fn timeout_ends_the_execution_as_timed_out() {
    let s = Server::start(&support::temp_dir("e2e-timeout"), &[], "");
    let mut body = shell("slow", "sleep 30\n");
    body["timeout_seconds"] = json!(0.5);
    let (_, e) = s.submit(body);
    let t0 = Instant::now();
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "timed_out", "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the 30 s sleep was not cut short"
    );
}

#[test]
fn cancel_while_running_stops_the_script() {
    let dir = support::temp_dir("e2e-cancel");
    let s = Server::start(&dir, &[], "");
    let (e, pid) = start_long_script(&s, &dir);
    assert!(pid_alive(pid));
    let (code, v) = s.call(
        "POST",
        &format!("/api/v1/executions/{e}/cancel"),
        Some("{}"),
    );
    assert_eq!(
        (code, v["status"].as_str()),
        (200, Some("cancelled")),
        "{v}"
    );
    let (code, _) = s.call(
        "POST",
        &format!("/api/v1/executions/{e}/cancel"),
        Some("{}"),
    );
    assert_eq!(code, 200, "cancel is idempotent");
    let t0 = Instant::now();
    while pid_alive(pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !pid_alive(pid),
        "script process {pid} still alive after cancel"
    );
    assert_eq!(s.execution(e)["status"], "cancelled");
}

#[test]
fn same_request_id_returns_the_same_ids() {
    let s = Server::start(&support::temp_dir("e2e-idem"), &[], "");
    let mut body = shell("idem", "true");
    body["request_id"] = json!("ecmdb-42");
    let (c1, v1) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    let (c2, v2) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!((c1, c2), (201, 200));
    assert_eq!(v1, v2);
    let tid = v1["task_id"].as_i64().unwrap();
    let (_, list) = s.call("GET", &format!("/api/v1/executions?task_id={tid}"), None);
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn cron_task_fires_repeatedly_and_pause_stops_it() {
    let s = Server::start(&support::temp_dir("e2e-cron"), &[], "");
    let mut body = shell("tick", "echo tick");
    body["schedule"] = json!({"kind": "cron", "expr": "* * * * * *"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    assert!(v["execution_id"].is_null());
    let tid = v["task_id"].as_i64().unwrap();
    let count = || {
        s.call(
            "GET",
            &format!("/api/v1/executions?task_id={tid}&status=succeeded"),
            None,
        )
        .1["items"]
            .as_array()
            .unwrap()
            .len()
    };
    let t0 = Instant::now();
    while count() < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(count() >= 2, "cron fired {} times in 10 s", count());
    assert_eq!(
        s.call("POST", &format!("/api/v1/tasks/{tid}/pause"), Some("{}"))
            .0,
        200
    );
    std::thread::sleep(Duration::from_millis(1500));
    let all = || {
        s.call("GET", &format!("/api/v1/executions?task_id={tid}"), None)
            .1["items"]
            .as_array()
            .unwrap()
            .len()
    };
    let paused_at = all();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(all(), paused_at, "a paused cron task fired");
}

#[test]
fn logs_follow_streams_until_the_execution_ends() {
    let s = Server::start(&support::temp_dir("e2e-follow"), &[], "");
    let (_, e) = s.submit(shell(
        "talk",
        "for i in 1 2 3 4 5; do echo line-$i; sleep 0.2; done\necho oops >&2\n",
    ));
    let t0 = Instant::now();
    let resp = ureq::get(&format!("{}/api/v1/executions/{e}/logs?follow=true", s.url))
        .call()
        .unwrap();
    let mut lines = Vec::new();
    let mut first_at = None;
    for l in BufReader::new(resp.into_reader()).lines() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        first_at.get_or_insert(t0.elapsed());
        lines.push((
            v["stream"].as_str().unwrap().to_owned(),
            v["data"].as_str().unwrap().to_owned(),
        ));
    }
    let out: String = lines
        .iter()
        .filter(|(s, _)| s == "stdout")
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(out, "line-1\nline-2\nline-3\nline-4\nline-5\n");
    assert!(lines.iter().any(|(s, d)| s == "stderr" && d == "oops\n"));
    assert!(
        first_at.unwrap() < Duration::from_millis(900),
        "first chunk arrived only after {:?}",
        first_at
    );
    assert_eq!(
        s.execution(e)["status"],
        "succeeded",
        "the stream ended before the execution did"
    );
}

#[test]
fn bad_requests_get_the_documented_errors() {
    let dir = support::temp_dir("e2e-bad");
    let s = Server::start(&dir, &[], "[server]\nmax_body_bytes = 10000\n");
    let post = |b: &str| s.call("POST", "/api/v1/tasks", Some(b));
    let check = |(code, v): (u16, Value), want: u16, kind: &str, needle: &str| {
        assert_eq!(code, want, "{v}");
        assert_eq!(v["error"]["code"], kind, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    };
    check(post("{not json"), 400, "invalid_argument", "invalid task");
    check(
        post(r#"{"name": 5, "program": {"kind": "shell", "code": "true"}}"#),
        400,
        "invalid_argument",
        "invalid type",
    );
    check(
        post(r#"{"name": "x", "colour": "red", "program": {"kind": "shell", "code": "true"}}"#),
        400,
        "invalid_argument",
        "colour",
    );
    check(
        post(
            r#"{"name": "x", "program": {"kind": "shell", "code": "true", "env": {"1BAD": "v"}}}"#,
        ),
        400,
        "invalid_argument",
        "1BAD",
    );
    check(
        post(
            r#"{"name": "x", "schedule": {"kind": "cron", "expr": "61 * * * * *"}, "program": {"kind": "shell", "code": "true"}}"#,
        ),
        400,
        "invalid_argument",
        "cron",
    );
    let big =
        json!({"name": "x", "program": {"kind": "shell", "code": "x".repeat(20_000)}}).to_string();
    check(post(&big), 413, "payload_too_large", "limit");
    check(
        s.call("GET", "/api/v1/executions/999999", None),
        404,
        "not_found",
        "999999",
    );
    check(
        s.call("GET", "/api/v1/tasks/424242", None),
        404,
        "not_found",
        "424242",
    );
    check(
        s.call("GET", "/api/v1/executions/abc", None),
        400,
        "invalid_argument",
        "abc",
    );
    check(
        s.call("POST", "/api/v1/executions/31337/cancel", Some("{}")),
        404,
        "not_found",
        "31337",
    );
    check(
        s.call("GET", "/api/v1/nowhere", None),
        404,
        "not_found",
        "nowhere",
    );
    // Ids, cursors and sequence numbers are bounded where they enter (after_seq=i64::MAX
    // panicked a worker on `after_seq + 1`).
    for path in [
        "/api/v1/executions/1/logs?after_seq=9223372036854775807",
        "/api/v1/executions/1/logs?after_seq=-1",
        "/api/v1/executions?cursor=-5",
        "/api/v1/executions?task_id=9007199254740992",
        "/api/v1/tasks?cursor=9223372036854775807",
        "/api/v1/executions/9223372036854775807",
    ] {
        check(
            s.call("GET", path, None),
            400,
            "invalid_argument",
            "9007199254740991",
        );
    }
    assert!(
        !s.log().contains("panicked"),
        "a worker panicked:\n{}",
        s.log()
    );
    // Limits the kernel cannot take and timeouts that round to nothing are refused at intake
    // (every run failed to spawn; 0.0001 s became "no timeout" on the gRPC paths).
    for (body, needle) in [
        (
            r#"{"name": "x", "program": {"kind": "shell", "code": "true", "limits": {"pids": 18446744073709551615}}}"#,
            "limits.pids",
        ),
        (
            r#"{"name": "x", "timeout_seconds": 0.0001, "program": {"kind": "shell", "code": "true"}}"#,
            "timeout_seconds",
        ),
    ] {
        check(post(body), 400, "invalid_argument", needle);
    }
    // With a query too (it was judged before the route and answered 400).
    check(
        s.call("GET", "/api/v1/nowhere?limit=5", None),
        404,
        "not_found",
        "nowhere",
    );
    let (_, e) = s.submit(shell("quick", "true"));
    s.wait_final(e, Duration::from_secs(20));
    check(
        s.call(
            "POST",
            &format!("/api/v1/executions/{e}/cancel"),
            Some("{}"),
        ),
        409,
        "conflict",
        "succeeded",
    );
    // The server is still fine after all that.
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
}

#[test]
fn token_is_required_when_configured() {
    let s = Server::start(
        &support::temp_dir("e2e-auth"),
        &[],
        "[server]\ntoken = \"s3cret\"\n",
    );
    let (code, v) = s.call("GET", "/api/v1/tasks", None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let r = ureq::get(&format!("{}/api/v1/tasks", s.url))
        .set("Authorization", "Bearer s3cret")
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = ureq::get(&format!("{}/api/v1/tasks", s.url))
        .set("Authorization", "Bearer s3creX")
        .call();
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));
}

/// Receives callbacks on a free port; `bodies` collects them.
fn callback_receiver() -> (
    String,
    crossbeam_channel::Receiver<Value>,
    tiny_http::Server,
    u16,
) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let (_tx, rx) = crossbeam_channel::unbounded();
    (format!("http://127.0.0.1:{port}/cb"), rx, server, port)
}

fn serve_callbacks(server: tiny_http::Server, tx: crossbeam_channel::Sender<Value>) {
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            let _ = tx.send(serde_json::from_str(&body).unwrap_or(Value::Null));
            let _ = req.respond(tiny_http::Response::from_string("ok"));
        }
    });
}

#[test]
fn sigkill_mid_run_then_restart_ends_definitely_and_delivers_callbacks() {
    let dir = support::temp_dir("e2e-crash");
    // Reserve a port for the callback receiver, but do not listen yet: callbacks fail and wait
    // in the outbox across the crash.
    let (cb_url, _, reserved, port) = callback_receiver();
    drop(reserved);
    let mut s = Server::start(&dir, &[], "");
    let mut quick = shell("quick", "echo '{\"ok\": true}' >&3");
    quick["callback_url"] = json!(cb_url);
    let (_, quick_e) = s.submit(quick);
    let mut long = shell("long", "exec sleep 60");
    long["callback_url"] = json!(cb_url);
    let (long_t, long_e) = s.submit(long);
    s.wait_final(quick_e, Duration::from_secs(20));
    s.wait_for(long_e, Duration::from_secs(20), |v| {
        v["status"] == "running"
    });
    std::thread::sleep(Duration::from_millis(500)); // at least one failed callback attempt
    s.kill9();

    let server = tiny_http::Server::http(format!("127.0.0.1:{port}")).unwrap();
    let (tx, got) = crossbeam_channel::unbounded();
    serve_callbacks(server, tx);
    let s2 = Server::start(&dir, &[], "");
    let v = s2.wait_final(long_e, Duration::from_secs(30));
    assert_eq!(v["status"], "lost", "{v}");
    assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
    let (_, list) = s2.call("GET", &format!("/api/v1/executions?task_id={long_t}"), None);
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "the crashed run was duplicated: {list}"
    );
    let mut seen = std::collections::HashMap::new();
    let t0 = Instant::now();
    while seen.len() < 2 && t0.elapsed() < Duration::from_secs(20) {
        if let Ok(b) = got.recv_timeout(Duration::from_millis(200)) {
            *seen.entry(b["id"].as_i64().unwrap()).or_insert(0) += 1;
            assert!(
                matches!(b["status"].as_str(), Some("succeeded" | "lost")),
                "{b}"
            );
        }
    }
    assert!(
        seen.contains_key(&quick_e),
        "the callback pending before the crash was not delivered: {seen:?}"
    );
    assert!(
        seen.contains_key(&long_e),
        "no callback for the lost execution: {seen:?}"
    );
}

#[test]
fn two_schedulers_on_one_mariadb_run_each_execution_once() {
    let url = support::mysql_db("e2e2");
    let dir = support::temp_dir("e2e-two");
    let (da, db) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = Server::start(&da, &["--store", &url], "");
    let b = Server::start(&db, &["--store", &url], "");
    let ran = dir.join("ran.txt");
    let mut ids = Vec::new();
    for i in 0..40 {
        let code = format!(
            "echo $ETASK_EXECUTION_ID >> {}\nsleep 0.05\n",
            ran.display()
        );
        let target = if i % 2 == 0 { &a } else { &b };
        ids.push(target.submit(shell(&format!("t{i}"), &code)).1);
    }
    for id in &ids {
        let v = a.wait_final(*id, Duration::from_secs(60));
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["attempts"].as_array().unwrap().len(), 1);
    }
    let text = std::fs::read_to_string(&ran).unwrap();
    let mut runs: Vec<i64> = text.lines().map(|l| l.parse().unwrap()).collect();
    runs.sort();
    let n = runs.len();
    runs.dedup();
    assert_eq!(n, runs.len(), "an execution ran twice: {text}");
    assert_eq!(n, 40);
}

#[test]
fn cron_fires_missed_during_downtime_collapse_into_one() {
    let dir = support::temp_dir("e2e-storm");
    let mut s = Server::start(&dir, &[], "");
    let mut body = shell("tick", "true");
    // `allow`: this pins how missed fires collapse, not the overlap policy (under the default
    // `forbid` a run caught by the kill, still `running` until its node is declared silent,
    // rightly skips the catch-up fire).
    body["schedule"] = json!({"kind": "cron", "expr": "* * * * * *", "overlap": "allow"});
    let (tid, _) = s.submit(body);
    let list = |s: &Server| -> Vec<i64> {
        let (_, v) = s.call(
            "GET",
            &format!("/api/v1/executions?task_id={tid}&limit=500"),
            None,
        );
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            // When it ran (or was created, if it has not started): an execution the crashed
            // node had claimed and never started runs on return (its start journal) and is
            // then the one catch-up run, the fire itself being skipped by `forbid`.
            .map(|e| {
                e["started_at"]
                    .as_i64()
                    .unwrap_or_else(|| e["created_at"].as_i64().unwrap())
            })
            .collect()
    };
    let t0 = Instant::now();
    while list(&s).is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!list(&s).is_empty(), "the cron task never fired");
    s.kill9();
    std::thread::sleep(Duration::from_secs(6)); // six fire times missed
    let s2 = Server::start(&dir, &[], "");
    let up = etask::now_ms();
    std::thread::sleep(Duration::from_millis(700));
    let burst = list(&s2)
        .into_iter()
        .filter(|&c| c >= up - 200 && c < up + 500)
        .count();
    assert!(
        burst <= 2,
        "{burst} executions right after the restart: missed fires were replayed"
    );
    assert!(burst >= 1, "the missed fires did not fire once on return");
}

#[test]
fn cli_client_submits_waits_and_mirrors_the_outcome() {
    let dir = support::temp_dir("e2e-cli");
    let s = Server::start(&dir, &[], "");
    let script = dir.join("check.sh");
    std::fs::write(
        &script,
        "echo out-line\necho err-line >&2\necho '{\"n\": 1}' >&3\nexit 7\n",
    )
    .unwrap();
    let etask = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(args)
            .args(["--server", &s.url])
            .output()
            .expect("run etask")
    };
    let out = etask(&[
        "submit",
        "--shell",
        script.to_str().unwrap(),
        "--name",
        "cli-check",
        "--wait",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("out-line"), "{stdout}");
    assert!(stderr.contains("[stderr] err-line"), "{stderr}");
    assert!(
        stderr.contains("== failed") && stderr.contains(r#"== result: {"n":1}"#),
        "{stderr}"
    );
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("== execution "))
        .expect("execution id line")
        .trim()
        .to_owned();
    let got = etask(&["get", &id]);
    let v: Value = serde_json::from_slice(&got.stdout).expect("get prints JSON");
    assert_eq!(
        (v["status"].as_str(), v["exit_code"].as_i64()),
        (Some("failed"), Some(7))
    );
    let logs = etask(&["logs", &id]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("out-line"));
    let tasks = etask(&["tasks"]);
    assert!(String::from_utf8_lossy(&tasks.stdout).contains("cli-check"));
    let cancel = etask(&["cancel", &id]);
    assert_eq!(cancel.status.code(), Some(65), "a refused request exits 65");
    assert!(
        String::from_utf8_lossy(&cancel.stderr).contains("conflict (HTTP 409)"),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
}

#[test]
fn sigterm_stops_the_server_cleanly_and_its_script() {
    let dir = support::temp_dir("e2e-term");
    let mut s = Server::start(&dir, &[], "");
    let (_, script) = start_long_script(&s, &dir);
    let log_dir = s.dir.clone();
    let status = support::sigterm_and_wait(&mut s.child, Duration::from_secs(15), || {
        std::fs::read_to_string(log_dir.join("server.log")).unwrap_or_default()
    });
    assert!(status.success(), "exit status {status:?}\n{}", s.log());
    assert!(!pid_alive(script), "the script outlived its server");
    // A normal start and stop: INFO only, nothing alarming, values as an operator reads them.
    let log = s.log();
    assert!(
        log.contains("INFO  etask::server: SIGTERM: stopping"),
        "{log}"
    );
    assert!(
        log.contains("INFO  etask::server: started mode=all"),
        "{log}"
    );
    for bad in ["WARN", "ERROR", "Some(", "None", "{ "] {
        assert!(
            !log.contains(bad),
            "{bad:?} in the log of a clean start and stop:\n{log}"
        );
    }
}

#[test]
fn nodes_are_listed_from_etcd_and_a_killed_node_expires() {
    use etask::registry::{etcd::Etcd, NodeTable};
    // Without etcd: the built-in node only.
    let plain = Server::start(&support::temp_dir("e2e-nodes0"), &[], "");
    let (_, v) = plain.call("GET", "/api/v1/nodes", None);
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["items"][0]["path"], "local");

    let etcd = support::EtcdServer::start("e2e-nodes");
    let cfg = format!("[registry]\netcd = \"{}\"\nttl_seconds = 2\n", etcd.url);
    let mut s = Server::start(&support::temp_dir("e2e-nodes"), &[], &cfg);
    let t0 = Instant::now();
    let id = loop {
        let (_, v) = s.call("GET", "/api/v1/nodes", None);
        if let Some(n) = v["items"].as_array().and_then(|a| a.first()) {
            assert_eq!(
                (n["role"].as_str(), n["capacity"].as_i64()),
                (Some("executor"), Some(64)),
                "{v}"
            );
            break n["id"].as_str().unwrap().to_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the built-in node never showed up from etcd"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let table = NodeTable::start(Etcd::new(&etcd.url), "/etask/".into()).unwrap();
    let t0 = Instant::now();
    while table.nodes().is_empty() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(table.nodes()[0].id, id);
    s.kill9(); // no revoke: the lease must expire
    let t0 = Instant::now();
    while !table.nodes().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a killed node stayed registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An `etask server --mode executor` process (gRPC push node).
struct Executor {
    child: support::Proc,
    dir: PathBuf,
    /// host:port of its gRPC server.
    addr: String,
}

impl Executor {
    fn start(dir: &Path, id: &str, pool: &str, scheduler_grpc: &str, etcd: &str) -> Executor {
        Executor::start_with(dir, id, pool, scheduler_grpc, etcd, "", "")
    }

    fn start_with(
        dir: &Path,
        id: &str,
        pool: &str,
        scheduler_grpc: &str,
        etcd: &str,
        token: &str,
        extra_config: &str,
    ) -> Executor {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("executor.toml");
        std::fs::write(
            &cfg,
            format!("[registry]\nttl_seconds = 2\n[node]\nkill_grace_seconds = 1\n[executor]\ntoken = \"{token}\"\n{extra_config}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(["server", "--mode", "executor", "--config"])
            .arg(&cfg)
            .args([
                "--scheduler",
                scheduler_grpc,
                "--etcd",
                etcd,
                "--pool",
                pool,
                "--node-id",
                id,
            ])
            .args(["--grpc-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("executor.log")).unwrap(),
            ))
            .spawn()
            .expect("start executor");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with(&format!("etask executor {id} serving on ")),
            "executor did not start: {line:?}\n{}",
            std::fs::read_to_string(dir.join("executor.log")).unwrap_or_default()
        );
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned();
        Executor {
            child: support::Proc(child),
            dir: dir.to_owned(),
            addr,
        }
    }

    fn kill9(&mut self) {
        self.child.kill9();
    }
}

fn wait_nodes(s: &Server, n: usize) {
    s.wait_nodes_where(n, |x| x["path"] == "push");
}

#[test]
fn push_round_trip_through_a_grpc_executor() {
    let etcd = support::EtcdServer::start("push");
    let dir = support::temp_dir("e2e-push");
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!("[registry]\netcd = \"{}\"\nttl_seconds = 2\n", etcd.url),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let _ex = Executor::start(&dir.join("ex1"), "ex1", "core", &grpc, &etcd.url);
    wait_nodes(&s, 1);
    let mut body = shell("remote", "echo remote-out\necho '{\"where\": \"'$ETASK_EXECUTION_ID'\"}' >&3\necho '{\"ok\": true}' >&3\n");
    body["target"] = json!({"path": "push", "pool": "core"});
    let (_, e) = s.submit(body);
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    assert_eq!(v["node"], "ex1");
    assert_eq!(v["result"], json!({"where": e.to_string(), "ok": true}));
    let logs = ureq::get(&format!("{}/api/v1/executions/{e}/logs", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(logs.contains("remote-out"), "{logs}");
    // A pool nobody serves: work for now is refused at once (503); work due later is
    // accepted and waits for a node.
    let mut body = shell("nobody", "true");
    body["target"] = json!({"path": "push", "pool": "empty"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 503, "{v}");
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    body["schedule"] = json!({"kind": "once", "at": soon});
    let (_, e2) = s.submit(body);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(s.execution(e2)["status"], "pending");
}

#[test]
fn executor_killed_mid_run_is_retried_on_another() {
    let etcd = support::EtcdServer::start("failover");
    let dir = support::temp_dir("e2e-failover");
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!("[registry]\netcd = \"{}\"\nttl_seconds = 2\n", etcd.url),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let mut a = Executor::start(&dir.join("a"), "a", "core", &grpc, &etcd.url);
    let mut b = Executor::start(&dir.join("b"), "b", "core", &grpc, &etcd.url);
    wait_nodes(&s, 2);
    let mut body = shell("long", "if [ \"$ETASK_ATTEMPT\" = 1 ]; then exec sleep 60; fi\necho '{\"attempt\": '$ETASK_ATTEMPT'}' >&3\n");
    body["target"] = json!({"path": "push", "pool": "core"});
    body["retry"] = json!({"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 100});
    let (_, e) = s.submit(body);
    let v = s.wait_for(e, Duration::from_secs(20), |v| v["status"] == "running");
    let first = v["node"].as_str().unwrap().to_owned();
    if first == "a" {
        a.kill9()
    } else {
        b.kill9()
    }
    let t0 = Instant::now();
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    assert_eq!(v["attempt"], 2);
    assert_ne!(
        v["node"].as_str().unwrap(),
        first,
        "retried on the dead node"
    );
    assert_eq!(v["attempts"][0]["status"], "lost", "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "failover took {:?}",
        t0.elapsed()
    );
    let _ = (&a.dir, &b.dir);
}

#[test]
fn push_cancel_before_and_during_execute_and_tokens() {
    use etask::delivery::grpc::{dispatch_to_pb, ExecutorClient, Runtime};
    let etcd = support::EtcdServer::start("cancel");
    let dir = support::temp_dir("e2e-pushcancel");
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!(
            "[server]\ntoken = \"t0k\"\n[registry]\netcd = \"{}\"\nttl_seconds = 2\n",
            etcd.url
        ),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let ex = Executor::start_with(&dir.join("ex"), "ex", "core", &grpc, &etcd.url, "t0k", "");
    let auth = |r: ureq::Request| r.set("Authorization", "Bearer t0k");
    let t0 = Instant::now();
    loop {
        let v: Value = auth(ureq::get(&format!("{}/api/v1/nodes", s.url)))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "ex")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "executor never registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Cancel during: the script's process is gone and the execution is cancelled.
    let pidfile = dir.join("pid");
    let mut body = shell(
        "long",
        &format!("echo $$ > {}\nexec sleep 60\n", pidfile.display()),
    );
    body["target"] = json!({"path": "push", "pool": "core"});
    let v: Value = auth(ureq::post(&format!("{}/api/v1/tasks", s.url)))
        .send_json(body)
        .unwrap()
        .into_json()
        .unwrap();
    let e = v["execution_id"].as_i64().unwrap();
    let get = |e: i64| -> Value {
        auth(ureq::get(&format!("{}/api/v1/executions/{e}", s.url)))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let t0 = Instant::now();
    while !(get(e)["status"] == "running" && pidfile.exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never ran: {}",
            get(e)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    auth(ureq::post(&format!(
        "{}/api/v1/executions/{e}/cancel",
        s.url
    )))
    .send_string("{}")
    .unwrap();
    let t0 = Instant::now();
    while pid_alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "remote script {pid} survived the cancel"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(e)["status"], "cancelled");

    // Cancel before Execute: the late Execute is refused. Wrong token: refused.
    let rt = Runtime::new().unwrap();
    let url = format!("http://{}", ex.addr);
    let good = ExecutorClient::new(&rt, &url, "t0k").unwrap();
    let d = etask::delivery::Dispatch {
        execution_id: etask::model::ExecutionId(777_777),
        task_id: etask::model::TaskId(1),
        attempt: etask::model::Attempt(1),
        program: etask::runner::Program::shell("true"),
        timeout: None,
        shard_index: 0,
        shard_total: 1,
        pool: None,
        route: Default::default(),
        stamp: Default::default(),
    };
    assert!(good.cancel(d.execution_id, d.attempt).unwrap());
    let ack = good.execute(dispatch_to_pb(&d, etask::now_ms())).unwrap();
    assert!(!ack.accepted && ack.reason.contains("cancelled"), "{ack:?}");
    let bad = ExecutorClient::new(&rt, &url, "wrong").unwrap();
    let err = bad
        .execute(dispatch_to_pb(&d, etask::now_ms()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("wrong token"), "{err}");
    let none = ExecutorClient::new(&rt, &url, "").unwrap();
    assert!(
        none.cancel(d.execution_id, d.attempt).is_err(),
        "no token must be refused"
    );
}

#[test]
fn push_round_robin_spreads_and_pinned_sticks() {
    let etcd = support::EtcdServer::start("rr");
    let dir = support::temp_dir("e2e-rr");
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!("[registry]\netcd = \"{}\"\nttl_seconds = 2\n", etcd.url),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let _a = Executor::start(&dir.join("a"), "a", "core", &grpc, &etcd.url);
    let _b = Executor::start(&dir.join("b"), "b", "core", &grpc, &etcd.url);
    wait_nodes(&s, 2);
    let run = |target: Value| -> String {
        let mut body = shell("t", "true");
        body["target"] = target;
        let (_, e) = s.submit(body);
        let v = s.wait_final(e, Duration::from_secs(30));
        assert_eq!(v["status"], "succeeded", "{v}");
        v["node"].as_str().unwrap().to_owned()
    };
    let rr: Vec<String> = (0..4)
        .map(|_| run(json!({"path": "push", "pool": "core"})))
        .collect();
    assert!(
        rr.contains(&"a".to_string()) && rr.contains(&"b".to_string()),
        "round robin used one node: {rr:?}"
    );
    for _ in 0..3 {
        assert_eq!(
            run(json!({"path": "push", "pool": "core", "strategy": "pinned", "node": "b"})),
            "b"
        );
    }
    let k1 = run(
        json!({"path": "push", "pool": "core", "strategy": "consistent_hash", "key": "router-7"}),
    );
    let k2 = run(
        json!({"path": "push", "pool": "core", "strategy": "consistent_hash", "key": "router-7"}),
    );
    assert_eq!(k1, k2, "same key, same node");
    let (code, v) = s.call(
        "POST",
        "/api/v1/tasks",
        Some(&json!({"name": "x", "target": {"path": "push", "strategy": "pinned"}, "program": {"kind": "shell", "code": "true"}}).to_string()),
    );
    assert_eq!(code, 400, "{v}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn executor_before_scheduler_and_results_survive_a_scheduler_restart() {
    let etcd = support::EtcdServer::start("order");
    let dir = support::temp_dir("e2e-order");
    let grpc_addr = format!("127.0.0.1:{}", free_port());
    let grpc = format!("http://{grpc_addr}");
    // The executor comes up first and waits for a scheduler that is not there yet.
    let _ex = Executor::start(&dir.join("ex"), "ex", "core", &grpc, &etcd.url);
    let cfg = format!("[registry]\netcd = \"{}\"\nttl_seconds = 2\n", etcd.url);
    let mut s = Server::start(&dir.join("sched"), &["--grpc-listen", &grpc_addr], &cfg);
    wait_nodes(&s, 1);
    let mut body = shell("slow", "sleep 2\necho '{\"done\": true}' >&3\n");
    body["target"] = json!({"path": "push", "pool": "core"});
    let (_, e) = s.submit(body);
    s.wait_for(e, Duration::from_secs(20), |v| v["status"] == "running");
    // The scheduler dies while the script runs; the outcome is produced while it is down.
    s.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let s2 = Server::start(&dir.join("sched"), &["--grpc-listen", &grpc_addr], &cfg);
    let v = s2.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s2.log());
    assert_eq!(v["result"], json!({"done": true}));
    assert_eq!(
        v["attempts"].as_array().unwrap().len(),
        1,
        "delivered once: {v}"
    );
}

#[test]
fn pull_round_trip_and_the_long_poll_wakes_on_submit() {
    let etcd = support::EtcdServer::start("pull");
    let dir = support::temp_dir("e2e-pull");
    // The scheduler knows its pull nodes (and keeps their runs alive) through the registry.
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!(
            "poll_interval_ms = 5000\n[registry]\netcd = \"{}\"\nttl_seconds = 2\n",
            etcd.url
        ),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args([
            "server",
            "--mode",
            "executor",
            "--path",
            "pull",
            "--pool",
            "edge",
            "--node-id",
            "edge-1",
        ])
        .args(["--scheduler", &grpc, "--etcd", &etcd.url, "--data-dir"])
        .arg(dir.join("ex"))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("executor.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("etask executor edge-1"), "{line}");
    std::thread::sleep(Duration::from_millis(1500)); // the executor is now parked in a Pull
    let mut body = shell("edge-job", "echo '{\"from\": \"edge\"}' >&3");
    body["target"] = json!({"path": "pull", "pool": "edge"});
    let (_, e) = s.submit(body);
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    assert_eq!(v["node"], "edge-1");
    assert_eq!(v["result"], json!({"from": "edge"}));
    // Latency from submit to start, while the store is polled only every 5 s: the long-poll
    // was woken by the submission itself.
    let started = v["started_at"].as_i64().unwrap() - v["created_at"].as_i64().unwrap();
    assert!(
        started < 1_500,
        "pull picked the work up only after {started} ms"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn broadcast_runs_once_per_live_node_with_its_shard() {
    let etcd = support::EtcdServer::start("bcast");
    let dir = support::temp_dir("e2e-bcast");
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!("[registry]\netcd = \"{}\"\nttl_seconds = 2\n", etcd.url),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let _a = Executor::start(&dir.join("a"), "a", "core", &grpc, &etcd.url);
    let _b = Executor::start(&dir.join("b"), "b", "core", &grpc, &etcd.url);
    wait_nodes(&s, 2);
    let mut body = shell(
        "everywhere",
        "echo '{\"shard\": '$ETASK_SHARD_INDEX', \"of\": '$ETASK_SHARD_TOTAL'}' >&3",
    );
    body["target"] = json!({"path": "push", "pool": "core", "strategy": "broadcast"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    let ids: Vec<i64> = v["execution_ids"]
        .as_array()
        .expect("execution_ids")
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let mut seen = Vec::new();
    for id in ids {
        let e = s.wait_final(id, Duration::from_secs(30));
        assert_eq!(e["status"], "succeeded", "{e}");
        assert_eq!(e["result"]["of"], 2);
        seen.push((
            e["node"].as_str().unwrap().to_owned(),
            e["result"]["shard"].as_i64().unwrap(),
        ));
    }
    seen.sort();
    let nodes: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    let mut shards: Vec<i64> = seen.iter().map(|(_, s)| *s).collect();
    shards.sort();
    assert_eq!(nodes, ["a", "b"], "one execution per node");
    assert_eq!(shards, [0, 1]);
    // A cron broadcast fires on every node each time.
    let mut cron = shell("every-node", "true");
    cron["target"] = json!({"path": "push", "pool": "core", "strategy": "broadcast"});
    cron["schedule"] = json!({"kind": "cron", "expr": "* * * * * *"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&cron.to_string()));
    assert_eq!(code, 201, "{v}");
    assert_eq!(
        v["execution_ids"],
        json!([]),
        "one shape for every broadcast: {v}"
    );
    let tid = v["task_id"].as_i64().unwrap();
    let t0 = Instant::now();
    loop {
        let (_, l) = s.call(
            "GET",
            &format!("/api/v1/executions?task_id={tid}&status=succeeded"),
            None,
        );
        let mut nodes: Vec<String> = l["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"].as_str().unwrap().to_owned())
            .collect();
        nodes.sort();
        nodes.dedup();
        if nodes == ["a", "b"] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "cron broadcast did not reach both nodes: {l}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.call("POST", &format!("/api/v1/tasks/{tid}/pause"), Some("{}"));
    // One live node: the same shape, a list of one.
    let _c = Executor::start(&dir.join("c"), "c", "solo", &grpc, &etcd.url);
    wait_nodes(&s, 3);
    body["target"] = json!({"path": "push", "pool": "solo", "strategy": "broadcast"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["execution_ids"], json!([v["execution_id"]]), "{v}");
    // No live node in the pool: a clear 503, nothing created.
    body["target"] = json!({"path": "push", "pool": "nobody", "strategy": "broadcast"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{v}"
    );
}

#[test]
fn grpc_task_api_mirrors_the_http_intake() {
    use etask::delivery::grpc::{Runtime, TasksClient};
    let dir = support::temp_dir("e2e-grpcapi");
    let s = Server::start(&dir, &[], "[server]\ntoken = \"k\"\n");
    let url = s.grpc.clone().expect("scheduler gRPC address");
    let rt = Runtime::new().unwrap();
    let api = TasksClient::new(&rt, &url, "k").unwrap();
    let body = json!({"name": "g", "request_id": "g-1", "program": {"kind": "shell", "code": "echo '{\"via\": \"grpc\"}' >&3"}});
    let r = api.submit(&body.to_string()).unwrap();
    assert!(!r.existed);
    let e = r.execution_id.expect("execution id");
    assert!(
        api.submit(&body.to_string()).unwrap().existed,
        "request_id is idempotent over gRPC too"
    );
    let t0 = Instant::now();
    let v = loop {
        let v = api.get(e).unwrap();
        if v["status"] == "succeeded" {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(v["result"], json!({"via": "grpc"}));
    assert_eq!(
        api.cancel(e).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(api.get(987_654).unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(
        api.submit("{nope").unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let anon = TasksClient::new(&rt, &url, "").unwrap();
    assert_eq!(
        anon.get(e).unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
}

/// A CA and a certificate for 127.0.0.1 signed by it (openssl CLI), for gRPC TLS tests.
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir_all(dir).unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=etask-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node.key"),
    )
}

#[test]
fn push_over_tls() {
    use etask::delivery::grpc::{Runtime, TasksClient};
    let etcd = support::EtcdServer::start("tls");
    let dir = support::temp_dir("e2e-tls");
    let (ca, cert, key) = test_pki(&dir.join("pki"));
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        cert.display(),
        key.display(),
        ca.display()
    );
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!(
            "[registry]\netcd = \"{}\"\nttl_seconds = 2\n{tls}",
            etcd.url
        ),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    assert!(grpc.starts_with("https://"), "{grpc}");
    let _ex = Executor::start_with(&dir.join("ex"), "ex", "core", &grpc, &etcd.url, "", &tls);
    wait_nodes(&s, 1);
    let mut body = shell("secure", "echo '{\"tls\": true}' >&3");
    body["target"] = json!({"path": "push", "pool": "core"});
    let (_, e) = s.submit(body);
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    assert_eq!(v["result"], json!({"tls": true}));
    // A plaintext client cannot talk to the TLS endpoint.
    let rt = Runtime::new().unwrap();
    let plain = TasksClient::new(&rt, &grpc.replace("https://", "http://"), "").unwrap();
    assert!(
        plain.get(e).is_err(),
        "plaintext gRPC was accepted by a TLS server"
    );
}

#[test]
fn cron_task_shows_its_zone_and_forbid_skips_and_counts_overlapping_fires() {
    let dir = support::temp_dir("e2e-overlap");
    let s = Server::start(&dir, &[], "timezone = \"Asia/Shanghai\"\n");
    let mut body = shell("slow-tick", "sleep 2.5");
    body["schedule"] = json!({"kind": "cron", "expr": "* * * * * *"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    let tid = v["task_id"].as_i64().unwrap();
    let (_, t) = s.call("GET", &format!("/api/v1/tasks/{tid}"), None);
    // No zone given: the scheduler's default is fixed into the task.
    assert_eq!(t["timezone"], "Asia/Shanghai", "{t}");
    assert_eq!(t["spec"]["schedule"]["timezone"], "Asia/Shanghai", "{t}");
    assert_eq!(t["overlap"], "forbid", "{t}");
    assert!(t["next_fire_at"].as_i64().is_some(), "{t}");
    assert!(
        t["next_fire_local"].as_str().unwrap().ends_with("+08:00"),
        "{t}"
    );
    std::thread::sleep(Duration::from_millis(6_000));
    let (_, list) = s.call("GET", &format!("/api/v1/executions?task_id={tid}"), None);
    let runs = list["items"].as_array().unwrap();
    // A 2.5 s script fired every second: never two at once, the rest skipped and counted.
    let live = runs
        .iter()
        .filter(|e| !matches!(e["status"].as_str(), Some("succeeded")))
        .count();
    assert!(live <= 1, "overlapping executions: {list}");
    assert!((1..=3).contains(&runs.len()), "{list}");
    let (_, t) = s.call("GET", &format!("/api/v1/tasks/{tid}"), None);
    let skipped = t["skipped_fires"].as_i64().unwrap();
    assert!(skipped >= 2, "{t}");
    let (code, _) = s.call("POST", &format!("/api/v1/tasks/{tid}/pause"), Some("{}"));
    assert_eq!(code, 200);
    let metrics = ureq::get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "etask_cron_skipped_fires_total{{task_id=\"{tid}\",name=\"slow-tick\"}} "
        )),
        "{metrics}"
    );
    // `etask tasks` prints the next fire in the task's zone.
    let out = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["tasks", "--server", &s.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+08:00 Asia/Shanghai"), "etask tasks: {text}");
}

#[test]
fn params_and_variables_reach_the_script_and_secret_ones_stay_masked() {
    let s = Server::start(&support::temp_dir("e2e-vars"), &[], "");
    let mut body = json!({"name": "vars", "program": {"kind": "python",
        "code": "import json, os\nprint('token', os.environ['TOKEN'])\nargs = json.load(open(os.environ['ETASK_ARGS_FILE']))\nos.write(3, json.dumps({'region': args['region'], 'user': os.environ['USER_NAME']}).encode())\n",
        "params": {"region": "cn-north"},
        "variables": [{"key": "USER_NAME", "value": "ops"},
                      {"key": "TOKEN", "value": "tok-98765", "secret": true}]}});
    let (tid, e) = s.submit(body.take());
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"region": "cn-north", "user": "ops"}));
    let (_, t) = s.call("GET", &format!("/api/v1/tasks/{tid}"), None);
    let vars = &t["spec"]["program"]["variables"];
    assert_eq!(vars[0]["value"], "ops", "{t}");
    assert_eq!(vars[1]["value"], "******", "{t}");
    let logs = ureq::get(&format!("{}/api/v1/executions/{e}/logs", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(logs.contains("token ******"), "{logs}");
    assert!(!logs.contains("tok-98765"), "{logs}");
    assert!(!t.to_string().contains("tok-98765"), "{t}");
}

#[test]
fn replace_cancels_the_running_execution_on_its_node_and_starts_the_next() {
    let s = Server::start(&support::temp_dir("e2e-replace"), &[], "");
    let mut body = shell("stuck", "echo pid=$$; sleep 60");
    body["schedule"] = json!({"kind": "cron", "expr": "*/2 * * * * *", "overlap": "replace"});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    let tid = v["task_id"].as_i64().unwrap();
    let list = || {
        s.call("GET", &format!("/api/v1/executions?task_id={tid}"), None)
            .1["items"]
            .as_array()
            .unwrap()
            .clone()
    };
    let t0 = Instant::now();
    while list().len() < 3 && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    s.call("POST", &format!("/api/v1/tasks/{tid}/pause"), Some("{}"));
    let runs = list();
    assert!(runs.len() >= 3, "{runs:?}");
    // Newest first: every execution but the newest was cancelled by the next fire...
    for e in &runs[1..] {
        assert_eq!(e["status"], "cancelled", "{runs:?}");
        assert!(
            e["error"].as_str().unwrap_or("").contains("replaced"),
            "{e}"
        );
    }
    // ...and its script was killed on the node.
    let old = runs.last().unwrap()["id"].as_i64().unwrap();
    let logs = ureq::get(&format!("{}/api/v1/executions/{old}/logs", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let pid: i32 = logs
        .split("pid=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {logs}"));
    let t0 = Instant::now();
    while pid_alive(pid) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!pid_alive(pid), "the replaced script {pid} still runs");
}
