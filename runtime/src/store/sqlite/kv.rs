//! `wasi:keyvalue` state in the SQLite store: one table keyed by tenant,
//! workflow, bucket and key; `increment` and compare-and-swap read and
//! write in one transaction.

use rusqlite::{Connection, OptionalExtension, params};

use super::Database;
use crate::store::{KeyValueStore, KvError, KvScope, StoreError, add_to_stored};

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
