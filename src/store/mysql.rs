//! The production back end: MySQL / MariaDB through the pure-Rust `mysql` crate. Several
//! schedulers may share one database: claims and cron fires are compare-and-set updates, and
//! migrations run under `GET_LOCK('etask_migrate')`.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{
    Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, PooledConn, TxOpts,
    Value as MyValue,
};

use super::{migrations, statements, Backend, Conn, Result, StoreError, V};
use crate::shutdown::Backoff;

pub struct Mysql {
    pool: Pool,
    describe: String,
}

fn err(e: mysql::Error) -> StoreError {
    let text = format!("mysql: {}", show(&e));
    match e {
        mysql::Error::MySqlError(ref m) if m.code == 1213 || m.code == 1205 => {
            StoreError::Retry(text)
        }
        mysql::Error::MySqlError(ref m) if m.code == 1062 => StoreError::Duplicate(text),
        mysql::Error::IoError(_) | mysql::Error::DriverError(_) => StoreError::Unavailable(text),
        _ => StoreError::Internal(text),
    }
}

/// A driver error as an operator reads it: the crate's own `Display` wraps the server's
/// message in its Rust variant name (`MySqlError { ERROR 1049 … }`).
fn show(e: &mysql::Error) -> String {
    match e {
        mysql::Error::MySqlError(m) => format!("error {} ({}): {}", m.code, m.state, m.message),
        mysql::Error::DriverError(d) => d.to_string(),
        mysql::Error::IoError(io) => io.to_string(),
        e => e.to_string(),
    }
}

/// MySQL's "unknown database" error number.
const ER_BAD_DB: u16 = 1049;

fn params(p: &[V]) -> Params {
    if p.is_empty() {
        return Params::Empty;
    }
    Params::Positional(
        p.iter()
            .map(|v| match v {
                V::Null => MyValue::NULL,
                V::I(i) => MyValue::Int(*i),
                V::S(s) => MyValue::Bytes(s.as_bytes().to_vec()),
            })
            .collect(),
    )
}

fn value(v: MyValue) -> V {
    match v {
        MyValue::NULL => V::Null,
        MyValue::Int(i) => V::I(i),
        MyValue::UInt(u) => V::I(u as i64),
        MyValue::Float(f) => V::I(f as i64),
        MyValue::Double(f) => V::I(f as i64),
        MyValue::Bytes(b) => V::S(String::from_utf8_lossy(&b).into_owned()),
        other => V::S(other.as_sql(true)),
    }
}

/// The connection options of a `mysql://` URL, refused before any I/O when it has no
/// database name. The URL's host and port are used as given: the driver would otherwise switch
/// a `127.0.0.1`/`localhost` URL to the server's Unix socket (its `prefer_socket` default),
/// which is another server when several run on one host. `?prefer_socket=true` still asks for
/// that.
pub(super) fn opts(url: &str) -> Result<Opts> {
    let parsed = Opts::from_url(url).map_err(|e| StoreError::bad_url(url, Some(&e)))?;
    if parsed.get_db_name().is_none_or(str::is_empty) {
        return Err(StoreError::bad_url(url, Some(&"no database name")));
    }
    if url.contains("prefer_socket=") {
        return Ok(parsed);
    }
    Ok(OptsBuilder::from_opts(parsed).prefer_socket(false).into())
}

/// `mysql://user@host:port/db` (no password) for messages and logs.
fn describe(opts: &Opts) -> String {
    format!(
        "mysql://{}@{}:{}/{}",
        opts.get_user().unwrap_or(""),
        opts.get_ip_or_hostname(),
        opts.get_tcp_port(),
        opts.get_db_name().unwrap_or("")
    )
}

/// Creates the URL's database (utf8mb4) when it does not exist; true when it was created.
/// Only `etask migrate` calls this: a server refuses to start without its database rather
/// than create one from a mistyped URL.
pub(super) fn create_database(url: &str) -> Result<bool> {
    let opts = opts(url)?;
    let db = opts.get_db_name().unwrap_or_default().to_owned();
    let shown = describe(&opts);
    let server = OptsBuilder::from_opts(opts).db_name(None::<String>);
    let mut conn = mysql::Conn::new(server)
        .map_err(|e| StoreError::Unavailable(format!("cannot connect to {shown}: {}", show(&e))))?;
    let exists: Option<String> = conn
        .exec_first(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            (db.as_str(),),
        )
        .map_err(err)?;
    if exists.is_some() {
        return Ok(false);
    }
    // An identifier cannot be a bound parameter: quote it (a backtick is doubled).
    let quoted = db.replace('`', "``");
    conn.query_drop(format!(
        "CREATE DATABASE IF NOT EXISTS `{quoted}` CHARACTER SET utf8mb4"
    ))
    .map_err(err)?;
    Ok(true)
}

impl Mysql {
    pub fn open(url: &str) -> Result<Mysql> {
        let opts = opts(url)?;
        let describe = describe(&opts);
        // A few connections are plenty: every statement is short and the threads are few.
        let constraints = PoolConstraints::new(1, 16)
            .ok_or_else(|| StoreError::Internal("pool constraints".into()))?;
        let opts = OptsBuilder::from_opts(opts)
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        let pool = Pool::new(opts).map_err(|e| match &e {
            mysql::Error::MySqlError(m) if m.code == ER_BAD_DB => StoreError::Unavailable(format!(
                "{describe}: the database does not exist; create it with `etask migrate --store \
                 URL` (or CREATE DATABASE ... CHARACTER SET utf8mb4)"
            )),
            _ => StoreError::Unavailable(format!("cannot connect to {describe}: {}", show(&e))),
        })?;
        Ok(Mysql { pool, describe })
    }

    fn conn(&self) -> Result<PooledConn> {
        self.pool.get_conn().map_err(|e| {
            StoreError::Unavailable(format!("cannot connect to {}: {}", self.describe, show(&e)))
        })
    }
}

struct Tx<'a, 'b>(&'a mut mysql::Transaction<'b>);

impl Conn for Tx<'_, '_> {
    fn exec(&mut self, sql: &str, p: &[V]) -> Result<u64> {
        self.0.exec_drop(sql, params(p)).map_err(err)?;
        Ok(self.0.affected_rows())
    }
    fn insert(&mut self, sql: &str, p: &[V]) -> Result<i64> {
        self.0.exec_drop(sql, params(p)).map_err(err)?;
        self.0
            .last_insert_id()
            .map(|i| i as i64)
            .ok_or_else(|| StoreError::Internal("no insert id".into()))
    }
    fn query(&mut self, sql: &str, p: &[V]) -> Result<Vec<Vec<V>>> {
        let rows: Vec<mysql::Row> = self.0.exec(sql, params(p)).map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|r| r.unwrap().into_iter().map(value).collect())
            .collect())
    }
}

impl Backend for Mysql {
    fn tx(&self, f: &mut dyn FnMut(&mut dyn Conn) -> Result<()>) -> Result<()> {
        // InnoDB resolves lock cycles between concurrent schedulers by aborting one
        // transaction (1213 deadlock, 1205 lock wait timeout); the aborted one is simply run
        // again, as the server asks.
        let mut tries = 0;
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(320));
        loop {
            let mut conn = self.conn()?;
            let mut tx = conn.start_transaction(TxOpts::default()).map_err(err)?;
            let res = f(&mut Tx(&mut tx)).and_then(|()| tx.commit().map_err(err));
            match res {
                Err(StoreError::Retry(msg)) if tries < 8 => {
                    tries += 1;
                    log::debug!(target: "etask::store", "transaction retried ({msg})");
                    std::thread::sleep(backoff.next_delay());
                }
                Err(StoreError::Retry(msg)) => return Err(StoreError::Unavailable(msg)),
                other => return other,
            }
        }
    }

    fn migrate(&self) -> Result<Vec<u32>> {
        let mut conn = self.conn()?;
        let got: Option<Option<i64>> = conn
            .query_first("SELECT GET_LOCK('etask_migrate', 60)")
            .map_err(err)?;
        if got.flatten() != Some(1) {
            return Err(StoreError::Unavailable(
                "another scheduler holds the migration lock for over 60 s".into(),
            ));
        }
        let res = (|| {
            conn.query_drop(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied_at BIGINT NOT NULL) ENGINE=InnoDB",
            )
            .map_err(err)?;
            let mut applied = Vec::new();
            for (version, sql) in migrations("mysql") {
                let have: Option<i64> = conn
                    .exec_first(
                        "SELECT COUNT(*) FROM schema_migrations WHERE version = ?",
                        (version,),
                    )
                    .map_err(err)?;
                if have.unwrap_or(0) > 0 {
                    continue;
                }
                // MySQL DDL commits implicitly; the lock, not a transaction, keeps this single.
                for st in statements(sql) {
                    conn.query_drop(&st)
                        .map_err(|e| StoreError::Internal(format!("migration {version}: {e}")))?;
                }
                conn.exec_drop(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, crate::now_ms()),
                )
                .map_err(err)?;
                applied.push(version);
            }
            Ok(applied)
        })();
        let _ = conn.query_drop("SELECT RELEASE_LOCK('etask_migrate')");
        res
    }

    fn insert_ignore(&self) -> &'static str {
        "INSERT IGNORE"
    }

    fn locking_read(&self) -> &'static str {
        // MariaDB has no `FOR SHARE`; MySQL 8 still accepts this spelling.
        " LOCK IN SHARE MODE"
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
