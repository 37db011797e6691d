//! The in-process path: dispatches go straight into this process's pool and its events go
//! straight to the scheduler's report channel. Each dispatch is still signed by the scheduler
//! and checked (signature, expiry, binding, replay; sealed secrets opened) like on a remote
//! node, so `--mode all` exercises the whole trust path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use super::{Delivery, Dispatch, Refused};
use crate::model::{Attempt, DeliveryPath, ExecutionId};
use crate::runner::{Pool, RunEvent, RunKey, SubmitError};
use crate::trust::{NodeTrust, Refusal, Signer, GRPC_TTL_MS};

pub struct Local {
    pool: Pool,
    node: String,
    reports: Sender<RunEvent>,
    signer: Arc<Signer>,
    trust: NodeTrust,
    /// Attempts taken, until their dispatch expires (the replay defence of this node).
    taken: Mutex<HashMap<(ExecutionId, Attempt), i64>>,
}

impl Local {
    pub fn new(
        pool: Pool,
        node: String,
        reports: Sender<RunEvent>,
        signer: Arc<Signer>,
        trust: NodeTrust,
    ) -> Local {
        Local {
            pool,
            node,
            reports,
            signer,
            trust,
            taken: Mutex::new(HashMap::new()),
        }
    }

    /// Stops the pool: running scripts are cancelled and their trees killed. Works while the
    /// scheduler still holds this delivery (it does until the process ends).
    pub fn shutdown(&self) {
        self.pool.shutdown();
    }
}

impl Delivery for Local {
    fn path(&self) -> DeliveryPath {
        DeliveryPath::Local
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

    fn dispatch(&self, mut d: Dispatch, _placed: &dyn Fn(&str)) -> Result<(), Refused> {
        d.sign(&self.signer, Some(&self.node), GRPC_TTL_MS);
        let refuse = |r: Refusal| {
            log::warn!(target: "etask::trust", "execution={} attempt={} refused: {r}", d.execution_id, d.attempt);
            Refused::Rejected(r.to_string())
        };
        let mut checked = d.clone();
        checked
            .verify_and_open(&self.trust.verifier, &self.trust.me, &self.trust.open)
            .map_err(refuse)?;
        let key = (d.execution_id, d.attempt);
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::now_ms();
        taken.retain(|_, exp| *exp >= now);
        if taken.contains_key(&key) {
            return Err(refuse(Refusal::Replay(key.0 .0, key.1 .0)));
        }
        let req = checked.into_run_request();
        self.pool
            .submit(req, self.reports.clone())
            .map_err(|e| match e {
                SubmitError::Invalid(e) => Refused::Rejected(e.to_string()),
                e @ (SubmitError::Full { .. }
                | SubmitError::Stopped
                | SubmitError::Unrecorded(_)) => Refused::Busy(e.to_string()),
            })?;
        taken.insert(key, d.stamp.expires_at);
        Ok(())
    }

    fn cancel(&self, execution: ExecutionId, attempt: Attempt) {
        self.pool.cancel(RunKey { execution, attempt });
    }

    fn containment(&self) -> Option<String> {
        Some(self.pool.containment().into())
    }
}
