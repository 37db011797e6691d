//! Launcher threads: the slow, blocking part of starting and ending a run (creating the private
//! workspace, script file and cgroup, spawning, reading the cgroup's usage and removing the
//! cgroup and workspace afterwards). Kept off the reactor so pipes keep flowing and several
//! runs can start at once.

use std::io;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use polling::Poller;

use super::cgroup::{Containment, Mode, RunCgroup};
use super::pool::{PoolConfig, Resources, RunEvent, RunRequest};
use super::program::{launch, Launch};
use super::spawn::{spawn, RunAs, SpawnSpec, Spawned};
use super::tree;

pub(super) enum Job {
    Spawn(SpawnJob),
    /// Read a finished run's usage from its cgroup and remove the cgroup and the workspace
    /// (if any), then deliver its `Finished` event, so a caller that sees `Finished` never
    /// finds either still there.
    Finish {
        workspace: Option<PathBuf>,
        cgroup: Option<RunCgroup>,
        events: Sender<RunEvent>,
        finished: RunEvent,
    },
}

/// The reactor's side of the launchers' two queues.
pub(super) struct Jobs {
    spawn: Sender<Job>,
    finish: Sender<Job>,
}

impl Jobs {
    /// Queues `job`; gives it back when the launchers are gone (the pool stops).
    pub fn send(&self, job: Job) -> Option<Job> {
        let sent = match job {
            Job::Spawn(_) => self.spawn.send(job),
            Job::Finish { .. } => self.finish.send(job),
        };
        sent.err().map(|e| e.0)
    }
}

/// The launchers' side: spawns first, because a waiting spawn holds a slot of the pool idle;
/// a clean-up only delays a `Finished` event whose slot is already free.
pub(super) struct JobsRx {
    spawn: Receiver<Job>,
    finish: Receiver<Job>,
}

impl JobsRx {
    /// The next job, or None once both queues are closed and empty.
    fn next(&self) -> Option<Job> {
        if let Ok(j) = self.spawn.try_recv() {
            return Some(j);
        }
        crossbeam_channel::select! {
            recv(self.spawn) -> j => j.ok().or_else(|| self.finish.recv().ok()),
            recv(self.finish) -> j => j.ok().or_else(|| self.spawn.recv().ok()),
        }
    }
}

/// Two bounded queues of `capacity` each (one spawn and one clean-up per run in flight).
pub(super) fn queues(capacity: usize) -> (Jobs, JobsRx) {
    let (spawn, spawn_rx) = crossbeam_channel::bounded(capacity);
    let (finish, finish_rx) = crossbeam_channel::bounded(capacity);
    (
        Jobs { spawn, finish },
        JobsRx {
            spawn: spawn_rx,
            finish: finish_rx,
        },
    )
}

pub(super) struct SpawnJob {
    pub req: Box<RunRequest>,
    pub events: Sender<RunEvent>,
    pub token: String,
    pub workspace: PathBuf,
    /// The run's cgroup name (`run-<execution>-<attempt>-<n>`).
    pub cgroup: String,
    /// The limits that apply and the containment, for the cgroup and the outcome.
    pub resources: Resources,
}

pub(super) struct SpawnDone {
    pub job: SpawnJob,
    pub started: Instant,
    pub result: Result<(Spawned, Option<RunCgroup>), String>,
}

/// Starts `n` launcher threads. They stop when both job queues are closed and empty.
pub(super) fn start(
    n: usize,
    cfg: Arc<PoolConfig>,
    containment: Arc<Containment>,
    pool_id: usize,
    jobs: JobsRx,
    done: Sender<SpawnDone>,
    poller: Arc<Poller>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let jobs = Arc::new(jobs);
    (0..n.max(1))
        .map(|i| {
            let (cfg, jobs, done, poller) =
                (cfg.clone(), jobs.clone(), done.clone(), poller.clone());
            let containment = containment.clone();
            std::thread::Builder::new()
                .name(format!("runner-launch-{i}"))
                .spawn(move || {
                    while let Some(job) = jobs.next() {
                        match job {
                            Job::Spawn(job) => {
                                let started = Instant::now();
                                let result = launch_one(&cfg, &containment, pool_id, &job);
                                if done
                                    .send(SpawnDone {
                                        job,
                                        started,
                                        result,
                                    })
                                    .is_err()
                                {
                                    return;
                                }
                                let _ = poller.notify();
                            }
                            Job::Finish {
                                workspace,
                                cgroup,
                                events,
                                finished,
                            } => finish(workspace, cgroup, &events, finished),
                        }
                    }
                })
        })
        .collect()
}

pub(super) fn finish(
    workspace: Option<PathBuf>,
    cgroup: Option<RunCgroup>,
    events: &Sender<RunEvent>,
    mut finished: RunEvent,
) {
    if let Some(cg) = cgroup {
        let st = cg.stats();
        if let RunEvent::Finished { outcome, .. } = &mut finished {
            if let Some(r) = outcome.resources.as_mut() {
                r.oom_killed = st.oom_killed;
                r.pids_exhausted = st.pids_exhausted;
                r.cpu_user_ms = st.cpu_user_ms.or(r.cpu_user_ms);
                r.cpu_system_ms = st.cpu_system_ms.or(r.cpu_system_ms);
                r.memory_peak_bytes = st.memory_peak_bytes;
            }
        }
        // A failure is logged by `remove`; the node's next start removes what is left.
        let _ = cg.remove();
    }
    if let Some(ws) = workspace {
        if let Err(e) = std::fs::remove_dir_all(&ws) {
            log::warn!(target: "etask::runner", "cannot remove workspace {}: {e}", ws.display());
        }
    }
    let _ = events.send(finished);
}

fn launch_one(
    cfg: &PoolConfig,
    containment: &Containment,
    pool_id: usize,
    job: &SpawnJob,
) -> Result<(Spawned, Option<RunCgroup>), String> {
    // A workspace made in part (the disk filled while the script was written) goes too.
    let launch = prepare_workspace(cfg, &job.req, &job.workspace).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&job.workspace);
    })?;
    let contained = containment.mode() != Mode::Off;
    // The token is how the fallback finds a run's processes; a contained run has its cgroup.
    let token = (!contained).then_some(job.token.as_str());
    let mut env = child_env(cfg, &job.req, &job.workspace, token);
    env.extend(launch.env.iter().cloned());
    let fail = |cg: Option<&RunCgroup>, msg: String| {
        if let Some(cg) = cg {
            let _ = cg.remove();
        }
        let _ = std::fs::remove_dir_all(&job.workspace);
        msg
    };
    let cgroup = if contained {
        let cg = containment
            .create_run(&job.cgroup, &job.resources.limits)
            .map_err(|e| fail(None, format!("cannot create the run's cgroup: {e}")))?;
        Some(cg)
    } else {
        None
    };
    let placement = match cgroup.as_ref().map(RunCgroup::placement).transpose() {
        Ok(p) => p,
        Err(e) => {
            return Err(fail(
                cgroup.as_ref(),
                format!("cannot open the run's cgroup: {e}"),
            ))
        }
    };
    let spec = SpawnSpec {
        argv: &launch.argv,
        env: &env,
        cwd: &launch.cwd,
        stdin: job.req.program.stdin.is_some(),
        limits: &cfg.limits,
        run_as: cfg.run_as,
        cgroup: placement.as_ref(),
    };
    // Recorded before the process is created, and no process without it: after a crash an
    // attempt without its `S` line provably never ran (runner/journal.rs).
    if let Some(j) = &cfg.journal {
        if let Err(e) = j.started(job.req.execution_id.0, job.req.attempt.0) {
            return Err(fail(
                cgroup.as_ref(),
                format!("cannot record the start in {}: {e}", j.path().display()),
            ));
        }
    }
    let spawned = tree::spawn_root(pool_id, || spawn(&spec).map(|sp| (sp.pid, sp)));
    drop(placement);
    match spawned {
        Ok((_, sp)) => Ok((sp, cgroup)),
        Err(e) => Err(fail(cgroup.as_ref(), format!("{}: {e}", launch.argv[0]))),
    }
}

/// Creates the private workspace (and the script file), owned by the run's uid.
fn prepare_workspace(cfg: &PoolConfig, req: &RunRequest, ws: &Path) -> Result<Launch, String> {
    let launch = launch(&req.program, ws, &cfg.interpreters).map_err(|e| e.0)?;
    let io = |what: &str, p: &Path, e: io::Error| format!("{what} {}: {e}", p.display());
    // As few inodes as possible: on ext4, creating and removing directories is most of a
    // trivial run's cost (see docs/benchmarks.md). The workspace, its tmp, and the working
    // directory only when it is not the workspace itself.
    let mut owned = vec![ws.to_path_buf(), ws.join("tmp")];
    // The name is unique per pool instance and run (see `Reactor::begin`): one that exists
    // can only be the leftover of a dead process that had the same pid and random tag, and
    // must not block this run.
    if ws.symlink_metadata().is_ok() {
        log::warn!(target: "etask::runner", "removing leftover workspace {}", ws.display());
        std::fs::remove_dir_all(ws).map_err(|e| io("cannot remove leftover workspace", ws, e))?;
    }
    for d in &owned {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(d)
            .map_err(|e| io("cannot create workspace dir", d, e))?;
    }
    if launch.cwd != ws {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&launch.cwd)
            .map_err(|e| io("cannot create working dir", &launch.cwd, e))?;
        owned.push(launch.cwd.clone());
    }
    if let Some((path, bytes, mode)) = &launch.script {
        // Open for writing only while no clone is in flight (ETXTBSY, see spawn::EXEC_FILES).
        let _writing = super::spawn::writing_executable();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .open(path)
            .map_err(|e| io("cannot create", path, e))?;
        f.write_all(bytes)
            .map_err(|e| io("cannot write", path, e))?;
        owned.push(path.clone());
    }
    for (path, bytes) in &launch.inputs {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("cannot create", path, e))?;
        f.write_all(bytes)
            .map_err(|e| io("cannot write", path, e))?;
        owned.push(path.clone());
    }
    if let Some(RunAs { uid, gid }) = cfg.run_as {
        for p in &owned {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(|e| io("cannot chown", p, e))?;
        }
    }
    Ok(launch)
}

fn child_env(
    cfg: &PoolConfig,
    req: &RunRequest,
    ws: &Path,
    token: Option<&str>,
) -> Vec<(String, String)> {
    let ws_s = ws.display().to_string();
    let env: Vec<(String, String)> = vec![
        ("PATH".into(), cfg.path_env.clone()),
        ("LANG".into(), cfg.lang.clone()),
        ("HOME".into(), ws_s.clone()),
        ("TMPDIR".into(), ws.join("tmp").display().to_string()),
        ("ETASK_EXECUTION_ID".into(), req.execution_id.to_string()),
        ("ETASK_TASK_ID".into(), req.task_id.to_string()),
        ("ETASK_ATTEMPT".into(), req.attempt.to_string()),
        ("ETASK_SHARD_INDEX".into(), req.shard_index.to_string()),
        ("ETASK_SHARD_TOTAL".into(), req.shard_total.to_string()),
        ("ETASK_WORKSPACE".into(), ws_s),
        ("ETASK_RESULT_FD".into(), "3".into()),
        ("EWORK_RESULT_FD".into(), "3".into()),
        // Python block-buffers stdout into a pipe: without this a script's progress shows up
        // only at its end, and whatever it printed is lost when a timeout kills it. The
        // reference ETask sets it too; shell scripts that start python benefit the same way.
        ("PYTHONUNBUFFERED".into(), "1".into()),
    ];
    // The run token only where runs are found by it (the fallback without cgroups).
    let mut env = env;
    if let Some(t) = token {
        env.push((tree::TOKEN_VAR.into(), t.into()));
    }
    // Request env may override PATH/LANG/HOME/TMPDIR (validation refuses any ETASK_* name);
    // then the reference's variables, each under its own name (validation keeps them apart
    // from env, secret_env and ETASK_* names). A map, so a large environment costs its size
    // once (a remove-then-push per entry was quadratic and stalled the launchers).
    let mut by_name: std::collections::BTreeMap<String, String> = env.into_iter().collect();
    for (k, v) in req.program.env.iter().chain(req.program.secret_env.iter()) {
        by_name.insert(k.clone(), v.clone());
    }
    for (k, v) in req.program.variable_env() {
        by_name.insert(k.to_owned(), v.to_owned());
    }
    by_name.into_iter().collect()
}
