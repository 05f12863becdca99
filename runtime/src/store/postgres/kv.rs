//! `wasi:keyvalue` state on PostgreSQL: the same table and per-tenant usage
//! as on SQLite. Every write takes its tenant's usage row first (`FOR
//! UPDATE`), so a tenant's writes from any process take turns: `increment`
//! and compare-and-swap lose no update, and the usage stays exact.

use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Transaction;

use super::{block, pg_error, pool_error};
use crate::failpoint::failpoint;
use crate::store::{KeyValueStore, KvError, KvQuota, KvScope, KvUsage, StoreError, add_to_stored};

/// The key-value state in a PostgreSQL store.
#[derive(Debug)]
pub struct PgKeyValues {
    pub(super) pool: Pool,
    pub(super) place: Arc<str>,
    pub(super) handle: tokio::runtime::Handle,
}

/// What a key-value transaction can fail with: the store's own refusal, or
/// the database.
enum Failed {
    Kv(KvError),
    Pg(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Failed {
    fn from(err: tokio_postgres::Error) -> Self {
        Failed::Pg(err)
    }
}

impl From<KvError> for Failed {
    fn from(err: KvError) -> Self {
        Failed::Kv(err)
    }
}

impl PgKeyValues {
    /// Runs `call` with a pooled connection on the store's runtime and
    /// waits for it.
    fn call<T, F>(&self, call: impl FnOnce(Object) -> F + Send + 'static) -> Result<T, KvError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Failed>> + Send,
    {
        let (pool, place) = (self.pool.clone(), self.place.clone());
        let result = block(&self.handle, async move {
            let client = pool.get().await.map_err(|err| pool_error(&place, err))?;
            Ok(call(client).await.map_err(|failed| match failed {
                Failed::Kv(err) => err,
                Failed::Pg(err) => KvError::Storage(pg_error(&place, &err).to_string()),
            }))
        });
        result.unwrap_or_else(|err: StoreError| Err(KvError::Storage(err.to_string())))
    }
}

/// Commits a key-value write.
async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    failpoint!("kv.before-commit");
    tx.commit().await?;
    failpoint!("kv.after-commit");
    Ok(())
}

/// The tenant's usage, its row locked until the transaction ends.
async fn usage(tx: &Transaction<'_>, tenant: &str) -> Result<KvUsage, tokio_postgres::Error> {
    tx.execute("INSERT INTO kv_usage (tenant, bytes, keys) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING", &[&tenant])
        .await?;
    let row = tx.query_one("SELECT bytes, keys FROM kv_usage WHERE tenant = $1 FOR UPDATE", &[&tenant]).await?;
    Ok(KvUsage { bytes: row.get::<_, i64>(0).max(0) as u64, keys: row.get::<_, i64>(1).max(0) as u64 })
}

async fn set_usage(tx: &Transaction<'_>, tenant: &str, usage: KvUsage) -> Result<(), tokio_postgres::Error> {
    let (bytes, keys) = (i64::try_from(usage.bytes).unwrap_or(i64::MAX), i64::try_from(usage.keys).unwrap_or(i64::MAX));
    tx.execute("UPDATE kv_usage SET bytes = $2, keys = $3 WHERE tenant = $1", &[&tenant, &bytes, &keys]).await.map(drop)
}

/// The value of one key.
async fn value(
    tx: &Transaction<'_>,
    scope: &KvScope,
    bucket: &str,
    key: &str,
) -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT value FROM kv WHERE tenant = $1 AND workflow = $2 AND bucket = $3 AND key = $4",
            &[&scope.tenant, &scope.workflow, &bucket, &key],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// Stores `new` at `key` if the tenant's quota allows it; the usage row is
/// locked already.
async fn put(
    tx: &Transaction<'_>,
    scope: &KvScope,
    bucket: &str,
    key: &str,
    new: &[u8],
    quota: &KvQuota,
    usage: KvUsage,
) -> Result<(), Failed> {
    let old = tx
        .query_opt(
            "SELECT octet_length(value) FROM kv WHERE tenant = $1 AND workflow = $2 AND bucket = $3 AND key = $4",
            &[&scope.tenant, &scope.workflow, &bucket, &key],
        )
        .await?
        .map(|row| row.get::<_, i32>(0).max(0) as usize);
    let usage = usage.change(scope, bucket, key, old, Some(new.len()), quota)?;
    set_usage(tx, &scope.tenant, usage).await?;
    tx.execute(
        "INSERT INTO kv (tenant, workflow, bucket, key, value) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant, workflow, bucket, key) DO UPDATE SET value = excluded.value",
        &[&scope.tenant, &scope.workflow, &bucket, &key, &new],
    )
    .await?;
    Ok(())
}

impl KeyValueStore for PgKeyValues {
    fn get(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (scope, bucket, key) = (scope.clone(), bucket.to_owned(), key.to_owned());
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            Ok(value(&tx, &scope, &bucket, &key).await?)
        })
    }

    fn set(&self, scope: &KvScope, bucket: &str, key: &str, new: &[u8], quota: &KvQuota) -> Result<(), KvError> {
        let (scope, bucket, key, new, quota) = (scope.clone(), bucket.to_owned(), key.to_owned(), new.to_vec(), *quota);
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let usage = usage(&tx, &scope.tenant).await?;
            put(&tx, &scope, &bucket, &key, &new, &quota, usage).await?;
            Ok(commit(tx).await?)
        })
    }

    fn delete(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<(), KvError> {
        let (scope, bucket, key) = (scope.clone(), bucket.to_owned(), key.to_owned());
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let usage = usage(&tx, &scope.tenant).await?;
            let removed = tx
                .query_opt(
                    "DELETE FROM kv WHERE tenant = $1 AND workflow = $2 AND bucket = $3 AND key = $4
                     RETURNING octet_length(value)",
                    &[&scope.tenant, &scope.workflow, &bucket, &key],
                )
                .await?;
            if let Some(row) = removed {
                let old = row.get::<_, i32>(0).max(0) as usize;
                set_usage(&tx, &scope.tenant, usage.removed(&scope, &bucket, &key, old)).await?;
            }
            Ok(commit(tx).await?)
        })
    }

    fn list_keys(
        &self,
        scope: &KvScope,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        let (scope, bucket, after) = (scope.clone(), bucket.to_owned(), after.unwrap_or("").to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    "SELECT key FROM kv WHERE tenant = $1 AND workflow = $2 AND bucket = $3 AND key > $4
                     ORDER BY key LIMIT $5",
                    &[&scope.tenant, &scope.workflow, &bucket, &after, &limit],
                )
                .await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn increment(&self, scope: &KvScope, bucket: &str, key: &str, delta: i64, quota: &KvQuota) -> Result<i64, KvError> {
        let (scope, bucket, key, quota) = (scope.clone(), bucket.to_owned(), key.to_owned(), *quota);
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let usage = usage(&tx, &scope.tenant).await?;
            let stored = value(&tx, &scope, &bucket, &key).await?;
            let next = add_to_stored(&key, stored.as_deref(), delta)?;
            put(&tx, &scope, &bucket, &key, next.to_string().as_bytes(), &quota, usage).await?;
            commit(tx).await?;
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
        let (scope, bucket, key, quota) = (scope.clone(), bucket.to_owned(), key.to_owned(), *quota);
        let (expected, new) = (expected.map(<[u8]>::to_vec), new.to_vec());
        self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            let usage = usage(&tx, &scope.tenant).await?;
            if value(&tx, &scope, &bucket, &key).await? != expected {
                return Ok(false);
            }
            put(&tx, &scope, &bucket, &key, &new, &quota, usage).await?;
            commit(tx).await?;
            Ok(true)
        })
    }
}
