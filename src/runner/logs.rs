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

pub use super::mask::MASK;

#[derive(Debug, Default)]
struct StreamBuf {
    /// Bytes held back because they may be the start of a secret whose rest has not arrived
    /// yet (never more than the longest secret minus one byte).
    held: super::mask::MaskState,
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
    secrets: super::mask::Masker,
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
        let mut all: Vec<Vec<u8>> = Vec::new();
        for s in secrets.into_iter().filter(|s| !s.is_empty()) {
            // Each line of a multi-line value (a PEM key, say) is masked on its own too: a
            // script that prints one line of it must not show that line.
            if s.contains('\n') {
                all.extend(
                    s.split('\n')
                        .map(|l| l.trim_end_matches('\r'))
                        .filter(|l| !l.is_empty())
                        .map(|l| l.as_bytes().to_vec()),
                );
            }
            all.push(s.into_bytes());
        }
        let secrets = super::mask::Masker::new(all.iter().map(Vec::as_slice));
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
    ///
    /// Secrets are masked here, on the raw byte stream and before it is cut into lines or
    /// chunks: a value written in pieces, across lines or across a batch boundary is still
    /// seen whole, because bytes that could begin a secret are held back until the next bytes
    /// show whether they do (or the run ends).
    pub fn push(&mut self, stream: Stream, bytes: &[u8], now: Instant) {
        self.total_bytes += bytes.len() as u64;
        if self.secrets.is_empty() {
            return self.split_lines(stream, bytes, now);
        }
        let mut held = std::mem::take(&mut self.streams[idx(stream)].held);
        let masked = self.secrets.feed(&mut held, bytes, false);
        self.streams[idx(stream)].held = held;
        self.split_lines(stream, &masked, now);
    }

    /// Masks every secret in the strings (keys and values, at any depth) of a script's fd-3
    /// result, so a secret the script writes there never leaves the node in clear either.
    pub fn mask_result(&self, result: &mut serde_json::Map<String, serde_json::Value>) {
        if self.secrets.is_empty() {
            return;
        }
        let old = std::mem::take(result);
        for (k, mut v) in old {
            self.mask_value(&mut v);
            result.insert(self.mask_text(&k), v);
        }
    }

    fn mask_value(&self, v: &mut serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::String(s) => *s = self.mask_text(s),
            // A secret that is a number (a PIN) written as a JSON number.
            Value::Number(n) if self.mask_text(&n.to_string()) != n.to_string() => {
                *v = Value::String(self.mask_text(&n.to_string()));
            }
            Value::Array(a) => a.iter_mut().for_each(|v| self.mask_value(v)),
            Value::Object(m) => self.mask_result(m),
            _ => {}
        }
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn mask_text(&self, text: &str) -> String {
        if self.secrets.is_empty() {
            return text.to_owned();
        }
        let masked = self.secrets.mask_all(text.as_bytes());
        // Whole secrets are replaced by ASCII, so valid UTF-8 stays valid.
        String::from_utf8(masked)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Releases what a stream held back for masking: at the end of the run nothing more can
    /// complete a secret.
    fn release_held(&mut self, stream: Stream, now: Instant) {
        let mut held = std::mem::take(&mut self.streams[idx(stream)].held);
        let masked = self.secrets.feed(&mut held, b"", true);
        if !masked.is_empty() {
            self.split_lines(stream, &masked, now);
        }
    }

    /// Cuts masked bytes into lines, capping each line.
    fn split_lines(&mut self, stream: Stream, mut bytes: &[u8], now: Instant) {
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
                    line.truncate(char_boundary(&line, max));
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
            self.release_held(s, now);
            self.flush_partial(s, now);
            self.emit_inner(s, out, true);
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
        self.emit_inner(s, out, false)
    }

    /// Sends the stream's ready bytes as one chunk. Unless `last`, an incomplete UTF-8
    /// sequence at the end stays for the next chunk, so a character is never split by where
    /// a batch happens to end (it would be decoded as two U+FFFD). Bytes that are not UTF-8
    /// at all become U+FFFD wherever they fall.
    fn emit_inner(&mut self, s: Stream, out: &mut Vec<LogChunk>, last: bool) {
        let b = &mut self.streams[idx(s)];
        b.since = None;
        if b.ready.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut b.ready);
        if !last {
            let tail = incomplete_utf8_tail(&data);
            b.ready = data.split_off(data.len() - tail);
            if data.is_empty() {
                return;
            }
        }
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

/// How many bytes at the end of `b` begin a UTF-8 character that is not complete yet (0–3).
fn incomplete_utf8_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let need = match c {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0, // ASCII or not a lead byte: nothing to wait for
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// The largest index ≤ `max` that does not fall inside a UTF-8 character of `b`.
fn char_boundary(b: &[u8], mut max: usize) -> usize {
    let floor = max.saturating_sub(3);
    while max > floor && max < b.len() && b[max] & 0xC0 == 0x80 {
        max -= 1;
    }
    max
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

    /// Feeds `pieces` one at a time, taking due chunks after each as if the batch interval
    /// had passed (the worst case for cuts), and returns everything sent.
    fn fed_in_pieces(secrets: &[&str], pieces: &[(Stream, &[u8])]) -> Vec<LogChunk> {
        let mut c = LogCapture::new(LogLimits::default(), secrets.iter().map(|s| s.to_string()));
        let mut t = Instant::now();
        let mut v = Vec::new();
        for (s, p) in pieces {
            c.push(*s, p, t);
            t += Duration::from_secs(1);
            c.take_due(t, &mut v);
        }
        c.take_all(t, &mut v);
        v
    }

    fn text(v: &[LogChunk], s: Stream) -> String {
        v.iter()
            .filter(|c| c.stream == s)
            .map(|c| c.data.as_str())
            .collect()
    }

    #[test]
    fn a_secret_written_in_pieces_across_flushes_is_masked() {
        let out = Stream::Stdout;
        let v = fed_in_pieces(
            &["hunter2"],
            &[(out, b"pw=hun"), (out, b"te"), (out, b"r2 ok\n")],
        );
        assert_eq!(text(&v, out), "pw=****** ok\n");
        assert!(
            v.iter().all(|c| !c.data.contains("hun")),
            "no piece leaks: {v:?}"
        );
    }

    #[test]
    fn a_multi_line_secret_is_masked_whole_and_line_by_line() {
        let out = Stream::Stdout;
        let secret = "one1secret\ntwo2secret";
        let v = fed_in_pieces(
            &[secret],
            &[
                (out, b"a one1secret\ntwo2secret b\n"),
                (out, b"two2secret\n"),
            ],
        );
        let all = text(&v, out);
        assert!(
            !all.contains("one1secret") && !all.contains("two2secret"),
            "{all:?}"
        );
        assert_eq!(all, "a ****** b\n******\n");
    }

    #[test]
    fn short_and_regex_like_secrets_are_masked_on_both_streams() {
        let v = fed_in_pieces(
            &["a.*", "$x"],
            &[
                (Stream::Stderr, b"1 a.* 2 $"),
                (Stream::Stdout, b"abc\n"),
                (Stream::Stderr, b"x 3\n"),
            ],
        );
        assert_eq!(text(&v, Stream::Stderr), "1 ****** 2 ****** 3\n");
        assert_eq!(text(&v, Stream::Stdout), "abc\n");
    }

    #[test]
    fn a_held_prefix_that_is_not_a_secret_is_released_intact() {
        let out = Stream::Stdout;
        let v = fed_in_pieces(
            &["hunter2"],
            &[(out, b"hunt"), (out, b"ing\n"), (out, b"hun")],
        );
        assert_eq!(text(&v, out), "hunting\nhun");
    }

    #[test]
    fn multibyte_characters_survive_any_cut() {
        // "progress 中 done": the character's three bytes arrive in two reads with a flush
        // between them; and every other cut position of a mixed string.
        let out = Stream::Stdout;
        let v = fed_in_pieces(&[], &[(out, b"progress \xe4\xb8"), (out, b"\xad done\n")]);
        assert_eq!(text(&v, out), "progress 中 done\n");
        let s = "añ中😀b\n".as_bytes();
        for cut in 0..=s.len() {
            let v = fed_in_pieces(&["zz"], &[(out, &s[..cut]), (out, &s[cut..])]);
            assert_eq!(text(&v, out), "añ中😀b\n", "cut at {cut}");
        }
        // Invalid bytes become U+FFFD, the same wherever the cut falls.
        let v = fed_in_pieces(&[], &[(out, b"x\xff"), (out, b"y\n")]);
        assert_eq!(text(&v, out), "x\u{fffd}y\n");
    }

    #[test]
    fn line_truncation_does_not_split_a_character() {
        let mut c = LogCapture::new(limits(4, 1 << 20), []);
        c.push(Stream::Stdout, "ab中cd\n".as_bytes(), Instant::now());
        assert_eq!(
            all(&mut c)[0].data,
            "ab …[etask: line truncated at 4 bytes]\n"
        );
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
