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
    let asked = std::env::var("ETASK_LOG").ok();
    let level = match asked.as_deref().map(str::parse::<LevelFilter>) {
        Some(Ok(l)) => l,
        Some(Err(_)) => {
            // Said once, on stderr, before the logger exists: a typo must not pass unnoticed.
            eprintln!(
                "etask: ETASK_LOG={:?} is not a level (error, warn, info, debug, trace); using {}",
                asked.unwrap_or_default(),
                default.as_str().to_ascii_lowercase()
            );
            default
        }
        None => default,
    };
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
