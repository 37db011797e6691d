//! The task API for gRPC callers (Submit, GetExecution, Cancel): the service, which hands each
//! call to the scheduler core's `TaskApi` on a blocking thread, and its blocking client.

use std::sync::Arc;

use serde_json::Value;
use tonic::{Request, Response, Status};

use super::pb;
use super::runtime::{authed, channel, GrpcError, Runtime};
use crate::delivery::TaskApi;
use crate::model::ErrorCode;
use crate::scheduler::api::ApiError;

pub type TasksSlot = Arc<std::sync::OnceLock<Arc<dyn TaskApi>>>;

/// The gRPC status of an API error: the one mapping from `ErrorCode` to gRPC codes.
fn api_status(e: ApiError) -> Status {
    let msg = e.message;
    match e.code {
        ErrorCode::InvalidArgument | ErrorCode::PayloadTooLarge | ErrorCode::HeadersTooLarge => {
            Status::invalid_argument(msg)
        }
        ErrorCode::NotFound => Status::not_found(msg),
        ErrorCode::Conflict => Status::failed_precondition(msg),
        ErrorCode::Unavailable => Status::unavailable(msg),
        ErrorCode::Unauthenticated => Status::unauthenticated(msg),
        ErrorCode::RequestTimeout => Status::deadline_exceeded(msg),
        ErrorCode::MethodNotAllowed => Status::unimplemented(msg),
        ErrorCode::Internal => Status::internal(msg),
    }
}

pub(super) struct TasksSvc {
    pub(super) api: TasksSlot,
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
    /// A client of the task API at `url` (connects on first use).
    ///
    /// # Errors
    /// A bad URL, or https without a CA.
    pub fn new(rt: &Arc<Runtime>, url: &str, token: &str) -> Result<TasksClient, GrpcError> {
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
