//! The fd-3 result contract: bytes the child writes to fd 3 are collected (up to a cap, the rest
//! is drained and counted) and parsed at the end as a stream of JSON objects merged key by key,
//! last write wins. Pure: no I/O, so the reactor feeds it and tests drive it directly.

use serde_json::{Map, Value};

/// What the child wrote to fd 3, once it is done.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedResult {
    /// The merged object, or `None` when the child wrote no complete object.
    pub result: Option<Map<String, Value>>,
    /// Why (part of) the result could not be used; objects read before the problem are kept.
    pub error: Option<String>,
    /// The child wrote more than the cap; the excess was read and discarded.
    pub truncated: bool,
}

/// Accumulates fd-3 bytes up to `cap`.
#[derive(Debug)]
pub struct ResultSink {
    cap: usize,
    buf: Vec<u8>,
    dropped: u64,
}

impl ResultSink {
    pub fn new(cap: usize) -> Self {
        ResultSink {
            cap,
            buf: Vec::new(),
            dropped: 0,
        }
    }

    /// Takes what was read from the pipe; bytes past the cap are counted, not kept, so the child
    /// is never blocked on a full pipe.
    pub fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.buf.len());
        let keep = room.min(bytes.len());
        self.buf.extend_from_slice(&bytes[..keep]);
        self.dropped += (bytes.len() - keep) as u64;
    }

    pub fn finish(self) -> ParsedResult {
        let truncated = self.dropped > 0;
        let (result, parse_error) = parse_objects(&self.buf);
        let error = if truncated {
            Some(format!(
                "result exceeded the limit of {} bytes ({} more bytes discarded); objects before the limit were kept",
                self.cap, self.dropped
            ))
        } else {
            parse_error
        };
        ParsedResult {
            result,
            error,
            truncated,
        }
    }
}

/// Parses a sequence of JSON objects separated by optional whitespace and merges them.
/// Returns the merged object (if any complete object was read) and the first error, if any.
pub fn parse_objects(bytes: &[u8]) -> (Option<Map<String, Value>>, Option<String>) {
    let mut merged: Option<Map<String, Value>> = None;
    let mut stream = serde_json::Deserializer::from_slice(bytes).into_iter::<Value>();
    loop {
        // Point at the offending value itself, not at the whitespace before it.
        let mut offset = stream.byte_offset();
        while bytes.get(offset).is_some_and(u8::is_ascii_whitespace) {
            offset += 1;
        }
        match stream.next() {
            None => return (merged, None),
            Some(Ok(Value::Object(obj))) => {
                let m = merged.get_or_insert_with(Map::new);
                for (k, v) in obj {
                    m.insert(k, v);
                }
            }
            Some(Ok(other)) => {
                let kind = match other {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Array(_) => "an array",
                    Value::Object(_) => unreachable!("objects are matched above"),
                };
                return (
                    merged,
                    Some(format!(
                        "result at byte {offset} is {kind}; fd 3 takes JSON objects only"
                    )),
                );
            }
            Some(Err(e)) => {
                return (
                    merged,
                    Some(format!("invalid JSON on fd 3 at byte {offset}: {e}")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(chunks: &[&[u8]], cap: usize) -> ParsedResult {
        let mut s = ResultSink::new(cap);
        for c in chunks {
            s.push(c);
        }
        s.finish()
    }

    #[test]
    fn objects_merge_last_write_wins() {
        let r = run(&[b"{\"a\":1,\"b\":1}\n", b"  {\"b\":2}{\"c\":[1]}"], 1024);
        assert_eq!(r.error, None);
        assert_eq!(
            Value::Object(r.result.unwrap()),
            json!({"a":1,"b":2,"c":[1]})
        );
    }

    #[test]
    fn invalid_json_keeps_earlier_objects() {
        let r = run(&[b"{\"ok\":true}\n{not json"], 1024);
        assert_eq!(Value::Object(r.result.unwrap()), json!({"ok":true}));
        let err = r.error.unwrap();
        assert!(err.contains("invalid JSON on fd 3 at byte 12"), "{err}");
    }

    #[test]
    fn non_object_is_an_error() {
        let r = run(&[b"[1,2]"], 1024);
        assert_eq!(r.result, None);
        assert!(r.error.unwrap().contains("an array"));
    }

    #[test]
    fn over_cap_is_truncated_and_flagged() {
        let r = run(
            &[b"{\"a\":1}", b"{\"big\":\"xxxxxxxxxxxxxxxxxxxxxxxx\"}"],
            10,
        );
        assert!(r.truncated);
        assert_eq!(Value::Object(r.result.unwrap()), json!({"a":1}));
        assert!(r.error.unwrap().contains("exceeded the limit of 10 bytes"));
    }

    #[test]
    fn empty_is_no_result_no_error() {
        let r = run(&[b"  \n"], 10);
        assert_eq!(
            r,
            ParsedResult {
                result: None,
                error: None,
                truncated: false
            }
        );
    }
}
