//! The in-process path: dispatches go straight into this process's pool and its events go
//! straight to the scheduler's report channel.

use crossbeam_channel::Sender;

use super::{Delivery, Dispatch, Refused};
use crate::model::{Attempt, ExecutionId};
use crate::runner::{Pool, RunEvent, RunKey, SubmitError};

pub struct Local {
    pool: Pool,
    node: String,
    reports: Sender<RunEvent>,
}

impl Local {
    pub fn new(pool: Pool, node: String, reports: Sender<RunEvent>) -> Local {
        Local {
            pool,
            node,
            reports,
        }
    }

    /// Stops the pool: running scripts are cancelled and their trees killed. Works while the
    /// scheduler still holds this delivery (it does until the process ends).
    pub fn shutdown(&self) {
        self.pool.shutdown();
    }
}

impl Delivery for Local {
    fn path(&self) -> &'static str {
        "local"
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn free_slots(&self) -> usize {
        self.pool
            .max_concurrent()
            .saturating_sub(self.pool.in_flight())
    }

    fn load(&self) -> (u32, u32) {
        (
            self.pool.running() as u32,
            self.pool.max_concurrent() as u32,
        )
    }

    fn dispatch(&self, d: Dispatch, _placed: &dyn Fn(&str)) -> Result<(), Refused> {
        let req = d.into_run_request();
        self.pool
            .submit(req, self.reports.clone())
            .map_err(|e| match e {
                SubmitError::Invalid(e) => Refused::Rejected(e.to_string()),
                e @ (SubmitError::Full { .. }
                | SubmitError::Stopped
                | SubmitError::Unrecorded(_)) => Refused::Busy(e.to_string()),
            })
    }

    fn cancel(&self, execution: ExecutionId, attempt: Attempt) {
        self.pool.cancel(RunKey { execution, attempt });
    }

    fn containment(&self) -> Option<String> {
        Some(self.pool.containment().into())
    }
}
