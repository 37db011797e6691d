//! ETask: distributed execution of ops scripts for ECMDB. One crate, one binary (`etask`), with
//! the scheduler, the node roles and the process pool as modules; tests and benches use the
//! same code through this library.

pub mod logging;
pub mod model;
pub mod runner;
pub mod signals;
pub mod store;

/// "0.1.0 (abc1234)": the crate version and the git commit it was built from (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("ETASK_GIT_COMMIT"),
    ")"
);

/// Milliseconds since the Unix epoch: the time unit of the store and the API.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// "<hostname>-<pid>": what names this process to brokers, registries and logs by default.
pub fn host_pid() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
pub mod client;
pub mod config;
pub mod delivery;
pub mod node;
pub mod registry;
pub mod scheduler;
pub mod sd_notify;
pub mod server;
