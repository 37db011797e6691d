//! `etask server --mode agent`: a node for zones that allow only outbound connections. It
//! consumes its pool's dispatch topic (one consumer group per pool), runs each dispatch in the
//! process pool, and publishes logs, outcomes and heartbeats to the events topic; cancels come
//! from the control topic. It opens no listening socket.
//!
//! At least once, never twice: a dispatch's offset is stored (and so committed) only after the
//! attempt is written to the local spool and handed to the pool; a dispatch delivered again
//! whose attempt is in the spool is not run again. When the pool is full, consumption pauses.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, KafkaConfig};
use crate::delivery::kafka::wire::{self, ControlMsg, DispatchMsg, EventBody, EventMsg};
use crate::delivery::kafka::{dead_letter, existing_topics, poll, send, Producer_};
use crate::model::{Attempt, ExecutionId};
use crate::node::spool::{Spool, Taken};
use crate::registry::{NodeInfo, Registration};
use crate::runner::{Ending, Outcome, Pool, RunEvent, RunKey, SubmitError};
use crate::shutdown::Shutdown;
use crate::trust::{NodeTrust, Refusal};

const LOG: &str = "etask::agent";

struct Agent {
    id: String,
    pool_name: String,
    cfg: KafkaConfig,
    pool: Pool,
    producer: Producer_,
    events: Sender<RunEvent>,
    /// Attempts taken and not finished yet (what the heartbeat lists).
    held: Mutex<HashSet<RunKey>>,
    /// Cancels of attempts this agent has not seen yet: a later dispatch of them is not run.
    tombstones: Mutex<HashMap<RunKey, Instant>>,
    spool: Mutex<Spool>,
    /// Whom dispatches and cancels must come from, who this agent is, its pool keys.
    trust: NodeTrust,
    /// Triggered on SIGTERM: take no more dispatches (running ones finish and are reported).
    draining: Shutdown,
    /// Triggered when everything ends.
    stop: Shutdown,
}

impl Agent {
    /// Attempts taken and not finished yet.
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<RunKey>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn draining(&self) -> bool {
        self.draining.is_triggered() || self.stopping()
    }

    fn stopping(&self) -> bool {
        self.stop.is_triggered()
    }

    fn publish(&self, key: &str, msg: &EventMsg) {
        let body = serde_json::to_vec(msg).unwrap_or_default();
        if let Err(e) = send(&self.producer, &self.cfg.events_topic, key, &body) {
            log::error!(target: LOG, "event not published: {e}");
        }
    }

    fn publish_event(&self, ev: &RunEvent) {
        let m = EventMsg::from_run_event(&self.id, ev);
        self.publish(&ev.key().execution.to_string(), &m);
    }

    fn not_started(&self, key: RunKey, reason: String) {
        log::warn!(target: LOG, "execution={} attempt={} not started: {reason}", key.execution, key.attempt);
        let m = EventMsg {
            v: wire::VERSION,
            agent: self.id.clone(),
            execution_id: key.execution.0,
            attempt: key.attempt.0,
            body: EventBody::NotStarted { reason },
        };
        self.publish(&key.execution.to_string(), &m);
    }

    fn heartbeat(&self) {
        let running: Vec<(i64, u32)> = self
            .held()
            .iter()
            .map(|k| (k.execution.0, k.attempt.0))
            .collect();
        let m = EventMsg {
            v: wire::VERSION,
            agent: self.id.clone(),
            execution_id: 0,
            attempt: 0,
            body: EventBody::Heartbeat {
                pool: self.pool_name.clone(),
                capacity: self.pool.max_concurrent() as u32,
                running,
            },
        };
        self.publish(&self.id, &m);
    }

    /// One dispatch message: run it, or say why not. Returns Err only when the spool cannot be
    /// written (the agent then stops rather than run work it cannot account for).
    fn take(&self, m: &OwnedMessage) -> Result<(), String> {
        let d: DispatchMsg = match wire::parse(m.payload()) {
            Ok(d) => d,
            Err(why) => {
                dead_letter(&self.producer, &self.cfg, &self.id, m, &why.0);
                return Ok(());
            }
        };
        let key = RunKey {
            execution: ExecutionId(d.execution_id),
            attempt: Attempt(d.attempt),
        };
        let mut dispatch = d.clone().into_dispatch();
        // Before anything else (and before the spool: a forged copy must not make the real
        // dispatch look like a replay). An authentic dispatch that expired is handled below.
        match dispatch.verify_and_open(&self.trust.verifier, &self.trust.me, &self.trust.open) {
            Ok(()) | Err(Refusal::Expired(_)) => {}
            Err(r) => {
                log::warn!(target: LOG, "execution={} attempt={} refused: {r}", key.execution, key.attempt);
                dead_letter(&self.producer, &self.cfg, &self.id, m, &r.to_string());
                self.not_started(key, r.to_string());
                return Ok(());
            }
        }
        if d.pool != self.pool_name {
            let why = format!(
                "dispatch for pool {:?} on the topic of pool {:?}",
                d.pool, self.pool_name
            );
            dead_letter(&self.producer, &self.cfg, &self.id, m, &why);
            return Ok(());
        }
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = spool.get(key.execution, key.attempt) {
            log::info!(target: LOG, "execution={} attempt={} delivered again ({} here before): not run twice", key.execution, key.attempt,
                match t { Taken::Started => "started", Taken::Finished => "finished" });
            if self.trust.verifier.verifies() {
                // A redelivery (rebalance) or a replayed record: not reported (the attempt is
                // this agent's), but kept where an operator looks for refused messages.
                let r = Refusal::Replay(d.execution_id, d.attempt);
                dead_letter(&self.producer, &self.cfg, &self.id, m, &r.to_string());
            }
            return Ok(());
        }
        let now = crate::now_ms();
        if d.expires_at < now {
            spool.record(key.execution, key.attempt, Taken::Finished)?;
            drop(spool);
            self.not_started(
                key,
                format!(
                    "dispatch expired {} ms before it was read (issued at {}, expires at {})",
                    now - d.expires_at,
                    d.issued_at,
                    d.expires_at
                ),
            );
            return Ok(());
        }
        spool.record(key.execution, key.attempt, Taken::Started)?;
        self.held().insert(key);
        let cancelled = self
            .tombstones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key);
        if cancelled {
            log::info!(target: LOG, "execution={} attempt={} was cancelled before it arrived", key.execution, key.attempt);
            self.held().remove(&key);
            return Ok(spool.record(key.execution, key.attempt, Taken::Finished)?);
        }
        drop(spool);
        log::info!(target: LOG, "execution={} attempt={} taken", key.execution, key.attempt);
        match self
            .pool
            .submit(dispatch.into_run_request(), self.events.clone())
        {
            Ok(()) => {}
            Err(SubmitError::Invalid(e)) => {
                // Reported like a run that could not start: the scheduler fails the attempt.
                let outcome =
                    Outcome::not_started(Ending::SpawnFailed(format!("invalid program: {e}")));
                let _ = self.events.send(RunEvent::Finished { key, outcome });
            }
            Err(e) => {
                self.held().remove(&key);
                self.not_started(key, e.to_string());
            }
        }
        Ok(())
    }

    /// A cancel: a tombstone first (so a dispatch not taken yet is refused), then the run if it
    /// is held. `take` does the opposite order (held, then the tombstone check), so a cancel
    /// racing with the take is seen by one of the two.
    fn cancel(&self, key: RunKey) {
        {
            let ttl = Duration::from_secs(self.cfg.dispatch_ttl_seconds + 5);
            let mut t = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
            t.retain(|_, at| at.elapsed() < ttl);
            t.insert(key, Instant::now());
        }
        let held = self.held().contains(&key);
        if held {
            log::info!(target: LOG, "execution={} attempt={} cancel", key.execution, key.attempt);
            self.pool.cancel(key);
        }
    }
}

/// Consumes the dispatch topic: takes messages while the pool has a free slot. While the pool
/// is full it stops polling, so fetched messages stay in librdkafka's bounded prefetch queue;
/// when it stays full for over a second (long scripts) the assigned partitions are paused, so
/// the consumer can keep polling (and stay in its group) without taking anything.
/// Subscribes to the pool's dispatch topic once it exists. Subscribing to a missing topic
/// makes librdkafka log errors and see the topic only at its next metadata refresh (10 s):
/// the pool's first task would wait that long. Heartbeats go on meanwhile (the events
/// thread), and they are what makes the scheduler create the topic.
fn wait_for_topic(a: &Agent, consumer: &BaseConsumer) -> Result<(), String> {
    let topic = a.cfg.dispatch_topic(&a.pool_name);
    let want = [topic.clone()];
    while !a.draining() {
        match existing_topics(&a.cfg, &a.producer, &want) {
            Ok(have) if have.contains(&topic) => break,
            Ok(_) => {}
            Err(e) => log::debug!(target: LOG, "{e}"),
        }
        a.draining.sleep(Duration::from_millis(200));
    }
    consumer
        .subscribe(&[&topic])
        .map_err(|e| format!("cannot subscribe to {topic}: {e}"))
}

fn dispatch_loop(a: &Agent, consumer: &BaseConsumer) -> Result<(), String> {
    const PAUSE_AFTER: Duration = Duration::from_secs(1);
    let cap = a.pool.max_concurrent();
    let free = |a: &Agent| a.pool.in_flight() < cap;
    let mut waiting: VecDeque<OwnedMessage> = VecDeque::new();
    let mut paused = false;
    let mut full_since: Option<Instant> = None;
    let mut last_error = Instant::now() - Duration::from_secs(60);
    let mut uncommitted: HashMap<(String, i32), i64> = HashMap::new();
    while !a.draining() {
        while free(a) {
            let Some(m) = waiting.pop_front() else { break };
            take(a, &m, &mut uncommitted)?;
        }
        if !uncommitted.is_empty() {
            commit(consumer, &mut uncommitted);
        }
        let full = !free(a);
        full_since = if full {
            full_since.or(Some(Instant::now()))
        } else {
            None
        };
        let want_pause = full_since.is_some_and(|t| t.elapsed() >= PAUSE_AFTER);
        if want_pause != paused {
            // After a rebalance new partitions are not paused: `paused` is reset below when a
            // message still arrives, so they are paused too.
            let parts = consumer.assignment().unwrap_or_default();
            let r = if want_pause {
                consumer.pause(&parts)
            } else {
                consumer.resume(&parts)
            };
            if let Err(e) = r {
                log::debug!(target: LOG, "pause/resume: {e}");
            }
            paused = want_pause;
        }
        if full && !paused {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let mut wait = if full {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(100)
        };
        while let Some(m) = poll(consumer, wait, "dispatch consumer", &mut last_error) {
            if waiting.is_empty() && free(a) {
                take(a, &m, &mut uncommitted)?;
                wait = Duration::ZERO;
            } else {
                waiting.push_back(m);
                paused = false;
                break;
            }
        }
    }
    Ok(())
}

/// Takes one dispatch and notes its offset for the next commit.
fn take(
    a: &Agent,
    m: &OwnedMessage,
    uncommitted: &mut HashMap<(String, i32), i64>,
) -> Result<(), String> {
    a.take(m)?;
    uncommitted.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
    Ok(())
}

/// Dispatches were taken: commit their offsets now (asynchronously: sent at once, without
/// waiting for the coordinator's answer), so that a rebalance — e.g. this agent being killed —
/// does not hand them to another agent that would run them again. A commit that cannot be
/// sent (brokers away) is retried on the next pass; one the coordinator refuses is superseded
/// by the next commit of that partition.
fn commit(consumer: &BaseConsumer, uncommitted: &mut HashMap<(String, i32), i64>) {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in uncommitted.iter() {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
    }
    match consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
        Ok(()) => uncommitted.clear(),
        Err(e) => log::debug!(target: LOG, "offset commit failed ({e}); retrying"),
    }
}

/// Publishes the pool's events in order, and a heartbeat every `every`.
fn events_loop(a: &Agent, rx: &Receiver<RunEvent>, every: Duration) {
    let mut next_beat = Instant::now();
    loop {
        if Instant::now() >= next_beat {
            a.heartbeat();
            next_beat = Instant::now() + every;
        }
        let wait = next_beat.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(rx) -> ev => match ev {
                Ok(ev) => event(a, &ev),
                Err(_) => return, // every sender is gone
            },
            recv(a.stop.channel()) -> _ => {
                // What the pool reported last still goes out before the producer is flushed.
                while let Ok(ev) = rx.try_recv() {
                    event(a, &ev);
                }
                return;
            }
            default(wait) => {}
        }
    }
}

/// One pool event: published, and a finished attempt let go of.
fn event(a: &Agent, ev: &RunEvent) {
    a.publish_event(ev);
    if let RunEvent::Finished { key, outcome } = ev {
        log::info!(target: LOG, "execution={} attempt={} {}", key.execution, key.attempt, outcome.status());
        a.held().remove(key);
        let mut s = a.spool.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = s.record(key.execution, key.attempt, Taken::Finished) {
            log::warn!(target: LOG, "{e}");
        }
    }
}

/// Reads every cancel on the control topic (all partitions, assigned by hand: every agent
/// sees all of them). Cancels older than the dispatch TTL are skipped: their dispatches can
/// no longer start.
fn control_loop(a: &Agent, consumer: &BaseConsumer) {
    let topic = a.cfg.control_topic.clone();
    let mut assigned = false;
    let mut last_error = Instant::now() - Duration::from_secs(60);
    while !a.stopping() {
        if !assigned {
            match consumer.fetch_metadata(Some(&topic), Duration::from_secs(3)) {
                Ok(md) => {
                    let parts = md
                        .topics()
                        .iter()
                        .filter(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                        .next()
                        .unwrap_or(0);
                    if parts > 0 {
                        let mut tpl = TopicPartitionList::new();
                        for p in 0..parts as i32 {
                            let _ = tpl.add_partition_offset(&topic, p, Offset::Beginning);
                        }
                        assigned = consumer.assign(&tpl).is_ok();
                    }
                }
                Err(e) => log::debug!(target: LOG, "control topic metadata: {e}"),
            }
            if !assigned {
                if last_error.elapsed() > Duration::from_secs(10) {
                    log::warn!(target: LOG, "control topic {topic} not available yet; retrying");
                    last_error = Instant::now();
                }
                a.stop.sleep(Duration::from_millis(500));
                continue;
            }
        }
        if let Some(m) = poll(
            consumer,
            Duration::from_millis(200),
            "control consumer",
            &mut last_error,
        ) {
            let fresh_after = crate::now_ms() - (a.cfg.dispatch_ttl_seconds as i64 + 5) * 1000;
            if m.timestamp().to_millis().is_some_and(|t| t < fresh_after) {
                continue;
            }
            match wire::parse::<ControlMsg>(m.payload()) {
                Ok(c) if c.kind == "cancel" => {
                    let f = crate::trust::CancelFields {
                        execution_id: c.execution_id,
                        attempt: c.attempt,
                        node: None,
                        issued_at: c.issued_at,
                        expires_at: c.expires_at,
                    };
                    let now = crate::now_ms();
                    match a
                        .trust
                        .verifier
                        .check_cancel(&f, c.sig.as_deref(), &a.trust.me, now)
                    {
                        Ok(()) => a.cancel(RunKey {
                            execution: ExecutionId(c.execution_id),
                            attempt: Attempt(c.attempt),
                        }),
                        Err(r) => {
                            // Ignored, tombstone included: a forged cancel must not keep a
                            // real dispatch from running.
                            let why = r.to_string().replacen("dispatch", "cancel", 1);
                            log::warn!(target: LOG, "execution={} attempt={} cancel ignored: {why}", c.execution_id, c.attempt);
                            dead_letter(&a.producer, &a.cfg, &a.id, &m, &why);
                        }
                    }
                }
                Ok(c) => dead_letter(
                    &a.producer,
                    &a.cfg,
                    &a.id,
                    &m,
                    &format!("unknown control kind {:?}", c.kind),
                ),
                Err(why) => dead_letter(&a.producer, &a.cfg, &a.id, &m, &why.0),
            }
        }
    }
}

pub fn run(cfg: Config, stop: Receiver<i32>) -> Result<(), super::NodeError> {
    run_inner(cfg, stop).map_err(super::NodeError)
}

fn run_inner(cfg: Config, stop: Receiver<i32>) -> Result<(), String> {
    let k = cfg.kafka.clone();
    if k.brokers.is_empty() {
        return Err("an agent needs Kafka: set kafka.brokers or pass --kafka HOST:PORT".into());
    }
    let pool_name = cfg.agent.pool.clone();
    let id = if cfg.agent.node_id.is_empty() {
        crate::host_pid()
    } else {
        cfg.agent.node_id.clone()
    };
    let spool_dir = if cfg.agent.spool_dir.is_empty() {
        cfg.server.data_dir.join("agent-spool")
    } else {
        std::path::PathBuf::from(&cfg.agent.spool_dir)
    };
    crate::config::prepare_state_dir(&cfg.server.data_dir, cfg.node.run_as_uid >= 0)?;
    crate::config::prepare_state_dir(&spool_dir, false)?;
    // A dispatch older than its TTL never runs: remembering an hour (or twice the TTL) is plenty.
    let keep = Duration::from_secs((2 * k.dispatch_ttl_seconds).max(3_600));
    // Two agents sharing a spool would each rewrite the other's record of what it took.
    std::fs::create_dir_all(&spool_dir)
        .map_err(|e| format!("cannot create the agent spool {}: {e}", spool_dir.display()))?;
    let _spool_lock = crate::lock_exclusive(
        &spool_dir.join("lock"),
        &format!("the agent spool {}", spool_dir.display()),
        "give this agent its own --data-dir (or agent.spool_dir)",
    )?;
    let spool = Spool::open(&spool_dir, keep).map_err(|e| {
        format!(
            "cannot open the agent spool in {}: {e}",
            spool_dir.display()
        )
    })?;
    let mut trust = cfg.node_trust(Some(&pool_name), &id)?;
    // A dispatch valid for longer than the spool remembers could be replayed after it forgot.
    trust.verifier = trust.verifier.with_max_validity(keep.as_millis() as i64);
    trust.verifier.announce();
    let pool = Pool::start(cfg.pool_config())
        .map_err(|e| format!("cannot start the process pool: {e}"))?;
    // Events wait for the brokers as long as it takes (message.timeout.ms = 0).
    let producer = k.producer(&id, Duration::ZERO)?;
    let topic = k.dispatch_topic(&pool_name);
    let wanted = [
        topic.clone(),
        k.events_topic.clone(),
        k.control_topic.clone(),
    ];
    match existing_topics(&k, &producer, &wanted) {
        Ok(have) => {
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|t| !have.contains(*t))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                // Normal when the scheduler has not started yet, or has not heard of this
                // pool: it creates the pool's topic when this agent's first heartbeat arrives.
                log::info!(target: LOG, "waiting for topics {} (the scheduler creates them)", missing.join(", "));
            }
        }
        Err(e) => log::warn!(target: LOG, "{e}; will keep trying"),
    }
    // Subscribed by the dispatch thread once the topic exists (`wait_for_topic`).
    let consumer: BaseConsumer = k
        .consumer(&id, &format!("etask.agents.{pool_name}"), false)
        .create()
        .map_err(|e| format!("kafka consumer: {e}"))?;
    let control: BaseConsumer = k
        .control_consumer(&id)
        .create()
        .map_err(|e| format!("kafka control consumer: {e}"))?;
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let agent = Arc::new(Agent {
        id: id.clone(),
        pool_name: pool_name.clone(),
        cfg: k.clone(),
        pool,
        producer,
        events: events_tx,
        held: Mutex::new(HashSet::new()),
        tombstones: Mutex::new(HashMap::new()),
        spool: Mutex::new(spool),
        trust,
        draining: Shutdown::new(),
        stop: Shutdown::new(),
    });
    // Each loop is restarted if it panics (supervise): no message from the broker can stop
    // the agent's consuming for good.
    let health = Arc::new(crate::supervise::Health::default());
    let spawn = |name: &str, f: Box<dyn Fn() + Send>| {
        let a = agent.clone();
        let done = move || a.draining.is_triggered() || a.stop.is_triggered();
        crate::supervise::spawn(&health, name, done, f)
            .map_err(|e| format!("cannot start thread {name}: {e}"))
    };
    let every = Duration::from_millis(cfg.agent.heartbeat_ms);
    let a = agent.clone();
    let events = spawn(
        "agent-events",
        Box::new(move || events_loop(&a, &events_rx, every)),
    )?;
    let a = agent.clone();
    let ctl = spawn(
        "agent-control",
        Box::new(move || control_loop(&a, &control)),
    )?;
    // The dispatch loop ends the process when the spool fails.
    let (failed_tx, failed_rx) = crossbeam_channel::bounded::<String>(1);
    let a = agent.clone();
    // The consumer lives in the closure: dropped when the loop ends for good (the thread
    // ends), which leaves the group so the pool's other agents take over the partitions.
    let dispatch = spawn(
        "agent-dispatch",
        Box::new(move || {
            let res = wait_for_topic(&a, &consumer).and_then(|()| dispatch_loop(&a, &consumer));
            if let Err(e) = res {
                let _ = failed_tx.try_send(e);
            }
        }),
    )?;
    let registration = if cfg.registry.etcd.is_empty() {
        None
    } else {
        let info = NodeInfo {
            id: id.clone(),
            role: crate::model::NodeRole::Agent,
            pool: pool_name.clone(),
            address: None,
            path: crate::model::DeliveryPath::Agent,
            handlers: vec!["shell".into(), "python".into(), "exec".into()],
            capacity: agent.pool.max_concurrent() as u32,
            running: 0,
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: crate::now_ms(),
            containment: Some(agent.pool.containment().into()),
        };
        let a = agent.clone();
        Some(
            Registration::start(
                cfg.etcd()?,
                cfg.registry.prefix.clone(),
                info,
                cfg.registry.ttl_seconds,
                Box::new(move || a.pool.running() as u32),
            )
            .map_err(|e| format!("cannot start the registry heartbeat: {e}"))?,
        )
    };
    crate::announce(&format!(
        "etask agent {id} pool {pool_name} consuming {topic} on {}",
        k.brokers
    ));
    log::info!(target: LOG, "started agent={id} pool={pool_name} brokers={}", k.brokers);
    crate::sd_notify::ready(&format!("agent {id} pool {pool_name} consuming {topic}"));
    let result = crossbeam_channel::select! {
        recv(stop) -> sig => {
            log::info!(target: LOG, "{}: stopping", crate::signals::name(sig.unwrap_or(libc::SIGTERM)));
            Ok(())
        }
        recv(failed_rx) -> e => Err(e.unwrap_or_default()),
    };
    // Drain: leave the group at once (the pool's other agents take the partitions), let what
    // runs finish and be reported — heartbeats and cancels go on meanwhile — up to
    // agent.drain_seconds; a second signal stops at once.
    agent.draining.trigger();
    crate::sd_notify::stopping(&format!(
        "draining {} runs for up to {} s",
        agent.pool.in_flight(),
        cfg.agent.drain_seconds
    ));
    let _ = dispatch.join();
    let deadline = Instant::now() + Duration::from_secs(cfg.agent.drain_seconds);
    while result.is_ok() && agent.pool.in_flight() > 0 && Instant::now() < deadline {
        if stop.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
    }
    let left = agent.pool.in_flight();
    if left > 0 {
        log::warn!(target: LOG, "stopping with {left} runs still running: they are killed, and the scheduler retries them");
    } else {
        // The last outcomes are in the channel or the producer: let them out.
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop.trigger();
    if let Some(r) = registration {
        r.stop();
    }
    let _ = ctl.join();
    let _ = events.join();
    use rdkafka::producer::Producer;
    let _ = agent.producer.flush(Duration::from_secs(5));
    // What still runs dies with the process (PDEATHSIG); the scheduler retries it.
    result
}
