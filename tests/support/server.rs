//! `etask server --mode all` as a child process on free ports, driven over its HTTP API.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    /// The scheduler's gRPC URL.
    pub grpc: Option<String>,
}

impl Server {
    /// Starts `etask server --mode all` with `extra_config` appended to a test config.
    pub fn start(dir: &Path, extra_args: &[&str], extra_config: &str) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("etask.toml");
        // Lines of extra_config before its first [section] belong to [scheduler]; a
        // "poll_interval_ms = N" among them replaces the test default.
        let split = extra_config.find("\n[").map_or(
            if extra_config.starts_with('[') {
                0
            } else {
                extra_config.len()
            },
            |i| {
                if extra_config.starts_with('[') {
                    0
                } else {
                    i + 1
                }
            },
        );
        let (sched, extra_config) = extra_config.split_at(split);
        // A leading [node] section joins the [node] table written below (a second header
        // would be a TOML error).
        let extra_config = extra_config
            .strip_prefix("[node]\n")
            .unwrap_or(extra_config);
        // A [callbacks] section of extra_config adds its keys to the test's own.
        let (callbacks, extra_config) = match extra_config.find("[callbacks]\n") {
            Some(i) => {
                let body = &extra_config[i + "[callbacks]\n".len()..];
                let end = body.find("\n[").map_or(body.len(), |j| j + 1);
                (
                    body[..end].to_owned(),
                    format!("{}{}", &extra_config[..i], &body[end..]),
                )
            }
            None => (String::new(), extra_config.to_owned()),
        };
        let poll = if sched.contains("poll_interval_ms") {
            String::new()
        } else {
            "poll_interval_ms = 200\n".to_owned()
        };
        let text = format!(
            "[scheduler]\n{poll}{sched}\nheartbeat_interval_ms = 300\nnode_silent_after_ms = 2000\n\
             [callbacks]\ninitial_backoff_ms = 200\nmax_backoff_ms = 500\ntimeout_ms = 2000\nallowed_hosts = [\"127.0.0.1\"]\n{callbacks}\
             [node]\nkill_grace_seconds = 1\n{extra_config}"
        );
        std::fs::write(&cfg, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
            .args([
                "server",
                "--mode",
                "all",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra_args)
            // A free gRPC port unless the test chose one.
            .args(if extra_args.contains(&"--grpc-listen") {
                &[][..]
            } else {
                &["--grpc-listen", "127.0.0.1:0"][..]
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("server.log"))
                    .unwrap(),
            ))
            .spawn()
            .expect("start etask server");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let mut grpc_line = String::new();
        out.read_line(&mut grpc_line).unwrap();
        let grpc = grpc_line
            .trim()
            .strip_prefix("etask grpc on ")
            .map(str::to_owned);
        let url = line
            .trim()
            .strip_prefix("etask listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "no listen line; server log:\n{}",
                    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                )
            })
            .to_owned();
        Server {
            child,
            url,
            dir: dir.to_owned(),
            grpc,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let req =
            ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(30));
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match res {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    pub fn submit(&self, body: Value) -> (i64, i64) {
        let (code, v) = self.call("POST", "/api/v1/tasks", Some(&body.to_string()));
        assert_eq!(code, 201, "{v}");
        (
            v["task_id"].as_i64().unwrap(),
            v["execution_id"].as_i64().unwrap_or(0),
        )
    }

    pub fn execution(&self, id: i64) -> Value {
        let (code, v) = self.call("GET", &format!("/api/v1/executions/{id}"), None);
        assert_eq!(code, 200, "{v}");
        v
    }

    /// Polls until the execution satisfies `done`.
    pub fn wait_for(&self, id: i64, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let e = self.execution(id);
            if done(&e) {
                return e;
            }
            if t0.elapsed() > within {
                panic!(
                    "execution {id} did not get there in {within:?}: {e}\nserver log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_final(&self, id: i64, within: Duration) -> Value {
        self.wait_for(id, within, |e| {
            matches!(
                e["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled" | "lost")
            )
        })
    }

    /// Waits until at least `n` nodes of `GET /api/v1/nodes` match `pred`.
    pub fn wait_nodes_where(&self, n: usize, pred: impl Fn(&Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let (_, v) = self.call("GET", "/api/v1/nodes", None);
            let found = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| pred(x))
                .count();
            if found >= n {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{n} such nodes never registered: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn shell(name: &str, code: &str) -> Value {
    json!({"name": name, "program": {"kind": "shell", "code": code}})
}

pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Starts `cmd` (an `etask server` command line, possibly behind a wrapper such as `prlimit`
/// or `setpriv`) with stdout piped, and returns it with the HTTP URL from its first line.
/// For tests that need a start `Server::start` cannot express.
pub fn spawn_listening(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start etask server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .strip_prefix("etask listening on ")
        .unwrap_or_else(|| panic!("no listen line: {line:?}"))
        .to_owned();
    (child, url)
}

/// `etask server --mode all` on a free HTTP port without gRPC: the arguments `spawn_listening`
/// callers start from.
pub const ALL_NO_GRPC: &[&str] = &[
    "server",
    "--mode",
    "all",
    "--listen",
    "127.0.0.1:0",
    "--grpc-listen",
    "",
];
