//! Component threads that outlive a panic: each named loop of a process runs under
//! [`spawn`], which restarts it (with a growing pause) when it panics, so no input from outside
//! can stop a component for good, and records its state in a [`Health`] table that `/healthz`
//! reports. A loop that returns has ended on purpose (shutdown) and is not restarted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::shutdown::Backoff;

const LOG: &str = "etask::supervise";

/// The state of one component thread.
#[derive(Debug, Clone, Default)]
pub struct Component {
    pub running: bool,
    /// Times it panicked and was started again.
    pub restarts: u32,
    /// The message of its last panic.
    pub last_panic: Option<String>,
}

/// The component table of a process.
#[derive(Debug, Default)]
pub struct Health {
    comps: Mutex<BTreeMap<String, Component>>,
}

impl Health {
    fn update(&self, name: &str, f: impl FnOnce(&mut Component)) {
        let mut c = self.comps.lock().unwrap_or_else(|p| p.into_inner());
        f(c.entry(name.to_owned()).or_default());
    }

    /// True when every component is running.
    pub fn all_running(&self) -> bool {
        let c = self.comps.lock().unwrap_or_else(|p| p.into_inner());
        c.values().all(|c| c.running)
    }

    /// `{"<name>": {"running", "restarts"}}`: what may be shown to anyone.
    pub fn to_json_public(&self) -> Value {
        let c = self.comps.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    json!({"running": c.running, "restarts": c.restarts}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// `{"<name>": {"running", "restarts", "last_panic"}}`.
    pub fn to_json(&self) -> Value {
        let c = self.comps.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    json!({"running": c.running, "restarts": c.restarts, "last_panic": c.last_panic}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Starts `body` on a thread named `name`; restarts it after a panic (pause 0.1 s doubling
/// to 10 s) unless `stopping()` says the process is shutting down.
///
/// # Errors
/// The thread could not be created.
pub fn spawn(
    health: &Arc<Health>,
    name: &str,
    stopping: impl Fn() -> bool + Send + 'static,
    body: impl Fn() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let health = health.clone();
    let n = name.to_owned();
    health.update(&n, |c| c.running = true);
    std::thread::Builder::new().name(n.clone()).spawn(move || {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&body)) {
                Ok(()) => {
                    health.update(&n, |c| c.running = false);
                    return;
                }
                Err(p) => {
                    let msg = panic_message(p.as_ref());
                    let pause = backoff.next_delay();
                    log::error!(target: LOG, "component={n} panicked: {msg}; restarting in {} ms", pause.as_millis());
                    health.update(&n, |c| {
                        c.restarts += 1;
                        c.last_panic = Some(msg);
                    });
                    if stopping() {
                        health.update(&n, |c| c.running = false);
                        return;
                    }
                    std::thread::sleep(pause);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_panicking_component_is_restarted_and_reported() {
        let health = Arc::new(Health::default());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let h = spawn(
            &health,
            "flaky",
            || false,
            move || {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("bad input");
                }
            },
        )
        .unwrap();
        h.join().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let j = health.to_json();
        assert_eq!(j["flaky"]["restarts"], 2);
        assert_eq!(j["flaky"]["last_panic"], "bad input");
        assert_eq!(
            j["flaky"]["running"], false,
            "returned normally: ended on purpose"
        );
    }
}
