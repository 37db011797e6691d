//! The process pool: a bounded queue in front of at most `max_concurrent` runs, all driven by one
//! reactor thread that multiplexes every pipe with epoll (via `polling`), reaps children on
//! SIGCHLD and enforces timeouts, cancels and clean-up. Each run lives in its own cgroup where
//! the host allows it (`cgroup`), else it is tracked by its environment token (`tree`). Callers
//! submit a `RunRequest` with a channel and get `Started`, `Log` and `Finished` events on it.
//! Knows nothing of transports.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use polling::{Event, Events, PollMode, Poller};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::cgroup::{CgroupConfig, Containment, Mode, RunCgroup};
use super::launcher::{self, Job, Jobs, SpawnDone, SpawnJob};
use super::logs::{LogCapture, LogChunk, LogLimits, Stream};
use super::program::{Interpreters, Limits, Program, ProgramError};
use super::result::ResultSink;
use super::spawn::{Rlimits, RunAs};
use super::tree::{self, Exit, ProcUsage, WaitStatus};
use crate::model::{Attempt, ExecutionId, Status, TaskId};

/// "Never" for deadlines computed from outside values: about 30 years, far from the overflow
/// of `Instant + Duration` (a grace or timeout near u64::MAX panicked the reactor).
const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

const LOG: &str = "etask::runner";

/// Pool settings; every field has a default that suits a node.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_concurrent: usize,
    /// Threads that create workspaces, fork/exec and clean up, so the reactor never blocks.
    pub launchers: usize,
    /// Runs waiting for a slot; a submit beyond it is refused with `SubmitError::Full`.
    pub queue_capacity: usize,
    pub workspace_root: PathBuf,
    pub keep_failed_workspaces: bool,
    /// Time between SIGTERM and SIGKILL when a run is stopped.
    pub kill_grace: Duration,
    pub result_max_bytes: usize,
    pub logs: LogLimits,
    pub limits: Rlimits,
    pub run_as: Option<RunAs>,
    pub path_env: String,
    pub lang: String,
    pub interpreters: Interpreters,
    /// Where the node records taken and started attempts (see `journal`); `None` = nowhere
    /// (`etask run`, tests).
    pub journal: Option<Arc<super::journal::StartJournal>>,
    /// Where runs are contained (cgroups, or the environment-token fallback).
    pub cgroup: CgroupConfig,
    /// The node's default limits of a run; a request's `program.limits` override them.
    pub run_limits: Limits,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_concurrent: 64,
            launchers: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
            queue_capacity: 1024,
            workspace_root: std::env::temp_dir().join("etask-work"),
            keep_failed_workspaces: false,
            kill_grace: Duration::from_secs(5),
            result_max_bytes: 4 << 20,
            logs: LogLimits::default(),
            limits: Rlimits::default(),
            run_as: None,
            path_env: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            lang: "C.UTF-8".into(),
            interpreters: Interpreters::default(),
            journal: None,
            cgroup: CgroupConfig::default(),
            run_limits: Limits::default(),
        }
    }
}

/// One run of a program, as a node receives it.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub execution_id: ExecutionId,
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub shard_index: u32,
    pub shard_total: u32,
    pub program: Program,
    pub timeout: Option<Duration>,
}

impl RunRequest {
    pub fn new(execution_id: ExecutionId, program: Program) -> Self {
        RunRequest {
            execution_id,
            task_id: TaskId(0),
            attempt: Attempt::FIRST,
            shard_index: 0,
            shard_total: 1,
            program,
            timeout: None,
        }
    }
    pub fn key(&self) -> RunKey {
        RunKey {
            execution: self.execution_id,
            attempt: self.attempt,
        }
    }
}

/// Identifies a run inside the pool: an execution attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunKey {
    pub execution: ExecutionId,
    pub attempt: Attempt,
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Cancelled,
    SpawnFailed(String),
}

/// As an operator reads it (logs, `etask run`): "exit code 3", "timed out", ...
impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Exited(c) => write!(f, "exit code {c}"),
            Ending::Signaled(s) => write!(f, "killed by signal {s}"),
            Ending::TimedOut => f.write_str("timed out"),
            Ending::Cancelled => f.write_str("cancelled"),
            Ending::SpawnFailed(r) => write!(f, "could not start: {r}"),
        }
    }
}

/// What a run used, what bounded it and whether a limit ended it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// How the run was contained: "cgroup2", "hybrid", "cgroup1" or "none".
    #[serde(default)]
    pub containment: String,
    /// The limits that applied (the request's, else the node's).
    #[serde(default)]
    pub limits: Limits,
    /// Limits asked for that this node cannot enforce, each with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unenforced: Vec<String>,
    /// The kernel's OOM killer ended a process of the run at the run's memory limit.
    #[serde(default)]
    pub oom_killed: bool,
    /// A fork of the run failed because the run had reached its process limit.
    #[serde(default)]
    pub pids_exhausted: bool,
    /// CPU time of the whole run (its cgroup); without one, of the main process and the
    /// children it waited for.
    #[serde(default)]
    pub cpu_user_ms: Option<u64>,
    #[serde(default)]
    pub cpu_system_ms: Option<u64>,
    /// Peak memory of the whole run (its memory cgroup); null when it had none. (wait4's
    /// maxrss is no substitute: a child created without copying the node reports the node's
    /// resident set until its exec.)
    #[serde(default)]
    pub memory_peak_bytes: Option<u64>,
}

/// Everything known about a finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ending: Ending,
    /// Exit code / signal of the main process, when it was reaped (also after a timeout).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub result: Option<Map<String, Value>>,
    pub result_error: Option<String>,
    pub result_truncated: bool,
    pub log_bytes: u64,
    pub log_truncated: bool,
    pub duration: Duration,
    /// What the run used and what bounded it; None for a run that never started. (Boxed:
    /// `RunEvent`s of every kind are as large as the largest.)
    pub resources: Option<Box<Resources>>,
}

impl Outcome {
    /// The execution status this outcome maps to.
    pub fn status(&self) -> Status {
        match self.ending {
            Ending::Exited(0) => Status::Succeeded,
            Ending::Exited(_) | Ending::Signaled(_) | Ending::SpawnFailed(_) => Status::Failed,
            Ending::TimedOut => Status::TimedOut,
            Ending::Cancelled => Status::Cancelled,
        }
    }

    /// A human-readable reason when the run did not succeed; names the limit that ended it.
    pub fn error(&self) -> Option<String> {
        let r = self.resources.as_ref();
        let oom = r.is_some_and(|r| r.oom_killed);
        let mem = r
            .and_then(|r| r.limits.memory_bytes)
            .map_or(String::new(), |m| format!(" of {m} bytes"));
        let mut e = match &self.ending {
            Ending::Exited(0) => return None,
            Ending::Signaled(libc::SIGKILL) if oom => {
                format!("killed by the OOM killer: the run reached its memory limit{mem}")
            }
            Ending::Exited(c) => format!("exited with code {c}"),
            Ending::Signaled(s) => format!("killed by signal {s}"),
            Ending::TimedOut => "timed out".into(),
            Ending::Cancelled => "cancelled".into(),
            Ending::SpawnFailed(r) => return Some(format!("spawn failed: {r}")),
        };
        if oom && !matches!(self.ending, Ending::Signaled(libc::SIGKILL)) {
            e.push_str(&format!(
                "; the OOM killer ended a process of the run at its memory limit{mem}"
            ));
        }
        if r.is_some_and(|r| r.pids_exhausted) {
            let n = r
                .and_then(|r| r.limits.pids)
                .map_or(String::new(), |p| format!(" of {p}"));
            e.push_str(&format!(
                "; the run reached its process limit{n} (forks failed)"
            ));
        }
        Some(e)
    }

    /// The JSON shape printed by `etask run --json` and stored by the scheduler.
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status().as_str(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "result": self.result,
            "result_error": self.result_error,
            "duration_ms": self.duration.as_millis() as u64,
            "log_bytes": self.log_bytes,
            "truncated": self.log_truncated || self.result_truncated,
            "error": self.error(),
            "resources": self.resources,
        })
    }

    /// The outcome of a run that never started (refused, spawn failed, cancelled in the queue).
    pub fn not_started(ending: Ending) -> Outcome {
        Outcome {
            ending,
            exit_code: None,
            signal: None,
            result: None,
            result_error: None,
            result_truncated: false,
            log_bytes: 0,
            log_truncated: false,
            duration: Duration::ZERO,
            resources: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    Started { key: RunKey, pid: i32 },
    Log { key: RunKey, chunk: LogChunk },
    Finished { key: RunKey, outcome: Outcome },
}

impl RunEvent {
    pub fn key(&self) -> RunKey {
        match self {
            RunEvent::Started { key, .. }
            | RunEvent::Log { key, .. }
            | RunEvent::Finished { key, .. } => *key,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("invalid program: {0}")]
    Invalid(#[from] ProgramError),
    #[error("pool is full: {in_flight} runs running or queued (max {capacity}); try again later")]
    Full { in_flight: usize, capacity: usize },
    #[error("the pool has stopped")]
    Stopped,
    /// The start journal could not record the attempt, so it is not taken (a crash could
    /// otherwise make it look unstarted and run it twice).
    #[error("cannot record the attempt in the start journal: {0}")]
    Unrecorded(String),
}

enum Cmd {
    Submit(Box<RunRequest>, Sender<RunEvent>),
    Cancel(RunKey),
}

struct Shared {
    in_flight: AtomicUsize,
    running: AtomicUsize,
    stopping: AtomicBool,
}

/// Handle to the pool; dropping it cancels what is left and joins the reactor.
/// The reactor thread and the launcher threads of a pool.
type Threads = (Option<JoinHandle<()>>, Vec<JoinHandle<()>>);

pub struct Pool {
    shared: Arc<Shared>,
    poller: Arc<Poller>,
    cmd_tx: Sender<Cmd>,
    capacity: usize,
    journal: Option<Arc<super::journal::StartJournal>>,
    max_concurrent: usize,
    containment: Arc<Containment>,
    /// The reactor and the launchers, joined by the first `shutdown` (through a shared
    /// reference: a node hands its pool to several components).
    threads: std::sync::Mutex<Threads>,
    /// A named node's hold on its workspace root (see `lock_workspace`).
    _workspace_lock: Option<std::fs::File>,
}

impl Pool {
    /// Starts the reactor thread. Makes this process a child subreaper and installs a SIGCHLD
    /// handler: from now on the pool reaps every child of the process (see docs/design.md,
    /// "Reaping"), so nothing else in the process may wait on children of its own.
    ///
    /// Before it returns (so before the node takes any work) it finds where runs are
    /// contained and, for a named node (`cgroup.name`), kills and removes what a previous
    /// incarnation left: its run cgroups, or in the fallback its runs' token-carrying processes.
    ///
    /// # Errors
    /// The workspace root cannot be created, `cgroup.want` asks for a hierarchy the host does
    /// not offer, or another live node uses the same cgroup subtree or workspace root.
    pub fn start(mut cfg: PoolConfig) -> io::Result<Pool> {
        // Scripts run inside their workspace: a relative root (a relative `$TMPDIR`, a relative
        // data dir) would name a path that does not exist from there.
        cfg.workspace_root = std::path::absolute(&cfg.workspace_root)?;
        if cfg.run_as.is_some() && unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::other("run_as needs the node to run as root"));
        }
        std::fs::create_dir_all(&cfg.workspace_root).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("workspace root {}: {e}", cfg.workspace_root.display()),
            )
        })?;
        if cfg.run_as.is_some() {
            use std::os::unix::fs::PermissionsExt;
            // Runs dropped to another uid must be able to reach their own workspace.
            std::fs::set_permissions(&cfg.workspace_root, std::fs::Permissions::from_mode(0o711))?;
        }
        let workspace_lock = match &cfg.cgroup.name {
            Some(_) => Some(lock_workspace(&cfg.workspace_root)?),
            None => None,
        };
        let containment = Arc::new(Containment::start(&cfg.cgroup)?);
        if containment.mode() == Mode::Off {
            if let Some(name) = &cfg.cgroup.name {
                let n = tree::kill_by_token_prefix(&format!("{name}."), Duration::from_secs(10));
                if n > 0 {
                    log::warn!(target: LOG, "killed {n} processes left by a previous incarnation of node {name} (found by their run token)");
                }
            }
        }
        let unenforced = containment.unenforceable(&cfg.run_limits);
        log::info!(target: LOG, "runs contained: {}; spawn: {}; default limits: {}", containment.summary(), super::spawn::spawn_path(), describe_limits(&cfg.run_limits));
        if !unenforced.is_empty() {
            log::warn!(target: LOG, "node limits not enforceable here: {}", unenforced.join("; "));
        }
        tree::become_subreaper()?;
        tree::raise_nofile_limit();
        let sigchld = tree::sigchld_pipe()?;
        let poller = Arc::new(Poller::new()?);
        // SAFETY: the SIGCHLD pipe lives for the whole process and is removed from this poller
        // when the reactor ends.
        unsafe { poller.add_with_mode(sigchld, Event::readable(SIGCHLD_KEY), PollMode::Level)? };
        let capacity = cfg.max_concurrent + cfg.queue_capacity;
        let (cmd_tx, cmd_rx) = crossbeam_channel::bounded(capacity + 1024);
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let max_concurrent = cfg.max_concurrent;
        let journal = cfg.journal.clone();
        let cfg = Arc::new(cfg);
        let pool_id = tree::register_pool(poller.clone());
        // Bounded by what can be in flight: one spawn and one clean-up per run.
        let (jobs_tx, jobs_rx) = launcher::queues(capacity);
        let (spawned_tx, spawned_rx) = crossbeam_channel::bounded(capacity);
        let launchers = launcher::start(
            cfg.launchers,
            cfg.clone(),
            containment.clone(),
            pool_id,
            jobs_rx,
            spawned_tx,
            poller.clone(),
        )?;
        let mut reactor = Reactor::new(
            cfg,
            containment.clone(),
            poller.clone(),
            cmd_rx,
            shared.clone(),
            sigchld,
            pool_id,
            jobs_tx,
            spawned_rx,
        );
        let thread = std::thread::Builder::new()
            .name("runner-io".into())
            .spawn(move || reactor.run())?;
        Ok(Pool {
            shared,
            poller,
            cmd_tx,
            capacity,
            journal,
            max_concurrent,
            containment,
            threads: std::sync::Mutex::new((Some(thread), launchers)),
            _workspace_lock: workspace_lock,
        })
    }

    /// How this pool contains its runs: "cgroup2", "hybrid", "cgroup1" or "none".
    pub fn containment(&self) -> &'static str {
        self.containment.mode().as_str()
    }

    /// The containment in one line: where, how runs are killed, which limits hold, and why
    /// anything is missing.
    pub fn containment_summary(&self) -> &str {
        self.containment.summary()
    }

    /// Queues a run. Events for it arrive on `events`; the last one is always `Finished`.
    pub fn submit(&self, req: RunRequest, events: Sender<RunEvent>) -> Result<(), SubmitError> {
        req.program.validate()?;
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        let prev = self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if prev >= self.capacity {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Full {
                in_flight: prev,
                capacity: self.capacity,
            });
        }
        if let Some(j) = &self.journal {
            if let Err(e) = j.taken(req.execution_id.0, req.attempt.0) {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                // A node fault (full disk, read-only file system), not a busy node: said at
                // WARN, at most every 10 s, while every dispatch is turned away.
                static LAST_WARN_MS: std::sync::atomic::AtomicI64 =
                    std::sync::atomic::AtomicI64::new(0);
                let now = crate::now_ms();
                let last = LAST_WARN_MS.load(Ordering::Relaxed);
                if now - last >= 10_000
                    && LAST_WARN_MS
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    log::warn!(target: "etask::runner", "cannot record attempts in the start journal {}: {e}; no work is taken until it can", j.path().display());
                }
                return Err(SubmitError::Unrecorded(e.to_string()));
            }
        }
        self.send(Cmd::Submit(Box::new(req), events))
            .inspect_err(|_| {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            })
    }

    /// Stops a queued or running run (SIGTERM to its tree, then SIGKILL after the grace).
    /// Unknown or finished runs are ignored, so cancel is idempotent.
    pub fn cancel(&self, key: RunKey) {
        let _ = self.send(Cmd::Cancel(key));
    }

    fn send(&self, cmd: Cmd) -> Result<(), SubmitError> {
        match self.cmd_tx.try_send(cmd) {
            Ok(()) => {}
            Err(TrySendError::Full(cmd)) => {
                self.cmd_tx.send(cmd).map_err(|_| SubmitError::Stopped)?
            }
            Err(TrySendError::Disconnected(_)) => return Err(SubmitError::Stopped),
        }
        let _ = self.poller.notify();
        Ok(())
    }

    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }
    /// Runs running or waiting for a slot.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// Cancels everything left (killing each run's tree) and waits for the reactor and the
    /// launchers to finish. Later calls return at once.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.poller.notify();
        let (thread, launchers) = {
            let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
            (t.0.take(), std::mem::take(&mut t.1))
        };
        if let Some(t) = thread {
            let _ = t.join();
        }
        // The reactor dropped the job sender on exit; launchers finish pending removals and end.
        for t in launchers {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn describe_limits(l: &Limits) -> String {
    if l.is_empty() {
        return "none".into();
    }
    let mut parts = Vec::new();
    if let Some(m) = l.memory_bytes {
        parts.push(format!("memory_bytes={m}"));
    }
    if let Some(p) = l.pids {
        parts.push(format!("pids={p}"));
    }
    if let Some(c) = l.cpu_millicores {
        parts.push(format!("cpu_millicores={c}"));
    }
    parts.join(" ")
}

/// A named node holds an exclusive lock on its workspace root for its life: the leftovers it
/// finds and removes at start are then provably not another live node's.
fn lock_workspace(root: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(".etask-node.lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::other(format!(
            "workspace root {} is in use by another running node",
            root.display()
        )));
    }
    Ok(f)
}

// polling reserves usize::MAX for its own notifier.
const SIGCHLD_KEY: usize = usize::MAX - 1;
const FDS: usize = 4; // stdout, stderr, result, stdin
const STDOUT: usize = 0;
const STDERR: usize = 1;
const RESULT: usize = 2;
const STDIN: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Kill {
    None,
    /// SIGTERM sent; SIGKILL at `until`. At each `again` the tree is checked, so a run whose
    /// processes all obeyed SIGTERM ends without waiting out the grace.
    Term {
        again: Instant,
        until: Instant,
    },
    /// SIGKILL sent; repeated every `again` until the tree is gone, forced finish at `until`.
    Killed {
        again: Instant,
        until: Instant,
    },
    /// Main process gone, nothing left to kill; waiting for the pipes to reach EOF.
    Draining {
        until: Instant,
    },
}

impl Kill {
    fn term(now: Instant, grace: Duration) -> Kill {
        Kill::Term {
            again: now + Duration::from_millis(20),
            // Checked: `Instant + Duration` panics on overflow even in release builds.
            until: now.checked_add(grace).unwrap_or(now + FAR),
        }
    }
}

struct Run {
    key: RunKey,
    token: String,
    events: Sender<RunEvent>,
    pid: Option<i32>,
    wait: Option<WaitStatus>,
    fds: [Option<OwnedFd>; FDS],
    stdin_data: Vec<u8>,
    stdin_pos: usize,
    logs: LogCapture,
    result: ResultSink,
    started: Instant,
    deadline: Option<Instant>,
    ending: Option<Ending>,
    kill: Kill,
    workspace: PathBuf,
    /// The run's cgroup; None in the fallback, where `token` finds its processes.
    cgroup: Option<RunCgroup>,
    /// Limits and containment, completed with the usage when the run finishes.
    resources: Resources,
    /// What the main process (and the children it waited for) used, from wait4.
    usage: Option<ProcUsage>,
}

impl Run {
    fn outputs_open(&self) -> bool {
        self.fds[..STDIN].iter().any(Option::is_some)
    }

    /// Sends `sig` to every process of the run (and the main process's group); returns how
    /// many processes the run has besides an already reaped main process.
    fn signal_all(&self, sig: i32, is_root: &dyn Fn(i32) -> bool) -> usize {
        match &self.cgroup {
            Some(cg) => {
                if let Some(p) = self.pid {
                    // SAFETY: kill(2) on the process group the main process made with setsid.
                    unsafe { libc::kill(-p, sig) };
                }
                cg.signal(sig)
            }
            None => tree::signal_run(self.pid, &self.token, is_root, sig),
        }
    }

    /// Kills every process of the run for good: `cgroup.kill` or freeze-kill-thaw, so that
    /// nothing forks away meanwhile (in the fallback: SIGKILL to each process found).
    fn kill_all(&self, is_root: &dyn Fn(i32) -> bool) -> usize {
        match &self.cgroup {
            Some(cg) => cg.kill(),
            None => tree::signal_run(self.pid, &self.token, is_root, libc::SIGKILL),
        }
    }

    /// No process of the run is left (the main one reaped, nothing else in its cgroup).
    fn all_gone(&self, is_root: &dyn Fn(i32) -> bool) -> bool {
        self.wait.is_some()
            && match &self.cgroup {
                Some(cg) => cg.is_empty(),
                None => tree::run_members(None, &self.token, is_root).is_empty(),
            }
            // Killed orphans are our children: reaped before the run is reported over.
            && !tree::adopted_zombie()
    }
}

struct Reactor {
    cfg: Arc<PoolConfig>,
    containment: Arc<Containment>,
    poller: Arc<Poller>,
    cmd_rx: Receiver<Cmd>,
    shared: Arc<Shared>,
    sigchld: i32,
    pool_id: usize,
    runs: Vec<Option<Run>>,
    free: Vec<usize>,
    by_key: HashMap<RunKey, usize>,
    by_pid: HashMap<i32, usize>,
    queue: VecDeque<(Box<RunRequest>, Sender<RunEvent>)>,
    /// Runs handed to a launcher, with whether a cancel arrived meanwhile.
    starting: HashMap<RunKey, bool>,
    early_exits: HashMap<i32, Exit>,
    jobs: Jobs,
    spawned_rx: Receiver<SpawnDone>,
    next_seq: u64,
    /// `<pid>-<random>`, fixed for this pool: with `next_seq` it makes every per-run name (the
    /// workspace, the run token) unique among pools of all processes on the host, including
    /// dead ones whose workspace was left behind by `kill -9` under a since reused pid.
    instance: String,
    scratch: Vec<u8>,
    chunks: Vec<LogChunk>,
}

impl Reactor {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: Arc<PoolConfig>,
        containment: Arc<Containment>,
        poller: Arc<Poller>,
        cmd_rx: Receiver<Cmd>,
        shared: Arc<Shared>,
        sigchld: i32,
        pool_id: usize,
        jobs: Jobs,
        spawned_rx: Receiver<SpawnDone>,
    ) -> Self {
        Reactor {
            cfg,
            containment,
            poller,
            cmd_rx,
            shared,
            sigchld,
            pool_id,
            starting: HashMap::new(),
            early_exits: HashMap::new(),
            jobs,
            spawned_rx,
            runs: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            by_pid: HashMap::new(),
            queue: VecDeque::new(),
            next_seq: 0,
            instance: format!("{}-{:08x}", std::process::id(), fastrand::u32(..)),
            scratch: vec![0; 64 << 10],
            chunks: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut events = Events::new();
        let mut cancelled_all = false;
        loop {
            let timeout = self
                .next_wake()
                .map(|t| t.saturating_duration_since(Instant::now()));
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!(target: LOG, "poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for ev in events.iter() {
                if ev.key == SIGCHLD_KEY {
                    tree::drain_fd(self.sigchld);
                } else {
                    self.on_io(ev.key / FDS, ev.key % FDS);
                }
            }
            self.reap();
            while let Ok(done) = self.spawned_rx.try_recv() {
                self.started(done);
            }
            while let Ok(cmd) = self.cmd_rx.try_recv() {
                match cmd {
                    Cmd::Submit(req, tx) => self.queue.push_back((req, tx)),
                    Cmd::Cancel(key) => self.stop_run(key, Ending::Cancelled),
                }
            }
            if self.shared.stopping.load(Ordering::SeqCst) && !cancelled_all {
                cancelled_all = true;
                let keys: Vec<RunKey> = self
                    .by_key
                    .keys()
                    .chain(self.starting.keys())
                    .copied()
                    .collect();
                let queued: Vec<RunKey> = self.queue.iter().map(|(r, _)| r.key()).collect();
                for k in keys.into_iter().chain(queued) {
                    self.stop_run(k, Ending::Cancelled);
                }
            }
            // Timers may finish runs; refill their slots before sleeping, or the queue would
            // wait for an unrelated wake-up.
            self.on_timers(Instant::now());
            self.start_queued();
            if cancelled_all
                && self.by_key.is_empty()
                && self.queue.is_empty()
                && self.starting.is_empty()
            {
                // SAFETY: the SIGCHLD pipe is never closed (see tree::sigchld_pipe).
                let _ = self
                    .poller
                    .delete(unsafe { BorrowedFd::borrow_raw(self.sigchld) });
                tree::unregister_pool(self.pool_id);
                return;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        };
        for run in self.runs.iter().flatten() {
            if run.ending.is_none() {
                at(run.deadline);
            }
            at(match run.kill {
                Kill::None => None,
                Kill::Draining { until } => Some(until),
                Kill::Term { again, .. } | Kill::Killed { again, .. } => Some(again),
            });
            at(run.logs.next_deadline());
        }
        wake
    }

    fn start_queued(&mut self) {
        while self.by_key.len() + self.starting.len() < self.cfg.max_concurrent {
            let Some((req, tx)) = self.queue.pop_front() else {
                return;
            };
            let key = req.key();
            if self.by_key.contains_key(&key) || self.starting.contains_key(&key) {
                log::warn!(target: LOG, "execution={} attempt={} is already running; duplicate refused", key.execution, key.attempt);
                self.refuse(
                    key,
                    &tx,
                    Ending::SpawnFailed("this execution attempt is already running".into()),
                );
                continue;
            }
            self.begin(req, tx);
        }
    }

    /// Hands a queued run to a launcher thread; it counts against `max_concurrent` from now.
    fn begin(&mut self, req: Box<RunRequest>, events: Sender<RunEvent>) {
        self.next_seq += 1;
        // The node's name first: a restarted node finds its predecessor's runs by it; the
        // instance keeps names apart from those its predecessor left.
        let token = format!(
            "{}.{}-{}",
            self.containment.name(),
            self.instance,
            self.next_seq
        );
        // One name for the workspace and the cgroup: run-<execution>-<attempt>-<n>.
        let name = format!(
            "run-{}-{}-{}-{}",
            req.execution_id, req.attempt, self.instance, self.next_seq
        );
        let workspace = self.cfg.workspace_root.join(&name);
        let limits = req
            .program
            .limits
            .unwrap_or_default()
            .or(self.cfg.run_limits);
        let resources = Resources {
            containment: self.containment.mode().as_str().into(),
            limits,
            unenforced: self.containment.unenforceable(&limits),
            ..Resources::default()
        };
        self.starting.insert(req.key(), false);
        if let Some(Job::Spawn(job)) = self.jobs.send(Job::Spawn(SpawnJob {
            req,
            events,
            token,
            workspace,
            cgroup: name,
            resources,
        })) {
            // Launchers are gone only while the pool stops.
            self.starting.remove(&job.req.key());
            self.refuse(
                job.req.key(),
                &job.events,
                Ending::SpawnFailed("the pool is stopping".into()),
            );
        }
    }

    fn refuse(&self, key: RunKey, events: &Sender<RunEvent>, ending: Ending) {
        let _ = events.send(RunEvent::Finished {
            key,
            outcome: Outcome::not_started(ending),
        });
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// A launcher finished starting a run (or failed to).
    fn started(&mut self, done: SpawnDone) {
        let SpawnDone {
            job,
            started,
            result,
        } = done;
        let key = job.req.key();
        let cancel = self.starting.remove(&key).unwrap_or(false);
        let (sp, cgroup) = match result {
            Ok(ok) => ok,
            Err(reason) => {
                // The reason may quote the program (argv, workdir): masked like its output, so
                // a secret in an argv never reaches the execution's error or the node's log.
                let reason =
                    LogCapture::new(self.cfg.logs.clone(), job.req.program.secret_values())
                        .mask_text(&reason);
                log::warn!(target: LOG, "execution={} attempt={} spawn failed: {reason}", key.execution, key.attempt);
                let mut outcome = Outcome::not_started(Ending::SpawnFailed(reason));
                outcome.duration = started.elapsed();
                let _ = job.events.send(RunEvent::Finished { key, outcome });
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.runs.push(None);
            self.runs.len() - 1
        });
        let fds = [Some(sp.stdout), Some(sp.stderr), Some(sp.result), sp.stdin];
        for (i, fd) in fds.iter().enumerate() {
            if let Some(fd) = fd {
                let ev = if i == STDIN {
                    Event::writable(slot * FDS + i)
                } else {
                    Event::readable(slot * FDS + i)
                };
                // SAFETY: every fd is deleted from the poller before it is closed (close_fd).
                if let Err(e) = unsafe {
                    self.poller
                        .add_with_mode(fd.as_raw_fd(), ev, PollMode::Level)
                } {
                    log::error!(target: LOG, "cannot watch a pipe of execution={}: {e}", key.execution);
                }
            }
        }
        log::debug!(target: LOG, "execution={} attempt={} started pid={}", key.execution, key.attempt, sp.pid);
        let _ = job.events.send(RunEvent::Started { key, pid: sp.pid });
        let req = job.req;
        self.runs[slot] = Some(Run {
            key,
            token: job.token,
            events: job.events,
            pid: Some(sp.pid),
            wait: None,
            fds,
            stdin_data: req.program.stdin.clone().unwrap_or_default().into_bytes(),
            stdin_pos: 0,
            logs: LogCapture::new(self.cfg.logs.clone(), req.program.secret_values()),
            result: ResultSink::new(self.cfg.result_max_bytes),
            started,
            deadline: req
                .timeout
                .map(|t| started.checked_add(t).unwrap_or(started + FAR)),
            ending: None,
            kill: Kill::None,
            workspace: job.workspace,
            cgroup,
            resources: job.resources,
            usage: None,
        });
        self.by_key.insert(key, slot);
        self.by_pid.insert(sp.pid, slot);
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        if let Some(exit) = self.early_exits.remove(&sp.pid) {
            self.on_exit(exit);
        }
        if cancel {
            self.stop_run(key, Ending::Cancelled);
        }
    }

    fn on_io(&mut self, slot: usize, which: usize) {
        let Some(run) = self.runs.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if which == STDIN {
            Self::write_stdin(&self.poller, run);
            return;
        }
        let now = Instant::now();
        loop {
            let Some(fd) = run.fds[which].as_ref() else {
                return;
            };
            // SAFETY: reading into our scratch buffer from a non-blocking fd we own.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                )
            };
            if n > 0 {
                let bytes = &self.scratch[..n as usize];
                match which {
                    STDOUT => run.logs.push(Stream::Stdout, bytes, now),
                    STDERR => run.logs.push(Stream::Stderr, bytes, now),
                    RESULT => run.result.push(bytes),
                    _ => unreachable!("stdin is handled above"),
                }
                if (n as usize) < self.scratch.len() {
                    // Level-triggered: anything left wakes us again; this keeps one noisy run
                    // from starving the others.
                    return;
                }
            } else if n == 0 {
                Self::close_fd(&self.poller, run, which);
                return;
            } else {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        Self::close_fd(&self.poller, run, which);
                        return;
                    }
                }
            }
        }
    }

    fn write_stdin(poller: &Poller, run: &mut Run) {
        while run.stdin_pos < run.stdin_data.len() {
            let Some(fd) = run.fds[STDIN].as_ref() else {
                return;
            };
            let rest = &run.stdin_data[run.stdin_pos..];
            // SAFETY: writing from our buffer to a non-blocking fd we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                run.stdin_pos += n as usize;
            } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                return;
            } else {
                break; // EPIPE: the child closed stdin; the rest is not wanted.
            }
        }
        Self::close_fd(poller, run, STDIN);
        run.stdin_data = Vec::new();
    }

    fn close_fd(poller: &Poller, run: &mut Run, which: usize) {
        if let Some(fd) = run.fds[which].take() {
            let _ = poller.delete(&fd);
        }
    }

    fn reap(&mut self) {
        for exit in tree::collect_exits(self.pool_id) {
            if self.by_pid.contains_key(&exit.pid) {
                self.on_exit(exit);
            } else {
                // Reaped before its launcher reported the spawn; applied in `started`.
                self.early_exits.insert(exit.pid, exit);
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Some(slot) = self.by_pid.remove(&exit.pid) else {
            return;
        };
        let grace = self.cfg.kill_grace;
        let Some(run) = self.runs[slot].as_mut() else {
            return;
        };
        run.pid = None;
        run.wait = Some(exit.status);
        run.usage = Some(exit.usage);
        Self::close_fd(&self.poller, run, STDIN);
        let now = Instant::now();
        if matches!(run.kill, Kill::None) {
            // The main process is gone; whatever it left behind is stopped too, since the
            // run (and its workspace) ends here.
            let by_pid = &self.by_pid;
            let left = run.signal_all(libc::SIGTERM, &|p| by_pid.contains_key(&p));
            run.kill = if left > 0 {
                log::info!(target: LOG, "execution={} attempt={} left {left} processes behind; terminating them", run.key.execution, run.key.attempt);
                Kill::term(now, grace)
            } else {
                Kill::Draining {
                    until: now + Duration::from_secs(2),
                }
            };
        }
    }

    fn stop_run(&mut self, key: RunKey, why: Ending) {
        if let Some(pos) = self.queue.iter().position(|(r, _)| r.key() == key) {
            if let Some((_, tx)) = self.queue.remove(pos) {
                self.refuse(key, &tx, why);
            }
            return;
        }
        if let Some(cancel) = self.starting.get_mut(&key) {
            *cancel = true; // applied as soon as the launcher reports the pid
            return;
        }
        let Some(&slot) = self.by_key.get(&key) else {
            return;
        };
        let grace = self.cfg.kill_grace;
        let by_pid = &self.by_pid;
        let Some(run) = self.runs[slot].as_mut() else {
            return;
        };
        if run.ending.is_some() || run.wait.is_some() {
            return; // already stopping, or already over
        }
        log::info!(target: LOG, "execution={} attempt={} stopping: {why}", key.execution, key.attempt);
        run.ending = Some(why);
        let main = run.pid;
        run.signal_all(libc::SIGTERM, &|p| {
            by_pid.contains_key(&p) && Some(p) != main
        });
        run.kill = Kill::term(Instant::now(), grace);
    }

    fn on_timers(&mut self, now: Instant) {
        let mut timed_out = Vec::new();
        let mut done = Vec::new();
        for (slot, run) in self.runs.iter_mut().enumerate() {
            let Some(run) = run.as_mut() else { continue };
            if run.ending.is_none() && run.wait.is_none() && run.deadline.is_some_and(|d| now >= d)
            {
                timed_out.push(run.key);
            }
            let main = run.pid;
            let by_pid = &self.by_pid;
            let is_root = |p: i32| by_pid.contains_key(&p) && Some(p) != main;
            match run.kill {
                Kill::Term { again, until } if now >= again && now < until => {
                    let gone = run.all_gone(&is_root);
                    run.kill = if gone {
                        Kill::Draining {
                            until: now + Duration::from_secs(2),
                        }
                    } else {
                        Kill::Term {
                            again: now + Duration::from_millis(100),
                            until,
                        }
                    };
                }
                Kill::Term { until, .. } if now >= until => {
                    run.kill_all(&is_root);
                    run.kill = Kill::Killed {
                        again: now + Duration::from_millis(100),
                        until: now + Duration::from_secs(5),
                    };
                }
                Kill::Killed { again, until } if now >= again => {
                    let left = run.kill_all(&is_root);
                    if left == 0 && run.wait.is_some() && !run.outputs_open() {
                        done.push(slot);
                    } else if now >= until {
                        log::warn!(target: LOG, "execution={} attempt={} still has {left} processes or open pipes after SIGKILL; giving up on them", run.key.execution, run.key.attempt);
                        done.push(slot);
                    } else {
                        run.kill = Kill::Killed {
                            again: now + Duration::from_millis(100),
                            until,
                        };
                    }
                }
                Kill::Draining { until } if now >= until => done.push(slot),
                _ => {}
            }
            if run.wait.is_some() && !run.outputs_open() && !matches!(run.kill, Kill::Term { .. }) {
                done.push(slot);
            }
            run.logs.take_due(now, &mut self.chunks);
            for chunk in self.chunks.drain(..) {
                let _ = run.events.send(RunEvent::Log {
                    key: run.key,
                    chunk,
                });
            }
        }
        for key in timed_out {
            self.stop_run(key, Ending::TimedOut);
        }
        done.sort_unstable();
        done.dedup();
        for slot in done {
            self.finish(slot);
        }
    }

    fn finish(&mut self, slot: usize) {
        let Some(mut run) = self.runs[slot].take() else {
            return;
        };
        self.free.push(slot);
        for i in 0..FDS {
            Self::close_fd(&self.poller, &mut run, i);
        }
        if let Some(pid) = run.pid {
            // Forced finish with the main process still unreaped (it ignored SIGKILL for 5 s,
            // e.g. stuck in the kernel). It will be reaped as an orphan later.
            self.by_pid.remove(&pid);
        }
        self.by_key.remove(&run.key);
        let now = Instant::now();
        run.logs.take_all(now, &mut self.chunks);
        for chunk in self.chunks.drain(..) {
            let _ = run.events.send(RunEvent::Log {
                key: run.key,
                chunk,
            });
        }
        let (exit_code, signal) = match run.wait {
            Some(WaitStatus::Exited(c)) => (Some(c), None),
            Some(WaitStatus::Signaled(s)) => (None, Some(s)),
            None => (None, None),
        };
        let ending = run.ending.take().unwrap_or(match run.wait {
            Some(WaitStatus::Exited(c)) => Ending::Exited(c),
            Some(WaitStatus::Signaled(s)) => Ending::Signaled(s),
            None => Ending::Signaled(libc::SIGKILL),
        });
        let mut parsed = std::mem::replace(&mut run.result, ResultSink::new(0)).finish();
        if let Some(r) = parsed.result.as_mut() {
            run.logs.mask_result(r);
        }
        parsed.error = parsed.error.map(|e| run.logs.mask_text(&e));
        let mut resources = std::mem::take(&mut run.resources);
        if let Some(u) = run.usage {
            // The cgroup's figures (whole run) replace these when the launcher reads them.
            resources.cpu_user_ms = Some(u.user_ms);
            resources.cpu_system_ms = Some(u.system_ms);
        }
        let outcome = Outcome {
            ending,
            exit_code,
            signal,
            result: parsed.result,
            result_error: parsed.error,
            result_truncated: parsed.truncated,
            log_bytes: run.logs.total_bytes,
            log_truncated: run.logs.truncated,
            duration: now - run.started,
            resources: Some(Box::new(resources)),
        };
        let keep = self.cfg.keep_failed_workspaces && outcome.status() != Status::Succeeded;
        if keep {
            log::info!(target: LOG, "execution={} attempt={} workspace kept at {}", run.key.execution, run.key.attempt, run.workspace.display());
        }
        log::debug!(target: LOG, "execution={} attempt={} finished status={} duration_ms={}", run.key.execution, run.key.attempt, outcome.status(), outcome.duration.as_millis());
        // Free the slot before `Finished` can be seen: whoever reacts to it (a dispatcher
        // refilling the pool) must find the capacity already there.
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        let job = Job::Finish {
            workspace: (!keep).then_some(run.workspace),
            cgroup: run.cgroup,
            events: run.events,
            finished: RunEvent::Finished {
                key: run.key,
                outcome,
            },
        };
        if let Some(Job::Finish {
            workspace,
            cgroup,
            events,
            finished,
        }) = self.jobs.send(job)
        {
            launcher::finish(workspace, cgroup, &events, finished);
        }
    }
}
