//! A small stderr logger for the `log` facade: one line per event, `LEVEL target: message`,
//! level from `ETASK_LOG` (error|warn|info|debug|trace, default info). Kept in-tree because it
//! is twenty lines and the daemons run under systemd, which adds the timestamps.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let lvl = match r.level() {
                Level::Error => "ERROR",
                Level::Warn => "WARN ",
                Level::Info => "INFO ",
                Level::Debug => "DEBUG",
                Level::Trace => "TRACE",
            };
            let _ = writeln!(
                std::io::stderr().lock(),
                "{lvl} {}: {}",
                r.target(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored. `default` applies when ETASK_LOG is unset.
pub fn init(default: LevelFilter) {
    let level = std::env::var("ETASK_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
