//! Runs contained in cgroups, through real processes in real cgroups: escapees that clear
//! their environment, fork bombs of root, memory and CPU limits, usage in the outcome, and 200
//! concurrent runs that each get and lose their own cgroup. A case skips (with the reason
//! printed) only where the host has no such mechanism. Like tests/runner.rs, this binary never
//! spawns children of its own: the pool reaps every child of the process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etask::model::{ExecutionId, Status};
use etask::runner::{
    CgroupConfig, CgroupWant, Ending, Limits, Outcome, Pool, PoolConfig, Program, RunEvent,
    RunRequest, Stream,
};

/// `ETASK_TEST_CGROUP=v1|v2` pins the hierarchy (default: auto, the node's own choice);
/// `ETASK_TEST_CLONE=vfork` spawns with clone(CLONE_VM|CLONE_VFORK) instead of clone3.
fn cfg() -> PoolConfig {
    if std::env::var("ETASK_TEST_CLONE").as_deref() == Ok("vfork") {
        etask::runner::spawn::disable_clone3();
    }
    let want = std::env::var("ETASK_TEST_CGROUP")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or_default();
    PoolConfig {
        workspace_root: std::env::temp_dir().join(format!("etask-cg-ws-{}", std::process::id())),
        kill_grace: Duration::from_millis(300),
        cgroup: CgroupConfig {
            want,
            ..CgroupConfig::default()
        },
        ..PoolConfig::default()
    }
}

struct Ran {
    outcome: Outcome,
    out: String,
    err: String,
}

fn collect(rx: crossbeam_channel::Receiver<RunEvent>) -> Ran {
    let (mut out, mut err) = (String::new(), String::new());
    loop {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("finished within 60 s")
        {
            RunEvent::Log { chunk, .. } if chunk.stream == Stream::Stdout => {
                out.push_str(&chunk.data)
            }
            RunEvent::Log { chunk, .. } => err.push_str(&chunk.data),
            RunEvent::Started { .. } => {}
            RunEvent::Finished { outcome, .. } => return Ran { outcome, out, err },
        }
    }
}

fn next_id() -> ExecutionId {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
    ExecutionId(NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
}

fn run_on(pool: &Pool, program: Program, timeout: Option<Duration>) -> Ran {
    let mut req = RunRequest::new(next_id(), program);
    req.timeout = timeout;
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit(req, tx).expect("submit");
    collect(rx)
}

/// A pool whose runs live in cgroups, or None (with the reason printed) on a host without.
fn contained_pool(c: PoolConfig) -> Option<Pool> {
    let pool = Pool::start(c).expect("pool");
    if pool.containment() == "none" {
        println!(
            "skipped: this host offers no writable cgroup ({})",
            pool.containment_summary()
        );
        return None;
    }
    Some(pool)
}

/// A pool that enforces `ctl` limits, or None (reason printed) where the host has no such
/// controller.
fn pool_with(ctl: &str, limits: Limits) -> Option<Pool> {
    let pool = contained_pool(PoolConfig {
        run_limits: limits,
        ..cfg()
    })?;
    let summary = pool.containment_summary().to_owned();
    let have = summary
        .split("limits=[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .is_some_and(|l| l.split(',').any(|c| c == ctl));
    if !have {
        println!("skipped: no writable {ctl} controller here ({summary})");
        return None;
    }
    Some(pool)
}

/// Waits until no process with this pid exists.
fn gone(pid: i32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pid_after(text: &str, key: &str) -> i32 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text:?}"))
}

/// Clears its environment (no run token left to find it by) and daemonizes a `sleep` that is
/// re-parented away from the run's tree; prints its pid.
const ESCAPE: &str = "env -i /bin/sh -c 'setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo escapee=$!'\necho started\nsleep 1000\n";

#[test]
fn env_clearing_double_forked_sleep_is_killed_at_timeout() {
    let Some(pool) = contained_pool(cfg()) else {
        return;
    };
    let r = run_on(
        &pool,
        Program::shell(ESCAPE),
        Some(Duration::from_millis(800)),
    );
    assert_eq!(r.outcome.ending, Ending::TimedOut, "{}", r.err);
    let pid = pid_after(&r.out, "escapee=");
    assert!(
        gone(pid, Duration::from_secs(3)),
        "the escapee {pid} survived the timeout"
    );
}

#[test]
fn env_clearing_double_forked_sleep_is_killed_at_cancel() {
    let Some(pool) = contained_pool(cfg()) else {
        return;
    };
    let req = RunRequest::new(next_id(), Program::shell(ESCAPE));
    let key = req.key();
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit(req, tx).unwrap();
    let mut out = String::new();
    while !out.contains("started") {
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            RunEvent::Log { chunk, .. } => out.push_str(&chunk.data),
            RunEvent::Finished { outcome, .. } => panic!("finished early: {outcome:?}"),
            RunEvent::Started { .. } => {}
        }
    }
    pool.cancel(key);
    let r = collect(rx);
    assert_eq!(r.outcome.ending, Ending::Cancelled);
    let pid = pid_after(&(out + &r.out), "escapee=");
    assert!(
        gone(pid, Duration::from_secs(3)),
        "the escapee {pid} survived the cancel"
    );
}

#[test]
fn fork_bomb_of_root_is_stopped_by_the_pids_limit() {
    let limits = Limits {
        pids: Some(40),
        ..Limits::default()
    };
    let Some(pool) = pool_with("pids", limits) else {
        return;
    };
    // As root, without run_as: RLIMIT_NPROC would not bind here; pids.max does.
    let t0 = Instant::now();
    let r = run_on(
        &pool,
        Program::shell("bomb() { bomb | bomb & }\nbomb\nsleep 2\necho survived\n"),
        Some(Duration::from_secs(4)),
    );
    let res = r.outcome.resources.clone().expect("resources");
    assert!(res.pids_exhausted, "pids limit never reached: {res:?}");
    assert_eq!(res.limits.pids, Some(40));
    assert!(t0.elapsed() < Duration::from_secs(15));
    if let Some(e) = r.outcome.error() {
        assert!(e.contains("process limit of 40"), "{e}");
    }
}

#[test]
fn allocation_past_the_memory_limit_ends_oom_killed() {
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        ..Limits::default()
    };
    let Some(pool) = pool_with("memory", limits) else {
        return;
    };
    let r = run_on(
        &pool,
        Program::python("b = b'x' * (400 << 20)\nprint('allocated', len(b))\n"),
        Some(Duration::from_secs(30)),
    );
    let res = r.outcome.resources.clone().expect("resources");
    assert!(res.oom_killed, "not OOM-killed: {:?} {}", r.outcome, r.err);
    assert_eq!(r.outcome.ending, Ending::Signaled(libc::SIGKILL));
    assert_eq!(r.outcome.status(), Status::Failed);
    let e = r.outcome.error().unwrap();
    assert!(e.contains("OOM killer") && e.contains("67108864"), "{e}");
    assert!(!r.out.contains("allocated"));
    let peak = res
        .memory_peak_bytes
        .expect("peak memory of a memory cgroup");
    assert!(peak <= (64 << 20) + (1 << 20), "peak {peak} over the limit");
    // The outcome JSON (etask run --json, the execution API) carries it.
    let j = r.outcome.to_json();
    assert_eq!(j["resources"]["oom_killed"], true, "{j}");
}

#[test]
fn memory_within_the_limit_runs_and_reports_its_peak() {
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        ..Limits::default()
    };
    let Some(pool) = pool_with("memory", limits) else {
        return;
    };
    let r = run_on(
        &pool,
        Program::python("b = b'x' * (40 << 20)\nprint('ok', len(b))\n"),
        Some(Duration::from_secs(30)),
    );
    assert_eq!(r.outcome.status(), Status::Succeeded, "{}", r.err);
    let res = r.outcome.resources.expect("resources");
    assert!(!res.oom_killed);
    let peak = res.memory_peak_bytes.expect("peak");
    assert!(peak >= 40 << 20, "peak {peak} below what was allocated");
}

#[test]
fn cpu_limit_throttles_a_busy_loop_and_usage_is_reported() {
    let limits = Limits {
        cpu_millicores: Some(200),
        ..Limits::default()
    };
    let Some(pool) = pool_with("cpu", limits) else {
        return;
    };
    let r = run_on(
        &pool,
        Program::python(
            "import time\nend = time.time() + 1.5\nwhile time.time() < end:\n    pass\n",
        ),
        Some(Duration::from_secs(30)),
    );
    assert_eq!(r.outcome.status(), Status::Succeeded, "{}", r.err);
    let res = r.outcome.resources.expect("resources");
    let cpu = res.cpu_user_ms.unwrap_or(0) + res.cpu_system_ms.unwrap_or(0);
    // 1.5 s of wall time at 20 % of a CPU: about 300 ms; unthrottled it would be ~1500 ms.
    assert!(
        (100..=700).contains(&cpu),
        "cpu time {cpu} ms for 1.5 s at 200 millicores: {res:?}"
    );
}

#[test]
fn usage_is_reported_without_limits() {
    let Some(pool) = contained_pool(cfg()) else {
        return;
    };
    let r = run_on(
        &pool,
        Program::python("x = sum(i * i for i in range(3_000_000))\n"),
        None,
    );
    let res = r.outcome.resources.expect("resources");
    assert!(res.cpu_user_ms.unwrap_or(0) > 0, "{res:?}");
    assert!(res.unenforced.is_empty());
}

#[test]
fn a_limit_the_node_cannot_enforce_is_reported_not_dropped() {
    let pool = Pool::start(PoolConfig {
        cgroup: CgroupConfig {
            want: CgroupWant::Off,
            ..CgroupConfig::default()
        },
        ..cfg()
    })
    .unwrap();
    assert_eq!(pool.containment(), "none");
    let mut p = Program::shell("true");
    p.limits = Some(Limits {
        pids: Some(10),
        ..Limits::default()
    });
    let r = run_on(&pool, p, None);
    assert_eq!(r.outcome.status(), Status::Succeeded);
    let res = r.outcome.resources.expect("resources");
    assert_eq!(res.containment, "none");
    assert_eq!(res.unenforced.len(), 1, "{res:?}");
    assert!(res.unenforced[0].starts_with("pids"), "{res:?}");
}

/// The cgroup2 mount point and the v1 mount of `ctl`, from mountinfo.
fn mount_of(v2: bool, ctl: &str) -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        let mut post = post.split(' ');
        let fstype = post.next()?;
        let opts = post.nth(1)?;
        let ok = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && opts.split(',').any(|o| o == ctl)
        };
        ok.then(|| PathBuf::from(point))
    })
}

#[test]
fn two_hundred_concurrent_runs_each_get_and_lose_their_own_cgroup() {
    let limits = Limits {
        pids: Some(100),
        ..Limits::default()
    };
    let Some(pool) = contained_pool(PoolConfig {
        max_concurrent: 200,
        run_limits: limits,
        ..cfg()
    }) else {
        return;
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    for _ in 0..200 {
        let p = Program::exec(vec![
            "sh".into(),
            "-c".into(),
            "sleep 0.3; cat /proc/self/cgroup".into(),
        ]);
        pool.submit(RunRequest::new(next_id(), p), tx.clone())
            .unwrap();
    }
    let mut paths: Vec<(String, String)> = Vec::new();
    let mut outs: std::collections::HashMap<i64, String> = Default::default();
    let mut done = 0;
    while done < 200 {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("all 200 finish")
        {
            RunEvent::Log { key, chunk } => outs
                .entry(key.execution.0)
                .or_default()
                .push_str(&chunk.data),
            RunEvent::Finished { key, outcome } => {
                assert_eq!(outcome.status(), Status::Succeeded, "{outcome:?}");
                let out = outs.remove(&key.execution.0).unwrap_or_default();
                let want = format!("/run-{}-1-", key.execution.0);
                let mine: Vec<(String, String)> = out
                    .lines()
                    .filter_map(|l| {
                        let mut it = l.splitn(3, ':');
                        let (_, ctls, path) = (it.next()?, it.next()?, it.next()?);
                        path.contains(&want)
                            .then(|| (ctls.to_owned(), path.to_owned()))
                    })
                    .collect();
                assert!(!mine.is_empty(), "run {key:?} was in no run cgroup: {out}");
                paths.extend(mine);
                done += 1;
            }
            RunEvent::Started { .. } => {}
        }
    }
    // Every run had its own cgroup in each hierarchy...
    let mut unique = paths.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), paths.len(), "two runs shared a cgroup");
    // ...and none is left: each was removed before its run was reported finished.
    let mut checked = 0;
    for (ctls, path) in &paths {
        let mount = if ctls.is_empty() {
            mount_of(true, "")
        } else {
            mount_of(false, ctls.split(',').next().unwrap_or(""))
        };
        if let Some(m) = mount {
            // The test runs in its own cgroups' namespace view: the path is under the mount.
            let dir = m.join(path.trim_start_matches('/'));
            assert!(!dir.exists(), "{} was left behind", dir.display());
            checked += 1;
        }
    }
    assert!(checked >= 200, "checked {checked} cgroup paths");
}

/// The node's own cgroup v2 directory (where pools make their subtrees by default).
fn own_v2_dir() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount_of(true, "")?.join(path.trim_start_matches('/')))
}

#[test]
fn subtrees_of_nodes_that_are_gone_are_removed_and_live_ones_kept() {
    // The sweep of v2 node subtrees runs when the node contains runs in v2 (auto or v2).
    if matches!(
        std::env::var("ETASK_TEST_CGROUP").as_deref(),
        Ok("off" | "v1")
    ) {
        println!("skipped: ETASK_TEST_CGROUP pins a mode without v2 placement");
        return;
    }
    let Some(base) = own_v2_dir() else {
        println!("skipped: no cgroup v2 here");
        return;
    };
    // Two default-named node subtrees with a run cgroup each: one whose node is gone, one
    // whose node holds its lock (as a live node does).
    let tag = format!("{:08x}", std::process::id().wrapping_mul(2_654_435_761));
    let gone = base.join(format!("etask-{}", &tag[..8]));
    let live = base.join(format!("etask-{:08x}", !std::process::id()));
    for d in [&gone, &live] {
        if std::fs::create_dir_all(d.join("run-1-1-x")).is_err() {
            println!("skipped: cannot create cgroups under {}", base.display());
            return;
        }
    }
    let held = std::fs::File::open(&live).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&held),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        },
        0
    );
    let pool = contained_pool(cfg());
    let gone_left = gone.exists();
    let live_kept = live.join("run-1-1-x").exists();
    drop(held);
    let _ = std::fs::remove_dir(live.join("run-1-1-x"));
    let _ = std::fs::remove_dir(&live);
    if pool.is_none() {
        let _ = std::fs::remove_dir(gone.join("run-1-1-x"));
        let _ = std::fs::remove_dir(&gone);
        return;
    }
    assert!(!gone_left, "{} was left behind", gone.display());
    assert!(live_kept, "a live node's subtree was removed");
}
