//! The agent's spool: an append-only file of the attempts it took, so a dispatch delivered
//! twice (a rebalance, a restart before the offset was committed) never runs twice. An
//! attempt is written — and synced to disk — before its offset is committed. Entries are kept
//! for `keep` (longer than a dispatch can live: an older dispatch is expired and never run);
//! the file is rewritten without the older ones when opened and every 10,000 records.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::model::{Attempt, ExecutionId};

/// Records between two compactions of the file.
const COMPACT_EVERY: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Started,
    Finished,
}

pub struct Spool {
    path: PathBuf,
    file: File,
    seen: HashMap<(ExecutionId, Attempt), (Taken, i64)>,
    keep_ms: i64,
    since_compaction: u32,
}

impl Spool {
    pub fn open(dir: &Path, keep: std::time::Duration) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("taken.log");
        let mut seen = HashMap::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                // A torn last line (crash mid-write) is skipped.
                if let Some((key, taken, at)) = parse(&line?) {
                    let e = seen.entry(key).or_insert((taken, at));
                    if taken == Taken::Finished {
                        *e = (taken, at);
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut s = Spool {
            path,
            file,
            seen,
            keep_ms: keep.as_millis() as i64,
            since_compaction: 0,
        };
        s.compact()?;
        Ok(s)
    }

    /// Rewrites the file without the entries older than `keep`, then appends from there.
    fn compact(&mut self) -> std::io::Result<()> {
        let cutoff = crate::now_ms() - self.keep_ms;
        self.seen.retain(|_, (_, at)| *at >= cutoff);
        let tmp = self.path.with_extension("log.new");
        {
            let mut f = std::io::BufWriter::new(File::create(&tmp)?);
            for (k, (t, at)) in &self.seen {
                f.write_all(line(*k, *t, *at).as_bytes())?;
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.since_compaction = 0;
        Ok(())
    }

    /// What this agent already did with an attempt.
    pub fn get(&self, id: ExecutionId, attempt: Attempt) -> Option<Taken> {
        self.seen.get(&(id, attempt)).map(|(t, _)| *t)
    }

    /// Records an attempt as taken, durably (fdatasync) when `Started`. The error names the
    /// spool file.
    pub fn record(
        &mut self,
        id: ExecutionId,
        attempt: Attempt,
        taken: Taken,
    ) -> Result<(), super::NodeError> {
        self.record_inner(id, attempt, taken)
            .map_err(super::NodeError)
    }

    fn record_inner(
        &mut self,
        id: ExecutionId,
        attempt: Attempt,
        taken: Taken,
    ) -> Result<(), String> {
        self.append(id, attempt, taken)
            .map_err(|e| format!("spool {}: {e}", self.path.display()))
    }

    fn append(&mut self, id: ExecutionId, attempt: Attempt, taken: Taken) -> std::io::Result<()> {
        let at = crate::now_ms();
        self.file
            .write_all(line((id, attempt), taken, at).as_bytes())?;
        if taken == Taken::Started {
            self.file.sync_data()?;
        }
        self.seen.insert((id, attempt), (taken, at));
        self.since_compaction += 1;
        if self.since_compaction >= COMPACT_EVERY {
            self.compact()?;
        }
        Ok(())
    }
}

fn line((id, attempt): (ExecutionId, Attempt), t: Taken, at: i64) -> String {
    let t = match t {
        Taken::Started => 'S',
        Taken::Finished => 'F',
    };
    format!("{t} {} {} {at}\n", id.0, attempt.0)
}

fn parse(l: &str) -> Option<((ExecutionId, Attempt), Taken, i64)> {
    let mut it = l.split(' ');
    let t = match it.next()? {
        "S" => Taken::Started,
        "F" => Taken::Finished,
        _ => return None,
    };
    let id = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    let at = it.next()?.parse().ok()?;
    Some(((ExecutionId(id), Attempt(attempt)), t, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("etask-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut s = Spool::open(&dir, std::time::Duration::from_secs(3600)).unwrap();
            s.record(ExecutionId(1), Attempt(1), Taken::Started)
                .unwrap();
            s.record(ExecutionId(1), Attempt(1), Taken::Finished)
                .unwrap();
            s.record(ExecutionId(2), Attempt(3), Taken::Started)
                .unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("taken.log"))
            .unwrap()
            .write_all(b"S 9 1")
            .unwrap();
        let s = Spool::open(&dir, std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!(s.get(ExecutionId(1), Attempt(1)), Some(Taken::Finished));
        assert_eq!(s.get(ExecutionId(2), Attempt(3)), Some(Taken::Started));
        assert_eq!(s.get(ExecutionId(2), Attempt(4)), None);
        assert_eq!(s.get(ExecutionId(9), Attempt(1)), None);
        drop(s);
        // Entries older than `keep` are dropped.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let s = Spool::open(&dir, std::time::Duration::from_millis(5)).unwrap();
        assert_eq!(s.get(ExecutionId(2), Attempt(3)), None);
        let text = std::fs::read_to_string(dir.join("taken.log")).unwrap();
        assert!(text.is_empty(), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
