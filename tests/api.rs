//! The HTTP API as README "HTTP API" documents it, through the real binary: pause and resume,
//! the response shapes, list limits, refused query parameters and the error codes.

mod support;

use std::time::Duration;

use serde_json::json;
use support::server::{shell, Server};

/// A 6-field cron expression (UTC) that fires once a day, `secs` seconds from now.
fn fires_in(secs: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::seconds(secs);
    t.format("%S %M %H * * *").to_string()
}

fn executions(s: &Server, task: i64) -> usize {
    let (_, v) = s.call("GET", &format!("/api/v1/executions?task_id={task}"), None);
    v["items"].as_array().map_or(0, Vec::len)
}

#[test]
fn pause_of_a_once_task_is_refused_and_resume_skips_missed_fires_unless_asked() {
    let s = Server::start(&support::temp_dir("api-pause"), &[], "");
    // A once task: nothing to pause, and the API says so instead of pretending.
    let mut once = shell("later", "true");
    once["schedule"] = json!({"kind": "once", "at": now_ms() + 60_000});
    let (task, _) = s.submit(once);
    for action in ["pause", "resume"] {
        let (code, v) = s.call(
            "POST",
            &format!("/api/v1/tasks/{task}/{action}"),
            Some("{}"),
        );
        assert_eq!(code, 409, "{action}: {v}");
        assert_eq!(v["error"]["code"], "conflict", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("runs once"),
            "{v}"
        );
    }
    // Two cron tasks whose only fire time today passes while they are paused.
    let cron = |name: &str| {
        let mut b = shell(name, "true");
        b["schedule"] = json!({"kind": "cron", "expr": fires_in(2)});
        let (code, v) = s.call("POST", "/api/v1/tasks", Some(&b.to_string()));
        assert_eq!(code, 201, "{v}");
        let id = v["task_id"].as_i64().unwrap();
        let (code, v) = s.call("POST", &format!("/api/v1/tasks/{id}/pause"), Some("{}"));
        assert_eq!((code, &v["paused"]), (200, &json!(true)), "{v}");
        id
    };
    let (plain, catch_up) = (cron("plain"), cron("catch-up"));
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!((executions(&s, plain), executions(&s, catch_up)), (0, 0));
    let (code, v) = s.call("POST", &format!("/api/v1/tasks/{plain}/resume"), Some("{}"));
    assert_eq!((code, &v["paused"]), (200, &json!(false)), "{v}");
    let (code, v) = s.call(
        "POST",
        &format!("/api/v1/tasks/{catch_up}/resume?catch_up=true"),
        Some("{}"),
    );
    assert_eq!(code, 200, "{v}");
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(executions(&s, plain), 0, "resume fired a missed time");
    assert_eq!(executions(&s, catch_up), 1, "resume?catch_up=true ran none");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn work_for_a_path_or_pool_with_no_node_fails_at_once() {
    // --mode all without a registry serves `local` only (and `agent` with --kafka): push and
    // pull are refused naming what they need, not left pending.
    let s = Server::start(&support::temp_dir("api-nonode"), &[], "");
    for (path, needs) in [
        ("push", "registry"),
        ("pull", "registry"),
        ("agent", "Kafka"),
    ] {
        let mut b = shell("nowhere", "true");
        b["target"] = json!({"path": path, "pool": "edge"});
        let (code, v) = s.call("POST", "/api/v1/tasks", Some(&b.to_string()));
        assert_eq!(code, 400, "{path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needs),
            "{v}"
        );
    }
    // With a registry but no node in the pool: 503 at once, naming the pool.
    let etcd = support::EtcdServer::start("api-nonode");
    let s = Server::start(
        &support::temp_dir("api-nonode-reg"),
        &[],
        &format!("[registry]\netcd = \"{}\"\n", etcd.url),
    );
    s.wait_nodes_where(1, |n| n["path"] == "local");
    for path in ["push", "pull"] {
        let mut b = shell("nobody-home", "true");
        b["target"] = json!({"path": path, "pool": "edeg"});
        let t0 = std::time::Instant::now();
        let (code, v) = s.call("POST", "/api/v1/tasks", Some(&b.to_string()));
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (503, Some("unavailable")),
            "{v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains("\"edeg\""),
            "{v}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
    let (_, tasks) = s.call("GET", "/api/v1/tasks", None);
    assert_eq!(tasks["items"], json!([]), "nothing was created");
}

#[test]
fn list_limits_query_parameters_and_methods_are_checked_as_documented() {
    let s = Server::start(&support::temp_dir("api-query"), &[], "");
    for i in 0..3 {
        s.submit(shell(&format!("t{i}"), "true"));
    }
    let get = |p: &str| s.call("GET", p, None);
    // limit: 1 to 500, 50 when absent.
    let (code, v) = get("/api/v1/tasks?limit=1");
    assert_eq!(
        (code, v["items"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );
    assert!(v["next_cursor"].is_i64(), "{v}");
    for bad in ["limit=0", "limit=501", "limit=-1", "limit=x"] {
        for list in ["tasks", "executions"] {
            let (code, v) = get(&format!("/api/v1/{list}?{bad}"));
            assert_eq!(
                (code, v["error"]["code"].as_str()),
                (400, Some("invalid_argument")),
                "{list}?{bad}: {v}"
            );
        }
    }
    // Unknown or repeated query parameters are refused like unknown body fields.
    for (path, word) in [
        ("/api/v1/tasks?colour=red", "colour"),
        ("/api/v1/tasks?limit=1&limit=2", "more than once"),
        ("/api/v1/executions?task=1", "task_id"),
        ("/api/v1/executions/1?verbose=1", "takes none"),
        ("/api/v1/executions/1/logs?follow=yes", "true or false"),
        ("/api/v1/executions/1/logs?after=3", "after_seq"),
    ] {
        let (code, v) = get(path);
        assert_eq!(code, 400, "{path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(word),
            "{path}: {v}"
        );
    }
    let (code, _) = s.call("POST", "/api/v1/tasks/1/run?now=1", Some("{}"));
    assert_eq!(code, 400);
    // A method a resource does not take: 405, with the documented error shape.
    let (code, v) = s.call("PUT", "/api/v1/tasks", Some("{}"));
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
}
