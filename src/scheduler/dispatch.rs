//! The dispatcher thread: claims due executions and hands each to its path's `Delivery`; and
//! the pull side of the same work (`PullSource`), where executors long-poll for it.

use std::collections::HashMap;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::api::TaskSpec;
use super::{Core, LOG};
use crate::delivery::{Delivery, Dispatch, Refused};
use crate::model::{Attempt, DeliveryPath, ExecutionId, Status, Strategy};
use crate::now_ms;
use crate::store::Finish;

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

/// Claims due executions and hands them to their delivery path.
pub(super) fn dispatcher(core: &Core, wake: &Receiver<()>) {
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
        // Woken by new work, by shutdown, or at the next poll.
        crossbeam_channel::select! {
            recv(wake) -> _ => {}
            recv(core.shutdown.channel()) -> _ => {}
            default(poll) => {}
        }
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
