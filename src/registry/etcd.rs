//! A small blocking client for the etcd v3 JSON gateway (`/v3/...`) over ureq: leases, put,
//! range and watch — the only calls the registry needs, so no etcd client crate. The gateway
//! encodes keys and values in base64 and int64 fields as JSON strings.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd unreachable at {0}: {1}")]
    Unreachable(String, String),
    #[error("etcd answered {0}: {1}")]
    Refused(u16, String),
    #[error("unexpected etcd response: {0}")]
    Bad(String),
    /// A watch saw nothing for the read timeout (normal; re-watch).
    #[error("watch idle")]
    Idle,
    /// The watch start revision was compacted away: resync from a fresh range.
    #[error("watch revision {0} compacted")]
    Compacted(i64),
}

pub type Result<T> = std::result::Result<T, EtcdError>;

/// One key as read or watched.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Put(Kv),
    Delete(String),
}

#[derive(Clone)]
pub struct Etcd {
    endpoint: String,
    agent: ureq::Agent,
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The end of the range that holds every key starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    b64(&end)
}

fn kv(v: &Value) -> Option<Kv> {
    let key = B64.decode(v.get("key")?.as_str()?).ok()?;
    let value = v
        .get("value")
        .and_then(Value::as_str)
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default();
    Some(Kv {
        key: String::from_utf8_lossy(&key).into_owned(),
        value,
    })
}

impl Etcd {
    pub fn new(endpoint: &str) -> Etcd {
        Etcd::with_tls(endpoint, None)
    }

    /// An etcd client; `tls` is used for an https:// endpoint (CA, optional client cert).
    pub fn with_tls(endpoint: &str, tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> Etcd {
        // The read timeout also bounds an idle watch: it then ends and is re-opened from the
        // last revision, which lets the watcher notice a stop request.
        let mut b = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout_read(Duration::from_secs(5));
        if let Some(t) = tls {
            b = b.tls_config(t);
        }
        let agent = b.build();
        Etcd {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn call(&self, path: &str, body: Value, timeout: Duration) -> Result<Value> {
        let url = format!("{}{path}", self.endpoint);
        match self.agent.post(&url).timeout(timeout).send_json(body) {
            Ok(r) => r
                .into_json()
                .map_err(|e| EtcdError::Bad(format!("{path}: {e}"))),
            Err(ureq::Error::Status(code, r)) => Err(EtcdError::Refused(
                code,
                r.into_string().unwrap_or_default(),
            )),
            Err(ureq::Error::Transport(t)) => {
                Err(EtcdError::Unreachable(self.endpoint.clone(), t.to_string()))
            }
        }
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub fn grant(&self, ttl: u64) -> Result<i64> {
        let v = self.call(
            "/v3/lease/grant",
            json!({"TTL": ttl}),
            Duration::from_secs(5),
        )?;
        v.get("ID")
            .and_then(int)
            .ok_or_else(|| EtcdError::Bad(format!("lease grant: {v}")))
    }

    /// Refreshes a lease; `false` when etcd no longer knows it (it expired).
    pub fn keepalive(&self, lease: i64) -> Result<bool> {
        let v = self.call(
            "/v3/lease/keepalive",
            json!({"ID": lease.to_string()}),
            Duration::from_secs(5),
        )?;
        Ok(v.pointer("/result/TTL")
            .and_then(int)
            .is_some_and(|t| t > 0))
    }

    pub fn revoke(&self, lease: i64) -> Result<()> {
        self.call(
            "/v3/lease/revoke",
            json!({"ID": lease.to_string()}),
            Duration::from_secs(5),
        )
        .map(|_| ())
    }

    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<()> {
        let mut body = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        self.call("/v3/kv/put", body, Duration::from_secs(5))
            .map(|_| ())
    }

    /// Every key under `prefix`, and the store revision they were read at.
    pub fn range(&self, prefix: &str) -> Result<(Vec<Kv>, i64)> {
        let v = self.call(
            "/v3/kv/range",
            json!({"key": b64(prefix.as_bytes()), "range_end": prefix_end(prefix)}),
            Duration::from_secs(10),
        )?;
        let rev = v
            .pointer("/header/revision")
            .and_then(int)
            .ok_or_else(|| EtcdError::Bad(format!("range: {v}")))?;
        let kvs = v
            .get("kvs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(kv).collect())
            .unwrap_or_default();
        Ok((kvs, rev))
    }

    /// Watches `prefix` from revision `from`, calling `each(events, revision)` for every batch
    /// until the stream breaks (`Err`) or `each` returns `false` (`Ok`).
    pub fn watch(
        &self,
        prefix: &str,
        from: i64,
        mut each: impl FnMut(Vec<WatchEvent>, i64) -> bool,
    ) -> Result<()> {
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()), "range_end": prefix_end(prefix), "start_revision": from.to_string(),
            "progress_notify": true,
        }});
        let url = format!("{}/v3/watch", self.endpoint);
        let resp = match self.agent.post(&url).send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                return Err(EtcdError::Refused(
                    code,
                    r.into_string().unwrap_or_default(),
                ))
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(EtcdError::Unreachable(self.endpoint.clone(), t.to_string()))
            }
        };
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Err(EtcdError::Idle)
                }
                Err(e) => return Err(EtcdError::Unreachable(self.endpoint.clone(), e.to_string())),
            };
            let v: Value =
                serde_json::from_str(&line).map_err(|e| EtcdError::Bad(format!("watch: {e}")))?;
            let Some(r) = v.get("result") else {
                return Err(EtcdError::Bad(format!("watch: {v}")));
            };
            if let Some(c) = r.get("compact_revision").and_then(int).filter(|c| *c > 0) {
                return Err(EtcdError::Compacted(c));
            }
            let rev = r.pointer("/header/revision").and_then(int).unwrap_or(from);
            // PUT events carry no "type" field in the gateway's JSON (it is the default).
            let events = r
                .get("events")
                .and_then(Value::as_array)
                .map(|evs| {
                    evs.iter()
                        .filter_map(|e| {
                            let kv = kv(e.get("kv")?)?;
                            Some(if e.get("type").and_then(Value::as_str) == Some("DELETE") {
                                WatchEvent::Delete(kv.key)
                            } else {
                                WatchEvent::Put(kv)
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !each(events, rev) {
                return Ok(());
            }
        }
        Err(EtcdError::Unreachable(
            self.endpoint.clone(),
            "watch stream ended".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(B64.decode(prefix_end("/etask/")).unwrap(), b"/etask0");
    }

    #[test]
    fn ints_come_as_strings_or_numbers() {
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&json!(7)), Some(7));
        assert_eq!(int(&json!(null)), None);
    }
}
