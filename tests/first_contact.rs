//! Faults a first user and the field found (issue 10), through the real binary: secrets in
//! every shape and every way a script can write them, multi-byte characters cut by slow output,
//! Python output that must be live and survive a timeout, and a relative data dir.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{shell, Server};

fn logs(s: &Server, id: i64) -> String {
    ureq::get(&format!("{}/api/v1/executions/{id}/logs", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// The text of an execution's log as a script wrote it (chunks joined per stream).
fn text(s: &Server, id: i64, stream: &str) -> String {
    logs(s, id)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["stream"] == stream)
        .map(|v| v["data"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn secret_values_never_leave_the_node_in_clear() {
    let s = Server::start(&support::temp_dir("fc-secrets"), &[], "");
    let (tx, rx) = crossbeam_channel::unbounded();
    let cb = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = cb.server_addr().to_ip().unwrap().port();
    std::thread::spawn(move || {
        for mut req in cb.incoming_requests() {
            let mut b = String::new();
            let _ = std::io::Read::read_to_string(req.as_reader(), &mut b);
            let _ = tx.send(b);
            let _ = req.respond(tiny_http::Response::from_string("ok"));
        }
    });
    let secrets = json!({
        "PEM": "one1secret\ntwo2secret",
        "SHORT": "q9",
        "REGEX": "a.*b[0]$",
        "UNI": "密码中文",
    });
    // Whole, in pieces with pauses (across batch flushes), one line of a multi-line value, on
    // both streams, and in the fd-3 result (as a value, inside a list, as a key).
    let code = r#"
echo "whole: $PEM"
printf 'pieces: %s' "${PEM:0:6}"; sleep 0.5; printf '%s' "${PEM:6:7}"; sleep 0.5; printf '%s end\n' "${PEM:13}"
echo "line only: ${PEM#*$'\n'}" >&2
echo "short: $SHORT regex: $REGEX uni: $UNI" >&2
printf '%s' "${UNI:0:1}"; sleep 0.5; printf '%s\n' "${UNI:1}"
pem_json=$(printf '%s' "$PEM" | sed ':a;N;$!ba;s/\n/\\n/g')
printf '{"pem": "%s", "list": ["%s"], "%s": 1}' "$pem_json" "$REGEX" "$SHORT" >&3
"#;
    let mut t = json!({"name": "secrets",
                       "program": {"kind": "shell", "shell": "bash", "code": code, "secret_env": secrets}});
    t["callback_url"] = json!(format!("http://127.0.0.1:{port}/cb"));
    let (task, e) = s.submit(t);
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}");
    let cb_body = rx.recv_timeout(Duration::from_secs(10)).expect("callback");
    let (_, task_json) = s.call("GET", &format!("/api/v1/tasks/{task}"), None);
    let everything = format!(
        "{}\n{}\n{}\n{}\n{}",
        logs(&s, e),
        v,
        cb_body,
        task_json,
        std::fs::read_to_string(s.dir.join("server.log")).unwrap_or_default()
    );
    for needle in [
        "one1secret",
        "two2secret",
        "one1se",
        "a.*b[0]$",
        "密码中文",
        "密码",
        "\"q9\"",
        " q9 ",
    ] {
        assert!(
            !everything.contains(needle),
            "{needle:?} leaked:\n{everything}"
        );
    }
    let out = text(&s, e, "stdout");
    assert!(out.contains("whole: ******"), "{out}");
    assert!(out.contains("pieces: ****** end"), "{out}");
    assert!(
        v["result"]["pem"] == "******" && v["result"]["list"][0] == "******",
        "{v}"
    );
}

#[test]
fn a_character_split_across_slow_writes_is_stored_whole() {
    let s = Server::start(&support::temp_dir("fc-utf8"), &[], "");
    let (_, e) = s.submit(shell(
        "utf8",
        r"printf 'progress \344\270'; sleep 0.6; printf '\255 done\n'; printf '\360\237'; sleep 0.6; printf '\230\200 \377 end\n' >&1",
    ));
    s.wait_final(e, Duration::from_secs(10));
    let out = text(&s, e, "stdout");
    assert_eq!(out, "progress 中 done\n😀 \u{fffd} end\n");
}

#[test]
fn python_output_is_live_and_survives_a_timeout() {
    let s = Server::start(&support::temp_dir("fc-python"), &[], "");
    let t = json!({"name": "py", "timeout_seconds": 3,
                   "program": {"kind": "python", "code": "import time\nprint('phase 1')\ntime.sleep(30)\n"}});
    let (_, e) = s.submit(t);
    let t0 = Instant::now();
    let mut seen_live = false;
    while t0.elapsed() < Duration::from_secs(2) {
        if text(&s, e, "stdout").contains("phase 1") {
            seen_live = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen_live, "nothing streamed while the script ran");
    let v = s.wait_final(e, Duration::from_secs(15));
    assert_eq!(v["status"], "timed_out", "{v}");
    assert_eq!(text(&s, e, "stdout"), "phase 1\n");
}

#[test]
fn a_relative_data_dir_works_like_an_absolute_one() {
    let cwd = support::temp_dir("fc-relative");
    std::fs::create_dir_all(&cwd).unwrap();
    // No --data-dir, no config: the default `./etask-data` relative to an empty directory.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etask"));
    cmd.args(support::server::ALL_NO_GRPC).current_dir(&cwd);
    let (mut child, url) = support::server::spawn_listening(cmd);
    let r: Value = ureq::post(&format!("{url}/api/v1/tasks"))
        .send_json(json!({"name": "rel", "program": {"kind": "shell", "code": "echo '{\"ok\": 1}' >&3; pwd"}}))
        .unwrap()
        .into_json()
        .unwrap();
    let id = r["execution_id"].as_i64().unwrap();
    let t0 = Instant::now();
    let v = loop {
        let v: Value = ureq::get(&format!("{url}/api/v1/executions/{id}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if v["status"] != "pending" && v["status"] != "dispatched" && v["status"] != "running" {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"]["ok"], 1, "{v}");
    assert!(cwd.join("etask-data").join("etask.db").exists());
}

/// A store that fills up while a script prints: the chunks it refuses are lost, but never
/// silently. Once space is back, a note in their place says how many and why, and the run's
/// outcome is stored. Before, the execution read `succeeded` with a third of its log missing
/// and nothing in the API said so. The data dir is a 2 MiB tmpfs in a mount namespace of the
/// server's own; it grows to 64 MiB while the script still runs.
#[test]
fn log_chunks_a_full_store_refused_are_replaced_by_a_note_saying_so() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a tmpfs in a private mount namespace");
        return;
    }
    let dir = support::temp_dir("fc-full-store");
    let mnt = dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=2m tmpfs \"$1\" && exec \"$2\" server --mode all \
             --listen \"$3\" --grpc-listen '' --data-dir \"$1/data\"",
        )
        .arg("sh")
        .arg(&mnt)
        .arg(env!("CARGO_BIN_EXE_etask"))
        .arg(format!("127.0.0.1:{port}"))
        .env_remove("ETASK_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare");
    let server_log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (sink, stderr) = (server_log.clone(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let t0 = Instant::now();
    while ureq::get(&format!("{url}/healthz")).call().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    // ~5 MiB of output into a 2 MiB file system, then a pause before the end.
    let body = json!({
        "name": "chatty",
        "program": {"kind": "shell", "code":
            "i=0; while [ $i -lt 120000 ]; do echo \"line $i of a script that says a lot\"; i=$((i+1)); done; sleep 3; echo '{\"n\": 1}' >&3"},
    });
    let v: Value = ureq::post(&format!("{url}/api/v1/tasks"))
        .send_json(body)
        .unwrap()
        .into_json()
        .unwrap();
    let id = v["execution_id"].as_i64().unwrap();
    // Wait until the store has refused something, then give it room.
    let t0 = Instant::now();
    while !server_log.lock().unwrap().contains("cannot store") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the store never filled up: {}",
            server_log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // /healthz says so: the store answers its ping but refuses writes (503). It used to say
    // "ok" all along.
    let health = || -> (u16, Value) {
        let r = match ureq::get(&format!("{url}/healthz")).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("healthz: {e}"),
        };
        (r.status(), r.into_json().unwrap_or_default())
    };
    let t0 = Instant::now();
    let mut h = health();
    while h.1["store"] != "refusing writes" && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        h = health();
    }
    assert_eq!(h.0, 503, "{h:?}");
    assert_eq!(h.1["store"], "refusing writes", "{h:?}");
    std::thread::sleep(Duration::from_millis(500));
    let grown = Command::new("nsenter")
        .args([
            "-t",
            &child.id().to_string(),
            "-m",
            "mount",
            "-o",
            "remount,size=64m",
        ])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(grown.success());
    let t0 = Instant::now();
    let e = loop {
        let e: Value = ureq::get(&format!("{url}/api/v1/executions/{id}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if e["status"] == "succeeded" {
            break e;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{e}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(e["result"]["n"], 1, "{e}");
    // Writes are taken again: healthy.
    let h = health();
    assert_eq!((h.0, &h.1["store"]), (200, &json!("ok")), "{h:?}");
    let t0 = Instant::now();
    let note = loop {
        let logs = ureq::get(&format!("{url}/api/v1/executions/{id}/logs"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let note = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["stream"] == "stderr")
            .and_then(|v| v["data"].as_str().map(str::to_owned));
        if let Some(n) = note {
            break n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no note in the logs"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        note.starts_with("[etask: ") && note.contains("could not be stored and are lost"),
        "{note}"
    );
    // An idle server: the disk fills with something else, a task is refused (503) and
    // /healthz says the store refuses writes; space comes back and, with nothing else writing,
    // /healthz says ok again within seconds (it used to stay 503 until some write came).
    let in_ns = |script: &str| {
        Command::new("nsenter")
            .args(["-t", &child.id().to_string(), "-m", "sh", "-c", script])
            .arg("sh")
            .arg(&mnt)
            .status()
            .unwrap()
    };
    in_ns("mount -o remount,size=4m \"$1\" && dd if=/dev/zero of=\"$1/filler\" bs=64k 2>/dev/null; true");
    let t0 = Instant::now();
    loop {
        let r = ureq::post(&format!("{url}/api/v1/tasks")).send_json(json!({
            "name": "refused", "program": {"kind": "shell", "code": "true"}}));
        match r {
            Err(ureq::Error::Status(503, _)) => break,
            Ok(_) => {
                // It fit in a page freed earlier: one more.
                assert!(t0.elapsed() < Duration::from_secs(20), "never refused");
            }
            Err(e) => panic!("{e}"),
        }
    }
    let h = health();
    assert_eq!(
        (h.0, &h.1["store"]),
        (503, &json!("refusing writes")),
        "{h:?}"
    );
    assert!(in_ns("rm -f \"$1/filler\"").success());
    let t0 = Instant::now();
    let mut h = health();
    while h.0 != 200 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        h = health();
    }
    assert_eq!((h.0, &h.1["store"]), (200, &json!("ok")), "{h:?}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let log = server_log.lock().unwrap();
    assert!(
        log.contains("log chunks were lost; a note says so in their place"),
        "{log}"
    );
}
