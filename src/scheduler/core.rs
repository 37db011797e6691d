//! The scheduler's shared state (`Core`) and what the intake does with it: submit, cancel,
//! pause/resume, run-now; the retry policy of attempts; requeueing work a node never started.
//! The threads that move executions are in dispatch.rs, ingest.rs, cron.rs and sweeper.rs;
//! HTTP and gRPC handlers call the methods here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::{json, Value};

use super::api::{next_fire, parse_cron, resolve_zone, ApiError, RetryPolicy, Schedule, TaskSpec};
use super::metrics::Metrics;
use super::{callbacks, kick, LOG, PROCESS_START};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::model::{Attempt, DeliveryPath, ExecutionId, NodeRole, Status, TaskId};
use crate::now_ms;
use crate::registry::{NodeInfo, NodeTable};
use crate::shutdown::Backoff;
use crate::store::{CancelOutcome, Created, Finish, NewTask, Store};

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

/// State shared by the scheduler's threads and HTTP handlers.
pub struct Core {
    pub store: Arc<dyn Store>,
    pub cfg: Config,
    pub metrics: Metrics,
    pub(super) deliveries: Vec<Arc<dyn Delivery>>,
    pub(super) kick_dispatch: Sender<()>,
    pub(super) kick_callbacks: Sender<()>,
    /// Triggered by `Scheduler::stop`; every loop waits on it.
    pub(super) shutdown: crate::shutdown::Shutdown,
    pub followers: AtomicUsize,
    /// The scheduler's component threads, for `/healthz`.
    pub health: Arc<crate::supervise::Health>,
    /// Live nodes from etcd, when a registry is configured.
    pub(super) node_table: Option<Arc<NodeTable>>,
    /// Executors may Pull work (the gRPC service is up).
    pub(super) pull_enabled: bool,
    /// Retry policy and callback URL of dispatched attempts, so a report needs no task lookup.
    /// Filled at dispatch, taken at finish; a miss (after a restart) falls back to the store.
    pub(super) policies: Mutex<HashMap<(ExecutionId, Attempt), Policy>>,
    /// Bumped (and waiters notified) whenever work may have become due for Pull.
    pub(super) pull_gen: (Mutex<u64>, std::sync::Condvar),
    /// Signs pulled dispatches; seals secrets at intake.
    pub(super) keys: crate::trust::SchedulerKeys,
    /// Log chunks of in-process reports the store refused (a full disk): per attempt, the
    /// first lost chunk's seq, how many were lost, and why — until a note saying so is stored
    /// in the first one's place (`ingest.rs`).
    pub(super) lost_logs: Mutex<std::collections::BTreeMap<(ExecutionId, Attempt), LostLogs>>,
}

/// Log chunks of one attempt that could not be stored.
pub(super) struct LostLogs {
    pub(super) first_seq: u64,
    pub(super) chunks: u64,
    pub(super) reason: String,
}

#[derive(Clone)]
pub(super) struct Policy {
    pub(super) retry: RetryPolicy,
    pub(super) callback_url: Option<String>,
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
        super::metrics::render_skipped_fires(
            &mut text,
            &self.store.skipped_fires().unwrap_or_default(),
        );
        text
    }

    /// `/healthz`: (healthy, body). Healthy when the store answers and takes writes and every
    /// component thread runs; the body names each component (no paths, no addresses, no
    /// error texts: the endpoint is open). `store` is `ok`, `unavailable` (no answer) or
    /// `refusing writes` (`Store::refusing_writes`: it answers but its newest write failed,
    /// e.g. a full disk: logs and outcomes wait or are noted as lost). `log` is `ok` or `dropping lines`
    /// (stderr takes no lines: the log has a gap; the server itself is not held up by it, so
    /// this alone does not make it unhealthy).
    pub fn health(&self) -> (bool, Value) {
        let store_up = self.store.ping().is_ok();
        let store_writes = !self.store.refusing_writes();
        let comps_ok = self.health.all_running() || self.stopping();
        let ok = store_up && store_writes && comps_ok;
        let body = serde_json::json!({
            "status": if ok { "ok" } else if !store_up { "store unavailable" } else { "degraded" },
            "store": match (store_up, store_writes) {
                (false, _) => "unavailable",
                (true, false) => "refusing writes",
                (true, true) => "ok",
            },
            "log": if crate::logging::lines_dropped_now() > 0 { "dropping lines" } else { "ok" },
            // Open to anyone: whether each component runs and how often it restarted, not
            // its panic messages (those are in the log).
            "components": self.health.to_json_public(),
        });
        (ok, body)
    }

    pub fn stopping(&self) -> bool {
        self.shutdown.is_triggered()
    }

    pub(super) fn default_retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.cfg.scheduler.default_max_attempts,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        }
    }

    pub(super) fn timeout_ms(&self, spec: &TaskSpec) -> i64 {
        let secs = spec
            .timeout_seconds
            .unwrap_or(self.cfg.scheduler.default_timeout_seconds as f64);
        (secs * 1000.0) as i64
    }

    /// Creates a task (and its first execution for `once`); idempotent on `request_id`.
    /// The nodes a broadcast of `spec` runs on: the live nodes of its path and pool.
    pub(super) fn broadcast_nodes(&self, spec: &TaskSpec) -> Vec<String> {
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
                .map_err(|e| e.to_string())
                .and_then(|p| p.check_url(u).map_err(|e| e.0))
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
    pub(super) fn seal_secrets(&self, spec: &mut TaskSpec) -> Result<(), ApiError> {
        let p = &spec.program;
        if p.secret_env.is_empty() && !p.variables.iter().any(|v| v.secret) {
            return Ok(());
        }
        match self.keys.seal_key(spec.path(), spec.pool()) {
            Some(k) => k
                .seal_program(&mut spec.program)
                .map_err(|e| ApiError::invalid(e.0)),
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
    pub(super) fn cron_task(
        &self,
        id: TaskId,
        action: &str,
    ) -> Result<crate::store::TaskRow, ApiError> {
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
    pub(super) fn cancelled(&self, id: ExecutionId, attempt: Attempt, was: Status, now: i64) {
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

    pub(super) fn queue_callback(&self, id: ExecutionId, now: i64) {
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

    pub(super) fn policy(&self, task: TaskId, spec: Option<&TaskSpec>) -> Policy {
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
    pub(super) fn policy_of(&self, id: ExecutionId, attempt: Attempt) -> Option<Policy> {
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
    pub(super) fn finish(&self, id: ExecutionId, attempt: Attempt, fin: Finish) {
        let _ = self.finish_all(vec![(id, attempt, fin)]);
    }

    /// Records how attempts ended, in one store transaction, applying each task's retry
    /// policy; stale reports change nothing. Err = the store did not take them.
    pub(super) fn finish_all(
        &self,
        mut items: Vec<(ExecutionId, Attempt, Finish)>,
    ) -> Result<(), crate::store::StoreError> {
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
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
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
                    self.shutdown.sleep(backoff.next_delay());
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
                return Err(e);
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
    fn submit_json(&self, body: &[u8]) -> Result<crate::delivery::Submitted, ApiError> {
        let limit = self.cfg.server.max_body_bytes;
        if body.len() > limit {
            return Err(ApiError::too_large(format!(
                "task over the {limit}-byte limit"
            )));
        }
        let spec = TaskSpec::parse(body, &self.paths())?;
        let (c, all) = self.submit(spec)?;
        Ok(crate::delivery::Submitted {
            task_id: c.task_id,
            execution_id: c.execution_id,
            existed: c.existed,
            executions: all,
        })
    }

    fn execution_json(&self, id: i64) -> Result<String, ApiError> {
        match self.store.get_execution(ExecutionId(id))? {
            Some(e) => Ok(e.to_json().to_string()),
            None => Err(ApiError::not_found(format!("execution {id} not found"))),
        }
    }

    fn cancel_json(&self, id: i64) -> Result<String, ApiError> {
        self.cancel(ExecutionId(id)).map(|v| v.to_string())
    }
}

impl Core {
    /// New work may be due: wake the dispatcher and every waiting Pull.
    pub(super) fn wake_dispatch(&self) {
        kick(&self.kick_dispatch);
        self.wake_pullers();
    }

    /// Wakes every waiting Pull: new work may be there.
    pub(super) fn wake_pullers(&self) {
        let (lock, cv) = &self.pull_gen;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cv.notify_all();
    }
}

impl Core {
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

    pub(super) fn requeue(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        why: &str,
        holder: Option<&str>,
    ) {
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
    pub(super) fn agent_silence_allowance(&self) -> i64 {
        self.cfg
            .kafka
            .agent_silent_after_ms
            .saturating_sub(self.cfg.scheduler.node_silent_after_ms) as i64
    }
}
