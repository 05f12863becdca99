//! The shared store: one PostgreSQL database that stepbox processes on any
//! number of machines use at once, holding what the SQLite store holds
//! (runs and their journal, the service's records, key-value state).
//!
//! Its connections (a deadpool-postgres pool) are driven by a small runtime
//! of its own, so a caller on any thread, inside async code or not, can
//! block on a call the way it blocks on SQLite, and never starves the
//! runtime that drives the connections. Journal records go through a
//! group-committing writer, as on SQLite: one transaction for what was
//! queued while the last one committed.

mod history;
mod journal;
mod kv;
mod listen;
mod queue;
mod registry;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::StoreError;
pub use kv::PgKeyValues;
use writer::Writer;

/// A query parameter, owned, so the query can run on the store's runtime.
type Param = Box<dyn tokio_postgres::types::ToSql + Send + Sync>;

/// How long a call waits for a connection (or to make one) before it
/// reports the database unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections per process: enough for the writer, the readers and the
/// key-value calls of a node's running attempts.
const POOL_SIZE: usize = 16;

/// Taken (as a transaction-scoped advisory lock) while migrating, so
/// processes starting at once migrate one after the other.
const MIGRATION_LOCK: i64 = 0x5354_4550_424f_5801;

/// Each migration moves the schema one version up; the version is the
/// number applied.
const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store holds at its version 8. Text that is
    // ordered or compared by range sorts by bytes (COLLATE "C"), as
    // on SQLite: cursors and key listings must not depend on a locale.
    "CREATE TABLE runs (
        id TEXT COLLATE \"C\" PRIMARY KEY,
        workflow TEXT NOT NULL,
        workflow_path TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        tenant TEXT NOT NULL,
        inputs TEXT NOT NULL,
        status TEXT NOT NULL,
        outputs TEXT,
        error TEXT,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        finished_ms BIGINT,
        lease_owner TEXT,
        lease_expires_ms BIGINT,
        lease_epoch BIGINT NOT NULL DEFAULT 0,
        version BIGINT
    );
    CREATE INDEX runs_by_time ON runs (created_ms, id);
    CREATE INDEX runs_by_tenant ON runs (tenant, created_ms, id);
    CREATE INDEX runs_by_status ON runs (status);
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
        position BIGINT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        output TEXT,
        started_ms DOUBLE PRECISION,
        finished_ms DOUBLE PRECISION,
        required BOOLEAN NOT NULL DEFAULT TRUE,
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
        attempt BIGINT NOT NULL,
        step_id TEXT NOT NULL,
        status TEXT NOT NULL,
        kind TEXT,
        message TEXT,
        started_ms DOUBLE PRECISION,
        finished_ms DOUBLE PRECISION,
        delay_before_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
        fuel BIGINT,
        peak_memory BIGINT,
        logs TEXT,
        stdout TEXT,
        stderr TEXT,
        PRIMARY KEY (run_id, key, attempt)
    );
    CREATE TABLE includes (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE TABLE waits (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        step_id TEXT NOT NULL,
        event TEXT NOT NULL,
        started_ms DOUBLE PRECISION NOT NULL,
        deadline_ms DOUBLE PRECISION,
        PRIMARY KEY (run_id, key)
    );
    CREATE TABLE run_events (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_ms DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE tokens (
        id TEXT COLLATE \"C\" PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        tenant TEXT,
        name TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        revoked_ms BIGINT
    );
    CREATE TABLE workflow_versions (
        tenant TEXT COLLATE \"C\" NOT NULL,
        name TEXT COLLATE \"C\" NOT NULL,
        version BIGINT NOT NULL,
        digest TEXT NOT NULL,
        entry TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant, name, version)
    );
    CREATE TABLE idempotency_keys (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        request TEXT NOT NULL,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        PRIMARY KEY (tenant, key)
    );
    CREATE TABLE schedule_ticks (
        tenant TEXT NOT NULL,
        workflow TEXT NOT NULL,
        schedule TEXT NOT NULL,
        tick_ms DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, workflow, schedule)
    );
    CREATE TABLE kv (
        tenant TEXT NOT NULL,
        workflow TEXT NOT NULL,
        bucket TEXT NOT NULL,
        key TEXT COLLATE \"C\" NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (tenant, workflow, bucket, key)
    );
    CREATE TABLE kv_usage (
        tenant TEXT PRIMARY KEY,
        bytes BIGINT NOT NULL,
        keys BIGINT NOT NULL
    );",
    // 2: the queue of attempts waiting for workers.
    "CREATE TABLE tasks (
        id BIGSERIAL PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        request TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT,
        token BIGINT NOT NULL DEFAULT 0,
        claims BIGINT NOT NULL DEFAULT 0,
        expires_ms BIGINT,
        result TEXT,
        UNIQUE (run_id, key, attempt)
    );
    CREATE INDEX tasks_open ON tasks (tenant, id) WHERE state <> 'done';",
    // 3: components the queue's tasks name by digest.
    "CREATE TABLE components (digest TEXT PRIMARY KEY, bytes BYTEA NOT NULL);",
    // 4: the same table holds deployed bundles, for every node of a service
    // sharing the database.
    "ALTER TABLE components RENAME TO blobs;",
    // 5: tasks are no longer withdrawn one by one (a run's end removes them
    // all); withdrawn ones an earlier build left would never end.
    "DELETE FROM tasks WHERE state = 'cancelled';",
    // 6: a cancel asked of the process that runs a run.
    "ALTER TABLE runs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;",
    // 7: a claim reads the ready tasks and the claimed ones through indexes
    // of their own: through the open tasks' index, each claim read every
    // waiting task while it held the claims' turn.
    "DROP INDEX tasks_open;
    CREATE INDEX tasks_ready ON tasks (tenant, id) WHERE state = 'ready';
    CREATE INDEX tasks_claimed ON tasks (tenant, expires_ms) WHERE state = 'claimed';",
    // 8: a worker says when a claimed attempt starts to run, where its
    // coordinator counts starts against a rate limit.
    "ALTER TABLE tasks ADD COLUMN started BOOLEAN NOT NULL DEFAULT FALSE;",
    // 9: the input an attempt was given, for reports.
    "ALTER TABLE attempts ADD COLUMN input TEXT;",
    // 10: the span of a run's first traced drive, which later drives
    // continue.
    "ALTER TABLE runs ADD COLUMN trace TEXT;",
    // 11: a wait says when it ended.
    "ALTER TABLE waits ADD COLUMN ended BOOLEAN NOT NULL DEFAULT FALSE;
    UPDATE waits SET ended = TRUE
    WHERE EXISTS (SELECT 1 FROM executions AS x WHERE x.run_id = waits.run_id AND x.key = waits.key);",
    // 12: a run's attempts, executions and steps are records in its log
    // ([`crate::store::log`]), as on SQLite. Each old row moves as a row of
    // one record, inserted in the order a fold reads them (every attempt's
    // start before its end, the steps last), so no run's rows make a value
    // near PostgreSQL's 1 GB limit. A row's id is above every row's when it
    // is written, so a run's rows read back in the order written.
    // Nothing may write the old tables meanwhile: a node of an earlier
    // stepbox would lose what it wrote (stop them all to upgrade; they
    // could not write the new schema anyway).
    "LOCK TABLE attempts, executions, steps IN ACCESS EXCLUSIVE MODE;
    CREATE TABLE run_log (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        records TEXT NOT NULL
    );
    CREATE INDEX run_log_by_run ON run_log (run_id, id);
    INSERT INTO run_log (run_id, records)
    SELECT run_id, json_build_array(record)::text FROM (
        SELECT a.run_id, 0 AS grp, a.key, a.attempt AS number, 0 AS part,
            json_build_object('attempt_started', json_build_object(
                'path', a.step_id, 'attempt', a.attempt, 'started_ms', COALESCE(a.started_ms, 0),
                'delay_before_ms', a.delay_before_ms, 'input', a.input)) AS record
        FROM attempts AS a
        UNION ALL
        SELECT a.run_id, 0, a.key, a.attempt, 1,
            json_build_object('attempt_finished', json_build_object(
                'path', a.step_id, 'last', l.last, 'output', CASE WHEN l.last THEN x.output END,
                'attempt', json_build_object(
                    'attempt', a.attempt, 'status', a.status, 'kind', a.kind, 'message', a.message,
                    'started', COALESCE(a.started_ms, 0), 'finished', a.finished_ms, 'delay', a.delay_before_ms,
                    'fuel', COALESCE(a.fuel, 0), 'peak_memory', COALESCE(a.peak_memory, 0),
                    'logs', COALESCE(a.logs, ''), 'stdout', COALESCE(a.stdout, ''), 'stderr', COALESCE(a.stderr, ''))))
        FROM attempts AS a
        LEFT JOIN executions AS x ON x.run_id = a.run_id AND x.key = a.key
        CROSS JOIN LATERAL (SELECT x.key IS NOT NULL AND a.attempt =
            (SELECT MAX(m.attempt) FROM attempts AS m WHERE m.run_id = a.run_id AND m.key = a.key) AS last) AS l
        WHERE a.status <> 'running' OR l.last
        UNION ALL
        SELECT s.run_id, 1, s.step_id, s.position, 0,
            json_build_object('step_finished', json_build_object(
                'path', s.step_id, 'position', s.position, 'status', s.status, 'reason', s.reason,
                'output', s.output, 'started_ms', s.started_ms, 'finished_ms', s.finished_ms, 'required', s.required))
        FROM steps AS s
    ) AS records ORDER BY run_id, grp, key, number, part;
    DROP TABLE attempts;
    DROP TABLE executions;
    DROP TABLE steps;",
];

/// The schema version this build writes.
pub const PG_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// A PostgreSQL database as stepbox's store.
pub struct PgStore {
    place: Arc<str>,
    pool: Pool,
    /// Drives the pool's connections; `None` once shut down.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    writer: Writer,
    kv: Arc<PgKeyValues>,
    /// The queue's wake-ups, other processes' included.
    signals: Arc<crate::store::Signals>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("place", &self.place).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`,
    /// or libpq's `key=value` form) and brings its schema up to date,
    /// refusing one a newer stepbox wrote.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|err| StoreError::BadUrl { detail: format!("{err}") })?;
        // A session that stops in the middle of a transaction (its process
        // paused or cut off) lets go of its locks within a minute, and no
        // statement waits for a lock forever: one stuck process must not
        // stall the others.
        let options = format!(
            "{} -c idle_in_transaction_session_timeout=60s -c lock_timeout=30s",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim());
        let place: Arc<str> = describe(&config).into();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stepbox-postgres")
            .enable_all()
            .build()
            .map_err(|err| StoreError::Database { place: place.to_string(), detail: err.to_string() })?;
        let listening = config.clone();
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| StoreError::Database { place: place.to_string(), detail: err.to_string() })?;
        let handle = runtime.handle().clone();
        let migrated = {
            let (pool, place) = (pool.clone(), place.clone());
            block(&handle, async move { migrate(&pool, &place).await })
        };
        migrated?;
        let writer = {
            let _entered = handle.enter();
            Writer::start(pool.clone(), place.clone())
        };
        let kv = Arc::new(PgKeyValues { pool: pool.clone(), place: place.clone(), handle: handle.clone() });
        let signals = Arc::new(crate::store::Signals::new(true));
        handle.spawn(listen::listen(listening, signals.clone()));
        Ok(PgStore { place, pool, runtime: Some(runtime), handle, writer, kv, signals })
    }

    /// The steps' key-value state, in the same database.
    pub fn key_values(&self) -> Arc<PgKeyValues> {
        self.kv.clone()
    }

    /// Where the database is, without a password: for messages.
    pub fn place(&self) -> &str {
        &self.place
    }

    /// Journal transactions committed by this handle.
    pub fn journal_commits(&self) -> u64 {
        self.writer.commits()
    }

    /// Runs `call` with a pooled connection on the store's runtime and
    /// waits for it, from any thread.
    fn call<T, F>(&self, call: impl FnOnce(deadpool_postgres::Object) -> F + Send + 'static) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let (pool, place) = (self.pool.clone(), self.place.clone());
        block(&self.handle, async move {
            let client = pool.get().await.map_err(|err| pool_error(&place, err))?;
            call(client).await.map_err(|err| pg_error(&place, &err))
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Commits what is queued first, then lets the runtime go without
        // blocking: the store may be dropped inside async code.
        self.writer.stop(&self.handle);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on the runtime behind `handle` and waits for its result
/// on this thread, which need not belong to any runtime.
fn block<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver.recv().unwrap_or(Err(StoreError::WriterStopped))
}

async fn migrate(pool: &Pool, place: &str) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(|err| pool_error(place, err))?;
    let err = |err: tokio_postgres::Error| pg_error(place, &err);
    let tx = client.transaction().await.map_err(err)?;
    // Another node's migration may take longer than the connection's
    // lock timeout: this one waits for it, however long.
    tx.batch_execute("SET LOCAL lock_timeout = 0").await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS stepbox_schema (version BIGINT NOT NULL)").await.map_err(err)?;
    let found: Option<i64> =
        tx.query_opt("SELECT version FROM stepbox_schema", &[]).await.map_err(err)?.map(|row| row.get(0));
    let found = found.unwrap_or(0);
    if found > i64::from(PG_SCHEMA_VERSION) {
        return Err(StoreError::NewerSchema {
            place: place.to_owned(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: PG_SCHEMA_VERSION,
        });
    }
    for migration in MIGRATIONS.get(usize::try_from(found).unwrap_or(0)..).unwrap_or_default() {
        tx.batch_execute(migration).await.map_err(err)?;
    }
    tx.execute("DELETE FROM stepbox_schema", &[]).await.map_err(err)?;
    tx.execute("INSERT INTO stepbox_schema (version) VALUES ($1)", &[&i64::from(PG_SCHEMA_VERSION)])
        .await
        .map_err(err)?;
    tx.commit().await.map_err(err)
}

/// `postgres://user@host:port/db`, never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or_default();
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// A database error, as what a user can do about it.
fn pg_error(place: &str, err: &tokio_postgres::Error) -> StoreError {
    match err.code() {
        Some(code) if *code == SqlState::DISK_FULL => StoreError::Database {
            place: place.to_owned(),
            detail: format!("{err}; the database server's disk is full: free space there"),
        },
        // The connection is gone, or the server is shutting down or
        // starting: it is away, not refusing.
        Some(code) if code.code().starts_with("08") || code.code().starts_with("57P") => {
            StoreError::Unreachable { place: place.to_owned(), detail: db_detail(err) }
        }
        Some(_) => StoreError::Database { place: place.to_owned(), detail: db_detail(err) },
        None => StoreError::Unreachable { place: place.to_owned(), detail: db_detail(err) },
    }
}

/// A database error's own message, which `Display` leaves out.
fn db_detail(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => err.to_string(),
    }
}

fn pool_error(place: &str, err: PoolError) -> StoreError {
    match err {
        PoolError::Backend(err) => match err.code() {
            Some(code) if *code == SqlState::INVALID_CATALOG_NAME => StoreError::Database {
                place: place.to_owned(),
                detail: format!("{}; create it first (`createdb`, or `CREATE DATABASE` in psql)", db_detail(&err)),
            },
            _ => pg_error(place, &err),
        },
        err => StoreError::Unreachable { place: place.to_owned(), detail: err.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use stepbox_tests::postgres::TestDatabase;

    use super::*;

    #[test]
    fn processes_opening_a_new_database_at_once_migrate_it_once() {
        let database = TestDatabase::create();
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let url = database.url.clone();
                std::thread::spawn(move || PgStore::open(&url).map(drop).map_err(|err| err.to_string()))
            })
            .collect();
        for open in opened {
            assert_eq!(open.join().unwrap(), Ok(()));
        }
    }

    #[test]
    fn rows_of_a_version_10_database_move_into_its_run_logs() {
        use crate::store::conformance::{OLD_ROWS, assert_moved_into_the_log};
        let database = TestDatabase::create();
        database.query(&format!(
            "{}; CREATE TABLE stepbox_schema (version BIGINT NOT NULL); INSERT INTO stepbox_schema VALUES (10); {OLD_ROWS}",
            MIGRATIONS[..10].join(";\n")
        ));
        let store = PgStore::open(&database.url).unwrap();
        assert_moved_into_the_log(&store, "postgres");
        let tables = database.query(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name IN ('steps', 'executions', 'attempts')",
        );
        assert_eq!(tables[0][0].as_deref(), Some("0"), "the old tables are gone");
    }

    #[test]
    fn a_database_a_newer_stepbox_wrote_is_refused_with_what_to_do() {
        let database = TestDatabase::create();
        let store = PgStore::open(&database.url).unwrap();
        store
            .call(|client| async move { client.execute("UPDATE stepbox_schema SET version = 999", &[]).await })
            .unwrap();
        drop(store);
        let err = PgStore::open(&database.url).unwrap_err();
        assert!(matches!(err, StoreError::NewerSchema { found: 999, .. }), "{err}");
        assert!(err.to_string().contains("upgrade stepbox"), "{err}");
    }

    #[test]
    fn an_unreachable_server_and_a_bad_url_say_what_to_do() {
        // Nothing listens on port 1.
        let err = PgStore::open("postgres://postgres:secret@127.0.0.1:1/stepbox").unwrap_err();
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("start it") && message.contains("STEPBOX_DB"), "{message}");
        assert!(!message.contains("secret"), "the password stays out of messages: {message}");
        for url in ["postgres://u:secret@host:notaport/db", "postgres://u@h:notaport/db?password=secret"] {
            let err = PgStore::open(url).unwrap_err();
            assert!(matches!(err, StoreError::BadUrl { .. }), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        for url in ["mysql://u:secret@x/db", "host=h password=secret", "postgress://u:secret@h/db"] {
            let err = crate::store::open(Some(url), std::path::Path::new("/nonexistent")).unwrap_err();
            assert!(err.to_string().contains("postgres://"), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    /// A TCP proxy to the test server whose connections can be cut, as a
    /// server restart or a network drop would cut them.
    struct Proxy {
        url: String,
        /// While set, connections are refused; setting it ends the open ones.
        down: tokio::sync::watch::Sender<bool>,
        _runtime: tokio::runtime::Runtime,
    }

    impl Proxy {
        fn start(target_url: &str) -> Self {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            let address = listener.local_addr().unwrap();
            let (down, watch) = tokio::sync::watch::channel(false);
            runtime.spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else { return };
                    let mut watch = watch.clone();
                    if *watch.borrow() {
                        continue;
                    }
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = watch.wait_for(|down| *down) => {}
                        }
                    });
                }
            });
            let url = target_url.replace("127.0.0.1:5432", &address.to_string());
            Proxy { url, down, _runtime: runtime }
        }

        fn set_down(&self, down: bool) {
            self.down.send_replace(down);
        }
    }

    #[test]
    fn records_queued_while_the_database_is_away_commit_when_it_is_back() {
        use crate::run::{Attempt, Run, StepPath};
        use crate::store::{History, Journal, wait};
        let database = TestDatabase::create();
        let proxy = Proxy::start(&database.url);
        let store = PgStore::open(&proxy.url).unwrap();
        let run = Run::new("r".into(), "w", "w.yaml", "t", Default::default());
        let (_lease, created) = store.create_run(&run, &serde_json::Value::Null);
        wait(created).unwrap();
        proxy.set_down(true);
        let path: StepPath = "a".parse().unwrap();
        let started = store.attempt_started("r", &path, "r/a", &Attempt::started(1, 1.0), None);
        // Reads fail at once, saying so; the record waits for the database.
        assert!(matches!(store.load_run("r"), Err(StoreError::Unreachable { .. })));
        std::thread::sleep(Duration::from_millis(300));
        proxy.set_down(false);
        wait(started).unwrap();
        assert_eq!(store.resume_state("r").unwrap().attempts.get("r/a"), Some(&1));
    }

    #[test]
    fn a_missing_database_says_to_create_it() {
        let err = PgStore::open("postgres://postgres@127.0.0.1:5432/stepbox_no_such_database").unwrap_err();
        assert!(err.to_string().contains("createdb"), "{err}");
    }
}
