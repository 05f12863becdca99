//! The embedded store: one SQLite file in the data directory holding the
//! run journal and the steps' key-value state. WAL mode, `synchronous=FULL`
//! (a commit survives a power cut), a busy timeout for concurrent readers,
//! an integrity check and a schema version on open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

use super::writer::{Durable, Job, Kind, Writer};
use super::{KeyValueStore, KvError, KvScope, StoreError, add_to_stored};

/// The schema this build writes. Each entry of [`MIGRATIONS`] moves a
/// database one version up.
pub const SCHEMA_VERSION: u32 = 1;

const MIGRATIONS: &[&str] = &[
    // 1: runs, their steps, executions and attempts; key-value state.
    "CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        workflow_path TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        tenant TEXT NOT NULL,
        inputs TEXT NOT NULL,
        status TEXT NOT NULL,
        outputs TEXT,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        finished_ms INTEGER
    );
    CREATE INDEX runs_by_time ON runs (created_ms);
    CREATE TABLE run_labels (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE INDEX labels_by_value ON run_labels (key, value);
    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        output TEXT,
        started_ms REAL,
        finished_ms REAL,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE TABLE executions (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        step_id TEXT NOT NULL,
        status TEXT NOT NULL,
        output TEXT,
        error TEXT,
        PRIMARY KEY (run_id, key)
    );
    CREATE TABLE attempts (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        step_id TEXT NOT NULL,
        status TEXT NOT NULL,
        kind TEXT,
        message TEXT,
        started_ms REAL,
        finished_ms REAL,
        fuel INTEGER,
        peak_memory INTEGER,
        logs TEXT,
        stdout TEXT,
        stderr TEXT,
        PRIMARY KEY (run_id, key, attempt)
    );
    CREATE TABLE kv (
        tenant TEXT NOT NULL,
        workflow TEXT NOT NULL,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (tenant, workflow, bucket, key)
    ) WITHOUT ROWID;",
];

/// The file name inside the data directory.
pub const DATABASE_FILE: &str = "stepbox.db";

/// How long a write waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The current time in unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The SQLite database of a data directory.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// Journal records go through the group-committing writer; other writes
    /// (runs, key-value state) commit on their own.
    writer: Writer,
}

impl Database {
    /// Opens (creating if needed) the database in `data_dir`: checks its
    /// integrity and brings its schema up to date.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::DataDir { path: data_dir.to_owned(), source })?;
        let path = data_dir.join(DATABASE_FILE);
        let conn = Connection::open(&path).map_err(|err| StoreError::from_sqlite(&path, err))?;
        let conn = Arc::new(Mutex::new(conn));
        configure(&path, &mut conn.lock())?;
        let writer = Writer::start(conn.clone(), path.clone())
            .map_err(|source| StoreError::DataDir { path: data_dir.to_owned(), source })?;
        Ok(Database { path, conn, writer })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data directory the database lives in.
    pub fn data_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    fn err(&self, err: rusqlite::Error) -> StoreError {
        StoreError::from_sqlite(&self.path, err)
    }

    /// Runs `f` in one immediate (write-locking) transaction.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.err(e))?;
        let value = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// Queues a journal record of `run_id` for the next group commit.
    pub(crate) fn queue(&self, run_id: &str, kind: Kind, job: Job) -> Durable {
        self.writer.queue(run_id, kind, job)
    }

    /// Journal transactions committed by this handle: with group commit,
    /// fewer than the records written.
    pub fn journal_commits(&self) -> u64 {
        self.writer.commits()
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.lock();
        f(&conn).map_err(|e| self.err(e))
    }
}

fn configure(path: &Path, conn: &mut Connection) -> Result<(), StoreError> {
    let err = |err| StoreError::from_sqlite(path, err);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            detail: format!("cannot switch to WAL mode (got {mode})"),
        });
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(err)?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |row| row.get(0)).map_err(err)?;
    if check != "ok" {
        return Err(StoreError::Corrupt { path: path.to_owned(), detail: check });
    }
    let version: u32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    if version < SCHEMA_VERSION {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        for migration in &MIGRATIONS[version as usize..] {
            tx.execute_batch(migration).map_err(err)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

impl Database {
    /// JSON as stored: text.
    pub(crate) fn text(value: &Value) -> String {
        value.to_string()
    }

    /// Stored text back to JSON.
    pub(crate) fn json(text: Option<String>) -> Option<Value> {
        text.and_then(|text| serde_json::from_str(&text).ok())
    }
}

fn kv_err(err: StoreError) -> KvError {
    KvError::Storage(err.to_string())
}

/// The value of one key, inside a read or a write transaction.
fn kv_value(conn: &Connection, scope: &KvScope, bucket: &str, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT value FROM kv WHERE tenant = ?1 AND workflow = ?2 AND bucket = ?3 AND key = ?4",
        params![scope.tenant, scope.workflow, bucket, key],
        |row| row.get(0),
    )
    .optional()
}

fn kv_store(conn: &Connection, scope: &KvScope, bucket: &str, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO kv (tenant, workflow, bucket, key, value) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO UPDATE SET value = excluded.value",
        params![scope.tenant, scope.workflow, bucket, key, value],
    )
    .map(drop)
}

impl KeyValueStore for Database {
    fn get(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.read(|conn| kv_value(conn, scope, bucket, key)).map_err(kv_err)
    }

    fn set(&self, scope: &KvScope, bucket: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.write(|tx| kv_store(tx, scope, bucket, key, value)).map_err(kv_err)
    }

    fn delete(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<(), KvError> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM kv WHERE tenant = ?1 AND workflow = ?2 AND bucket = ?3 AND key = ?4",
                params![scope.tenant, scope.workflow, bucket, key],
            )
            .map(drop)
        })
        .map_err(kv_err)
    }

    fn list_keys(
        &self,
        scope: &KvScope,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT key FROM kv WHERE tenant = ?1 AND workflow = ?2 AND bucket = ?3 AND key > ?4 ORDER BY key LIMIT ?5",
            )?;
            let rows = statement.query_map(
                params![scope.tenant, scope.workflow, bucket, after.unwrap_or(""), limit as i64],
                |row| row.get(0),
            )?;
            rows.collect()
        })
        .map_err(kv_err)
    }

    fn increment(&self, scope: &KvScope, bucket: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        // The read and the write are one transaction: no update is lost.
        let mut failure = None;
        let result = self.write(|tx| {
            let stored = kv_value(tx, scope, bucket, key)?;
            match add_to_stored(key, stored.as_deref(), delta) {
                Ok(next) => kv_store(tx, scope, bucket, key, next.to_string().as_bytes()).map(|()| next),
                Err(err) => {
                    failure = Some(err);
                    Ok(0)
                }
            }
        });
        match (failure, result) {
            (Some(err), _) => Err(err),
            (None, result) => result.map_err(kv_err),
        }
    }

    fn compare_and_swap(
        &self,
        scope: &KvScope,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, KvError> {
        self.write(|tx| {
            if kv_value(tx, scope, bucket, key)?.as_deref() != expected {
                return Ok(false);
            }
            kv_store(tx, scope, bucket, key, new).map(|()| true)
        })
        .map_err(kv_err)
    }
}

/// Maps SQLite's error codes to what a user can do about them.
impl StoreError {
    pub(crate) fn from_sqlite(path: &Path, err: rusqlite::Error) -> Self {
        StoreError::from_code(path, err.sqlite_error_code(), err.to_string())
    }

    pub(crate) fn from_code(path: &Path, code: Option<ErrorCode>, detail: String) -> Self {
        let path = path.to_owned();
        match code {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked { path },
            Some(ErrorCode::DiskFull) => StoreError::DiskFull { path },
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt { path, detail },
            Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
                StoreError::NotWritable { path, detail }
            }
            _ => StoreError::Sqlite { path, detail },
        }
    }
}
