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
    /// security settings (TLS, SASL).
    fn base(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id)
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set("log_level", "4");
        let mut set = |k: &str, v: &str| {
            if !v.is_empty() {
                c.set(k, v);
            }
        };
        set("security.protocol", &self.security_protocol);
        set("sasl.mechanism", &self.sasl_mechanism);
        set("sasl.username", &self.sasl_username);
        let password = std::env::var("ETASK_KAFKA_SASL_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| self.sasl_password.clone());
        set("sasl.password", &password);
        set("ssl.ca.location", &self.ssl_ca);
        set("ssl.certificate.location", &self.ssl_cert);
        set("ssl.key.location", &self.ssl_key);
        c
    }

    /// Checks the `[kafka]` security keys: known values, keys that go together.
    ///
    /// # Errors
    /// The first problem, naming the key.
    pub fn check_security(&self) -> Result<(), String> {
        let proto = self.security_protocol.to_ascii_lowercase();
        if !["", "plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&proto.as_str()) {
            return Err(format!(
                "kafka.security_protocol {:?}: use plaintext, ssl, sasl_plaintext or sasl_ssl",
                self.security_protocol
            ));
        }
        let sasl = proto.starts_with("sasl_");
        if sasl
            && !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&self.sasl_mechanism.as_str())
        {
            return Err(format!(
                "kafka.sasl_mechanism {:?}: use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with {}",
                self.sasl_mechanism, proto
            ));
        }
        if !sasl && (!self.sasl_mechanism.is_empty() || !self.sasl_username.is_empty()) {
            return Err(
                "kafka.sasl_* keys need security_protocol sasl_plaintext or sasl_ssl".into(),
            );
        }
        if self.ssl_cert.is_empty() != self.ssl_key.is_empty() {
            return Err("kafka.ssl_cert and kafka.ssl_key must be set together".into());
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
    pub fn producer(&self, client_id: &str, timeout: Duration) -> Result<Producer_, String> {
        let mut c = self.base(client_id);
        c.set("linger.ms", self.linger_ms.to_string())
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().to_string());
        self.with_options(c)
            .create_with_context(Logged)
            .map_err(|e| format!("kafka producer for {}: {e}", self.brokers))
    }
}

pub type Producer_ = ThreadedProducer<Logged>;

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
pub fn send(p: &Producer_, topic: &str, key: &str, payload: &[u8]) -> Result<(), String> {
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
) -> Result<HashSet<String>, String> {
    let md = p
        .client()
        .fetch_metadata(None, Duration::from_secs(5))
        .map_err(|e| format!("kafka brokers {} unreachable: {e}", cfg.brokers))?;
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
pub fn ensure_topics(cfg: &KafkaConfig, p: &Producer_, topics: &[String]) -> Result<(), String> {
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

    #[test]
    fn ssl_and_sasl_settings_reach_librdkafka() {
        let mut k = KafkaConfig {
            security_protocol: "sasl_ssl".into(),
            sasl_mechanism: "SCRAM-SHA-512".into(),
            sasl_username: "etask".into(),
            sasl_password: "pw-from-file".into(),
            ssl_ca: "/etc/etask/kafka-ca.pem".into(),
            ssl_cert: "/etc/etask/kafka.pem".into(),
            ssl_key: "/etc/etask/kafka.key".into(),
            ..KafkaConfig::default()
        };
        k.check_security().unwrap();
        for c in [
            k.client("id"),
            k.consumer("id", "g", false),
            k.control_consumer("id"),
        ] {
            assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
            assert_eq!(c.get("sasl.username"), Some("etask"));
            assert_eq!(c.get("ssl.ca.location"), Some("/etc/etask/kafka-ca.pem"));
            assert_eq!(
                c.get("ssl.certificate.location"),
                Some("/etc/etask/kafka.pem")
            );
            assert_eq!(c.get("ssl.key.location"), Some("/etc/etask/kafka.key"));
        }
        // librdkafka itself takes SASL PLAIN (an unknown or unbuilt property fails client
        // creation). SSL and SCRAM need librdkafka built with OpenSSL (rdkafka's ssl-vendored
        // feature, not enabled: README "Kafka agents"), and say so when the client is made.
        let plain = KafkaConfig {
            security_protocol: "sasl_plaintext".into(),
            sasl_mechanism: "PLAIN".into(),
            sasl_username: "etask".into(),
            sasl_password: "pw".into(),
            ..KafkaConfig::default()
        };
        plain.check_security().unwrap();
        let made: Result<rdkafka::producer::BaseProducer, _> = plain.client("id").create();
        assert!(made.is_ok(), "{:?}", made.err());
        k.ssl_ca = String::new();
        let made: Result<rdkafka::producer::BaseProducer, _> = k.client("id").create();
        if let Err(e) = made {
            assert!(
                e.to_string().contains("OpenSSL") || e.to_string().contains("ssl"),
                "{e}"
            );
        }
        assert!(KafkaConfig {
            security_protocol: "tls".into(),
            ..KafkaConfig::default()
        }
        .check_security()
        .is_err());
        assert!(KafkaConfig {
            security_protocol: "sasl_plaintext".into(),
            sasl_mechanism: "GSSAPI".into(),
            ..KafkaConfig::default()
        }
        .check_security()
        .is_err());
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
