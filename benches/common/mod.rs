//! What both benchmarks measure against: the raw rate of spawning `sh -c true` with captured
//! stdio from this process.

use std::time::Instant;

/// `sh -c true` with piped stdio from C threads; std waits on each child itself. Runs before any
/// pool exists, because a pool reaps every child of the process.
pub fn raw_spawn_rate(runs: usize, conc: usize) -> f64 {
    let t0 = Instant::now();
    let per = runs / conc;
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per {
                    let out = std::process::Command::new("sh")
                        .args(["-c", "true"])
                        .output()
                        .expect("spawn sh");
                    assert!(out.status.success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("raw spawner");
    }
    (per * conc) as f64 / t0.elapsed().as_secs_f64()
}
