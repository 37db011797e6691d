//! Streaming masking of secret values: every occurrence of any secret in a byte stream becomes
//! `******`, in one pass, whatever the number and length of the secrets, and however the
//! stream is cut into reads. Owns nothing but the automaton and the per-stream state; the log
//! capture and the fd-3 result use it.
//!
//! Why not the `aho-corasick` crate (which the automaton below is): streaming needs, after each
//! read, the length of the longest tail of the stream that is still the beginning of some
//! secret — the depth of the automaton's current state — so exactly those bytes are held back
//! and nothing else is. The crate does not expose its states' depths; a plain per-secret scan
//! (the first version) cost reads × secrets × secret length, and one task with 5,000 secrets, or
//! one 100 KB secret, stalled the node's I/O thread for minutes.

use std::collections::BTreeMap;

/// What a secret becomes.
pub const MASK: &[u8] = b"******";

#[derive(Debug, Default)]
struct Node {
    next: BTreeMap<u8, u32>,
    fail: u32,
    /// Length of the string this state stands for.
    depth: u32,
    /// Length of the longest secret that ends here (through the failure chain), 0 = none.
    out: u32,
}

/// An Aho–Corasick automaton over the secrets.
#[derive(Debug)]
pub struct Masker {
    nodes: Vec<Node>,
}

/// The state of one stream: where the automaton is, and the bytes not released yet.
#[derive(Debug, Default)]
pub struct MaskState {
    state: u32,
    held: Vec<u8>,
    /// For each held byte: is it part of a secret?
    masked: Vec<bool>,
    /// The last released byte was masked (a secret running over a release boundary is one
    /// `******`, not two).
    prev_masked: bool,
}

impl Masker {
    /// Builds the automaton; empty secrets are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a [u8]>) -> Masker {
        let mut nodes = vec![Node::default()];
        for s in secrets.into_iter().filter(|s| !s.is_empty()) {
            let mut at = 0usize;
            for &b in s {
                at = match nodes[at].next.get(&b) {
                    Some(&n) => n as usize,
                    None => {
                        let depth = nodes[at].depth + 1;
                        nodes.push(Node {
                            depth,
                            ..Node::default()
                        });
                        let id = (nodes.len() - 1) as u32;
                        nodes[at].next.insert(b, id);
                        id as usize
                    }
                };
            }
            nodes[at].out = nodes[at].out.max(s.len() as u32);
        }
        // Failure links, breadth first: a state's fail is the longest proper suffix of its
        // string that is also in the trie.
        let mut queue = std::collections::VecDeque::new();
        let firsts: Vec<u32> = nodes[0].next.values().copied().collect();
        for n in firsts {
            nodes[n as usize].fail = 0;
            queue.push_back(n);
        }
        while let Some(s) = queue.pop_front() {
            let edges: Vec<(u8, u32)> = nodes[s as usize]
                .next
                .iter()
                .map(|(b, n)| (*b, *n))
                .collect();
            for (b, child) in edges {
                let mut f = nodes[s as usize].fail;
                let fail = loop {
                    if let Some(&n) = nodes[f as usize].next.get(&b) {
                        break n;
                    }
                    if f == 0 {
                        break 0;
                    }
                    f = nodes[f as usize].fail;
                };
                nodes[child as usize].fail = fail;
                let inherited = nodes[fail as usize].out;
                let c = &mut nodes[child as usize];
                c.out = c.out.max(inherited);
                queue.push_back(child);
            }
        }
        Masker { nodes }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    fn step(&self, mut s: u32, b: u8) -> u32 {
        loop {
            if let Some(&n) = self.nodes[s as usize].next.get(&b) {
                return n;
            }
            if s == 0 {
                return 0;
            }
            s = self.nodes[s as usize].fail;
        }
    }

    /// Feeds `bytes` of one stream and returns what can be released, masked. Unless `last`,
    /// bytes that may still become part of a secret stay in `st` (at most the longest secret
    /// minus one).
    pub fn feed(&self, st: &mut MaskState, bytes: &[u8], last: bool) -> Vec<u8> {
        for &b in bytes {
            st.state = self.step(st.state, b);
            st.held.push(b);
            st.masked.push(false);
            let out = self.nodes[st.state as usize].out as usize;
            if out > 0 {
                let n = st.masked.len();
                for m in &mut st.masked[n - out..] {
                    *m = true;
                }
            }
        }
        let keep = if last {
            0
        } else {
            (self.nodes[st.state as usize].depth as usize).min(st.held.len())
        };
        let release = st.held.len() - keep;
        let mut out = Vec::with_capacity(release);
        for i in 0..release {
            if st.masked[i] {
                if !st.prev_masked {
                    out.extend_from_slice(MASK);
                }
                st.prev_masked = true;
            } else {
                out.push(st.held[i]);
                st.prev_masked = false;
            }
        }
        st.held.drain(..release);
        st.masked.drain(..release);
        if last {
            *st = MaskState::default();
        }
        out
    }

    /// `text` with every secret replaced (a whole text, nothing held back).
    pub fn mask_all(&self, text: &[u8]) -> Vec<u8> {
        self.feed(&mut MaskState::default(), text, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(secrets: &[&str]) -> Masker {
        Masker::new(secrets.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn overlapping_and_nested_secrets_become_one_mask() {
        let k = m(&["abc", "bcd", "b"]);
        assert_eq!(k.mask_all(b"xabcdx b y"), b"x******x ****** y");
        assert_eq!(m(&["aa"]).mask_all(b"aaaa"), b"******");
    }

    #[test]
    fn a_secret_across_feeds_is_held_then_masked_and_a_false_start_released() {
        let k = m(&["hunter2"]);
        let mut st = MaskState::default();
        assert_eq!(k.feed(&mut st, b"pw=hun", false), b"pw=");
        assert_eq!(k.feed(&mut st, b"ter2!", false), b"******!");
        assert_eq!(k.feed(&mut st, b"hunt", false), b"");
        assert_eq!(k.feed(&mut st, b"ing", false), b"hunting");
        assert_eq!(k.feed(&mut st, b"hun", true), b"hun");
    }

    #[test]
    fn many_and_long_secrets_cost_one_pass() {
        // 5,000 secrets over 2 MB, and one 100 KB secret over 3 MB of its own prefix (each took
        // minutes with a per-secret scan; `cargo bench --bench pool` is where speed is shown).
        let secrets: Vec<String> = (0..5000).map(|i| format!("s3cr3t-{i:05}-x")).collect();
        let k = Masker::new(secrets.iter().map(|s| s.as_bytes()));
        let text: Vec<u8> = (0..2_000_000u32)
            .map(|i| b"abcdefghij"[(i % 10) as usize])
            .collect();
        let mut st = MaskState::default();
        let mut n = 0;
        for c in text.chunks(4096) {
            n += k.feed(&mut st, c, false).len();
        }
        n += k.feed(&mut st, b"", true).len();
        assert_eq!(n, text.len());
        let long = format!("{}b", "a".repeat(100_000));
        let k = m(&[&long]);
        let text = vec![b'a'; 3_000_000];
        let mut st = MaskState::default();
        let mut n = 0;
        for c in text.chunks(65536) {
            n += k.feed(&mut st, c, false).len();
        }
        n += k.feed(&mut st, b"", true).len();
        assert_eq!(n, text.len());
    }
}
