//! The TOML configuration of `etask server`: every key, its default, and how command-line flags
//! override it. `etask config --print-default` prints `DEFAULT_TOML`, which a unit test keeps
//! in step with the `Default` impls here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{CronMissed, DeliveryPath};
use crate::runner::{CgroupConfig, CgroupWant, Limits, LogLimits, PoolConfig, Rlimits, RunAs};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub scheduler: SchedulerConfig,
    pub callbacks: CallbackConfig,
    pub node: NodeConfig,
    pub registry: RegistryConfig,
    pub executor: ExecutorConfig,
    pub kafka: KafkaConfig,
    pub agent: AgentConfig,
    pub tls: TlsConfig,
    pub security: SecurityConfig,
}

/// Signed dispatches and sealed secrets (`crate::trust`, docs/security.md). Key values are
/// paths of files written by `etask keygen`, or the key line itself.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Scheduler: the Ed25519 private key every dispatch and cancel is signed with. Empty =
    /// unsigned (`--mode all` then signs with `<data_dir>/keys/dispatch.key`).
    pub signing_key: String,
    /// Nodes: the public keys whose signatures they accept (several during a rollover).
    /// Empty = unsigned dispatches run (unless `require_signed`).
    pub trusted_keys: Vec<String>,
    /// Nodes: refuse to start without `trusted_keys` (packages set it).
    pub require_signed: bool,
    /// Nodes: the pool's X25519 private keys that open sealed secrets (several during a
    /// rotation).
    pub pool_private_keys: Vec<String>,
    /// Scheduler: refuse a task with secrets for a pool that has no key in `pool_keys`
    /// (instead of storing them in clear).
    pub require_sealed_secrets: bool,
    /// Scheduler: pool name → the pool's X25519 public key; secrets of tasks for that pool are
    /// sealed to it at intake.
    pub pool_keys: std::collections::BTreeMap<String, String>,
}

/// The Kafka path: the scheduler's producer/consumer and the agents' (`--mode agent`).
///
/// `Debug` shows `sasl_password` as `******` (when set): the configuration may be logged.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers "HOST:PORT[,HOST:PORT]"; empty = no Kafka path.
    pub brokers: String,
    /// The dispatch topic of pool P is `<dispatch_topic_prefix>P`.
    pub dispatch_topic_prefix: String,
    pub events_topic: String,
    pub control_topic: String,
    pub dead_letter_topic: String,
    /// The scheduler creates missing topics at start (admin API); false = it fails naming them.
    pub create_topics: bool,
    /// Partitions of topics the scheduler creates (the most agents of one pool that share work).
    pub partitions: u32,
    /// Pools whose dispatch topics the scheduler checks (and creates) at start; topics of
    /// other pools are checked when their first task is dispatched.
    pub pools: Vec<String>,
    /// An agent does not start a dispatch older than this; the scheduler re-dispatches work
    /// no agent started by then (with a new attempt number, so the old copy can never run).
    pub dispatch_ttl_seconds: u64,
    /// Dispatches in the topics that no agent has started yet, per scheduler; more wait in
    /// the store.
    pub max_queued: usize,
    /// A run on an agent that sent no heartbeat for this long is lost (or retried): longer
    /// than `scheduler.node_silent_after_ms` because Kafka may pause during a broker failover.
    pub agent_silent_after_ms: u64,
    /// Consumer `fetch.wait.max.ms` and producer `linger.ms`: lower = less latency, more
    /// requests to the brokers.
    pub fetch_wait_max_ms: u64,
    pub linger_ms: u64,
    /// librdkafka `security.protocol` of every Kafka client of the process: "" (= plaintext),
    /// "plaintext", "ssl", "sasl_plaintext" or "sasl_ssl" (any case).
    pub security_protocol: String,
    /// `sasl.mechanism`: "PLAIN", "SCRAM-SHA-256" or "SCRAM-SHA-512" (any case); required with
    /// a `sasl_` protocol, refused without one. librdkafka's built-in SASL (no GSSAPI).
    pub sasl_mechanism: String,
    /// The SASL user; required with a `sasl_` protocol.
    pub sasl_username: String,
    /// The SASL password, in the file. Prefer `sasl_password_file` or
    /// `$ETASK_KAFKA_SASL_PASSWORD` (which wins over both), so it need not sit in the config.
    pub sasl_password: String,
    /// A file whose content (one trailing newline removed) is the SASL password; read once at
    /// start, must not be readable by every user. Not together with `sasl_password`.
    pub sasl_password_file: String,
    /// CA (PEM file) the brokers' certificates must chain to; empty = the system's CA store
    /// (librdkafka probes the usual paths). Only with "ssl" or "sasl_ssl".
    pub ssl_ca: String,
    /// Client certificate (PEM file) when the brokers require one; with `ssl_key`.
    pub ssl_cert: String,
    /// The client certificate's private key (PEM file, unencrypted, not readable by every
    /// user); with `ssl_cert`.
    pub ssl_key: String,
    /// Extra librdkafka properties for every client (e.g. "api.version.request"); they win
    /// over the settings ETask chooses.
    pub client_options: std::collections::BTreeMap<String, String>,
}

/// Why a node with `security.require_signed` and no `trusted_keys` does not start.
const UNSIGNED_NODE: &str = "security.require_signed is set but security.trusted_keys is empty: \
     list the scheduler's public key, e.g. trusted_keys = [\"/etc/etask/dispatch.pub\"] (the \
     packages make that pair on install; on a node host, copy the scheduler host's \
     dispatch.pub there; `etask keygen --out DIR` makes a pair)";

impl std::fmt::Debug for KafkaConfig {
    /// Every field, with the SASL password shown as `******` when it is set.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = if self.sasl_password.is_empty() {
            ""
        } else {
            "******"
        };
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("dispatch_topic_prefix", &self.dispatch_topic_prefix)
            .field("events_topic", &self.events_topic)
            .field("control_topic", &self.control_topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("pools", &self.pools)
            .field("dispatch_ttl_seconds", &self.dispatch_ttl_seconds)
            .field("max_queued", &self.max_queued)
            .field("agent_silent_after_ms", &self.agent_silent_after_ms)
            .field("fetch_wait_max_ms", &self.fetch_wait_max_ms)
            .field("linger_ms", &self.linger_ms)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &masked)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca", &self.ssl_ca)
            .field("ssl_cert", &self.ssl_cert)
            .field("ssl_key", &self.ssl_key)
            .field("client_options", &masked_options(&self.client_options))
            .finish()
    }
}

/// `kafka.client_options` for `Debug`: the values of librdkafka's sensitive properties
/// (passwords, secrets, inline keys) as `******`.
fn masked_options(
    o: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<&str, &str> {
    o.iter()
        .map(|(k, v)| {
            let sensitive = ["password", "secret", "key.pem", "oauthbearer.config"]
                .iter()
                .any(|s| k.contains(s));
            (k.as_str(), if sensitive { "******" } else { v.as_str() })
        })
        .collect()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            dispatch_topic_prefix: "etask.dispatch.".into(),
            events_topic: "etask.events".into(),
            control_topic: "etask.control".into(),
            dead_letter_topic: "etask.dead-letter".into(),
            create_topics: true,
            partitions: 4,
            pools: vec!["default".into()],
            dispatch_ttl_seconds: 60,
            max_queued: 1_000,
            agent_silent_after_ms: 15_000,
            fetch_wait_max_ms: 5,
            linger_ms: 1,
            security_protocol: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: String::new(),
            sasl_password_file: String::new(),
            ssl_ca: String::new(),
            ssl_cert: String::new(),
            ssl_key: String::new(),
            client_options: Default::default(),
        }
    }
}

/// The `--mode agent` node: consumes its pool's dispatch topic; opens no port.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub pool: String,
    /// Empty = "<hostname>-<pid>".
    pub node_id: String,
    /// How often the agent tells the scheduler which runs it holds.
    pub heartbeat_ms: u64,
    /// Where the agent records the dispatches it took; empty = <data_dir>/agent-spool.
    pub spool_dir: String,
    /// On SIGTERM: how long running scripts may go on to finish (and be reported) before the
    /// agent exits and they are killed (the scheduler then retries them).
    pub drain_seconds: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            pool: "default".into(),
            node_id: String::new(),
            heartbeat_ms: 1_000,
            spool_dir: String::new(),
            drain_seconds: 30,
        }
    }
}

/// TLS of the gRPC servers and clients (PEM files). Off unless set.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain this process serves gRPC with (with `key`).
    pub cert: String,
    pub key: String,
    /// CA that peers' certificates must chain to; clients then dial https://.
    pub ca: String,
    /// Mutual TLS: gRPC servers require clients to present a certificate chaining to `ca`,
    /// and this process's clients present `cert`/`key`.
    pub client_auth: bool,
}

/// The `--mode executor` node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorConfig {
    /// The scheduler's gRPC URL, e.g. "http://10.0.0.5:9090".
    pub scheduler: String,
    pub pool: String,
    /// push (the scheduler calls this node) or pull (it long-polls the scheduler): a
    /// `DeliveryPath` name, read through `delivery_path`.
    pub path: String,
    /// Where the executor serves Execute/Cancel (push).
    pub grpc_listen: String,
    /// Address the scheduler should dial; empty = grpc_listen.
    pub advertise: String,
    /// Empty = "<hostname>-<pid>".
    pub node_id: String,
    /// Shared with the scheduler (its `server.token`): required on Execute/Cancel and sent
    /// with reports. Empty = no auth.
    pub token: String,
}

impl ExecutorConfig {
    /// `path` as a delivery path: push or pull, `None` for anything else (which
    /// `Config::check_values` refuses).
    pub fn delivery_path(&self) -> Option<DeliveryPath> {
        DeliveryPath::from_name(&self.path).filter(|p| p.is_grpc())
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            scheduler: "http://127.0.0.1:9090".into(),
            pool: "default".into(),
            path: DeliveryPath::Push.as_str().into(),
            grpc_listen: "127.0.0.1:9091".into(),
            advertise: String::new(),
            node_id: String::new(),
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// etcd client URL (its /v3 JSON gateway), e.g. "http://127.0.0.1:2379"; empty = no etcd,
    /// the scheduler knows only its own built-in node.
    pub etcd: String,
    pub prefix: String,
    pub ttl_seconds: u64,
    /// For an https:// etcd: the CA its certificate chains to (PEM); empty = web PKI roots.
    pub ca: String,
    /// Client certificate and key (PEM) when etcd requires one (`--client-cert-auth`).
    pub cert: String,
    pub key: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            etcd: String::new(),
            prefix: "/etask/".into(),
            ttl_seconds: 10,
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    /// `sqlite:PATH` or `mysql://user:pass@host:port/db`; empty = `sqlite:<data_dir>/etask.db`.
    pub store: String,
    /// Bearer token for the HTTP API; empty = no auth, and then only a loopback address may be used.
    pub token: String,
    pub max_body_bytes: usize,
    pub http_threads: usize,
    pub max_log_followers: usize,
    /// gRPC listen address of the scheduler (nodes report here); empty = no gRPC.
    pub grpc_listen: String,
    /// A request's line and headers must arrive within this many ms (idle keep-alive
    /// connections are closed after it too).
    pub header_timeout_ms: u64,
    /// A request's body must arrive within this many ms after its headers.
    pub body_timeout_ms: u64,
    /// Largest request head (request line + headers), bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Most header lines per request.
    pub max_headers: usize,
    /// Most HTTP connections open at once; more clients wait in the listen backlog.
    pub max_connections: usize,
    /// Serve the HTTP intake over TLS with this certificate chain (PEM) and `tls_key`.
    pub tls_cert: String,
    pub tls_key: String,
    /// With TLS: clients must present a certificate that chains to this CA (PEM).
    pub tls_client_ca: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often the dispatcher looks for due work it was not told about (other schedulers,
    /// retries); submissions to this scheduler wake it at once.
    pub poll_interval_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// An execution whose node sent no heartbeat for this long is `lost` (or retried).
    pub node_silent_after_ms: u64,
    pub default_timeout_seconds: u64,
    pub default_max_attempts: u32,
    /// What a cron task does after the scheduler was down over several fire times:
    /// "once" fires one execution on return, "skip" waits for the next fire time.
    pub cron_missed: String,
    /// Finished executions (with their logs) are deleted after this many days; 0 = never.
    pub retention_days: u64,
    /// A push/pull execution that no node took within this long fails ("no live node").
    pub no_node_timeout_seconds: u64,
    /// IANA zone cron tasks are read in when they name none (`schedule.timezone`); fixed into
    /// each task when it is created.
    pub timezone: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackConfig {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub timeout_ms: u64,
    /// Hosts (names or IP addresses) and CIDR ranges callbacks may go to. Empty = any host
    /// except loopback, link-local (cloud metadata), unspecified and multicast addresses;
    /// those are reached only when listed here.
    pub allowed_hosts: Vec<String>,
    /// CA (PEM) that https:// callback servers must chain to; empty = the web PKI roots.
    pub ca: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub max_concurrent: usize,
    pub queue_capacity: usize,
    /// Empty = `<data_dir>/work`.
    pub workspace_root: String,
    pub keep_failed_workspaces: bool,
    pub kill_grace_seconds: u64,
    pub result_max_bytes: usize,
    pub log_line_max_bytes: usize,
    pub log_run_max_bytes: u64,
    /// 0 = unlimited.
    pub rlimit_cpu_seconds: u64,
    pub rlimit_address_space_bytes: u64,
    pub rlimit_open_files: u64,
    pub rlimit_processes: u64,
    /// Run scripts as this uid/gid when the node runs as root (-1 = as the node itself).
    pub run_as_uid: i64,
    pub run_as_gid: i64,
    /// Containment of runs: "auto" (cgroup v2 where writable, v1 controllers where not or
    /// for what v2 lacks, else the environment-token fallback), "v2", "v1" or "off".
    pub cgroup: String,
    /// The cgroup path (as in /proc/self/cgroup) under which the node makes its subtree;
    /// empty = the cgroup the node runs in (systemd `Delegate=yes`).
    pub cgroup_root: String,
    /// The node's subtree name; empty = "etask-" and a hash of the data dir, so a restarted
    /// node finds (and removes) what its previous incarnation left.
    pub cgroup_name: String,
    /// Default limits of each run (a task's `program.limits` override them); 0 = none.
    /// Memory of the whole run in bytes (no swap beyond it).
    pub limit_memory_bytes: u64,
    /// Processes and threads of a run at once (binds root too, unlike rlimit_processes).
    pub limit_pids: u64,
    /// CPU in thousandths of a CPU (500 = half a CPU).
    pub limit_cpu_millicores: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8765".into(),
            data_dir: PathBuf::from("./etask-data"),
            store: String::new(),
            token: String::new(),
            max_body_bytes: 8 << 20,
            http_threads: 8,
            max_log_followers: 256,
            grpc_listen: "127.0.0.1:9090".into(),
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_header_bytes: 64 << 10,
            max_headers: 100,
            max_connections: 1024,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
        }
    }
}

impl SchedulerConfig {
    /// `cron_missed` as the model's policy (`once` for a name `Config::check_values` refuses).
    pub fn missed_fires(&self) -> CronMissed {
        CronMissed::from_name(&self.cron_missed).unwrap_or(CronMissed::Once)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            poll_interval_ms: 500,
            heartbeat_interval_ms: 1_000,
            node_silent_after_ms: 3_000,
            default_timeout_seconds: 3_600,
            default_max_attempts: 1,
            cron_missed: CronMissed::Once.as_str().into(),
            retention_days: 30,
            no_node_timeout_seconds: 300,
            timezone: "UTC".into(),
        }
    }
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            max_attempts: 20,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            timeout_ms: 10_000,
            allowed_hosts: Vec::new(),
            ca: String::new(),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        let pool = PoolConfig::default();
        NodeConfig {
            max_concurrent: pool.max_concurrent,
            queue_capacity: pool.queue_capacity,
            workspace_root: String::new(),
            keep_failed_workspaces: false,
            kill_grace_seconds: 5,
            result_max_bytes: pool.result_max_bytes,
            log_line_max_bytes: pool.logs.line_max_bytes,
            log_run_max_bytes: pool.logs.run_max_bytes,
            rlimit_cpu_seconds: 0,
            rlimit_address_space_bytes: 0,
            rlimit_open_files: 0,
            rlimit_processes: 0,
            run_as_uid: -1,
            run_as_gid: -1,
            cgroup: "auto".into(),
            cgroup_root: String::new(),
            cgroup_name: String::new(),
            limit_memory_bytes: 0,
            limit_pids: 0,
            limit_cpu_millicores: 0,
        }
    }
}

/// The commented default file printed by `etask config --print-default`.
const DEFAULT_TOML_TEXT: &str = r#"# ETask server configuration. Every key is optional; shown values are the defaults.
# Command-line flags of `etask server` override this file (`etask server --help` lists them:
# --listen, --data-dir, --store, --grpc-listen, --etcd, --scheduler, --pool, --kafka, --path,
# --node-id, --max-concurrent, --workspace-root).

[server]
# HTTP intake address. Without a token only a loopback address is accepted.
listen = "127.0.0.1:8765"
# Where the embedded store and the run workspaces live (packages use /var/lib/etask).
data_dir = "./etask-data"
# sqlite:PATH or mysql://user:pass@host:port/db; empty means sqlite:<data_dir>/etask.db
store = ""
# Bearer token required on /api/* and /metrics (Authorization: Bearer ...); empty = no auth.
token = ""
# Larger request bodies are refused with 413.
max_body_bytes = 8388608
http_threads = 8
# Concurrent `logs?follow=true` streams; more are refused with 503.
max_log_followers = 256
# gRPC address of the scheduler: executors report logs and outcomes here. Empty = no gRPC.
# Like listen: anything but a loopback address needs a token.
grpc_listen = "127.0.0.1:9090"
# Limits of the HTTP intake: a request's head must arrive within header_timeout_ms (idle
# keep-alive connections close after it too), its body within body_timeout_ms; a head over
# max_header_bytes or max_headers lines is refused (431); at most max_connections are open.
header_timeout_ms = 10000
body_timeout_ms = 30000
max_header_bytes = 65536
max_headers = 100
max_connections = 1024
# HTTPS: serve the intake with this certificate chain and key (PEM files); empty = plain HTTP.
# tls_client_ca: clients must also present a certificate that chains to this CA.
tls_cert = ""
tls_key = ""
tls_client_ca = ""

[scheduler]
# Look for due work this often (submissions to this scheduler wake it at once).
poll_interval_ms = 500
# How often the scheduler records that its own node and every node with a live etcd lease
# still hold their executions.
heartbeat_interval_ms = 1000
# An execution whose node has been gone (process dead, or lease expired) this long becomes
# lost (or is retried). Nodes known to be alive are never declared lost, however late.
node_silent_after_ms = 3000
# Timeout of tasks that set none.
default_timeout_seconds = 3600
# Attempts of tasks that set no retry policy (1 = no retry).
default_max_attempts = 1
# After downtime over several cron fire times: "once" fires once on return, "skip" does not.
cron_missed = "once"
# Finished executions, their logs and delivered callbacks are deleted after this many days
# (task definitions stay); 0 = keep forever.
retention_days = 30
# A push/pull execution that no node took within this long fails with "no live node".
no_node_timeout_seconds = 300
# IANA time zone of cron tasks that set no schedule.timezone (e.g. "Asia/Shanghai"); fixed
# into each task when it is created. The reference Go ETask used the scheduler host's zone.
timezone = "UTC"

[callbacks]
# POST of the execution to callback_url on its terminal state, from a durable outbox.
max_attempts = 20
initial_backoff_ms = 1000
max_backoff_ms = 300000
timeout_ms = 10000
# Where callbacks may go: host names, IP addresses, CIDR ranges ("10.0.0.0/8"). Empty = any
# host except loopback, link-local (e.g. 169.254.169.254 cloud metadata), unspecified and
# multicast addresses, which are reached only when listed. Redirects are never followed.
allowed_hosts = []
# CA (PEM) that https:// callback targets must chain to; empty = the web PKI roots built in.
ca = ""

[node]
# The built-in node of --mode all (the process pool).
max_concurrent = 64
queue_capacity = 1024
# Empty means <data_dir>/work.
workspace_root = ""
keep_failed_workspaces = false
kill_grace_seconds = 5
result_max_bytes = 4194304
log_line_max_bytes = 1048576
log_run_max_bytes = 67108864
# rlimits of each script; 0 = unlimited. rlimit_processes only binds with run_as (not for root).
rlimit_cpu_seconds = 0
rlimit_address_space_bytes = 0
rlimit_open_files = 0
rlimit_processes = 0
# Run scripts as this uid/gid when the node runs as root; -1 = as the node itself.
run_as_uid = -1
run_as_gid = -1
# Each run in its own cgroup: "auto" = cgroup v2 where the node may write (systemd
# Delegate=yes, or cgroup_root), the v1 pids/memory/cpu/freezer hierarchies where not (or for
# the controllers v2 lacks), else no cgroup (runs tracked by an environment token; a script
# that clears its environment and daemonizes escapes). "v2" / "v1" = only that, or the node
# does not start; "off" = never. The start-up log line and `etask nodes` say what is in use.
cgroup = "auto"
# Cgroup path (as in /proc/self/cgroup) under which the node makes its subtree; empty = the
# cgroup the node runs in.
cgroup_root = ""
# Name of the node's subtree; empty = "etask-" + a hash of the data dir. At start the node
# kills and removes every run cgroup a crashed previous incarnation left there.
cgroup_name = ""
# Default limits of each run, enforced through its cgroup (a task's program.limits override
# them); 0 = none. A limit the node cannot enforce is named in the outcome's resources.
# Memory of the whole run, bytes (no swap beyond it); past it the OOM killer ends the run.
limit_memory_bytes = 0
# Processes and threads of a run at once: stops fork bombs, also of root.
limit_pids = 0
# CPU, in thousandths of a CPU (500 = half a CPU, 2000 = two).
limit_cpu_millicores = 0

[registry]
# etcd client URL (its /v3 JSON gateway). Nodes keep <prefix>nodes/<role>/<pool>/<id> alive on
# a lease; schedulers watch the prefix. Empty = no etcd: the scheduler knows its own node only.
etcd = ""
prefix = "/etask/"
ttl_seconds = 10
# https:// etcd: the CA of its certificate (empty = web PKI roots), and a client certificate
# and key when etcd requires one.
ca = ""
cert = ""
key = ""

[executor]
# --mode executor: a gRPC node. path = "PUSH": the scheduler calls its Execute; "PULL": it
# long-polls the scheduler and opens no port. It reports back over gRPC and needs
# [registry] etcd so schedulers can find it.
scheduler = "http://127.0.0.1:9090"
pool = "default"
path = "PUSH"
grpc_listen = "127.0.0.1:9091"
# Address schedulers dial (host:port); empty = grpc_listen.
advertise = ""
# Empty = <hostname>-<pid>.
node_id = ""
# The scheduler's server.token: required on Execute/Cancel, sent with reports. Empty = none.
token = ""

[kafka]
# The Kafka path. Bootstrap brokers "HOST:PORT[,HOST:PORT]"; empty = off.
brokers = ""
# Topics: one dispatch topic per agent pool (<prefix><pool>), one events topic (agents ->
# scheduler), one control topic (cancels, read by every agent), one dead-letter topic.
dispatch_topic_prefix = "etask.dispatch."
events_topic = "etask.events"
control_topic = "etask.control"
dead_letter_topic = "etask.dead-letter"
# The scheduler creates missing topics at start; false = it fails with their names instead.
create_topics = true
# Partitions of the topics it creates: at most this many agents of one pool share the work.
partitions = 4
# Pools whose dispatch topics are checked at start (others when first used).
pools = ["default"]
# Agents do not start a dispatch older than this; the scheduler re-dispatches what no agent
# started by then (a new attempt number fences the old copy).
dispatch_ttl_seconds = 60
# Dispatches waiting in the topics, per scheduler; more wait in the store.
max_queued = 1000
# A run whose agent sent no heartbeat for this long is lost (or retried).
agent_silent_after_ms = 15000
# Consumer fetch.wait.max.ms and producer linger.ms: lower = less latency, more requests.
fetch_wait_max_ms = 5
linger_ms = 1
# Security of every Kafka client (scheduler and agents): security_protocol "" (plaintext),
# "ssl", "sasl_plaintext" or "sasl_ssl". SASL: sasl_mechanism "PLAIN", "SCRAM-SHA-256" or
# "SCRAM-SHA-512", sasl_username, and the password from sasl_password_file (a file only its
# owner and group may read), sasl_password or $ETASK_KAFKA_SASL_PASSWORD (wins). TLS: ssl_ca,
# the brokers' CA (PEM; "" = the system's CAs); ssl_cert and ssl_key, a client certificate when
# the brokers require one. Files are checked at start; relative paths are against the start
# directory.
security_protocol = ""
sasl_mechanism = ""
sasl_username = ""
sasl_password = ""
sasl_password_file = ""
ssl_ca = ""
ssl_cert = ""
ssl_key = ""

[kafka.client_options]
# Extra librdkafka properties for every Kafka client of this process, as "name" = "value";
# they win over the settings ETask chooses.

[agent]
# --mode agent: consumes <dispatch_topic_prefix><pool>, runs the scripts in its process pool
# ([node] limits; --max-concurrent), publishes logs and outcomes to the events topic. Opens no
# listening port. Registers in etcd when [registry] etcd is set (optional).
pool = "default"
# Empty = <hostname>-<pid>.
node_id = ""
heartbeat_ms = 1000
# The dispatches this agent took (so a redelivered one never runs twice); empty =
# <data_dir>/agent-spool.
spool_dir = ""
# On SIGTERM the agent takes no more work and lets running scripts finish (and be reported)
# for up to this long; then it exits and what still runs is killed and retried.
drain_seconds = 30

[tls]
# gRPC over TLS (rustls). cert + key: this process serves TLS. ca: the CA peers' certificates
# must chain to; clients then dial https:// (give executors an https:// scheduler URL).
cert = ""
key = ""
ca = ""
# Mutual TLS: servers require client certificates chaining to ca; clients present cert/key.
client_auth = false

[security]
# Signed dispatches (Ed25519) and sealed secrets; keys are made by `etask keygen` (a key value
# is a file path, or the key line itself). Scheduler: signs every dispatch and cancel with
# signing_key; empty = unsigned (--mode all signs with <data_dir>/keys/dispatch.key and its
# built-in node verifies).
signing_key = ""
# Nodes: public keys whose signatures they accept (old and new during a rollover). A node with
# trusted keys refuses unsigned, forged, tampered, expired, misbound and replayed dispatches.
trusted_keys = []
# Nodes: refuse to start without trusted_keys.
require_signed = false
# Nodes: the pool's private keys (`etask keygen --pool NAME`) that open sealed secrets.
pool_private_keys = []
# Scheduler: refuse tasks with secrets for a pool without a key in pool_keys (else stored clear).
require_sealed_secrets = false

[security.pool_keys]
# Scheduler: pool name = its public key; secret_env values and secret variables of tasks for
# that pool are sealed to it at intake, e.g. edge = "/etc/etask/keys/pool-edge.pub".
"#;

/// The default configuration file `etask config --print-default` prints: every key with its
/// default and meaning. The delivery path names come from `model::DeliveryPath` (the one place
/// that spells them); a unit test parses this text back to `Config::default()`.
pub static DEFAULT_TOML: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use crate::model::DeliveryPath;
    DEFAULT_TOML_TEXT
        .replace("\"PUSH\"", &format!("{:?}", DeliveryPath::Push.as_str()))
        .replace("\"PULL\"", &format!("{:?}", DeliveryPath::Pull.as_str()))
});

/// Why a config file could not be loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// The file cannot be read (missing, no permission).
    Unreadable(String),
    /// It is not valid TOML, has unknown keys or bad values.
    Invalid(String),
}

/// Why `Config::for_server` refused: the CLI exits with a different status for each.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("{0}")]
    Unreadable(String),
    /// The configuration (file, flags and environment together) is not one the server starts
    /// with.
    #[error("{0}")]
    Invalid(String),
}

impl From<ConfigError> for String {
    fn from(e: ConfigError) -> String {
        e.to_string()
    }
}

/// The flags of `etask server` that override the file; `None` = keep the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<String>,
    /// `executor.grpc_listen` for an executor, `server.grpc_listen` otherwise.
    pub grpc_listen: Option<String>,
    pub etcd: Option<String>,
    pub scheduler: Option<String>,
    /// `agent.pool` for an agent, `executor.pool` otherwise.
    pub pool: Option<String>,
    pub kafka: Option<String>,
    pub path: Option<String>,
    /// `agent.node_id` for an agent, `executor.node_id` otherwise.
    pub node_id: Option<String>,
    pub max_concurrent: Option<usize>,
    /// `node.workspace_root` (the packaged units put workspaces on tmpfs under /run/etask).
    pub workspace_root: Option<String>,
}

impl Overrides {
    fn apply(&self, mode: Option<crate::server::Mode>, cfg: &mut Config) {
        use crate::server::Mode;
        let set = |slot: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                slot.clone_from(v);
            }
        };
        set(&mut cfg.server.listen, &self.listen);
        if let Some(d) = &self.data_dir {
            cfg.server.data_dir.clone_from(d);
        }
        set(&mut cfg.server.store, &self.store);
        if mode == Some(Mode::Executor) {
            set(&mut cfg.executor.grpc_listen, &self.grpc_listen);
        } else {
            set(&mut cfg.server.grpc_listen, &self.grpc_listen);
        }
        set(&mut cfg.registry.etcd, &self.etcd);
        set(&mut cfg.executor.scheduler, &self.scheduler);
        if mode == Some(Mode::Agent) {
            set(&mut cfg.agent.pool, &self.pool);
            set(&mut cfg.agent.node_id, &self.node_id);
        } else {
            set(&mut cfg.executor.pool, &self.pool);
            set(&mut cfg.executor.node_id, &self.node_id);
        }
        set(&mut cfg.executor.path, &self.path);
        set(&mut cfg.kafka.brokers, &self.kafka);
        if let Some(v) = self.max_concurrent {
            cfg.node.max_concurrent = v;
        }
        set(&mut cfg.node.workspace_root, &self.workspace_root);
    }
}

impl Config {
    /// Reads and parses a config file (see `parse`).
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text =
            crate::read_bounded_text(path, crate::MAX_SMALL_FILE_BYTES, true).map_err(|e| {
                LoadError::Unreadable(format!("cannot read config {}: {e}", path.display()))
            })?;
        Config::parse(&text)
            .map_err(|e| LoadError::Invalid(format!("config {}: {e}", path.display())))
    }

    /// Parses a config file's text and checks its values (`check_values`); what depends on
    /// flags, the environment or the mode is checked by `validate`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_text(text).map_err(ConfigError::Invalid)
    }

    /// `parse` with its refusal as text.
    fn parse_text(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check_values()?;
        Ok(cfg)
    }

    /// The configuration `etask server --mode MODE` starts with: the file (or the defaults),
    /// then the command-line flags, then `$ETASK_TOKEN` for an empty `server.token`; paths made
    /// absolute against `cwd`; the Kafka SASL password read from `$ETASK_KAFKA_SASL_PASSWORD`
    /// or `kafka.sasl_password_file` (`KafkaConfig::resolve_sasl_password`); then `validate`. `etask config --check FILE` runs exactly this,
    /// so a file it accepts is one the server starts with.
    ///
    /// # Errors
    /// `Unreadable` when the file cannot be read, `Invalid` for everything else.
    pub fn for_server(
        mode: Option<crate::server::Mode>,
        file: Option<&Path>,
        flags: &Overrides,
        env_token: Option<String>,
        cwd: &Path,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(p) => Config::load(p).map_err(|e| match e {
                LoadError::Unreadable(m) => ConfigError::Unreadable(m),
                LoadError::Invalid(m) => ConfigError::Invalid(m),
            })?,
            None => Config::default(),
        };
        flags.apply(mode, &mut cfg);
        if cfg.server.token.is_empty() {
            cfg.server.token = env_token.unwrap_or_default();
        }
        cfg.resolve_paths(cwd);
        cfg.kafka
            .resolve_sasl_password(std::env::var("ETASK_KAFKA_SASL_PASSWORD").ok())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        cfg.validate(mode)?;
        Ok(cfg)
    }

    /// Everything the server checks before it starts anything: the values (`check_values`),
    /// the token rule for the HTTP intake, and what `mode` needs (executors a registry, agents
    /// Kafka). `None` = the checks of every mode that do not depend on the mode.
    pub fn validate(&self, mode: Option<crate::server::Mode>) -> Result<(), ConfigError> {
        self.validate_text(mode).map_err(ConfigError::Invalid)
    }

    /// `validate` with its refusal as text.
    fn validate_text(&self, mode: Option<crate::server::Mode>) -> Result<(), String> {
        use crate::server::Mode;
        self.check_values()?;
        // Never an unauthenticated listener reachable from the network by accident: the rule
        // every listener applies when it starts (`check_listener`), for the listeners `mode`
        // opens (all of them when no mode is given).
        if matches!(mode, None | Some(Mode::Scheduler | Mode::All)) {
            check_listener("server.listen", &self.server.listen, &self.server.token)?;
            if !self.server.grpc_listen.is_empty() {
                check_listener(
                    "server.grpc_listen",
                    &self.server.grpc_listen,
                    &self.server.token,
                )?;
            }
        }
        if matches!(mode, None | Some(Mode::Executor))
            && self.executor.delivery_path() == Some(DeliveryPath::Push)
        {
            check_listener(
                "executor.grpc_listen",
                &self.executor.grpc_listen,
                &self.executor.token,
            )?;
        }
        // A node that must check signatures but trusts no key: refused here too, so the
        // packaged units' `etask config --check` fails the start with the reason.
        if matches!(mode, Some(Mode::Agent | Mode::Executor))
            && self.security.require_signed
            && self.security.trusted_keys.is_empty()
        {
            return Err(UNSIGNED_NODE.into());
        }
        // The keys `mode` reads at start, read now: an unreadable, malformed or world-readable
        // key fails `etask config --check --mode MODE` (the units' ExecStartPre, run as the
        // unit's user) with the key's name instead of a failed start later.
        // Likewise every TLS file the mode loads (certificates, keys, CAs): the check and the
        // start refuse the same files, with exit 78 (a missing cert used to pass the check and
        // fail the start with 69).
        let tls = |r: Result<(), String>| r;
        let serves_grpc = match mode {
            Some(Mode::Executor) => self.executor.delivery_path() == Some(DeliveryPath::Push),
            Some(Mode::Scheduler | Mode::All) => !self.server.grpc_listen.is_empty(),
            _ => false,
        };
        if serves_grpc || (mode == Some(Mode::Executor)) {
            tls(self.grpc_tls_text().map(|_| ()))?;
        }
        if matches!(mode, Some(Mode::Executor | Mode::Scheduler | Mode::All))
            && !self.registry.etcd.is_empty()
        {
            tls(self.etcd_text().map(|_| ()))?;
        }
        match mode {
            Some(Mode::Agent | Mode::Executor) => {
                self.node_trust_text(None, "config-check")?;
            }
            Some(m @ (Mode::Scheduler | Mode::All)) => {
                self.scheduler_keys_text(None)?;
                if m == Mode::All {
                    self.node_trust_text(None, "config-check")?;
                }
                if !self.server.tls_cert.is_empty() {
                    crate::trust::tls::server_config(
                        &self.server.tls_cert,
                        &self.server.tls_key,
                        &self.server.tls_client_ca,
                    )
                    .map_err(|e| format!("server.tls_cert/tls_key/tls_client_ca: {e}"))?;
                }
                crate::trust::tls::client_config(&self.callbacks.ca, "", "", "callbacks.ca")
                    .map_err(|e| e.to_string())?;
            }
            None => {}
        }
        // A node's pool names its Kafka topic and key files; its id appears in etcd keys,
        // logs and tables: plain names only (control characters passed before).
        let (pool_key, pool, id_key, id) = match mode {
            Some(Mode::Agent) => (
                "agent.pool",
                &self.agent.pool,
                "agent.node_id",
                &self.agent.node_id,
            ),
            _ => (
                "executor.pool",
                &self.executor.pool,
                "executor.node_id",
                &self.executor.node_id,
            ),
        };
        if matches!(mode, Some(Mode::Agent | Mode::Executor)) {
            if !crate::model::is_plain_name(pool) {
                return Err(format!(
                    "{pool_key} {:?} must be a plain name: letters, digits, '-', '_' and '.'",
                    pool.escape_debug().to_string()
                ));
            }
            if !id.is_empty() && !crate::model::is_plain_name(id) {
                return Err(format!(
                    "{id_key} {:?} must be a plain name: letters, digits, '-', '_' and '.'",
                    id.escape_debug().to_string()
                ));
            }
        }
        match mode {
            Some(Mode::Executor) if self.registry.etcd.is_empty() => Err(
                "an executor needs [registry] etcd (or --etcd URL) so schedulers can find it"
                    .into(),
            ),
            Some(Mode::Agent) if self.kafka.brokers.trim().is_empty() => {
                Err("an agent needs Kafka: set kafka.brokers or pass --kafka HOST:PORT".into())
            }
            _ => self.kafka.check_files().map_err(String::from),
        }
    }

    /// The checks of single values and of keys that must go together.
    pub fn check_values(&self) -> Result<(), ConfigError> {
        self.check_values_text().map_err(ConfigError::Invalid)
    }

    /// `check_values` with its refusal as text.
    fn check_values_text(&self) -> Result<(), String> {
        crate::cron::zone(&self.scheduler.timezone)
            .map_err(|e| format!("scheduler.timezone: {e}"))?;
        let addr = |key: &str, v: &str| {
            v.parse::<std::net::SocketAddr>()
                .map(|_| ())
                .map_err(|_| format!("{key} {v:?} is not IP:PORT (e.g. 127.0.0.1:8765)"))
        };
        addr("server.listen", &self.server.listen)?;
        if !self.server.grpc_listen.is_empty() {
            addr("server.grpc_listen", &self.server.grpc_listen)?;
        }
        if !self.server.store.is_empty() {
            crate::store::check_url(&self.server.store)
                .map_err(|e| format!("server.store: {e}"))?;
        }
        if self.executor.delivery_path().is_none() {
            return Err(format!(
                "executor.path must be {:?} or {:?}, not {:?}",
                DeliveryPath::Push.as_str(),
                DeliveryPath::Pull.as_str(),
                self.executor.path
            ));
        }
        if !self.executor.grpc_listen.is_empty() {
            addr("executor.grpc_listen", &self.executor.grpc_listen)?;
        }
        if !(self.executor.scheduler.starts_with("http://")
            || self.executor.scheduler.starts_with("https://"))
        {
            return Err(format!(
                "executor.scheduler must be an http:// or https:// URL, not {:?}",
                self.executor.scheduler
            ));
        }
        // Times are used in arithmetic (ms conversions, deadlines, `Instant + Duration`): a
        // value near u64::MAX overflowed and panicked the node's reactor or the sweeper. Ten
        // years is beyond any sensible setting and far from every overflow.
        const MAX_S: u64 = 10 * 365 * 86_400;
        let k = &self.kafka;
        let sc = &self.scheduler;
        let cb = &self.callbacks;
        let sv = &self.server;
        for (key, v, max) in [
            ("kafka.dispatch_ttl_seconds", k.dispatch_ttl_seconds, MAX_S),
            (
                "kafka.agent_silent_after_ms",
                k.agent_silent_after_ms,
                MAX_S * 1000,
            ),
            ("kafka.fetch_wait_max_ms", k.fetch_wait_max_ms, MAX_S * 1000),
            ("kafka.linger_ms", k.linger_ms, MAX_S * 1000),
            ("agent.heartbeat_ms", self.agent.heartbeat_ms, MAX_S * 1000),
            ("agent.drain_seconds", self.agent.drain_seconds, MAX_S),
            ("registry.ttl_seconds", self.registry.ttl_seconds, MAX_S),
            (
                "server.header_timeout_ms",
                sv.header_timeout_ms,
                MAX_S * 1000,
            ),
            ("server.body_timeout_ms", sv.body_timeout_ms, MAX_S * 1000),
            (
                "scheduler.poll_interval_ms",
                sc.poll_interval_ms,
                MAX_S * 1000,
            ),
            (
                "scheduler.heartbeat_interval_ms",
                sc.heartbeat_interval_ms,
                MAX_S * 1000,
            ),
            (
                "scheduler.node_silent_after_ms",
                sc.node_silent_after_ms,
                MAX_S * 1000,
            ),
            (
                "scheduler.default_timeout_seconds",
                sc.default_timeout_seconds,
                MAX_S,
            ),
            (
                "scheduler.retention_days",
                sc.retention_days,
                MAX_S / 86_400,
            ),
            (
                "scheduler.no_node_timeout_seconds",
                sc.no_node_timeout_seconds,
                MAX_S,
            ),
            (
                "callbacks.initial_backoff_ms",
                cb.initial_backoff_ms,
                MAX_S * 1000,
            ),
            ("callbacks.max_backoff_ms", cb.max_backoff_ms, MAX_S * 1000),
            ("callbacks.timeout_ms", cb.timeout_ms, MAX_S * 1000),
            (
                "node.kill_grace_seconds",
                self.node.kill_grace_seconds,
                MAX_S,
            ),
            (
                "node.rlimit_cpu_seconds",
                self.node.rlimit_cpu_seconds,
                MAX_S,
            ),
        ] {
            if v > max {
                return Err(format!("{key} = {v} is over its maximum {max} (ten years)"));
            }
        }
        // A token is sent in a header (`Authorization: Bearer …`, gRPC metadata): anything
        // but visible ASCII there can never match (a trailing space or newline locked every
        // client out) — refused, naming the key.
        for (key, token) in [
            ("server.token", &self.server.token),
            ("executor.token", &self.executor.token),
        ] {
            if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
                let env = if key == "server.token" {
                    " (or $ETASK_TOKEN)"
                } else {
                    ""
                };
                return Err(format!(
                    "{key}{env} may hold visible ASCII characters only, no spaces or control \
                     characters (found {}): a header carries it, so it could never match",
                    c.escape_unicode()
                ));
            }
        }
        if self.server.tls_cert.is_empty() != self.server.tls_key.is_empty() {
            return Err("server.tls_cert and server.tls_key must be set together".into());
        }
        if !self.server.tls_client_ca.is_empty() && self.server.tls_cert.is_empty() {
            return Err("server.tls_client_ca needs server.tls_cert and tls_key".into());
        }
        self.kafka.check_security()?;
        if self.registry.cert.is_empty() != self.registry.key.is_empty() {
            return Err("registry.cert and registry.key must be set together".into());
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return Err("tls.cert and tls.key must be set together".into());
        }
        let brokers = self.kafka.brokers.trim();
        if !brokers.is_empty() && brokers.split(',').any(|b| b.trim().is_empty()) {
            return Err(format!(
                "kafka.brokers {:?} must be HOST:PORT[,HOST:PORT]",
                self.kafka.brokers
            ));
        }
        if CronMissed::from_name(&self.scheduler.cron_missed).is_none() {
            return Err(format!(
                "scheduler.cron_missed must be \"once\" or \"skip\", not {:?}",
                self.scheduler.cron_missed
            ));
        }
        if self.node.max_concurrent == 0 || self.server.http_threads == 0 {
            return Err("node.max_concurrent and server.http_threads must be at least 1".into());
        }
        // https is what `registry.ca`/`cert`/`key` are for (it was refused here while the
        // client and the README supported it).
        let etcd = &self.registry.etcd;
        if !(etcd.is_empty() || etcd.starts_with("http://") || etcd.starts_with("https://")) {
            return Err(format!(
                "registry.etcd must be an http:// or https:// URL, not {:?}",
                self.registry.etcd
            ));
        }
        if !self.registry.prefix.starts_with('/') || !self.registry.prefix.ends_with('/') {
            return Err("registry.prefix must start and end with '/'".into());
        }
        if self.registry.ttl_seconds < 2 {
            return Err("registry.ttl_seconds must be at least 2".into());
        }
        if self.kafka.partitions == 0 || self.kafka.dispatch_ttl_seconds == 0 {
            return Err(
                "kafka.partitions and kafka.dispatch_ttl_seconds must be at least 1".into(),
            );
        }
        if self.agent.heartbeat_ms == 0 || self.agent.pool.is_empty() {
            return Err("agent.heartbeat_ms must be at least 1 and agent.pool not empty".into());
        }
        if self.server.max_header_bytes < 8192
            || self.server.max_headers == 0
            || self.server.max_connections == 0
        {
            return Err("server.max_header_bytes must be at least 8192, server.max_headers and server.max_connections at least 1".into());
        }
        for h in &self.callbacks.allowed_hosts {
            crate::scheduler::callbacks::HostRule::parse(h)
                .map_err(|e| format!("callbacks.allowed_hosts: {e}"))?;
        }
        for (what, id) in [
            ("executor.node_id", &self.executor.node_id),
            ("agent.node_id", &self.agent.node_id),
            ("agent.pool", &self.agent.pool),
            ("executor.pool", &self.executor.pool),
        ] {
            if id.chars().count() > 255 {
                return Err(format!("{what} must be at most 255 characters"));
            }
        }
        if (self.node.run_as_uid < 0) != (self.node.run_as_gid < 0) {
            return Err("node.run_as_uid and node.run_as_gid must be set together".into());
        }
        self.node.cgroup.parse::<CgroupWant>()?;
        if !self.node.cgroup_root.is_empty() && !self.node.cgroup_root.starts_with('/') {
            return Err(format!(
                "node.cgroup_root must be a cgroup path starting with '/' (as in /proc/self/cgroup), not {:?}",
                self.node.cgroup_root
            ));
        }
        self.run_limits()
            .validate()
            .map_err(|e| format!("node: {}", e.0.replace("limits.", "limit_")))?;
        Ok(())
    }

    /// Makes every path of the configuration absolute, relative to `base` (the working
    /// directory at start): the data dir, the SQLite store path, the workspace root, the agent
    /// spool dir and the TLS files. Called once, right after flags are applied, so nothing later
    /// sees a relative path: scripts run inside their workspace, where a relative path would
    /// point somewhere else (a relative data dir once made every script fail to start).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let abs = |p: &std::path::Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let abs_str = |s: &mut String| {
            if !s.is_empty() {
                *s = abs(std::path::Path::new(s.as_str())).display().to_string();
            }
        };
        self.server.data_dir = clean(&abs(&self.server.data_dir));
        if let Some(path) = self.server.store.strip_prefix("sqlite:") {
            if !path.is_empty() {
                self.server.store = format!("sqlite:{}", abs(std::path::Path::new(path)).display());
            }
        }
        abs_str(&mut self.node.workspace_root);
        abs_str(&mut self.agent.spool_dir);
        abs_str(&mut self.tls.cert);
        abs_str(&mut self.tls.key);
        abs_str(&mut self.tls.ca);
        abs_str(&mut self.server.tls_cert);
        abs_str(&mut self.server.tls_key);
        abs_str(&mut self.server.tls_client_ca);
        abs_str(&mut self.callbacks.ca);
        abs_str(&mut self.registry.ca);
        abs_str(&mut self.registry.cert);
        abs_str(&mut self.registry.key);
        abs_str(&mut self.kafka.ssl_ca);
        abs_str(&mut self.kafka.ssl_cert);
        abs_str(&mut self.kafka.ssl_key);
        abs_str(&mut self.kafka.sasl_password_file);
        let key_path = |s: &mut String| {
            // A key line stays as it is; anything else is a path.
            if !s.contains(':') || s.starts_with('.') || s.starts_with('/') {
                abs_str(s)
            }
        };
        key_path(&mut self.security.signing_key);
        self.security.trusted_keys.iter_mut().for_each(key_path);
        self.security
            .pool_private_keys
            .iter_mut()
            .for_each(key_path);
        self.security.pool_keys.values_mut().for_each(key_path);
    }

    /// The etcd client of `[registry]`, with TLS for an https:// URL.
    ///
    /// # Errors
    /// The CA or client certificate files cannot be used.
    pub fn etcd(&self) -> Result<crate::registry::etcd::Etcd, ConfigError> {
        self.etcd_text().map_err(ConfigError::Invalid)
    }

    /// `etcd` with its refusal as text.
    fn etcd_text(&self) -> Result<crate::registry::etcd::Etcd, String> {
        let r = &self.registry;
        if !r.etcd.starts_with("https://") {
            return Ok(crate::registry::etcd::Etcd::new(&r.etcd));
        }
        let tls = crate::trust::tls::client_config(&r.ca, &r.cert, &r.key, "registry.ca/cert/key")?;
        Ok(crate::registry::etcd::Etcd::with_tls(&r.etcd, Some(tls)))
    }

    /// What a node checks before it runs a dispatch: the trusted keys, who it is, its pool
    /// keys. `pool` None = any pool (the built-in node).
    ///
    /// # Errors
    /// A key cannot be read, or `require_signed` without `trusted_keys`.
    pub fn node_trust(
        &self,
        pool: Option<&str>,
        node: &str,
    ) -> Result<crate::trust::NodeTrust, ConfigError> {
        self.node_trust_text(pool, node)
            .map_err(ConfigError::Invalid)
    }

    /// `node_trust` with its refusal as text.
    fn node_trust_text(
        &self,
        pool: Option<&str>,
        node: &str,
    ) -> Result<crate::trust::NodeTrust, String> {
        let sec = &self.security;
        if sec.require_signed && sec.trusted_keys.is_empty() {
            return Err(UNSIGNED_NODE.into());
        }
        let verifier = crate::trust::Verifier::load(&sec.trusted_keys)
            .map_err(|e| format!("security.trusted_keys: {e}"))?;
        let private = sec
            .pool_private_keys
            .iter()
            .map(|k| crate::trust::keys::load(crate::trust::keys::Kind::PoolPrivate, k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("security.pool_private_keys: {e}"))?;
        Ok(crate::trust::NodeTrust {
            verifier,
            me: crate::trust::NodeIdentity {
                pool: pool.map(str::to_owned),
                node: node.to_owned(),
            },
            open: crate::trust::seal::OpenKeys::new(&private),
        })
    }

    /// What the scheduler signs and seals with. `builtin`: the keys of `--mode all`'s
    /// built-in node (signing key when none is configured, and its pool key for `local`).
    ///
    /// # Errors
    /// A key cannot be read.
    pub fn scheduler_keys(
        &self,
        builtin: Option<&crate::trust::BuiltinKeys>,
    ) -> Result<crate::trust::SchedulerKeys, ConfigError> {
        self.scheduler_keys_text(builtin)
            .map_err(ConfigError::Invalid)
    }

    /// `scheduler_keys` with its refusal as text.
    fn scheduler_keys_text(
        &self,
        builtin: Option<&crate::trust::BuiltinKeys>,
    ) -> Result<crate::trust::SchedulerKeys, String> {
        let sec = &self.security;
        let signer = match (sec.signing_key.is_empty(), builtin) {
            (true, Some(b)) => crate::trust::Signer::from_bytes(b.signing_private),
            _ => crate::trust::Signer::load(&sec.signing_key)
                .map_err(|e| format!("security.signing_key: {e}"))?,
        };
        let mut pools = std::collections::HashMap::new();
        for (pool, k) in &sec.pool_keys {
            let b = crate::trust::keys::load(crate::trust::keys::Kind::PoolPublic, k)
                .map_err(|e| format!("security.pool_keys.{pool}: {e}"))?;
            pools.insert(pool.clone(), crate::trust::seal::SealKey::from_bytes(b));
        }
        Ok(crate::trust::SchedulerKeys {
            signer: std::sync::Arc::new(signer),
            pools,
            local: builtin.map(|b| crate::trust::seal::SealKey::from_bytes(b.pool_public)),
            require_sealed: sec.require_sealed_secrets,
        })
    }

    pub fn store_url(&self) -> String {
        if self.server.store.is_empty() {
            format!("sqlite:{}", self.server.data_dir.join("etask.db").display())
        } else {
            self.server.store.clone()
        }
    }

    /// The TLS material for the gRPC runtime.
    pub fn grpc_tls(&self) -> Result<crate::delivery::grpc::Tls, ConfigError> {
        self.grpc_tls_text().map_err(ConfigError::Invalid)
    }

    /// `grpc_tls` with its refusal as text.
    fn grpc_tls_text(&self) -> Result<crate::delivery::grpc::Tls, String> {
        let mut t =
            crate::delivery::grpc::Tls::from_files(&self.tls.cert, &self.tls.key, &self.tls.ca)
                .map_err(|e| e.to_string())?;
        if self.tls.client_auth {
            if t.ca.is_none() || t.identity.is_none() {
                return Err("tls.client_auth needs tls.ca, tls.cert and tls.key".into());
            }
            t.client_auth = true;
        }
        Ok(t)
    }

    pub fn pool_config(&self) -> PoolConfig {
        let n = &self.node;
        let opt = |v: u64| (v > 0).then_some(v);
        PoolConfig {
            max_concurrent: n.max_concurrent,
            queue_capacity: n.queue_capacity,
            workspace_root: if n.workspace_root.is_empty() {
                self.server.data_dir.join("work")
            } else {
                PathBuf::from(&n.workspace_root)
            },
            keep_failed_workspaces: n.keep_failed_workspaces,
            kill_grace: Duration::from_secs(n.kill_grace_seconds),
            result_max_bytes: n.result_max_bytes,
            logs: LogLimits {
                line_max_bytes: n.log_line_max_bytes,
                run_max_bytes: n.log_run_max_bytes,
                ..LogLimits::default()
            },
            limits: Rlimits {
                cpu_seconds: opt(n.rlimit_cpu_seconds),
                address_space_bytes: opt(n.rlimit_address_space_bytes),
                open_files: opt(n.rlimit_open_files),
                processes: opt(n.rlimit_processes),
            },
            run_as: (n.run_as_uid >= 0).then_some(RunAs {
                uid: n.run_as_uid as u32,
                gid: n.run_as_gid as u32,
            }),
            cgroup: CgroupConfig {
                // validate() checked it.
                want: n.cgroup.parse().unwrap_or_default(),
                root: (!n.cgroup_root.is_empty()).then(|| n.cgroup_root.clone()),
                name: Some(if n.cgroup_name.is_empty() {
                    node_cgroup_name(&self.server.data_dir)
                } else {
                    n.cgroup_name.clone()
                }),
            },
            run_limits: self.run_limits(),
            ..PoolConfig::default()
        }
    }

    /// The node's default run limits (`[node] limit_*`, 0 = none).
    pub fn run_limits(&self) -> Limits {
        let opt = |v: u64| (v > 0).then_some(v);
        Limits {
            memory_bytes: opt(self.node.limit_memory_bytes),
            pids: opt(self.node.limit_pids),
            cpu_millicores: opt(self.node.limit_cpu_millicores),
        }
    }
}

/// Parses a listen address and refuses one that is not loopback when no token protects it:
/// the same rule for every listener (HTTP intake, the scheduler's gRPC, an executor's gRPC).
///
/// # Errors
/// The address is not `IP:PORT`, or it is not loopback and `token` is empty.
pub fn check_listener(
    what: &str,
    listen: &str,
    token: &str,
) -> Result<std::net::SocketAddr, ConfigError> {
    check_listener_text(what, listen, token).map_err(ConfigError::Invalid)
}

/// `check_listener` with its refusal as text.
fn check_listener_text(
    what: &str,
    listen: &str,
    token: &str,
) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| format!("{what} {listen:?} is not IP:PORT"))?;
    if token.is_empty() && !addr.ip().is_loopback() {
        return Err(format!(
            "refusing {what} = {addr} without a token: anyone who reaches it could run scripts \
             on the nodes. Set a token (clients send `Authorization: Bearer <token>`) or use a \
             loopback address"
        ));
    }
    Ok(addr)
}

/// Creates (or tightens) a directory of node state: mode 0700, or 0711 when scripts dropped to
/// another uid (`run_as`) must traverse it to reach their workspace (they still cannot list
/// it, and the files in it are 0600). A directory that was more open is tightened and says so.
///
/// # Errors
/// The directory cannot be created or its mode set.
pub fn prepare_state_dir(dir: &std::path::Path, traversable: bool) -> Result<(), ConfigError> {
    prepare_state_dir_text(dir, traversable).map_err(ConfigError::Invalid)
}

/// `prepare_state_dir` with its refusal as text.
fn prepare_state_dir_text(dir: &std::path::Path, traversable: bool) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mode = if traversable { 0o711 } else { 0o700 };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| format!("cannot create state dir {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let have = meta.permissions().mode() & 0o777;
    if have & !mode != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot restrict {} to {mode:o}: {e}", dir.display()))?;
        log::warn!(target: "etask::config", "state dir {} was mode {have:o}; restricted to {mode:o} (it holds task secrets)", dir.display());
    }
    Ok(())
}

/// "etask-" and 8 hex digits of FNV-1a over the data dir: stable across restarts of one node,
/// different for nodes with different data dirs on one host.
fn node_cgroup_name(data_dir: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("etask-{:08x}", (h ^ (h >> 32)) as u32)
}

/// `a/./b/` → `a/b` (lexically; `..` is kept, it may cross a symlink).
fn clean(p: &std::path::Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_resolved_against_the_start_directory() {
        let mut c = Config::parse(
            "[server]\ndata_dir = \"d\"\nstore = \"sqlite:s/x.db\"\n[node]\nworkspace_root = \"w\"\n\
             [agent]\nspool_dir = \"sp\"\n[tls]\ncert = \"c.pem\"\nkey = \"/abs/k.pem\"\n\
             [kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\n\
             sasl_username = \"u\"\nsasl_password_file = \"pw\"\nssl_ca = \"k/ca.pem\"\n\
             ssl_cert = \"k/c.pem\"\nssl_key = \"k/c.key\"\n",
        )
        .unwrap();
        c.resolve_paths(std::path::Path::new("/base"));
        assert_eq!(c.server.data_dir, PathBuf::from("/base/d"));
        assert_eq!(c.server.store, "sqlite:/base/s/x.db");
        assert_eq!(c.node.workspace_root, "/base/w");
        assert_eq!(c.agent.spool_dir, "/base/sp");
        assert_eq!(c.tls.cert, "/base/c.pem");
        assert_eq!(c.tls.key, "/abs/k.pem");
        assert_eq!(c.kafka.sasl_password_file, "/base/pw");
        assert_eq!(c.kafka.ssl_ca, "/base/k/ca.pem");
        assert_eq!(c.kafka.ssl_cert, "/base/k/c.pem");
        assert_eq!(c.kafka.ssl_key, "/base/k/c.key");
        let mut d = Config::default();
        d.resolve_paths(std::path::Path::new("/base"));
        assert_eq!(d.server.data_dir, PathBuf::from("/base/etask-data"));
        assert!(d.store_url().starts_with("sqlite:/base/etask-data/"));
        assert!(d.pool_config().workspace_root.is_absolute());
    }

    #[test]
    fn nodes_with_require_signed_but_no_trusted_keys_fail_the_start_check() {
        use crate::server::Mode;
        let mut c = Config::default();
        c.kafka.brokers = "127.0.0.1:9092".into();
        c.registry.etcd = "http://127.0.0.1:2379".into();
        c.security.require_signed = true;
        for mode in [Mode::Agent, Mode::Executor] {
            let e = c.validate(Some(mode)).unwrap_err();
            assert!(
                e.to_string().contains("trusted_keys") && e.to_string().contains("dispatch.pub"),
                "{e}"
            );
        }
        assert!(c.validate(Some(Mode::Scheduler)).is_ok());
        // The keys a mode reads at start are read by the check too: a missing or too open
        // one is named (it used to pass the check and fail the start).
        let dir = std::env::temp_dir().join(format!("etask-cfg-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::trust::keygen(&dir, None).unwrap();
        let (key, public) = (dir.join("dispatch.key"), dir.join("dispatch.pub"));
        c.security.trusted_keys = vec![dir.join("missing.pub").display().to_string()];
        let e = c.validate(Some(Mode::Agent)).unwrap_err().to_string();
        assert!(
            e.contains("security.trusted_keys") && e.contains("missing.pub"),
            "{e}"
        );
        c.security.trusted_keys = vec![public.display().to_string()];
        assert!(c.validate(Some(Mode::Agent)).is_ok());
        assert!(c.validate(Some(Mode::Executor)).is_ok());
        c.security.signing_key = key.display().to_string();
        assert!(c.validate(Some(Mode::Scheduler)).is_ok());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        for mode in [Mode::Scheduler, Mode::All] {
            let e = c.validate(Some(mode)).unwrap_err().to_string();
            assert!(
                e.contains("security.signing_key") && e.contains("chmod 600"),
                "{e}"
            );
        }
        // Without a mode (`config --check FILE` on a build host) no key file is read.
        assert!(c.validate(None).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn printed_default_file_parses_to_the_defaults() {
        assert_eq!(Config::parse(&DEFAULT_TOML).unwrap(), Config::default());
        assert!(!DEFAULT_TOML.contains("PUSH") && !DEFAULT_TOML.contains("PULL"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::parse("[server]\nlisen = \"x\"\n")
            .unwrap_err()
            .to_string()
            .contains("lisen"));
        assert!(Config::parse("[scheduler]\ncron_missed = \"all\"\n")
            .unwrap_err()
            .to_string()
            .contains("cron_missed"));
    }
}
