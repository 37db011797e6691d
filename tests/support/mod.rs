//! Shared test helpers: temp dirs, a fresh MariaDB database per test, etcd and a Kafka
//! broker on free ports, the server as a child process.
#![allow(dead_code)]

pub mod kafka;
pub mod server;

/// Sends SIGTERM to `child` and waits for it to exit, at most `within` (then panics with
/// `log()`).
pub fn sigterm_and_wait(
    child: &mut std::process::Child,
    within: std::time::Duration,
    log: impl Fn() -> String,
) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t0.elapsed() < within,
            "still running {within:?} after SIGTERM\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub std::process::Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

static N: AtomicUsize = AtomicUsize::new(0);

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "etask-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Server URL of the MariaDB the tests use (scripts/test.sh starts it), without a database.
pub fn mysql_server() -> String {
    std::env::var("ETASK_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/".into())
}

/// Creates an empty database and returns its URL.
pub fn mysql_db(tag: &str) -> String {
    use mysql::prelude::Queryable;
    let server = mysql_server();
    let db = format!(
        "etask_t_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&server).expect("ETASK_TEST_MYSQL url"))
        .unwrap_or_else(|e| {
            panic!("MariaDB at {server} is needed for this test (scripts/test.sh starts it): {e}")
        });
    conn.query_drop(format!("DROP DATABASE IF EXISTS {db}"))
        .expect("drop db");
    conn.query_drop(format!("CREATE DATABASE {db} CHARACTER SET utf8mb4"))
        .expect("create db");
    format!("{}{db}", server.trim_end_matches('/').to_owned() + "/")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A single-node etcd (Debian `etcd-server`) on free ports with its own data dir.
pub struct EtcdServer {
    child: Option<std::process::Child>,
    pub url: String,
    peer: String,
    pub dir: PathBuf,
    /// With TLS: the directory holding ca.pem, server.pem/.key and client.pem/.key; etcd then
    /// serves https and requires a client certificate signed by ca.pem.
    pki: Option<PathBuf>,
}

impl EtcdServer {
    pub fn start(tag: &str) -> EtcdServer {
        EtcdServer::start_with(tag, None)
    }

    /// An etcd serving `https://` with the certificates in `pki` (see `pki` above).
    #[allow(dead_code)]
    pub fn start_tls(tag: &str, pki: &std::path::Path) -> EtcdServer {
        EtcdServer::start_with(tag, Some(pki.to_path_buf()))
    }

    fn start_with(tag: &str, pki: Option<PathBuf>) -> EtcdServer {
        let dir = temp_dir(&format!("etcd-{tag}"));
        let scheme = if pki.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut e = EtcdServer {
            child: None,
            url,
            peer,
            dir,
            pki,
        };
        e.launch();
        e
    }

    fn launch(&mut self) {
        let bin = if std::path::Path::new("/usr/bin/etcd").exists() {
            "/usr/bin/etcd"
        } else {
            "etcd"
        };
        let child = std::process::Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer,
                "--initial-advertise-peer-urls",
                &self.peer,
            ])
            .args(["--initial-cluster", &format!("t={}", self.peer)])
            .args(self.pki.iter().flat_map(|d| {
                [
                    "--cert-file".into(),
                    d.join("server.pem").into_os_string(),
                    "--key-file".into(),
                    d.join("server.key").into_os_string(),
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    d.join("ca.pem").into_os_string(),
                ]
            }))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("etcd.log")).expect("etcd log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("etcd is needed for this test (scripts/test.sh installs etcd-server): {e}")
            });
        self.child = Some(child);
        let agent = match &self.pki {
            None => ureq::agent(),
            Some(d) => {
                let p = |f: &str| d.join(f).display().to_string();
                let tls = etask::trust::tls::client_config(
                    &p("ca.pem"),
                    &p("client.pem"),
                    &p("client.key"),
                    "test etcd",
                )
                .expect("test etcd client TLS");
                ureq::AgentBuilder::new().tls_config(tls).build()
            }
        };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(20) {
            // `/version` answers before the member has elected itself leader; a v3 read
            // only succeeds once it serves (under load that can take seconds).
            let served = agent
                .post(&format!("{}/v3/kv/range", self.url))
                .timeout(std::time::Duration::from_secs(2))
                .send_json(serde_json::json!({"key": "AA=="}))
                .is_ok();
            if served {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("etcd did not come up at {}", self.url);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
