//! Hostile probes of the real binary, each pinning a hole that was open (issue 11): auth
//! bypass by path spelling, a one-request crash, starvation by silent or endless clients,
//! intake lost to EMFILE, a callback that killed its thread, state readable by others, SSRF
//! through callback URLs, forged gRPC reports, acknowledged work lost in a crash, follower
//! slots that leaked, and the node's secrets within a script's reach. Raw sockets where the
//! probe needs bytes no client library would send.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{shell, Server};

const TOKEN: &str = "t0ken-for-tests";

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_owned()
}

/// Sends raw bytes and returns what the server answered (until it closed or `wait` passed).
fn raw(s: &Server, bytes: &[u8], wait: Duration) -> String {
    let mut c = TcpStream::connect(addr(s)).unwrap();
    c.set_read_timeout(Some(wait)).unwrap();
    c.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while t0.elapsed() < wait {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n")
                    && !out.starts_with(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson")
                {
                    // A whole head is enough for these probes unless it is a stream.
                    let text = String::from_utf8_lossy(&out).to_string();
                    if text.contains("content-length") {
                        let body_len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        let head_end = text.find("\r\n\r\n").unwrap() + 4;
                        if out.len() >= head_end + body_len {
                            break;
                        }
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn with_token(dir_tag: &str, extra: &str) -> Server {
    let dir = support::temp_dir(dir_tag);
    Server::start(
        &dir,
        &[],
        &format!("[server]\ntoken = \"{TOKEN}\"\n{extra}"),
    )
}

fn authed(s: &Server, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let req = ureq::request(method, &format!("{}{path}", s.url))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .timeout(Duration::from_secs(20));
    let res = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    match res {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn healthy(s: &Server) -> bool {
    ureq::get(&format!("{}/healthz", s.url))
        .timeout(Duration::from_secs(3))
        .call()
        .is_ok_and(|r| r.status() == 200)
}

#[test]
fn no_path_spelling_reaches_the_api_without_the_token() {
    let s = with_token("sec-auth", "");
    let body = r#"{"name":"x","program":{"kind":"shell","code":"id"}}"#;
    let post = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for path in [
        "/api/v1/tasks",
        "//api/v1/tasks",
        "/api//v1/tasks/",
        "///api/v1/tasks",
        "/API/v1/tasks",
        "/api/v1/./tasks",
    ] {
        let r = raw(&s, post(path).as_bytes(), Duration::from_secs(5));
        let code = status_of(&r);
        assert!(
            code == 401 || code == 400,
            "POST {path} without a token answered {code}: {r}"
        );
    }
    for line in [
        "GET api/v1/tasks HTTP/1.1",
        "GET //api/v1/tasks HTTP/1.1",
        "GET http://x//api/v1/tasks HTTP/1.1",
        "DELETE //api/v1/tasks/1 HTTP/1.1",
        "GET /metrics HTTP/1.1",
        "GET //metrics HTTP/1.1",
        "GET /nothing HTTP/1.1",
    ] {
        let r = raw(
            &s,
            format!("{line}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        let code = status_of(&r);
        assert!(
            code == 401 || code == 400,
            "{line} without a token answered {code}: {r}"
        );
    }
    // Nothing was created: the token sees no task.
    let (code, v) = authed(&s, "GET", "/api/v1/tasks", None);
    assert_eq!(code, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 0, "{v}");
    // Only /healthz is open, and it names no path.
    let r = raw(
        &s,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(
        !r.contains(&s.dir.display().to_string()) && !r.contains("etask.db"),
        "{r}"
    );
    assert!(
        r.contains("sched-callbacks"),
        "components are reported: {r}"
    );
}

#[test]
fn a_huge_declared_body_is_refused_and_the_server_lives() {
    let s = with_token("sec-huge", "");
    for (path, want) in [("/healthz", 405), ("/api/v1/tasks", 413)] {
        let r = raw(
            &s,
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 10000000000000\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        assert_eq!(status_of(&r), want, "{path}: {r}");
    }
    // The path open without a token takes no body and reads none: answered at once, before a
    // byte of the announced 8 MiB is sent (it used to read each, up to max_body_bytes, before
    // refusing: 250 such connections held 2.8 GB of the server's memory).
    for (head, want) in [
        ("POST /healthz HTTP/1.1\r\nContent-Length: 8388607", 405),
        ("GET /healthz HTTP/1.1\r\nContent-Length: 8388607", 400),
        ("GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked", 400),
    ] {
        let r = raw(
            &s,
            format!("{head}\r\nHost: x\r\n\r\n").as_bytes(),
            Duration::from_secs(3),
        );
        assert_eq!(status_of(&r), want, "{head}: {r}");
    }
    // A chunked body over the limit is cut off too.
    let mut c = TcpStream::connect(addr(&s)).unwrap();
    c.write_all(format!("POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes()).unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut refused = false;
    for _ in 0..12 {
        if c.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .and_then(|_| c.write_all(&chunk))
            .and_then(|_| c.write_all(b"\r\n"))
            .is_err()
        {
            refused = true;
            break;
        }
    }
    // The end of the body: the server has read and dropped it, and answers.
    let _ = c.write_all(b"0\r\n\r\n");
    let mut resp = String::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.read_to_string(&mut resp);
    assert!(refused || resp.contains(" 413 "), "{resp}");
    assert!(healthy(&s), "server died: {}", s.log());
}

#[test]
fn silent_and_endless_clients_starve_nobody() {
    let dir = support::temp_dir("sec-starve");
    let s = Server::start(
        &dir,
        &[],
        "[server]\nheader_timeout_ms = 1000\nbody_timeout_ms = 1000\nhttp_threads = 2\n",
    );
    // More silent clients than workers: ones that announce a body and send none, ones that
    // send half a head, ones that send nothing at all.
    let mut held = Vec::new();
    for i in 0..24 {
        let mut c = TcpStream::connect(addr(&s)).unwrap();
        let pre: &[u8] = match i % 3 {
            0 => b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
            1 => b"GET /healthz HTTP/1.1\r\nHost:",
            _ => b"",
        };
        c.write_all(pre).unwrap();
        held.push(c);
    }
    let t0 = Instant::now();
    assert!(healthy(&s), "healthz blocked by silent clients");
    let (code, _) = s.call("GET", "/api/v1/tasks", None);
    assert_eq!(code, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "answered only after {:?}",
        t0.elapsed()
    );
    // Every silent connection is closed once its phase's time is up.
    std::thread::sleep(Duration::from_millis(2500));
    for (i, c) in held.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 512];
        let closed = c.read(&mut b).is_ok(); // an error answer then EOF, or EOF
        assert!(closed, "silent connection {i} still open");
    }
    // A header line without an end is not buffered without limit.
    let pid = s.child.id();
    let mut c = TcpStream::connect(addr(&s)).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nX-Long: ").unwrap();
    let blob = vec![b'a'; 64 << 10];
    for _ in 0..256 {
        if c.write_all(&blob).is_err() {
            break;
        }
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = rss
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    assert!(kb < 100 * 1024, "RSS {kb} kB after an endless header line");
    assert!(healthy(&s));
}

#[test]
fn the_intake_recovers_after_running_out_of_file_descriptors() {
    let dir = support::temp_dir("sec-emfile");
    std::fs::create_dir_all(&dir).unwrap();
    // The server gets a small open-files limit; then the probe takes every descriptor.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=64:64", "--"])
        .arg(env!("CARGO_BIN_EXE_etask"))
        .args(support::server::ALL_NO_GRPC)
        .arg("--data-dir")
        .arg(dir.join("data"));
    let (mut child, url) = support::server::spawn_listening(cmd);
    let a = url.trim_start_matches("http://").to_owned();
    let mut hog = Vec::new();
    for _ in 0..200 {
        if let Ok(c) = TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_millis(300)) {
            hog.push(c);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(hog);
    let t0 = Instant::now();
    let mut ok = false;
    while t0.elapsed() < Duration::from_secs(15) && !ok {
        ok = ureq::get(&format!("{url}/healthz"))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok();
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "the intake never accepted again after EMFILE");
}

#[test]
fn a_hostile_callback_target_does_not_stop_callbacks() {
    let dir = support::temp_dir("sec-callback");
    let s = Server::start(&dir, &[], "");
    // A target that redirects to file:///etc/passwd, then a good one.
    let evil = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let evil_port = evil.server_addr().to_ip().unwrap().port();
    std::thread::spawn(move || {
        for req in evil.incoming_requests() {
            let h = tiny_http::Header::from_bytes("Location", "file:///etc/passwd").unwrap();
            let _ = req.respond(tiny_http::Response::empty(301).with_header(h));
        }
    });
    let good = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let good_port = good.server_addr().to_ip().unwrap().port();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for mut req in good.incoming_requests() {
            let mut b = String::new();
            let _ = req.as_reader().read_to_string(&mut b);
            let _ = tx.send(b);
            let _ = req.respond(tiny_http::Response::from_string("ok"));
        }
    });
    let mut t = shell("evil", "true");
    t["callback_url"] = json!(format!("http://127.0.0.1:{evil_port}/cb"));
    let (_, e1) = s.submit(t);
    s.wait_final(e1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let mut t = shell("good", "true");
    t["callback_url"] = json!(format!("http://127.0.0.1:{good_port}/cb"));
    let (_, e2) = s.submit(t);
    s.wait_final(e2, Duration::from_secs(10));
    let body = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the later callback was never delivered");
    assert!(body.contains(&format!("\"id\":{e2}")), "{body}");
    let (code, h) = s.call("GET", "/healthz", None);
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["components"]["sched-callbacks"]["running"], true, "{h}");
    assert!(
        s.log().contains("HTTP 301"),
        "the redirect is a failed attempt, not followed"
    );
}

#[test]
fn callback_urls_to_internal_or_unlisted_hosts_are_refused() {
    let s = Server::start(&support::temp_dir("sec-ssrf"), &[], "");
    // The test config allows 127.0.0.1 only.
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:8765/api/v1/tasks",
        "http://[::1]:22/",
        "http://10.1.2.3/hook",
        "https://169.254.169.254/hook",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1/x",
    ] {
        let mut t = shell("ssrf", "true");
        t["callback_url"] = json!(url);
        let (code, v) = s.call("POST", "/api/v1/tasks", Some(&t.to_string()));
        assert_eq!(code, 400, "{url}: {v}");
    }
}

#[test]
fn state_is_readable_by_its_owner_only() {
    let dir = support::temp_dir("sec-modes");
    let s = Server::start(&dir, &[], "");
    let (_, e) = s.submit(json!({"name": "s", "program": {"kind": "shell", "code": "true", "secret_env": {"K": "v"}}}));
    s.wait_final(e, Duration::from_secs(10));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = dir.join("data");
    assert_eq!(mode(&data), 0o700);
    for f in ["etask.db", "etask.db-wal", "start.journal"] {
        let p = data.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    assert!(data.join("etask.db-wal").exists());
}

#[test]
fn reports_from_a_node_that_does_not_hold_the_attempt_change_nothing() {
    use etask::delivery::grpc::{pb, Runtime, SchedulerClient};
    let s = Server::start(&support::temp_dir("sec-report"), &[], "");
    let (_, e) = s.submit(shell("long", "sleep 30"));
    s.wait_for(e, Duration::from_secs(10), |v| v["status"] == "running");
    let (_, done) = s.submit(shell("done", "echo real"));
    s.wait_final(done, Duration::from_secs(10));
    let rt = Runtime::new().unwrap();
    let c = SchedulerClient::new(&rt, s.grpc.as_ref().unwrap(), "").unwrap();
    let outcome = pb::Outcome {
        status: "succeeded".into(),
        exit_code: Some(0),
        result_json: r#"{"forged":true}"#.into(),
        ..Default::default()
    };
    let log = |id: i64, seq: u64| pb::ReportItem {
        execution_id: id,
        attempt: 1,
        kind: Some(pb::report_item::Kind::Log(pb::LogChunk {
            seq,
            stream: "stdout".into(),
            data: "forged\n".into(),
        })),
    };
    let batch = pb::ReportBatch {
        node_id: "attacker".into(),
        items: vec![
            pb::ReportItem {
                execution_id: e,
                attempt: 1,
                kind: Some(pb::report_item::Kind::Finished(outcome)),
            },
            log(e, 999),
            log(done, 999),
            log(424_242, 1),
        ],
    };
    c.report(batch).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let v = s.execution(e);
    assert_eq!(
        v["status"], "running",
        "a forged outcome changed the execution: {v}"
    );
    for id in [e, done] {
        let body = ureq::get(&format!("{}/api/v1/executions/{id}/logs", s.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(
            !body.contains("forged"),
            "forged log stored for {id}: {body}"
        );
    }
    let (_, gone) = s.call("GET", "/api/v1/executions/424242/logs", None);
    assert_eq!(gone["error"]["code"], "not_found");
}

#[test]
fn acknowledged_work_that_never_started_runs_after_a_crash() {
    let dir = support::temp_dir("sec-crash");
    let marks = dir.join("ran");
    std::fs::create_dir_all(&marks).unwrap();
    let mut s = Server::start(&dir, &[], "");
    let code = format!("echo $ETASK_EXECUTION_ID >> {}/log", marks.display());
    // A burst from several clients; the node is killed in the middle of it.
    let acked = std::sync::Mutex::new(Vec::new());
    let (url, pid) = (s.url.clone(), s.child.id() as i32);
    std::thread::scope(|sc| {
        for t in 0..6 {
            let (url, code, acked) = (&url, &code, &acked);
            sc.spawn(move || {
                for i in 0..60 {
                    let body = shell(&format!("t{t}-{i}"), code).to_string();
                    let r = ureq::post(&format!("{url}/api/v1/tasks"))
                        .timeout(Duration::from_secs(5))
                        .send_string(&body);
                    match r {
                        Ok(r) => {
                            let v: Value = r.into_json().unwrap();
                            acked
                                .lock()
                                .unwrap()
                                .push(v["execution_id"].as_i64().unwrap());
                        }
                        Err(_) => return, // the server is gone
                    }
                }
            });
        }
        while acked.lock().unwrap().len() < 150 {
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    s.kill9();
    let acked = acked.into_inner().unwrap();
    let ran_before: std::collections::HashSet<i64> = std::fs::read_to_string(marks.join("log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    // What the crashed node had started: its start journal's `S` lines (written before each
    // process was created). A run killed between its start and its script's first command is
    // lost rightly (the node cannot know how far it got); one never started must not be.
    let journal = std::fs::read_to_string(dir.join("data/start.journal")).unwrap();
    let started: std::collections::HashSet<i64> = journal
        .lines()
        .filter_map(|l| l.strip_prefix("S "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    let s2 = Server::start(&dir, &[], "");
    let mut never_ran_lost = Vec::new();
    for id in &acked {
        let v = s2.wait_final(*id, Duration::from_secs(60));
        match v["status"].as_str() {
            Some("succeeded") => {}
            // Lost is right only for a run that had started when the node died.
            Some("lost") if ran_before.contains(id) || started.contains(id) => {}
            Some("lost") => never_ran_lost.push(*id),
            other => panic!("execution {id} ended {other:?}: {v}"),
        }
    }
    // Before start journals, dozens of queued runs were lost this way (61 of 154).
    assert!(
        never_ran_lost.is_empty(),
        "{} of {} acknowledged executions never ran and were lost: {never_ran_lost:?}",
        never_ran_lost.len(),
        acked.len()
    );
    let log = std::fs::read_to_string(marks.join("log")).unwrap();
    let mut runs: Vec<i64> = log.lines().map(|l| l.parse().unwrap()).collect();
    let n = runs.len();
    runs.sort();
    runs.dedup();
    assert_eq!(runs.len(), n, "an execution ran twice");
    // A recovered attempt did not use up the budget: it ran with max_attempts 1.
    for id in &acked {
        let v = s2.execution(*id);
        if v["attempt"].as_i64() > Some(1) {
            assert_eq!(v["status"], "succeeded", "{v}");
            assert!(
                v["attempts"][0]["error"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("not started"),
                "{v}"
            );
        }
    }
}

#[test]
fn a_follower_that_leaves_gives_its_slot_back() {
    let dir = support::temp_dir("sec-follow");
    let s = Server::start(&dir, &[], "[server]\nmax_log_followers = 2\n");
    let (_, e) = s.submit(shell("quiet", "sleep 30"));
    s.wait_for(e, Duration::from_secs(10), |v| v["status"] == "running");
    let req = format!("GET /api/v1/executions/{e}/logs?follow=true HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr(&s)).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut b = [0u8; 256];
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = c.read(&mut b).unwrap();
        assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
        drop(c); // leaves while the execution logs nothing
    }
    let t0 = Instant::now();
    loop {
        let r = raw(&s, req.as_bytes(), Duration::from_secs(1));
        if status_of(&r) == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "slots never came back: {r}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn small_inputs_with_big_effects_are_refused() {
    let s = Server::start(&support::temp_dir("sec-small"), &[], "");
    let mut a = shell("same", "echo one");
    a["request_id"] = json!("r-1");
    let (code, _) = s.call("POST", "/api/v1/tasks", Some(&a.to_string()));
    assert_eq!(code, 201);
    let mut b = shell("same", "echo two");
    b["request_id"] = json!("r-1");
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&b.to_string()));
    assert_eq!(code, 409, "{v}");
    let mut t = shell("backoff", "false");
    t["retry"] =
        json!({"max_attempts": 3, "initial_backoff_ms": u64::MAX, "max_backoff_ms": u64::MAX});
    assert_eq!(s.call("POST", "/api/v1/tasks", Some(&t.to_string())).0, 400);
    let labels: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("l{i}"), json!("v"))).collect();
    let mut t = shell("labels", "true");
    t["labels"] = Value::Object(labels);
    assert_eq!(s.call("POST", "/api/v1/tasks", Some(&t.to_string())).0, 400);
    let mut t = shell("label", "true");
    t["labels"] = json!({"big": "x".repeat(7 << 20)});
    assert_eq!(s.call("POST", "/api/v1/tasks", Some(&t.to_string())).0, 400);
}

#[test]
fn every_listener_off_loopback_needs_a_token() {
    let dir = support::temp_dir("sec-listen");
    for args in [
        vec!["server", "--mode", "all", "--listen", "0.0.0.0:0"],
        vec![
            "server",
            "--mode",
            "all",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "0.0.0.0:0",
        ],
        vec![
            "server",
            "--mode",
            "scheduler",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "[::]:0",
        ],
        vec![
            "server",
            "--mode",
            "executor",
            "--etcd",
            "http://127.0.0.1:9",
            "--grpc-listen",
            "0.0.0.0:0",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(&args)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env_remove("ETASK_TOKEN")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started without a token");
        assert!(err.contains("without a token"), "{args:?}: {err}");
    }
}

#[test]
fn scripts_of_the_node_s_own_uid_cannot_read_its_token_or_memory() {
    // The node runs unprivileged (uid 65534), as do its scripts: same uid, so only the node's
    // own measures keep them out.
    let dir = support::temp_dir("sec-dumpable");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&data)
        .status();
    let out_file = dir.join("out");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_etask"))
        .args(support::server::ALL_NO_GRPC)
        .arg("--data-dir")
        .arg(&data)
        .env("ETASK_TOKEN", TOKEN);
    let (mut child, url) = support::server::spawn_listening(cmd);
    // The token is gone from the node's environment as the kernel shows it.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains(TOKEN),
        "token visible in /proc/<node>/environ"
    );
    let code = "cat /proc/$PPID/environ >/dev/null 2>&1 && echo environ-readable; \
                cat /proc/$PPID/maps >/dev/null 2>&1 && echo maps-readable; \
                echo done";
    let body = json!({"name": "peek", "program": {"kind": "shell", "code": code}});
    let r: Value = ureq::post(&format!("{url}/api/v1/tasks"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(body)
        .unwrap()
        .into_json()
        .unwrap();
    let id = r["execution_id"].as_i64().unwrap();
    let t0 = Instant::now();
    let logs = loop {
        let l = ureq::get(&format!("{url}/api/v1/executions/{id}/logs"))
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        if l.contains("done") || t0.elapsed() > Duration::from_secs(15) {
            break l;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::write(out_file, &logs);
    assert!(logs.contains("done"), "{logs}");
    assert!(
        !logs.contains("readable"),
        "a script read the node's /proc files: {logs}"
    );
}

#[test]
fn one_request_cannot_tie_up_the_node_and_numbers_are_masked_too() {
    let s = Server::start(&support::temp_dir("sec-bombs"), &[], "");
    // An environment of 5,000 entries, and a time far outside any calendar, are refused.
    let env: serde_json::Map<String, Value> =
        (0..5000).map(|i| (format!("V{i}"), json!("x"))).collect();
    let t = json!({"name": "envbomb", "program": {"kind": "shell", "code": "true", "env": env}});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&t.to_string()));
    assert_eq!(code, 400, "{v}");
    let t = json!({"name": "far", "schedule": {"kind": "once", "at": i64::MIN}, "program": {"kind": "shell", "code": "true"}});
    let (code, v) = s.call("POST", "/api/v1/tasks", Some(&t.to_string()));
    assert_eq!(code, 400, "{v}");
    // A secret written as a JSON number is masked in the result.
    let t = json!({"name": "pin", "program": {"kind": "shell", "code": "echo \"{\\\"x\\\": $PW}\" >&3", "secret_env": {"PW": "12345678"}}});
    let (_, e) = s.submit(t);
    let v = s.wait_final(e, Duration::from_secs(10));
    assert_eq!(v["result"]["x"], "******", "{v}");
    // Many secrets over a lot of output: masked in one pass, other work is not held up.
    let secrets: serde_json::Map<String, Value> = (0..1000)
        .map(|i| (format!("S{i}"), json!(format!("s3cr3t-{i:05}-x"))))
        .collect();
    let t = json!({"name": "many", "program": {"kind": "shell", "code": "head -c 2000000 /dev/urandom | base64; echo s3cr3t-00042-x", "secret_env": secrets}});
    let (_, many) = s.submit(t);
    let (_, victim) = s.submit(shell("victim", "echo ok"));
    let v = s.wait_final(victim, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}");
    let v = s.wait_final(many, Duration::from_secs(60));
    assert_eq!(v["status"], "succeeded", "{v}");
}

#[test]
fn idle_grpc_connections_cannot_take_the_node_s_descriptors() {
    let dir = support::temp_dir("sec-grpcflood");
    let s = Server::start(&dir, &[], "");
    let grpc = s
        .grpc
        .as_ref()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    // More idle connections than the gRPC cap; each sends only the HTTP/2 preface.
    let mut held = Vec::new();
    for _ in 0..700 {
        if let Ok(mut c) =
            TcpStream::connect_timeout(&grpc.parse().unwrap(), Duration::from_millis(200))
        {
            let _ = c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            held.push(c);
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", s.child.id()))
        .unwrap()
        .count();
    assert!(fds < 700, "{fds} descriptors open in the server");
    assert!(healthy(&s));
    let (_, e) = s.submit(shell("still", "echo fine"));
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}");
    drop(held);
}
