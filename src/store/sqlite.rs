//! The embedded back end: one SQLite file (WAL) behind a mutex. The default for `--mode all`;
//! one scheduler process per file.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, ToSql};

use super::{migrations, statements, Backend, Conn, Result, StoreError, V};

pub struct Sqlite {
    conn: Mutex<Connection>,
    path: String,
}

fn err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy => {
            StoreError::Unavailable(format!("sqlite busy: {e}"))
        }
        // A full disk or an I/O error passes; callers answer 503 and retry.
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::CannotOpen
            ) =>
        {
            StoreError::Unavailable(format!("sqlite: {e}"))
        }
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Duplicate(format!("sqlite: {e}"))
        }
        e => StoreError::Internal(format!("sqlite: {e}")),
    }
}

impl ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            V::Null => ToSqlOutput::Owned(SqlValue::Null),
            V::I(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            V::S(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl Sqlite {
    pub fn open(path: &str) -> Result<Sqlite> {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        restrict_files(path)?;
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open sqlite:{path}: {e}")))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }
}

/// The store holds task secrets: the file is created 0600 (SQLite gives its `-wal` and `-shm`
/// files the database file's mode), and existing files that are more open are restricted.
fn restrict_files(path: &str) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path == ":memory:" {
        return Ok(());
    }
    if !Path::new(path).exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot create {path}: {e}")))?;
    }
    for f in [
        path.to_owned(),
        format!("{path}-wal"),
        format!("{path}-shm"),
    ] {
        if let Ok(m) = std::fs::metadata(&f) {
            if m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| StoreError::Unavailable(format!("cannot restrict {f} to 0600: {e}")),
                )?;
            }
        }
    }
    Ok(())
}

struct Tx<'a>(&'a rusqlite::Transaction<'a>);

impl Conn for Tx<'_> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64> {
        let mut st = self.0.prepare_cached(sql).map_err(err)?;
        st.execute(params_from_iter(params.iter()))
            .map(|n| n as u64)
            .map_err(err)
    }
    fn insert(&mut self, sql: &str, params: &[V]) -> Result<i64> {
        self.exec(sql, params)?;
        Ok(self.0.last_insert_rowid())
    }
    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>> {
        let mut st = self.0.prepare_cached(sql).map_err(err)?;
        let n = st.column_count();
        let mut rows = st.query(params_from_iter(params.iter())).map_err(err)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(err)? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                row.push(match r.get_ref(i).map_err(err)? {
                    ValueRef::Null => V::Null,
                    ValueRef::Integer(i) => V::I(i),
                    ValueRef::Real(f) => V::I(f as i64),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        V::S(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            out.push(row);
        }
        Ok(out)
    }
}

impl Backend for Sqlite {
    fn tx(&self, f: &mut dyn FnMut(&mut dyn Conn) -> Result<()>) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        f(&mut Tx(&tx))?;
        tx.commit().map_err(err)
    }

    fn migrate(&self) -> Result<Vec<u32>> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // An exclusive transaction is the lock: a second process waits (busy_timeout), then
        // sees the versions the first applied.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .map_err(err)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
            .map_err(err)?;
        let mut applied = Vec::new();
        for (version, sql) in migrations("sqlite") {
            let have: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM schema_migrations WHERE version = ?",
                    [version],
                    |r| r.get(0),
                )
                .map_err(err)?;
            if have > 0 {
                continue;
            }
            for st in statements(sql) {
                tx.execute_batch(&st)
                    .map_err(|e| StoreError::Internal(format!("migration {version}: {e}")))?;
            }
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                [version as i64, crate::now_ms()],
            )
            .map_err(err)?;
            applied.push(version);
        }
        tx.commit().map_err(err)?;
        Ok(applied)
    }

    fn locking_read(&self) -> &'static str {
        ""
    }

    fn insert_ignore(&self) -> &'static str {
        "INSERT OR IGNORE"
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path)
    }
}
