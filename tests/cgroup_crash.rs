//! A node killed with `kill -9` mid-run, then restarted on the same data dir: what its run
//! left (processes re-parented when the node died) is gone before the retried attempt starts —
//! through the run cgroups where the host has them, through the run token in the fallback.
//! Drives the real `etask server --mode all` binary; a separate test binary from
//! tests/cgroup.rs because a process pool would reap the servers it starts.

mod support;

use std::time::Duration;

use serde_json::json;
use support::server::Server;

/// The state letter of a process ('Z' zombie, ...); None once it is gone.
fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|v| v.trim().chars().next())
}

fn running(pid: i32) -> bool {
    state(pid).is_some_and(|c| c != 'Z')
}

/// Attempt 1 leaves `sleep 300` processes behind (their pids in `pids`) and waits; attempt 2
/// reports, as its result, which of them still run when it starts.
fn script(pids: &std::path::Path, escapee: bool) -> String {
    let p = pids.display();
    let esc = if escapee {
        // Clears its environment (no token) and leaves the run's process tree.
        format!(
            "env -i /bin/sh -c 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! >> {p}'\n"
        )
    } else {
        String::new()
    };
    format!(
        "if [ \"$ETASK_ATTEMPT\" = 1 ]; then\n{esc}sleep 300 &\necho $! >> {p}\necho started\nwait\nfi\n\
         alive=''\nfor x in $(cat {p}); do\n  s=$(sed -n 's/^State:\\t\\(.\\).*/\\1/p' /proc/$x/status 2>/dev/null)\n  \
         if [ -n \"$s\" ] && [ \"$s\" != Z ]; then alive=\"$alive $x\"; fi\ndone\n\
         echo \"{{\\\"alive\\\": \\\"$alive\\\"}}\" >&3\n"
    )
}

fn crash_then_restart(mode: &str) {
    let dir = support::temp_dir(&format!("cg-crash-{mode}"));
    let config = format!("[node]\ncgroup = \"{mode}\"\n");
    let mut s = Server::start(&dir, &[], &config);
    let (_, nodes) = s.call("GET", "/api/v1/nodes", None);
    let containment = nodes["items"][0]["containment"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let contained = containment != "none";
    if mode != "off" && !contained {
        println!("skipped: this host offers no writable cgroup ({nodes})");
        return;
    }
    let pids = dir.join("pids");
    let mut body = json!({
        "name": format!("crash-{mode}"),
        "program": {"kind": "shell", "code": script(&pids, contained)},
    });
    body["retry"] = json!({"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 100});
    let (_, e) = s.submit(body);
    let want = if contained { 2 } else { 1 };
    let t0 = std::time::Instant::now();
    let left: Vec<i32> = loop {
        let v: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if v.len() >= want {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "attempt 1 never started its sleeps\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    s.kill9();
    // The bug this pins: the node is gone, and what its run started still runs.
    std::thread::sleep(Duration::from_millis(300));
    for &p in &left {
        assert!(
            running(p),
            "pid {p} died with the node; the test shows nothing"
        );
    }
    let s2 = Server::start(&dir, &[], &config);
    let v = s2.wait_final(e, Duration::from_secs(60));
    assert_eq!(v["attempt"], 2, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s2.log());
    assert_eq!(
        v["result"]["alive"].as_str().map(str::trim),
        Some(""),
        "the old attempt's processes ran beside the retry: {v}"
    );
    for &p in &left {
        assert!(!running(p), "pid {p} of the crashed node's run survived");
    }
    if contained {
        assert!(
            s2.log().contains("left by a previous incarnation"),
            "{}",
            s2.log()
        );
    }
}

#[test]
fn kill_9_of_the_node_then_restart_removes_the_old_run_before_the_retry_starts() {
    crash_then_restart("auto");
}

#[test]
fn kill_9_then_restart_in_the_fallback_kills_the_old_runs_token_processes() {
    crash_then_restart("off");
}
