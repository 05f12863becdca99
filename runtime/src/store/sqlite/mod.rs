//! The embedded store: SQLite files in the data directory, `stepbox.db`
//! holding the run journal and the run history, and `kv.db` the steps'
//! key-value state (see [`kv`]). WAL mode,
//! `synchronous=FULL` (a commit survives a power cut), a busy timeout for
//! concurrent readers, an integrity check and a schema version on open.

mod history;
mod journal;
mod kv;
mod queue;
mod registry;
mod to_log;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};

use super::{Durable, StoreError};
use crate::run::{FailureKind, RunStatus, StepPath, StepStatus};
use writer::{Job, Kind, Writer};

pub use kv::{KV_FILE, KeyValueDatabase};

/// A database file's schema: each migration moves it one version up, and
/// the version is the number of migrations.
pub(super) struct Schema {
    migrations: &'static [&'static str],
    /// What SQL alone cannot do, by the version whose SQL runs first.
    programs: &'static [(u32, Program)],
}

/// A migration's step written in Rust.
type Program = fn(&Connection) -> rusqlite::Result<()>;

impl Schema {
    const fn version(&self) -> u32 {
        self.migrations.len() as u32
    }
}

/// The journal's schema version this build writes.
pub const SCHEMA_VERSION: u32 = SCHEMA.version();

/// The version that moved key-value state into its own file.
const KV_MOVED: u32 = 4;

const SCHEMA: Schema = Schema {
    migrations: &[
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
        // 2: what a run report holds beyond version 1: whether a step is
        // required, the backoff before an attempt, and why a run stopped when
        // no step failed.
        "ALTER TABLE steps ADD COLUMN required INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE attempts ADD COLUMN delay_before_ms REAL NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN error TEXT;",
        // 3: the lease of the process running a run.
        "ALTER TABLE runs ADD COLUMN lease_owner TEXT;
    ALTER TABLE runs ADD COLUMN lease_expires_ms INTEGER;
    ALTER TABLE runs ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;",
        // 4: key-value state lives in kv.db; `Database::open` copies it there
        // first.
        "DROP TABLE kv;",
        // 5: the fingerprints of workflows included through a template,
        // taken when the run first read them.
        "CREATE TABLE includes (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            PRIMARY KEY (run_id, step_id)
        );",
        // 6: the service's records: API tokens (hashed), deployed workflow
        // versions, idempotency keys; the version a run was started from.
        "CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            tenant TEXT,
            name TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            revoked_ms INTEGER
        );
        CREATE TABLE workflow_versions (
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            digest TEXT NOT NULL,
            entry TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (tenant, name, version)
        );
        CREATE TABLE idempotency_keys (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            request TEXT NOT NULL,
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            PRIMARY KEY (tenant, key)
        );
        ALTER TABLE runs ADD COLUMN version INTEGER;
        CREATE INDEX runs_by_tenant ON runs (tenant, id);",
        // 7: durable waits: when each waiting step was reached and until
        // when it waits, and the events sent to runs.
        "CREATE TABLE waits (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            step_id TEXT NOT NULL,
            event TEXT NOT NULL,
            started_ms REAL NOT NULL,
            deadline_ms REAL,
            PRIMARY KEY (run_id, key)
        );
        CREATE TABLE run_events (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            payload TEXT NOT NULL,
            received_ms REAL NOT NULL,
            PRIMARY KEY (run_id, name)
        );
        CREATE INDEX runs_by_status ON runs (status);",
        // 8: the last tick each schedule of a deployed workflow handled.
        "CREATE TABLE schedule_ticks (
            tenant TEXT NOT NULL,
            workflow TEXT NOT NULL,
            schedule TEXT NOT NULL,
            tick_ms REAL NOT NULL,
            PRIMARY KEY (tenant, workflow, schedule)
        );",
        // 9: the queue of attempts waiting for workers.
        "CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            tenant TEXT NOT NULL,
            request TEXT NOT NULL,
            state TEXT NOT NULL,
            owner TEXT,
            token INTEGER NOT NULL DEFAULT 0,
            claims INTEGER NOT NULL DEFAULT 0,
            expires_ms INTEGER,
            result TEXT,
            UNIQUE (run_id, key, attempt)
        );
        CREATE INDEX tasks_open ON tasks (tenant, id) WHERE state <> 'done';",
        // 10: components the queue's tasks name by digest.
        "CREATE TABLE components (digest TEXT PRIMARY KEY, bytes BLOB NOT NULL);",
        // 11: the same table holds deployed bundles, for every node of a
        // service sharing the store.
        "ALTER TABLE components RENAME TO blobs;",
        // 12: tasks are no longer withdrawn one by one (a run's end removes
        // them all); withdrawn ones an earlier build left would never end.
        "DELETE FROM tasks WHERE state = 'cancelled';",
        // 13: a cancel asked of the process that runs a run.
        "ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;",
        // 14: a worker says when a claimed attempt starts to run, where
        // its coordinator counts starts against a rate limit.
        "ALTER TABLE tasks ADD COLUMN started INTEGER NOT NULL DEFAULT 0;",
        // 15: the input an attempt was given, for reports.
        "ALTER TABLE attempts ADD COLUMN input TEXT;",
        // 16: the span of a run's first traced drive, which later drives
        // continue.
        "ALTER TABLE runs ADD COLUMN trace TEXT;",
        // 17: a run's attempts, executions and steps are records in its
        // log ([`to_log`] moves the rows); a wait says when it ended.
        // A row's rowid is above every row's when it is written, so a run's
        // rows read back in the order written.
        "CREATE TABLE run_log (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            records TEXT NOT NULL
        );
        CREATE INDEX run_log_by_run ON run_log (run_id, id);
        ALTER TABLE waits ADD COLUMN ended INTEGER NOT NULL DEFAULT 0;
        UPDATE waits SET ended = 1
        WHERE EXISTS (SELECT 1 FROM executions AS x WHERE x.run_id = waits.run_id AND x.key = waits.key);",
    ],
    programs: &[(17, to_log::move_rows)],
};

/// The file name inside the data directory.
pub const DATABASE_FILE: &str = "stepbox.db";

/// How long a write waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite database of a data directory.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// Journal records go through the group-committing writer; other writes
    /// (runs, leases) commit on their own.
    writer: Writer,
    /// Reads have a connection of their own, so they never wait for a
    /// commit's fsync (WAL lets them read beside the writer).
    reader: Mutex<Connection>,
    kv: Arc<KeyValueDatabase>,
    /// The queue's wake-ups: this process's only.
    signals: crate::store::Signals,
}

impl Database {
    /// Opens (creating if needed) the database in `data_dir`: checks its
    /// integrity and brings its schema up to date.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let data_dir_error = |source| StoreError::DataDir { path: data_dir.to_owned(), source };
        super::create_private_dir(data_dir).map_err(data_dir_error)?;
        let kv = Arc::new(KeyValueDatabase::open(data_dir)?);
        let path = data_dir.join(DATABASE_FILE);
        let mut conn = open_private(&path)?;
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| StoreError::from_sqlite(&path, e))?;
        // Only a database from before version 4 has key-value rows to move;
        // a new one (version 0) has none, and attaching it while other
        // processes create it at the same moment could find it locked.
        if (1..KV_MOVED).contains(&version) {
            kv.import(&path)?;
        }
        configure(&path, &mut conn, &SCHEMA)?;
        let reader = Connection::open(&path).map_err(|err| StoreError::from_sqlite(&path, err))?;
        reader
            .busy_timeout(BUSY_TIMEOUT)
            .and_then(|()| reader.pragma_update(None, "query_only", true))
            .map_err(|err| StoreError::from_sqlite(&path, err))?;
        let conn = Arc::new(Mutex::new(conn));
        let writer = Writer::start(conn.clone(), path.clone()).map_err(data_dir_error)?;
        Ok(Database { path, conn, writer, reader: Mutex::new(reader), kv, signals: crate::store::Signals::new(false) })
    }

    /// The steps' key-value state, in its own file beside this one.
    pub fn key_values(&self) -> Arc<KeyValueDatabase> {
        self.kv.clone()
    }

    /// The database file.
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
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.err(e))?;
        let value = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// Queues a journal record of `run_id` for the next group commit.
    fn queue(&self, run_id: &str, kind: Kind, job: Job) -> Durable {
        self.writer.queue(run_id, kind, job)
    }

    /// Journal transactions committed by this handle: with group commit,
    /// fewer than the records written.
    pub fn journal_commits(&self) -> u64 {
        self.writer.commits()
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock();
        f(&conn).map_err(|e| self.err(e))
    }
}

/// Opens the database file at `path`, creating it readable by this user
/// only (SQLite gives its WAL and index files the same mode).
fn open_private(path: &Path) -> Result<Connection, StoreError> {
    std::os::unix::fs::OpenOptionsExt::mode(std::fs::OpenOptions::new().create(true).append(true), 0o600)
        .open(path)
        .map_err(|source| StoreError::DataDir { path: path.to_owned(), source })?;
    Connection::open(path).map_err(|err| StoreError::from_sqlite(path, err))
}

/// Sets a connection up (WAL, full sync, a busy timeout), checks the file's
/// integrity and brings it to `schema`, refusing a newer one.
fn configure(path: &Path, conn: &mut Connection, schema: &Schema) -> Result<(), StoreError> {
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
    if version > schema.version() {
        return Err(StoreError::NewerSchema {
            place: path.display().to_string(),
            found: version,
            supported: schema.version(),
        });
    }
    if version < schema.version() {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        // Read again under the write lock: another process opening the same
        // database may have migrated it meanwhile.
        let version: u32 = tx.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(err)?;
        for (made, migration) in schema.migrations.iter().enumerate().skip(version as usize) {
            tx.execute_batch(migration).map_err(err)?;
            for (_, program) in schema.programs.iter().filter(|(after, _)| *after as usize == made + 1) {
                program(&tx).map_err(err)?;
            }
        }
        tx.pragma_update(None, "user_version", schema.version()).map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
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
            _ => StoreError::Database { place: path.display().to_string(), detail },
        }
    }
}

/// Statuses, failure classes and step paths are stored as their names, and
/// read back through their parsers: a value no stepbox writes is an error,
/// not a string that flows on.
macro_rules! stored_as_text {
    ($($type:ty),*) => {$(
        impl ToSql for $type {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.to_string()))
            }
        }

        impl FromSql for $type {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|err: String| FromSqlError::Other(err.into()))
            }
        }
    )*};
}

stored_as_text!(RunStatus, StepStatus, FailureKind, StepPath);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_opening_a_new_database_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let opened: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.path().to_owned();
                std::thread::spawn(move || Database::open(&dir).map(drop).map_err(|err| err.to_string()))
            })
            .collect();
        for open in opened {
            assert_eq!(open.join().unwrap(), Ok(()));
        }
    }

    #[test]
    fn key_value_state_of_a_version_3_database_moves_to_its_own_file_with_its_usage() {
        use crate::store::{KeyValueStore, KvError, KvQuota, KvScope};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        let conn = Connection::open(&path).unwrap();
        for migration in &SCHEMA.migrations[..3] {
            conn.execute_batch(migration).unwrap();
        }
        conn.execute_batch(
            "PRAGMA user_version = 3;
             INSERT INTO kv VALUES ('acme', 'wf', 'default', 'count', CAST('41' AS BLOB));
             INSERT INTO kv VALUES ('acme', 'wf', 'default', 'big', zeroblob(1000));",
        )
        .unwrap();
        drop(conn);

        let db = Database::open(dir.path()).unwrap();
        let kv = db.key_values();
        let scope = KvScope { tenant: "acme".into(), workflow: "wf".into() };
        assert_eq!(kv.increment(&scope, "default", "count", 1, &KvQuota::default()).unwrap(), 42);
        // The moved rows count against the quota, each with its tenant,
        // workflow, bucket and key names and the row overhead beside its
        // value: 13 + 5 + 32 + 2 and 13 + 3 + 32 + 1000; `x` adds 48.
        let quota = KvQuota { max_bytes: bytesize::ByteSize::b(1100), max_keys: 10 };
        let err = kv.set(&scope, "default", "x", b"yz", &quota).unwrap_err();
        assert!(matches!(err, KvError::Quota { wanted: 1148, .. }), "{err:?}");
        let tables: i64 = db
            .read(|conn| conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'kv'", [], |row| row.get(0)))
            .unwrap();
        assert_eq!(tables, 0, "the journal's file no longer holds key-value state");
        drop(db);
        // Opening again copies nothing twice.
        let db = Database::open(dir.path()).unwrap();
        assert_eq!(db.key_values().get(&scope, "default", "count").unwrap(), Some(b"42".to_vec()));
    }
}
