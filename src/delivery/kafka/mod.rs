//! The Kafka path (`target.path = agent`): the scheduler produces dispatches to one topic per
//! agent pool and consumes the events topic; agents (`--mode agent`, in `crate::node::agent`)
//! do the opposite and listen on no port. rdkafka's sync `BaseConsumer` polled by our own
//! threads, and its `ThreadedProducer` (a `BaseProducer` with librdkafka's poll thread); no
//! async runtime. Envelopes are in `wire`.

pub mod scheduler;
pub mod wire;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::config::KafkaConfig;

const LOG: &str = "etask::kafka";

impl KafkaConfig {
    pub fn dispatch_topic(&self, pool: &str) -> String {
        format!("{}{pool}", self.dispatch_topic_prefix)
    }

    /// Settings shared by every client: brokers, reconnects that keep trying, and the
    /// security settings (TLS, SASL). The SASL password is `sasl_password` as
    /// `resolve_sasl_password` left it (from `$ETASK_KAFKA_SASL_PASSWORD`, the file or the
    /// config).
    fn base(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set("log_level", "4");
        let protocol = self.security_protocol.to_ascii_lowercase();
        let mut set = |k: &str, v: &str| {
            if !v.is_empty() {
                c.set(k, v);
            }
        };
        set("security.protocol", &protocol);
        if protocol.starts_with("sasl_") {
            set("sasl.mechanism", &self.sasl_mechanism.to_ascii_uppercase());
            set("sasl.username", &self.sasl_username);
            set("sasl.password", &self.sasl_password);
        }
        if protocol.ends_with("ssl") {
            // The statically linked OpenSSL's own default CA path is a directory of the build
            // machine: without a configured CA, librdkafka looks in the usual system places.
            set(
                "ssl.ca.location",
                if self.ssl_ca.is_empty() {
                    "probe"
                } else {
                    &self.ssl_ca
                },
            );
            set("ssl.certificate.location", &self.ssl_cert);
            set("ssl.key.location", &self.ssl_key);
        }
        c
    }

    /// Checks the values of the `[kafka]` security keys and the keys that go together: a
    /// known protocol and mechanism, SASL with a user, `ssl_*` only with TLS, a certificate
    /// with its key, one password source in the file. Files are checked by `check_files`.
    ///
    /// # Errors
    /// The first problem, naming the key and what to set instead.
    pub fn check_security(&self) -> Result<(), KafkaError> {
        self.check_security_text().map_err(KafkaError::Config)
    }

    /// `check_security` with its refusal as text.
    fn check_security_text(&self) -> Result<(), String> {
        let proto = self.security_protocol.to_ascii_lowercase();
        if !["", "plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&proto.as_str()) {
            return Err(format!(
                "kafka.security_protocol {:?}: use plaintext, ssl, sasl_plaintext or sasl_ssl",
                self.security_protocol
            ));
        }
        let sasl = proto.starts_with("sasl_");
        let mechanism = self.sasl_mechanism.to_ascii_uppercase();
        if sasl && !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&mechanism.as_str()) {
            return Err(format!(
                "kafka.sasl_mechanism {:?}: use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with \
                 security_protocol {proto}",
                self.sasl_mechanism
            ));
        }
        if sasl && self.sasl_username.is_empty() {
            return Err(format!(
                "kafka.security_protocol {proto} needs kafka.sasl_username (and a password: \
                 sasl_password_file, sasl_password or $ETASK_KAFKA_SASL_PASSWORD)"
            ));
        }
        let sasl_keys = [
            ("sasl_mechanism", &self.sasl_mechanism),
            ("sasl_username", &self.sasl_username),
            ("sasl_password", &self.sasl_password),
            ("sasl_password_file", &self.sasl_password_file),
        ];
        if let Some((key, _)) = sasl_keys.iter().find(|(_, v)| !sasl && !v.is_empty()) {
            return Err(format!(
                "kafka.{key} is set but kafka.security_protocol is {:?}: SASL needs \
                 sasl_plaintext or sasl_ssl",
                if proto.is_empty() {
                    "plaintext"
                } else {
                    &proto
                }
            ));
        }
        if !self.sasl_password.is_empty() && !self.sasl_password_file.is_empty() {
            return Err(
                "kafka.sasl_password and kafka.sasl_password_file are both set: keep one \
                 (the file keeps the password out of the config)"
                    .into(),
            );
        }
        let tls = proto.ends_with("ssl");
        let ssl_keys = [
            ("ssl_ca", &self.ssl_ca),
            ("ssl_cert", &self.ssl_cert),
            ("ssl_key", &self.ssl_key),
        ];
        if let Some((key, _)) = ssl_keys.iter().find(|(_, v)| !tls && !v.is_empty()) {
            return Err(format!(
                "kafka.{key} is set but kafka.security_protocol is {:?}: TLS needs ssl or \
                 sasl_ssl",
                if proto.is_empty() {
                    "plaintext"
                } else {
                    &proto
                }
            ));
        }
        if self.ssl_cert.is_empty() != self.ssl_key.is_empty() {
            return Err("kafka.ssl_cert and kafka.ssl_key must be set together".into());
        }
        Ok(())
    }

    /// Takes the SASL password from where the operator put it, once, at start:
    /// `env` (`$ETASK_KAFKA_SASL_PASSWORD`) when not empty, else the content of
    /// `sasl_password_file` (one trailing newline removed), else `sasl_password` as it is.
    /// Afterwards `sasl_password` holds it and `sasl_password_file` is empty.
    ///
    /// # Errors
    /// The file cannot be read, is empty, or is readable by every user (the message names the
    /// file, never the password).
    pub fn resolve_sasl_password(&mut self, env: Option<String>) -> Result<(), KafkaError> {
        self.resolve_sasl_password_text(env)
            .map_err(KafkaError::Config)
    }

    /// `resolve_sasl_password` with its refusal as text.
    fn resolve_sasl_password_text(&mut self, env: Option<String>) -> Result<(), String> {
        let file = std::mem::take(&mut self.sasl_password_file);
        if let Some(p) = env.filter(|p| !p.is_empty()) {
            self.sasl_password = p;
            return Ok(());
        }
        if file.is_empty() {
            return Ok(());
        }
        let path = std::path::Path::new(&file);
        refuse_world_readable("kafka.sasl_password_file", path)?;
        let text = crate::read_bounded_text(path, crate::MAX_KEY_FILE_BYTES, true)
            .map_err(|e| format!("kafka.sasl_password_file {file}: cannot read: {e}"))?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.is_empty() {
            return Err(format!("kafka.sasl_password_file {file} is empty"));
        }
        self.sasl_password = text.to_owned();
        Ok(())
    }

    /// What must hold on this host before any client is made: the `ssl_*` files can be read
    /// and hold PEM, the key is not readable by every user, and SASL has a password (after
    /// `resolve_sasl_password`). Called by `Config::validate`, so `etask config --check` finds
    /// the same problems as `etask server`.
    ///
    /// # Errors
    /// The first problem, naming the key and the file.
    pub fn check_files(&self) -> Result<(), KafkaError> {
        self.check_files_text().map_err(KafkaError::Config)
    }

    /// `check_files` with its refusal as text.
    fn check_files_text(&self) -> Result<(), String> {
        self.check_security()?;
        for (key, path) in [
            ("ssl_ca", &self.ssl_ca),
            ("ssl_cert", &self.ssl_cert),
            ("ssl_key", &self.ssl_key),
        ] {
            if path.is_empty() {
                continue;
            }
            if key == "ssl_key" {
                refuse_world_readable("kafka.ssl_key", std::path::Path::new(path))?;
            }
            let text = crate::read_bounded(
                std::path::Path::new(path),
                crate::MAX_SMALL_FILE_BYTES,
                true,
            )
            .map_err(|e| format!("kafka.{key} {path}: cannot read: {e}"))?;
            if !text.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!(
                    "kafka.{key} {path}: not a PEM file (no -----BEGIN line)"
                ));
            }
        }
        if self
            .security_protocol
            .to_ascii_lowercase()
            .starts_with("sasl_")
            && self.sasl_password.is_empty()
        {
            return Err(format!(
                "kafka.security_protocol {} needs a password for kafka.sasl_username {:?}: set \
                 kafka.sasl_password_file (or sasl_password, or $ETASK_KAFKA_SASL_PASSWORD)",
                self.security_protocol.to_ascii_lowercase(),
                self.sasl_username
            ));
        }
        Ok(())
    }

    /// The operator's `kafka.client_options`, applied last so they win over ETask's choices.
    fn with_options(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.client_options {
            c.set(k, v);
        }
        c
    }

    /// A plain client (admin).
    pub fn client(&self, client_id: &str) -> ClientConfig {
        self.with_options(self.base(client_id))
    }

    /// A consumer of the control topic: partitions assigned by hand, nothing committed.
    pub fn control_consumer(&self, client_id: &str) -> ClientConfig {
        let mut c = self.base(client_id);
        c.set("group.id", format!("etask.control.{client_id}"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100");
        self.with_options(c)
    }

    /// A consumer that stores offsets only when told (`store_offset`) and commits what was
    /// stored every 500 ms (or, with `auto_commit` false, only when told): at-least-once, the
    /// commit never runs ahead of the work.
    pub fn consumer(&self, client_id: &str, group: &str, auto_commit: bool) -> ClientConfig {
        let mut c = self.base(client_id);
        c.set("group.id", group)
            .set("enable.auto.commit", auto_commit.to_string())
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            // A broker that lost its data (or a new topic) starts the group from the beginning.
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string())
            .set("fetch.error.backoff.ms", "100")
            // Bounded prefetch: paused agents hold little in memory. With a small prefetch
            // queue the default 1 s back-off after it filled would stall the pipeline.
            .set("queued.max.messages.kbytes", "4096")
            .set("queued.min.messages", "1000")
            .set("fetch.queue.backoff.ms", "10");
        self.with_options(c)
    }

    /// A producer; `timeout` = how long a message may wait for the brokers before it is given
    /// up (0 = never).
    pub fn producer(&self, client_id: &str, timeout: Duration) -> Result<Producer_, KafkaError> {
        self.producer_text(client_id, timeout)
            .map_err(KafkaError::Client)
    }

    /// `producer` with its refusal as text.
    fn producer_text(&self, client_id: &str, timeout: Duration) -> Result<Producer_, String> {
        self.producer_config(client_id, timeout)
            .create_with_context(Logged)
            .map_err(|e| format!("kafka producer for {}: {e}", self.brokers))
    }

    /// The settings of `producer`.
    pub fn producer_config(&self, client_id: &str, timeout: Duration) -> ClientConfig {
        let mut c = self.base(client_id);
        c.set("linger.ms", self.linger_ms.to_string())
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().to_string());
        self.with_options(c)
    }

    /// The security protocol in effect, for messages ("plaintext" when unset).
    pub fn protocol_name(&self) -> String {
        match self.security_protocol.to_ascii_lowercase() {
            p if p.is_empty() => "plaintext".into(),
            p => p,
        }
    }
}

pub type Producer_ = ThreadedProducer<Logged>;

/// Why a Kafka setting or client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// The `[kafka]` settings are refused (the message names the key): fix the config.
    #[error("{0}")]
    Config(String),
    /// librdkafka or the brokers failed: a client could not be made, a send or a metadata
    /// request failed or timed out (the message says which broker, topic and why).
    #[error("{0}")]
    Client(String),
}

impl From<KafkaError> for String {
    fn from(e: KafkaError) -> String {
        e.to_string()
    }
}

/// Logs messages the brokers did not take in time (what they took is acknowledged silently).
pub struct Logged;

impl ClientContext for Logged {}

impl ProducerContext for Logged {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = r {
            log::warn!(target: LOG, "message to {} (key {}) not delivered: {e}", m.topic(),
                m.key().map_or("none".into(), String::from_utf8_lossy));
        }
    }
}

/// One message from `consumer` within `wait`. Errors (brokers away, a topic re-created...) are
/// logged at most every 10 s as `what`: librdkafka reconnects by itself.
pub fn poll(
    consumer: &BaseConsumer,
    wait: Duration,
    what: &str,
    last_error: &mut std::time::Instant,
) -> Option<OwnedMessage> {
    match consumer.poll(wait)? {
        Ok(m) => Some(m.detach()),
        Err(e) => {
            if last_error.elapsed() > Duration::from_secs(10) {
                log::warn!(target: LOG, "{what}: {e}");
                *last_error = std::time::Instant::now();
            }
            None
        }
    }
}

/// Hands one message to the producer, waiting while its local queue is full.
pub fn send(p: &Producer_, topic: &str, key: &str, payload: &[u8]) -> Result<(), KafkaError> {
    send_text(p, topic, key, payload).map_err(KafkaError::Client)
}

/// `send` with its refusal as text.
fn send_text(p: &Producer_, topic: &str, key: &str, payload: &[u8]) -> Result<(), String> {
    let mut rec = BaseRecord::to(topic).key(key).payload(payload);
    for _ in 0..500 {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(format!("cannot produce to {topic}: {e}")),
        }
    }
    Err(format!(
        "cannot produce to {topic}: the local queue stayed full for 5 s"
    ))
}

/// Writes what could not be read to the dead-letter topic, with the reason; the caller then
/// moves past it.
pub fn dead_letter(p: &Producer_, cfg: &KafkaConfig, by: &str, m: &OwnedMessage, reason: &str) {
    let payload = m
        .payload()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(64 << 10)]).into_owned())
        .unwrap_or_default();
    log::warn!(target: LOG, "dead-lettering {}[{}]@{}: {reason}", m.topic(), m.partition(), m.offset());
    let dl = wire::DeadLetter {
        v: wire::VERSION,
        reason: reason.to_owned(),
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload,
        by: by.to_owned(),
        at: crate::now_ms(),
    };
    let body = serde_json::to_vec(&dl).unwrap_or_default();
    if let Err(e) = send(p, &cfg.dead_letter_topic, m.topic(), &body) {
        log::error!(target: LOG, "{e}");
    }
}

/// Which of `topics` the brokers have.
pub fn existing_topics(
    cfg: &KafkaConfig,
    p: &Producer_,
    topics: &[String],
) -> Result<HashSet<String>, KafkaError> {
    existing_topics_text(cfg, p, topics).map_err(KafkaError::Client)
}

/// `existing_topics` with its refusal as text.
fn existing_topics_text(
    cfg: &KafkaConfig,
    p: &Producer_,
    topics: &[String],
) -> Result<HashSet<String>, String> {
    let md = p
        .client()
        .fetch_metadata(None, Duration::from_secs(5))
        .map_err(|e| {
            format!(
                "kafka brokers {} unreachable over {}: {e} (check kafka.brokers, and that \
                 kafka.security_protocol and ssl_ca match the brokers' listener; librdkafka's \
                 lines above say more)",
                cfg.brokers,
                cfg.protocol_name()
            )
        })?;
    let have: HashSet<String> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_owned())
        .collect();
    Ok(topics
        .iter()
        .filter(|t| have.contains(*t))
        .cloned()
        .collect())
}

/// Makes sure `topics` exist: creates the missing ones when `cfg.create_topics`, otherwise
/// fails naming them.
pub fn ensure_topics(
    cfg: &KafkaConfig,
    p: &Producer_,
    topics: &[String],
) -> Result<(), KafkaError> {
    ensure_topics_text(cfg, p, topics).map_err(KafkaError::Client)
}

/// `ensure_topics` with its refusal as text.
fn ensure_topics_text(cfg: &KafkaConfig, p: &Producer_, topics: &[String]) -> Result<(), String> {
    let have = existing_topics(cfg, p, topics)?;
    let missing: Vec<&String> = topics.iter().filter(|t| !have.contains(*t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cfg.create_topics {
        return Err(format!(
            "kafka topics missing on {}: {} (create them, or set kafka.create_topics = true)",
            cfg.brokers,
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let admin: AdminClient<DefaultClientContext> = cfg
        .client("etask-admin")
        .create()
        .map_err(|e| format!("kafka admin client: {e}"))?;
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|t| NewTopic::new(t, cfg.partitions as i32, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = block_on(admin.create_topics(new.iter(), &opts))
        .map_err(|e| format!("cannot create kafka topics: {e}"))?;
    for r in results {
        match r {
            Ok(t) => log::info!(target: LOG, "created topic {t} ({} partitions)", cfg.partitions),
            Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                log::debug!(target: LOG, "topic {t} exists")
            }
            Err((t, e)) => return Err(format!("cannot create kafka topic {t}: {e}")),
        }
    }
    Ok(())
}

/// Refuses a secret file every user may read (mode `o+r`), as `etask keygen`'s keys are.
fn refuse_world_readable(key: &str, path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{key} {}: cannot read: {e}", path.display()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "{key} {} is readable by every user: chmod o-r it (e.g. 0640 root:etask)",
            path.display()
        ));
    }
    Ok(())
}

/// Waits for one future on this thread (the admin API's only interface is a future; this is
/// not an async runtime, just a park/unpark loop).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "pw-9f3e-never-shown";

    fn sasl_ssl(mechanism: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            security_protocol: "SASL_SSL".into(),
            sasl_mechanism: mechanism.into(),
            sasl_username: "etask".into(),
            sasl_password: PW.into(),
            ..KafkaConfig::default()
        }
    }

    /// Every client ETask makes, as librdkafka settings.
    fn every_client(k: &KafkaConfig) -> Vec<ClientConfig> {
        vec![
            k.client("id"),
            k.consumer("id", "g", false),
            k.control_consumer("id"),
            k.producer_config("id", Duration::from_secs(1)),
        ]
    }

    #[test]
    fn ssl_and_sasl_settings_reach_every_client_and_librdkafka_takes_them() {
        let mut k = sasl_ssl("scram-sha-512");
        k.ssl_ca = "/etc/etask/kafka-ca.pem".into();
        k.ssl_cert = "/etc/etask/kafka.pem".into();
        k.ssl_key = "/etc/etask/kafka.key".into();
        k.check_security().unwrap();
        for c in every_client(&k) {
            assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
            assert_eq!(c.get("sasl.username"), Some("etask"));
            assert_eq!(c.get("sasl.password"), Some(PW));
            assert_eq!(c.get("ssl.ca.location"), Some("/etc/etask/kafka-ca.pem"));
            assert_eq!(
                c.get("ssl.certificate.location"),
                Some("/etc/etask/kafka.pem")
            );
            assert_eq!(c.get("ssl.key.location"), Some("/etc/etask/kafka.key"));
        }
        // This build's librdkafka has OpenSSL and its built-in SASL: every mechanism over
        // every protocol makes a client (an unbuilt one fails client creation, e.g. "OpenSSL
        // not available at build time"). No CA = the system's CAs, probed.
        for proto in ["ssl", "sasl_plaintext", "sasl_ssl"] {
            for mech in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
                let mut k = sasl_ssl(mech);
                k.security_protocol = proto.into();
                if proto == "ssl" {
                    k.sasl_mechanism.clear();
                    k.sasl_username.clear();
                    k.sasl_password.clear();
                }
                k.check_security().unwrap();
                for c in every_client(&k) {
                    if proto.ends_with("ssl") {
                        assert_eq!(c.get("ssl.ca.location"), Some("probe"));
                    }
                    let made: Result<rdkafka::producer::BaseProducer, _> = c.create();
                    assert!(made.is_ok(), "{proto} {mech}: {:?}", made.err());
                }
            }
        }
        // Plaintext: no security setting is passed at all.
        for c in every_client(&KafkaConfig::default()) {
            for key in ["security.protocol", "sasl.password", "ssl.ca.location"] {
                assert_eq!(c.get(key), None, "{key}");
            }
        }
    }

    #[test]
    fn sasl_password_never_appears_in_debug_output_or_errors() {
        let mut k = sasl_ssl("PLAIN");
        k.client_options
            .insert("ssl.key.password".into(), PW.into());
        let shown = [
            format!("{k:?}"),
            format!(
                "{:?}",
                crate::config::Config {
                    kafka: k.clone(),
                    ..Default::default()
                }
            ),
            format!("{:?}", k.client("id")),
            format!("{:?}", k.producer_config("id", Duration::from_secs(1))),
        ];
        for s in &shown {
            assert!(!s.contains(PW), "password shown: {s}");
        }
        assert!(shown[0].contains("******"));
        // Errors about the SASL keys name them, never the password.
        let mut bad = k.clone();
        bad.sasl_username.clear();
        bad.ssl_ca = "/nonexistent/ca.pem".into();
        for e in [bad.check_security(), {
            bad.sasl_username = "u".into();
            bad.check_files()
        }] {
            let e = e.unwrap_err().to_string();
            assert!(!e.contains(PW), "{e}");
        }
        bad.sasl_password_file = "/nonexistent".into();
        assert!(!bad.check_security().unwrap_err().to_string().contains(PW));
        // A client whose creation fails says why without the password.
        let mut wrong = k.clone();
        wrong.ssl_ca = "/nonexistent/ca.pem".into();
        let made: Result<rdkafka::producer::BaseProducer, _> = wrong.client("id").create();
        assert!(!made.err().unwrap().to_string().contains(PW));
    }

    #[test]
    fn bad_security_settings_are_refused_naming_the_key() {
        let refused = |k: KafkaConfig, needle: &str| {
            let e = k
                .check_security()
                .and_then(|_| k.check_files())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        let plain = KafkaConfig::default();
        refused(
            KafkaConfig {
                security_protocol: "tls".into(),
                ..plain.clone()
            },
            "security_protocol \"tls\"",
        );
        refused(sasl_ssl("GSSAPI"), "sasl_mechanism \"GSSAPI\"");
        refused(sasl_ssl(""), "sasl_mechanism");
        refused(
            KafkaConfig {
                sasl_username: String::new(),
                ..sasl_ssl("PLAIN")
            },
            "needs kafka.sasl_username",
        );
        refused(
            KafkaConfig {
                sasl_password: String::new(),
                ..sasl_ssl("PLAIN")
            },
            "needs a password",
        );
        refused(
            KafkaConfig {
                sasl_username: "u".into(),
                ..plain.clone()
            },
            "kafka.sasl_username is set but",
        );
        refused(
            KafkaConfig {
                ssl_ca: "/ca.pem".into(),
                ..plain.clone()
            },
            "kafka.ssl_ca is set but",
        );
        refused(
            KafkaConfig {
                sasl_password_file: "/pw".into(),
                ..sasl_ssl("PLAIN")
            },
            "both set",
        );
        refused(
            KafkaConfig {
                ssl_cert: "/c.pem".into(),
                ..sasl_ssl("PLAIN")
            },
            "ssl_cert and kafka.ssl_key",
        );
        refused(
            KafkaConfig {
                ssl_ca: "/nonexistent/ca.pem".into(),
                ..sasl_ssl("PLAIN")
            },
            "kafka.ssl_ca /nonexistent/ca.pem: cannot read",
        );
        let dir = std::env::temp_dir().join(format!("etask-kafka-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        refused(
            KafkaConfig {
                ssl_ca: not_pem.display().to_string(),
                ..sasl_ssl("PLAIN")
            },
            "not a PEM file",
        );
        let key = dir.join("client.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        set_mode(&key, 0o644);
        refused(
            KafkaConfig {
                ssl_cert: key.display().to_string(),
                ssl_key: key.display().to_string(),
                ..sasl_ssl("PLAIN")
            },
            "readable by every user",
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn set_mode(p: &std::path::Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn sasl_password_comes_from_the_environment_then_the_file_then_the_config() {
        let dir = std::env::temp_dir().join(format!("etask-kafka-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kafka.pw");
        std::fs::write(&file, "from-file\n").unwrap();
        set_mode(&file, 0o640);
        let with_file = KafkaConfig {
            sasl_password: String::new(),
            sasl_password_file: file.display().to_string(),
            ..sasl_ssl("PLAIN")
        };
        let mut k = with_file.clone();
        k.resolve_sasl_password(None).unwrap();
        assert_eq!(k.sasl_password, "from-file");
        assert!(k.sasl_password_file.is_empty());
        k.check_files().unwrap();
        let mut k = with_file.clone();
        k.resolve_sasl_password(Some("from-env".into())).unwrap();
        assert_eq!(k.sasl_password, "from-env");
        let mut k = sasl_ssl("PLAIN");
        k.resolve_sasl_password(Some(String::new())).unwrap();
        assert_eq!(k.sasl_password, PW);
        set_mode(&file, 0o644);
        let e = with_file
            .clone()
            .resolve_sasl_password(None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("readable by every user"), "{e}");
        set_mode(&file, 0o600);
        std::fs::write(&file, "\n").unwrap();
        let e = with_file
            .clone()
            .resolve_sasl_password(None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn operator_client_options_win_over_etask_settings() {
        let mut k = KafkaConfig::default();
        k.client_options
            .insert("fetch.wait.max.ms".into(), "50".into());
        k.client_options
            .insert("security.protocol".into(), "plaintext".into());
        let c = k.consumer("id", "group", false);
        assert_eq!(c.get("fetch.wait.max.ms"), Some("50"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            k.control_consumer("id").get("fetch.wait.max.ms"),
            Some("50")
        );
        assert_eq!(k.client("id").get("security.protocol"), Some("plaintext"));
    }
}
