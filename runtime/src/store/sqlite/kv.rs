//! `wasi:keyvalue` state in its own SQLite file, `kv.db`, beside the
//! journal's: its own file lock and its own connection, so a tenant
//! writing large values in a loop never holds up another run's journal
//! commits. One table keyed by tenant, workflow, bucket and key, and each
//! tenant's usage kept in the same transactions as its data; `increment`
//! and compare-and-swap read and write in one transaction.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::Schema;
use crate::failpoint::failpoint;
use crate::store::{KV_ROW_OVERHEAD, KeyValueStore, KvError, KvQuota, KvScope, KvUsage, StoreError, add_to_stored};

/// The file name inside the data directory.
pub const KV_FILE: &str = "kv.db";

const SCHEMA: Schema = Schema {
    migrations: &["CREATE TABLE kv (
            tenant TEXT NOT NULL,
            workflow TEXT NOT NULL,
            bucket TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (tenant, workflow, bucket, key)
        ) WITHOUT ROWID;
        CREATE TABLE kv_usage (
            tenant TEXT PRIMARY KEY,
            bytes INTEGER NOT NULL,
            keys INTEGER NOT NULL
        ) WITHOUT ROWID;"],
    programs: &[],
};

/// The key-value database of a data directory.
#[derive(Debug)]
pub struct KeyValueDatabase {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl KeyValueDatabase {
    /// Opens (creating if needed) `kv.db` in `data_dir`, which must exist.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(KV_FILE);
        let mut conn = super::open_private(&path)?;
        super::configure(&path, &mut conn, &SCHEMA)?;
        Ok(KeyValueDatabase { path, conn: Mutex::new(conn) })
    }

    /// Copies the key-value rows a database from before version 4 kept in
    /// the journal's file at `journal` into this one, with each tenant's
    /// usage. Rows already here win: copying twice changes nothing.
    pub(super) fn import(&self, journal: &Path) -> Result<(), StoreError> {
        let err = |e| StoreError::from_sqlite(&self.path, e);
        let mut conn = self.conn.lock();
        conn.execute("ATTACH DATABASE ?1 AS journal", [journal.to_string_lossy()]).map_err(err)?;
        let copy = |conn: &mut Connection| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Another process may have moved the rows and dropped the table.
            let there: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM journal.sqlite_master WHERE type = 'table' AND name = 'kv')",
                [],
                |row| row.get(0),
            )?;
            if there {
                tx.execute_batch(
                    "INSERT OR IGNORE INTO kv SELECT tenant, workflow, bucket, key, value FROM journal.kv;
                     DELETE FROM kv_usage;",
                )?;
                tx.execute(
                    "INSERT INTO kv_usage SELECT tenant, SUM(
                         length(CAST(tenant AS BLOB)) + length(CAST(workflow AS BLOB)) + length(CAST(bucket AS BLOB))
                         + length(CAST(key AS BLOB)) + length(value) + ?1), COUNT(*)
                     FROM kv GROUP BY tenant",
                    [KV_ROW_OVERHEAD as i64],
                )?;
            }
            tx.commit()
        };
        let copied = copy(&mut conn).map_err(err);
        let detached = conn.execute_batch("DETACH DATABASE journal").map_err(err);
        copied.and(detached)
    }

    fn err(&self, err: rusqlite::Error) -> KvError {
        KvError::Storage(StoreError::from_sqlite(&self.path, err).to_string())
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, KvError> {
        f(&self.conn.lock()).map_err(|e| self.err(e))
    }

    /// Runs `f` in one immediate (write-locking) transaction; an error
    /// from `f` rolls it back.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T, KvError>) -> Result<T, KvError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.err(e))?;
        let value = f(&tx)?;
        failpoint!("kv.before-commit");
        tx.commit().map_err(|e| self.err(e))?;
        failpoint!("kv.after-commit");
        Ok(value)
    }

    /// Stores `value` at `key` inside `tx` if the tenant's quota allows it.
    fn put(
        &self,
        tx: &Transaction<'_>,
        scope: &KvScope,
        bucket: &str,
        key: &str,
        value: &[u8],
        quota: &KvQuota,
    ) -> Result<(), KvError> {
        let old = value_len(tx, scope, bucket, key).map_err(|e| self.err(e))?;
        self.account(tx, scope, |usage| usage.change(scope, bucket, key, old, Some(value.len()), quota))?;
        tx.execute(
            "INSERT INTO kv (tenant, workflow, bucket, key, value) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO UPDATE SET value = excluded.value",
            params![scope.tenant, scope.workflow, bucket, key, value],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Moves the tenant's usage as `change` says, which may refuse.
    fn account(
        &self,
        tx: &Transaction<'_>,
        scope: &KvScope,
        change: impl FnOnce(KvUsage) -> Result<KvUsage, KvError>,
    ) -> Result<(), KvError> {
        let usage = tx
            .query_row("SELECT bytes, keys FROM kv_usage WHERE tenant = ?1", [&scope.tenant], |row| {
                Ok(KvUsage { bytes: row.get::<_, i64>(0)? as u64, keys: row.get::<_, i64>(1)? as u64 })
            })
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or_default();
        let usage = change(usage)?;
        tx.execute(
            "INSERT INTO kv_usage (tenant, bytes, keys) VALUES (?1, ?2, ?3)
             ON CONFLICT DO UPDATE SET bytes = excluded.bytes, keys = excluded.keys",
            params![scope.tenant, usage.bytes as i64, usage.keys as i64],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// The value of one key.
fn value(conn: &Connection, scope: &KvScope, bucket: &str, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM kv WHERE tenant = ?1 AND workflow = ?2 AND bucket = ?3 AND key = ?4")?
        .query_row(params![scope.tenant, scope.workflow, bucket, key], |row| row.get(0))
        .optional()
}

/// The length of one key's value, without reading it.
fn value_len(conn: &Connection, scope: &KvScope, bucket: &str, key: &str) -> rusqlite::Result<Option<usize>> {
    conn.prepare_cached(
        "SELECT length(value) FROM kv WHERE tenant = ?1 AND workflow = ?2 AND bucket = ?3 AND key = ?4",
    )?
    .query_row(params![scope.tenant, scope.workflow, bucket, key], |row| row.get::<_, i64>(0).map(|len| len as usize))
    .optional()
}

impl KeyValueStore for KeyValueDatabase {
    fn get(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.read(|conn| value(conn, scope, bucket, key))
    }

    fn set(&self, scope: &KvScope, bucket: &str, key: &str, value: &[u8], quota: &KvQuota) -> Result<(), KvError> {
        self.write(|tx| self.put(tx, scope, bucket, key, value, quota))
    }

    fn delete(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<(), KvError> {
        self.write(|tx| {
            let Some(old) = value_len(tx, scope, bucket, key).map_err(|e| self.err(e))? else { return Ok(()) };
            self.account(tx, scope, |usage| Ok(usage.removed(scope, bucket, key, old)))?;
            tx.execute(
                "DELETE FROM kv WHERE tenant = ?1 AND workflow = ?2 AND bucket = ?3 AND key = ?4",
                params![scope.tenant, scope.workflow, bucket, key],
            )
            .map_err(|e| self.err(e))?;
            Ok(())
        })
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
    }

    fn increment(&self, scope: &KvScope, bucket: &str, key: &str, delta: i64, quota: &KvQuota) -> Result<i64, KvError> {
        // The read and the write are one transaction: no update is lost.
        self.write(|tx| {
            let stored = value(tx, scope, bucket, key).map_err(|e| self.err(e))?;
            let next = add_to_stored(key, stored.as_deref(), delta)?;
            self.put(tx, scope, bucket, key, next.to_string().as_bytes(), quota)?;
            Ok(next)
        })
    }

    fn compare_and_swap(
        &self,
        scope: &KvScope,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
        quota: &KvQuota,
    ) -> Result<bool, KvError> {
        self.write(|tx| {
            if value(tx, scope, bucket, key).map_err(|e| self.err(e))?.as_deref() != expected {
                return Ok(false);
            }
            self.put(tx, scope, bucket, key, new, quota)?;
            Ok(true)
        })
    }
}
