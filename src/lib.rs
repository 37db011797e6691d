//! ETask: distributed execution of ops scripts for ECMDB. One crate, one binary (`etask`), with
//! the scheduler, the node roles and the process pool as modules; tests and benches use the
//! same code through this library.

pub mod cron;
pub mod logging;
pub mod model;
pub mod runner;
pub mod shutdown;
pub mod signals;
pub mod store;
pub mod supervise;
pub mod trust;

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

/// `wanted`, or a quarter of the process's open-files limit if that is smaller: what one
/// listener may hold, so that connections alone can never take the descriptors scripts,
/// pipes and the store need (a listener's cap above the limit let a flood of idle
/// connections make every run fail to start).
pub fn connection_budget(wanted: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    wanted.min((soft / 4).max(16))
}

/// "<hostname>-<pid>": what names this process to brokers, registries and logs by default.
/// Writes one start-up line (`etask listening on …`) to stdout for scripts and supervisors.
///
/// A daemon must outlive its stdout: when the reader is gone (`etask server | head -1`, a
/// test that read the port and dropped the pipe) or the disk is full, the line is lost and a
/// warning logged, where `println!` would panic and take every running script with it.
pub fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        log::warn!(target: "etask::server", "cannot write start-up line to stdout ({e}): {line}");
    }
}

/// The most a key file may hold (a key is one line of ~70 bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 16 << 10;
/// The most a config, certificate, CA bundle or password file may hold.
pub const MAX_SMALL_FILE_BYTES: u64 = 4 << 20;

/// Reads a file named by the config or the command line, at most `max` bytes: longer is an
/// error, never read to the end (a key path of `/dev/zero` grew a process to 22 GB). With
/// `regular_only`, anything but a regular file (after symlinks) is refused before it is opened
/// for reading, so a FIFO cannot hang the caller; without it (scripts: `--shell /dev/stdin`
/// reads a pipe) only the size is bounded.
///
/// # Errors
/// The file cannot be opened or read (`NotFound`, `PermissionDenied`, …), is not a regular
/// file (`InvalidInput`), or holds more than `max` bytes (`InvalidData`, "larger than N bytes").
pub fn read_bounded(
    path: &std::path::Path,
    max: u64,
    regular_only: bool,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if regular_only && !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(out)
}

/// `read_bounded` as UTF-8 text.
///
/// # Errors
/// As `read_bounded`, and `InvalidData` when the bytes are not UTF-8.
pub fn read_bounded_text(
    path: &std::path::Path,
    max: u64,
    regular_only: bool,
) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, max, regular_only)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

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

/// A lock file cannot be opened, or another live process holds it (the message names it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LockError(pub String);

/// Back to its message, for callers that still carry errors as text.
impl From<LockError> for String {
    fn from(e: LockError) -> String {
        e.0
    }
}

/// An exclusive advisory lock (`flock`) on `path`, created if missing, held until the returned
/// file is dropped (or the process dies: a killed process never leaves it held). `what` names
/// the resource in the error, which also names the process holding it; `fix` says what to do.
///
/// # Errors
/// When the file cannot be opened, or another process holds the lock.
pub fn lock_exclusive(
    path: &std::path::Path,
    what: &str,
    fix: &str,
) -> Result<std::fs::File, LockError> {
    lock_exclusive_inner(path, what, fix).map_err(LockError)
}

fn lock_exclusive_inner(
    path: &std::path::Path,
    what: &str,
    fix: &str,
) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // 0600 like the store beside it (it holds the holder's pid only, but nothing in the data
    // dir is for other users).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    // A process that was just killed may keep its lock for a moment through a child it was
    // creating (the descriptor closes on that child's exec or death): while the recorded
    // holder is gone, wait up to 5 s; a live holder is refused at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // SAFETY (both calls): flock on a file descriptor this function owns; kill with signal 0
    // only asks whether the process exists.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.rewind();
        let _ = f.read_to_string(&mut holder);
        let pid: i32 = holder.trim().parse().unwrap_or(0);
        let holder_alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
        if holder_alive || std::time::Instant::now() >= deadline {
            return Err(format!(
                "{what} is in use by another etask process (pid {}, lock {}): stop that one, or {fix}",
                holder.trim(),
                path.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Who holds it, for the error above; best effort.
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

#[cfg(test)]
mod read_bounded_tests {
    use super::*;

    #[test]
    fn files_named_from_outside_are_read_bounded_and_regular_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("etask-read-bounded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_bounded(&f, 10, true).unwrap(), b"0123456789");
        let e = read_bounded(&f, 9, true).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        // An endless source is cut at the bound, not read to the end of memory.
        let e = read_bounded(std::path::Path::new("/dev/zero"), 1 << 20, false).unwrap_err();
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
        // A FIFO nobody writes to is refused before it is opened (opening it would block).
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_bounded(&fifo, 100, true).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(read_bounded_text(&dir.join("missing"), 10, true).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
