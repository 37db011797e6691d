//! A small stderr logger for the `log` facade: one line per event, `TIME LEVEL target: message`,
//! level from `ETASK_LOG` (error|warn|info|debug|trace, default info). Kept in-tree because it
//! is a few lines. When stderr is the journal (systemd units) the time is left to journald and
//! the line starts with a `<N>` syslog priority instead, so `journalctl -p warning` works.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct StderrLogger {
    level: LevelFilter,
    journal: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let (lvl, priority) = match r.level() {
                Level::Error => ("ERROR", 3),
                Level::Warn => ("WARN ", 4),
                Level::Info => ("INFO ", 6),
                Level::Debug => ("DEBUG", 7),
                Level::Trace => ("TRACE", 7),
            };
            let mut err = std::io::stderr().lock();
            let _ = if self.journal {
                writeln!(err, "<{priority}>{lvl} {}: {}", r.target(), r.args())
            } else {
                let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
                writeln!(err, "{now} {lvl} {}: {}", r.target(), r.args())
            };
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
            let _ = writeln!(
                std::io::stderr(),
                "etask: ETASK_LOG={:?} is not a level (error, warn, info, debug, trace); using {}",
                asked.unwrap_or_default(),
                default.as_str().to_ascii_lowercase()
            );
            default
        }
        None => default,
    };
    let journal = stderr_is_journal();
    if log::set_boxed_logger(Box::new(StderrLogger { level, journal })).is_ok() {
        log::set_max_level(level);
    }
}

/// True when stderr is the journal's stream: systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the
/// socket it connected; comparing it with fd 2 tells a service's own stderr from one an
/// operator redirected (`etask server 2>file` started from a unit's shell).
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    // SAFETY: fstat on fd 2 into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}
