//! The tokio side of gRPC: the one runtime of the process (`Runtime`), TLS, the server loop
//! with its connection cap and token check, and the channels blocking clients use. The only
//! tokio in ETask besides the HTTP transport (docs/design.md containment rule).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Status};

/// The one tokio runtime of the process, used only by gRPC servers and clients.
pub struct Runtime {
    pub(super) rt: tokio::runtime::Runtime,
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

/// What setting up a gRPC client or making a call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// The URL is not a gRPC endpoint (`http://host:port` or `https://host:port`).
    #[error("bad gRPC address {url}: {why}")]
    Address { url: String, why: String },
    /// TLS material is missing, unreadable or unusable (the message names the file or URL).
    #[error("{0}")]
    Tls(String),
    /// A call failed: the peer refused it, or could not be reached. `code` is the gRPC status
    /// code's name, `message` the peer's (or the transport's) reason.
    #[error("{code}: {message}")]
    Call { code: String, message: String },
}

impl From<Status> for GrpcError {
    fn from(s: Status) -> GrpcError {
        GrpcError::Call {
            code: s.code().to_string(),
            message: s.message().to_owned(),
        }
    }
}

impl Tls {
    /// Reads the PEM files named in the config (`[tls] cert`, `key`, `ca`).
    ///
    /// # Errors
    /// `Tls` when a file cannot be read, or only one of `cert` and `key` is given.
    pub fn from_files(cert: &str, key: &str, ca: &str) -> Result<Tls, GrpcError> {
        let read = |p: &str| {
            crate::read_bounded(std::path::Path::new(p), crate::MAX_SMALL_FILE_BYTES, true)
                .map_err(|e| GrpcError::Tls(format!("cannot read TLS file {p}: {e}")))
        };
        let identity = match (cert.is_empty(), key.is_empty()) {
            (true, true) => None,
            (false, false) => Some((read(cert)?, read(key)?)),
            _ => {
                return Err(GrpcError::Tls(
                    "tls.cert and tls.key must be set together".into(),
                ))
            }
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

pub(super) fn token_check(token: &str) -> TokenCheck {
    TokenCheck((!token.is_empty()).then(|| Arc::from(token)))
}

/// A request with the bearer token attached, when there is one.
pub(super) fn authed<T>(msg: T, token: &Option<String>) -> Request<T> {
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

pub(super) fn serve(
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

pub(super) fn channel(rt: &Runtime, url: &str) -> Result<tonic::transport::Channel, GrpcError> {
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| GrpcError::Address {
            url: url.to_owned(),
            why: e.to_string(),
        })?
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
                return Err(GrpcError::Tls(format!(
                    "{url}: https needs tls.ca (the CA of the peer's certificate)"
                )))
            }
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| GrpcError::Tls(format!("TLS for {url}: {e}")))?;
    }
    // Lazy: connects on first use and reconnects by itself afterwards.
    let _guard = rt.rt.enter();
    Ok(ep.connect_lazy())
}
