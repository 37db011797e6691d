//! `etask server`: wires the roles of one process. `all` = scheduler + the built-in node (the
//! process pool behind the `local` delivery); `scheduler` = intake and store without a node;
//! `executor` and `agent` are nodes of the gRPC and Kafka paths (`crate::node`). With
//! `kafka.brokers` set, a scheduler (or `all`) also delivers to agents.

use std::sync::Arc;

use crate::config::Config;
use crate::delivery::local::Local;
use crate::delivery::Delivery;
use crate::model::DeliveryPath;
use crate::registry::{NodeTable, Registration};
use crate::runner::Pool;
use crate::scheduler::Scheduler;

/// The roles `etask server --mode` runs (the names live in the model).
pub use crate::model::Mode;

/// `etask server` could not start or stopped on an error; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ServerError(pub String);

/// Back to its message, for callers that still carry errors as text.
impl From<ServerError> for String {
    fn from(e: ServerError) -> String {
        e.0
    }
}

/// A unique id for this process's built-in node: executions it held before a crash are then
/// recognised as silent (and recovered) rather than mistaken for live ones after a restart.
fn node_id() -> String {
    format!(
        "local-{}-{:06x}",
        crate::host_pid(),
        fastrand::u32(..0xff_ffff)
    )
}

/// Opens the node's start journal in its data dir (`start.journal`): what the previous
/// incarnation took and never started, and a fresh journal for this one.
///
/// # Errors
/// The journal cannot be opened, or another running node uses this data dir.
pub fn open_journal(
    cfg: &Config,
    node: &str,
) -> Result<(Arc<crate::runner::StartJournal>, crate::runner::Previous), ServerError> {
    open_journal_inner(cfg, node).map_err(ServerError)
}

fn open_journal_inner(
    cfg: &Config,
    node: &str,
) -> Result<(Arc<crate::runner::StartJournal>, crate::runner::Previous), String> {
    crate::config::prepare_state_dir(&cfg.server.data_dir, cfg.node.run_as_uid >= 0)?;
    let path = cfg.server.data_dir.join("start.journal");
    let (j, prev) = crate::runner::StartJournal::open(&path, node)
        .map_err(|e| format!("cannot open the start journal {}: {e}", path.display()))?;
    Ok((Arc::new(j), prev))
}

/// The built-in node of a crashed `--mode all` started nothing without writing its `S` line
/// first, so every execution still `dispatched` to it (claimed, perhaps queued, perhaps not
/// even handed to its pool yet) whose attempt has no `S` line provably never ran: dispatched
/// again, free of the retry budget. After a reboot the journal proves nothing (see journal.rs).
fn recover_local(core: &crate::scheduler::Core, prev: &crate::runner::Previous) {
    let Some(started) = &prev.started else {
        return;
    };
    let held = match core
        .store
        .unstarted(DeliveryPath::Local, &prev.node, i64::MAX, 100_000)
    {
        Ok(h) => h,
        Err(e) => {
            log::warn!(target: "etask::server", "cannot look for the crashed node's unstarted work: {e}");
            return;
        }
    };
    let list: Vec<_> = held
        .into_iter()
        .filter(|(e, a)| !started.contains(&(e.0, a.0)))
        .collect();
    core.recover_unstarted(&prev.node, &list);
}

/// Runs until `stop` yields (SIGTERM/SIGINT in the CLI), then shuts down in order.
pub fn run(
    mode: Mode,
    cfg: Config,
    stop: crossbeam_channel::Receiver<i32>,
) -> Result<(), ServerError> {
    run_inner(mode, cfg, stop).map_err(ServerError)
}

fn run_inner(
    mode: Mode,
    cfg: Config,
    stop: crossbeam_channel::Receiver<i32>,
) -> Result<(), String> {
    match mode {
        Mode::Agent => return Ok(crate::node::agent::run(cfg, stop)?),
        Mode::Executor => return Ok(crate::node::executor::run(cfg, stop)?),
        Mode::Scheduler | Mode::All => {}
    }
    crate::scheduler::http::check_listen(&cfg)?;
    if !cfg.server.grpc_listen.is_empty() {
        crate::config::check_listener(
            "server.grpc_listen",
            &cfg.server.grpc_listen,
            &cfg.server.token,
        )?;
    }
    crate::config::prepare_state_dir(&cfg.server.data_dir, cfg.node.run_as_uid >= 0)?;
    // One SQLite file belongs to one process: a second `--mode all` in the same directory
    // is refused instead of sharing it.
    let store_url = cfg.store_url();
    let _sqlite_lock = match store_url.strip_prefix("sqlite:") {
        Some(db) => Some(crate::lock_exclusive(
            std::path::Path::new(&format!("{db}.lock")),
            &format!("the store {store_url}"),
            "give this one its own --data-dir (or server.store)",
        )?),
        None => None,
    };
    let store = crate::store::open(&store_url).map_err(|e| e.to_string())?;
    // Unbounded on purpose: the pool's reactor must never block on its consumer (timeouts and
    // kills run on that thread). The backlog is bounded by the per-run log cap times
    // node.max_concurrent, and drains as soon as the store answers again.
    let (reports_tx, reports_rx) = crossbeam_channel::unbounded();
    let reports_tx_sched = reports_tx.clone();
    let mut local = None;
    let mut deliveries: Vec<Arc<dyn Delivery>> = Vec::new();
    let mut previous = None;
    // --mode all signs and verifies always, with keys of its own in the data dir when none are
    // configured, so the trust path is exercised even on a try-out.
    let builtin = if mode == Mode::All {
        Some(
            crate::trust::builtin_keys(&cfg.server.data_dir)
                .map_err(|e| format!("built-in keys: {e}"))?,
        )
    } else {
        None
    };
    let keys = cfg.scheduler_keys(builtin.as_ref())?;
    for (key, token) in [
        ("server.token", &cfg.server.token),
        ("executor.token", &cfg.executor.token),
    ] {
        if !token.is_empty() && token.len() < 16 {
            log::warn!(target: "etask::server", "{key} is {} characters: use at least 16 random ones (e.g. `openssl rand -hex 16`)", token.len());
        }
    }
    match keys.signer.public() {
        Some(public) => {
            log::info!(target: "etask::trust", "dispatches and cancels are signed with key {}{}",
                crate::trust::seal::key_id(&public),
                if cfg.security.signing_key.is_empty() { " (the built-in one in <data_dir>/keys/)" } else { "" });
        }
        None => {
            log::warn!(target: "etask::server", "no security.signing_key: dispatches and cancels go out unsigned (nodes with trusted_keys refuse them)");
        }
    }
    if let Some(b) = &builtin {
        let node = node_id();
        let (journal, prev) = open_journal(&cfg, &node)?;
        previous = Some(prev);
        let mut trust = cfg.node_trust(None, &node)?;
        let signer_public = keys.signer.public().unwrap_or(b.signing_public);
        trust.verifier = trust
            .verifier
            .also_trusting(signer_public)
            .map_err(|e| format!("built-in keys: {e}"))?;
        trust.verifier.announce();
        trust.open = trust.open.with(b.pool_private);
        let mut pc = cfg.pool_config();
        pc.journal = Some(journal);
        let pool = Pool::start(pc).map_err(|e| format!("cannot start the process pool: {e}"))?;
        let l = Arc::new(Local::new(
            pool,
            node,
            reports_tx,
            keys.signer.clone(),
            trust,
        ));
        deliveries.push(l.clone());
        local = Some(l);
    }
    // The registry: the scheduler watches the live nodes; the built-in node registers itself.
    let reg = &cfg.registry;
    let mut table = None;
    let mut registration = None;
    if !reg.etcd.is_empty() {
        let etcd = cfg.etcd()?;
        let t = NodeTable::start(etcd.clone(), reg.prefix.clone())
            .map_err(|e| format!("cannot start the node watcher: {e}"))?;
        table = Some(Arc::new(t));
        if let Some(l) = &local {
            let info = crate::scheduler::builtin_node_info(l.as_ref());
            let l2 = l.clone();
            let r = Registration::start(
                etcd,
                reg.prefix.clone(),
                info,
                reg.ttl_seconds,
                Box::new(move || l2.load().0),
            )
            .map_err(|e| format!("cannot start the registry heartbeat: {e}"))?;
            registration = Some(r);
        }
    }
    // gRPC: nodes report to this scheduler; with a registry, tasks may target `push`.
    let mut grpc_server = None;
    let pull_slot: crate::delivery::grpc::PullSlot = Arc::new(std::sync::OnceLock::new());
    let tasks_slot: crate::delivery::grpc::TasksSlot = Arc::new(std::sync::OnceLock::new());
    if !cfg.server.grpc_listen.is_empty() {
        let rt = crate::delivery::grpc::Runtime::with_tls(cfg.grpc_tls()?)
            .map_err(|e| format!("cannot start the gRPC runtime: {e}"))?;
        // The same rule as the HTTP intake: gRPC takes tasks, hands out work (with its
        // secrets) and accepts outcomes, so anything but loopback needs the token.
        let addr = crate::config::check_listener(
            "server.grpc_listen",
            &cfg.server.grpc_listen,
            &cfg.server.token,
        )?;
        let srv = crate::delivery::grpc::serve_scheduler(
            &rt,
            addr,
            reports_tx_sched.clone(),
            &cfg.server.token,
            pull_slot.clone(),
            tasks_slot.clone(),
            cfg.server.max_body_bytes,
        )
        .map_err(|e| {
            format!(
                "cannot listen for gRPC on {addr} (server.grpc_listen): {e}; is another etask \
                 running? --grpc-listen 127.0.0.1:0 picks a free port, --grpc-listen '' turns \
                 gRPC off"
            )
        })?;
        log::info!(target: "etask::server", "gRPC listening on {}", srv.addr);
        if let Some(t) = &table {
            deliveries.push(Arc::new(crate::delivery::grpc::push::Push::new(
                rt.clone(),
                t.clone(),
                cfg.server.token.clone(),
                keys.signer.clone(),
            )));
        }
        grpc_server = Some(srv);
    }
    // Kafka: agents of every pool, reached through their dispatch topics.
    let mut kafka = None;
    if !cfg.kafka.brokers.is_empty() {
        let k = crate::delivery::kafka::scheduler::KafkaDelivery::start(
            &cfg.kafka,
            keys.signer.clone(),
        )?;
        deliveries.push(k.clone());
        kafka = Some(k);
    }
    // Pull nodes are known (and their runs kept alive) through the registry only: without it
    // every pulled run longer than node_silent_after_ms would be declared lost.
    let pull_enabled = grpc_server.is_some() && table.is_some();
    let tls_on = !cfg.tls.cert.is_empty();
    let https = !cfg.server.tls_cert.is_empty();
    let sched = Scheduler::start(
        Arc::new(store),
        cfg,
        deliveries,
        reports_rx,
        table,
        pull_enabled,
        keys,
    )?;
    if let Some(prev) = previous.filter(|p| !p.node.is_empty()) {
        recover_local(&sched.core, &prev);
    }
    let _ = pull_slot.set(sched.core.clone());
    let _ = tasks_slot.set(sched.core.clone());
    if let Some(k) = &kafka {
        k.attach(sched.core.clone());
    }
    if let Some(addr) = sched.http_addr() {
        // One line on stdout so scripts and tests can find the port (`--listen 127.0.0.1:0`).
        crate::announce(&format!(
            "etask listening on {}://{addr}",
            if https { "https" } else { "http" }
        ));
    }
    match &grpc_server {
        Some(g) => crate::announce(&format!(
            "etask grpc on {}://{}",
            if tls_on { "https" } else { "http" },
            g.addr
        )),
        None => crate::announce("etask grpc off"),
    }
    log::info!(target: "etask::server", "started mode={mode} store={}", sched.core.store.describe());
    crate::sd_notify::ready(&format!(
        "mode {mode}, HTTP on {}",
        sched.http_addr().map_or("-".into(), |a| a.to_string())
    ));
    let sig = stop.recv().unwrap_or(libc::SIGTERM);
    log::info!(target: "etask::server", "{}: stopping", crate::signals::name(sig));
    crate::sd_notify::stopping("stopping");
    if let Some(g) = grpc_server {
        g.stop();
    }
    sched.stop();
    if let Some(k) = kafka {
        k.shutdown();
    }
    // Leave the registry before the node goes (the lease is revoked: no wait for expiry).
    if let Some(r) = registration {
        r.stop();
    }
    if let Some(l) = local {
        l.shutdown();
    }
    log::info!(target: "etask::server", "stopped");
    Ok(())
}
