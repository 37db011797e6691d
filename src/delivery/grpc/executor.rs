//! The executor's service (Execute, Cancel), handed to sync code through `ExecutorHandler`,
//! and the blocking client the scheduler's push path calls it with.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::dispatch_from_pb;
use super::pb;
use super::runtime::{authed, channel, serve, token_check, GrpcError, Runtime, ServerHandle};
use crate::delivery::Dispatch;
use crate::model::{Attempt, ExecutionId};

// ---------------------------------------------------------------------------------------------
// Executor side: Execute / Cancel are handed to sync code.

/// What an executor does with what the scheduler sends it (implemented by the node role).
pub trait ExecutorHandler: Send + Sync + 'static {
    /// Checks (signature, expiry, binding, replay) and runs a dispatch.
    ///
    /// # Errors
    /// Why the dispatch was not taken (sent back in the `Ack`).
    fn execute(&self, d: Dispatch) -> Result<(), NotTaken>;
    /// Cancels an attempt if the cancel's stamp checks out; true when the attempt was known.
    ///
    /// # Errors
    /// Why the cancel was ignored (sent back as the call's error).
    fn cancel(
        &self,
        id: ExecutionId,
        attempt: Attempt,
        stamp: &crate::trust::Stamp,
    ) -> Result<bool, NotTaken>;
}

/// Why an executor did not take a dispatch or a cancel, in words the sender is shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotTaken(pub String);

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
                    reason: reason.0,
                },
            },
            Err(reason) => pb::Ack {
                accepted: false,
                reason: reason.0,
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
            .map_err(|e| Status::permission_denied(e.0))?;
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

pub struct ExecutorClient {
    rt: Arc<Runtime>,
    inner: pb::executor_client::ExecutorClient<tonic::transport::Channel>,
    token: Option<String>,
}

impl ExecutorClient {
    /// A client of the executor at `url` (connects on first use).
    ///
    /// # Errors
    /// A bad URL, or https without a CA.
    pub fn new(rt: &Arc<Runtime>, url: &str, token: &str) -> Result<ExecutorClient, GrpcError> {
        Ok(ExecutorClient {
            rt: rt.clone(),
            inner: pb::executor_client::ExecutorClient::new(channel(rt, url)?),
            token: (!token.is_empty()).then(|| token.to_owned()),
        })
    }
    /// Hands the executor a dispatch; its `Ack` says whether it took it.
    ///
    /// # Errors
    /// `Call` when the call failed (unreachable, refused token).
    pub fn execute(&self, d: pb::Dispatch) -> Result<pb::Ack, GrpcError> {
        let mut c = self.inner.clone();
        self.rt
            .rt
            .block_on(c.execute(authed(d, &self.token)))
            .map(Response::into_inner)
            .map_err(GrpcError::from)
    }
    /// An unsigned cancel (accepted only by executors that trust no key).
    ///
    /// # Errors
    /// The call failed or the executor refused it.
    pub fn cancel(&self, id: ExecutionId, attempt: Attempt) -> Result<bool, GrpcError> {
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
    ) -> Result<bool, GrpcError> {
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
            .map_err(GrpcError::from)
    }
}
