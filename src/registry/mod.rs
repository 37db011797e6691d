//! Which nodes are alive. Each node keeps `<prefix>nodes/<role>/<pool>/<node_id>` alive on an
//! etcd lease (`Registration`); schedulers watch the prefix into a live-node table
//! (`NodeTable`). Both are one thread each over the JSON gateway; neither knows about
//! scheduling or delivery.

pub mod etcd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{DeliveryPath, NodeRole};
use crate::shutdown::{Backoff, Shutdown};
use etcd::{Etcd, EtcdError, WatchEvent};

const LOG: &str = "etask::registry";

/// What a node says about itself (the value of its key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub role: NodeRole,
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub path: DeliveryPath,
    #[serde(default)]
    pub handlers: Vec<String>,
    pub capacity: u32,
    pub running: u32,
    pub version: String,
    pub started_at: i64,
    /// How the node contains its runs: "cgroup2", "hybrid", "cgroup1" or "none" (older nodes
    /// do not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<String>,
}

impl NodeInfo {
    pub fn key(&self, prefix: &str) -> String {
        format!("{prefix}nodes/{}/{}/{}", self.role, self.pool, self.id)
    }
}

/// Keeps one node's key alive: grant a lease, put the key, refresh the lease every third of
/// its TTL and the `running` count when it changes. When etcd is unreachable it keeps trying
/// with backoff; when the lease is gone (expired while etcd was away) it registers again.
pub struct Registration {
    stop: Shutdown,
    thread: Option<JoinHandle<()>>,
}

impl Registration {
    pub fn start(
        etcd: Etcd,
        prefix: String,
        info: NodeInfo,
        ttl: u64,
        running: Box<dyn Fn() -> u32 + Send>,
    ) -> std::io::Result<Registration> {
        let stop = Shutdown::new();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("registry-lease".into())
            .spawn(move || heartbeat(&etcd, &prefix, info, ttl.max(2), &*running, &s))?;
        Ok(Registration {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops refreshing and revokes the lease, so the node disappears at once.
    pub fn stop(mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn heartbeat(
    etcd: &Etcd,
    prefix: &str,
    mut info: NodeInfo,
    ttl: u64,
    running: &dyn Fn() -> u32,
    stop: &Shutdown,
) {
    let key = info.key(prefix);
    let mut lease: Option<i64> = None;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut last_ok = Instant::now();
    let tick = Duration::from_millis(ttl * 1000 / 3);
    while !stop.is_triggered() {
        info.running = running();
        let step = match lease {
            None => etcd.grant(ttl).and_then(|l| {
                let value = serde_json::to_vec(&info).unwrap_or_default();
                etcd.put(&key, &value, Some(l))?;
                log::info!(target: LOG, "node={} registered key={key} lease={l} ttl={ttl}s", info.id);
                lease = Some(l);
                Ok(())
            }),
            Some(l) => match etcd.keepalive(l) {
                Ok(true) => {
                    let value = serde_json::to_vec(&info).unwrap_or_default();
                    etcd.put(&key, &value, Some(l))
                }
                Ok(false) => {
                    log::warn!(target: LOG, "node={} lease {l} expired; registering again", info.id);
                    lease = None;
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match step {
            Ok(()) => {
                backoff.reset();
                last_ok = Instant::now();
                stop.sleep(tick);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                log::warn!(target: LOG, "node={} etcd at {}: {e}; retrying in {wait:?}", info.id, etcd.endpoint());
                if last_ok.elapsed() > Duration::from_secs(ttl) {
                    lease = None; // surely expired by now
                }
                stop.sleep(wait);
            }
        }
    }
    if let Some(l) = lease {
        let _ = etcd.revoke(l);
    }
}

/// The scheduler's live-node table: a full read of the prefix, then a watch from the next
/// revision; a broken stream re-watches from the last revision seen, a compaction (or an etcd
/// whose history went backwards) triggers a full resync.
pub struct NodeTable {
    nodes: Arc<RwLock<BTreeMap<String, NodeInfo>>>,
    synced: Arc<AtomicBool>,
    stop: Shutdown,
    thread: Option<JoinHandle<()>>,
}

impl NodeTable {
    pub fn start(etcd: Etcd, prefix: String) -> std::io::Result<NodeTable> {
        let nodes = Arc::new(RwLock::new(BTreeMap::new()));
        let (stop, synced) = (Shutdown::new(), Arc::new(AtomicBool::new(false)));
        let (n, s, y) = (nodes.clone(), stop.clone(), synced.clone());
        let thread = std::thread::Builder::new()
            .name("registry-watch".into())
            .spawn(move || watch_loop(&etcd, &prefix, &n, &s, &y))?;
        Ok(NodeTable {
            nodes,
            synced,
            stop,
            thread: Some(thread),
        })
    }

    /// Live nodes, ordered by key (role, pool, id).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether the table has read etcd at least once.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NodeTable {
    fn drop(&mut self) {
        self.halt();
    }
}

fn parse(kv: &etcd::Kv) -> Option<NodeInfo> {
    match serde_json::from_slice(&kv.value) {
        Ok(n) => Some(n),
        Err(e) => {
            log::warn!(target: LOG, "ignoring unreadable node entry {}: {e}", kv.key);
            None
        }
    }
}

fn watch_loop(
    etcd: &Etcd,
    prefix: &str,
    nodes: &RwLock<BTreeMap<String, NodeInfo>>,
    stop: &Shutdown,
    synced: &AtomicBool,
) {
    let prefix = format!("{prefix}nodes/");
    let mut rev: Option<i64> = None; // None: a full resync is due
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while !stop.is_triggered() {
        let from = match rev {
            Some(r) => r,
            None => match etcd.range(&prefix) {
                Ok((kvs, r)) => {
                    let table: BTreeMap<String, NodeInfo> = kvs
                        .iter()
                        .filter_map(|kv| Some((kv.key.clone(), parse(kv)?)))
                        .collect();
                    log::info!(target: LOG, "node table resynced: {} nodes at revision {r}", table.len());
                    *nodes.write().unwrap_or_else(|p| p.into_inner()) = table;
                    synced.store(true, Ordering::SeqCst);
                    rev = Some(r);
                    r
                }
                Err(e) => {
                    log::warn!(target: LOG, "cannot read nodes from etcd at {}: {e}", etcd.endpoint());
                    stop.sleep(backoff.next_delay());
                    continue;
                }
            },
        };
        let mut went_back = false;
        let res = etcd.watch(&prefix, from + 1, |events, r| {
            if r < from {
                went_back = true; // a different (restored or rebuilt) etcd: resync
                return false;
            }
            let mut table = nodes.write().unwrap_or_else(|p| p.into_inner());
            for ev in events {
                match ev {
                    WatchEvent::Put(kv) => {
                        if let Some(n) = parse(&kv) {
                            table.insert(kv.key, n);
                        }
                    }
                    WatchEvent::Delete(key) => {
                        table.remove(&key);
                    }
                }
            }
            rev = Some(r.max(rev.unwrap_or(0)));
            !stop.is_triggered()
        });
        match res {
            _ if went_back => rev = None,
            Ok(()) => {}
            Err(EtcdError::Compacted(c)) => {
                log::info!(target: LOG, "watch start compacted at {c}; full resync");
                rev = None;
            }
            Err(EtcdError::Idle) => backoff.reset(),
            // Stopping while the watch waited (etcd going away with us is no news).
            Err(_) if stop.is_triggered() => {}
            Err(e) => {
                log::warn!(target: LOG, "node watch broken: {e}; re-watching from revision {}", rev.unwrap_or(0));
                stop.sleep(backoff.next_delay());
            }
        }
    }
}
