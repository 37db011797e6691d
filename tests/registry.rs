//! The etcd registry against a real etcd: registration on a lease, the scheduler's watched
//! node table, lease expiry of a dead node, and etcd restarts.

mod support;

use std::time::{Duration, Instant};

use etask::model::{DeliveryPath, NodeRole};
use etask::registry::etcd::Etcd;
use etask::registry::{NodeInfo, NodeTable, Registration};

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        role: NodeRole::Executor,
        pool: "core".into(),
        address: Some("127.0.0.1:1".into()),
        path: DeliveryPath::Push,
        handlers: vec!["shell".into()],
        capacity: 8,
        running: 0,
        version: "test".into(),
        started_at: 1,
        containment: Some("hybrid".into()),
    }
}

/// Registers `node(id)` with a lease of `ttl` seconds and nothing running.
fn register(url: &str, id: &str, ttl: u64) -> Registration {
    Registration::start(
        Etcd::new(url),
        "/etask/".into(),
        node(id),
        ttl,
        Box::new(|| 0),
    )
    .unwrap()
}

fn wait_until(what: &str, within: Duration, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ids(t: &NodeTable) -> Vec<String> {
    t.nodes().into_iter().map(|n| n.id).collect()
}

#[test]
fn registered_node_appears_updates_and_leaves_on_stop() {
    let etcd = support::EtcdServer::start("reg");
    let table = NodeTable::start(Etcd::new(&etcd.url), "/etask/".into()).unwrap();
    wait_until("table synced", Duration::from_secs(15), || table.synced());
    let running = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let r = running.clone();
    let reg = Registration::start(
        Etcd::new(&etcd.url),
        "/etask/".into(),
        node("n1"),
        3,
        Box::new(move || r.load(std::sync::atomic::Ordering::SeqCst)),
    )
    .unwrap();
    wait_until("n1 visible", Duration::from_secs(5), || {
        ids(&table) == ["n1"]
    });
    running.store(5, std::sync::atomic::Ordering::SeqCst);
    wait_until("running refreshed", Duration::from_secs(5), || {
        table.nodes().first().is_some_and(|n| n.running == 5)
    });
    reg.stop();
    wait_until("n1 gone after revoke", Duration::from_secs(3), || {
        ids(&table).is_empty()
    });
}

#[test]
fn a_node_that_stops_heartbeating_expires_with_its_lease() {
    let etcd = support::EtcdServer::start("expire");
    let table = NodeTable::start(Etcd::new(&etcd.url), "/etask/".into()).unwrap();
    // A node that died without revoking: its key is on a 2 s lease nobody refreshes.
    let raw = Etcd::new(&etcd.url);
    let lease = raw.grant(2).unwrap();
    raw.put(
        &node("dead").key("/etask/"),
        &serde_json::to_vec(&node("dead")).unwrap(),
        Some(lease),
    )
    .unwrap();
    wait_until("dead node visible", Duration::from_secs(5), || {
        ids(&table) == ["dead"]
    });
    let t0 = Instant::now();
    wait_until("dead node expired", Duration::from_secs(10), || {
        ids(&table).is_empty()
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "removed before its lease could expire"
    );
}

#[test]
fn etcd_restart_keeps_nodes_registered_and_the_table_watching() {
    let mut etcd = support::EtcdServer::start("restart");
    let table = NodeTable::start(Etcd::new(&etcd.url), "/etask/".into()).unwrap();
    let _a = register(&etcd.url, "a", 3);
    wait_until("a visible", Duration::from_secs(5), || ids(&table) == ["a"]);
    etcd.kill();
    std::thread::sleep(Duration::from_secs(4)); // longer than the lease TTL
    etcd.restart();
    let _b = register(&etcd.url, "b", 3);
    // The table re-watched after the broken stream and sees the new node; the old one
    // re-registered (or kept its lease) and is still listed.
    wait_until("a and b after restart", Duration::from_secs(15), || {
        ids(&table) == ["a", "b"]
    });
}

#[test]
fn a_wiped_etcd_gets_every_node_back() {
    let mut etcd = support::EtcdServer::start("wipe");
    let table = NodeTable::start(Etcd::new(&etcd.url), "/etask/".into()).unwrap();
    let _a = register(&etcd.url, "a", 2);
    wait_until("a visible", Duration::from_secs(5), || ids(&table) == ["a"]);
    etcd.kill();
    std::fs::remove_dir_all(etcd.dir.join("data")).unwrap();
    etcd.restart();
    // A new, empty etcd: the lease is unknown, so the node registers again, and the table's
    // revision went backwards, so it resyncs.
    let raw = Etcd::new(&etcd.url);
    wait_until("a re-registered in etcd", Duration::from_secs(15), || {
        raw.range("/etask/nodes/")
            .map(|(k, _)| k.len() == 1)
            .unwrap_or(false)
    });
    wait_until("a in the table", Duration::from_secs(15), || {
        ids(&table) == ["a"]
    });
}
