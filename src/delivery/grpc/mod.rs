//! The gRPC transport (tonic). The only place with a tokio runtime besides the HTTP transport
//! (docs/design.md containment rule): `runtime.rs` owns it (servers, TLS, token check, client
//! channels); `convert.rs` maps the wire to the core's types; `executor.rs`, `scheduler.rs` and
//! `tasks.rs` hold one service each with its blocking client; `push.rs` is the push `Delivery`.
//! Servers hand requests to sync code through plain callbacks and crossbeam channels.

mod convert;
mod executor;
pub mod push;
mod runtime;
mod scheduler;
mod tasks;

#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("etask.v1");
}

pub use convert::{
    dispatch_from_pb, dispatch_to_pb, event_from_pb, event_to_pb, program_from_pb, program_to_pb,
    InvalidMessage,
};
pub use executor::{serve_executor, ExecutorClient, ExecutorHandler, NotTaken};
pub use runtime::{GrpcError, Runtime, ServerHandle, Tls, TokenCheck, DEFAULT_MAX_CONNECTIONS};
pub use scheduler::{serve_scheduler, PullSlot, SchedulerClient};
pub use tasks::{TasksClient, TasksSlot};
