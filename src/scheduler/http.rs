//! The HTTP intake (tiny_http): routes `/api/v1/...`, `/healthz` and `/metrics` onto the
//! scheduler core. A few worker threads serve requests; a `logs?follow=true` stream gets a
//! thread of its own (bounded by `server.max_log_followers`) so it never starves the API.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use super::api::{ApiError, TaskSpec};
use super::{Core, LOG};
use crate::model::{ExecutionId, Status, TaskId};

pub struct HttpServer {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// Checks the listen address before anything else starts: without a token, only loopback.
pub fn check_listen(cfg: &crate::config::Config) -> Result<SocketAddr, String> {
    let listen = &cfg.server.listen;
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| format!("listen address {listen:?} is not IP:PORT"))?;
    if cfg.server.token.is_empty() && !addr.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {addr} without a token: set server.token (clients send \
             `Authorization: Bearer <token>`) or listen on a loopback address"
        ));
    }
    Ok(addr)
}

impl HttpServer {
    pub fn start(core: Arc<Core>) -> Result<HttpServer, String> {
        let addr = check_listen(&core.cfg)?;
        let server =
            Arc::new(Server::http(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?);
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or("listening on a non-IP socket")?;
        let mut workers = Vec::new();
        for i in 0..core.cfg.server.http_threads {
            let (server, core) = (server.clone(), core.clone());
            let t = std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(req) = server.recv() {
                        // A bug in one handler must not take a worker down with it: the
                        // dropped request is answered 500 by tiny_http, the worker goes on.
                        let url = req.url().to_owned();
                        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            handle(&core, req)
                        }));
                        if res.is_err() {
                            log::error!(target: LOG, "handler panicked on {url}; answered 500");
                        }
                    }
                })
                .map_err(|e| format!("cannot start http thread: {e}"))?;
            workers.push(t);
        }
        log::info!(target: LOG, "http intake listening on {addr}");
        Ok(HttpServer {
            server,
            workers,
            addr,
        })
    }

    pub fn stop(self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn json_header() -> Header {
    Header::from_bytes("Content-Type", "application/json").expect("static header")
}

fn reply(req: Request, status: u16, body: &Value) {
    let resp = Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(json_header());
    let _ = req.respond(resp);
}

fn reply_err(req: Request, e: &ApiError) {
    if e.status() >= 500 {
        log::warn!(target: LOG, "{} {} -> {} {}", req.method(), req.url(), e.status(), e.message);
    }
    reply(req, e.status(), &e.body());
}

/// Query string pairs, percent-decoded.
fn query(url: &str) -> Vec<(String, String)> {
    let Some((_, q)) = url.split_once('?') else {
        return Vec::new();
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

fn id_of(seg: &str, what: &str) -> Result<i64, ApiError> {
    seg.parse::<i64>()
        .map_err(|_| ApiError::invalid(format!("{what} id {seg:?} is not a number")))
}

fn authorized(core: &Core, req: &Request) -> bool {
    let token = &core.cfg.server.token;
    if token.is_empty() {
        return true;
    }
    let expected = format!("Bearer {token}");
    req.headers().iter().any(|h| {
        h.field.equiv("Authorization") && {
            let got = h.value.as_str().as_bytes();
            // Constant-time compare: do not leak the token's prefix through timing.
            got.len() == expected.len()
                && got
                    .iter()
                    .zip(expected.as_bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }
    })
}

fn read_body(core: &Core, req: &mut Request) -> Result<Vec<u8>, ApiError> {
    let limit = core.cfg.server.max_body_bytes;
    if req.body_length().is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(format!(
            "request body over the {limit}-byte limit"
        )));
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::invalid(format!("cannot read request body: {e}")))?;
    if body.len() > limit {
        return Err(ApiError::too_large(format!(
            "request body over the {limit}-byte limit"
        )));
    }
    Ok(body)
}

fn handle(core: &Arc<Core>, mut req: Request) {
    let url = req.url().to_owned();
    let path = url
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    if path == "/healthz" {
        let ok = core.store.ping().is_ok();
        let body = json!({"status": if ok { "ok" } else { "store unavailable" }, "store": core.store.describe()});
        return reply(req, if ok { 200 } else { 503 }, &body);
    }
    if (path == "/metrics" || path.starts_with("/api/")) && !authorized(core, &req) {
        return reply_err(
            req,
            &ApiError::unauthenticated(
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            ),
        );
    }
    if path == "/metrics" {
        let text = core.metrics_text();
        let h =
            Header::from_bytes("Content-Type", "text/plain; version=0.0.4").expect("static header");
        let _ = req.respond(Response::from_string(text).with_header(h));
        return;
    }
    let q = query(&url);
    // Follow streams leave the worker pool: they last as long as the execution.
    if method == Method::Get
        && segs.len() == 5
        && segs[..3] == ["api", "v1", "executions"]
        && segs[4] == "logs"
    {
        return logs(core, req, segs[3], &q);
    }
    let res = route(core, &method, &segs, &q, &mut req);
    match res {
        Ok((status, body)) => reply(req, status, &body),
        Err(e) => reply_err(req, &e),
    }
}

fn route(
    core: &Core,
    method: &Method,
    segs: &[&str],
    q: &[(String, String)],
    req: &mut Request,
) -> Result<(u16, Value), ApiError> {
    if segs.len() < 3 || segs[0] != "api" || segs[1] != "v1" {
        return Err(ApiError::not_found(format!(
            "no route {}; the API lives under /api/v1/",
            req.url()
        )));
    }
    let not_allowed = || ApiError {
        code: "method_not_allowed",
        message: format!("{method} is not allowed on {}", req.url()),
    };
    match (segs[2], &segs[3..]) {
        ("tasks", []) => match method {
            Method::Post => {
                let body = read_body(core, req)?;
                let spec = TaskSpec::parse(&body, &core.paths())?;
                let (c, all) = core.submit(spec)?;
                let mut body = json!({"task_id": c.task_id, "execution_id": c.execution_id});
                if all.len() > 1 {
                    body["execution_ids"] = json!(all);
                }
                Ok((if c.existed { 200 } else { 201 }, body))
            }
            Method::Get => {
                let limit = num::<u32>(q, "limit")?.unwrap_or(50).clamp(1, 500);
                let cursor = num::<i64>(q, "cursor")?.map(TaskId);
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
                Method::Get => {
                    let t = core
                        .store
                        .get_task(id)?
                        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
                    Ok((200, t.to_json()))
                }
                Method::Delete => {
                    if core.store.delete_task(id, crate::now_ms())? {
                        Ok((200, json!({"id": id, "deleted": true})))
                    } else {
                        Err(ApiError::not_found(format!("task {id} not found")))
                    }
                }
                _ => Err(not_allowed()),
            }
        }
        ("tasks", [id, action]) if *method == Method::Post => {
            let id = TaskId(id_of(id, "task")?);
            match *action {
                "run" => Ok((
                    201,
                    json!({"task_id": id, "execution_id": core.run_now(id)?}),
                )),
                "pause" | "resume" => {
                    if core.store.set_paused(id, *action == "pause")? {
                        Ok((200, json!({"id": id, "paused": *action == "pause"})))
                    } else {
                        Err(ApiError::not_found(format!("task {id} not found")))
                    }
                }
                _ => Err(ApiError::not_found(format!(
                    "no action {action:?} on tasks; use run, pause or resume"
                ))),
            }
        }
        ("nodes", []) if *method == Method::Get => {
            let nodes = core.nodes();
            Ok((200, json!({"items": nodes})))
        }
        ("executions", []) if *method == Method::Get => {
            let limit = num::<u32>(q, "limit")?.unwrap_or(50).clamp(1, 500);
            let cursor = num::<i64>(q, "cursor")?.map(ExecutionId);
            let task = num::<i64>(q, "task_id")?.map(TaskId);
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
                json!({"items": rows.iter().map(|e| e.to_json()).collect::<Vec<_>>(), "next_cursor": next}),
            ))
        }
        ("executions", [id]) if *method == Method::Get => {
            let id = ExecutionId(id_of(id, "execution")?);
            let e = core
                .store
                .get_execution(id)?
                .ok_or_else(|| ApiError::not_found(format!("execution {id} not found")))?;
            Ok((200, e.to_json()))
        }
        ("executions", [id, "cancel"]) if *method == Method::Post => {
            let id = ExecutionId(id_of(id, "execution")?);
            core.cancel(id).map(|v| (200, v))
        }
        ("tasks" | "executions", _) => Err(not_allowed()),
        _ => Err(ApiError::not_found(format!("no route {}", req.url()))),
    }
}

/// `GET /api/v1/executions/{id}/logs?after_seq=N&follow=true`: JSON lines; with follow the
/// response is chunked and ends when the execution does.
fn logs(core: &Arc<Core>, req: Request, id: &str, q: &[(String, String)]) {
    let parsed = (|| {
        let id = ExecutionId(id_of(id, "execution")?);
        let after = num::<i64>(q, "after_seq")?.unwrap_or(0);
        let follow = matches!(param(q, "follow"), Some("true" | "1"));
        core.store
            .get_execution(id)?
            .ok_or_else(|| ApiError::not_found(format!("execution {id} not found")))?;
        Ok::<_, ApiError>((id, after, follow))
    })();
    let (id, after, follow) = match parsed {
        Ok(p) => p,
        Err(e) => return reply_err(req, &e),
    };
    if !follow {
        return match core.store.logs_after(id, after, 100_000) {
            Ok(rows) => {
                let body: String = rows.iter().map(|r| line(r) + "\n").collect();
                let h = Header::from_bytes("Content-Type", "application/x-ndjson")
                    .expect("static header");
                let _ = req.respond(Response::from_string(body).with_header(h));
            }
            Err(e) => reply_err(req, &e.into()),
        };
    }
    let max = core.cfg.server.max_log_followers;
    if core.followers.fetch_add(1, Ordering::SeqCst) >= max {
        core.followers.fetch_sub(1, Ordering::SeqCst);
        return reply_err(
            req,
            &ApiError::unavailable(format!("too many log followers (max {max}); retry later")),
        );
    }
    let core2 = core.clone();
    let spawned = std::thread::Builder::new()
        .name("http-follow".into())
        .spawn(move || {
            if let Err(e) = stream_logs(&core2, req, id, after) {
                log::debug!(target: LOG, "execution={id} log follower gone: {e}");
            }
            core2.followers.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        core.followers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes the chunked response by hand: tiny_http's own encoder buffers 8 KiB before sending,
/// which would hold back a slow script's lines. Each batch of chunks is flushed at once.
fn stream_logs(core: &Core, req: Request, id: ExecutionId, mut after: i64) -> std::io::Result<()> {
    let mut w = req.into_writer();
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\
          Cache-Control: no-store\r\nConnection: close\r\n\r\n",
    )?;
    w.flush()?;
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
        let rows = core
            .store
            .logs_after(id, after, 1_000)
            .map_err(std::io::Error::other)?;
        buf.clear();
        for r in &rows {
            buf.push_str(&line(r));
            buf.push('\n');
            after = r.seq;
        }
        if !buf.is_empty() {
            write!(w, "{:x}\r\n{buf}\r\n", buf.len())?;
            w.flush()?;
        }
        if rows.is_empty() {
            if finished || core.stopping() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

fn line(r: &crate::store::LogRow) -> String {
    json!({"seq": r.seq, "attempt": r.attempt, "stream": r.stream, "data": r.data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let q = query("/x?name=a%20b+c&limit=5&x=%zz");
        assert_eq!(param(&q, "name"), Some("a b c"));
        assert_eq!(param(&q, "limit"), Some("5"));
        assert_eq!(param(&q, "x"), Some("%zz"));
    }
}
