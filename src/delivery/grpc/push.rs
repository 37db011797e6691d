//! The PUSH path, scheduler side: picks a live executor of the task's pool from the registry
//! (round robin) and calls its `Execute`; a refused or unreachable node → the next candidate;
//! none → the execution goes back to the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{dispatch_to_pb, ExecutorClient, Runtime};
use crate::delivery::{Delivery, Dispatch, Refused};
use crate::model::{Attempt, DeliveryPath, ExecutionId, Strategy};
use crate::registry::{NodeInfo, NodeTable};
use crate::trust::{Refusal, Signer, GRPC_TTL_MS};

pub struct Push {
    rt: Arc<Runtime>,
    table: Arc<NodeTable>,
    next: AtomicUsize,
    clients: Mutex<HashMap<String, Arc<ExecutorClient>>>,
    /// Sent to executors (their `executor.token`).
    token: String,
    /// Where each dispatched attempt went, for Cancel.
    placed: Mutex<HashMap<(ExecutionId, Attempt), String>>,
    /// Signs each dispatch for the executor it is sent to, and each cancel.
    signer: Arc<Signer>,
}

impl Push {
    pub fn new(
        rt: Arc<Runtime>,
        table: Arc<NodeTable>,
        token: String,
        signer: Arc<Signer>,
    ) -> Push {
        Push {
            rt,
            table,
            token,
            signer,
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
        let c = Arc::new(
            ExecutorClient::new(
                &self.rt,
                &format!("{}://{addr}", self.rt.scheme()),
                &self.token,
            )
            .map_err(|e| e.to_string())?,
        );
        cs.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Live push executors, of one pool when given.
    fn candidates(&self, pool: Option<&str>) -> Vec<NodeInfo> {
        self.table
            .nodes()
            .into_iter()
            .filter(|n| n.path == DeliveryPath::Push && pool.is_none_or(|p| n.pool == p))
            .collect()
    }
}

impl Delivery for Push {
    fn path(&self) -> DeliveryPath {
        DeliveryPath::Push
    }

    fn node(&self) -> &str {
        // Claims are recorded under the path; the executor actually chosen is reported back
        // with the dispatch (see `placed`).
        DeliveryPath::Push.as_str()
    }

    fn free_slots(&self) -> usize {
        let nodes = self.candidates(None);
        nodes
            .iter()
            .map(|n| n.capacity.saturating_sub(n.running) as usize)
            .sum::<usize>()
            .max(usize::from(!nodes.is_empty()))
    }

    fn load(&self) -> (u32, u32) {
        let nodes = self.candidates(None);
        (
            nodes.iter().map(|n| n.running).sum(),
            nodes.iter().map(|n| n.capacity).sum(),
        )
    }

    fn dispatch(&self, d: Dispatch, placed: &dyn Fn(&str)) -> Result<(), Refused> {
        let pool = d.pool.clone().unwrap_or_else(|| "default".into());
        let nodes = self.candidates(Some(&pool));
        if nodes.is_empty() {
            return Err(Refused::Busy(format!(
                "no live push executor in pool {pool:?}"
            )));
        }
        let nodes = order(nodes, &d.route, self.next.fetch_add(1, Ordering::Relaxed));
        if nodes.is_empty() {
            return Err(Refused::Busy(format!(
                "pinned node {:?} is not alive in pool {pool:?}",
                d.route.node
            )));
        }
        let mut why = Vec::new();
        let mut untrusted = false;
        for n in &nodes {
            placed(&n.id);
            // Signed for this executor only: a copy sent elsewhere is refused there.
            let mut signed = d.clone();
            signed.sign(&self.signer, Some(&n.id), GRPC_TTL_MS);
            let msg = dispatch_to_pb(&signed, crate::now_ms());
            match self
                .client(n)
                .and_then(|c| c.execute(msg).map_err(|e| e.to_string()))
            {
                Ok(ack) if ack.accepted => {
                    self.placed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((d.execution_id, d.attempt), n.id.clone());
                    return Ok(());
                }
                Ok(ack) => {
                    untrusted |= Refusal::is_refusal_text(&ack.reason);
                    why.push(format!("{}: {}", n.id, ack.reason))
                }
                Err(e) => why.push(format!("{}: {e}", n.id)),
            }
        }
        if untrusted {
            // Not a busy node: a dispatch nodes do not trust fails (and is retried per the
            // task's policy) with the reason, instead of going round the queue for ever.
            return Err(Refused::Rejected(why.join("; ")));
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
            let stamp = self.signer.stamp_cancel(
                id.0,
                attempt.0,
                Some(&node),
                crate::now_ms(),
                GRPC_TTL_MS,
            );
            if let Err(e) = self.client(&n).and_then(|c| {
                c.cancel_stamped(id, attempt, &stamp)
                    .map_err(|e| e.to_string())
            }) {
                log::warn!(target: "etask::grpc", "execution={id} attempt={attempt} cancel on {node} failed: {e}");
            }
        }
    }
}

/// FNV-1a: a stable hash for rendezvous routing (no randomized std hasher).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The order in which to try the live nodes of a pool: the first is the strategy's choice,
/// the rest are failover candidates.
pub fn order(mut nodes: Vec<NodeInfo>, route: &crate::delivery::Route, rr: usize) -> Vec<NodeInfo> {
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    match route.strategy.unwrap_or(Strategy::RoundRobin) {
        Strategy::Pinned => nodes.retain(|n| Some(&n.id) == route.node.as_ref()),
        Strategy::Random => {
            let k = if nodes.is_empty() {
                0
            } else {
                fastrand::usize(..nodes.len())
            };
            nodes.rotate_left(k);
        }
        Strategy::LeastBusy => nodes.sort_by(|a, b| {
            // Lowest load first (running / capacity), compared without floats.
            (u64::from(a.running) * u64::from(b.capacity.max(1)))
                .cmp(&(u64::from(b.running) * u64::from(a.capacity.max(1))))
                .then(a.id.cmp(&b.id))
        }),
        Strategy::ConsistentHash => {
            // Rendezvous hashing: a node's death moves only the keys it held.
            let key = route.key.as_deref().unwrap_or("");
            nodes.sort_by_key(|n| std::cmp::Reverse(fnv(&[key, &n.id])));
        }
        _ => {
            if !nodes.is_empty() {
                let k = rr % nodes.len();
                nodes.rotate_left(k);
            }
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Route;
    use crate::model::NodeRole;

    fn n(id: &str, running: u32, capacity: u32) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role: NodeRole::Executor,
            pool: "p".into(),
            address: None,
            path: DeliveryPath::Push,
            handlers: vec![],
            capacity,
            running,
            version: String::new(),
            started_at: 0,
            containment: None,
        }
    }

    fn ids(v: Vec<NodeInfo>) -> Vec<String> {
        v.into_iter().map(|n| n.id).collect()
    }

    fn route(strategy: Strategy, node: Option<&str>, key: Option<&str>) -> Route {
        Route {
            strategy: Some(strategy),
            node: node.map(Into::into),
            key: key.map(Into::into),
        }
    }

    #[test]
    fn round_robin_rotates_and_keeps_the_rest_for_failover() {
        let nodes = vec![n("b", 0, 1), n("a", 0, 1), n("c", 0, 1)];
        assert_eq!(
            ids(order(nodes.clone(), &Route::default(), 0)),
            ["a", "b", "c"]
        );
        assert_eq!(ids(order(nodes, &Route::default(), 4)), ["b", "c", "a"]);
    }

    #[test]
    fn pinned_least_busy_and_consistent_hash() {
        let nodes = vec![n("a", 3, 4), n("b", 1, 4), n("c", 2, 8)];
        assert_eq!(
            ids(order(
                nodes.clone(),
                &route(Strategy::Pinned, Some("c"), None),
                0
            )),
            ["c"]
        );
        assert!(order(nodes.clone(), &route(Strategy::Pinned, Some("zz"), None), 0).is_empty());
        assert_eq!(
            ids(order(
                nodes.clone(),
                &route(Strategy::LeastBusy, None, None),
                0
            )),
            ["b", "c", "a"]
        );
        let first = |ns: Vec<NodeInfo>, k: &str| {
            order(ns, &route(Strategy::ConsistentHash, None, Some(k)), 0)[0]
                .id
                .clone()
        };
        let chosen: Vec<String> = (0..50)
            .map(|i| first(nodes.clone(), &format!("host-{i}")))
            .collect();
        assert!(
            ["a", "b", "c"]
                .iter()
                .all(|x| chosen.iter().any(|c| c == x)),
            "keys spread over nodes"
        );
        // Same key, same node; removing another node does not move it.
        for (i, c) in chosen.iter().enumerate() {
            let others: Vec<NodeInfo> = nodes
                .iter()
                .filter(|x| x.id == *c || x.id != "a" || c == "a")
                .cloned()
                .collect();
            assert_eq!(&first(others, &format!("host-{i}")), c);
        }
    }
}
