//! Shared test helpers: temp dirs and a fresh MariaDB database per test.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

static N: AtomicUsize = AtomicUsize::new(0);

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "etask-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Server URL of the MariaDB the tests use (scripts/test.sh starts it), without a database.
pub fn mysql_server() -> String {
    std::env::var("ETASK_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/".into())
}

/// Creates an empty database and returns its URL.
pub fn mysql_db(tag: &str) -> String {
    use mysql::prelude::Queryable;
    let server = mysql_server();
    let db = format!(
        "etask_t_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&server).expect("ETASK_TEST_MYSQL url"))
        .unwrap_or_else(|e| {
            panic!("MariaDB at {server} is needed for this test (scripts/test.sh starts it): {e}")
        });
    conn.query_drop(format!("DROP DATABASE IF EXISTS {db}"))
        .expect("drop db");
    conn.query_drop(format!("CREATE DATABASE {db} CHARACTER SET utf8mb4"))
        .expect("create db");
    format!("{}{db}", server.trim_end_matches('/').to_owned() + "/")
}
