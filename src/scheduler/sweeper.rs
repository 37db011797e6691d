//! The sweeper: keeps this scheduler's nodes' executions alive in the store, ends or retries
//! those of nodes that went silent, fails work no node took in time, purges old executions.

use std::time::Duration;

use super::{kick, Core, LOG};
use crate::model::{DeliveryPath, NodeRole, Status};
use crate::now_ms;
use crate::store::Finish;

/// Keeps this scheduler's nodes' executions alive in the store and ends (or retries) those of
/// nodes that went silent: a crashed scheduler's built-in node, later a dead executor.
pub(super) fn sweeper(core: &Core) {
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
    core.shutdown.sleep(d);
}
