//! The PUSH path, scheduler side: picks a live executor of the task's pool from the registry
//! (round robin) and calls its `Execute`; a refused or unreachable node → the next candidate;
//! none → the execution goes back to the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{dispatch_to_pb, ExecutorClient, Runtime};
use crate::delivery::{Delivery, Dispatch, Refused};
use crate::model::{Attempt, ExecutionId};
use crate::registry::{NodeInfo, NodeTable};

pub struct Push {
    rt: Arc<Runtime>,
    table: Arc<NodeTable>,
    next: AtomicUsize,
    clients: Mutex<HashMap<String, Arc<ExecutorClient>>>,
    /// Sent to executors (their `executor.token`).
    token: String,
    /// Where each dispatched attempt went, for Cancel.
    placed: Mutex<HashMap<(ExecutionId, Attempt), String>>,
}

impl Push {
    pub fn new(rt: Arc<Runtime>, table: Arc<NodeTable>, token: String) -> Push {
        Push {
            rt,
            table,
            token,
            next: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
            placed: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, n: &NodeInfo) -> Result<Arc<ExecutorClient>, String> {
        let addr = n
            .address
            .as_deref()
            .ok_or_else(|| format!("node {} has no address", n.id))?;
        let mut cs = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cs.get(addr) {
            return Ok(c.clone());
        }
        let c = Arc::new(ExecutorClient::new(
            &self.rt,
            &format!("http://{addr}"),
            &self.token,
        )?);
        cs.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    fn candidates(&self, pool: &str) -> Vec<NodeInfo> {
        self.table
            .nodes()
            .into_iter()
            .filter(|n| n.path == "push" && n.pool == pool)
            .collect()
    }
}

impl Delivery for Push {
    fn path(&self) -> &'static str {
        "push"
    }

    fn node(&self) -> &str {
        // Claims are recorded under the path; the executor actually chosen is reported back
        // with the dispatch (see `placed`).
        "push"
    }

    fn free_slots(&self) -> usize {
        let nodes: Vec<NodeInfo> = self
            .table
            .nodes()
            .into_iter()
            .filter(|n| n.path == "push")
            .collect();
        nodes
            .iter()
            .map(|n| n.capacity.saturating_sub(n.running) as usize)
            .sum::<usize>()
            .max(usize::from(!nodes.is_empty()))
    }

    fn load(&self) -> (u32, u32) {
        let nodes = self.candidates_all();
        (
            nodes.iter().map(|n| n.running).sum(),
            nodes.iter().map(|n| n.capacity).sum(),
        )
    }

    fn dispatch(&self, d: Dispatch, placed: &dyn Fn(&str)) -> Result<(), Refused> {
        let pool = d.pool.clone().unwrap_or_else(|| "default".into());
        let nodes = self.candidates(&pool);
        if nodes.is_empty() {
            return Err(Refused::Busy(format!(
                "no live push executor in pool {pool:?}"
            )));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let msg = dispatch_to_pb(&d, crate::now_ms());
        let mut why = Vec::new();
        for i in 0..nodes.len() {
            let n = &nodes[(start + i) % nodes.len()];
            placed(&n.id);
            match self.client(n).and_then(|c| c.execute(msg.clone())) {
                Ok(ack) if ack.accepted => {
                    self.placed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((d.execution_id, d.attempt), n.id.clone());
                    return Ok(());
                }
                Ok(ack) => why.push(format!("{}: {}", n.id, ack.reason)),
                Err(e) => why.push(format!("{}: {e}", n.id)),
            }
        }
        Err(Refused::Busy(why.join("; ")))
    }

    fn cancel(&self, id: ExecutionId, attempt: Attempt) {
        let node = self
            .placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(id, attempt));
        let Some(node) = node else { return };
        if let Some(n) = self.table.nodes().into_iter().find(|n| n.id == node) {
            if let Err(e) = self.client(&n).and_then(|c| c.cancel(id, attempt)) {
                log::warn!(target: "etask::grpc", "execution={id} attempt={attempt} cancel on {node} failed: {e}");
            }
        }
    }
}

impl Push {
    fn candidates_all(&self) -> Vec<NodeInfo> {
        self.table
            .nodes()
            .into_iter()
            .filter(|n| n.path == "push")
            .collect()
    }
}
