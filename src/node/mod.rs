//! Node roles that are processes of their own: wiring of a delivery transport, the process
//! pool and the registry. `executor` = a gRPC node (PUSH).

pub mod executor;
