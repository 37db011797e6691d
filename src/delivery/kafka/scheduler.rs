//! The Kafka path, scheduler side: `KafkaDelivery` produces each claimed attempt to its pool's
//! dispatch topic and cancels to the control topic; its `kafka-events` thread consumes the
//! events topic (group `etask.scheduler`, shared by all schedulers), hands the reports to the
//! scheduler core, and only then stores the offsets: an event is never acknowledged before the
//! store has it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};

use super::wire::{self, EventBody, EventMsg};
use super::{dead_letter, ensure_topics, existing_topics, poll, send, Producer_, LOG};
use crate::config::KafkaConfig;
use crate::delivery::{Delivery, Dispatch, Refused, ReportSink};
use crate::model::{Attempt, DeliveryPath, ExecutionId};
use crate::runner::RunEvent;

/// Consumer group of the schedulers on the events topic.
pub const SCHEDULER_GROUP: &str = "etask.scheduler";

pub struct KafkaDelivery {
    cfg: KafkaConfig,
    id: String,
    producer: Producer_,
    /// Dispatch topics known to exist.
    topics: Mutex<HashSet<String>>,
    /// Pools whose topic an agent's heartbeat asked for and that could not be created, with
    /// when that was last tried (retried every 10 s, said once).
    topic_waits: Mutex<HashMap<String, Instant>>,
    /// Attempts in a dispatch topic that no agent has reported started yet (bounded by
    /// `kafka.max_queued`; entries older than the dispatch TTL are dropped: the sweeper
    /// re-dispatches those).
    queued: Mutex<HashMap<(ExecutionId, Attempt), Instant>>,
    sink: OnceLock<Arc<dyn ReportSink>>,
    /// Signs dispatches (for any agent of the pool) and cancels.
    signer: Arc<crate::trust::Signer>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl KafkaDelivery {
    /// Connects, checks (or creates) the topics and starts consuming events; reports are held
    /// until `attach` names where they go.
    pub fn start(
        cfg: &KafkaConfig,
        signer: Arc<crate::trust::Signer>,
    ) -> Result<Arc<KafkaDelivery>, super::KafkaError> {
        Self::start_text(cfg, signer).map_err(super::KafkaError::Client)
    }

    /// `start` with its refusal as text.
    fn start_text(
        cfg: &KafkaConfig,
        signer: Arc<crate::trust::Signer>,
    ) -> Result<Arc<KafkaDelivery>, String> {
        let id = format!("etask-scheduler-{}", crate::host_pid());
        let producer = cfg.producer(&id, Duration::from_secs(cfg.dispatch_ttl_seconds))?;
        let mut topics = vec![
            cfg.events_topic.clone(),
            cfg.control_topic.clone(),
            cfg.dead_letter_topic.clone(),
        ];
        topics.extend(cfg.pools.iter().map(|p| cfg.dispatch_topic(p)));
        ensure_topics(cfg, &producer, &topics)?;
        let consumer: BaseConsumer = cfg
            .consumer(&id, SCHEDULER_GROUP, true)
            .create()
            .map_err(|e| format!("kafka consumer: {e}"))?;
        consumer
            .subscribe(&[&cfg.events_topic])
            .map_err(|e| format!("cannot subscribe to {}: {e}", cfg.events_topic))?;
        let d = Arc::new(KafkaDelivery {
            cfg: cfg.clone(),
            id,
            producer,
            topics: Mutex::new(topics.into_iter().collect()),
            topic_waits: Mutex::new(HashMap::new()),
            queued: Mutex::new(HashMap::new()),
            sink: OnceLock::new(),
            signer,
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let d2 = d.clone();
        // Restarted if it panics: no event on the topic can stop the scheduler's ingest.
        let (health, d3) = (Arc::new(crate::supervise::Health::default()), d.clone());
        let t = crate::supervise::spawn(
            &health,
            "kafka-events",
            move || d3.stop.load(Ordering::SeqCst),
            move || d2.consume(&consumer),
        )
        .map_err(|e| e.to_string())?;
        *d.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        log::info!(target: LOG, "scheduler on kafka {}: consuming {}", cfg.brokers, cfg.events_topic);
        Ok(d)
    }

    /// Where events go (the scheduler core), once it exists.
    pub fn attach(&self, sink: Arc<dyn ReportSink>) {
        let _ = self.sink.set(sink);
    }

    /// Stops consuming (what was not stored yet is read again by the next scheduler) and
    /// flushes what is still being produced.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        use rdkafka::producer::Producer;
        let _ = self.producer.flush(Duration::from_secs(5));
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.cfg.dispatch_ttl_seconds)
    }

    fn lock_queued(&self) -> std::sync::MutexGuard<'_, HashMap<(ExecutionId, Attempt), Instant>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn consume(&self, consumer: &BaseConsumer) {
        let sink = loop {
            if let Some(s) = self.sink.get() {
                break s.clone();
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut last_error = Instant::now() - Duration::from_secs(60);
        while !self.stop.load(Ordering::SeqCst) {
            let mut batch: Vec<OwnedMessage> = Vec::new();
            let mut wait = Duration::from_millis(100);
            while batch.len() < 512 {
                match poll(consumer, wait, "events consumer", &mut last_error) {
                    Some(m) => batch.push(m),
                    None => break,
                }
                wait = Duration::ZERO;
            }
            if batch.is_empty() {
                continue;
            }
            if !self.apply(sink.as_ref(), &batch) {
                return; // stopping with reports not stored: they are read again later
            }
            for m in &batch {
                if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
                    log::warn!(target: LOG, "cannot store offset {}[{}]@{}: {e}", m.topic(), m.partition(), m.offset());
                }
            }
        }
    }

    /// One batch of events into the store, in order per agent (and so per execution). False
    /// when it stopped before the store had all of it.
    fn apply(&self, sink: &dyn ReportSink, batch: &[OwnedMessage]) -> bool {
        let mut reports: Vec<(String, Vec<RunEvent>)> = Vec::new();
        let mut later: Vec<EventMsg> = Vec::new();
        for m in batch {
            let ev: EventMsg = match wire::parse(m.payload()) {
                Ok(ev) => ev,
                Err(why) => {
                    dead_letter(&self.producer, &self.cfg, &self.id, m, &why.0);
                    continue;
                }
            };
            let key = (ExecutionId(ev.execution_id), Attempt(ev.attempt));
            if matches!(
                ev.body,
                EventBody::Started { .. } | EventBody::Finished { .. }
            ) {
                self.lock_queued().remove(&key);
            }
            let Some(run) = ev.to_run_event() else {
                later.push(ev);
                continue;
            };
            match reports.iter_mut().find(|(a, _)| *a == ev.agent) {
                Some((_, list)) => list.push(run),
                None => reports.push((ev.agent.clone(), vec![run])),
            }
        }
        for (agent, events) in reports {
            // The offsets are stored only after this: keep trying while the store is away.
            let mut backoff = Duration::from_millis(200);
            while let Err(e) = sink.apply(&agent, &events) {
                if self.stop.load(Ordering::SeqCst) {
                    return false;
                }
                log::warn!(target: LOG, "{} events of {agent} not stored yet ({e}); retrying", events.len());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        for ev in later {
            match ev.body {
                EventBody::Heartbeat { running, pool, .. } => {
                    self.topic_for_agent(&ev.agent, &pool);
                    let running: Vec<(ExecutionId, Attempt)> = running
                        .into_iter()
                        .map(|(e, a)| (ExecutionId(e), Attempt(a)))
                        .collect();
                    sink.alive(&ev.agent, &running);
                }
                EventBody::NotStarted { reason } => {
                    let key = (ExecutionId(ev.execution_id), Attempt(ev.attempt));
                    self.lock_queued().remove(&key);
                    sink.not_started(&ev.agent, key.0, key.1, &reason);
                }
                _ => {}
            }
        }
        true
    }

    /// An agent of `pool` is up: its dispatch topic is created now, not at the pool's first
    /// dispatch, so the agent has joined its group when the first task comes (the agent
    /// waits for the topic before it subscribes).
    fn topic_for_agent(&self, agent: &str, pool: &str) {
        // Anyone who can write to the events topic can name a pool here: only a plain name
        // makes a topic (a heartbeat's pool with a newline created a topic and forged a line
        // of this log).
        if !crate::model::is_plain_name(pool) {
            log::warn!(target: LOG, "agent={:?} names pool {:?}: not a plain name (letters, digits, '-', '_', '.'); no topic made",
                agent, pool);
            return;
        }
        let topic = self.cfg.dispatch_topic(pool);
        if self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&topic)
        {
            return;
        }
        let mut waits = self.topic_waits.lock().unwrap_or_else(|p| p.into_inner());
        let first = !waits.contains_key(pool);
        if waits
            .get(pool)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        waits.insert(pool.to_owned(), Instant::now());
        drop(waits);
        match self.topic_for(pool) {
            Ok(_) => {
                self.topic_waits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(pool);
            }
            Err(Refused::Rejected(why) | Refused::Busy(why)) if first => {
                log::warn!(target: LOG, "agent={agent} pool={pool} waits for its topic: {why}")
            }
            Err(_) => {}
        }
    }

    /// The dispatch topic of `pool`, checked (and created when allowed) on first use.
    fn topic_for(&self, pool: &str) -> Result<String, Refused> {
        let topic = self.cfg.dispatch_topic(pool);
        if self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&topic)
        {
            return Ok(topic);
        }
        let want = [topic.clone()];
        let have = existing_topics(&self.cfg, &self.producer, &want)
            .map_err(|e| Refused::Busy(e.to_string()))?;
        if have.is_empty() && !self.cfg.create_topics {
            return Err(Refused::Rejected(format!(
                "kafka topic {topic} of pool {pool:?} does not exist (and kafka.create_topics is false)"
            )));
        }
        ensure_topics(&self.cfg, &self.producer, &want)
            .map_err(|e| Refused::Busy(e.to_string()))?;
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.clone());
        Ok(topic)
    }
}

impl Delivery for KafkaDelivery {
    fn path(&self) -> DeliveryPath {
        DeliveryPath::Agent
    }

    /// Claims are recorded under this placeholder (the path's name) until an agent reports it
    /// started the attempt (then under the agent's id).
    fn node(&self) -> &str {
        DeliveryPath::Agent.as_str()
    }

    fn free_slots(&self) -> usize {
        let ttl = self.ttl();
        let mut q = self.lock_queued();
        q.retain(|_, at| at.elapsed() < ttl);
        self.cfg.max_queued.saturating_sub(q.len())
    }

    fn load(&self) -> (u32, u32) {
        (self.lock_queued().len() as u32, self.cfg.max_queued as u32)
    }

    fn dispatch(&self, mut d: Dispatch, _placed: &dyn Fn(&str)) -> Result<(), Refused> {
        let pool = d.pool.clone().unwrap_or_else(|| "default".into());
        let topic = self.topic_for(&pool)?;
        let ttl = self.ttl().as_millis() as i64;
        // Any agent of the pool may take it (the consumer group picks): bound to the pool only.
        d.sign(&self.signer, None, ttl);
        let msg = wire::DispatchMsg::new(&d, &pool, crate::now_ms(), ttl);
        let body = serde_json::to_vec(&msg).map_err(|e| Refused::Rejected(e.to_string()))?;
        send(&self.producer, &topic, &d.execution_id.to_string(), &body)
            .map_err(|e| Refused::Busy(e.to_string()))?;
        self.lock_queued()
            .insert((d.execution_id, d.attempt), Instant::now());
        Ok(())
    }

    fn cancel(&self, id: ExecutionId, attempt: Attempt) {
        // Every agent reads the control topic and ignores attempts it does not hold.
        let ttl = (self.cfg.dispatch_ttl_seconds as i64 + 5) * 1000;
        let st = self
            .signer
            .stamp_cancel(id.0, attempt.0, None, crate::now_ms(), ttl);
        let msg = wire::ControlMsg {
            v: wire::VERSION,
            kind: "cancel".into(),
            execution_id: id.0,
            attempt: attempt.0,
            issued_at: st.issued_at,
            expires_at: st.expires_at,
            sig: st.sig,
        };
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        if let Err(e) = send(
            &self.producer,
            &self.cfg.control_topic,
            &id.to_string(),
            &body,
        ) {
            log::warn!(target: LOG, "execution={id} attempt={attempt} cancel not published: {e}");
        }
        self.lock_queued().remove(&(id, attempt));
    }

    fn unstarted_after(&self) -> Option<Duration> {
        // Past its expiry no agent starts the dispatch; the margin covers clock skew.
        Some(self.ttl() + Duration::from_secs(5))
    }
}
