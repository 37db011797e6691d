//! The shapes of the intake API (`POST /api/v1/tasks` body) and the API's error type. Parsing
//! refuses unknown fields and explains every invalid value; nothing here touches the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cron;
use crate::model::{DeliveryPath, ErrorCode, Strategy};
use crate::runner::Program;

/// An API error: a code from the documented set (`model::ErrorCode`, which also gives its
/// HTTP status) and a message for the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, m: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: m.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidArgument, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Conflict, m)
    }
    pub fn unauthenticated(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unauthenticated, m)
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unavailable, m)
    }
    pub fn too_large(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::PayloadTooLarge, m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, m)
    }

    /// The HTTP status of the code.
    pub fn status(&self) -> u16 {
        self.code.http_status()
    }

    /// `{"error": {"code": "...", "message": "..."}}`.
    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code.as_str(), "message": self.message}})
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        match e {
            crate::store::StoreError::Unavailable(m) | crate::store::StoreError::Retry(m) => {
                ApiError::unavailable(m)
            }
            e => ApiError::internal(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Schedule {
    /// Run once: now, or at `at` (unix ms).
    Once {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<i64>,
    },
    /// Cron in the reference dialect (`0 */5 * * * *`, `@hourly`; README "Cron"), read in
    /// `timezone`. The intake stores the zone it resolved, so a later change of
    /// `[scheduler] timezone` does not move existing tasks.
    Cron {
        expr: String,
        /// IANA zone; absent = `[scheduler] timezone` (stored tasks without one: UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
        #[serde(default)]
        overlap: Overlap,
    },
}

pub use crate::model::Overlap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default = "default_path")]
    pub path: DeliveryPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// The key of `consistent_hash` routing (same key → same node while it lives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

fn default_path() -> DeliveryPath {
    DeliveryPath::Local
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
}

fn default_initial_backoff() -> u64 {
    1_000
}
fn default_max_backoff() -> u64 {
    60_000
}

impl RetryPolicy {
    /// When attempt `attempt + 1` is due after attempt `attempt` failed at `now`, if any.
    pub fn next_at(&self, attempt: u32, now: i64) -> Option<i64> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = attempt.saturating_sub(1).min(32);
        let backoff = self
            .initial_backoff_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_backoff_ms)
            .min(MAX_BACKOFF_MS);
        Some(now.saturating_add(backoff as i64))
    }
}

/// The body of `POST /api/v1/tasks`, stored as the task's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default = "once_now")]
    pub schedule: Schedule,
    pub program: Program,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn once_now() -> Schedule {
    Schedule::Once { at: None }
}

pub const MAX_ATTEMPTS: u32 = 100;
/// Longest name, request id, pool, node, hash key and cron expression, in characters (Unicode
/// scalar values), as the store's `VARCHAR(255)` columns under utf8mb4 count them.
pub const MAX_NAME_CHARS: usize = 255;
/// At most this many labels per task, names of at most 64 and values of at most 1024 characters.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_NAME_CHARS: usize = 64;
pub const MAX_LABEL_VALUE_CHARS: usize = 1024;
pub const MAX_URL_CHARS: usize = 2048;
/// The latest time a task may name: 9999-12-31T23:59:59.999Z, in unix milliseconds.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;
/// Longest retry backoff: 7 days, in milliseconds (larger values would overflow a time).
pub const MAX_BACKOFF_MS: u64 = 7 * 86_400_000;

/// Refuses `value` when it has more than `max` characters or any control character (NUL,
/// newline, escape…): names, ids, pools, label names, URLs and cron expressions are printed in
/// tables and log lines, where such characters would forge lines or corrupt the terminal.
/// Also the invisible characters that change how text around them reads: bidirectional
/// overrides and isolates (U+202A–202E, U+2066–2069: `evil<U+202E>hs.txt` shows as `eviltxt.sh`),
/// zero-width characters and marks (U+200B–200F, U+2060–2064, U+FEFF) and the line and
/// paragraph separators U+2028/2029.
fn check_chars(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if let Some(c) = value
        .chars()
        .find(|c| c.is_control() || is_invisible_format(*c))
    {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control or invisible formatting characters (found {})",
            c.escape_unicode()
        )));
    }
    check_len(field, value, max)
}

/// Unicode formatting characters that display as nothing or reorder the text around them
/// (see `check_chars`).
/// The list is the Unicode "format" characters (category Cf) that exist today, plus the
/// characters that render blank (Hangul fillers, the Braille blank, Mongolian vowel
/// separator), variation selectors and tags (`admin` + tag characters displays as `admin`).
pub fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{034F}'
        | '\u{061C}'
        | '\u{115F}'..='\u{1160}'
        | '\u{17B4}'..='\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{2800}'
        | '\u{3164}'
        | '\u{FE00}'..='\u{FE0F}'
        | '\u{FEFF}'
        | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFFB}'
        | '\u{110BD}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Refuses `value` when it has more than `max` characters. Counts characters, not bytes, the
/// way the limits are documented and the way MySQL's utf8mb4 columns count them.
fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n > max {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {max} characters, not {n}"
        )));
    }
    Ok(())
}

/// Parses a cron schedule read in `zone`, the zone resolved with `resolve_zone`.
pub fn parse_cron(expr: &str, zone: chrono_tz::Tz) -> Result<cron::Schedule, ApiError> {
    cron::Schedule::new(expr, zone).map_err(|e| {
        ApiError::invalid(format!(
            "schedule.expr {expr:?} is not a valid cron expression: {e} (README \"Cron\" lists the dialect)"
        ))
    })
}

/// The zone a cron schedule is read in: its `CRON_TZ=` prefix, else `schedule.timezone`, else
/// `default` (`[scheduler] timezone`). A prefix and a `timezone` that disagree are refused.
pub fn resolve_zone(
    expr: &str,
    timezone: Option<&str>,
    default: &str,
) -> Result<chrono_tz::Tz, ApiError> {
    let parsed = cron::parse(expr).map_err(|e| {
        ApiError::invalid(format!(
            "schedule.expr {expr:?} is not a valid cron expression: {e} (README \"Cron\" lists the dialect)"
        ))
    })?;
    let given = match timezone {
        Some(z) => {
            Some(cron::zone(z).map_err(|e| ApiError::invalid(format!("schedule.timezone: {e}")))?)
        }
        None => None,
    };
    match (parsed.prefix_zone, given) {
        (Some(p), Some(g)) if p != g => Err(ApiError::invalid(format!(
            "schedule.expr says CRON_TZ={} but schedule.timezone is {}; give one",
            p.name(),
            g.name()
        ))),
        (Some(z), _) | (None, Some(z)) => Ok(z),
        (None, None) => cron::zone(default)
            .map_err(|e| ApiError::internal(format!("[scheduler] timezone: {e}"))),
    }
}

/// The next fire time of `schedule` strictly after `after_ms`.
pub fn next_fire(schedule: &cron::Schedule, after_ms: i64) -> Option<i64> {
    schedule.next_after(after_ms)
}

impl TaskSpec {
    /// Parses and validates a request body; `paths` are the target paths this scheduler serves.
    pub fn parse(body: &[u8], paths: &[DeliveryPath]) -> Result<TaskSpec, ApiError> {
        let spec: TaskSpec = serde_json::from_slice(body).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                ApiError::invalid(format!("invalid task: the body is not valid JSON ({e})"))
            } else {
                ApiError::invalid(format!("invalid task: {e}"))
            }
        })?;
        spec.validate(paths)?;
        Ok(spec)
    }

    pub fn validate(&self, paths: &[DeliveryPath]) -> Result<(), ApiError> {
        if self.name.trim().is_empty() {
            return Err(ApiError::invalid("name must not be empty"));
        }
        check_chars("name", &self.name, MAX_NAME_CHARS)?;
        if let Some(r) = &self.request_id {
            if r.is_empty() {
                return Err(ApiError::invalid("request_id must not be empty"));
            }
            check_chars("request_id", r, MAX_NAME_CHARS)?;
        }
        if let Some(t) = &self.target {
            for (field, v) in [
                ("target.pool", &t.pool),
                ("target.node", &t.node),
                ("target.key", &t.key),
            ] {
                if let Some(v) = v {
                    check_chars(field, v, MAX_NAME_CHARS)?;
                }
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(ApiError::invalid(format!(
                "at most {MAX_LABELS} labels, not {}",
                self.labels.len()
            )));
        }
        for (k, v) in &self.labels {
            if k.is_empty() {
                return Err(ApiError::invalid("label names must not be empty"));
            }
            check_chars("label name", k, MAX_LABEL_NAME_CHARS)?;
            // A label's value is free text (it may hold a newline); only its length is bounded.
            check_len(&format!("label {k:?}"), v, MAX_LABEL_VALUE_CHARS)?;
        }
        if let Some(u) = &self.callback_url {
            check_chars("callback_url", u, MAX_URL_CHARS)?;
        }
        self.program
            .validate()
            .map_err(|e| ApiError::invalid(format!("program: {}", e.0)))?;
        if let Schedule::Cron { expr, timezone, .. } = &self.schedule {
            check_chars("schedule.expr", expr, MAX_NAME_CHARS)?;
            // The default zone is only known to the scheduler; UTC stands in for the syntax check.
            let zone = resolve_zone(expr, timezone.as_deref(), "UTC")?;
            let schedule = parse_cron(expr, zone)?;
            // An expression that never fires (`0 0 0 30 2 *`, a past year) is refused here
            // too, so the CLI finds it before sending. Looked for from two days back: zones
            // are at most 14 h from UTC, so "nothing after then" in the stand-in zone means
            // nothing from now on in any zone (the scheduler checks again in the real one).
            if next_fire(&schedule, crate::now_ms() - 2 * 86_400_000).is_none() {
                return Err(ApiError::invalid(format!(
                    "schedule.expr {expr:?} never fires"
                )));
            }
        }
        let path = self.path();
        if !paths.contains(&path) {
            let why = match path {
                DeliveryPath::Push | DeliveryPath::Pull => {
                    "needs gRPC (server.grpc_listen) and a registry (registry.etcd)"
                }
                DeliveryPath::Agent => "needs Kafka (kafka.brokers or --kafka)",
                DeliveryPath::Local => "this scheduler has no built-in node (run --mode all)",
            };
            let why = match path {
                DeliveryPath::Local => why.to_string(),
                _ => format!("{path} {why}"),
            };
            return Err(ApiError::invalid(format!(
                "target.path {:?} is not available here: {why}",
                path.as_str()
            )));
        }
        if let Some(t) = &self.target {
            match t.strategy {
                None => {}
                // Agents of a pool share its topic through their consumer group: Kafka picks.
                Some(_) if t.path == DeliveryPath::Agent => {
                    return Err(ApiError::invalid(
                        "target.strategy is not supported for target.path \"agent\": the agents \
                         of the pool share its dispatch topic",
                    ))
                }
                Some(Strategy::Broadcast) if !t.path.is_grpc() => {
                    return Err(ApiError::invalid(
                        "target.strategy \"broadcast\" needs target.path push or pull",
                    ))
                }
                Some(Strategy::Pinned) if t.node.is_none() => {
                    return Err(ApiError::invalid(
                        "target.strategy \"pinned\" needs target.node",
                    ))
                }
                Some(Strategy::ConsistentHash) if t.key.is_none() => {
                    return Err(ApiError::invalid(
                        "target.strategy \"consistent_hash\" needs target.key",
                    ))
                }
                // Unknown names are refused when the body is read (`Strategy`'s deserializer).
                Some(_) => {}
            }
        }
        if let Schedule::Once { at: Some(at) } = &self.schedule {
            // Unix milliseconds from 1970 to the year 9999: anything else is a mistake (and an
            // extreme value would overflow the time arithmetic downstream).
            if !(0..=MAX_TIME_MS).contains(at) {
                return Err(ApiError::invalid(format!(
                    "schedule.at must be unix milliseconds between 0 and {MAX_TIME_MS}, not {at}"
                )));
            }
        }
        if let Some(t) = self.timeout_seconds {
            // At least a millisecond: smaller became 0 ms, "no timeout" on the gRPC paths
            // and an immediate kill on the local one.
            if !(0.001..=7.0 * 86_400.0).contains(&t) {
                return Err(ApiError::invalid(
                    "timeout_seconds must be 0.001 to 604800 (7 days)",
                ));
            }
        }
        if let Some(r) = &self.retry {
            if r.max_attempts == 0 || r.max_attempts > MAX_ATTEMPTS {
                return Err(ApiError::invalid(format!(
                    "retry.max_attempts must be 1 to {MAX_ATTEMPTS}"
                )));
            }
            if r.max_backoff_ms > MAX_BACKOFF_MS {
                return Err(ApiError::invalid(format!(
                    "retry.max_backoff_ms must be at most {MAX_BACKOFF_MS} (7 days)"
                )));
            }
            if r.initial_backoff_ms > r.max_backoff_ms {
                return Err(ApiError::invalid(
                    "retry.initial_backoff_ms must not exceed retry.max_backoff_ms",
                ));
            }
        }
        if let Some(u) = &self.callback_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ApiError::invalid(
                    "callback_url must be an http:// or https:// URL",
                ));
            }
        }
        Ok(())
    }

    /// One execution per live node of the pool (`target.strategy = "broadcast"`).
    pub fn is_broadcast(&self) -> bool {
        self.target.as_ref().and_then(|t| t.strategy) == Some(Strategy::Broadcast)
    }

    /// The target pool ("default" when none is given).
    pub fn pool(&self) -> &str {
        self.target
            .as_ref()
            .and_then(|t| t.pool.as_deref())
            .unwrap_or("default")
    }

    /// The delivery path (local when no target is given).
    pub fn path(&self) -> DeliveryPath {
        self.target.as_ref().map_or(DeliveryPath::Local, |t| t.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused_in_names_ids_and_urls() {
        for bad in [
            "a\u{0}b",
            "line\nforged",
            "esc\u{1b}[2J",
            "tab\t",
            "evil\u{202E}hs.txt",
            "zero\u{200B}width",
            "iso\u{2066}late",
            "sep\u{2028}line",
            "\u{FEFF}bom",
            "soft\u{00AD}hyphen",
            "arabic\u{061C}mark",
            "\u{3164}",
            "admin\u{E0041}",
            "vs\u{FE0F}",
            "inhibit\u{206A}",
        ] {
            let e = check_chars("name", bad, MAX_NAME_CHARS).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(
                e.message
                    .contains("control or invisible formatting characters"),
                "{}",
                e.message
            );
        }
        assert!(check_chars("name", "备份 db-01 (nightly)", MAX_NAME_CHARS).is_ok());
        assert!(check_chars("name", "مرحبا-نسخ", MAX_NAME_CHARS).is_ok());
        assert!(check_len("label \"note\"", "two\nlines", MAX_LABEL_VALUE_CHARS).is_ok());
    }

    fn parse(v: Value) -> Result<TaskSpec, ApiError> {
        TaskSpec::parse(v.to_string().as_bytes(), &[DeliveryPath::Local])
    }

    #[test]
    fn minimal_task_defaults_to_once_now_on_local() {
        let s = parse(json!({"name": "n", "program": {"kind": "shell", "code": "true"}})).unwrap();
        assert_eq!(s.schedule, Schedule::Once { at: None });
        assert_eq!(s.path(), DeliveryPath::Local);
    }

    #[test]
    fn bad_input_is_explained() {
        let e =
            parse(json!({"name": "n", "program": {"kind": "shell", "code": "true"}, "colour": 1}))
                .unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{e:?}");
        let e = parse(json!({"name": "n", "program": {"kind": "shell", "code": 5}})).unwrap_err();
        assert!(e.message.contains("invalid type"), "{e:?}");
        let e = parse(json!({"name": "n", "schedule": {"kind": "cron", "expr": "every minute"}, "program": {"kind": "shell", "code": "true"}})).unwrap_err();
        assert!(e.message.contains("cron"), "{e:?}");
        let e = parse(json!({"name": "n", "target": {"path": "push"}, "program": {"kind": "shell", "code": "true"}})).unwrap_err();
        assert!(e.message.contains("needs gRPC"), "{e:?}");
        let e = parse(json!({"name": "n", "retry": {"max_attempts": 0}, "program": {"kind": "shell", "code": "true"}})).unwrap_err();
        assert!(e.message.contains("max_attempts"), "{e:?}");
    }

    #[test]
    fn cron_accepts_seconds_and_descriptors() {
        let utc = cron::zone("UTC").unwrap();
        let s = parse_cron("*/2 * * * * *", utc).unwrap();
        let n = next_fire(&s, 1_000).unwrap();
        assert_eq!(n, 2_000);
        assert!(parse_cron("@hourly", utc).is_ok());
        let e = parse(json!({"name": "n", "schedule": {"kind": "cron", "expr": "0 0 * * *"}, "program": {"kind": "shell", "code": "true"}})).unwrap_err();
        assert!(e.message.contains("5 fields"), "{e:?}");
        let e = parse(json!({"name": "n", "schedule": {"kind": "cron", "expr": "0 0 0 * * *", "timezone": "Moon/Base"}, "program": {"kind": "shell", "code": "true"}})).unwrap_err();
        assert!(e.message.contains("schedule.timezone"), "{e:?}");
        let s = parse(json!({"name": "n", "schedule": {"kind": "cron", "expr": "0 0 0 * * *", "overlap": "queue"}, "program": {"kind": "shell", "code": "true"}})).unwrap();
        assert!(matches!(
            s.schedule,
            Schedule::Cron {
                overlap: Overlap::Queue,
                ..
            }
        ));
        let e = parse(json!({"name": "n", "schedule": {"kind": "cron", "expr": "0 0 0 * * *", "overlap": "skip"}, "program": {"kind": "shell", "code": "true"}})).unwrap_err();
        assert!(
            e.message.contains(
                "unknown schedule.overlap \"skip\"; use one of forbid, allow, queue, replace"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn length_limits_count_characters_not_bytes() {
        let task = |name: &str| json!({"name": name, "program": {"kind": "shell", "code": "true"}});
        // 255 Chinese characters are 765 bytes: accepted; 256 are refused.
        assert!(parse(task(&"中".repeat(255))).is_ok());
        let e = parse(task(&"中".repeat(256))).unwrap_err();
        assert!(
            e.message.contains("at most 255 characters, not 256"),
            "{e:?}"
        );
        let mut t = task("n");
        t["request_id"] = json!("键".repeat(255));
        t["labels"] = json!({"团队": "网络".repeat(512)});
        t["target"] = json!({"path": "local", "pool": "池".repeat(255)});
        assert!(parse(t.clone()).is_ok());
        t["labels"] = json!({"团队": "网络".repeat(513)});
        assert!(parse(t.clone()).is_err());
        let many: serde_json::Map<String, Value> =
            (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
        t["labels"] = Value::Object(many);
        assert!(parse(t).unwrap_err().message.contains("at most 64 labels"));
        let mut t = task("n");
        t["schedule"] = json!({"kind": "cron", "expr": format!("0 0 * * * * {}", " ".repeat(300))});
        assert!(
            parse(t).is_err(),
            "a cron expression longer than its column is refused"
        );
    }

    #[test]
    fn backoff_is_bounded_and_never_wraps() {
        let mut t = json!({"name": "n", "program": {"kind": "shell", "code": "true"},
                           "retry": {"max_attempts": 3, "initial_backoff_ms": u64::MAX, "max_backoff_ms": u64::MAX}});
        assert!(parse(t.clone())
            .unwrap_err()
            .message
            .contains("max_backoff_ms"));
        t["retry"]["max_backoff_ms"] = json!(MAX_BACKOFF_MS);
        t["retry"]["initial_backoff_ms"] = json!(MAX_BACKOFF_MS);
        let s = parse(t).unwrap();
        let now = 1_800_000_000_000;
        assert_eq!(
            s.retry.unwrap().next_at(2, now),
            Some(now + MAX_BACKOFF_MS as i64)
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let r = RetryPolicy {
            max_attempts: 4,
            initial_backoff_ms: 100,
            max_backoff_ms: 250,
        };
        assert_eq!(r.next_at(1, 0), Some(100));
        assert_eq!(r.next_at(2, 0), Some(200));
        assert_eq!(r.next_at(3, 0), Some(250));
        assert_eq!(r.next_at(4, 0), None);
    }
}
