//! The executor's service (Execute, Cancel), handed to sync code through `ExecutorHandler`,
//! and the blocking client the scheduler's push path calls it with.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::dispatch_from_pb;
use super::pb;
use super::runtime::{authed, channel, serve, token_check, Runtime, ServerHandle};
use crate::delivery::Dispatch;
use crate::model::{Attempt, ExecutionId};

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
