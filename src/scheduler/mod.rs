//! The scheduler: the HTTP intake, and the threads that move executions through their states —
//! dispatcher (claims due work, hands it to a `Delivery`), ingest (node reports → store),
//! cron ticker, sweeper (silent nodes, retries) and the callback outbox. Each thread owns its
//! loop and talks to the others through the store and small wake-up channels.

pub mod api;
pub mod callbacks;
pub mod http;
pub mod metrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde_json::{json, Value};

use crate::config::Config;
use crate::delivery::{Delivery, Dispatch, Refused};
use crate::model::{
    Attempt, CronMissed, DeliveryPath, ExecutionId, NodeRole, Status, Strategy, TaskId,
};
use crate::now_ms;
use crate::runner::{Outcome, RunEvent};
use crate::store::{CancelOutcome, Created, Finish, Fire, NewTask, Store};
use api::{next_fire, parse_cron, resolve_zone, ApiError, RetryPolicy, Schedule, TaskSpec};
use metrics::Metrics;

use crate::registry::{NodeInfo, NodeTable};

/// How the built-in node of `--mode all` describes itself (in etcd and `GET /api/v1/nodes`).
pub fn builtin_node_info(d: &dyn Delivery) -> NodeInfo {
    let (running, capacity) = d.load();
    NodeInfo {
        id: d.node().to_owned(),
        role: NodeRole::Executor,
        pool: d.path().as_str().to_owned(),
        address: None,
        path: d.path(),
        handlers: vec!["shell".into(), "python".into(), "exec".into()],
        capacity,
        running,
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: *PROCESS_START,
        containment: d.containment(),
    }
}

/// When this process started its scheduler (read once, at `Scheduler::start`).
static PROCESS_START: std::sync::LazyLock<i64> = std::sync::LazyLock::new(now_ms);

const LOG: &str = "etask::scheduler";

/// State shared by the scheduler's threads and HTTP handlers.
pub struct Core {
    pub store: Arc<dyn Store>,
    pub cfg: Config,
    pub metrics: Metrics,
    deliveries: Vec<Arc<dyn Delivery>>,
    kick_dispatch: Sender<()>,
    kick_callbacks: Sender<()>,
    stopping: AtomicBool,
    pub followers: AtomicUsize,
    /// The scheduler's component threads, for `/healthz`.
    pub health: Arc<crate::supervise::Health>,
    /// Live nodes from etcd, when a registry is configured.
    node_table: Option<Arc<NodeTable>>,
    /// Executors may Pull work (the gRPC service is up).
    pull_enabled: bool,
    /// Retry policy and callback URL of dispatched attempts, so a report needs no task lookup.
    /// Filled at dispatch, taken at finish; a miss (after a restart) falls back to the store.
    policies: Mutex<HashMap<(ExecutionId, Attempt), Policy>>,
    /// Bumped (and waiters notified) whenever work may have become due for Pull.
    pull_gen: (Mutex<u64>, std::sync::Condvar),
    /// Signs pulled dispatches; seals secrets at intake.
    keys: crate::trust::SchedulerKeys,
}

#[derive(Clone)]
struct Policy {
    retry: RetryPolicy,
    callback_url: Option<String>,
}

fn kick(tx: &Sender<()>) {
    // Capacity 1: a pending wake-up already covers this one.
    let _ = tx.try_send(());
}

impl Core {
    /// The delivery paths this scheduler serves.
    pub fn paths(&self) -> Vec<DeliveryPath> {
        let mut p: Vec<DeliveryPath> = self.deliveries.iter().map(|d| d.path()).collect();
        if self.pull_enabled {
            p.push(DeliveryPath::Pull);
        }
        p
    }

    /// Live nodes: the etcd table when a registry is configured, else this process's own.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        if let Some(t) = &self.node_table {
            return t.nodes();
        }
        self.deliveries
            .iter()
            .filter(|d| d.path() == DeliveryPath::Local)
            .map(|d| builtin_node_info(d.as_ref()))
            .collect()
    }

    /// `/metrics`: the in-memory counters with the store's counts.
    pub fn metrics_text(&self) -> String {
        let counts = self.store.status_counts().unwrap_or_default();
        let mut text = self
            .metrics
            .render(&counts, self.store.outbox_pending().unwrap_or(0));
        metrics::render_skipped_fires(&mut text, &self.store.skipped_fires().unwrap_or_default());
        text
    }

    /// `/healthz`: (healthy, body). Healthy when the store answers and every component thread
    /// runs; the body names each component (no paths, no addresses: the endpoint is open).
    pub fn health(&self) -> (bool, Value) {
        let store_ok = self.store.ping().is_ok();
        let comps_ok = self.health.all_running() || self.stopping();
        let ok = store_ok && comps_ok;
        let body = serde_json::json!({
            "status": if ok { "ok" } else if !store_ok { "store unavailable" } else { "degraded" },
            "store": if store_ok { "ok" } else { "unavailable" },
            // Open to anyone: whether each component runs and how often it restarted, not
            // its panic messages (those are in the log).
            "components": self.health.to_json_public(),
        });
        (ok, body)
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn default_retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.cfg.scheduler.default_max_attempts,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        }
    }

    fn timeout_ms(&self, spec: &TaskSpec) -> i64 {
        let secs = spec
            .timeout_seconds
            .unwrap_or(self.cfg.scheduler.default_timeout_seconds as f64);
        (secs * 1000.0) as i64
    }

    /// Creates a task (and its first execution for `once`); idempotent on `request_id`.
    /// The nodes a broadcast of `spec` runs on: the live nodes of its path and pool.
    fn broadcast_nodes(&self, spec: &TaskSpec) -> Vec<String> {
        let pool = spec.pool();
        let path = spec.path();
        self.node_table
            .as_ref()
            .map(|t| {
                t.nodes()
                    .into_iter()
                    .filter(|n| n.path == path && n.pool == pool)
                    .map(|n| n.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn submit(&self, mut spec: TaskSpec) -> Result<(Created, Vec<ExecutionId>), ApiError> {
        if let Some(u) = &spec.callback_url {
            callbacks::Policy::new(&self.cfg.callbacks.allowed_hosts)
                .and_then(|p| p.check_url(u))
                .map_err(ApiError::invalid)?;
        }
        self.seal_secrets(&mut spec)?;
        let now = now_ms();
        let target = spec.target.clone();
        let broadcast = spec.is_broadcast();
        // Broadcast: one execution per live node of the pool, known before anything is stored.
        let broadcast_once = broadcast && matches!(spec.schedule, Schedule::Once { .. });
        let shards: Vec<String> = if broadcast_once {
            let nodes = self.broadcast_nodes(&spec);
            if nodes.is_empty() {
                return Err(ApiError::unavailable(format!(
                    "broadcast: no live {} node in pool {:?}",
                    spec.path(),
                    target
                        .as_ref()
                        .and_then(|t| t.pool.clone())
                        .unwrap_or_else(|| "default".into())
                )));
            }
            nodes
        } else {
            Vec::new()
        };
        // Work for a pool with no live node now (a typo, or no node started yet) fails at once
        // instead of waiting no_node_timeout_seconds; work due later, or a cron task, waits
        // for a node to come.
        let runs_now = matches!(spec.schedule, Schedule::Once { at: None });
        if runs_now && !broadcast && spec.path().is_grpc() {
            let synced = self.node_table.as_ref().is_some_and(|t| t.synced());
            if synced && self.broadcast_nodes(&spec).is_empty() {
                return Err(ApiError::unavailable(format!(
                    "no live {} node in pool {:?}; start one (etask server --mode executor \
                     --path {} --pool {}) or check the pool name",
                    spec.path(),
                    spec.pool(),
                    spec.path(),
                    spec.pool(),
                )));
            }
        }
        let (cron, first_due_at) = match &mut spec.schedule {
            Schedule::Once { at } => (None, Some(at.unwrap_or(now))),
            Schedule::Cron { expr, timezone, .. } => {
                let zone = resolve_zone(expr, timezone.as_deref(), &self.cfg.scheduler.timezone)?;
                let next = next_fire(&parse_cron(expr, zone)?, now).ok_or_else(|| {
                    ApiError::invalid(format!("schedule.expr {expr:?} never fires"))
                })?;
                // The zone is fixed into the task: a later `[scheduler] timezone` does not move it.
                *timezone = Some(zone.name().to_owned());
                (Some((expr.clone(), next)), None)
            }
        };
        let t = NewTask {
            name: spec.name.clone(),
            request_id: spec.request_id.clone(),
            deadline_ms: Some(self.timeout_ms(&spec)),
            spec: serde_json::to_value(&spec).map_err(|e| ApiError::internal(e.to_string()))?,
            cron,
            first_due_at: if broadcast { None } else { first_due_at },
            path: spec.path(),
            pool: spec
                .target
                .as_ref()
                .and_then(|t| t.pool.clone())
                .unwrap_or_default(),
        };
        let mut created = self.store.create_task(&t, now)?;
        if created.differs {
            return Err(ApiError::conflict(format!(
                "request_id {:?} was used before for task {} with a different body; use a new \
                 request_id for a different task",
                spec.request_id.as_deref().unwrap_or_default(),
                created.task_id
            )));
        }
        let mut all = created.execution_id.into_iter().collect::<Vec<_>>();
        if broadcast_once && !created.existed {
            all = self.store.add_broadcast(
                created.task_id,
                &shards,
                Some(self.timeout_ms(&spec)),
                now,
            )?;
            created.execution_id = all.first().copied();
        } else if broadcast_once {
            all = self
                .store
                .list_executions(Some(created.task_id), None, 10_000, None)?
                .into_iter()
                .map(|e| e.id)
                .rev()
                .collect();
        }
        if !created.existed {
            self.metrics.tasks_submitted.fetch_add(1, Ordering::Relaxed);
            log::info!(target: LOG, "task={} name={:?} created{}", created.task_id, spec.name,
                created.execution_id.map(|e| format!(" execution={e}")).unwrap_or_default());
        }
        if created.execution_id.is_some() {
            self.wake_dispatch();
        }
        Ok((created, all))
    }

    /// Seals the task's secrets to its pool's key (`security.pool_keys`; the built-in node's
    /// own key for `local`), so that from here on the scheduler, the store and every wire
    /// hold only sealed values.
    fn seal_secrets(&self, spec: &mut TaskSpec) -> Result<(), ApiError> {
        let p = &spec.program;
        if p.secret_env.is_empty() && !p.variables.iter().any(|v| v.secret) {
            return Ok(());
        }
        match self.keys.seal_key(spec.path(), spec.pool()) {
            Some(k) => k.seal_program(&mut spec.program).map_err(ApiError::invalid),
            None if self.keys.require_sealed => Err(ApiError::invalid(format!(
                "pool {:?} has no public key to seal secrets to (security.pool_keys) and \
                 security.require_sealed_secrets is set: add the pool's key (etask keygen \
                 --pool NAME), or pass the values some other way",
                spec.pool()
            ))),
            None => Ok(()),
        }
    }

    pub fn run_now(&self, task: TaskId) -> Result<ExecutionId, ApiError> {
        let row = self
            .store
            .get_task(task)?
            .filter(|t| !t.deleted)
            .ok_or_else(|| ApiError::not_found(format!("task {task} not found")))?;
        let spec: TaskSpec = serde_json::from_value(row.spec)
            .map_err(|e| ApiError::internal(format!("stored spec: {e}")))?;
        let now = now_ms();
        let id = self
            .store
            .add_execution(task, now, Some(self.timeout_ms(&spec)), now)?;
        self.wake_dispatch();
        Ok(id)
    }

    /// Pauses a cron task: it fires no more until resumed (executions already created run).
    /// A task that runs once has nothing to pause: 409, so that nobody believes it paused.
    pub fn pause(&self, id: TaskId) -> Result<Value, ApiError> {
        let t = self.cron_task(id, "pause")?;
        self.store.set_paused(id, true)?;
        if !t.paused {
            log::info!(target: LOG, "task={id} paused");
        }
        Ok(json!({"id": id, "paused": true}))
    }

    /// Resumes a paused cron task at its next fire time after now. Fire times missed while it
    /// was paused are skipped, unless `catch_up` asks for one execution now (like
    /// `scheduler.cron_missed = "once"` after downtime).
    pub fn resume(&self, id: TaskId, catch_up: bool) -> Result<Value, ApiError> {
        let t = self.cron_task(id, "resume")?;
        let now = now_ms();
        if t.paused && !catch_up {
            if let (Some(expr), Some(at)) = (t.cron_expr.as_deref(), t.next_fire_at) {
                if at <= now {
                    // Moved while still paused, so the ticker cannot fire the missed time in
                    // between; a CAS, like every fire.
                    let zone = t
                        .spec
                        .pointer("/schedule/timezone")
                        .and_then(Value::as_str)
                        .and_then(|z| crate::cron::zone(z).ok())
                        .unwrap_or(chrono_tz::UTC);
                    let next = parse_cron(expr, zone).ok().and_then(|s| next_fire(&s, now));
                    self.store.skip_cron(id, at, next)?;
                }
            }
        }
        self.store.set_paused(id, false)?;
        if t.paused {
            log::info!(target: LOG, "task={id} resumed{}", if catch_up { " with a catch-up run" } else { "" });
        }
        Ok(json!({"id": id, "paused": false}))
    }

    /// The task `action` (pause/resume) applies to: it exists and runs on a cron schedule.
    fn cron_task(&self, id: TaskId, action: &str) -> Result<crate::store::TaskRow, ApiError> {
        let t = self
            .store
            .get_task(id)?
            .filter(|t| !t.deleted)
            .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
        if t.cron_expr.is_none() {
            return Err(ApiError::conflict(format!(
                "task {id} runs once: only cron tasks can {action}; to stop its execution, \
                 cancel it (POST /api/v1/executions/ID/cancel) or delete the task"
            )));
        }
        Ok(t)
    }

    /// Cancels an execution: at once in the store, then on its node. Idempotent.
    pub fn cancel(&self, id: ExecutionId) -> Result<Value, ApiError> {
        let now = now_ms();
        match self.store.cancel(id, now)? {
            CancelOutcome::NotFound => {
                Err(ApiError::not_found(format!("execution {id} not found")))
            }
            CancelOutcome::AlreadyFinal(st) => Err(ApiError::conflict(format!(
                "execution {id} already ended: {st}"
            ))),
            CancelOutcome::Cancelled { was, attempt, .. } => {
                self.cancelled(id, attempt, was, now);
                Ok(json!({"id": id, "status": "cancelled"}))
            }
        }
    }

    /// After the store cancelled an execution that was `was`: stop it on its node and queue its
    /// callback (nothing when it was already cancelled).
    fn cancelled(&self, id: ExecutionId, attempt: Attempt, was: Status, now: i64) {
        if was == Status::Cancelled {
            return;
        }
        log::info!(target: LOG, "execution={id} attempt={attempt} cancelled (was {was})");
        // Each delivery ignores attempts it does not hold.
        for d in &self.deliveries {
            d.cancel(id, attempt);
        }
        self.queue_callback(id, now);
    }

    fn queue_callback(&self, id: ExecutionId, now: i64) {
        let url = self
            .store
            .get_execution(id)
            .ok()
            .flatten()
            .and_then(|e| self.store.get_task(e.task_id).ok().flatten())
            .and_then(|t| {
                t.spec
                    .get("callback_url")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        if let Some(url) = url {
            if let Err(e) = self.store.enqueue_callback(id, &url, now) {
                log::error!(target: LOG, "execution={id} cannot queue callback: {e}");
            }
            kick(&self.kick_callbacks);
        }
    }

    fn policy(&self, task: TaskId, spec: Option<&TaskSpec>) -> Policy {
        let _ = task;
        Policy {
            retry: spec
                .and_then(|s| s.retry)
                .unwrap_or_else(|| self.default_retry()),
            callback_url: spec.and_then(|s| s.callback_url.clone()),
        }
    }

    /// Retry policy and callback URL of an execution's task: cached since dispatch, or read
    /// from the store (after a restart, or for the sweeper).
    fn policy_of(&self, id: ExecutionId, attempt: Attempt) -> Option<Policy> {
        let cached = self
            .policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(id, attempt));
        if cached.is_some() {
            return cached;
        }
        let task = match self.store.get_execution(id) {
            Ok(Some(e)) => e.task_id,
            Ok(None) => return None,
            Err(e) => {
                log::error!(target: LOG, "execution={id} attempt={attempt} cannot load: {e}");
                return None;
            }
        };
        let spec = self
            .store
            .get_task(task)
            .ok()
            .flatten()
            .and_then(|t| serde_json::from_value::<TaskSpec>(t.spec).ok());
        Some(self.policy(task, spec.as_ref()))
    }

    /// Records how an attempt ended (from a node report or the sweeper).
    fn finish(&self, id: ExecutionId, attempt: Attempt, fin: Finish) {
        let _ = self.finish_all(vec![(id, attempt, fin)]);
    }

    /// Records how attempts ended, in one store transaction, applying each task's retry
    /// policy; stale reports change nothing. Err = the store did not take them.
    fn finish_all(&self, mut items: Vec<(ExecutionId, Attempt, Finish)>) -> Result<(), String> {
        let now = now_ms();
        items.retain_mut(|(id, attempt, fin)| {
            let Some(policy) = self.policy_of(*id, *attempt) else {
                return false;
            };
            if matches!(
                fin.status,
                Some(Status::Failed | Status::TimedOut | Status::Lost)
            ) {
                // Attempts that provably never started are free: the budget counts the others.
                let free = self.store.unstarted_attempts(*id).unwrap_or(0);
                fin.retry_at = policy
                    .retry
                    .next_at(attempt.0.saturating_sub(free).max(1), now);
            }
            fin.callback_url = policy.callback_url;
            true
        });
        if items.is_empty() {
            return Ok(());
        }
        // An outcome must not be dropped on a transient store error: the execution would stay
        // `running` under a live node. Retry with backoff for a while (a failed transaction
        // applied nothing, and reapplying is a no-op for what did apply).
        // While the store is away (a full disk, a MySQL failover) the outcomes wait here for
        // as long as it takes: dropped, they would leave the executions `running` for good.
        // Other errors get ten tries.
        let mut res = self.store.finish(&items, now);
        let mut tries = 0u32;
        let mut last_log = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            match &res {
                Err(e) if !self.stopping() => {
                    let transient = matches!(
                        e,
                        crate::store::StoreError::Unavailable(_)
                            | crate::store::StoreError::Retry(_)
                    );
                    if !transient && tries >= 10 {
                        break;
                    }
                    if last_log.elapsed() >= Duration::from_secs(30) {
                        log::warn!(target: LOG, "{} outcomes not stored yet: {e}; retrying", items.len());
                        last_log = std::time::Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis((100u64 << tries.min(5)).min(2_000)));
                    tries += 1;
                    res = self.store.finish(&items, now_ms());
                }
                _ => break,
            }
        }
        let statuses = match res {
            Ok(s) => s,
            Err(e) => {
                for (id, attempt, _) in &items {
                    log::error!(target: LOG, "execution={id} attempt={attempt} cannot record outcome: {e}");
                }
                return Err(e.to_string());
            }
        };
        for ((id, attempt, fin), st) in items.iter().zip(statuses) {
            match st {
                Some(st) => {
                    log::info!(target: LOG, "execution={id} attempt={attempt} status={st}{}",
                        fin.error.as_deref().map(|e| format!(" error={e:?}")).unwrap_or_default());
                    if st == Status::RetryWait {
                        self.wake_dispatch();
                    } else if fin.callback_url.is_some() {
                        kick(&self.kick_callbacks);
                    }
                }
                None => {
                    log::debug!(target: LOG, "execution={id} attempt={attempt} stale report ignored")
                }
            }
        }
        Ok(())
    }
}
impl crate::delivery::TaskApi for Core {
    fn submit_json(
        &self,
        body: &[u8],
    ) -> Result<crate::delivery::Submitted, (&'static str, String)> {
        let limit = self.cfg.server.max_body_bytes;
        if body.len() > limit {
            return Err((
                "payload_too_large",
                format!("task over the {limit}-byte limit"),
            ));
        }
        let spec = TaskSpec::parse(body, &self.paths()).map_err(|e| (e.code, e.message))?;
        let (c, all) = self.submit(spec).map_err(|e| (e.code, e.message))?;
        Ok(crate::delivery::Submitted {
            task_id: c.task_id,
            execution_id: c.execution_id,
            existed: c.existed,
            executions: all,
        })
    }

    fn execution_json(&self, id: i64) -> Result<String, (&'static str, String)> {
        match self.store.get_execution(ExecutionId(id)) {
            Ok(Some(e)) => Ok(e.to_json().to_string()),
            Ok(None) => Err(("not_found", format!("execution {id} not found"))),
            Err(e) => {
                let e = ApiError::from(e);
                Err((e.code, e.message))
            }
        }
    }

    fn cancel_json(&self, id: i64) -> Result<String, (&'static str, String)> {
        self.cancel(ExecutionId(id))
            .map(|v| v.to_string())
            .map_err(|e| (e.code, e.message))
    }
}

impl crate::delivery::PullSource for Core {
    /// Claims up to `free` pull executions of `pool` for `node`, waiting up to `wait` for some
    /// to be submitted (woken by the submission itself, not by polling the store; a slow
    /// re-check every poll interval covers work created by other schedulers).
    fn unstarted(&self, node: &str, id: ExecutionId, attempt: Attempt, why: &str) {
        self.requeue(id, attempt, &format!("by {node}: {why}"), Some(node));
    }

    fn held(&self, node: &str, keys: &[(ExecutionId, Attempt)]) -> Vec<crate::delivery::Held> {
        use crate::delivery::Held;
        let mut seen: HashMap<ExecutionId, Option<crate::store::ExecutionRow>> = HashMap::new();
        keys.iter()
            .map(|(id, attempt)| {
                let row = seen
                    .entry(*id)
                    .or_insert_with(|| self.store.get_execution(*id).ok().flatten());
                match row {
                    Some(e) if e.attempt == *attempt && e.node.as_deref() == Some(node) => {
                        if e.status.is_terminal() {
                            Held::Finished
                        } else {
                            Held::Running
                        }
                    }
                    _ => Held::Not,
                }
            })
            .collect()
    }

    fn pull(&self, node: &str, pool: &str, free: u32, wait: Duration) -> Vec<Dispatch> {
        // With a registry, only a live pull node of this pool gets this pool's work (and the
        // secrets in it): naming a pool is not enough.
        if let Some(t) = &self.node_table {
            let known = t
                .nodes()
                .iter()
                .any(|n| n.id == node && n.pool == pool && n.path == DeliveryPath::Pull);
            if !known {
                // INFO, not WARN: a node that just left the registry (a clean stop) makes one
                // last call; a stranger's calls are refused the same way.
                log::info!(target: LOG, "node={node:?} pool={pool:?} pull refused: not a live pull node of that pool in the registry");
                std::thread::sleep(wait.min(Duration::from_secs(1)));
                return Vec::new();
            }
        }
        let deadline = std::time::Instant::now() + wait;
        let poll = Duration::from_millis(self.cfg.scheduler.poll_interval_ms.max(50));
        loop {
            let seen = *self.pull_gen.0.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self.store.promote_retries(now_ms());
            match self.store.claim_due_in(
                now_ms(),
                free.max(1),
                node,
                DeliveryPath::Pull,
                Some(pool),
            ) {
                Ok(claimed) if !claimed.is_empty() => {
                    // Signed for this node: another node cannot run a copy.
                    let out: Vec<Dispatch> = claimed
                        .iter()
                        .filter_map(|c| prepare(self, c))
                        .map(|mut d| {
                            d.sign(&self.keys.signer, Some(node), crate::trust::GRPC_TTL_MS);
                            d
                        })
                        .collect();
                    for c in &claimed {
                        self.metrics
                            .observe_dispatch(now_ms().saturating_sub(c.due_at).max(0) as u64);
                    }
                    if !out.is_empty() {
                        return out;
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!(target: LOG, "node={node} pull: cannot claim: {e}"),
            }
            let now = std::time::Instant::now();
            if now >= deadline || self.stopping() {
                return Vec::new();
            }
            let (lock, cv) = &self.pull_gen;
            let g = lock.lock().unwrap_or_else(|p| p.into_inner());
            if *g == seen {
                let _ = cv.wait_timeout(g, (deadline - now).min(poll));
            }
        }
    }
}

impl Core {
    /// New work may be due: wake the dispatcher and every waiting Pull.
    fn wake_dispatch(&self) {
        kick(&self.kick_dispatch);
        self.wake_pullers();
    }

    /// Wakes every waiting Pull: new work may be there.
    fn wake_pullers(&self) {
        let (lock, cv) = &self.pull_gen;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cv.notify_all();
    }
}

impl Core {
    /// Node reports → store. Whatever arrived together is written together: all `Started` of
    /// the batch in one transaction (recorded under `node` when given, heartbeat dated
    /// `silence_allowance` ms ahead), all log chunks in one, all outcomes in one.
    /// An error means some of it may not be stored (reapplying is harmless).
    fn apply_events(
        &self,
        node: Option<&str>,
        silence_allowance: i64,
        batch: &[RunEvent],
    ) -> Result<(), String> {
        let now = now_ms();
        let mut failed = None;
        let mut started = Vec::new();
        let mut logs = Vec::new();
        let mut finished = Vec::new();
        for ev in batch {
            match ev {
                RunEvent::Started { key, pid } => {
                    log::debug!(target: LOG, "execution={} attempt={} running pid={pid}", key.execution, key.attempt);
                    started.push((key.execution, key.attempt));
                }
                RunEvent::Log { key, chunk } => logs.push((
                    key.execution,
                    key.attempt,
                    chunk.seq,
                    chunk.stream.as_str(),
                    chunk.data.as_str(),
                )),
                RunEvent::Finished { key, outcome } => {
                    finished.push((key.execution, key.attempt, finish_of(outcome)))
                }
            }
        }
        if !finished.is_empty() {
            // Node slots are free again: let the dispatcher fill them now, not at its next poll.
            kick(&self.kick_dispatch);
        }
        if !started.is_empty() {
            if let Err(e) = self
                .store
                .mark_running(&started, node, now, now + silence_allowance)
            {
                log::error!(target: LOG, "cannot mark {} executions running: {e}", started.len());
                failed = Some(e.to_string());
            }
        }
        if !logs.is_empty() {
            if let Err(e) = self.store.append_logs(&logs, now) {
                log::error!(target: LOG, "cannot store {} log chunks: {e}", logs.len());
                failed = Some(e.to_string());
            }
        }
        if !finished.is_empty() {
            if let Err(e) = self.finish_all(finished) {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// An attempt that was dispatched but never started goes back to the queue under a new
    /// attempt number — unless no node has started it for `no_node_timeout_seconds` since it
    /// was due, then it fails.
    /// Attempts a crashed node took and provably never started (its start journal says so)
    /// go back to the queue without counting against their retry budget.
    pub fn recover_unstarted(&self, node: &str, list: &[(ExecutionId, Attempt)]) {
        if !list.is_empty() {
            log::info!(target: LOG, "node={node} {} attempt(s) it took never started; dispatching them again", list.len());
        }
        for (id, attempt) in list {
            self.requeue(
                *id,
                *attempt,
                &format!("{node} took it and stopped before starting it"),
                Some(node),
            );
        }
    }

    fn requeue(&self, id: ExecutionId, attempt: Attempt, why: &str, holder: Option<&str>) {
        let now = now_ms();
        let wait = self.cfg.scheduler.no_node_timeout_seconds as i64 * 1000;
        let due = self
            .store
            .get_execution(id)
            .ok()
            .flatten()
            .map(|e| e.due_at);
        if wait > 0 && due.is_some_and(|d| now.saturating_sub(d) > wait) {
            let fin = Finish {
                status: Some(Status::Failed),
                error: Some(format!(
                    "no node started it within {} s (last: {why})",
                    wait / 1000
                )),
                ..Finish::default()
            };
            self.finish(id, attempt, fin);
            return;
        }
        let error = format!("{}{why}", crate::store::NOT_STARTED);
        let moved = match holder {
            Some(node) => self.store.requeue_held(id, attempt, node, &error, now),
            None => self.store.requeue(id, attempt, &error, now),
        };
        match moved {
            Ok(true) => {
                self.policies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(id, attempt));
                log::warn!(target: LOG, "execution={id} attempt={attempt} not started ({why}); dispatched again as attempt {}", attempt.0 + 1);
                self.wake_dispatch();
            }
            Ok(false) => {}
            Err(e) => {
                log::warn!(target: LOG, "execution={id} attempt={attempt} cannot requeue: {e}")
            }
        }
    }

    /// Agents are heard through Kafka, which may pause for a broker failover: their runs get
    /// `kafka.agent_silent_after_ms` instead of the scheduler's silence period, by dating
    /// their heartbeats forward by the difference.
    fn agent_silence_allowance(&self) -> i64 {
        self.cfg
            .kafka
            .agent_silent_after_ms
            .saturating_sub(self.cfg.scheduler.node_silent_after_ms) as i64
    }
}

impl crate::delivery::ReportSink for Core {
    fn apply(&self, node: &str, events: &[RunEvent]) -> Result<(), String> {
        // A run just started gets the agents' silence allowance at once, not only from the
        // agent's next heartbeat.
        self.apply_events(Some(node), self.agent_silence_allowance(), events)
    }

    fn alive(&self, node: &str, running: &[(ExecutionId, Attempt)]) {
        let at = now_ms() + self.agent_silence_allowance();
        if let Err(e) = self.store.heartbeat_runs(running, at) {
            log::warn!(target: LOG, "node={node} heartbeat not recorded: {e}");
        }
    }

    fn not_started(&self, node: &str, id: ExecutionId, attempt: Attempt, why: &str) {
        if crate::trust::Refusal::is_refusal_text(why) {
            // The node did not trust the dispatch: trying it again unchanged would be refused
            // again, so the attempt fails (and is retried per the task's policy) with why.
            log::warn!(target: LOG, "execution={id} attempt={attempt} refused by {node}: {why}");
            let fin = Finish {
                status: Some(Status::Failed),
                error: Some(format!("refused by {node}: {why}")),
                ..Finish::default()
            };
            self.finish(id, attempt, fin);
            return;
        }
        self.requeue(id, attempt, &format!("by {node}: {why}"), None);
    }
}

/// A running scheduler; `stop` ends every thread and joins it.
pub struct Scheduler {
    pub core: Arc<Core>,
    threads: Vec<JoinHandle<()>>,
    http: Option<http::HttpServer>,
}

impl Scheduler {
    /// Starts the scheduler threads. `reports` carries the events of every in-process node.
    pub fn start(
        store: Arc<dyn Store>,
        cfg: Config,
        deliveries: Vec<Arc<dyn Delivery>>,
        reports: Receiver<RunEvent>,
        node_table: Option<Arc<NodeTable>>,
        pull_enabled: bool,
        keys: crate::trust::SchedulerKeys,
    ) -> Result<Scheduler, String> {
        std::sync::LazyLock::force(&PROCESS_START);
        let applied = store
            .migrate()
            .map_err(|e| format!("store {}: {e}", store.describe()))?;
        if !applied.is_empty() {
            let to = applied
                .iter()
                .max()
                .map_or(String::new(), |v| v.to_string());
            log::info!(target: LOG, "store {} migrated to version {to}", store.describe());
        }
        let (kick_dispatch, dispatch_rx) = crossbeam_channel::bounded(1);
        let (kick_callbacks, callbacks_rx) = crossbeam_channel::bounded(1);
        let core = Arc::new(Core {
            store,
            cfg,
            metrics: Metrics::default(),
            deliveries,
            kick_dispatch,
            kick_callbacks,
            stopping: AtomicBool::new(false),
            followers: AtomicUsize::new(0),
            health: Arc::new(crate::supervise::Health::default()),
            node_table,
            pull_enabled,
            policies: Mutex::new(HashMap::new()),
            pull_gen: (Mutex::new(0), std::sync::Condvar::new()),
            keys,
        });
        let http = http::HttpServer::start(core.clone())?;
        // Each loop is restarted if it panics (supervise), so no input can stop it for good.
        let spawn = |name: &str, f: Box<dyn Fn(&Core) + Send>| {
            let (c, stop) = (core.clone(), core.clone());
            crate::supervise::spawn(&core.health, name, move || stop.stopping(), move || f(&c))
                .map_err(|e| format!("cannot start thread {name}: {e}"))
        };
        let mut threads = vec![
            spawn(
                "sched-dispatch",
                Box::new(move |c| dispatcher(c, &dispatch_rx)),
            )?,
            spawn("sched-ingest", Box::new(move |c| ingest(c, &reports)))?,
            spawn("sched-cron", Box::new(cron_ticker))?,
            spawn("sched-sweeper", Box::new(sweeper))?,
            spawn(
                "sched-callbacks",
                Box::new(move |c| callbacks::run(c, &callbacks_rx)),
            )?,
        ];
        threads.shrink_to_fit();
        Ok(Scheduler {
            core,
            threads,
            http: Some(http),
        })
    }

    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(|h| h.addr)
    }

    /// Stops intake first, then the loops. The caller stops its nodes afterwards: what they
    /// still run is no longer reported and ends up `lost` (or retried) on the next start.
    pub fn stop(mut self) {
        self.core.stopping.store(true, Ordering::SeqCst);
        if let Some(h) = self.http.take() {
            h.stop();
        }
        kick(&self.core.kick_dispatch);
        kick(&self.core.kick_callbacks);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Claims due executions and hands them to their delivery path.
fn dispatcher(core: &Core, wake: &Receiver<()>) {
    let poll = Duration::from_millis(core.cfg.scheduler.poll_interval_ms.max(10));
    while !core.stopping() {
        let now = now_ms();
        if let Err(e) = core.store.promote_retries(now) {
            log::warn!(target: LOG, "cannot promote retries: {e}");
        }
        let mut busy = false;
        for d in &core.deliveries {
            let free = d.free_slots().min(256);
            if free == 0 {
                continue;
            }
            // Each delivery claims only executions of its own path.
            let claimed = match core.store.claim_due(now, free as u32, d.node(), d.path()) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!(target: LOG, "cannot claim due executions: {e}");
                    break;
                }
            };
            busy |= claimed.len() == free;
            for c in claimed {
                // One execution that trips a bug must not strand the rest of the batch (they
                // are claimed already): it is put back, the others go on.
                let (id, attempt) = (c.id, c.attempt);
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    dispatch_one(core, d.as_ref(), c)
                }));
                if ok.is_err() {
                    log::error!(target: LOG, "execution={id} attempt={attempt} dispatch panicked; put back in the queue");
                    let _ = core.store.unclaim(id, attempt, now_ms() + 5_000);
                }
            }
        }
        if busy {
            continue; // more may be due right now
        }
        let _ = wake.recv_timeout(poll);
    }
}

/// The dispatch of a claimed attempt (and its retry policy cached for the outcome); a task
/// spec that cannot be read fails the execution instead.
fn prepare(core: &Core, c: &crate::store::Claimed) -> Option<Dispatch> {
    let spec: TaskSpec = match serde_json::from_value(c.spec.clone()) {
        Ok(s) => s,
        Err(e) => {
            let fin = Finish {
                status: Some(Status::Failed),
                error: Some(format!("stored task spec unreadable: {e}")),
                ..Finish::default()
            };
            core.finish(c.id, c.attempt, fin);
            return None;
        }
    };
    let policy = core.policy(c.task_id, Some(&spec));
    core.policies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((c.id, c.attempt), policy);
    Some(Dispatch {
        execution_id: c.id,
        task_id: c.task_id,
        attempt: c.attempt,
        timeout: Some(Duration::from_millis(core.timeout_ms(&spec) as u64)),
        pool: spec.target.as_ref().and_then(|t| t.pool.clone()),
        route: spec
            .target
            .as_ref()
            .map(|t| crate::delivery::Route {
                strategy: t.strategy,
                node: t.node.clone(),
                key: t.key.clone(),
            })
            .unwrap_or_default(),
        program: spec.program,
        shard_index: c.shard_index,
        shard_total: c.shard_total,
        stamp: Default::default(),
    })
    .map(|mut d| {
        if let Some(n) = &c.pin_node {
            // A broadcast shard runs on its node or not at all.
            d.route = crate::delivery::Route {
                strategy: Some(Strategy::Pinned),
                node: Some(n.clone()),
                key: None,
            };
        }
        d
    })
}

fn dispatch_one(core: &Core, d: &dyn Delivery, c: crate::store::Claimed) {
    let now = now_ms();
    let Some(dispatch) = prepare(core, &c) else {
        return;
    };
    let placed = |node: &str| {
        if let Err(e) = core.store.set_node(c.id, c.attempt, node) {
            log::warn!(target: LOG, "execution={} cannot record node {node}: {e}", c.id);
        }
    };
    match d.dispatch(dispatch, &placed) {
        Ok(()) => {
            core.metrics
                .observe_dispatch(now.saturating_sub(c.due_at).max(0) as u64);
            log::debug!(target: LOG, "execution={} attempt={} dispatched path={}", c.id, c.attempt, d.path());
        }
        Err(Refused::Busy(why)) => {
            core.policies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(c.id, c.attempt));
            log::info!(target: LOG, "execution={} attempt={} node={} busy ({why}); back to the queue", c.id, c.attempt, d.node());
            let _ = core.store.unclaim(c.id, c.attempt, now);
        }
        Err(Refused::Rejected(why)) => {
            let fin = Finish {
                status: Some(Status::Failed),
                error: Some(why),
                ..Finish::default()
            };
            core.finish(c.id, c.attempt, fin);
        }
    }
}

fn finish_of(outcome: &Outcome) -> Finish {
    Finish {
        status: Some(outcome.status()),
        exit_code: outcome.exit_code.map(i64::from),
        signal: outcome.signal.map(i64::from),
        result: outcome.result.clone(),
        result_error: outcome.result_error.clone(),
        error: outcome.error(),
        resources: outcome
            .resources
            .as_ref()
            .and_then(|r| serde_json::to_value(r).ok()),
        retry_at: None,
        callback_url: None,
    }
}

/// Reports of in-process nodes and gRPC executors → store, in batches.
fn ingest(core: &Core, reports: &Receiver<RunEvent>) {
    const BATCH: usize = 256;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        match reports.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => batch.push(ev),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if core.stopping() => return,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        if core.stopping() {
            return; // what is still running is recovered as lost on the next start
        }
        while batch.len() < BATCH {
            match reports.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        // Errors are logged where they happen; a gRPC executor's reports were acknowledged
        // when queued here.
        let _ = core.apply_events(None, 0, &batch);
        batch.clear();
    }
}

/// Fires due cron tasks. A fire is a compare-and-set on the task's next fire time, so several
/// schedulers fire each time once; the overlap policy is decided inside it (`Store::fire_cron`).
fn cron_ticker(core: &Core) {
    let tick = Duration::from_millis(200);
    let late_after = (4 * core.cfg.scheduler.poll_interval_ms).max(2_000) as i64;
    while !core.stopping() {
        let now = now_ms();
        match core.store.due_cron(now, 100) {
            Ok(tasks) => {
                for t in tasks {
                    fire_one(core, &t, now, late_after);
                }
            }
            Err(e) => log::warn!(target: LOG, "cannot read due cron tasks: {e}"),
        }
        std::thread::sleep(tick);
    }
}

fn fire_one(core: &Core, t: &crate::store::TaskRow, now: i64, late_after: i64) {
    let (Some(expr), Some(expected)) = (t.cron_expr.as_deref(), t.next_fire_at) else {
        return;
    };
    let spec = serde_json::from_value::<TaskSpec>(t.spec.clone()).ok();
    let (zone, overlap) = match spec.as_ref().map(|s| &s.schedule) {
        Some(Schedule::Cron {
            timezone, overlap, ..
        }) => (timezone.as_deref().unwrap_or("UTC"), *overlap),
        _ => ("UTC", crate::model::Overlap::default()),
    };
    // An expression that no longer parses (stored by an older version) stops the task with a
    // log line instead of firing at times nobody asked for.
    let next = match crate::cron::zone(zone)
        .map_err(|e| e.to_string())
        .and_then(|z| parse_cron(expr, z).map_err(|e| e.message))
    {
        Ok(s) => next_fire(&s, now),
        Err(e) => {
            log::error!(target: LOG, "task={} cron schedule unusable, no further fires: {e}", t.id);
            None
        }
    };
    let deadline = spec.as_ref().map(|s| core.timeout_ms(s));
    let missed = now - expected > late_after;
    if missed && core.cfg.scheduler.missed_fires() == CronMissed::Skip {
        // Only move the fire time on; a CAS like the fire itself.
        let _ = core.store.skip_cron(t.id, expected, next);
        log::info!(target: LOG, "task={} missed fire at {expected} skipped", t.id);
        return;
    }
    // Broadcast: one execution per node alive now, the policy applied per node.
    let broadcast = spec.as_ref().filter(|s| s.is_broadcast());
    let nodes = broadcast.map(|s| core.broadcast_nodes(s));
    if nodes.as_ref().is_some_and(Vec::is_empty) {
        log::warn!(target: LOG, "task={} broadcast fire: no live node in the pool; skipped", t.id);
        let _ = core.store.skip_cron(t.id, expected, next);
        return;
    }
    let fire = Fire {
        task: t.id,
        expected,
        next,
        overlap,
        nodes: nodes.as_deref(),
        deadline_ms: deadline,
    };
    match core.store.fire_cron(&fire, now) {
        Ok(Some(fired)) => {
            for (id, attempt, was) in &fired.cancelled {
                core.cancelled(*id, *attempt, *was, now);
            }
            if fired.skipped > 0 {
                log::info!(target: LOG, "task={} overlap={} fire skipped ({} not ended)", t.id, overlap.as_str(),
                    if broadcast.is_some() { format!("{} nodes' previous executions", fired.skipped) } else { "previous execution".into() });
            }
            if !fired.created.is_empty() {
                log::info!(target: LOG, "task={} cron fired executions={:?}{}", t.id,
                    fired.created.iter().map(|e| e.0).collect::<Vec<_>>(),
                    if missed { " (missed fires collapsed into one)" } else { "" });
                core.wake_dispatch();
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!(target: LOG, "task={} cannot fire: {e}", t.id),
    }
}

/// Keeps this scheduler's nodes' executions alive in the store and ends (or retries) those of
/// nodes that went silent: a crashed scheduler's built-in node, later a dead executor.
fn sweeper(core: &Core) {
    let every = Duration::from_millis(core.cfg.scheduler.heartbeat_interval_ms.max(100));
    let silent_after = core.cfg.scheduler.node_silent_after_ms as i64;
    let started = std::time::Instant::now();
    // Purge soon after start, then once a minute (1,000 executions per pass).
    let mut last_purge = std::time::Instant::now() - Duration::from_secs(55);
    while !core.stopping() {
        let now = now_ms();
        // The nodes alive right now: this process's own, and (with a registry) every node whose
        // etcd lease is live. What they hold is heartbeated; what a node whose lease expired
        // still held stops being heartbeated and is swept as lost below.
        let mut alive: Vec<String> = core
            .deliveries
            .iter()
            .map(|d| d.node().to_owned())
            .collect();
        if let Some(t) = &core.node_table {
            // Agents list the runs they hold in their own heartbeats (see `ReportSink::alive`):
            // a live lease alone must not keep a run whose outcome was lost in transit alive.
            alive.extend(
                t.nodes()
                    .into_iter()
                    .filter(|n| n.role != NodeRole::Agent)
                    .map(|n| n.id),
            );
        }
        alive.sort();
        alive.dedup();
        for n in &alive {
            if let Err(e) = core.store.heartbeat(n, now) {
                log::warn!(target: LOG, "node={n} heartbeat not recorded: {e}");
            }
        }
        let days = core.cfg.scheduler.retention_days;
        if days > 0 && last_purge.elapsed() >= Duration::from_secs(60) {
            last_purge = std::time::Instant::now();
            match core.store.purge(now - (days as i64) * 86_400_000, 1_000) {
                Ok(0) => {}
                Ok(n) => {
                    log::info!(target: LOG, "purged {n} executions finished over {days} days ago")
                }
                Err(e) => log::warn!(target: LOG, "cannot purge old executions: {e}"),
            }
        }
        // Right after a start every heartbeat in the store is as old as our own downtime: give
        // live nodes one silence period (and the node table its first read) to refresh theirs
        // before anything is declared lost.
        let table_ready = core.node_table.as_ref().is_none_or(|t| t.synced());
        if !table_ready || started.elapsed() < Duration::from_millis(silent_after as u64) {
            sleep_or_stop(core, every);
            continue;
        }
        // Work that waited too long for a node to take it fails with a clear error.
        let wait = core.cfg.scheduler.no_node_timeout_seconds as i64 * 1000;
        if wait > 0 {
            for path in [DeliveryPath::Push, DeliveryPath::Pull] {
                let why = format!("no live {path} node took it within {} s", wait / 1000);
                match core.store.fail_unplaced(path, now - wait, &why, now, 100) {
                    Ok(ids) => {
                        for id in &ids {
                            log::warn!(target: LOG, "execution={id} failed: {why}");
                        }
                        if !ids.is_empty() {
                            kick(&core.kick_callbacks);
                        }
                    }
                    Err(e) => log::warn!(target: LOG, "cannot expire unplaced executions: {e}"),
                }
            }
        }
        // Dispatches that waited in transit past their expiry: no node will start them now.
        for d in &core.deliveries {
            let Some(after) = d.unstarted_after() else {
                continue;
            };
            match core
                .store
                .unstarted(d.path(), d.node(), now - after.as_millis() as i64, 100)
            {
                Ok(list) => {
                    for (id, attempt) in list {
                        core.requeue(
                            id,
                            attempt,
                            "no node started its dispatch before it expired",
                            None,
                        );
                    }
                }
                Err(e) => log::warn!(target: LOG, "cannot look for unstarted dispatches: {e}"),
            }
        }
        match core.store.silent(now - silent_after, now, 100) {
            Ok(list) => {
                for s in list {
                    // A node this process knows to be alive (its own, or one whose lease is
                    // live) is only late, e.g. behind a slow store: never declare it lost.
                    if s.node
                        .as_deref()
                        .is_some_and(|n| alive.iter().any(|a| a == n))
                    {
                        continue;
                    }
                    let (status, error) = if s.deadline_passed {
                        (
                            Status::TimedOut,
                            "timed out: its node stopped reporting past the deadline",
                        )
                    } else {
                        (Status::Lost, "lost: its node stopped reporting")
                    };
                    log::warn!(target: LOG, "execution={} attempt={} was {} on a silent node; {status}", s.id, s.attempt, s.status);
                    let fin = Finish {
                        status: Some(status),
                        error: Some(error.into()),
                        ..Finish::default()
                    };
                    core.finish(s.id, s.attempt, fin);
                }
            }
            Err(e) => log::warn!(target: LOG, "cannot look for silent executions: {e}"),
        }
        sleep_or_stop(core, every);
    }
}

fn sleep_or_stop(core: &Core, d: Duration) {
    let deadline = std::time::Instant::now() + d;
    while !core.stopping() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}
