//! The Kafka agent path end to end: a real Kafka-protocol broker (tansu, started per test on a
//! free port), `etask server --mode all --kafka …` as the scheduler and `etask server --mode
//! agent` processes, driven over the HTTP API.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use support::kafka::Broker;
use support::server::{pid_alive, Server};

struct Agent {
    child: support::Proc,
    id: String,
    dir: PathBuf,
}

impl Agent {
    fn start(dir: &Path, id: &str, pool: &str, brokers: &str, extra: &[&str]) -> Agent {
        Agent::start_with(dir, id, pool, brokers, extra, "")
    }

    /// `config` is appended to the agent's config file.
    fn start_with(
        dir: &Path,
        id: &str,
        pool: &str,
        brokers: &str,
        extra: &[&str],
        config: &str,
    ) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join(format!("{id}.toml"));
        std::fs::write(
            &cfg,
            format!("[node]\nkill_grace_seconds = 1\n[agent]\nheartbeat_ms = 300\n{config}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
            .args([
                "server", "--mode", "agent", "--kafka", brokers, "--pool", pool,
            ])
            .args(["--node-id", id, "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join(format!("data-{id}")))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{id}.log")))
                    .unwrap(),
            ))
            .spawn()
            .expect("start agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let a = Agent {
            child: support::Proc(child),
            id: id.to_owned(),
            dir: dir.to_owned(),
        };
        assert!(
            line.starts_with("etask agent "),
            "agent did not start: {line:?}\n{}",
            a.log()
        );
        a
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.id))).unwrap_or_default()
    }

    fn kill9(&mut self) {
        self.child.kill9();
    }
}

/// The scheduler (`--mode all`) on `broker`; runs on a silent agent are lost after 3 s unless
/// `extra_config` (keys of [kafka]) says otherwise.
fn scheduler(dir: &Path, broker: &Broker, extra_config: &str) -> Server {
    let silence = if extra_config.contains("agent_silent_after_ms") {
        ""
    } else {
        "agent_silent_after_ms = 3000\n"
    };
    Server::start(
        dir,
        &["--kafka", &broker.addr],
        &format!("[kafka]\n{silence}{extra_config}"),
    )
}

/// Waits until an agent of `pool` has joined its group and runs work.
fn warm_up(s: &Server, pool: &str) {
    let (_, e) = s.submit(agent_task("warm-up", pool, "true"));
    let v = s.wait_final(e, Duration::from_secs(60));
    assert_eq!(v["status"], "succeeded", "{v}");
}

fn agent_task(name: &str, pool: &str, code: &str) -> Value {
    json!({"name": name, "program": {"kind": "shell", "code": code},
           "target": {"path": "agent", "pool": pool}})
}

/// Inodes of the TCP/UDP sockets in LISTEN state (UDP: any bound socket) of this network
/// namespace, from /proc/<pid>/net.
fn listening_inodes(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (file, listen_state) in [
        ("tcp", Some("0A")),
        ("tcp6", Some("0A")),
        ("udp", None),
        ("udp6", None),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 9 && listen_state.is_none_or(|s| f[3] == s) {
                out.push(f[9].to_owned());
            }
        }
    }
    out
}

/// The socket inodes a process holds open.
fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn agent_round_trip_with_result_registry_and_no_listening_socket() {
    let dir = support::temp_dir("kafka-rt");
    let broker = Broker::start("rt");
    let etcd = support::EtcdServer::start("kafka-rt");
    let s = Server::start(
        &dir,
        &["--kafka", &broker.addr, "--etcd", &etcd.url],
        "[kafka]\nagent_silent_after_ms = 3000\n",
    );
    let a = Agent::start(
        &dir,
        "agent-1",
        "default",
        &broker.addr,
        &["--etcd", &etcd.url],
    );
    let (_, e) = s.submit(agent_task(
        "rt",
        "default",
        "echo out-line; echo err-line >&2; echo '{\"disk\":{\"free\":1}}' >&3; echo '{\"ok\":true}' >&3",
    ));
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", a.log());
    assert_eq!(v["node"], "agent-1");
    assert_eq!(v["result"], json!({"disk": {"free": 1}, "ok": true}));
    let text = ureq::get(&format!("{}/api/v1/executions/{e}/logs", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains("out-line") && text.contains("err-line"),
        "{text}"
    );

    // Registered in etcd under role agent, listed by the scheduler.
    s.wait_nodes_where(1, |n| {
        n["id"] == "agent-1" && n["role"] == "agent" && n["path"] == "agent"
    });

    // No listening socket at all: none of the agent's sockets is a listening TCP/UDP one.
    let pid = a.child.id();
    let mine = socket_inodes(pid);
    assert!(
        !mine.is_empty(),
        "the agent should hold its broker connections"
    );
    let listening = listening_inodes(pid);
    let bad: Vec<&String> = mine.iter().filter(|i| listening.contains(i)).collect();
    assert!(bad.is_empty(), "agent listens on sockets {bad:?}");
    // The check can fail: the scheduler (same namespace) does listen.
    let sched = socket_inodes(s.child.id());
    assert!(sched.iter().any(|i| listening.contains(i)));
}

#[test]
fn two_agents_of_one_pool_share_the_work() {
    let dir = support::temp_dir("kafka-share");
    let broker = Broker::start("share");
    let s = scheduler(&dir, &broker, "");
    let a1 = Agent::start(
        &dir,
        "share-1",
        "p2",
        &broker.addr,
        &["--max-concurrent", "2"],
    );
    let a2 = Agent::start(
        &dir,
        "share-2",
        "p2",
        &broker.addr,
        &["--max-concurrent", "2"],
    );
    // Let both join the group before the work arrives.
    std::thread::sleep(Duration::from_secs(4));
    let ids: Vec<i64> = (0..16)
        .map(|i| s.submit(agent_task(&format!("w{i}"), "p2", "sleep 0.3")).1)
        .collect();
    let mut by_node = std::collections::HashMap::<String, usize>::new();
    for e in ids {
        let v = s.wait_final(e, Duration::from_secs(60));
        assert_eq!(v["status"], "succeeded", "{v}\n{}\n{}", a1.log(), a2.log());
        *by_node
            .entry(v["node"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        by_node.len(),
        2,
        "both agents should have run work: {by_node:?}"
    );
}

#[test]
fn agent_killed_mid_run_is_retried_and_completed_once_by_the_other() {
    let dir = support::temp_dir("kafka-kill");
    let broker = Broker::start("kill");
    let s = scheduler(&dir, &broker, "");
    let mut a1 = Agent::start(&dir, "kill-1", "p3", &broker.addr, &[]);
    let mut a2 = Agent::start(&dir, "kill-2", "p3", &broker.addr, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let marks = dir.join("runs");
    let mut task = agent_task(
        "victim",
        "p3",
        &format!(
            "echo \"start $ETASK_ATTEMPT\" >> {m}\nsleep 2\necho \"done $ETASK_ATTEMPT\" >> {m}\n",
            m = marks.display()
        ),
    );
    task["retry"] = json!({"max_attempts": 3, "initial_backoff_ms": 100});
    let (_, e) = s.submit(task);
    let v = s.wait_for(e, Duration::from_secs(30), |v| v["status"] == "running");
    let first = v["node"].as_str().unwrap().to_owned();
    let t_kill = Instant::now();
    if first == a1.id {
        a1.kill9();
    } else {
        a2.kill9();
    }
    let v = s.wait_final(e, Duration::from_secs(40));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    assert_ne!(v["node"].as_str().unwrap(), first, "{v}");
    assert!(v["attempt"].as_i64().unwrap() >= 2, "{v}");
    assert_eq!(v["attempts"][0]["status"], "lost", "{v}");
    let text = std::fs::read_to_string(&marks).unwrap();
    assert_eq!(
        text.matches("done").count(),
        1,
        "completed exactly once: {text}"
    );
    eprintln!(
        "retried and completed {:?} after the kill",
        t_kill.elapsed()
    );
}

#[test]
fn broker_outage_loses_nothing_acknowledged() {
    let dir = support::temp_dir("kafka-outage");
    let broker = Broker::start("outage");
    let s = scheduler(
        &dir,
        &broker,
        "dispatch_ttl_seconds = 5\nagent_silent_after_ms = 15000\n",
    );
    let a = Agent::start(&dir, "outage-1", "p4", &broker.addr, &[]);
    warm_up(&s, "p4");
    // Running across the outage: its outcome is published after the broker is back.
    let (_, across) = s.submit(agent_task("across", "p4", "sleep 3; echo '{\"n\":1}' >&3"));
    s.wait_for(across, Duration::from_secs(30), |v| {
        v["status"] == "running"
    });
    // Accepted (201) while every connection to the broker is cut.
    let (_, during) = std::thread::scope(|sc| {
        let cut = sc.spawn(|| broker.outage(Duration::from_secs(4)));
        std::thread::sleep(Duration::from_millis(300));
        let during = s.submit(agent_task("during", "p4", "echo '{\"n\":2}' >&3"));
        cut.join().unwrap();
        during
    });
    let (_, after) = s.submit(agent_task("after", "p4", "echo '{\"n\":3}' >&3"));
    for (e, n) in [(across, 1), (during, 2), (after, 3)] {
        let v = s.wait_final(e, Duration::from_secs(60));
        assert_eq!(v["status"], "succeeded", "{v}\n{}\n{}", s.log(), a.log());
        assert_eq!(v["result"]["n"], n, "{v}");
        // A dispatch lost in the outage is dispatched again, but nothing runs twice.
        let ran = v["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| !a["started_at"].is_null())
            .count();
        assert_eq!(ran, 1, "ran exactly once: {v}");
    }
}

fn raw_producer(broker: &Broker) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

#[test]
fn garbage_on_dispatch_and_events_topics_is_dead_lettered_and_both_sides_go_on() {
    let dir = support::temp_dir("kafka-garbage");
    let broker = Broker::start("garbage");
    let s = scheduler(&dir, &broker, "");
    let a = Agent::start(&dir, "garbage-1", "p5", &broker.addr, &[]);
    let p = raw_producer(&broker);
    let bad: [&[u8]; 4] = [
        b"\xff\xfenot json at all",
        br#"{"v":1,"execution_id":12,"attempt":1,"task_id"#,
        br#"{"v":7,"execution_id":1}"#,
        br#"{"hello":"world"}"#,
    ];
    for topic in ["etask.dispatch.p5", "etask.events"] {
        for (i, b) in bad.iter().enumerate() {
            p.send(BaseRecord::to(topic).key(&format!("k{i}")).payload(*b))
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
    p.flush(Duration::from_secs(5)).unwrap();
    // Both sides still work.
    let (_, e) = s.submit(agent_task("after-garbage", "p5", "echo fine"));
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", a.log());
    // Every bad message is on the dead-letter topic with a reason, from the side that read it.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", "test-dead-letter")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&["etask.dead-letter"]).unwrap();
    let mut letters = Vec::new();
    let t0 = Instant::now();
    while letters.len() < 8 && t0.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            letters.push(serde_json::from_slice::<Value>(m.payload().unwrap()).unwrap());
        }
    }
    assert_eq!(letters.len(), 8, "{letters:?}");
    for topic in ["etask.dispatch.p5", "etask.events"] {
        let from: Vec<&Value> = letters.iter().filter(|l| l["topic"] == topic).collect();
        assert_eq!(from.len(), 4, "{letters:?}");
        assert!(from
            .iter()
            .all(|l| !l["reason"].as_str().unwrap().is_empty()));
        assert!(from
            .iter()
            .any(|l| l["reason"].as_str().unwrap().contains("version 7")));
    }
    assert!(letters
        .iter()
        .any(|l| l["topic"] == "etask.dispatch.p5" && l["by"] == "garbage-1"));
}

#[test]
fn cancel_reaches_the_agent_through_the_control_topic() {
    let dir = support::temp_dir("kafka-cancel");
    let broker = Broker::start("cancel");
    let s = scheduler(&dir, &broker, "");
    let a = Agent::start(&dir, "cancel-1", "p6", &broker.addr, &[]);
    let pidfile = dir.join("pid");
    let (_, e) = s.submit(agent_task(
        "long",
        "p6",
        &format!("echo $$ > {}\nexec sleep 60\n", pidfile.display()),
    ));
    s.wait_for(e, Duration::from_secs(30), |v| {
        v["status"] == "running" && pidfile.exists()
    });
    std::thread::sleep(Duration::from_millis(100));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(pid));
    let (code, v) = s.call("POST", &format!("/api/v1/executions/{e}/cancel"), None);
    assert_eq!(code, 200, "{v}");
    let t0 = Instant::now();
    while pid_alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "script still running\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.execution(e)["status"], "cancelled");
    assert!(a.log().contains("cancel"), "{}", a.log());
}

#[test]
fn expired_dispatch_is_not_started_and_dispatched_anew() {
    let dir = support::temp_dir("kafka-expired");
    let broker = Broker::start("expired");
    let s = scheduler(&dir, &broker, "dispatch_ttl_seconds = 1\n");
    let marks = dir.join("runs");
    let (_, e) = s.submit(agent_task(
        "late",
        "p7",
        &format!("echo \"ran $ETASK_ATTEMPT\" >> {}", marks.display()),
    ));
    // No agent yet: the dispatch waits in the topic past its expiry.
    s.wait_for(e, Duration::from_secs(10), |v| v["status"] == "dispatched");
    std::thread::sleep(Duration::from_millis(1_500));
    let a = Agent::start(&dir, "late-1", "p7", &broker.addr, &[]);
    let v = s.wait_final(e, Duration::from_secs(40));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", a.log());
    assert_eq!(v["attempts"][0]["status"], "lost", "{v}");
    assert!(
        v["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{v}"
    );
    let text = std::fs::read_to_string(&marks).unwrap();
    assert!(
        !text.contains("ran 1\n"),
        "the expired attempt must not run: {text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        a.log().contains("attempt=1 not started: dispatch expired"),
        "{}",
        a.log()
    );
}

#[test]
fn missing_topics_are_created_or_named_in_a_clear_start_error() {
    let dir = support::temp_dir("kafka-topics");
    let broker = Broker::start("topics");
    // Not allowed to create: the scheduler refuses to start and names what is missing.
    let cfg = dir.join("strict.toml");
    std::fs::write(&cfg, "[kafka]\ncreate_topics = false\npools = [\"nope\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args(["server", "--mode", "scheduler", "--listen", "127.0.0.1:0"])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--kafka",
            &broker.addr,
            "--config",
        ])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.join("strict"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("etask.dispatch.nope") && err.contains("create_topics"),
        "{err}"
    );

    // Allowed (the default): created at start through the admin API.
    let s = scheduler(&dir, &broker, "pools = [\"fresh\"]\n");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(5)).unwrap();
    assert!(
        md.topics()
            .iter()
            .any(|t| t.name() == "etask.dispatch.fresh"),
        "{}",
        s.log()
    );
}

#[test]
fn sigterm_drains_the_agent_running_work_is_reported_not_lost() {
    let dir = support::temp_dir("kafka-drain");
    let broker = Broker::start("drain");
    let s = scheduler(&dir, &broker, "");
    let mut a = Agent::start(&dir, "drain-1", "p8", &broker.addr, &[]);
    let (_, e) = s.submit(agent_task(
        "slow",
        "p8",
        "sleep 2; echo '{\"done\":true}' >&3",
    ));
    s.wait_for(e, Duration::from_secs(30), |v| v["status"] == "running");
    let t0 = Instant::now();
    let log = dir.join("drain-1.log");
    let status = support::sigterm_and_wait(&mut a.child.0, Duration::from_secs(20), || {
        std::fs::read_to_string(&log).unwrap_or_default()
    });
    assert!(status.success(), "{status:?}\n{}", a.log());
    assert!(
        t0.elapsed() >= Duration::from_millis(1_000),
        "it waited for the script"
    );
    let v = s.wait_final(e, Duration::from_secs(10));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", a.log());
    assert_eq!(v["result"], json!({"done": true}));
    a.kill9();
}

#[test]
fn a_dispatch_cancelled_before_any_agent_read_it_never_runs() {
    let dir = support::temp_dir("kafka-precancel");
    let broker = Broker::start("precancel");
    let s = scheduler(&dir, &broker, "");
    let marks = dir.join("ran");
    let (_, e) = s.submit(agent_task(
        "never",
        "p9",
        &format!("touch {}", marks.display()),
    ));
    s.wait_for(e, Duration::from_secs(10), |v| v["status"] == "dispatched");
    let (code, v) = s.call("POST", &format!("/api/v1/executions/{e}/cancel"), None);
    assert_eq!(code, 200, "{v}");
    // The agent starts later: it reads the cancel from the control topic, then the dispatch.
    let a = Agent::start(&dir, "precancel-1", "p9", &broker.addr, &[]);
    let t0 = Instant::now();
    while !a.log().contains("was cancelled before it arrived") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marks.exists(), "a cancelled dispatch ran");
    assert_eq!(s.execution(e)["status"], "cancelled");
}

/// Milliseconds from submission to start of an execution.
fn submit_to_start(v: &Value) -> i64 {
    v["started_at"].as_i64().unwrap_or(i64::MAX) - v["created_at"].as_i64().unwrap_or(0)
}

#[test]
fn the_first_task_of_a_new_pool_starts_as_fast_as_the_rest_and_waiting_logs_no_error() {
    let dir = support::temp_dir("kafka-newpool");
    let broker = Broker::start("newpool");
    let s = scheduler(&dir, &broker, "");
    // A scheduler that has been running a while (its events consumer has joined its group).
    warm_up_scheduler(&s, &dir, &broker);
    // Two agents start together: one of a pool the scheduler set up at start ("default"), one
    // of a pool it has never heard of ("fresh": in no kafka.pools, no topic yet).
    let old = Agent::start(&dir, "old-1", "p9", &broker.addr, &[]);
    let new = Agent::start(&dir, "fresh-1", "fresh", &broker.addr, &[]);
    // An operator starts the agents, then submits work a little later.
    std::thread::sleep(Duration::from_secs(5));
    let mut took = Vec::new();
    for (pool, a) in [("p9", &old), ("fresh", &new), ("fresh", &new)] {
        let (_, e) = s.submit(agent_task(pool, pool, "true"));
        let v = s.wait_final(e, Duration::from_secs(60));
        assert_eq!(v["status"], "succeeded", "{v}\n{}", a.log());
        took.push(submit_to_start(&v));
    }
    assert!(
        took[1] < 1_000,
        "first task of the new pool took {} ms to start (known pool: {} ms, second task: {} ms)\n{}",
        took[1],
        took[0],
        took[2],
        new.log()
    );
    let log = new.log();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "a waiting agent logged alarms:\n{log}"
    );
}

/// Runs one agent task through the scheduler, so its events consumer has joined its group.
fn warm_up_scheduler(s: &Server, dir: &Path, broker: &Broker) {
    let a = Agent::start(&dir.join("warm"), "warm-1", "p8", &broker.addr, &[]);
    warm_up(s, "p8");
    drop(a);
}
