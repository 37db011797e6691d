//! Log capture for one run: splits stdout/stderr into lines, caps line length and total volume,
//! masks secret values, and batches lines into numbered chunks (by size or age). Pure: the
//! reactor feeds bytes and asks for due chunks; nothing here touches a file descriptor.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A batch of log text from one stream. `seq` increases by one per chunk across both streams of
/// a run, so a reader can resume with `after_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub seq: u64,
    pub stream: Stream,
    pub data: String,
}

#[derive(Debug, Clone)]
pub struct LogLimits {
    pub line_max_bytes: usize,
    pub run_max_bytes: u64,
    pub batch_bytes: usize,
    pub batch_interval: Duration,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            line_max_bytes: 1 << 20,
            run_max_bytes: 64 << 20,
            batch_bytes: 64 << 10,
            batch_interval: Duration::from_millis(200),
        }
    }
}

pub const MASK: &[u8] = b"******";

#[derive(Debug, Default)]
struct StreamBuf {
    /// Bytes of the current, not yet terminated line.
    partial: Vec<u8>,
    /// The current line went over the cap: drop bytes until its newline.
    skipping_line: bool,
    /// Complete (masked, capped) lines waiting to be sent.
    ready: Vec<u8>,
    /// When the oldest unsent byte arrived.
    since: Option<Instant>,
}

/// Captures both streams of one run.
#[derive(Debug)]
pub struct LogCapture {
    limits: LogLimits,
    secrets: Vec<Vec<u8>>,
    streams: [StreamBuf; 2],
    next_seq: u64,
    /// Bytes the child wrote on stdout+stderr, including discarded ones.
    pub total_bytes: u64,
    /// Bytes accepted into chunks (after truncation), counted against `run_max_bytes`.
    kept_bytes: u64,
    /// The run hit the volume cap or a line cap.
    pub truncated: bool,
    volume_cap_hit: bool,
}

fn idx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl LogCapture {
    pub fn new(limits: LogLimits, secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(String::into_bytes)
            .collect();
        // Longest first, so a secret that contains another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        LogCapture {
            limits,
            secrets,
            streams: Default::default(),
            next_seq: 1,
            total_bytes: 0,
            kept_bytes: 0,
            truncated: false,
            volume_cap_hit: false,
        }
    }

    /// Feeds bytes read from one stream.
    pub fn push(&mut self, stream: Stream, mut bytes: &[u8], now: Instant) {
        self.total_bytes += bytes.len() as u64;
        while !bytes.is_empty() {
            let (line, rest, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..=i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            let max = self.limits.line_max_bytes;
            let buf = &mut self.streams[idx(stream)];
            if buf.skipping_line {
                if complete {
                    buf.skipping_line = false;
                }
                continue;
            }
            buf.partial.extend_from_slice(line);
            // An unterminated line ages too, so a prompt is sent after the batch interval.
            buf.since.get_or_insert(now);
            if complete || buf.partial.len() > max {
                let mut line = std::mem::take(&mut buf.partial);
                // A long line may arrive whole in one read: cap it here too, not only while
                // it is still unterminated.
                let body = if complete { line.len() - 1 } else { line.len() };
                if body > max {
                    line.truncate(max);
                    line.extend_from_slice(
                        format!(" …[etask: line truncated at {max} bytes]\n").as_bytes(),
                    );
                    self.streams[idx(stream)].skipping_line = !complete;
                    self.truncated = true;
                }
                self.accept(stream, line, now);
            }
        }
    }

    /// Masks and appends one finished line to the stream's ready buffer, within the volume cap.
    fn accept(&mut self, stream: Stream, line: Vec<u8>, now: Instant) {
        if self.volume_cap_hit {
            return;
        }
        let line = self.mask(line);
        let cap = self.limits.run_max_bytes;
        let buf = &mut self.streams[idx(stream)];
        if self.kept_bytes + line.len() as u64 > cap {
            self.volume_cap_hit = true;
            self.truncated = true;
            let note =
                format!("[etask: log limit of {cap} bytes reached; further output is discarded]\n");
            buf.ready.extend_from_slice(note.as_bytes());
        } else {
            self.kept_bytes += line.len() as u64;
            buf.ready.extend_from_slice(&line);
        }
        buf.since.get_or_insert(now);
    }

    fn mask(&self, mut line: Vec<u8>) -> Vec<u8> {
        for secret in &self.secrets {
            if line.len() >= secret.len() {
                line = replace_all(&line, secret, MASK);
            }
        }
        line
    }

    /// When the oldest unsent byte must go out (for the reactor's poll timeout).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.streams
            .iter()
            .filter(|b| !b.ready.is_empty() || !b.partial.is_empty())
            .filter_map(|b| b.since)
            .min()
            .map(|t| t + self.limits.batch_interval)
    }

    /// Chunks that are due: full batches, or batches older than the interval. A partial line
    /// older than the interval is sent too, so prompts and progress output are not held back.
    pub fn take_due(&mut self, now: Instant, out: &mut Vec<LogChunk>) {
        for s in [Stream::Stdout, Stream::Stderr] {
            let (full, old) = {
                let b = &self.streams[idx(s)];
                let old = b
                    .since
                    .is_some_and(|t| now >= t + self.limits.batch_interval);
                (b.ready.len() >= self.limits.batch_bytes, old)
            };
            if old {
                self.flush_partial(s, now);
            }
            if full || old {
                self.emit(s, out);
            }
        }
    }

    /// Everything left, at the end of the run (an unterminated last line included).
    pub fn take_all(&mut self, now: Instant, out: &mut Vec<LogChunk>) {
        for s in [Stream::Stdout, Stream::Stderr] {
            self.flush_partial(s, now);
            self.emit(s, out);
        }
    }

    fn flush_partial(&mut self, s: Stream, now: Instant) {
        let b = &mut self.streams[idx(s)];
        if !b.partial.is_empty() {
            let line = std::mem::take(&mut b.partial);
            self.accept(s, line, now);
        }
    }

    fn emit(&mut self, s: Stream, out: &mut Vec<LogChunk>) {
        let b = &mut self.streams[idx(s)];
        b.since = None;
        if b.ready.is_empty() {
            return;
        }
        let data = std::mem::take(&mut b.ready);
        let data = match String::from_utf8(data) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        out.push(LogChunk {
            seq: self.next_seq,
            stream: s,
            data,
        });
        self.next_seq += 1;
    }
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(line: usize, run: u64) -> LogLimits {
        LogLimits {
            line_max_bytes: line,
            run_max_bytes: run,
            ..LogLimits::default()
        }
    }

    fn all(c: &mut LogCapture) -> Vec<LogChunk> {
        let mut v = Vec::new();
        c.take_all(Instant::now(), &mut v);
        v
    }

    #[test]
    fn streams_are_kept_apart_and_numbered() {
        let mut c = LogCapture::new(LogLimits::default(), []);
        let now = Instant::now();
        c.push(Stream::Stdout, b"out1\nou", now);
        c.push(Stream::Stderr, b"err1\n", now);
        c.push(Stream::Stdout, b"t2\n", now);
        let v = all(&mut c);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].seq, v[0].stream, v[0].data.as_str()),
            (1, Stream::Stdout, "out1\nout2\n")
        );
        assert_eq!(
            (v[1].seq, v[1].stream, v[1].data.as_str()),
            (2, Stream::Stderr, "err1\n")
        );
    }

    #[test]
    fn secrets_are_masked() {
        let mut c = LogCapture::new(LogLimits::default(), ["hunter2".to_string(), String::new()]);
        c.push(
            Stream::Stdout,
            b"password=hunter2 again hunter2\n",
            Instant::now(),
        );
        assert_eq!(all(&mut c)[0].data, "password=****** again ******\n");
    }

    #[test]
    fn long_line_is_truncated_with_marker_and_rest_dropped() {
        let mut c = LogCapture::new(limits(8, 1 << 20), []);
        let now = Instant::now();
        c.push(Stream::Stdout, b"0123456789abcdef", now);
        c.push(Stream::Stdout, b"ghij\nnext\n", now);
        let v = all(&mut c);
        assert_eq!(
            v[0].data,
            "01234567 …[etask: line truncated at 8 bytes]\nnext\n"
        );
        assert!(c.truncated);
    }

    #[test]
    fn volume_cap_stops_with_one_marker() {
        let mut c = LogCapture::new(limits(1024, 10), []);
        let now = Instant::now();
        for _ in 0..100 {
            c.push(Stream::Stdout, b"abcd\n", now);
        }
        let v = all(&mut c);
        assert_eq!(
            v[0].data,
            "abcd\nabcd\n[etask: log limit of 10 bytes reached; further output is discarded]\n"
        );
        assert_eq!(c.total_bytes, 500);
        assert!(c.truncated);
    }

    #[test]
    fn batches_are_due_by_size_or_age() {
        let lim = LogLimits {
            batch_bytes: 8,
            batch_interval: Duration::from_millis(200),
            ..LogLimits::default()
        };
        let mut c = LogCapture::new(lim, []);
        let t0 = Instant::now();
        let mut v = Vec::new();
        c.push(Stream::Stdout, b"abc\n", t0);
        c.take_due(t0, &mut v);
        assert!(v.is_empty(), "small and young batch must wait");
        assert_eq!(c.next_deadline(), Some(t0 + Duration::from_millis(200)));
        c.push(Stream::Stdout, b"defgh\n", t0);
        c.take_due(t0, &mut v);
        assert_eq!(v.len(), 1, "full batch goes at once");
        c.push(Stream::Stderr, b"prompt> ", t0);
        c.take_due(t0 + Duration::from_millis(250), &mut v);
        assert_eq!(v[1].data, "prompt> ", "old partial line is sent");
    }

    #[test]
    fn a_long_line_that_arrives_whole_is_capped() {
        let limits = LogLimits {
            line_max_bytes: 4,
            ..LogLimits::default()
        };
        let mut c = LogCapture::new(limits, Vec::<String>::new());
        let t = Instant::now();
        c.push(Stream::Stdout, b"abcdefgh\nok\n", t);
        let mut out = Vec::new();
        c.take_all(t, &mut out);
        assert_eq!(
            out[0].data,
            "abcd …[etask: line truncated at 4 bytes]\nok\n"
        );
        assert!(c.truncated);
    }
}
