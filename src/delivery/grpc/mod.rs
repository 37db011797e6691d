//! The gRPC transport (tonic). The only place with a tokio runtime (docs/design.md containment
//! rule): `Runtime` owns it; servers hand requests to sync code through plain callbacks and
//! crossbeam channels, and sync callers use the blocking clients below.

pub mod push;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::delivery::{Dispatch, PullSource, TaskApi};
use crate::model::{Attempt, ExecutionId, TaskId};
use crate::runner::{
    ArgvStyle, LogChunk, Program, ProgramKind, RunEvent, RunKey, ShellKind, Stream, Variable,
};

#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("etask.v1");
}

/// The one tokio runtime of the process, used only by gRPC servers and clients.
pub struct Runtime {
    rt: tokio::runtime::Runtime,
    tls: Tls,
    /// Most connections each server of this runtime keeps open at once.
    max_connections: usize,
}

/// Most connections a gRPC server keeps open at once unless set (`with_max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Optional TLS for every gRPC server and client of the process (PEM contents).
#[derive(Clone, Default)]
pub struct Tls {
    /// Certificate chain and private key this process serves with.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// CA that peers' certificates must chain to (clients dialing https:// URLs).
    pub ca: Option<Vec<u8>>,
    /// Mutual TLS: servers require a client certificate chaining to `ca`; clients present
    /// `identity`.
    pub client_auth: bool,
}

impl Tls {
    /// Reads the PEM files named in the config (`[tls] cert`, `key`, `ca`).
    pub fn from_files(cert: &str, key: &str, ca: &str) -> Result<Tls, String> {
        let read = |p: &str| std::fs::read(p).map_err(|e| format!("cannot read TLS file {p}: {e}"));
        let identity = match (cert.is_empty(), key.is_empty()) {
            (true, true) => None,
            (false, false) => Some((read(cert)?, read(key)?)),
            _ => return Err("tls.cert and tls.key must be set together".into()),
        };
        let ca = if ca.is_empty() { None } else { Some(read(ca)?) };
        Ok(Tls {
            identity,
            ca,
            client_auth: false,
        })
    }
}

impl Runtime {
    pub fn new() -> std::io::Result<Arc<Runtime>> {
        Runtime::with_tls(Tls::default())
    }

    pub fn with_tls(tls: Tls) -> std::io::Result<Arc<Runtime>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("grpc")
            .enable_all()
            .build()?;
        Ok(Arc::new(Runtime {
            rt,
            tls,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }))
    }

    /// The URL scheme clients use: https when a CA is configured.
    pub fn scheme(&self) -> &'static str {
        if self.tls.ca.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// A running gRPC server; `stop` shuts it down and waits.
pub struct ServerHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    rt: Arc<Runtime>,
    pub addr: SocketAddr,
}

impl ServerHandle {
    pub fn stop(mut self) {
        self.halt();
    }
    fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = self.rt.rt.block_on(d);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Checks `authorization: Bearer <token>` metadata when a token is configured.
#[derive(Clone)]
pub struct TokenCheck(Option<Arc<str>>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(t) = &self.0 else { return Ok(req) };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let want = format!("Bearer {t}");
        // Constant-time compare, as on the HTTP side.
        let same = got.len() == want.len()
            && got
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token (authorization: Bearer <token>)",
            ))
        }
    }
}

fn token_check(token: &str) -> TokenCheck {
    TokenCheck((!token.is_empty()).then(|| Arc::from(token)))
}

/// A request with the bearer token attached, when there is one.
fn authed<T>(msg: T, token: &Option<String>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = format!("Bearer {t}").parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

/// A connection that holds one of the server's connection slots until it closes.
struct CappedConn {
    io: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for CappedConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for CappedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts at most `max` connections at once (more wait in the listen backlog), and survives
/// accept errors (EMFILE: a pause, then on): a flood of idle connections, which needs no token
/// to open, can then neither take every file descriptor of the node nor stop the listener.
fn capped_incoming(
    rt: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    max: usize,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<CappedConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    rt.spawn(async move {
        let mut last_log: Option<std::time::Instant> = None;
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let conn = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            match conn {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    if tx.send(Ok(CappedConn { io, _slot: slot })).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        log::error!(target: "etask::grpc", "accept failed: {e}; retrying");
                        last_log = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn serve(
    rt: &Arc<Runtime>,
    addr: SocketAddr,
    router: tonic::service::Routes,
) -> std::io::Result<ServerHandle> {
    let listener = rt.rt.block_on(tokio::net::TcpListener::bind(addr))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = capped_incoming(
        &rt.rt,
        listener,
        crate::connection_budget(rt.max_connections),
    );
    // Dead peers are found by pings; a connection's requests are bounded per connection.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .concurrency_limit_per_connection(256);
    if let Some((cert, key)) = &rt.tls.identity {
        let id = tonic::transport::Identity::from_pem(cert, key);
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(id);
        if let (true, Some(ca)) = (rt.tls.client_auth, &rt.tls.ca) {
            // Mutual TLS: a peer without a certificate from `ca` fails the handshake.
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(cfg)
            .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
    }
    let done = rt.rt.spawn(async move {
        let res = builder
            .add_routes(router)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = res {
            log::error!(target: "etask::grpc", "gRPC server stopped: {e}");
        }
    });
    Ok(ServerHandle {
        stop: Some(tx),
        done: Some(done),
        rt: rt.clone(),
        addr,
    })
}

// ---------------------------------------------------------------------------------------------
// Conversions between the wire and the sync core.

pub fn program_to_pb(p: &Program) -> pb::Program {
    pb::Program {
        kind: match p.kind {
            ProgramKind::Shell => "shell",
            ProgramKind::Python => "python",
            ProgramKind::Exec => "exec",
        }
        .into(),
        code: p.code.clone(),
        argv: p.argv.clone().unwrap_or_default(),
        shell: match p.shell {
            Some(ShellKind::Bash) => "bash".into(),
            _ => String::new(),
        },
        args: p.args.clone(),
        env: p.env.clone().into_iter().collect(),
        secret_env: p.secret_env.clone().into_iter().collect(),
        stdin: p.stdin.clone(),
        workdir: p.workdir.clone(),
        params_json: p
            .params
            .as_ref()
            .map(|m| Value::Object(m.clone()).to_string()),
        variables: p
            .variables
            .iter()
            .map(|v| pb::Variable {
                key: v.key.clone(),
                value: v.value.clone(),
                secret: v.secret,
            })
            .collect(),
        argv_style: match p.argv_style {
            ArgvStyle::Files => String::new(),
            ArgvStyle::Legacy => "legacy".into(),
        },
        limits: p.limits.map(|l| pb::Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_millicores: l.cpu_millicores,
        }),
    }
}

pub fn program_from_pb(p: pb::Program) -> Result<Program, String> {
    let kind = match p.kind.as_str() {
        "shell" => ProgramKind::Shell,
        "python" => ProgramKind::Python,
        "exec" => ProgramKind::Exec,
        k => return Err(format!("unknown program kind {k:?}")),
    };
    let prog = Program {
        kind,
        code: p.code,
        argv: (!p.argv.is_empty()).then_some(p.argv),
        shell: (p.shell == "bash").then_some(ShellKind::Bash),
        args: p.args,
        env: p.env.into_iter().collect::<BTreeMap<_, _>>(),
        secret_env: p.secret_env.into_iter().collect::<BTreeMap<_, _>>(),
        stdin: p.stdin,
        workdir: p.workdir,
        params: match p.params_json.as_deref() {
            None => None,
            Some(j) => match serde_json::from_str::<Value>(j) {
                Ok(Value::Object(m)) => Some(m),
                _ => return Err("program params must be a JSON object".into()),
            },
        },
        variables: p
            .variables
            .into_iter()
            .map(|v| Variable {
                key: v.key,
                value: v.value,
                secret: v.secret,
            })
            .collect(),
        argv_style: match p.argv_style.as_str() {
            "" | "files" => ArgvStyle::Files,
            "legacy" => ArgvStyle::Legacy,
            s => return Err(format!("unknown argv_style {s:?}")),
        },
        limits: p.limits.map(|l| crate::runner::Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_millicores: l.cpu_millicores,
        }),
    };
    prog.validate().map_err(|e| e.0)?;
    Ok(prog)
}

/// A dispatch as the gRPC wire carries it. An unstamped dispatch (tests, tools) is given
/// `now` and the gRPC TTL; a stamped one keeps its stamp, which its signature covers.
pub fn dispatch_to_pb(d: &Dispatch, now: i64) -> pb::Dispatch {
    let (issued_at, expires_at) = if d.stamp.issued_at > 0 {
        (d.stamp.issued_at, d.stamp.expires_at)
    } else {
        (now, now + crate::trust::GRPC_TTL_MS)
    };
    pb::Dispatch {
        execution_id: d.execution_id.0,
        attempt: d.attempt.0,
        task_id: d.task_id.0,
        program: Some(program_to_pb(&d.program)),
        timeout_ms: d.timeout.map_or(0, |t| t.as_millis() as u64),
        shard_index: d.shard_index,
        shard_total: d.shard_total,
        issued_at,
        expires_at,
        signature: d.stamp.sig.clone().unwrap_or_default().into_bytes(),
        pool: d.pool.clone().unwrap_or_default(),
        node: d.stamp.node.clone().unwrap_or_default(),
    }
}

/// A dispatch from the gRPC wire, with its stamp (unverified: the node checks it).
///
/// # Errors
/// No program, or a program that does not validate.
pub fn dispatch_from_pb(d: pb::Dispatch) -> Result<Dispatch, String> {
    let program = program_from_pb(d.program.ok_or("dispatch without a program")?)?;
    Ok(Dispatch {
        execution_id: ExecutionId(d.execution_id),
        task_id: TaskId(d.task_id),
        attempt: Attempt(d.attempt),
        program,
        timeout: (d.timeout_ms > 0).then(|| Duration::from_millis(d.timeout_ms)),
        shard_index: d.shard_index,
        shard_total: d.shard_total.max(1),
        pool: (!d.pool.is_empty()).then_some(d.pool),
        route: Default::default(),
        stamp: crate::trust::Stamp {
            node: (!d.node.is_empty()).then_some(d.node),
            issued_at: d.issued_at,
            expires_at: d.expires_at,
            sig: (!d.signature.is_empty())
                .then(|| String::from_utf8_lossy(&d.signature).into_owned()),
        },
    })
}

/// A pool event as a report item (what an executor sends back).
pub fn event_to_pb(ev: &RunEvent) -> pb::ReportItem {
    use pb::report_item::Kind;
    let key = ev.key();
    let kind = match ev {
        RunEvent::Started { .. } => Kind::Started(true),
        RunEvent::Log { chunk, .. } => Kind::Log(pb::LogChunk {
            seq: chunk.seq,
            stream: chunk.stream.as_str().into(),
            data: chunk.data.clone(),
        }),
        RunEvent::Finished { outcome, .. } => {
            let o = crate::delivery::OutcomeWire::from(outcome);
            Kind::Finished(pb::Outcome {
                status: o.status,
                exit_code: o.exit_code,
                signal: o.signal,
                result_json: o
                    .result
                    .map(|m| Value::Object(m).to_string())
                    .unwrap_or_default(),
                result_error: o.result_error,
                error: o.error,
                spawn_failed: o.spawn_failed,
                resources_json: o
                    .resources
                    .and_then(|r| serde_json::to_string(&r).ok())
                    .unwrap_or_default(),
            })
        }
    };
    pb::ReportItem {
        execution_id: key.execution.0,
        attempt: key.attempt.0,
        kind: Some(kind),
    }
}

/// A report item back into the pool event the scheduler's ingest understands.
pub fn event_from_pb(item: pb::ReportItem) -> Option<RunEvent> {
    use pb::report_item::Kind;
    let key = RunKey {
        execution: ExecutionId(item.execution_id),
        attempt: Attempt(item.attempt),
    };
    Some(match item.kind? {
        Kind::Started(_) => RunEvent::Started { key, pid: 0 },
        // Not an event of a run: the Report handler deals with it before this.
        Kind::NotStarted(_) => return None,
        Kind::Log(l) => RunEvent::Log {
            key,
            chunk: LogChunk {
                seq: l.seq,
                stream: if l.stream == "stderr" {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                },
                data: l.data,
            },
        },
        Kind::Finished(o) => RunEvent::Finished {
            key,
            outcome: crate::delivery::OutcomeWire {
                status: o.status,
                exit_code: o.exit_code,
                signal: o.signal,
                result: serde_json::from_str::<Value>(&o.result_json)
                    .ok()
                    .and_then(|v| v.as_object().cloned()),
                result_error: o.result_error,
                error: o.error,
                spawn_failed: o.spawn_failed,
                // Optional on the wire: an older node sends none.
                resources: serde_json::from_str(&o.resources_json).ok(),
            }
            .into_outcome(),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Executor side: Execute / Cancel are handed to sync code.

/// What an executor does with what the scheduler sends it (implemented by the node role).
pub trait ExecutorHandler: Send + Sync + 'static {
    /// Checks (signature, expiry, binding, replay) and runs a dispatch; Err = the reason it
    /// was refused.
    fn execute(&self, d: Dispatch) -> Result<(), String>;
    /// Cancels an attempt if the cancel's stamp checks out; Err = why it was ignored.
    fn cancel(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        stamp: &crate::trust::Stamp,
    ) -> Result<bool, String>;
}

struct ExecutorSvc {
    handler: Arc<dyn ExecutorHandler>,
}

#[tonic::async_trait]
impl pb::executor_server::Executor for ExecutorSvc {
    async fn execute(&self, req: Request<pb::Dispatch>) -> Result<Response<pb::Ack>, Status> {
        let d = req.into_inner();
        let ack = match dispatch_from_pb(d) {
            Ok(d) => match self.handler.execute(d) {
                Ok(()) => pb::Ack {
                    accepted: true,
                    reason: String::new(),
                },
                Err(reason) => pb::Ack {
                    accepted: false,
                    reason,
                },
            },
            Err(reason) => pb::Ack {
                accepted: false,
                reason,
            },
        };
        Ok(Response::new(ack))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelReply>, Status> {
        let c = req.into_inner();
        let stamp = crate::trust::Stamp {
            node: (!c.node.is_empty()).then_some(c.node),
            issued_at: c.issued_at,
            expires_at: c.expires_at,
            sig: (!c.signature.is_empty()).then_some(c.signature),
        };
        let known = self
            .handler
            .cancel(ExecutionId(c.execution_id), Attempt(c.attempt), &stamp)
            .map_err(Status::permission_denied)?;
        Ok(Response::new(pb::CancelReply { known }))
    }
}

pub fn serve_executor(
    rt: &Arc<Runtime>,
    addr: SocketAddr,
    handler: Arc<dyn ExecutorHandler>,
    token: &str,
) -> std::io::Result<ServerHandle> {
    let svc = pb::executor_server::ExecutorServer::with_interceptor(
        ExecutorSvc { handler },
        token_check(token),
    );
    serve(rt, addr, tonic::service::Routes::new(svc))
}

// ---------------------------------------------------------------------------------------------
// Scheduler side: Report feeds the scheduler's ingest channel.

/// Filled in once the scheduler core exists (the gRPC server starts before it).
pub type PullSlot = Arc<std::sync::OnceLock<Arc<dyn PullSource>>>;
pub type TasksSlot = Arc<std::sync::OnceLock<Arc<dyn TaskApi>>>;

fn api_status((code, msg): (&'static str, String)) -> Status {
    match code {
        "invalid_argument" | "payload_too_large" => Status::invalid_argument(msg),
        "not_found" => Status::not_found(msg),
        "conflict" => Status::failed_precondition(msg),
        "unavailable" => Status::unavailable(msg),
        "unauthenticated" => Status::unauthenticated(msg),
        _ => Status::internal(msg),
    }
}

struct TasksSvc {
    api: TasksSlot,
}

impl TasksSvc {
    fn api(&self) -> Result<Arc<dyn TaskApi>, Status> {
        self.api
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("scheduler starting"))
    }
}

#[tonic::async_trait]
impl pb::tasks_server::Tasks for TasksSvc {
    async fn submit_task(
        &self,
        req: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskReply>, Status> {
        let api = self.api()?;
        let body = req.into_inner().task_json;
        let s = tokio::task::spawn_blocking(move || api.submit_json(body.as_bytes()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(api_status)?;
        Ok(Response::new(pb::SubmitTaskReply {
            task_id: s.task_id.0,
            execution_id: s.execution_id.map(|e| e.0),
            existed: s.existed,
            execution_ids: s.executions.into_iter().map(|e| e.0).collect(),
        }))
    }

    async fn get_execution(
        &self,
        req: Request<pb::ExecutionRequest>,
    ) -> Result<Response<pb::ExecutionReply>, Status> {
        let api = self.api()?;
        let id = req.into_inner().execution_id;
        let json = tokio::task::spawn_blocking(move || api.execution_json(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(api_status)?;
        Ok(Response::new(pb::ExecutionReply {
            execution_json: json,
        }))
    }

    async fn cancel_execution(
        &self,
        req: Request<pb::ExecutionRequest>,
    ) -> Result<Response<pb::ExecutionReply>, Status> {
        let api = self.api()?;
        let id = req.into_inner().execution_id;
        let json = tokio::task::spawn_blocking(move || api.cancel_json(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(api_status)?;
        Ok(Response::new(pb::ExecutionReply {
            execution_json: json,
        }))
    }
}

/// Blocking client of the task API (for tests and tools).
pub struct TasksClient {
    rt: Arc<Runtime>,
    inner: pb::tasks_client::TasksClient<tonic::transport::Channel>,
    token: Option<String>,
}

impl TasksClient {
    pub fn new(rt: &Arc<Runtime>, url: &str, token: &str) -> Result<TasksClient, String> {
        Ok(TasksClient {
            rt: rt.clone(),
            inner: pb::tasks_client::TasksClient::new(channel(rt, url)?),
            token: (!token.is_empty()).then(|| token.to_owned()),
        })
    }
    pub fn submit(&self, task_json: &str) -> Result<pb::SubmitTaskReply, Status> {
        let mut c = self.inner.clone();
        let req = pb::SubmitTaskRequest {
            task_json: task_json.to_owned(),
        };
        self.rt
            .rt
            .block_on(c.submit_task(authed(req, &self.token)))
            .map(Response::into_inner)
    }
    pub fn get(&self, id: i64) -> Result<Value, Status> {
        let mut c = self.inner.clone();
        let r = self.rt.rt.block_on(c.get_execution(authed(
            pb::ExecutionRequest { execution_id: id },
            &self.token,
        )))?;
        serde_json::from_str(&r.into_inner().execution_json)
            .map_err(|e| Status::internal(e.to_string()))
    }
    pub fn cancel(&self, id: i64) -> Result<Value, Status> {
        let mut c = self.inner.clone();
        let r = self.rt.rt.block_on(c.cancel_execution(authed(
            pb::ExecutionRequest { execution_id: id },
            &self.token,
        )))?;
        serde_json::from_str(&r.into_inner().execution_json)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// Most items in one `Report` call (executors send at most 256).
const MAX_REPORT_ITEMS: usize = 4096;

struct SchedulerSvc {
    reports: Sender<RunEvent>,
    pull: PullSlot,
}

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for SchedulerSvc {
    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<pb::PullReply>, Status> {
        let r = req.into_inner();
        let Some(src) = self.pull.get().cloned() else {
            return Err(Status::unavailable("scheduler starting"));
        };
        // The wait happens on a blocking thread: the sync core waits on a condvar.
        let wait = Duration::from_millis(u64::from(r.wait_ms.min(30_000)));
        let list =
            tokio::task::spawn_blocking(move || src.pull(&r.node_id, &r.pool, r.free_slots, wait))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        let now = crate::now_ms();
        Ok(Response::new(pb::PullReply {
            dispatches: list.iter().map(|d| dispatch_to_pb(d, now)).collect(),
        }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportBatch>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let batch = req.into_inner();
        let Some(src) = self.pull.get().cloned() else {
            return Err(Status::unavailable("scheduler starting"));
        };
        if batch.items.len() > MAX_REPORT_ITEMS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPORT_ITEMS} items per report batch"
            )));
        }
        // Only the node that holds an attempt may report on it, and only while it runs: a
        // report for anything else (another node's attempt, an unknown or finished execution)
        // is acknowledged and dropped, so it changes nothing and stores nothing.
        let keys: Vec<(ExecutionId, Attempt)> = batch
            .items
            .iter()
            .map(|i| (ExecutionId(i.execution_id), Attempt(i.attempt)))
            .collect();
        let node = batch.node_id.clone();
        let src2 = src.clone();
        let held = tokio::task::spawn_blocking(move || src2.held(&node, &keys))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut n = 0;
        let (mut late, mut foreign) = (0, 0);
        for (item, h) in batch.items.into_iter().zip(held) {
            match h {
                crate::delivery::Held::Running => {}
                crate::delivery::Held::Finished => {
                    late += 1;
                    continue;
                }
                crate::delivery::Held::Not => {
                    foreign += 1;
                    continue;
                }
            }
            if let Some(pb::report_item::Kind::NotStarted(why)) = &item.kind {
                let (src, node, why) = (src.clone(), batch.node_id.clone(), why.clone());
                let key = (ExecutionId(item.execution_id), Attempt(item.attempt));
                tokio::task::spawn_blocking(move || src.unstarted(&node, key.0, key.1, &why))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                n += 1;
                continue;
            }
            if let Some(ev) = event_from_pb(item) {
                self.reports
                    .send(ev)
                    .map_err(|_| Status::unavailable("scheduler stopping"))?;
            }
            n += 1;
        }
        if late > 0 {
            log::debug!(target: "etask::grpc", "node={:?} report: {late} item(s) for attempts that have ended, dropped", batch.node_id);
        }
        if foreign > 0 {
            log::warn!(target: "etask::grpc", "node={:?} report: {foreign} item(s) dropped: not attempts this node holds", batch.node_id);
        }
        Ok(Response::new(pb::ReportAck {
            accepted: n + late + foreign,
        }))
    }
}

pub fn serve_scheduler(
    rt: &Arc<Runtime>,
    addr: SocketAddr,
    reports: Sender<RunEvent>,
    token: &str,
    pull: PullSlot,
    tasks: TasksSlot,
    max_body_bytes: usize,
) -> std::io::Result<ServerHandle> {
    use tonic::service::interceptor::InterceptedService;
    // One size limit for a task on both intakes: the HTTP body limit (plus room for the
    // message framing) instead of tonic's own 4 MiB.
    let max = max_body_bytes.saturating_add(64 << 10);
    let svc = InterceptedService::new(
        pb::scheduler_server::SchedulerServer::new(SchedulerSvc { reports, pull })
            .max_decoding_message_size(max),
        token_check(token),
    );
    let tasks = InterceptedService::new(
        pb::tasks_server::TasksServer::new(TasksSvc { api: tasks }).max_decoding_message_size(max),
        token_check(token),
    );
    serve(
        rt,
        addr,
        tonic::service::Routes::new(svc).add_service(tasks),
    )
}

// ---------------------------------------------------------------------------------------------
// Blocking clients for sync callers.

fn channel(rt: &Runtime, url: &str) -> Result<tonic::transport::Channel, String> {
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("bad gRPC address {url}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let (true, Some((cert, key))) = (rt.tls.client_auth, &rt.tls.identity) {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        match &rt.tls.ca {
            Some(ca) => tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => {
                return Err(format!(
                    "{url}: https needs tls.ca (the CA of the peer's certificate)"
                ))
            }
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| format!("TLS for {url}: {e}"))?;
    }
    // Lazy: connects on first use and reconnects by itself afterwards.
    let _guard = rt.rt.enter();
    Ok(ep.connect_lazy())
}

pub struct ExecutorClient {
    rt: Arc<Runtime>,
    inner: pb::executor_client::ExecutorClient<tonic::transport::Channel>,
    token: Option<String>,
}

impl ExecutorClient {
    pub fn new(rt: &Arc<Runtime>, url: &str, token: &str) -> Result<ExecutorClient, String> {
        Ok(ExecutorClient {
            rt: rt.clone(),
            inner: pb::executor_client::ExecutorClient::new(channel(rt, url)?),
            token: (!token.is_empty()).then(|| token.to_owned()),
        })
    }
    pub fn execute(&self, d: pb::Dispatch) -> Result<pb::Ack, String> {
        let mut c = self.inner.clone();
        self.rt
            .rt
            .block_on(c.execute(authed(d, &self.token)))
            .map(Response::into_inner)
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }
    /// An unsigned cancel (accepted only by executors that trust no key).
    ///
    /// # Errors
    /// The call failed or the executor refused it.
    pub fn cancel(&self, id: ExecutionId, attempt: Attempt) -> Result<bool, String> {
        self.cancel_stamped(id, attempt, &crate::trust::Stamp::default())
    }

    /// A cancel with its stamp (signature, validity, node).
    ///
    /// # Errors
    /// The call failed or the executor refused it (the message says why).
    pub fn cancel_stamped(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        stamp: &crate::trust::Stamp,
    ) -> Result<bool, String> {
        let mut c = self.inner.clone();
        let req = pb::CancelRequest {
            execution_id: id.0,
            attempt: attempt.0,
            issued_at: stamp.issued_at,
            expires_at: stamp.expires_at,
            signature: stamp.sig.clone().unwrap_or_default(),
            node: stamp.node.clone().unwrap_or_default(),
        };
        self.rt
            .rt
            .block_on(c.cancel(authed(req, &self.token)))
            .map(|r| r.into_inner().known)
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }
}

pub struct SchedulerClient {
    rt: Arc<Runtime>,
    inner: pb::scheduler_client::SchedulerClient<tonic::transport::Channel>,
    token: Option<String>,
}

impl SchedulerClient {
    pub fn new(rt: &Arc<Runtime>, url: &str, token: &str) -> Result<SchedulerClient, String> {
        Ok(SchedulerClient {
            rt: rt.clone(),
            inner: pb::scheduler_client::SchedulerClient::new(channel(rt, url)?),
            token: (!token.is_empty()).then(|| token.to_owned()),
        })
    }
    pub fn pull(&self, req: pb::PullRequest) -> Result<Vec<pb::Dispatch>, String> {
        let mut c = self.inner.clone();
        self.rt
            .rt
            .block_on(c.pull(authed(req, &self.token)))
            .map(|r| r.into_inner().dispatches)
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }
    pub fn report(&self, batch: pb::ReportBatch) -> Result<u32, String> {
        let mut c = self.inner.clone();
        self.rt
            .rt
            .block_on(c.report(authed(batch, &self.token)))
            .map(|r| r.into_inner().accepted)
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_inputs_of_the_reference_survive_the_wire() {
        let mut p = Program::python("print(1)");
        p.params = serde_json::from_str(r#"{"host": "h", "n": [1, 2]}"#).unwrap();
        p.variables = vec![Variable {
            key: "K".into(),
            value: "v".into(),
            secret: true,
        }];
        p.argv_style = ArgvStyle::Legacy;
        assert_eq!(program_from_pb(program_to_pb(&p)).unwrap(), p);
        let plain = Program::shell("true");
        assert_eq!(program_from_pb(program_to_pb(&plain)).unwrap(), plain);
    }

    #[test]
    fn limits_and_resources_survive_the_wire() {
        let mut p = Program::shell("true");
        p.limits = Some(crate::runner::Limits {
            memory_bytes: Some(64 << 20),
            pids: Some(50),
            cpu_millicores: None,
        });
        assert_eq!(program_from_pb(program_to_pb(&p)).unwrap(), p);
        let key = RunKey {
            execution: ExecutionId(3),
            attempt: Attempt(2),
        };
        let mut outcome = crate::runner::Outcome::not_started(crate::runner::Ending::Signaled(9));
        outcome.signal = Some(9);
        outcome.resources = Some(Box::new(crate::runner::Resources {
            containment: "hybrid".into(),
            oom_killed: true,
            limits: p.limits.unwrap_or_default(),
            ..Default::default()
        }));
        let back = event_from_pb(event_to_pb(&RunEvent::Finished {
            key,
            outcome: outcome.clone(),
        }));
        let Some(RunEvent::Finished { outcome: b, .. }) = back else {
            panic!("not a Finished event: {back:?}");
        };
        assert_eq!(b.resources, outcome.resources);
        assert!(b.error().unwrap_or_default().contains("OOM killer"));
    }
}
