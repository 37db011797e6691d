//! Counters the scheduler keeps in memory, rendered with the store's counts as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::Status;

/// Dispatch latency buckets (ms): due time → handed to a node.
const BUCKETS_MS: [u64; 12] = [1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

#[derive(Default)]
pub struct Metrics {
    pub tasks_submitted: AtomicU64,
    pub dispatched: AtomicU64,
    pub callbacks_sent: AtomicU64,
    pub callbacks_failed: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_ms: AtomicU64,
}

impl Metrics {
    pub fn observe_dispatch(&self, latency_ms: u64) {
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if latency_ms <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(latency_ms, Ordering::Relaxed);
    }

    pub fn render(&self, by_status: &[(Status, i64)], outbox_pending: i64) -> String {
        let mut s = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP etask_tasks_submitted_total Tasks created through this scheduler."
        );
        let _ = writeln!(s, "# TYPE etask_tasks_submitted_total counter");
        let _ = writeln!(
            s,
            "etask_tasks_submitted_total {}",
            c(&self.tasks_submitted)
        );
        let _ = writeln!(
            s,
            "# HELP etask_executions Executions in the store by status."
        );
        let _ = writeln!(s, "# TYPE etask_executions gauge");
        for st in Status::ALL {
            let n = by_status
                .iter()
                .find(|(s, _)| *s == st)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(s, "etask_executions{{status=\"{st}\"}} {n}");
        }
        let queued: i64 = by_status
            .iter()
            .filter(|(s, _)| matches!(s, Status::Pending | Status::RetryWait))
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            s,
            "# HELP etask_queue_depth Executions waiting for a node (pending or retry_wait)."
        );
        let _ = writeln!(s, "# TYPE etask_queue_depth gauge");
        let _ = writeln!(s, "etask_queue_depth {queued}");
        let _ = writeln!(
            s,
            "# HELP etask_callbacks_pending Callbacks not delivered yet."
        );
        let _ = writeln!(s, "# TYPE etask_callbacks_pending gauge");
        let _ = writeln!(s, "etask_callbacks_pending {outbox_pending}");
        let _ = writeln!(s, "# TYPE etask_callbacks_sent_total counter");
        let _ = writeln!(s, "etask_callbacks_sent_total {}", c(&self.callbacks_sent));
        let _ = writeln!(s, "# TYPE etask_callbacks_failed_total counter");
        let _ = writeln!(
            s,
            "etask_callbacks_failed_total {}",
            c(&self.callbacks_failed)
        );
        let _ = writeln!(
            s,
            "# HELP etask_dispatch_latency_seconds From due time to hand-off to a node."
        );
        let _ = writeln!(s, "# TYPE etask_dispatch_latency_seconds histogram");
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                s,
                "etask_dispatch_latency_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1000.0,
                c(&self.latency_buckets[i])
            );
        }
        let _ = writeln!(
            s,
            "etask_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            c(&self.latency_count)
        );
        let _ = writeln!(
            s,
            "etask_dispatch_latency_seconds_sum {}",
            c(&self.latency_sum_ms) as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "etask_dispatch_latency_seconds_count {}",
            c(&self.latency_count)
        );
        s
    }
}

/// Cron fires the overlap policy skipped, per task (from the store, so every scheduler sharing
/// it shows the same counts, and they survive restarts). Only tasks that skipped any appear.
pub fn render_skipped_fires(s: &mut String, tasks: &[(crate::model::TaskId, String, i64)]) {
    let _ = writeln!(
        s,
        "# HELP etask_cron_skipped_fires_total Cron fires skipped by the task's overlap policy."
    );
    let _ = writeln!(s, "# TYPE etask_cron_skipped_fires_total counter");
    for (id, name, n) in tasks {
        let name = name
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = writeln!(
            s,
            "etask_cron_skipped_fires_total{{task_id=\"{id}\",name=\"{name}\"}} {n}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_dispatch(3);
        m.observe_dispatch(700);
        let text = m.render(&[(Status::Pending, 2)], 0);
        assert!(
            text.contains("etask_dispatch_latency_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("etask_dispatch_latency_seconds_bucket{le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("etask_queue_depth 2\n"));
    }
}
