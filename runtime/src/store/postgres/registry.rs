//! The service's records on PostgreSQL: tokens, workflow versions, schedule
//! ticks, waits to settle and idempotency keys.

use serde_json::Value;
use tokio_postgres::Row;

use super::journal::insert_run;
use super::{Param, PgStore, pg_error, pool_error};
use crate::failpoint::failpoint;
use crate::run::{Run, now_ms};
use crate::store::rows::text;
use crate::store::{Lease, Pending, Registry, Started, StoreError, TokenRecord, WorkflowVersion};

const TOKEN_COLUMNS: &str = "id, tenant, name, created_ms, revoked_ms";
const VERSION_COLUMNS: &str = "tenant, name, version, digest, entry, created_ms";

/// A wait (`w`) that has not ended.
const PENDING: &str = "NOT w.ended";

fn token_from(row: &Row) -> Result<TokenRecord, String> {
    Ok(TokenRecord {
        id: row.get(0),
        tenant: row.get(1),
        name: row.get(2),
        created_ms: row.get(3),
        revoked_ms: row.get(4),
    })
}

fn version_from(row: &Row) -> Result<WorkflowVersion, String> {
    Ok(WorkflowVersion {
        tenant: row.get(0),
        name: row.get(1),
        version: u32::try_from(row.get::<_, i64>(2)).map_err(|err| err.to_string())?,
        digest: row.get(3),
        entry: row.get(4),
        created_ms: row.get(5),
    })
}

impl Registry for PgStore {
    fn create_token(&self, token: &TokenRecord, hash: &str) -> Result<(), StoreError> {
        let (token, hash) = (token.clone(), hash.to_owned());
        self.call(move |client| async move {
            client
                .execute(
                    "INSERT INTO tokens (id, hash, tenant, name, created_ms, revoked_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&token.id, &hash, &token.tenant, &token.name, &token.created_ms, &token.revoked_ms],
                )
                .await
                .map(drop)
        })
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let found = self.rows(
            format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1 AND revoked_ms IS NULL"),
            vec![Box::new(hash.to_owned())],
            token_from,
        )?;
        Ok(found.into_iter().next())
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.rows(format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_ms, id"), Vec::new(), token_from)
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        let changed = self.call(move |client| async move {
            client
                .execute(
                    "UPDATE tokens SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL",
                    &[&id, &(now_ms() as i64)],
                )
                .await
        })?;
        Ok(changed > 0)
    }

    fn deploy(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        entry: &str,
    ) -> Result<(WorkflowVersion, bool), StoreError> {
        let (tenant, name, digest, entry) = (tenant.to_owned(), name.to_owned(), digest.to_owned(), entry.to_owned());
        let place = self.place.clone();
        let deployed = self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            // Deploys of one workflow from any process take turns.
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 1))", &[&tenant, &name]).await?;
            let newest = tx
                .query_opt(
                    &format!(
                        "SELECT {VERSION_COLUMNS} FROM workflow_versions WHERE tenant = $1 AND name = $2
                         ORDER BY version DESC LIMIT 1"
                    ),
                    &[&tenant, &name],
                )
                .await?
                .map(|row| version_from(&row));
            let newest = match newest.transpose() {
                Ok(newest) => newest,
                Err(detail) => return Ok(Err(detail)),
            };
            if let Some(newest) = newest.as_ref().filter(|newest| newest.digest == digest && newest.entry == entry) {
                return Ok(Ok((newest.clone(), false)));
            }
            let version = WorkflowVersion {
                tenant,
                name,
                version: newest.map_or(1, |newest| newest.version + 1),
                digest,
                entry,
                created_ms: now_ms() as i64,
            };
            tx.execute(
                &format!("INSERT INTO workflow_versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"),
                &[
                    &version.tenant,
                    &version.name,
                    &i64::from(version.version),
                    &version.digest,
                    &version.entry,
                    &version.created_ms,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok((version, true)))
        })?;
        deployed.map_err(|detail| StoreError::Database { place: place.to_string(), detail })
    }

    fn workflow_version(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<WorkflowVersion>, StoreError> {
        let found = self.rows(
            format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions
                 WHERE tenant = $1 AND name = $2 AND ($3::BIGINT IS NULL OR version = $3)
                 ORDER BY version DESC LIMIT 1"
            ),
            vec![Box::new(tenant.to_owned()), Box::new(name.to_owned()), Box::new(version.map(i64::from)) as Param],
            version_from,
        )?;
        Ok(found.into_iter().next())
    }

    fn list_workflows(&self, tenant: &str) -> Result<Vec<WorkflowVersion>, StoreError> {
        self.rows(
            format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions AS v WHERE tenant = $1
                 AND version = (SELECT MAX(version) FROM workflow_versions WHERE tenant = v.tenant AND name = v.name)
                 ORDER BY name"
            ),
            vec![Box::new(tenant.to_owned())],
            version_from,
        )
    }

    fn workflow_versions(&self, tenant: &str, name: &str) -> Result<Vec<WorkflowVersion>, StoreError> {
        self.rows(
            format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions WHERE tenant = $1 AND name = $2 ORDER BY version DESC"
            ),
            vec![Box::new(tenant.to_owned()), Box::new(name.to_owned())],
            version_from,
        )
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let (digest, bytes) = (digest.to_owned(), bytes.to_vec());
        self.call(move |client| async move {
            client
                .execute("INSERT INTO blobs (digest, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&digest, &bytes])
                .await
        })?;
        Ok(())
    }

    fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let digest = digest.to_owned();
        self.call(move |client| async move {
            let row = client.query_opt("SELECT bytes FROM blobs WHERE digest = $1", &[&digest]).await?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn all_workflows(&self) -> Result<Vec<WorkflowVersion>, StoreError> {
        self.rows(
            format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions AS v
                 WHERE version = (SELECT MAX(version) FROM workflow_versions WHERE tenant = v.tenant AND name = v.name)
                 ORDER BY tenant, name"
            ),
            Vec::new(),
            version_from,
        )
    }

    fn schedule_tick(&self, tenant: &str, workflow: &str, schedule: &str) -> Result<Option<f64>, StoreError> {
        let found = self.rows(
            "SELECT tick_ms FROM schedule_ticks WHERE tenant = $1 AND workflow = $2 AND schedule = $3".into(),
            vec![Box::new(tenant.to_owned()), Box::new(workflow.to_owned()), Box::new(schedule.to_owned())],
            |row| Ok(row.get::<_, f64>(0)),
        )?;
        Ok(found.into_iter().next())
    }

    fn set_schedule_tick(&self, tenant: &str, workflow: &str, schedule: &str, tick_ms: f64) -> Result<(), StoreError> {
        let (tenant, workflow, schedule) = (tenant.to_owned(), workflow.to_owned(), schedule.to_owned());
        self.call(move |client| async move {
            client
                .execute(
                    "INSERT INTO schedule_ticks (tenant, workflow, schedule, tick_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (tenant, workflow, schedule)
                     DO UPDATE SET tick_ms = GREATEST(schedule_ticks.tick_ms, excluded.tick_ms)",
                    &[&tenant, &workflow, &schedule, &tick_ms],
                )
                .await
                .map(drop)
        })
    }

    fn runs_to_wake(&self, now_ms: f64) -> Result<Vec<String>, StoreError> {
        self.rows(
            format!(
                "SELECT DISTINCT w.run_id FROM waits AS w JOIN runs AS r ON r.id = w.run_id
                 WHERE r.status = 'waiting' AND {PENDING}
                 AND (w.deadline_ms <= $1 OR EXISTS
                      (SELECT 1 FROM run_events AS e WHERE e.run_id = w.run_id AND e.name = w.event))"
            ),
            vec![Box::new(now_ms)],
            |row| Ok(row.get(0)),
        )
    }

    fn next_wait_deadline(&self) -> Result<Option<f64>, StoreError> {
        let found = self.rows(
            format!(
                "SELECT MIN(w.deadline_ms) FROM waits AS w JOIN runs AS r ON r.id = w.run_id
                 WHERE r.status = 'waiting' AND {PENDING}"
            ),
            Vec::new(),
            |row| Ok(row.get::<_, Option<f64>>(0)),
        )?;
        Ok(found.into_iter().next().flatten())
    }

    fn idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<(String, String)>, StoreError> {
        let found = self.rows(
            "SELECT run_id, request FROM idempotency_keys WHERE tenant = $1 AND key = $2".into(),
            vec![Box::new(tenant.to_owned()), Box::new(key.to_owned())],
            |row| Ok((row.get(0), row.get(1))),
        )?;
        Ok(found.into_iter().next())
    }

    fn create_run_once(&self, run: &Run, fingerprint: &Value, key: &str, request: &str) -> Pending<Started> {
        // A transaction of its own, not a record of the shared commit: it
        // may wait for another process's request with the same key, and
        // nobody else's records should wait with it.
        let (run, fingerprint, key, request) = (run.clone(), text(fingerprint), key.to_owned(), request.to_owned());
        let (pool, place, handle, held) =
            (self.pool.clone(), self.place.clone(), self.handle.clone(), self.writer.held.clone());
        let created = handle.spawn(async move {
            let client = pool.get().await.map_err(|err| pool_error(&place, err))?;
            once(client, &run, &fingerprint, &key, &request).await.map_err(|err| pg_error(&place, &err))
        });
        Box::pin(async move {
            let started = created.await.unwrap_or(Err(StoreError::WriterStopped))?;
            if let Started::Created(lease) = &started {
                held.hold(lease);
            }
            failpoint!("run.created");
            Ok(started)
        })
    }
}

/// Creates `run` unless its tenant started one with `key`, in one
/// transaction. Requests with one key from any process take turns on the
/// key's advisory lock, so the later one reads the earlier one's row.
async fn once(
    mut client: deadpool_postgres::Object,
    run: &Run,
    fingerprint: &str,
    key: &str,
    request: &str,
) -> Result<Started, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))", &[&run.tenant, &key]).await?;
    let earlier = tx
        .query_opt("SELECT run_id, request FROM idempotency_keys WHERE tenant = $1 AND key = $2", &[&run.tenant, &key])
        .await?;
    let started = match earlier {
        Some(row) if row.get::<_, &str>(1) == request => Started::Existing(row.get(0)),
        Some(row) => Started::Conflict(row.get(0)),
        None => {
            insert_run(&tx, run, fingerprint).await?;
            tx.execute(
                "INSERT INTO idempotency_keys (tenant, key, request, run_id) VALUES ($1, $2, $3, $4)",
                &[&run.tenant, &key, &request, &run.id],
            )
            .await?;
            Started::Created(Lease::created(&run.id))
        }
    };
    tx.commit().await?;
    Ok(started)
}
