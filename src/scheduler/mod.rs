//! The scheduler: starts and stops its threads (`Scheduler`). `core.rs` holds the shared state
//! and the intake's operations; the threads that move executions through their states are
//! `dispatch.rs` (claims due work, hands it to a `Delivery`; pull claims), `ingest.rs` (node
//! reports → store), `cron.rs` (the cron ticker), `sweeper.rs` (silent nodes, unplaced work,
//! purging) and `callbacks.rs` (the outbox); `http/` is the intake, `api.rs` its shapes. Threads
//! talk through the store and small wake-up channels.

pub mod api;
pub mod callbacks;
pub mod http;
pub mod metrics;

mod core;
mod cron;
mod dispatch;
mod ingest;
mod sweeper;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

pub use self::core::{builtin_node_info, Core};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::now_ms;
use crate::registry::NodeTable;
use crate::runner::RunEvent;
use crate::store::Store;
use metrics::Metrics;

/// The scheduler could not start: its store, its listener or a thread (the message says which).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// Back to its message, for callers that still carry errors as text.
impl From<StartError> for String {
    fn from(e: StartError) -> String {
        e.0
    }
}

/// When this process started its scheduler (read once, at `Scheduler::start`).
static PROCESS_START: std::sync::LazyLock<i64> = std::sync::LazyLock::new(now_ms);

const LOG: &str = "etask::scheduler";

fn kick(tx: &Sender<()>) {
    // Capacity 1: a pending wake-up already covers this one.
    let _ = tx.try_send(());
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
    ) -> Result<Scheduler, StartError> {
        Self::start_inner(
            store,
            cfg,
            deliveries,
            reports,
            node_table,
            pull_enabled,
            keys,
        )
        .map_err(StartError)
    }

    fn start_inner(
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
            shutdown: crate::shutdown::Shutdown::new(),
            followers: AtomicUsize::new(0),
            health: Arc::new(crate::supervise::Health::default()),
            node_table,
            pull_enabled,
            policies: Mutex::new(HashMap::new()),
            lost_logs: Mutex::new(std::collections::BTreeMap::new()),
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
                Box::new(move |c| dispatch::dispatcher(c, &dispatch_rx)),
            )?,
            spawn(
                "sched-ingest",
                Box::new(move |c| ingest::ingest(c, &reports)),
            )?,
            spawn("sched-cron", Box::new(cron::cron_ticker))?,
            spawn("sched-sweeper", Box::new(sweeper::sweeper))?,
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
        self.core.shutdown.trigger();
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
