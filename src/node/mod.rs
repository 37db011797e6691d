//! Node roles that are processes of their own: wiring of a delivery transport, the process
//! pool and the registry. `executor` = a gRPC node (push or pull); `agent` = a Kafka node.

pub mod agent;
pub mod executor;
pub mod spool;

/// A node role could not start or keep its state (spool, journal); the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NodeError(pub String);

/// Back to its message, for callers that still carry errors as text.
impl From<NodeError> for String {
    fn from(e: NodeError) -> String {
        e.0
    }
}
