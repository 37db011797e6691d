//! `etask server --mode executor`: serves `Execute`/`Cancel` over gRPC into the process pool,
//! streams logs and outcomes back to the scheduler's `Report` (buffered and resent until
//! acknowledged), and keeps its etcd registration alive so schedulers route to it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::Config;
use crate::delivery::grpc::{self, pb, ExecutorHandler, NotTaken, SchedulerClient};
use crate::delivery::Dispatch;
use crate::model::{Attempt, DeliveryPath, ExecutionId, NodeRole};
use crate::node::spool::{Spool, Taken};
use crate::registry::{NodeInfo, Registration};
use crate::runner::{Pool, RunEvent, RunKey};
use crate::shutdown::{Backoff, Shutdown};
use crate::trust::{NodeTrust, Refusal};

const LOG: &str = "etask::executor";

struct Handler {
    pool: Pool,
    events: Sender<RunEvent>,
    /// Attempts cancelled before their Execute arrived: a late Execute is refused.
    tombstones: Mutex<HashMap<(ExecutionId, Attempt), Instant>>,
    /// Whom dispatches must come from, who this node is, what opens sealed secrets.
    trust: NodeTrust,
    /// The attempts this node took (kept across restarts): a replayed dispatch is refused.
    spool: Mutex<Spool>,
}

/// How long the executor remembers the attempts it took: far longer than a gRPC dispatch
/// lives, so a replay is either remembered or expired.
const SPOOL_KEEP: Duration = Duration::from_secs(3_600);

/// How long a cancel waits for its (possibly late) Execute.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

impl Handler {
    /// `ExecutorHandler::execute`; Err = why the dispatch was not taken.
    fn take(&self, mut d: Dispatch) -> Result<(), String> {
        let (id, attempt) = (d.execution_id, d.attempt);
        let refuse = |r: Refusal| {
            log::warn!(target: LOG, "execution={id} attempt={attempt} refused: {r}");
            r.to_string()
        };
        // Before anything else: nothing of a dispatch that does not check out is acted on.
        match d.verify_and_open(&self.trust.verifier, &self.trust.me, &self.trust.open) {
            Ok(()) => {}
            Err(Refusal::Expired(_)) => return Err("dispatch expired".into()),
            Err(r) => return Err(refuse(r)),
        }
        if self
            .tombstones
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(id, attempt))
        {
            return Err("cancelled before it arrived".into());
        }
        // Held across the submit: two copies of one dispatch arriving together run once.
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        if spool.get(id, attempt).is_some() {
            return Err(refuse(Refusal::Replay(id.0, attempt.0)));
        }
        log::info!(target: LOG, "execution={id} attempt={attempt} accepted");
        let req = d.into_run_request();
        self.pool
            .submit(req, self.events.clone())
            .map_err(|e| e.to_string())?;
        if let Err(e) = spool.record(id, attempt, Taken::Started) {
            log::warn!(target: LOG, "execution={id} attempt={attempt}: {e}");
        }
        Ok(())
    }

    /// `ExecutorHandler::cancel`; Err = why the cancel was ignored.
    fn cancel_checked(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        stamp: &crate::trust::Stamp,
    ) -> Result<bool, String> {
        let f = crate::trust::CancelFields {
            execution_id: id.0,
            attempt: attempt.0,
            node: stamp.node.as_deref(),
            issued_at: stamp.issued_at,
            expires_at: stamp.expires_at,
        };
        if let Err(r) = self.trust.verifier.check_cancel(
            &f,
            stamp.sig.as_deref(),
            &self.trust.me,
            crate::now_ms(),
        ) {
            // Not even a tombstone: a forged cancel must not keep a real dispatch from running.
            let why = r.to_string().replacen("dispatch", "cancel", 1);
            log::warn!(target: LOG, "execution={id} attempt={attempt} cancel ignored: {why}");
            return Err(why);
        }
        let mut t = self.tombstones.lock().unwrap_or_else(|p| p.into_inner());
        t.retain(|_, at| at.elapsed() < TOMBSTONE_TTL);
        t.insert((id, attempt), Instant::now());
        drop(t);
        self.pool.cancel(RunKey {
            execution: id,
            attempt,
        });
        log::info!(target: LOG, "execution={id} attempt={attempt} cancel");
        Ok(true)
    }
}

impl ExecutorHandler for Handler {
    fn execute(&self, d: Dispatch) -> Result<(), NotTaken> {
        self.take(d).map_err(NotTaken)
    }

    fn cancel(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        stamp: &crate::trust::Stamp,
    ) -> Result<bool, NotTaken> {
        self.cancel_checked(id, attempt, stamp).map_err(NotTaken)
    }
}

/// Sends pool events to the scheduler in batches; what is not acknowledged is kept and resent
/// (the scheduler deduplicates by execution id + attempt + log seq).
fn reporter(client: &SchedulerClient, node: &str, events: &Receiver<RunEvent>, stop: &Shutdown) {
    let mut pending: VecDeque<pb::ReportItem> = VecDeque::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        if pending.is_empty() {
            match events.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => pending.push_back(grpc::event_to_pb(&ev)),
                Err(_) if stop.is_triggered() => return,
                Err(_) => continue,
            }
        }
        while let Ok(ev) = events.try_recv() {
            pending.push_back(grpc::event_to_pb(&ev));
        }
        let n = pending.len().min(256);
        let batch = pb::ReportBatch {
            node_id: node.to_owned(),
            items: pending.iter().take(n).cloned().collect(),
        };
        match client.report(batch) {
            Ok(_) => {
                pending.drain(..n);
                backoff.reset();
            }
            Err(e) => {
                if stop.is_triggered() {
                    log::warn!(target: LOG, "stopping with {} reports not delivered: {e}", pending.len());
                    return;
                }
                log::warn!(target: LOG, "scheduler unreachable ({e}); {} reports buffered, retrying", pending.len());
                stop.sleep(backoff.next_delay());
            }
        }
    }
}

pub fn run(cfg: Config, stop: Receiver<i32>) -> Result<(), super::NodeError> {
    run_inner(cfg, stop).map_err(super::NodeError)
}

fn run_inner(cfg: Config, stop: Receiver<i32>) -> Result<(), String> {
    let ex = cfg.executor.clone();
    let Some(path) = ex.delivery_path() else {
        return Err(format!(
            "executor.path must be {:?} or {:?}, not {:?}",
            DeliveryPath::Push.as_str(),
            DeliveryPath::Pull.as_str(),
            ex.path
        ));
    };
    if cfg.registry.etcd.is_empty() {
        return Err(
            "an executor needs [registry] etcd (or --etcd URL) so schedulers can find it".into(),
        );
    }
    let node_id = if ex.node_id.is_empty() {
        crate::host_pid()
    } else {
        ex.node_id.clone()
    };
    let rt = grpc::Runtime::with_tls(cfg.grpc_tls()?)
        .map_err(|e| format!("cannot start the gRPC runtime: {e}"))?;
    crate::config::prepare_state_dir(&cfg.server.data_dir, cfg.node.run_as_uid >= 0)?;
    let (journal, previous) = crate::server::open_journal(&cfg, &node_id)?;
    let mut trust = cfg.node_trust(Some(&ex.pool), &node_id)?;
    trust.verifier = trust
        .verifier
        .with_max_validity(SPOOL_KEEP.as_millis() as i64);
    trust.verifier.announce();
    // In the data dir the start journal locks for this node: no other process shares it.
    let spool_dir = cfg.server.data_dir.join("executor-spool");
    let spool = Spool::open(&spool_dir, SPOOL_KEEP).map_err(|e| {
        format!(
            "cannot open the executor spool {}: {e}",
            spool_dir.display()
        )
    })?;
    let mut pc = cfg.pool_config();
    pc.journal = Some(journal);
    let pool = Pool::start(pc).map_err(|e| format!("cannot start the process pool: {e}"))?;
    let capacity = pool.max_concurrent() as u32;
    // Unbounded for the same reason as in --mode all: the pool never blocks on its consumer.
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let handler = Arc::new(Handler {
        pool,
        events: events_tx,
        tombstones: Mutex::new(HashMap::new()),
        trust,
        spool: Mutex::new(spool),
    });
    // PUSH serves Execute/Cancel; PULL opens no port at all and asks the scheduler instead.
    let mut server = None;
    let mut advertise = String::new();
    if path == DeliveryPath::Push {
        // Execute runs scripts: reachable from the network only with the token.
        let addr =
            crate::config::check_listener("executor.grpc_listen", &ex.grpc_listen, &ex.token)?;
        let srv = grpc::serve_executor(&rt, addr, handler.clone(), &ex.token)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        advertise = if ex.advertise.is_empty() {
            srv.addr.to_string()
        } else {
            ex.advertise.clone()
        };
        server = Some(srv);
    }
    let stop_flag = Shutdown::new();
    let client = SchedulerClient::new(&rt, &ex.scheduler, &ex.token).map_err(|e| e.to_string())?;
    let (node, flag) = (node_id.clone(), stop_flag.clone());
    if !previous.unstarted.is_empty() && !previous.node.is_empty() {
        let client =
            SchedulerClient::new(&rt, &ex.scheduler, &ex.token).map_err(|e| e.to_string())?;
        let flag = stop_flag.clone();
        std::thread::Builder::new()
            .name("executor-recover".into())
            .spawn(move || report_unstarted(&client, &previous, &flag))
            .map_err(|e| e.to_string())?;
    }
    // Restarted if it panics, like every component loop (what was buffered is lost then; the
    // scheduler's silence handling covers it).
    let health = Arc::new(crate::supervise::Health::default());
    let f2 = flag.clone();
    let reporter = crate::supervise::spawn(
        &health,
        "executor-report",
        move || f2.is_triggered(),
        move || reporter(&client, &node, &events_rx, &flag),
    )
    .map_err(|e| e.to_string())?;
    let info = NodeInfo {
        id: node_id.clone(),
        role: NodeRole::Executor,
        pool: ex.pool.clone(),
        address: server.as_ref().map(|_| advertise.clone()),
        path,
        handlers: vec!["shell".into(), "python".into(), "exec".into()],
        capacity,
        running: 0,
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: crate::now_ms(),
        containment: Some(handler.pool.containment().into()),
    };
    let h2 = handler.clone();
    let registration = Registration::start(
        cfg.etcd()?,
        cfg.registry.prefix.clone(),
        info,
        cfg.registry.ttl_seconds,
        Box::new(move || h2.pool.running() as u32),
    )
    .map_err(|e| format!("cannot start the registry heartbeat: {e}"))?;
    let puller = if path == DeliveryPath::Pull {
        let client =
            SchedulerClient::new(&rt, &ex.scheduler, &ex.token).map_err(|e| e.to_string())?;
        let (h, node, pool, flag) = (
            handler.clone(),
            node_id.clone(),
            ex.pool.clone(),
            stop_flag.clone(),
        );
        Some({
            let f2 = flag.clone();
            crate::supervise::spawn(
                &health,
                "executor-pull",
                move || f2.is_triggered(),
                move || pull_loop(&client, &h, &node, &pool, capacity, &flag),
            )
            .map_err(|e| e.to_string())?
        })
    } else {
        None
    };
    // One line on stdout, like the scheduler's, so scripts and tests know it is up.
    if server.is_some() {
        crate::announce(&format!("etask executor {node_id} serving on {advertise}"));
    } else {
        crate::announce(&format!(
            "etask executor {node_id} pulling from {}",
            ex.scheduler
        ));
    }
    log::info!(target: LOG, "started node={node_id} pool={} path={} scheduler={}", ex.pool, ex.path, ex.scheduler);
    crate::sd_notify::ready(&format!(
        "executor {node_id} pool {} ({}) on {advertise}",
        ex.pool, ex.path
    ));
    let sig = stop.recv().unwrap_or(libc::SIGTERM);
    log::info!(target: LOG, "{}: stopping", crate::signals::name(sig));
    crate::sd_notify::stopping("stopping");
    registration.stop();
    if let Some(srv) = server {
        srv.stop();
    }
    stop_flag.trigger();
    if let Some(p) = puller {
        let _ = p.join();
    }
    let _ = reporter.join();
    Ok(())
}

/// Tells the scheduler which attempts the previous incarnation of this node took and never
/// started (under that incarnation's node id, which still holds them), until it acknowledges.
fn report_unstarted(client: &SchedulerClient, prev: &crate::runner::Previous, stop: &Shutdown) {
    let batch = pb::ReportBatch {
        node_id: prev.node.clone(),
        items: prev
            .unstarted
            .iter()
            .map(|(e, a)| pb::ReportItem {
                execution_id: *e,
                attempt: *a,
                kind: Some(pb::report_item::Kind::NotStarted(
                    "the node stopped before starting it".into(),
                )),
            })
            .collect(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while !stop.is_triggered() {
        match client.report(batch.clone()) {
            Ok(_) => {
                log::info!(target: LOG, "reported {} attempt(s) the previous node {} never started", batch.items.len(), prev.node);
                return;
            }
            Err(e) => {
                log::warn!(target: LOG, "cannot report unstarted attempts yet: {e}");
                stop.sleep(backoff.next_delay());
            }
        }
    }
}

/// PULL: asks the scheduler for work whenever a slot is free; each call is held open by the
/// scheduler until work arrives (or a few seconds pass), so work starts the moment it is
/// submitted without this node listening anywhere.
fn pull_loop(
    client: &SchedulerClient,
    h: &Handler,
    node: &str,
    pool: &str,
    capacity: u32,
    stop: &Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while !stop.is_triggered() {
        let free = capacity.saturating_sub(h.pool.in_flight() as u32);
        if free == 0 {
            stop.sleep(Duration::from_millis(50));
            continue;
        }
        let req = pb::PullRequest {
            node_id: node.to_owned(),
            pool: pool.to_owned(),
            handlers: vec!["shell".into(), "python".into(), "exec".into()],
            free_slots: free,
            // Under the channel's 10 s request timeout.
            wait_ms: 5_000,
        };
        match client.pull(req) {
            Ok(list) => {
                backoff.reset();
                for d in list {
                    let id = d.execution_id;
                    let attempt = Attempt(d.attempt);
                    let res = grpc::dispatch_from_pb(d)
                        .map_err(|e| e.to_string())
                        .and_then(|d| h.execute(d).map_err(|e| e.0));
                    if let Err(e) = res {
                        // Claimed but not runnable here: report it failed rather than lose it.
                        log::warn!(target: LOG, "execution={id} pulled but refused: {e}");
                        let key = RunKey {
                            execution: ExecutionId(id),
                            attempt,
                        };
                        let outcome = crate::runner::Outcome::not_started(
                            crate::runner::Ending::SpawnFailed(e),
                        );
                        let _ = h.events.send(RunEvent::Finished { key, outcome });
                    }
                }
            }
            Err(e) => {
                let wait = backoff.next_delay();
                log::warn!(target: LOG, "pull from the scheduler failed: {e}; retrying in {wait:?}");
                stop.sleep(wait);
            }
        }
    }
}
