//! The HTTP/1.1 transport of the intake: hyper on a small tokio runtime of its own. This is one
//! of the two network transport modules allowed to use tokio (the other is `delivery/grpc/`);
//! everything it hands out is sync: requests go to a fixed set of named worker threads over a
//! bounded crossbeam channel, and a streamed response is written by a plain thread through a
//! [`Sink`].
//!
//! Why not tiny_http (the design card's choice): measured against tiny_http 0.12, one request
//! with `Content-Length: 10000000000000` aborted the process (it allocates the declared size),
//! connections that sent nothing held every worker forever (no read timeouts), one EMFILE
//! stopped its accept loop for good, and a header line without an end was buffered without
//! limit. Owning its listener cannot fix what happens inside its parser, so the intake is served
//! by hyper, whose limits are configurable, on the runtime model already used by gRPC.
//!
//! Limits (all in [`Limits`]): a request's head must arrive within `head_timeout` (this also
//! closes idle keep-alive connections), its head is at most `max_head_bytes` and
//! `max_headers` lines, its body at most `max_body_bytes` and read within `body_timeout`; at
//! most `max_connections` are open at once (further clients wait in the kernel's backlog); a
//! failed `accept` (EMFILE, ENFILE, ENOBUFS) is logged and retried after a pause, never fatal.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming};

const LOG: &str = "etask::http";

/// Bounds on every phase of a request. Units are in the names.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The request line and headers must arrive within this; idle keep-alive connections are
    /// closed after it too.
    pub head_timeout: Duration,
    /// The whole body must arrive within this (from the end of the head).
    pub body_timeout: Duration,
    /// Largest request head (request line + headers), bytes; hyper's minimum is 8192.
    pub max_head_bytes: usize,
    /// Most header lines in a request.
    pub max_headers: usize,
    /// Largest body, bytes; a larger declared `Content-Length` is refused before any is read.
    pub max_body_bytes: usize,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Sync worker threads that run the handler.
    pub workers: usize,
    /// Requests waiting for a worker; more are answered 503 at once.
    pub queue: usize,
    /// Serve HTTPS with this (`crate::trust::tls::server_config`); None = plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The head of a request, as the handler sees it before any body is read.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// The path of the request target, exactly as sent (not decoded, not normalised).
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    pub peer: SocketAddr,
}

impl Head {
    /// The value of the first header named `name` (case-insensitive), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// What a handler answers.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Body,
}

pub enum Body {
    Bytes(Vec<u8>),
    /// A streamed (chunked) body: the function runs on a thread of its own and writes through
    /// the sink until it returns or the client is gone.
    Stream(Box<dyn FnOnce(Sink) + Send>),
}

/// The sync side of the intake.
pub trait Handler: Send + Sync + 'static {
    /// Decides on the head alone (authorisation, routing of a body-less error) before any body
    /// is read: `Err` is answered as it is and the body is never read.
    fn admit(&self, head: &Head) -> Result<(), Response>;
    /// Answers an admitted request. Runs on a worker thread; may block on the store.
    fn handle(&self, head: Head, body: Vec<u8>) -> Response;
    /// An error the transport itself answers (413, 408, 503, 500), in the API's error shape.
    fn error(&self, code: crate::model::ErrorCode, message: &str) -> Response;
}

/// Writes a streamed response body from a plain thread.
pub struct Sink {
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

/// The client is gone (or the server stops): stop writing.
#[derive(Debug)]
pub struct Closed;

impl Sink {
    /// Sends one piece of the body; blocks while the client is slower than the writer.
    ///
    /// # Errors
    /// [`Closed`] once the client closed the connection or the server is stopping.
    pub fn send(&self, data: Vec<u8>) -> Result<(), Closed> {
        self.tx.blocking_send(Bytes::from(data)).map_err(|_| Closed)
    }

    /// True once nobody will read what is sent.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A streamed body fed by a [`Sink`].
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

type OutBody = http_body_util::Either<http_body_util::Full<Bytes>, ChannelBody>;

struct Job {
    head: Head,
    body: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

/// A worker's answer as the async side writes it.
enum Reply {
    Full(u16, &'static str, Vec<u8>),
    Stream(u16, &'static str, tokio::sync::mpsc::Receiver<Bytes>),
}

/// A running HTTP server. [`Server::stop`] stops accepting, closes open connections, joins
/// the worker threads and the stream writers (which end when their sink reports `Closed` or
/// their own stop condition holds).
pub struct Server {
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    streams: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Binds `addr` and starts serving `handler`.
    ///
    /// # Errors
    /// The runtime, the socket or a thread could not be created.
    pub fn start(
        addr: SocketAddr,
        limits: Limits,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<Server> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("http-io")
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(limits.queue.max(1));
        let streams: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut workers = Vec::new();
        for i in 0..limits.workers.max(1) {
            let (rx, h, st) = (jobs_rx.clone(), handler.clone(), streams.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("http-{i}"))
                    .spawn(move || worker(&rx, h.as_ref(), &st))?,
            );
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            limits,
            handler,
            jobs: jobs_tx.clone(),
        });
        rt.spawn(accept_loop(listener, shared, stop_rx));
        Ok(Server {
            addr,
            rt: Some(rt),
            stop: Some(stop_tx),
            jobs: Some(jobs_tx),
            workers,
            streams,
        })
    }

    /// Stops serving and waits for the threads (see the type's doc).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        // Dropping the runtime drops every connection and so every stream's receiver: their
        // writers see `Closed` and end.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let streams = std::mem::take(&mut *self.streams.lock().unwrap_or_else(|p| p.into_inner()));
        for s in streams {
            let _ = s.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Shared {
    limits: Limits,
    handler: Arc<dyn Handler>,
    jobs: Sender<Job>,
}

fn worker(jobs: &Receiver<Job>, handler: &dyn Handler, streams: &Mutex<Vec<JoinHandle<()>>>) {
    while let Ok(job) = jobs.recv() {
        let Job { head, body, reply } = job;
        let what = format!("{} {}", head.method, head.path);
        // A bug in one handler must not take a worker down with it.
        let resp =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(head, body)))
                .unwrap_or_else(|_| {
                    log::error!(target: LOG, "handler panicked on {what}; answered 500");
                    handler.error(
                        crate::model::ErrorCode::Internal,
                        "internal error (logged by the server)",
                    )
                });
        let _ = reply.send(into_reply(resp, handler, streams));
    }
}

/// Starts the writer thread of a streamed response.
fn into_reply(
    resp: Response,
    handler: &dyn Handler,
    streams: &Mutex<Vec<JoinHandle<()>>>,
) -> Reply {
    let f = match resp.body {
        Body::Bytes(b) => return Reply::Full(resp.status, resp.content_type, b),
        Body::Stream(f) => f,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("http-follow".into())
        .spawn(move || f(Sink { tx }));
    match spawned {
        Ok(h) => {
            let mut all = streams.lock().unwrap_or_else(|p| p.into_inner());
            // Keep the list short: writers that ended are joined as new ones start.
            let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *all)
                .into_iter()
                .partition(JoinHandle::is_finished);
            *all = live;
            all.push(h);
            drop(all);
            for d in done {
                let _ = d.join();
            }
            Reply::Stream(resp.status, resp.content_type, rx)
        }
        Err(e) => {
            log::error!(target: LOG, "cannot start a stream writer: {e}");
            let r = handler.error(
                crate::model::ErrorCode::Unavailable,
                "cannot start a stream; retry later",
            );
            match r.body {
                Body::Bytes(b) => Reply::Full(r.status, r.content_type, b),
                Body::Stream(_) => Reply::Full(503, "text/plain", b"unavailable".to_vec()),
            }
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(
        shared.limits.max_connections.max(1),
    ));
    let mut last_error_log: Option<Instant> = None;
    loop {
        // Wait for a free connection slot first: past the cap, clients wait in the backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS and friends pass: log (at most every 10 s) and retry
                // after a pause instead of giving the listener up.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    log::error!(target: LOG, "accept failed: {e}; retrying (raise the open-files limit if this repeats)");
                    last_error_log = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match shared.limits.tls.clone() {
                None => serve_conn(hyper_util::rt::TokioIo::new(stream), shared, peer, stop).await,
                Some(cfg) => {
                    // The handshake is bounded like a request head: a client that connects
                    // and says nothing (or speaks plain HTTP) holds its slot no longer.
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    let hs =
                        tokio::time::timeout(shared.limits.head_timeout, acceptor.accept(stream))
                            .await;
                    match hs {
                        Ok(Ok(tls)) => {
                            serve_conn(hyper_util::rt::TokioIo::new(tls), shared, peer, stop).await
                        }
                        Ok(Err(e)) => {
                            log::debug!(target: LOG, "peer={peer} TLS handshake failed: {e}")
                        }
                        Err(_) => log::debug!(target: LOG, "peer={peer} TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one connection (plain or TLS) until it closes or the server stops.
async fn serve_conn<I>(
    io: I,
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(shared.limits.head_timeout)
        .max_buf_size(shared.limits.max_head_bytes.max(8192))
        .max_headers(shared.limits.max_headers)
        .keep_alive(true);
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(serve(shared, req, peer).await) }
    });
    let conn = b.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {}
    }
}

fn full(status: u16, content_type: &str, body: Vec<u8>) -> hyper::Response<OutBody> {
    let mut r = hyper::Response::new(http_body_util::Either::Left(http_body_util::Full::new(
        Bytes::from(body),
    )));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn respond(r: Response) -> hyper::Response<OutBody> {
    match r.body {
        Body::Bytes(b) => full(r.status, r.content_type, b),
        // Streams come only from workers (see `into_reply`); a handler's `admit`/`error`
        // answer is always whole.
        Body::Stream(_) => full(500, "text/plain", b"internal error".to_vec()),
    }
}

/// One request: admit on the head, read the body within its limits, hand it to a worker.
async fn serve(
    shared: Arc<Shared>,
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
) -> hyper::Response<OutBody> {
    let h = &shared.handler;
    let lim = &shared.limits;
    let (parts, body) = req.into_parts();
    let head = Head {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        peer,
    };
    if let Err(r) = h.admit(&head) {
        return close(respond(r));
    }
    // A body over the limit is never kept. Up to DRAIN_FACTOR times the limit it is read and
    // dropped before the 413, so a client still sending gets the answer rather than a reset
    // connection; a declared length beyond that (`Content-Length: 10000000000000`) is answered
    // at once, before a byte of it is read or allocated.
    let too_large = || {
        let msg = format!("request body over the {}-byte limit", lim.max_body_bytes);
        close(respond(
            h.error(crate::model::ErrorCode::PayloadTooLarge, &msg),
        ))
    };
    let drain_cap = (lim.max_body_bytes as u64).saturating_mul(DRAIN_FACTOR);
    let declared = body.size_hint().lower();
    if declared > drain_cap {
        return too_large();
    }
    let read = read_body(body, lim.max_body_bytes, drain_cap);
    let body = match tokio::time::timeout(lim.body_timeout, read).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return too_large(),
        Ok(Err(e)) => {
            let msg = format!("cannot read the request body: {e}");
            return close(respond(
                h.error(crate::model::ErrorCode::InvalidArgument, &msg),
            ));
        }
        Err(_) => {
            let msg = format!(
                "request body not received within {} s",
                lim.body_timeout.as_secs()
            );
            return close(respond(
                h.error(crate::model::ErrorCode::RequestTimeout, &msg),
            ));
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    match shared.jobs.try_send(Job {
        head,
        body,
        reply: tx,
    }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return respond(h.error(
                crate::model::ErrorCode::Unavailable,
                "the server is busy; retry later",
            ));
        }
        Err(TrySendError::Disconnected(_)) => {
            return close(respond(h.error(
                crate::model::ErrorCode::Unavailable,
                "the server is stopping",
            )));
        }
    }
    match rx.await {
        Ok(Reply::Full(status, ct, b)) => full(status, ct, b),
        Ok(Reply::Stream(status, ct, rx)) => {
            let mut r = hyper::Response::new(http_body_util::Either::Right(ChannelBody(rx)));
            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
            if let Ok(v) = hyper::header::HeaderValue::from_str(ct) {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(_) => close(respond(h.error(
            crate::model::ErrorCode::Unavailable,
            "the server is stopping",
        ))),
    }
}

/// How much of a body over the limit is read and dropped before answering 413, as a multiple
/// of the limit.
const DRAIN_FACTOR: u64 = 4;

/// Reads a body: `Some(bytes)` within `max` bytes; `None` when it is larger (what follows is
/// read and dropped up to `drain_cap` bytes in all, so the client finishes sending).
async fn read_body(
    mut body: Incoming,
    max: usize,
    drain_cap: u64,
) -> Result<Option<Vec<u8>>, hyper::Error> {
    let mut buf: Vec<u8> = Vec::new();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > drain_cap {
            return Ok(None);
        }
        if seen <= max as u64 {
            buf.extend_from_slice(&data);
        }
    }
    Ok((seen <= max as u64).then_some(buf))
}

/// Asks the client to close the connection after this answer (its body may be unread).
fn close(mut r: hyper::Response<OutBody>) -> hyper::Response<OutBody> {
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}
