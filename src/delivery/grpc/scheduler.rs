//! The scheduler's gRPC side: the service executors Report to and Pull from (Report feeds the
//! scheduler's ingest channel; Pull waits on the core's `PullSource`), the server that also
//! carries the task API, and the blocking client executors use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use tonic::{Request, Response, Status};

use super::convert::{dispatch_to_pb, event_from_pb};
use super::pb;
use super::runtime::{authed, channel, serve, token_check, GrpcError, Runtime, ServerHandle};
use super::tasks::{TasksSlot, TasksSvc};
use crate::delivery::PullSource;
use crate::model::{Attempt, ExecutionId};
use crate::runner::RunEvent;

/// Filled in once the scheduler core exists (the gRPC server starts before it).
pub type PullSlot = Arc<std::sync::OnceLock<Arc<dyn PullSource>>>;

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

pub struct SchedulerClient {
    rt: Arc<Runtime>,
    inner: pb::scheduler_client::SchedulerClient<tonic::transport::Channel>,
    token: Option<String>,
}

impl SchedulerClient {
    /// A client of the scheduler at `url` (connects on first use).
    ///
    /// # Errors
    /// A bad URL, or https without a CA.
    pub fn new(rt: &Arc<Runtime>, url: &str, token: &str) -> Result<SchedulerClient, GrpcError> {
        Ok(SchedulerClient {
            rt: rt.clone(),
            inner: pb::scheduler_client::SchedulerClient::new(channel(rt, url)?),
            token: (!token.is_empty()).then(|| token.to_owned()),
        })
    }
    /// Long-polls for work (the scheduler answers when some is there or the wait is over).
    ///
    /// # Errors
    /// `Call` when the call failed.
    pub fn pull(&self, req: pb::PullRequest) -> Result<Vec<pb::Dispatch>, GrpcError> {
        let mut c = self.inner.clone();
        self.rt
            .rt
            .block_on(c.pull(authed(req, &self.token)))
            .map(|r| r.into_inner().dispatches)
            .map_err(GrpcError::from)
    }
    /// Sends run events; returns how many the scheduler took.
    ///
    /// # Errors
    /// `Call` when the call failed.
    pub fn report(&self, batch: pb::ReportBatch) -> Result<u32, GrpcError> {
        let mut c = self.inner.clone();
        self.rt
            .rt
            .block_on(c.report(authed(batch, &self.token)))
            .map(|r| r.into_inner().accepted)
            .map_err(GrpcError::from)
    }
}
