//! ETask: distributed execution of ops scripts for ECMDB. One crate, one binary (`etask`), with
//! the scheduler, the node roles and the process pool as modules; tests and benches use the
//! same code through this library.

pub mod logging;
pub mod model;
pub mod runner;
pub mod signals;
