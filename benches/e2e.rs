//! End-to-end benchmark (prints figures, asserts nothing): submits N trivial tasks (`true`) over
//! HTTP to `etask server --mode all` and waits for every result; prints executions/s and the
//! submit→start latency p50/p99, next to the raw `sh -c true` spawn rate measured in the same
//! run. Runs on the embedded SQLite store, then on MariaDB when one answers, then through the
//! Kafka agent path with one and two agents (a tansu broker started here, when $ETASK_TANSU or
//! ~/.cache/etask-tools/tansu exists; scripts/test.sh fetches it).
//! Usage: cargo bench --bench e2e -- [--tasks N] [--concurrency C] [--mysql URL|none] [--kafka none]

use std::io::{BufRead, BufReader};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "common/mod.rs"]
mod common;
use common::raw_spawn_rate;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// A keep-alive HTTP/1.1 connection that sends each request in one write. (ureq writes the
/// headers and the body separately; with Nagle and delayed ACKs every POST then waits ~40 ms,
/// which would measure the client, not the scheduler.)
struct Conn {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl Conn {
    fn open(url: &str) -> Conn {
        let addr = url.trim_start_matches("http://");
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Conn {
            stream: std::io::BufReader::new(s),
        }
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> Value {
        use std::io::{Read, Write};
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .expect("send");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).expect("response");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("content-length");
            }
        }
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).expect("body");
        serde_json::from_slice(&buf).unwrap_or(Value::Null)
    }
}

struct Run {
    rate: f64,
    p50_ms: i64,
    p99_ms: i64,
    /// Submit→start of single tasks submitted one at a time on an idle system (p50, p99).
    idle: (i64, i64),
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(-1)
}

/// The agent path: a broker address and how many agents (each with `conc` slots).
type Kafka<'a> = Option<(&'a str, usize)>;

fn run(store: Option<&str>, tasks: usize, conc: usize, kafka: Kafka) -> Run {
    let dir = std::env::temp_dir().join(format!("etask-bench-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let cfg = dir.join("etask.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nmax_concurrent = {conc}\nqueue_capacity = {}\n",
            tasks + 16
        ),
    )
    .expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etask"));
    cmd.args([
        "server",
        "--mode",
        "all",
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--config",
    ])
    .arg(&cfg)
    .arg("--data-dir")
    .arg(dir.join("data"));
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    if let Some((addr, _)) = kafka {
        cmd.args(["--kafka", addr]);
    }
    let mut child = cmd
        .env("ETASK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start etask");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listen line");
    let url = line
        .trim()
        .trim_start_matches("etask listening on ")
        .to_owned();
    let mut agents = Vec::new();
    let mut target = json!({"path": "local"});
    if let Some((addr, n)) = kafka {
        for i in 0..n {
            agents.push(
                Command::new(env!("CARGO_BIN_EXE_etask"))
                    .args([
                        "server", "--mode", "agent", "--kafka", addr, "--pool", "bench",
                    ])
                    .args(["--node-id", &format!("bench-agent-{i}"), "--config"])
                    .arg(&cfg)
                    .arg("--data-dir")
                    .arg(dir.join(format!("agent-{i}")))
                    .env("ETASK_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("start agent"),
            );
        }
        target = json!({"path": "agent", "pool": "bench"});
    }
    // Before the clock starts: every agent has joined its group (the rebalances are over)
    // when each one has run some of a few rounds of warm-up tasks.
    let mut warm = 0;
    if let Some((_, n)) = kafka {
        let mut conn = Conn::open(&url);
        let mut nodes = std::collections::HashSet::new();
        let t = Instant::now();
        while nodes.len() < n && t.elapsed() < Duration::from_secs(60) {
            let ids: Vec<i64> = (0..16)
                .map(|i| {
                    let body = json!({"name": format!("warm-{i}"), "program": {"kind": "shell", "code": "true"}, "target": target});
                    conn.request("POST", "/api/v1/tasks", &body.to_string())["execution_id"]
                        .as_i64()
                        .expect("execution id")
                })
                .collect();
            warm += ids.len();
            for id in ids {
                loop {
                    let e = conn.request("GET", &format!("/api/v1/executions/{id}"), "");
                    if e["status"] == "succeeded" {
                        nodes.insert(e["node"].as_str().unwrap_or("").to_owned());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let t0 = Instant::now();
    let submitters = 4;
    let ids: Vec<i64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..submitters)
            .map(|k| {
                let (url, target) = (url.clone(), target.clone());
                s.spawn(move || {
                    let mut conn = Conn::open(&url);
                    (0..tasks / submitters)
                        .map(|i| {
                            let body = json!({"name": format!("b{k}-{i}"), "program": {"kind": "shell", "code": "true"}, "target": target});
                            let v = conn.request("POST", "/api/v1/tasks", &body.to_string());
                            v["execution_id"].as_i64().expect("execution id")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("submitter"))
            .collect()
    });
    // Wait until every execution succeeded (watching the store's counts), then read them.
    let n = ids.len() + warm;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    loop {
        let m = agent
            .get(&format!("{url}/metrics"))
            .call()
            .expect("metrics")
            .into_string()
            .expect("text");
        let done: usize = m
            .lines()
            .find_map(|l| l.strip_prefix("etask_executions{status=\"succeeded\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if done >= n || t0.elapsed() > Duration::from_secs(600) {
            if done < n {
                eprintln!("only {done} of {n} executions succeeded in 600 s");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = t0.elapsed();
    let mut rows: Vec<Value> = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let path = match cursor {
            Some(c) => format!("/api/v1/executions?limit=500&cursor={c}"),
            None => "/api/v1/executions?limit=500".to_string(),
        };
        let v: Value = agent
            .get(&format!("{url}{path}"))
            .call()
            .expect("list")
            .into_json()
            .expect("json");
        rows.extend(v["items"].as_array().cloned().unwrap_or_default());
        cursor = v["next_cursor"].as_i64();
        if cursor.is_none() {
            break;
        }
    }
    // Only the measured burst (not the warm-up).
    let measured: std::collections::HashSet<i64> = ids.iter().copied().collect();
    rows.retain(|r| r["id"].as_i64().is_some_and(|id| measured.contains(&id)));
    // Latency without a queue: one task at a time, each waited for.
    let mut idle: Vec<i64> = Vec::new();
    let mut conn = Conn::open(&url);
    for i in 0..50 {
        let body = json!({"name": format!("idle-{i}"), "program": {"kind": "shell", "code": "true"}, "target": target});
        let v = conn.request("POST", "/api/v1/tasks", &body.to_string());
        let id = v["execution_id"].as_i64().expect("execution id");
        let t = Instant::now();
        loop {
            let e = conn.request("GET", &format!("/api/v1/executions/{id}"), "");
            if e["status"] == "succeeded" {
                if let (Some(a), Some(b)) = (e["started_at"].as_i64(), e["created_at"].as_i64()) {
                    idle.push(a - b);
                }
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                eprintln!("idle task {id} did not finish: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    idle.sort_unstable();
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let mut lat: Vec<i64> = rows
        .iter()
        .filter_map(|r| Some(r["started_at"].as_i64()? - r["created_at"].as_i64()?))
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| percentile(&lat, p);
    let ok = rows.iter().filter(|r| r["status"] == "succeeded").count();
    Run {
        rate: ok as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        idle: (percentile(&idle, 0.5), percentile(&idle, 0.99)),
    }
}

fn mysql_bench_db(server: &str) -> Option<String> {
    use mysql::prelude::Queryable;
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(server).ok()?).ok()?;
    let db = format!("etask_bench_{}", std::process::id());
    conn.query_drop(format!("DROP DATABASE IF EXISTS {db}"))
        .ok()?;
    conn.query_drop(format!("CREATE DATABASE {db}")).ok()?;
    Some(format!("{}/{db}", server.trim_end_matches('/')))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tasks: usize = arg("--tasks").and_then(|v| v.parse().ok()).unwrap_or(1000);
    let conc: usize = arg("--concurrency")
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mysql = arg("--mysql").unwrap_or_else(|| "mysql://root@127.0.0.1:3306/".into());
    let raw = raw_spawn_rate(2000, conc);
    println!("e2e: {tasks} tasks of `true` over HTTP to --mode all, node concurrency {conc}");
    println!("  raw spawn (sh -c true, piped stdio):   {raw:8.0} runs/s");
    report("sqlite", &run(None, tasks, conc, None), raw, 50);
    if mysql != "none" {
        match mysql_bench_db(&mysql) {
            Some(url) => {
                report("mariadb", &run(Some(&url), tasks, conc, None), raw, 30);
            }
            None => println!("  mariadb: skipped (no server at {mysql})"),
        }
    }
    if arg("--kafka").as_deref() == Some("none") {
        return;
    }
    let Some(mut broker) = start_broker() else {
        println!("  agents:  skipped (no tansu broker binary; set ETASK_TANSU)");
        return;
    };
    for n in [1, 2] {
        let r = run(None, tasks, conc, Some((&broker.1, n)));
        report(&format!("{n} agent(s), kafka"), &r, raw, 25);
    }
    let _ = broker.0.kill();
    let _ = broker.0.wait();
}

fn report(what: &str, r: &Run, raw: f64, target_pct: u32) {
    println!(
        "  {what}: {:.0} executions/s = {:.0} % of raw (target >= {target_pct} %); submit->start \
         in the burst p50 {} ms, p99 {} ms; one at a time p50 {} ms, p99 {} ms",
        r.rate,
        100.0 * r.rate / raw,
        r.p50_ms,
        r.p99_ms,
        r.idle.0,
        r.idle.1
    );
}

/// tansu on a free port with the topics of the `bench` pool.
fn start_broker() -> Option<(std::process::Child, String)> {
    let bin = std::env::var("ETASK_TANSU").unwrap_or_else(|_| {
        format!(
            "{}/.cache/etask-tools/tansu",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    if !std::path::Path::new(&bin).exists() {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("tcp://{addr}");
    let child = Command::new(&bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for t in [
        "etask.events",
        "etask.control",
        "etask.dead-letter",
        "etask.dispatch.bench",
    ] {
        Command::new(&bin)
            .args(["topic", "create", t, "--broker", &url, "--partitions", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
    }
    Some((child, addr))
}
