//! A small stderr logger for the `log` facade: one line per event, `TIME LEVEL target: message`,
//! level from `ETASK_LOG` (error|warn|info|debug|trace, default info), written by a thread of
//! its own so that no caller ever waits for stderr (see `StderrLogger`). Kept in-tree because
//! it is a few lines. When stderr is the journal (systemd units) the time is left to journald and
//! the line starts with a `<N>` syslog priority instead, so `journalctl -p warning` works.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines waiting for stderr; past this many, new lines are dropped and counted.
const QUEUE_LINES: usize = 8192;

/// What the writer thread is handed.
enum Msg {
    Line(String),
    /// Answered once every line queued before it has been written.
    Flush(Sender<()>),
}

/// Logging never waits for stderr: a line goes to a bounded queue that one writer thread
/// empties. A stderr that stops taking bytes (a stopped `| tee`, a paused terminal, journald
/// under backpressure) blocks only that thread; once the queue is full further lines are
/// dropped and counted, and the count is written as a WARN line when stderr moves again.
/// Before, every thread that logged (HTTP workers, dispatcher, ingest) blocked on the
/// logger's lock behind one `write(2)` and the whole server stood still. Written here
/// rather than taken from a crate: the non-blocking writers that exist belong to `tracing`,
/// which ETask does not use.
struct StderrLogger {
    level: LevelFilter,
    journal: bool,
    tx: Sender<Msg>,
    dropped: &'static AtomicU64,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let line = render(self.journal, r.level(), r.target(), &r.args().to_string());
            match self.tx.try_send(Msg::Line(line)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // No writer thread (it could not be started): write in place.
                Err(TrySendError::Disconnected(Msg::Line(l))) => {
                    let _ = std::io::stderr().lock().write_all(l.as_bytes());
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
    /// Waits (at most 2 s) until every line logged so far is written: `main` calls it before
    /// the process ends.
    fn flush(&self) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if self
            .tx
            .send_timeout(Msg::Flush(done_tx), Duration::from_secs(2))
            .is_ok()
        {
            let _ = done_rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// One line: `TIME LEVEL target: message\n`, or `<N>LEVEL target: message\n` for journald.
/// One event is one line: control characters in a message (a pool name from a Kafka
/// heartbeat held `\n2026-… ERROR etask::server: FORGED`) are written escaped (`\n`,
/// `\u{1b}`), so nothing from outside can forge a line or drive the terminal. A panic's
/// message keeps its line breaks (its backtrace is ours).
fn one_line<'a>(target: &str, msg: &'a str) -> std::borrow::Cow<'a, str> {
    let keep_newlines = target == "etask::panic";
    if !msg
        .chars()
        .any(|c| c.is_control() && !(keep_newlines && c == '\n'))
    {
        return std::borrow::Cow::Borrowed(msg);
    }
    std::borrow::Cow::Owned(
        msg.chars()
            .map(|c| match c {
                '\n' if keep_newlines => "\n".to_owned(),
                c if c.is_control() => c.escape_default().to_string(),
                c => c.to_string(),
            })
            .collect(),
    )
}

fn render(journal: bool, level: Level, target: &str, msg: &str) -> String {
    let msg = one_line(target, msg);
    let (lvl, priority) = match level {
        Level::Error => ("ERROR", 3),
        Level::Warn => ("WARN ", 4),
        Level::Info => ("INFO ", 6),
        Level::Debug => ("DEBUG", 7),
        Level::Trace => ("TRACE", 7),
    };
    if journal {
        format!("<{priority}>{lvl} {target}: {msg}\n")
    } else {
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        format!("{now} {lvl} {target}: {msg}\n")
    }
}

/// The writer thread: writes queued lines in order; errors (a closed stderr) drop the line.
fn write_lines(rx: &Receiver<Msg>, journal: bool, dropped: &AtomicU64) {
    for msg in rx {
        let line = match msg {
            Msg::Line(l) => l,
            Msg::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let mut err = std::io::stderr().lock();
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let note = format!("{lost} log lines dropped: stderr did not take them in time");
            let _ = err.write_all(render(journal, Level::Warn, "etask::logging", &note).as_bytes());
        }
        let _ = err.write_all(line.as_bytes());
    }
}

/// Lines dropped because stderr did not take them, not yet reported by a note in the log:
/// above 0 while stderr is stalled (it falls to 0 when the writer moves again and writes the
/// note). `/healthz` shows it as `"log": "dropping lines"`.
pub fn lines_dropped_now() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The count behind `lines_dropped_now` (one logger per process).
static DROPPED: AtomicU64 = AtomicU64::new(0);

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
    let dropped: &'static AtomicU64 = &DROPPED;
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
    // Without the thread, `log` finds the channel disconnected and writes in place. It starts
    // with every signal blocked (a thread inherits its creator's mask): this runs before
    // `signals::termination` blocks SIGTERM/SIGINT for the threads that handle them, and a
    // process-directed signal must never be delivered to this thread, whose default action
    // would end the process without its clean shutdown.
    // SAFETY: sigfillset/pthread_sigmask on local, initialised sets of this thread.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut before);
    }
    let _ = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(&rx, journal, dropped));
    // SAFETY: restores this thread's own mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut()) };
    let logger = StderrLogger {
        level,
        journal,
        tx,
        dropped,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
        route_panics_through_the_log();
    }
}

/// Panic messages of every thread but `main` go through the logger's queue: the default hook
/// writes to stderr in place, so one panic while stderr was stalled held its thread (an HTTP
/// worker, a component about to be restarted) for as long as stderr stayed stalled, and eight
/// such panics stopped the HTTP API. `main`'s own panics keep the default hook (the process
/// ends right after: a queued line could be lost). A backtrace is added as `RUST_BACKTRACE`
/// asks.
fn route_panics_through_the_log() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        match thread.name() {
            Some("main") => default(info),
            name => {
                let name = name.unwrap_or("<unnamed>");
                let bt = std::backtrace::Backtrace::capture();
                let trace = match bt.status() {
                    std::backtrace::BacktraceStatus::Captured => format!("\n{bt}"),
                    _ => String::new(),
                };
                log::error!(target: "etask::panic", "thread '{name}' {info}{trace}");
            }
        }
    }));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_one_line_whatever_it_holds() {
        let forged = "pool x\n2026-12-06T00:00:00.000Z ERROR etask::server: FORGED\u{1b}[2J";
        let line = render(false, Level::Info, "etask::kafka", forged);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(
            line.ends_with(
                "pool x\\n2026-12-06T00:00:00.000Z ERROR etask::server: FORGED\\u{1b}[2J\n"
            ),
            "{line:?}"
        );
        // A panic keeps its line breaks (its backtrace), nothing else.
        let panic = render(true, Level::Error, "etask::panic", "boom\n   0: frame\u{7}");
        assert_eq!(panic, "<3>ERROR etask::panic: boom\n   0: frame\\u{7}\n");
    }
}
