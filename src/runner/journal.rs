//! The start journal of a node: a small append-only file that records, per attempt, that the
//! node took it (`T`) and that it started its process (`S`, written before the fork). After a
//! crash (`kill -9`, OOM kill) the next incarnation reads the previous one's journal: an
//! attempt taken but never started provably ran nowhere, so it can be dispatched again without
//! counting against the retry budget. It does not own deciding that: it only answers which.
//!
//! Cost: one `write(2)` per line, no fsync. A process crash keeps what it wrote (the page cache
//! survives it); a host crash may not, so the journal records the boot id and, after a reboot,
//! claims nothing as unstarted (every in-doubt attempt stays `lost`, as without a journal).
//! One node per journal: the file is locked (`flock`) for the life of the process.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Rewrite the file (keeping only open entries) when it grows past this many bytes.
const COMPACT_AT: u64 = 4 << 20;

/// What the previous incarnation of this node left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Previous {
    /// The previous node id (what the scheduler recorded as the attempts' holder).
    pub node: String,
    /// Attempts it took and never started: (execution id, attempt). Empty after a reboot.
    pub unstarted: Vec<(i64, u32)>,
    /// Attempts it started (created a process for). `None` after a reboot, when the journal
    /// may have lost lines: then nothing may be called unstarted.
    pub started: Option<HashSet<(i64, u32)>>,
}

pub struct StartJournal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for StartJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StartJournal({})", self.path.display())
    }
}

struct Inner {
    file: File,
    header: String,
    /// Taken and not started yet: the entries a compaction keeps.
    open: HashSet<(i64, u32)>,
    written: u64,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// An attempt in the journal: (execution id, attempt number).
type RunKey = (i64, u32);

/// Parses a journal: (node, boot, taken-but-not-started, started).
fn parse(text: &str) -> (String, String, Vec<RunKey>, HashSet<RunKey>) {
    let mut lines = text.lines();
    let mut node = String::new();
    let mut boot = String::new();
    if let Some(h) = lines.next() {
        for f in h.split_whitespace() {
            if let Some(v) = f.strip_prefix("node=") {
                node = v.to_owned();
            } else if let Some(v) = f.strip_prefix("boot=") {
                boot = v.to_owned();
            }
        }
    }
    let mut taken: Vec<RunKey> = Vec::new();
    let mut started: HashSet<RunKey> = HashSet::new();
    for l in lines {
        // A torn line is ignored. Killing a process never tears a small write(2); only a
        // host crash can, and after one nothing is claimed unstarted (the boot id differs).
        let mut f = l.split(' ');
        let (Some(kind), Some(e), Some(a), None) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(e), Ok(a)) = (e.parse::<i64>(), a.parse::<u32>()) else {
            continue;
        };
        match kind {
            "T" => taken.push((e, a)),
            "S" => {
                started.insert((e, a));
            }
            _ => {}
        }
    }
    taken.retain(|k| !started.contains(k));
    taken.dedup();
    (node, boot, taken, started)
}

impl StartJournal {
    /// Opens (creating) the journal at `path` for node `node`, returning what the previous
    /// incarnation left, and starts a fresh journal.
    ///
    /// # Errors
    /// The file cannot be opened, read or written, or another live process holds it (two
    /// nodes on one data dir).
    pub fn open(path: &Path, node: &str) -> io::Result<(StartJournal, Previous)> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // A node that was just killed may hold the lock for a moment through a child it was
        // creating (closed on that child's exec or death): try for up to 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} is in use by another running node (one node per data dir)",
                    path.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let (old_node, old_boot, unstarted, started) = parse(&text);
        let same_boot = !old_boot.is_empty() && old_boot == boot_id();
        let previous = Previous {
            node: old_node,
            unstarted: if same_boot { unstarted } else { Vec::new() },
            started: same_boot.then_some(started),
        };
        let header = format!("etask-start-journal v1 node={node} boot={}\n", boot_id());
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(header.as_bytes())?;
        let written = header.len() as u64;
        let j = StartJournal {
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                file,
                header,
                open: HashSet::new(),
                written,
            }),
        };
        Ok((j, previous))
    }

    /// Records that the node took an attempt (before it is queued anywhere).
    ///
    /// # Errors
    /// The write failed; the caller must then not run the attempt.
    pub fn taken(&self, execution: i64, attempt: u32) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.open.insert((execution, attempt));
        g.append(&format!("T {execution} {attempt}\n"))
    }

    /// Records that an attempt's process is about to be created: call before the fork, and do
    /// not fork when this fails (else a crash could make it look unstarted and run it twice).
    ///
    /// # Errors
    /// The write failed.
    pub fn started(&self, execution: i64, attempt: u32) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.append(&format!("S {execution} {attempt}\n"))?;
        g.open.remove(&(execution, attempt));
        if g.written > COMPACT_AT {
            g.compact(&self.path)?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Inner {
    fn append(&mut self, line: &str) -> io::Result<()> {
        // One write per line with O_APPEND semantics via the file offset we own under the lock.
        self.file.write_all(line.as_bytes())?;
        self.written += line.len() as u64;
        Ok(())
    }

    /// Rewrites the file in place with only the open entries (under the lock, so no line is
    /// lost; a crash mid-rewrite leaves at worst fewer `T` lines, i.e. fewer re-dispatches).
    fn compact(&mut self, _path: &Path) -> io::Result<()> {
        let mut text = self.header.clone();
        for (e, a) in &self.open {
            text.push_str(&format!("T {e} {a}\n"));
        }
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())?;
        self.written = text.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_but_not_started_is_reported_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("etask-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("start.journal");
        let _ = std::fs::remove_file(&p);
        let (j, prev) = StartJournal::open(&p, "node-a").unwrap();
        assert_eq!(prev, Previous::default());
        j.taken(1, 1).unwrap();
        j.taken(2, 1).unwrap();
        j.taken(3, 2).unwrap();
        j.started(1, 1).unwrap();
        j.started(3, 2).unwrap();
        assert!(
            StartJournal::open(&p, "node-x").is_err(),
            "one node per journal"
        );
        drop(j);
        let (_j, prev) = StartJournal::open(&p, "node-b").unwrap();
        assert_eq!(prev.node, "node-a");
        assert_eq!(prev.unstarted, vec![(2, 1)]);
        let started = prev.started.expect("same boot");
        assert!(
            started.contains(&(1, 1)) && started.contains(&(3, 2)) && !started.contains(&(2, 1))
        );
        // A torn last line counts as nothing.
        let (k, _) = (
            parse("etask-start-journal v1 node=n boot=b\nT 5 1\nT 6 1\nS 6"),
            (),
        );
        assert_eq!(k.2, vec![(5, 1), (6, 1)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn after_a_reboot_nothing_is_claimed_unstarted() {
        let text = "etask-start-journal v1 node=n boot=other-boot\nT 1 1\n";
        let dir = std::env::temp_dir().join(format!("etask-journal-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("start.journal");
        std::fs::write(&p, text).unwrap();
        let (_j, prev) = StartJournal::open(&p, "m").unwrap();
        assert_eq!(prev.node, "n");
        assert!(prev.unstarted.is_empty());
        assert!(
            prev.started.is_none(),
            "after a reboot nothing is known started or not"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
