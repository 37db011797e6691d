//! The cron ticker: fires due cron tasks. A fire is a compare-and-set on the task's next fire
//! time, so several schedulers fire each time once; the overlap policy is decided inside it.

use std::time::Duration;

use super::api::{next_fire, parse_cron, Schedule, TaskSpec};
use super::{Core, LOG};
use crate::model::CronMissed;
use crate::now_ms;
use crate::store::Fire;

/// Fires due cron tasks. A fire is a compare-and-set on the task's next fire time, so several
/// schedulers fire each time once; the overlap policy is decided inside it (`Store::fire_cron`).
pub(super) fn cron_ticker(core: &Core) {
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
        core.shutdown.sleep(tick);
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
