//! Process-pool benchmark (prints figures, asserts nothing):
//!   1. with the node holding 0, 50 and 200 MiB of extra (touched) memory, runs/s of N trivial
//!      shell scripts (`true`) through the pool at concurrency C, with cgroups off, on (the
//!      default: a run cgroup per run) and on with memory + pids limits (which also joins the
//!      v1 hierarchies on a hybrid host), next to the raw rate of spawning `sh -c true` with
//!      captured stdio from this process (posix_spawn) and the rate of the same spawn through
//!      `fork` + pre_exec (how the pool spawned before), at the same C;
//!   2. the RSS of this process while M `sleep 30` children run in the pool.
//!
//! Usage: cargo bench --bench pool -- [--runs N] [--concurrency C] [--sleepers M]
//!        [--mib 0,50,200] [--workspace DIR] [--launchers L]

use std::time::{Duration, Instant};

use etask::model::{ExecutionId, Status};
#[path = "common/mod.rs"]
mod common;
use common::raw_spawn_rate;
use etask::runner::{
    CgroupConfig, CgroupWant, Limits, Pool, PoolConfig, Program, RunEvent, RunRequest,
};

fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// `sh -c true` with piped stdio through `fork` + an (empty) pre_exec closure: std then forks
/// instead of using posix_spawn, like the pool did before it used clone(CLONE_VM|CLONE_VFORK).
fn fork_spawn_rate(runs: usize, conc: usize) -> f64 {
    use std::os::unix::process::CommandExt;
    let t0 = Instant::now();
    let per = runs / conc;
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per {
                    let mut cmd = std::process::Command::new("sh");
                    cmd.args(["-c", "true"]);
                    // SAFETY: the closure does nothing.
                    unsafe { cmd.pre_exec(|| Ok(())) };
                    let out = cmd.output().expect("spawn sh");
                    assert!(out.status.success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("fork spawner");
    }
    (per * conc) as f64 / t0.elapsed().as_secs_f64()
}

struct Setup<'a> {
    want: CgroupWant,
    limits: Limits,
    root: Option<&'a str>,
    launchers: Option<usize>,
}

/// Runs/s through the pool, and the containment it reported.
fn pool_rate(runs: usize, conc: usize, s: &Setup<'_>) -> (f64, String) {
    let mut cfg = PoolConfig {
        max_concurrent: conc,
        queue_capacity: runs,
        cgroup: CgroupConfig {
            want: s.want,
            ..CgroupConfig::default()
        },
        run_limits: s.limits,
        ..PoolConfig::default()
    };
    if let Some(r) = s.root {
        cfg.workspace_root = r.into();
    }
    if let Some(l) = s.launchers {
        cfg.launchers = l;
    }
    let pool = Pool::start(cfg).expect("pool");
    let mode = pool.containment().to_owned();
    let (tx, rx) = crossbeam_channel::unbounded();
    let t0 = Instant::now();
    for i in 0..runs {
        pool.submit(
            RunRequest::new(ExecutionId(i as i64), Program::shell("true")),
            tx.clone(),
        )
        .expect("submit");
    }
    let mut done = 0;
    while done < runs {
        if let RunEvent::Finished { outcome, .. } = rx.recv().expect("events") {
            assert_eq!(outcome.status(), Status::Succeeded, "{outcome:?}");
            done += 1;
        }
    }
    let rate = runs as f64 / t0.elapsed().as_secs_f64();
    pool.shutdown();
    (rate, mode)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn rss_with_sleepers(n: usize) -> (u64, u64, Duration) {
    let before = rss_kib();
    let pool = Pool::start(PoolConfig {
        max_concurrent: n,
        queue_capacity: n,
        kill_grace: Duration::from_millis(200),
        ..PoolConfig::default()
    })
    .expect("pool");
    let (tx, rx) = crossbeam_channel::unbounded();
    let t0 = Instant::now();
    for i in 0..n {
        let p = Program::exec(vec!["sleep".into(), "30".into()]);
        pool.submit(RunRequest::new(ExecutionId(i as i64), p), tx.clone())
            .expect("submit");
    }
    let mut started = 0;
    while started < n {
        match rx.recv().expect("events") {
            RunEvent::Started { .. } => started += 1,
            RunEvent::Finished { outcome, .. } => panic!("a sleeper ended early: {outcome:?}"),
            RunEvent::Log { .. } => {}
        }
    }
    let spawn_time = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib();
    pool.shutdown();
    (before, during, spawn_time)
}

fn main() {
    etask::logging::init(log::LevelFilter::Warn);
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` compatibility
    }
    let runs = arg("--runs", 2000);
    let conc = arg("--concurrency", 4);
    let sleepers = arg("--sleepers", 1000);
    let mibs: Vec<usize> = arg_str("--mib")
        .unwrap_or_else(|| "0,50,200".into())
        .split(',')
        .filter_map(|m| m.trim().parse().ok())
        .collect();
    let workspace = arg_str("--workspace");
    let launchers = arg_str("--launchers").and_then(|l| l.parse().ok());
    let root = workspace.as_deref();
    let ws_shown = root.map_or_else(
        || PoolConfig::default().workspace_root.display().to_string(),
        str::to_owned,
    );
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        pids: Some(1024),
        cpu_millicores: None,
    };
    println!("pool: {runs} runs of `true` at concurrency {conc}, workspaces under {ws_shown}");
    let mut base: Option<f64> = None;
    for &mib in &mibs {
        // Extra node memory, touched so every page is mapped (what fork has to copy).
        let ballast: Vec<u8> = vec![1u8; mib << 20];
        let raw = raw_spawn_rate(runs, conc);
        let fork = fork_spawn_rate(runs, conc);
        let (off, _) = pool_rate(
            runs,
            conc,
            &Setup {
                want: CgroupWant::Off,
                limits: Limits::default(),
                root,
                launchers,
            },
        );
        let (on, mode) = pool_rate(
            runs,
            conc,
            &Setup {
                want: CgroupWant::Auto,
                limits: Limits::default(),
                root,
                launchers,
            },
        );
        let (lim, _) = pool_rate(
            runs,
            conc,
            &Setup {
                want: CgroupWant::Auto,
                limits,
                root,
                launchers,
            },
        );
        std::hint::black_box(&ballast);
        let b = *base.get_or_insert(on);
        println!("node holding {mib} MiB extra:");
        println!("  raw spawn (posix_spawn sh -c true, piped stdio): {raw:7.0} runs/s");
        println!(
            "  fork + pre_exec spawn (the pool's old way):       {fork:7.0} runs/s  ({:.0} % of raw)",
            100.0 * fork / raw
        );
        println!(
            "  pool, cgroups off (token fallback):              {off:7.0} runs/s  ({:.0} % of raw)",
            100.0 * off / raw
        );
        println!(
            "  pool, cgroups on ({mode}, no limits):        {on:7.0} runs/s  ({:.0} % of raw, {:.0} % of off; {:.0} % of the 0 MiB figure)",
            100.0 * on / raw,
            100.0 * on / off,
            100.0 * on / b
        );
        println!(
            "  pool, cgroups on + memory/pids limits:           {lim:7.0} runs/s  ({:.0} % of raw, {:.0} % of off)",
            100.0 * lim / raw,
            100.0 * lim / off
        );
    }
    if sleepers > 0 {
        let (before, during, t) = rss_with_sleepers(sleepers);
        println!(
            "rss: {sleepers} `sleep 30` children running (all started in {} ms)",
            t.as_millis()
        );
        println!(
            "  node RSS before: {:.1} MiB, while running: {:.1} MiB (target <= 64 MiB)",
            before as f64 / 1024.0,
            during as f64 / 1024.0
        );
    }
}
