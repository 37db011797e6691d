//! The canonical encoding of what a signature covers: a versioned, length-prefixed byte string
//! built field by field in a fixed order, so the scheduler and a node derive the same bytes
//! whatever wire carried the dispatch (gRPC, a Kafka envelope, the in-process channel).
//!
//! Encoding version 1 (`docs/security.md`, "Canonical encoding"):
//! - a domain tag, `etask-dispatch-v1` or `etask-cancel-v1`, as a string;
//! - integers big-endian (`i64`/`u64` 8 bytes, `u32` 4 bytes);
//! - a string is its byte length (`u32`) then its UTF-8 bytes;
//! - an optional value is `0x00` (none) or `0x01` then the value;
//! - a list is its length (`u32`) then its items; a map is a list of (key, value) pairs in
//!   byte order of the keys (`BTreeMap` order);
//! - a bool is one byte, 0 or 1.
//!
//! Wire formats normalise a few values (gRPC has no "none" for an empty list or a zero
//! timeout); this encoding applies the same normalisation, so a round trip through any wire
//! signs and verifies the same bytes: `shell` is "bash" or "", `argv` none = empty, a timeout
//! of 0 ms = none, `shard_total` at least 1, a missing or empty pool is `default`, an empty
//! node is none.

use std::collections::BTreeMap;

use crate::runner::{ArgvStyle, Program, ProgramKind, ShellKind};

/// Everything of a dispatch that decides what runs and where, borrowed from the caller's type.
#[derive(Debug, Clone, Copy)]
pub struct DispatchFields<'a> {
    pub execution_id: i64,
    pub attempt: u32,
    pub task_id: i64,
    /// The target pool; None = `default`.
    pub pool: Option<&'a str>,
    /// The node the dispatch is for; None = any node of the pool.
    pub node: Option<&'a str>,
    pub program: &'a Program,
    /// None or 0 = no timeout.
    pub timeout_ms: Option<u64>,
    pub shard_index: u32,
    pub shard_total: u32,
    /// Unix ms.
    pub issued_at: i64,
    /// Unix ms; a node refuses the dispatch after it.
    pub expires_at: i64,
}

/// What a cancel command covers.
#[derive(Debug, Clone, Copy)]
pub struct CancelFields<'a> {
    pub execution_id: i64,
    pub attempt: u32,
    /// The node it is for; None = any node (the Kafka control topic is read by every agent).
    pub node: Option<&'a str>,
    pub issued_at: i64,
    pub expires_at: i64,
}

pub const DISPATCH_TAG: &str = "etask-dispatch-v1";
pub const CANCEL_TAG: &str = "etask-cancel-v1";

/// The bytes a dispatch signature covers.
pub fn dispatch_bytes(d: &DispatchFields<'_>) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256));
    w.str(DISPATCH_TAG);
    w.i64(d.execution_id);
    w.u32(d.attempt);
    w.i64(d.task_id);
    w.str(pool_name(d.pool));
    w.opt_str(d.node.filter(|n| !n.is_empty()));
    program(&mut w, d.program);
    w.opt(d.timeout_ms.filter(|t| *t > 0), |w, t| w.u64(t));
    w.u32(d.shard_index);
    w.u32(d.shard_total.max(1));
    w.i64(d.issued_at);
    w.i64(d.expires_at);
    w.0
}

/// The bytes a cancel signature covers.
pub fn cancel_bytes(c: &CancelFields<'_>) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.str(CANCEL_TAG);
    w.i64(c.execution_id);
    w.u32(c.attempt);
    w.opt_str(c.node.filter(|n| !n.is_empty()));
    w.i64(c.issued_at);
    w.i64(c.expires_at);
    w.0
}

/// The pool a dispatch names: none or empty = `default`.
pub fn pool_name(pool: Option<&str>) -> &str {
    pool.filter(|p| !p.is_empty()).unwrap_or("default")
}

fn program(w: &mut Writer, p: &Program) {
    w.str(match p.kind {
        ProgramKind::Shell => "shell",
        ProgramKind::Python => "python",
        ProgramKind::Exec => "exec",
    });
    w.opt_str(p.code.as_deref());
    w.list(p.argv.as_deref().unwrap_or_default(), |w, a| w.str(a));
    w.str(match p.shell {
        Some(ShellKind::Bash) => "bash",
        _ => "",
    });
    w.list(&p.args, |w, a| w.str(a));
    w.map(&p.env);
    // Sealed values are signed as sealed: the signature binds the ciphertext the node opens.
    w.map(&p.secret_env);
    w.opt_str(p.stdin.as_deref());
    w.opt_str(p.workdir.as_deref());
    // serde_json writes an object's keys in the map's order, the same on both sides.
    let params = p
        .params
        .as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string());
    w.opt_str(params.as_deref());
    w.list(&p.variables, |w, v| {
        w.str(&v.key);
        w.str(&v.value);
        w.bool(v.secret);
    });
    w.str(match p.argv_style {
        ArgvStyle::Files => "files",
        ArgvStyle::Legacy => "legacy",
    });
    // The run's cgroup limits: changed in transit they would lift what bounds a run.
    w.opt(p.limits, |w, l| {
        w.opt(l.memory_bytes, |w, v| w.u64(v));
        w.opt(l.pids, |w, v| w.u64(v));
        w.opt(l.cpu_millicores, |w, v| w.u64(v));
    });
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn len(&mut self, n: usize) {
        // Nothing on a wire ETask reads is near 4 GiB (messages are capped far below it).
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Writer, T)) {
        match v {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                f(self, v);
            }
        }
    }
    fn opt_str(&mut self, s: Option<&str>) {
        self.opt(s, |w, s| w.str(s));
    }
    fn list<T>(&mut self, items: &[T], f: impl Fn(&mut Writer, &T)) {
        self.len(items.len());
        for i in items {
            f(self, i);
        }
    }
    fn map(&mut self, m: &BTreeMap<String, String>) {
        self.len(m.len());
        for (k, v) in m {
            self.str(k);
            self.str(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Variable;

    fn program() -> Program {
        let mut p = Program::shell("echo hi");
        p.args = vec!["a".into()];
        p.env.insert("E".into(), "1".into());
        p.secret_env.insert("S".into(), "x".into());
        p.stdin = Some("in".into());
        p.workdir = Some("w".into());
        p.params = serde_json::from_str(r#"{"h":"x"}"#).unwrap();
        p.variables = vec![Variable {
            key: "V".into(),
            value: "v".into(),
            secret: false,
        }];
        p
    }

    #[test]
    fn strings_are_length_prefixed_so_bytes_cannot_move_between_fields() {
        let p = Program::shell("x");
        let f = |pool: &'static str, node: &'static str| DispatchFields {
            execution_id: 1,
            attempt: 1,
            task_id: 1,
            pool: Some(pool),
            node: Some(node),
            program: &p,
            timeout_ms: None,
            shard_index: 0,
            shard_total: 1,
            issued_at: 0,
            expires_at: 0,
        };
        assert_ne!(dispatch_bytes(&f("ab", "c")), dispatch_bytes(&f("a", "bc")));
    }

    #[test]
    fn wire_normalisations_encode_the_same() {
        let mut a = program();
        let mut b = program();
        a.shell = Some(ShellKind::Sh);
        b.shell = None;
        let f = |p: &Program, t: Option<u64>, total: u32, pool: Option<&'static str>| {
            dispatch_bytes(&DispatchFields {
                execution_id: 1,
                attempt: 1,
                task_id: 1,
                pool,
                node: None,
                program: p,
                timeout_ms: t,
                shard_index: 0,
                shard_total: total,
                issued_at: 0,
                expires_at: 0,
            })
        };
        assert_eq!(f(&a, None, 0, None), f(&b, Some(0), 1, Some("default")));
        a.kind = ProgramKind::Exec;
        a.code = None;
        a.argv = Some(vec![]);
        b.kind = ProgramKind::Exec;
        b.code = None;
        b.argv = None;
        assert_eq!(f(&a, None, 1, None), f(&b, None, 1, None));
    }

    #[test]
    fn cancel_and_dispatch_domains_differ() {
        let c = cancel_bytes(&CancelFields {
            execution_id: 1,
            attempt: 1,
            node: None,
            issued_at: 0,
            expires_at: 0,
        });
        assert!(c.starts_with(&[0, 0, 0, 15]));
        assert_eq!(&c[4..19], CANCEL_TAG.as_bytes());
    }
}
