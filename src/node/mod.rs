//! Node roles that are processes of their own: wiring of a delivery transport, the process
//! pool and the registry. `executor` = a gRPC node (push or pull); `agent` = a Kafka node.

pub mod agent;
pub mod executor;
pub mod spool;
