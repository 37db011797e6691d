//! Process-pool benchmark (prints figures, asserts nothing):
//!   1. runs/s of N trivial shell scripts (`true`) through the pool at concurrency C, next to the
//!      raw rate of spawning `sh -c true` with captured stdio from this process at the same C;
//!   2. the RSS of this process while M `sleep 30` children run in the pool.
//! Usage: cargo bench --bench pool -- [--runs N] [--concurrency C] [--sleepers M]

use std::time::{Duration, Instant};

use etask::model::{ExecutionId, Status};
#[path = "common/mod.rs"]
mod common;
use common::raw_spawn_rate;
use etask::runner::{Pool, PoolConfig, Program, RunEvent, RunRequest};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pool_rate(runs: usize, conc: usize, root: Option<&str>) -> f64 {
    let mut cfg = PoolConfig {
        max_concurrent: conc,
        queue_capacity: runs,
        ..PoolConfig::default()
    };
    if let Some(r) = root {
        cfg.workspace_root = r.into();
    }
    let pool = Pool::start(cfg).expect("pool");
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
    runs as f64 / t0.elapsed().as_secs_f64()
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
    let raw = raw_spawn_rate(runs, conc);
    let pooled = pool_rate(runs, conc, None);
    let default_root = PoolConfig::default().workspace_root;
    println!("pool: {runs} runs of `true` at concurrency {conc}");
    println!("  raw spawn (sh -c true, piped stdio): {raw:8.0} runs/s");
    println!(
        "  through the pool (shell program):   {pooled:8.0} runs/s  (workspaces under {})",
        default_root.display()
    );
    println!(
        "  ratio pool/raw: {:.0} % (target >= 80 %)",
        100.0 * pooled / raw
    );
    // Each run creates and removes a private workspace; on a disk file system that inode churn
    // is most of the pool's own cost, so show the same run with workspaces on tmpfs too.
    if std::path::Path::new("/dev/shm").is_dir() {
        let shm = pool_rate(runs, conc, Some("/dev/shm/etask-bench-work"));
        println!(
            "  through the pool, workspaces on tmpfs (/dev/shm): {shm:8.0} runs/s, ratio {:.0} %",
            100.0 * shm / raw
        );
        let _ = std::fs::remove_dir_all("/dev/shm/etask-bench-work");
    }
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
