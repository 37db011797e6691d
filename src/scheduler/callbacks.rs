//! The callback outbox: POSTs an execution's JSON to its task's `callback_url` once it is
//! final. Rows live in the store, so a restart resumes where it stopped; failures back off
//! exponentially up to `callbacks.max_attempts`.

use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{Core, LOG};
use crate::now_ms;

pub(super) fn run(core: &Core, wake: &Receiver<()>) {
    let cfg = core.cfg.callbacks.clone();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(cfg.timeout_ms.max(100)))
        .build();
    while !core.stopping() {
        let now = now_ms();
        let due = match core.store.outbox_due(now, 32) {
            Ok(d) => d,
            Err(e) => {
                log::warn!(target: LOG, "cannot read the callback outbox: {e}");
                Vec::new()
            }
        };
        for row in &due {
            if core.stopping() {
                return;
            }
            let body = match core.store.get_execution(row.execution_id) {
                Ok(Some(e)) => e.to_json(),
                Ok(None) => {
                    let _ = core.store.outbox_result(
                        row.id,
                        false,
                        Some("execution no longer exists"),
                        None,
                    );
                    continue;
                }
                Err(e) => {
                    log::warn!(target: LOG, "execution={} callback postponed: {e}", row.execution_id);
                    continue;
                }
            };
            let sent = agent
                .post(&row.url)
                .set("Content-Type", "application/json")
                .set("User-Agent", concat!("etask/", env!("CARGO_PKG_VERSION")))
                .send_string(&body.to_string());
            match sent {
                Ok(_) => {
                    log::info!(target: LOG, "execution={} callback delivered url={}", row.execution_id, row.url);
                    core.metrics
                        .callbacks_sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = core.store.outbox_result(row.id, true, None, None);
                }
                Err(e) => {
                    let attempts = row.attempts + 1;
                    let err = match &e {
                        ureq::Error::Status(code, _) => format!("HTTP {code}"),
                        ureq::Error::Transport(t) => t.to_string(),
                    };
                    let next = (attempts < i64::from(cfg.max_attempts)).then(|| {
                        let exp = (attempts - 1).clamp(0, 30) as u32;
                        now_ms()
                            + cfg
                                .initial_backoff_ms
                                .saturating_mul(1 << exp)
                                .min(cfg.max_backoff_ms) as i64
                    });
                    match next {
                        Some(_) => {
                            log::warn!(target: LOG, "execution={} callback attempt {attempts} failed: {err}; will retry", row.execution_id)
                        }
                        None => {
                            log::error!(target: LOG, "execution={} callback given up after {attempts} attempts: {err}", row.execution_id);
                            core.metrics
                                .callbacks_failed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    let _ = core.store.outbox_result(row.id, false, Some(&err), next);
                }
            }
        }
        if due.len() < 32 {
            let _ = wake.recv_timeout(Duration::from_millis(500));
        }
    }
}
