//! The HTTP intake: routes `/api/v1/...`, `/healthz` and `/metrics` onto the scheduler core.
//! Sync code only; the sockets, limits and timeouts live in `transport` (hyper). Authorisation
//! is decided on the same normalised path that routing uses, before any body is read: only
//! `/healthz` is open, everything else needs the token when one is set (deny by default).

pub mod transport;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use self::transport::{Body, Head, Limits, Response, Sink};
use super::api::{ApiError, TaskSpec};
use super::{Core, LOG};
use crate::model::{ErrorCode, ExecutionId, Status, TaskId};

/// How long a `logs?follow=true` stream may stay open; the client resumes with `after_seq`.
pub const FOLLOW_MAX: Duration = Duration::from_secs(3600);
/// A follow stream with nothing to send writes an empty line this often, so a client that
/// left is noticed (and its slot freed) even while the execution logs nothing.
pub const FOLLOW_KEEPALIVE: Duration = Duration::from_secs(5);

pub struct HttpServer {
    server: transport::Server,
    pub addr: std::net::SocketAddr,
}

/// Checks the listen address before anything else starts: without a token, only loopback.
pub fn check_listen(
    cfg: &crate::config::Config,
) -> Result<std::net::SocketAddr, super::StartError> {
    check_listen_inner(cfg).map_err(super::StartError)
}

fn check_listen_inner(cfg: &crate::config::Config) -> Result<std::net::SocketAddr, String> {
    crate::config::check_listener("server.listen", &cfg.server.listen, &cfg.server.token)
        .map_err(String::from)
}

impl HttpServer {
    pub fn start(core: Arc<Core>) -> Result<HttpServer, super::StartError> {
        Self::start_inner(core).map_err(super::StartError)
    }

    fn start_inner(core: Arc<Core>) -> Result<HttpServer, String> {
        let addr = check_listen(&core.cfg)?;
        let s = &core.cfg.server;
        let https = !s.tls_cert.is_empty();
        let limits = Limits {
            head_timeout: Duration::from_millis(s.header_timeout_ms.max(100)),
            body_timeout: Duration::from_millis(s.body_timeout_ms.max(100)),
            max_head_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            max_body_bytes: s.max_body_bytes,
            max_connections: crate::connection_budget(s.max_connections),
            workers: s.http_threads,
            queue: s.http_threads * 64,
            tls: if s.tls_cert.is_empty() {
                None
            } else {
                Some(crate::trust::tls::server_config(
                    &s.tls_cert,
                    &s.tls_key,
                    &s.tls_client_ca,
                )?)
            },
        };
        let server = transport::Server::start(addr, limits, Arc::new(Api { core }))
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let addr = server.addr;
        log::info!(target: LOG, "http intake listening on {addr}{}", if https { " (https)" } else { "" });
        Ok(HttpServer { server, addr })
    }

    pub fn stop(self) {
        self.server.stop();
    }
}

struct Api {
    core: Arc<Core>,
}

impl transport::Handler for Api {
    fn admit(&self, head: &Head) -> Result<(), Response> {
        let segs = segments(&head.path).map_err(|e| err_response(&e))?;
        if segs == ["healthz"] {
            // The one path open without a token takes no body: refused here, before a byte
            // of it is read (it used to be read, up to max_body_bytes per connection, before
            // the 405: 250 unauthenticated connections held 2.8 GB).
            let method = head.method.as_str();
            if method != "GET" && method != "HEAD" {
                return Err(err_response(&ApiError {
                    code: ErrorCode::MethodNotAllowed,
                    message: format!("{method} is not allowed on /healthz; use GET"),
                }));
            }
            let declares_body = head.header("transfer-encoding").is_some()
                || head
                    .header("content-length")
                    .is_some_and(|l| l.trim() != "0");
            if declares_body {
                return Err(err_response(&ApiError::invalid(
                    "/healthz takes no request body",
                )));
            }
            return Ok(());
        }
        if !authorized(&self.core, head) {
            return Err(err_response(&ApiError::unauthenticated(
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            )));
        }
        Ok(())
    }

    fn handle(&self, head: Head, body: Vec<u8>) -> Response {
        handle(&self.core, &head, &body)
    }

    fn error(&self, code: ErrorCode, message: &str) -> Response {
        err_response(&ApiError::new(code, message))
    }
}

/// The path's segments: what both authorisation and routing look at. Empty segments (`//`,
/// a trailing `/`) are dropped, so `//api/v1/tasks` is `/api/v1/tasks` for both.
///
/// # Errors
/// A path that is not absolute (`api/v1/tasks`): `invalid_argument`.
fn segments(path: &str) -> Result<Vec<&str>, ApiError> {
    if !path.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "request target {path:?} must be an absolute path (/api/v1/...)"
        )));
    }
    Ok(path.split('/').filter(|s| !s.is_empty()).collect())
}

fn json_response(status: u16, body: &Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: Body::Bytes(body.to_string().into_bytes()),
    }
}

fn err_response(e: &ApiError) -> Response {
    json_response(e.status(), &e.body())
}

/// Query string pairs, decoded (`+` is a space, `%XX` a byte).
fn query(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn num<T: std::str::FromStr>(q: &[(String, String)], k: &str) -> Result<Option<T>, ApiError> {
    param(q, k)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<T>().map_err(|_| {
                ApiError::invalid(format!("query parameter {k}={v:?} is not a valid number"))
            })
        })
        .transpose()
}

/// Refuses query parameters the request does not take (a typo is an error, as in a body),
/// and parameters given twice.
fn only(q: &[(String, String)], allowed: &[&str]) -> Result<(), ApiError> {
    for (i, (k, _)) in q.iter().enumerate() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::invalid(if allowed.is_empty() {
                format!("unknown query parameter {k:?}: this request takes none")
            } else {
                format!(
                    "unknown query parameter {k:?}: this request takes {}",
                    allowed.join(", ")
                )
            }));
        }
        if q[..i].iter().any(|(n, _)| n == k) {
            return Err(ApiError::invalid(format!(
                "query parameter {k:?} given more than once"
            )));
        }
    }
    Ok(())
}

/// A page size: `limit` (`model::page_limit`).
fn limit(q: &[(String, String)]) -> Result<u32, ApiError> {
    crate::model::page_limit(num::<u32>(q, "limit")?).map_err(ApiError::invalid)
}

/// A true/false query parameter (`true`/`1`, `false`/`0`); absent = false.
fn flag(q: &[(String, String)], k: &str) -> Result<bool, ApiError> {
    match param(q, k) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(v) => Err(ApiError::invalid(format!(
            "query parameter {k}={v:?}: use true or false"
        ))),
    }
}

/// The largest id, cursor or sequence number the API takes: 2^53 - 1, the largest integer
/// every JSON client reads exactly. Bounding them where they enter keeps the arithmetic done
/// on them later (`after_seq + 1`, cursors) from overflowing: `after_seq=9223372036854775807`
/// used to panic a worker.
pub const MAX_ID: i64 = (1 << 53) - 1;

fn id_of(seg: &str, what: &str) -> Result<i64, ApiError> {
    seg.parse::<i64>()
        .ok()
        .filter(|n| (0..=MAX_ID).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{what} id {seg:?} is not a number from 0 to {MAX_ID}"
            ))
        })
}

/// A query parameter that is an id, cursor or sequence number: 0 to `MAX_ID`.
fn id_param(q: &[(String, String)], k: &str) -> Result<Option<i64>, ApiError> {
    match num::<i64>(q, k)? {
        Some(n) if !(0..=MAX_ID).contains(&n) => Err(ApiError::invalid(format!(
            "query parameter {k}={n} must be from 0 to {MAX_ID}"
        ))),
        v => Ok(v),
    }
}

fn authorized(core: &Core, head: &Head) -> bool {
    let token = &core.cfg.server.token;
    if token.is_empty() {
        return true;
    }
    let expected = format!("Bearer {token}");
    let got = head.header("authorization").unwrap_or("").as_bytes();
    // Constant-time compare: do not leak the token's prefix through timing.
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn handle(core: &Arc<Core>, head: &Head, body: &[u8]) -> Response {
    let segs = match segments(&head.path) {
        Ok(s) => s,
        Err(e) => return err_response(&e),
    };
    let method = head.method.as_str();
    if segs == ["healthz"] {
        if method != "GET" && method != "HEAD" {
            return err_response(&ApiError {
                code: ErrorCode::MethodNotAllowed,
                message: format!("{method} is not allowed on /healthz; use GET"),
            });
        }
        let (ok, body) = core.health();
        return json_response(if ok { 200 } else { 503 }, &body);
    }
    if segs == ["metrics"] {
        let text = core.metrics_text();
        return Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: Body::Bytes(text.into_bytes()),
        };
    }
    let q = query(head.query.as_deref());
    if method == "GET"
        && segs.len() == 5
        && segs[..3] == ["api", "v1", "executions"]
        && segs[4] == "logs"
    {
        return logs(core, segs[3], &q);
    }
    let res = route(core, method, &head.path, &segs, &q, body);
    match res {
        Ok((status, body)) => json_response(status, &body),
        Err(e) => {
            // 503 is an answer about the state of things (no node, store away), not a fault.
            if e.status() >= 500 && e.status() != 503 {
                log::warn!(target: LOG, "{method} {} -> {} {}", head.path, e.status(), e.message);
            }
            err_response(&e)
        }
    }
}

fn route(
    core: &Core,
    method: &str,
    path: &str,
    segs: &[&str],
    q: &[(String, String)],
    body: &[u8],
) -> Result<(u16, Value), ApiError> {
    if segs.len() < 3 || segs[0] != "api" || segs[1] != "v1" {
        return Err(ApiError::not_found(format!(
            "no route {path}; the API lives under /api/v1/"
        )));
    }
    let not_allowed = || ApiError {
        code: ErrorCode::MethodNotAllowed,
        message: format!("{method} is not allowed on {path}"),
    };
    // An unknown resource is 404 whatever its query says (the query is judged only where
    // there is something to take it).
    if !matches!(
        (segs[2], &segs[3..]),
        ("tasks" | "executions", _) | ("nodes", [])
    ) {
        return Err(ApiError::not_found(format!("no route {path}")));
    }
    let takes: &[&str] = match (method, segs[2], &segs[3..]) {
        ("GET", "tasks", []) => &["name", "limit", "cursor"],
        ("GET", "executions", []) => &["task_id", "status", "limit", "cursor"],
        ("POST", "tasks", [_, "resume"]) => &["catch_up"],
        _ => &[],
    };
    only(q, takes)?;
    match (segs[2], &segs[3..]) {
        ("tasks", []) => match method {
            "POST" => {
                let spec = TaskSpec::parse(body, &core.paths())?;
                let broadcast = spec.is_broadcast();
                let (c, all) = core.submit(spec)?;
                let mut body = json!({"task_id": c.task_id, "execution_id": c.execution_id});
                // One shape for every broadcast, whatever the number of nodes (none yet: cron).
                if broadcast {
                    body["execution_ids"] = json!(all);
                }
                Ok((if c.existed { 200 } else { 201 }, body))
            }
            "GET" => {
                let limit = limit(q)?;
                let cursor = id_param(q, "cursor")?.map(TaskId);
                let rows = core.store.list_tasks(
                    param(q, "name").filter(|n| !n.is_empty()),
                    limit,
                    cursor,
                )?;
                let next = (rows.len() == limit as usize)
                    .then(|| rows.last().map(|t| t.id))
                    .flatten();
                Ok((
                    200,
                    json!({"items": rows.iter().map(|t| t.to_json()).collect::<Vec<_>>(), "next_cursor": next}),
                ))
            }
            _ => Err(not_allowed()),
        },
        ("tasks", [id]) => {
            let id = TaskId(id_of(id, "task")?);
            match method {
                "GET" => {
                    let t = core
                        .store
                        .get_task(id)?
                        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
                    Ok((200, t.to_json()))
                }
                "DELETE" => {
                    // Idempotent like cancel: deleting a deleted task answers as the first time.
                    let known = core.store.delete_task(id, crate::now_ms())?
                        || core.store.get_task(id)?.is_some_and(|t| t.deleted);
                    if known {
                        Ok((200, json!({"id": id, "deleted": true})))
                    } else {
                        Err(ApiError::not_found(format!("task {id} not found")))
                    }
                }
                _ => Err(not_allowed()),
            }
        }
        ("tasks", [id, action]) if method == "POST" => {
            let id = TaskId(id_of(id, "task")?);
            match *action {
                "run" => Ok((
                    201,
                    json!({"task_id": id, "execution_id": core.run_now(id)?}),
                )),
                "pause" => core.pause(id).map(|v| (200, v)),
                "resume" => {
                    let catch_up = flag(q, "catch_up")?;
                    core.resume(id, catch_up).map(|v| (200, v))
                }
                _ => Err(ApiError::not_found(format!(
                    "no action {action:?} on tasks; use run, pause or resume"
                ))),
            }
        }
        ("nodes", []) if method == "GET" => {
            let nodes = core.nodes();
            Ok((200, json!({"items": nodes})))
        }
        ("executions", []) if method == "GET" => {
            let limit = limit(q)?;
            let cursor = id_param(q, "cursor")?.map(ExecutionId);
            let task = id_param(q, "task_id")?.map(TaskId);
            let status = match param(q, "status").filter(|s| !s.is_empty()) {
                Some(s) => Some(
                    Status::parse(s)
                        .ok_or_else(|| ApiError::invalid(format!("unknown status {s:?}")))?,
                ),
                None => None,
            };
            let rows = core.store.list_executions(task, status, limit, cursor)?;
            let next = (rows.len() == limit as usize)
                .then(|| rows.last().map(|e| e.id))
                .flatten();
            Ok((
                200,
                // The list carries no attempts (they are not read for it): an empty list
                // there would claim there were none. `GET /executions/{id}` has them.
                json!({"items": rows.iter().map(|e| {
                    let mut v = e.to_json();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("attempts");
                    }
                    v
                }).collect::<Vec<_>>(), "next_cursor": next}),
            ))
        }
        ("executions", [id]) if method == "GET" => {
            let id = ExecutionId(id_of(id, "execution")?);
            let e = core
                .store
                .get_execution(id)?
                .ok_or_else(|| ApiError::not_found(format!("execution {id} not found")))?;
            Ok((200, e.to_json()))
        }
        ("executions", [id, "cancel"]) if method == "POST" => {
            let id = ExecutionId(id_of(id, "execution")?);
            core.cancel(id).map(|v| (200, v))
        }
        ("tasks" | "executions", _) => Err(not_allowed()),
        _ => Err(ApiError::not_found(format!("no route {path}"))),
    }
}

/// `GET /api/v1/executions/{id}/logs?after_seq=N&follow=true`: JSON lines; with follow the
/// response is streamed and ends when the execution does (or after [`FOLLOW_MAX`]).
fn logs(core: &Arc<Core>, id: &str, q: &[(String, String)]) -> Response {
    let parsed = (|| {
        only(q, &["after_seq", "follow"])?;
        let id = ExecutionId(id_of(id, "execution")?);
        let after = id_param(q, "after_seq")?.unwrap_or(0);
        let follow = flag(q, "follow")?;
        core.store
            .get_execution(id)?
            .ok_or_else(|| ApiError::not_found(format!("execution {id} not found")))?;
        Ok::<_, ApiError>((id, after, follow))
    })();
    let (id, after, follow) = match parsed {
        Ok(p) => p,
        Err(e) => return err_response(&e),
    };
    if !follow {
        // Streamed a page at a time like a follow, ending at the last stored chunk: the whole
        // answer used to be built in memory (400 MB for one run's escaped output; eight such
        // reads at once held 4 GB).
        let core = core.clone();
        return Response {
            status: 200,
            content_type: "application/x-ndjson",
            body: Body::Stream(Box::new(move |sink| {
                if stream_logs(&core, &sink, id, after, false).is_err() {
                    log::debug!(target: LOG, "execution={id} log reader gone");
                }
            })),
        };
    }
    let max = core.cfg.server.max_log_followers;
    if core.followers.fetch_add(1, Ordering::SeqCst) >= max {
        core.followers.fetch_sub(1, Ordering::SeqCst);
        return err_response(&ApiError::unavailable(format!(
            "too many log followers (max {max}); retry later"
        )));
    }
    // The slot is released when the writer ends, however it ends (a guard, not a call at the
    // end: a writer that panics gives its slot back too).
    struct Slot(Arc<Core>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.followers.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let slot = Slot(core.clone());
    Response {
        status: 200,
        content_type: "application/x-ndjson",
        body: Body::Stream(Box::new(move |sink| {
            let core = &slot.0;
            if stream_logs(core, &sink, id, after, true).is_err() {
                log::debug!(target: LOG, "execution={id} log follower gone");
            }
        })),
    }
}

/// Chunks read and sent at a time: what one log reader holds in memory (a chunk's data is
/// at most a few dozen KiB; JSON escaping of control bytes can make it six times that).
const LOG_PAGE: u32 = 100;

/// Sends log lines, a page at a time. With `follow`, as they are stored until the execution
/// ends, the client leaves, the server stops, or [`FOLLOW_MAX`] passes; without, up to the
/// last chunk stored now.
fn stream_logs(
    core: &Core,
    sink: &Sink,
    id: ExecutionId,
    after: i64,
    follow: bool,
) -> Result<(), transport::Closed> {
    let mut last: Option<crate::store::LogRow> = None;
    let started = Instant::now();
    let mut last_sent = Instant::now();
    let mut buf = String::new();
    loop {
        // Read the state before the chunks: whatever was stored before the final state is then
        // in this read, so nothing is missed when the stream ends.
        let finished = core
            .store
            .get_execution(id)
            .ok()
            .flatten()
            .is_none_or(|e| e.status.is_terminal());
        // Count the chunks before `after_seq` once; from then on continue after the last one.
        let rows = match &last {
            None => core.store.logs_after(id, after, LOG_PAGE),
            Some(l) => core.store.logs_continue(id, l, LOG_PAGE),
        }
        .unwrap_or_default();
        buf.clear();
        for r in &rows {
            buf.push_str(&line(r));
            buf.push('\n');
        }
        if let Some(r) = rows.last() {
            last = Some(r.clone());
        }
        if !buf.is_empty() {
            sink.send(std::mem::take(&mut buf).into_bytes())?;
            last_sent = Instant::now();
        }
        if rows.is_empty() {
            if !follow || finished || core.stopping() || started.elapsed() > FOLLOW_MAX {
                return Ok(());
            }
            if last_sent.elapsed() >= FOLLOW_KEEPALIVE {
                sink.send(b"\n".to_vec())?;
                last_sent = Instant::now();
            }
            if sink.is_closed() {
                return Err(transport::Closed);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn line(r: &crate::store::LogRow) -> String {
    json!({"seq": r.seq, "attempt": r.attempt, "stream": r.stream, "data": r.data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let q = query(Some("name=a%20b+c&limit=5&x=%zz"));
        assert_eq!(param(&q, "name"), Some("a b c"));
        assert_eq!(param(&q, "limit"), Some("5"));
        assert_eq!(param(&q, "x"), Some("%zz"));
    }

    #[test]
    fn authorisation_and_routing_see_the_same_segments() {
        for p in ["//api/v1/tasks", "/api//v1/tasks/", "/api/v1/tasks"] {
            assert_eq!(segments(p).unwrap(), ["api", "v1", "tasks"], "{p}");
        }
        assert_eq!(segments("/healthz/").unwrap(), ["healthz"]);
        assert!(segments("api/v1/tasks").is_err());
    }
}
