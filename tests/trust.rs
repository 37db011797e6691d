//! Hostile tests of the trust path (issue 14): forged, tampered, expired, misbound and replayed
//! dispatches and forged cancels on every path (a crafted gRPC `Execute`, raw records on the
//! Kafka topics), each refused with its reason while a marker file proves no script started;
//! sealed secrets absent from the SQLite file, a MariaDB dump, every Kafka topic and the logs.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etask::delivery::grpc::{dispatch_to_pb, ExecutorClient, Runtime};
use etask::delivery::Dispatch;
use etask::model::{Attempt, ExecutionId, TaskId};
use etask::runner::Program;
use etask::trust::Signer;
use serde_json::json;
use support::server::{pid_alive, Server};

/// `etask keygen` through the binary: (private key path, public key path).
fn keygen(dir: &Path, pool: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etask"));
    cmd.args(["keygen", "--out"]).arg(dir);
    if let Some(p) = pool {
        cmd.args(["--pool", p]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let files: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    (files[0].clone(), files[1].clone())
}

/// Every occurrence of `needle` in the file (and its -wal/-shm companions).
fn hits_in_files(paths: &[PathBuf], needle: &str) -> usize {
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| {
            b.windows(needle.len())
                .filter(|w| *w == needle.as_bytes())
                .count()
        })
        .sum()
}

fn dispatch(id: i64, code: &str, pool: &str) -> Dispatch {
    Dispatch {
        execution_id: ExecutionId(id),
        task_id: TaskId(1),
        attempt: Attempt(1),
        program: Program::shell(code),
        timeout: None,
        shard_index: 0,
        shard_total: 1,
        pool: Some(pool.into()),
        route: Default::default(),
        stamp: Default::default(),
    }
}

fn signed(mut d: Dispatch, s: &Signer, node: Option<&str>, ttl_ms: i64) -> Dispatch {
    d.sign(s, node, ttl_ms);
    d
}

/// A dispatch stamped in the past: issued 120 s ago, expired 60 s ago.
fn expired(d: Dispatch, s: &Signer, node: Option<&str>) -> Dispatch {
    let mut d = d;
    d.stamp = s.stamp(d.fields(), node, etask::now_ms() - 120_000, 60_000);
    d
}

#[test]
fn mode_all_signs_with_its_own_keys_and_stores_only_sealed_secrets() {
    let dir = support::temp_dir("trust-all");
    let s = Server::start(&dir, &[], "");
    let keys = dir.join("data/keys");
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!((mode("dispatch.key"), mode("dispatch.pub")), (0o600, 0o644));
    assert_eq!(mode("pool-local.key"), 0o600);
    let secret = "s3cr3t-sqlite-4f1a9";
    let var_secret = "v4r-s3cr3t-77aa";
    let marker = dir.join("marker");
    // The script writes what it sees outside the store (the code must not carry the value).
    let code = format!("printf '%s %s' \"$PW\" \"$TOKEN\" > {}\n", marker.display());
    let (task, e) = s.submit(json!({"name": "sealed", "program": {
        "kind": "shell", "code": code, "secret_env": {"PW": secret},
        "variables": [{"key": "TOKEN", "value": var_secret, "secret": true}]}}));
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    // Its start line says what the built-in node checks (it verifies; it used to claim the
    // opposite because the line was written before the built-in key was added).
    let log = s.log();
    assert!(
        log.contains("dispatches and cancels are verified: trusted key(s) "),
        "{log}"
    );
    assert!(!log.contains("no security.trusted_keys"), "{log}");
    assert!(
        log.contains("dispatches and cancels are signed with key "),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default(),
        format!("{secret} {var_secret}"),
        "the script sees the clear values"
    );
    // The same request twice with a secret is still the same request (sealing is randomised).
    let body = json!({"name": "idem", "request_id": "r-sealed-1",
        "program": {"kind": "shell", "code": "true", "secret_env": {"PW": secret}}});
    let (c1, v1) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    let (c2, v2) = s.call("POST", "/api/v1/tasks", Some(&body.to_string()));
    assert_eq!((c1, c2), (201, 200), "{v1} {v2}");
    let (_, t) = s.call("GET", &format!("/api/v1/tasks/{task}"), None);
    assert_eq!(t["spec"]["program"]["secret_env"]["PW"], "******", "{t}");
    // Stop the server so every page is in the files, then grep them.
    let mut s = s;
    support::sigterm_and_wait(&mut s.child, Duration::from_secs(15), String::new);
    let db = dir.join("data/etask.db");
    let files = vec![
        db.clone(),
        dir.join("data/etask.db-wal"),
        dir.join("data/etask.db-shm"),
        dir.join("server.log"),
    ];
    for needle in [secret, var_secret] {
        assert_eq!(
            hits_in_files(&files, needle),
            0,
            "{needle} found in the store or log"
        );
    }
    assert!(
        hits_in_files(&[db], "etask-sealed:v1:") > 0,
        "the store holds the sealed values"
    );
}

#[test]
fn mariadb_holds_only_sealed_secrets() {
    let url = support::mysql_db("trust");
    let dir = support::temp_dir("trust-mysql");
    let s = Server::start(&dir, &["--store", &url], "");
    let secret = "m4riadb-s3cr3t-91c2";
    let marker = dir.join("marker");
    let code = format!("printf '%s' \"$PW\" > {}\n", marker.display());
    let (_, e) = s.submit(json!({"name": "sealed-my", "program": {
        "kind": "shell", "code": code, "secret_env": {"PW": secret}}}));
    let v = s.wait_final(e, Duration::from_secs(20));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), secret);
    let db = url.rsplit('/').next().unwrap();
    let dump = Command::new("mariadb-dump")
        .args([
            "-h",
            "127.0.0.1",
            "-u",
            "root",
            "--skip-extended-insert",
            db,
        ])
        .output()
        .expect("mariadb-dump");
    assert!(dump.status.success(), "{dump:?}");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        text.contains("etask-sealed:v1:"),
        "dump has the sealed value"
    );
    assert!(!text.contains(secret), "secret in the MariaDB dump");
    assert!(!s.log().contains(secret), "secret in the server log");
}

/// `etask server --mode executor` with `config` appended.
struct Executor {
    _child: support::Proc,
    dir: PathBuf,
    addr: String,
}

impl Executor {
    fn start(
        dir: &Path,
        id: &str,
        pool: &str,
        path: &str,
        scheduler: &str,
        etcd: &str,
        config: &str,
    ) -> Executor {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("executor.toml");
        std::fs::write(
            &cfg,
            format!("[registry]\nttl_seconds = 2\n[node]\nkill_grace_seconds = 1\n[executor]\npath = \"{path}\"\n{config}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(["server", "--mode", "executor", "--config"])
            .arg(&cfg)
            .args(["--scheduler", scheduler, "--etcd", etcd, "--pool", pool])
            .args([
                "--node-id",
                id,
                "--grpc-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
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
            line.starts_with(&format!("etask executor {id} ")),
            "executor did not start: {line:?}\n{}",
            std::fs::read_to_string(dir.join("executor.log")).unwrap_or_default()
        );
        Executor {
            _child: support::Proc(child),
            dir: dir.to_owned(),
            addr: line
                .trim()
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("executor.log")).unwrap_or_default()
    }
}

#[test]
fn executors_refuse_forged_tampered_expired_misbound_and_replayed_dispatches() {
    let etcd = support::EtcdServer::start("trust-push");
    let dir = support::temp_dir("trust-push");
    let (key, public) = keygen(&dir.join("keys"), None);
    let (stranger_key, stranger_pub) = keygen(&dir.join("stranger"), None);
    let s = Server::start(
        &dir.join("sched"),
        &[],
        &format!(
            "[registry]\netcd = \"{}\"\nttl_seconds = 2\n[security]\nsigning_key = \"{key}\"\n",
            etcd.url
        ),
    );
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let trusting = format!("[security]\nrequire_signed = true\ntrusted_keys = [\"{public}\"]\n");
    let ex = Executor::start(
        &dir.join("ex"),
        "ex",
        "core",
        "push",
        &grpc,
        &etcd.url,
        &trusting,
    );
    let puller = Executor::start(
        &dir.join("pl"),
        "pl",
        "edge",
        "pull",
        &grpc,
        &etcd.url,
        &trusting,
    );
    // A node that trusts another scheduler's key.
    let wary = Executor::start(
        &dir.join("wary"),
        "wary",
        "wary",
        "push",
        &grpc,
        &etcd.url,
        &format!("[security]\ntrusted_keys = [\"{stranger_pub}\"]\n"),
    );
    s.wait_nodes_where(3, |n| n["path"] == "push" || n["path"] == "pull");

    // The scheduler's own dispatches run, on push and on pull.
    for (path, pool) in [("push", "core"), ("pull", "edge")] {
        let (_, e) = s.submit(
            json!({"name": "genuine", "program": {"kind": "shell", "code": "echo ok"},
            "target": {"path": path, "pool": pool}}),
        );
        let v = s.wait_final(e, Duration::from_secs(30));
        assert_eq!(
            v["status"],
            "succeeded",
            "{path}: {v}\n{}\n{}",
            ex.log(),
            puller.log()
        );
    }
    // A node that does not trust the scheduler refuses, and the execution fails saying why.
    let (_, e) = s.submit(
        json!({"name": "distrusted", "program": {"kind": "shell", "code": "true"},
        "target": {"path": "push", "pool": "wary"}}),
    );
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("unknown key"),
        "{v}"
    );
    assert!(
        wary.log().contains("refused: untrusted dispatch"),
        "{}",
        wary.log()
    );

    // Crafted Execute calls straight to the executor (the token is not set: anyone on the
    // network path could make them). Nothing may start.
    let signer = Signer::load(&key).unwrap();
    let stranger = Signer::load(&stranger_key).unwrap();
    let rt = Runtime::new().unwrap();
    let client = ExecutorClient::new(&rt, &format!("http://{}", ex.addr), "").unwrap();
    let forbidden = dir.join("forbidden");
    let bad = format!("echo ran >> {}", forbidden.display());
    let mut tampered = signed(
        dispatch(900_003, "true", "core"),
        &signer,
        Some("ex"),
        60_000,
    );
    tampered.program = Program::shell(bad.as_str());
    let cases: Vec<(&str, Dispatch)> = vec![
        ("unsigned", dispatch(900_001, &bad, "core")),
        (
            "unknown key",
            signed(
                dispatch(900_002, &bad, "core"),
                &stranger,
                Some("ex"),
                60_000,
            ),
        ),
        ("bad signature", tampered),
        (
            "expired",
            expired(dispatch(900_004, &bad, "core"), &signer, Some("ex")),
        ),
        (
            "pool \"other\"",
            signed(
                dispatch(900_005, &bad, "other"),
                &signer,
                Some("ex"),
                60_000,
            ),
        ),
        (
            "node \"ex-2\"",
            signed(
                dispatch(900_006, &bad, "core"),
                &signer,
                Some("ex-2"),
                60_000,
            ),
        ),
        (
            "valid for",
            signed(
                dispatch(900_007, &bad, "core"),
                &signer,
                Some("ex"),
                86_400_000,
            ),
        ),
    ];
    for (why, d) in cases {
        let ack = client.execute(dispatch_to_pb(&d, etask::now_ms())).unwrap();
        assert!(!ack.accepted, "{why}: accepted");
        assert!(ack.reason.contains(why), "{why}: {}", ack.reason);
    }
    // Replay: the genuine message runs once; the same message again is refused.
    let once = dir.join("once");
    let pidfile = dir.join("pid");
    let good = signed(
        dispatch(
            900_010,
            &format!(
                "echo ran >> {}\necho $$ > {}\nexec sleep 30\n",
                once.display(),
                pidfile.display()
            ),
            "core",
        ),
        &signer,
        Some("ex"),
        60_000,
    );
    let msg = dispatch_to_pb(&good, 0);
    let ack = client.execute(msg.clone()).unwrap();
    assert!(ack.accepted, "{ack:?}");
    let ack = client.execute(msg).unwrap();
    assert!(!ack.accepted && ack.reason.contains("replay"), "{ack:?}");
    let t0 = Instant::now();
    while !pidfile.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", ex.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Unsigned and forged cancels are ignored: the script keeps running.
    let (id, attempt) = (good.execution_id, good.attempt);
    let err = client.cancel(id, attempt).unwrap_err().to_string();
    assert!(err.contains("unsigned"), "{err}");
    let forged = stranger.stamp_cancel(id.0, attempt.0, Some("ex"), etask::now_ms(), 60_000);
    let err = client
        .cancel_stamped(id, attempt, &forged)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown key"), "{err}");
    let mut other = signer.stamp_cancel(id.0 + 1, attempt.0, Some("ex"), etask::now_ms(), 60_000);
    other.node = Some("ex".into());
    let err = client
        .cancel_stamped(id, attempt, &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad signature"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(pid), "a forged cancel stopped the script");
    // A signed cancel stops it.
    let real = signer.stamp_cancel(id.0, attempt.0, Some("ex"), etask::now_ms(), 60_000);
    assert!(client.cancel_stamped(id, attempt, &real).unwrap());
    let t0 = Instant::now();
    while pid_alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "signed cancel ignored"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!forbidden.exists(), "a refused dispatch ran\n{}", ex.log());
    assert_eq!(
        std::fs::read_to_string(&once).unwrap(),
        "ran\n",
        "replay ran"
    );
    let log = ex.log();
    for why in ["unsigned", "unknown key", "bad signature", "replay"] {
        assert!(log.contains(why), "{why} not logged:\n{log}");
    }
}

/// `etask server --mode agent` with `config` appended; its log is `<dir>/<id>.log`.
fn start_agent(dir: &Path, id: &str, pool: &str, brokers: &str, config: &str) -> support::Proc {
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
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("{id}.log"))).unwrap(),
        ))
        .spawn()
        .expect("start agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("etask agent "),
        "agent did not start: {line:?}"
    );
    support::Proc(child)
}

/// Every record of `topics` from the beginning up to their end now, as text. Partitions are
/// assigned by hand and read to their high watermarks: no group to join, no idle guessing
/// (agents' heartbeats never leave the events topic idle).
fn read_topics(brokers: &str, topics: &[&str]) -> Vec<(String, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "trust-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut left = std::collections::HashMap::new();
    for t in topics {
        for p in 0..4 {
            let (_, high) = c.fetch_watermarks(t, p, Duration::from_secs(10)).unwrap();
            if high > 0 {
                tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
                left.insert((t.to_string(), p), high);
            }
        }
    }
    let mut out = Vec::new();
    if left.is_empty() {
        return out;
    }
    c.assign(&tpl).unwrap();
    let t0 = Instant::now();
    while !left.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "topics not read to the end: {left:?}"
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let text = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            out.push((m.topic().to_owned(), text));
            let k = (m.topic().to_owned(), m.partition());
            if left.get(&k).is_some_and(|h| m.offset() + 1 >= *h) {
                left.remove(&k);
            }
        }
    }
    // Then on for up to 2 s, until 300 ms pass without a record: the test broker's high
    // watermark counts a batch of records as one (five dead letters produced in one batch
    // read as a watermark of 1), so "read to the watermark" alone missed records. The rest
    // of such a batch arrives right behind its first record; topics written all the time
    // (heartbeats on etask.events) end the drain at 2 s.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(2) {
        match c.poll(Duration::from_millis(300)) {
            Some(Ok(m)) => out.push((
                m.topic().to_owned(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )),
            Some(Err(e)) => eprintln!("read_topics: {e}"),
            None => break,
        }
    }
    out
}

#[test]
fn agents_refuse_forged_kafka_records_and_no_topic_holds_a_secret() {
    use etask::delivery::kafka::wire::{ControlMsg, DispatchMsg};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let dir = support::temp_dir("trust-kafka");
    let broker = support::kafka::Broker::start("trust");
    let (key, public) = keygen(&dir.join("keys"), None);
    let (pool_key, pool_pub) = keygen(&dir.join("keys"), Some("p8"));
    let (stranger_key, _) = keygen(&dir.join("stranger"), None);
    let s = Server::start(
        &dir.join("sched"),
        &["--kafka", &broker.addr],
        &format!(
            "[kafka]\nagent_silent_after_ms = 3000\n[security]\nsigning_key = \"{key}\"\n\
             require_sealed_secrets = true\n[security.pool_keys]\np8 = \"{pool_pub}\"\n"
        ),
    );
    let _agent = start_agent(
        &dir,
        "a8",
        "p8",
        &broker.addr,
        &format!(
            "[security]\nrequire_signed = true\ntrusted_keys = [\"{public}\"]\n\
             pool_private_keys = [\"{pool_key}\"]\n"
        ),
    );
    let agent_log = || std::fs::read_to_string(dir.join("a8.log")).unwrap_or_default();
    // A genuine task with a secret: sealed to p8's key, opened by the agent.
    let secret = "k4fka-s3cr3t-e91d";
    let seen = dir.join("seen");
    let (_, e) = s.submit(
        json!({"name": "sealed", "target": {"path": "agent", "pool": "p8"},
        "program": {"kind": "shell", "code": format!("printf '%s' \"$PW\" > {}", seen.display()),
                    "secret_env": {"PW": secret}}}),
    );
    let v = s.wait_final(e, Duration::from_secs(60));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", agent_log());
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), secret);
    // A pool without a key: its secrets are refused, not stored in clear.
    let (code, v) = s.call(
        "POST",
        "/api/v1/tasks",
        Some(
            &json!({"name": "nokey", "target": {"path": "agent", "pool": "p9"},
            "program": {"kind": "shell", "code": "true", "secret_env": {"PW": "x"}}})
            .to_string(),
        ),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v.to_string().contains("security.pool_keys"), "{v}");

    // Raw records written by anyone who can write to the topic.
    let signer = Signer::load(&key).unwrap();
    let stranger = Signer::load(&stranger_key).unwrap();
    let forbidden = dir.join("forbidden");
    let bad = format!("echo ran >> {}", forbidden.display());
    let record = |d: &Dispatch| {
        let pool = d.pool.clone().unwrap();
        serde_json::to_string(&DispatchMsg::new(d, &pool, etask::now_ms(), 60_000)).unwrap()
    };
    let tampered = record(&signed(
        dispatch(900_103, "true", "p8"),
        &signer,
        None,
        60_000,
    ))
    .replace("\"code\":\"true\"", &format!("\"code\":{}", json!(bad)));
    assert!(tampered.contains("forbidden"));
    let once = dir.join("once");
    let good = record(&signed(
        dispatch(900_110, &format!("echo ran >> {}", once.display()), "p8"),
        &signer,
        None,
        60_000,
    ));
    let records: Vec<(i64, String)> = vec![
        (900_101, record(&dispatch(900_101, &bad, "p8"))),
        (
            900_102,
            record(&signed(
                dispatch(900_102, &bad, "p8"),
                &stranger,
                None,
                60_000,
            )),
        ),
        (900_103, tampered),
        (
            900_104,
            record(&expired(dispatch(900_104, &bad, "p8"), &signer, None)),
        ),
        (
            900_105,
            record(&signed(
                dispatch(900_105, &bad, "p9"),
                &signer,
                None,
                60_000,
            )),
        ),
        (900_110, good.clone()),
        (900_110, good),
    ];
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "0")
        .create()
        .unwrap();
    for (id, r) in &records {
        // One key: one partition, read in this order.
        p.send(
            BaseRecord::to("etask.dispatch.p8")
                .key("k")
                .payload(r.as_bytes()),
        )
        .map_err(|(e, _)| e)
        .unwrap();
        let _ = id;
    }
    p.flush(Duration::from_secs(5)).unwrap();
    let t0 = Instant::now();
    while !(agent_log().contains("execution=900110 attempt=1 delivered again")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(!forbidden.exists(), "a refused record ran\n{}", agent_log());
    assert_eq!(std::fs::read_to_string(&once).unwrap(), "ran\n", "replayed");
    let log = agent_log();
    assert!(
        log.contains("attempt=1 not started: dispatch expired"),
        "{log}"
    );
    // Dead letters are produced after the agent logs the refusal, and a read may see only
    // part of the topic under load: read until every refused record's letter is there (or
    // 20 s pass).
    // (The letter's payload is the refused record as a JSON string: match inside it, not in
    // the letter's escaped text.)
    let reason = |letters: &[(String, String)], id: i64| -> String {
        letters
            .iter()
            .filter_map(|(_, t)| serde_json::from_str::<serde_json::Value>(t).ok())
            .filter(|l| {
                l["payload"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("\"execution_id\":{id},"))
            })
            .map(|l| l["reason"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let want = [
        (900_101, "unsigned"),
        (900_102, "unknown key"),
        (900_103, "bad signature"),
        (900_105, "for pool \"p9\""),
        (900_110, "replay"),
    ];
    let all_there = |letters: &[(String, String)]| {
        want.iter()
            .all(|(id, why)| reason(letters, *id).contains(why))
    };
    let t0 = Instant::now();
    let mut letters = read_topics(&broker.addr, &["etask.dead-letter"]);
    while !all_there(&letters) && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(300));
        letters = read_topics(&broker.addr, &["etask.dead-letter"]);
    }
    for (id, why) in want {
        assert!(
            reason(&letters, id).contains(why),
            "{id}: {why}: {:?}\nletters after {:.1?}: {letters:#?}\nagent log:\n{}",
            reason(&letters, id),
            t0.elapsed(),
            agent_log()
        );
    }

    // Forged cancels on the control topic are ignored; the real one works.
    let pidfile = dir.join("pid");
    let (_, e) = s.submit(json!({"name": "long", "target": {"path": "agent", "pool": "p8"},
        "program": {"kind": "shell", "code": format!("echo $$ > {}\nexec sleep 60", pidfile.display())}}));
    s.wait_for(e, Duration::from_secs(30), |v| {
        v["status"] == "running" && pidfile.exists()
    });
    std::thread::sleep(Duration::from_millis(200));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let forged = stranger.stamp_cancel(e, 1, None, etask::now_ms(), 60_000);
    for c in [
        ControlMsg {
            v: 1,
            kind: "cancel".into(),
            execution_id: e,
            attempt: 1,
            issued_at: 0,
            expires_at: 0,
            sig: None,
        },
        ControlMsg {
            v: 1,
            kind: "cancel".into(),
            execution_id: e,
            attempt: 1,
            issued_at: forged.issued_at,
            expires_at: forged.expires_at,
            sig: forged.sig.clone(),
        },
    ] {
        let body = serde_json::to_vec(&c).unwrap();
        p.send(BaseRecord::to("etask.control").key("k").payload(&body))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    p.flush(Duration::from_secs(5)).unwrap();
    let t0 = Instant::now();
    while !agent_log().contains("cancel ignored: untrusted cancel: signed by unknown key") {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent_log().contains("cancel ignored: untrusted cancel: unsigned"));
    assert!(pid_alive(pid), "a forged cancel stopped the script");
    let (code, v) = s.call("POST", &format!("/api/v1/executions/{e}/cancel"), None);
    assert_eq!(code, 200, "{v}");
    let t0 = Instant::now();
    while pid_alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "signed cancel ignored\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // No topic, and no log, holds the secret.
    let all = read_topics(
        &broker.addr,
        &[
            "etask.dispatch.p8",
            "etask.events",
            "etask.control",
            "etask.dead-letter",
        ],
    );
    assert!(all
        .iter()
        .any(|(t, r)| t == "etask.dispatch.p8" && r.contains("etask-sealed:v1:")));
    for (topic, r) in &all {
        assert!(!r.contains(secret), "secret on {topic}: {r}");
    }
    assert!(!s.log().contains(secret) && !agent_log().contains(secret));
}

/// A test CA and certificates it signed, made with openssl: `server` for 127.0.0.1 and
/// `client` (for mutual TLS). Returns the directory with ca.pem, server.pem/server.key,
/// client.pem/client.key.
fn test_pki(dir: &Path) -> PathBuf {
    let d = dir.join("pki");
    std::fs::create_dir_all(&d).unwrap();
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&d)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=etask-test-ca 2>/dev/null");
    for (name, ext) in [
        (
            "server",
            // clientAuth too: etcd's own gateway dials etcd with the server certificate.
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        sh(&format!(
            "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} 2>/dev/null && \
             openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.ext 2>/dev/null"
        ));
    }
    d
}

fn tls_agent(pki: &Path, client_cert: bool) -> ureq::Agent {
    let p = |f: &str| pki.join(f).display().to_string();
    let (cert, key) = if client_cert {
        (p("client.pem"), p("client.key"))
    } else {
        (String::new(), String::new())
    };
    let tls = etask::trust::tls::client_config(&p("ca.pem"), &cert, &key, "test").unwrap();
    ureq::AgentBuilder::new()
        .tls_config(tls)
        .timeout(Duration::from_secs(10))
        .build()
}

#[test]
fn https_intake_and_https_callbacks_work_with_a_test_ca_and_plaintext_is_refused() {
    let dir = support::temp_dir("trust-tls");
    let pki = test_pki(&dir);
    let p = |f: &str| pki.join(f).display().to_string();
    // The callback receiver: plain tiny_http behind stunnel4 (a TLS terminator).
    let (tx, rx) = crossbeam_channel::unbounded();
    let cb = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let plain_port = cb.server_addr().to_ip().unwrap().port();
    std::thread::spawn(move || {
        for mut req in cb.incoming_requests() {
            let mut b = String::new();
            let _ = std::io::Read::read_to_string(req.as_reader(), &mut b);
            let _ = tx.send(b);
            let _ = req.respond(tiny_http::Response::from_string("ok"));
        }
    });
    let tls_port = support::free_port();
    let conf = dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[cb]\naccept = 127.0.0.1:{tls_port}\nconnect = 127.0.0.1:{plain_port}\ncert = {}\nkey = {}\n",
            p("server.pem"),
            p("server.key")
        ),
    )
    .unwrap();
    let _stunnel = support::Proc(
        Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stunnel.log")).unwrap(),
            ))
            .spawn()
            .expect("stunnel4 (Debian package stunnel4) is needed"),
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "stunnel did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let s = Server::start(
        &dir.join("srv"),
        &[],
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[callbacks]\nca = \"{}\"\n",
            p("server.pem"),
            p("server.key"),
            p("ca.pem")
        ),
    );
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
    let agent = tls_agent(&pki, false);
    let body = json!({"name": "tls", "program": {"kind": "shell", "code": "echo '{\"ok\":1}' >&3"},
                      "callback_url": format!("https://127.0.0.1:{tls_port}/hook")});
    let v: serde_json::Value = agent
        .post(&format!("{}/api/v1/tasks", s.url))
        .send_json(body)
        .unwrap()
        .into_json()
        .unwrap();
    let e = v["execution_id"].as_i64().unwrap();
    let cb_body = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no https callback\n{}", s.log()));
    assert!(cb_body.contains(&format!("\"id\":{e}")), "{cb_body}");
    assert!(cb_body.contains("succeeded"), "{cb_body}");
    // Plain HTTP to the TLS port is refused (no HTTP answer at all).
    let plain = s.url.replacen("https://", "http://", 1);
    assert!(ureq::get(&format!("{plain}/healthz"))
        .timeout(Duration::from_secs(5))
        .call()
        .is_err());
    // A client that does not know the CA refuses the server.
    assert!(ureq::get(&format!("{}/healthz", s.url)).call().is_err());

    // Mutual TLS: without a client certificate, refused; with one, served.
    let m = Server::start(
        &dir.join("mtls"),
        &[],
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
            p("server.pem"),
            p("server.key"),
            p("ca.pem")
        ),
    );
    assert!(tls_agent(&pki, false)
        .get(&format!("{}/healthz", m.url))
        .call()
        .is_err());
    let r = tls_agent(&pki, true)
        .get(&format!("{}/healthz", m.url))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn grpc_mutual_tls_refuses_a_client_without_a_valid_certificate() {
    use etask::delivery::grpc::{Runtime, TasksClient, Tls};
    let dir = support::temp_dir("trust-mtls");
    let pki = test_pki(&dir);
    // A second CA: a certificate it signed is not valid for this scheduler.
    let other = test_pki(&dir.join("other"));
    let p = |d: &Path, f: &str| d.join(f).display().to_string();
    let s = Server::start(
        &dir.join("srv"),
        &[],
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nclient_auth = true\n",
            p(&pki, "server.pem"),
            p(&pki, "server.key"),
            p(&pki, "ca.pem")
        ),
    );
    let grpc = s.grpc.clone().expect("gRPC address");
    assert!(grpc.starts_with("https://"), "{grpc}");
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    let client = |identity: Option<(Vec<u8>, Vec<u8>)>| {
        let rt = Runtime::with_tls(Tls {
            identity,
            ca: Some(read(&pki, "ca.pem")),
            client_auth: true,
        })
        .unwrap();
        let c = TasksClient::new(&rt, &grpc, "").unwrap();
        c.submit(r#"{"name": "mtls", "program": {"kind": "shell", "code": "true"}}"#)
    };
    let err = client(None).unwrap_err();
    assert!(!err.message().is_empty(), "no certificate: {err:?}");
    let err = client(Some((
        read(&other, "client.pem"),
        read(&other, "client.key"),
    )))
    .unwrap_err();
    assert!(!err.message().is_empty(), "foreign certificate: {err:?}");
    let ok = client(Some((read(&pki, "client.pem"), read(&pki, "client.key"))));
    assert!(ok.is_ok(), "{ok:?}");
}

/// stunnel4 terminating TLS on `accept` with the test server certificate and forwarding to
/// `target`; with `require_client_cert`, only clients with a certificate from the test CA.
fn stunnel(
    dir: &Path,
    pki: &Path,
    accept: &str,
    target: &str,
    require_client_cert: bool,
) -> support::Proc {
    let p = |f: &str| pki.join(f).display().to_string();
    let conf = dir.join("stunnel-kafka.conf");
    let verify = if require_client_cert {
        format!(
            "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
            p("ca.pem")
        )
    } else {
        String::new()
    };
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[kafka]\naccept = {accept}\nconnect = {target}\ncert = {}\nkey = {}\n{verify}",
            p("server.pem"),
            p("server.key")
        ),
    )
    .unwrap();
    let proc = support::Proc(
        Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stunnel-kafka.log")).unwrap(),
            ))
            .spawn()
            .expect("stunnel4 (Debian package stunnel4) is needed"),
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(accept).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "stunnel did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// `etask server --mode scheduler` with `kafka` as its [kafka] section, expected to fail at
/// start: its exit status and what it printed on stderr.
fn scheduler_start_error(
    dir: &Path,
    name: &str,
    brokers: &str,
    kafka: &str,
) -> (Option<i32>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, format!("[kafka]\n{kafka}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_etask"))
        .args([
            "server",
            "--mode",
            "scheduler",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "",
        ])
        .args(["--kafka", brokers, "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.join(format!("data-{name}")))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kafka_over_tls_round_trips_and_refuses_plaintext_a_wrong_ca_and_no_client_certificate() {
    let dir = support::temp_dir("trust-kafka-tls");
    let pki = test_pki(&dir);
    let other = test_pki(&dir.join("other"));
    let p = |d: &Path, f: &str| d.join(f).display().to_string();
    // tansu (plaintext) behind stunnel (TLS, client certificates from the test CA required);
    // tansu's metadata names the TLS address, so no client is ever sent around the tunnel.
    let tls = format!("127.0.0.1:{}", support::free_port());
    let broker = support::kafka::Broker::start_advertising("tls", &tls);
    let _stunnel = stunnel(&dir, &pki, &tls, broker.inner(), true);
    let ssl = |ca: &str, cert: bool| {
        let client = if cert {
            format!(
                "ssl_cert = \"{}\"\nssl_key = \"{}\"\n",
                p(&pki, "client.pem"),
                p(&pki, "client.key")
            )
        } else {
            String::new()
        };
        format!("security_protocol = \"ssl\"\nssl_ca = \"{ca}\"\n{client}")
    };
    let good = ssl(&p(&pki, "ca.pem"), true);

    // A round trip: scheduler and agent both over TLS only.
    let s = Server::start(
        &dir.join("sched"),
        &["--kafka", &tls],
        &format!("[kafka]\nagent_silent_after_ms = 3000\n{good}"),
    );
    let _agent = start_agent(&dir, "tls1", "p2", &tls, &format!("[kafka]\n{good}"));
    let (_, e) = s.submit(
        json!({"name": "tls", "target": {"path": "agent", "pool": "p2"},
        "program": {"kind": "shell", "code": "echo '{\"over\": \"tls\"}' >&3"}}),
    );
    let v = s.wait_final(e, Duration::from_secs(60));
    assert_eq!(
        v["status"],
        "succeeded",
        "{v}\n{}\n{}",
        s.log(),
        std::fs::read_to_string(dir.join("tls1.log")).unwrap_or_default()
    );
    assert_eq!(v["result"]["over"], "tls", "{v}");

    // Refused, each with a start error that names the protocol and the check to make:
    // a plaintext client on the TLS port, a client that trusts another CA, a client without
    // a certificate.
    for (name, kafka, says) in [
        ("plain", String::new(), "unreachable over plaintext"),
        (
            "wrong-ca",
            ssl(&p(&other, "ca.pem"), true),
            "unreachable over ssl",
        ),
        (
            "no-cert",
            ssl(&p(&pki, "ca.pem"), false),
            "unreachable over ssl",
        ),
    ] {
        let (code, err) = scheduler_start_error(&dir.join("refused"), name, &tls, &kafka);
        eprintln!("{name}: {}", err.trim());
        assert_eq!(code, Some(69), "{name}: {err}");
        assert!(
            err.contains(says) && err.contains("kafka.security_protocol"),
            "{name}: {err}"
        );
        // librdkafka's own lines name the TLS cause.
        if name == "wrong-ca" {
            assert!(err.contains("certificate verify failed"), "{name}: {err}");
        }
        if name == "no-cert" {
            assert!(err.contains("certificate required"), "{name}: {err}");
        }
    }
}

/// etcd over https with a client certificate (etcd `--client-cert-auth`): the scheduler and an
/// executor configured with `registry.ca`/`cert`/`key` register and find each other, and push
/// work runs. Without the client certificate etcd refuses the executor, which says so and does
/// not start. (`registry.etcd = "https://…"` used to be refused by the config check although
/// the client and the README supported it.)
#[test]
fn etcd_over_https_with_a_client_certificate_carries_the_registry() {
    let dir = support::temp_dir("trust-etcd-tls");
    let pki = test_pki(&dir);
    let etcd = support::EtcdServer::start_tls("trust-tls", &pki);
    assert!(etcd.url.starts_with("https://"), "{}", etcd.url);
    let p = |f: &str| pki.join(f).display().to_string();
    let registry = |with_cert: bool| {
        let mut r = format!(
            "[registry]\netcd = \"{}\"\nttl_seconds = 2\nca = \"{}\"\n",
            etcd.url,
            p("ca.pem")
        );
        if with_cert {
            r += &format!(
                "cert = \"{}\"\nkey = \"{}\"\n",
                p("client.pem"),
                p("client.key")
            );
        }
        r
    };
    let s = Server::start(&dir.join("sched"), &[], &registry(true));
    let grpc = s.grpc.clone().expect("scheduler gRPC address");
    let executor = |name: &str, with_cert: bool| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = d.join("executor.toml");
        std::fs::write(
            &cfg,
            format!("{}[executor]\npath = \"push\"\n", registry(with_cert)),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_etask"))
            .args(["server", "--mode", "executor", "--config"])
            .arg(&cfg)
            .args(["--scheduler", &grpc, "--pool", "tls", "--node-id", name])
            .args(["--grpc-listen", "127.0.0.1:0", "--data-dir"])
            .arg(d.join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(d.join("executor.log")).unwrap(),
            ))
            .spawn()
            .expect("start executor")
    };
    let mut good = executor("tls-ex", true);
    let mut line = String::new();
    BufReader::new(good.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let good = support::Proc(good);
    assert!(
        line.starts_with("etask executor tls-ex "),
        "executor did not start: {line:?}\n{}",
        std::fs::read_to_string(dir.join("tls-ex/executor.log")).unwrap_or_default()
    );
    let t0 = Instant::now();
    loop {
        let (_, v) = s.call("GET", "/api/v1/nodes", None);
        if v.to_string().contains("tls-ex") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not registered: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, e) = s.submit(
        json!({"name": "over-tls", "target": {"path": "push", "pool": "tls"},
        "program": {"kind": "shell", "code": "echo '{\"tls\": true}' >&3"}}),
    );
    let v = s.wait_final(e, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}\n{}", s.log());
    assert_eq!(v["result"]["tls"], true, "{v}");
    // No client certificate: etcd refuses the handshake. The executor says so, naming etcd,
    // and keeps retrying (as for any registry outage); it never registers.
    let bad = support::Proc(executor("tls-nocert", false));
    let log = || std::fs::read_to_string(dir.join("tls-nocert/executor.log")).unwrap_or_default();
    let t0 = Instant::now();
    while !log().contains(&format!("etcd unreachable at {}", etcd.url)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no refusal logged:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It stays unregistered while it retries (the TLS alert or the reset that ends the
    // handshake is in its log line).
    std::thread::sleep(Duration::from_millis(1_500));
    let (_, v) = s.call("GET", "/api/v1/nodes", None);
    assert!(
        !v.to_string().contains("tls-nocert"),
        "registered without a certificate: {v}"
    );
    drop((good, bad));
}
