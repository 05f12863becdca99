//! The service's records in the SQLite store: tokens, workflow versions and
//! idempotency keys, in the same file as the runs they point at.

use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{OptionalExtension, Row, params};
use serde_json::Value;

use super::Database;
use super::journal::insert_run;
use super::writer::{Job, Kind};
use crate::run::{Run, now_ms};
use crate::store::{Lease, Pending, Registry, Started, StoreError, TokenRecord, WorkflowVersion};

/// A wait (`w`) that has not ended.
const PENDING: &str = "NOT w.ended";

const TOKEN_COLUMNS: &str = "id, tenant, name, created_ms, revoked_ms";
const VERSION_COLUMNS: &str = "tenant, name, version, digest, entry, created_ms";

fn token_from(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.get(0)?,
        tenant: row.get(1)?,
        name: row.get(2)?,
        created_ms: row.get(3)?,
        revoked_ms: row.get(4)?,
    })
}

fn version_from(row: &Row<'_>) -> rusqlite::Result<WorkflowVersion> {
    Ok(WorkflowVersion {
        tenant: row.get(0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        digest: row.get(3)?,
        entry: row.get(4)?,
        created_ms: row.get(5)?,
    })
}

/// The run a key started, and the hash of the request that started it.
fn earlier_request(conn: &rusqlite::Connection, tenant: &str, key: &str) -> rusqlite::Result<Option<(String, String)>> {
    conn.prepare_cached("SELECT run_id, request FROM idempotency_keys WHERE tenant = ?1 AND key = ?2")?
        .query_row(params![tenant, key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
}

impl Registry for Database {
    fn create_token(&self, token: &TokenRecord, hash: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (id, hash, tenant, name, created_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![token.id, hash, token.tenant, token.name, token.created_ms, token.revoked_ms],
            )
            .map(drop)
        })
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1 AND revoked_ms IS NULL"))?
                .query_row(params![hash], token_from)
                .optional()
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_ms, id"))?;
            statement.query_map([], token_from)?.collect()
        })
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            let changed = tx.execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                params![id, now_ms() as i64],
            )?;
            Ok(changed > 0)
        })
    }

    fn deploy(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        entry: &str,
    ) -> Result<(WorkflowVersion, bool), StoreError> {
        self.write(|tx| {
            let newest = tx
                .query_row(
                    &format!(
                        "SELECT {VERSION_COLUMNS} FROM workflow_versions WHERE tenant = ?1 AND name = ?2
                         ORDER BY version DESC LIMIT 1"
                    ),
                    params![tenant, name],
                    version_from,
                )
                .optional()?;
            if let Some(newest) = newest.as_ref().filter(|newest| newest.digest == digest && newest.entry == entry) {
                return Ok((newest.clone(), false));
            }
            let version = WorkflowVersion {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                version: newest.map_or(1, |newest| newest.version + 1),
                digest: digest.to_owned(),
                entry: entry.to_owned(),
                created_ms: now_ms() as i64,
            };
            tx.execute(
                &format!("INSERT INTO workflow_versions ({VERSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    version.tenant,
                    version.name,
                    version.version,
                    version.digest,
                    version.entry,
                    version.created_ms
                ],
            )?;
            Ok((version, true))
        })
    }

    fn workflow_version(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<WorkflowVersion>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions
                 WHERE tenant = ?1 AND name = ?2 AND (?3 IS NULL OR version = ?3)
                 ORDER BY version DESC LIMIT 1"
            ))?
            .query_row(params![tenant, name, version], version_from)
            .optional()
        })
    }

    fn list_workflows(&self, tenant: &str) -> Result<Vec<WorkflowVersion>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions AS v WHERE tenant = ?1
                 AND version = (SELECT MAX(version) FROM workflow_versions WHERE tenant = v.tenant AND name = v.name)
                 ORDER BY name"
            ))?;
            statement.query_map(params![tenant], version_from)?.collect()
        })
    }

    fn workflow_versions(&self, tenant: &str, name: &str) -> Result<Vec<WorkflowVersion>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions WHERE tenant = ?1 AND name = ?2 ORDER BY version DESC"
            ))?;
            statement.query_map(params![tenant, name], version_from)?.collect()
        })
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO blobs (digest, bytes) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![digest, bytes],
            )
        })?;
        Ok(())
    }

    fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT bytes FROM blobs WHERE digest = ?1", params![digest], |row| row.get(0)).optional()
        })
    }

    fn all_workflows(&self) -> Result<Vec<WorkflowVersion>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {VERSION_COLUMNS} FROM workflow_versions AS v
                 WHERE version = (SELECT MAX(version) FROM workflow_versions WHERE tenant = v.tenant AND name = v.name)
                 ORDER BY tenant, name"
            ))?;
            statement.query_map([], version_from)?.collect()
        })
    }

    fn schedule_tick(&self, tenant: &str, workflow: &str, schedule: &str) -> Result<Option<f64>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT tick_ms FROM schedule_ticks WHERE tenant = ?1 AND workflow = ?2 AND schedule = ?3",
            )?
            .query_row(params![tenant, workflow, schedule], |row| row.get(0))
            .optional()
        })
    }

    fn set_schedule_tick(&self, tenant: &str, workflow: &str, schedule: &str, tick_ms: f64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO schedule_ticks (tenant, workflow, schedule, tick_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO UPDATE SET tick_ms = MAX(tick_ms, excluded.tick_ms)",
                params![tenant, workflow, schedule, tick_ms],
            )
            .map(drop)
        })
    }

    fn runs_to_wake(&self, now_ms: f64) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT DISTINCT w.run_id FROM waits AS w JOIN runs AS r ON r.id = w.run_id
                 WHERE r.status = 'waiting' AND {PENDING}
                 AND (w.deadline_ms <= ?1 OR EXISTS
                      (SELECT 1 FROM run_events AS e WHERE e.run_id = w.run_id AND e.name = w.event))"
            ))?;
            statement.query_map(params![now_ms], |row| row.get(0))?.collect()
        })
    }

    fn next_wait_deadline(&self) -> Result<Option<f64>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT MIN(w.deadline_ms) FROM waits AS w JOIN runs AS r ON r.id = w.run_id
                 WHERE r.status = 'waiting' AND {PENDING}"
            ))?
            .query_row([], |row| row.get(0))
        })
    }

    fn idempotency_key(&self, tenant: &str, key: &str) -> Result<Option<(String, String)>, StoreError> {
        self.read(|conn| earlier_request(conn, tenant, key))
    }

    fn create_run_once(&self, run: &Run, fingerprint: &Value, key: &str, request: &str) -> Pending<Started> {
        // The record may run again (a batch is retried without a record
        // that failed), so it leaves its latest outcome here.
        let outcome = Arc::new(Mutex::new(None));
        let slot = outcome.clone();
        let (record, fingerprint, key, request) =
            (run.clone(), fingerprint.clone(), key.to_owned(), request.to_owned());
        let created = self.queue(
            &run.id,
            Kind::Awaited,
            Job::Statements(Box::new(move |conn| {
                let started = match earlier_request(conn, &record.tenant, &key)? {
                    Some((run_id, earlier)) if earlier == request => Started::Existing(run_id),
                    Some((run_id, _)) => Started::Conflict(run_id),
                    None => {
                        insert_run(conn, &record, &fingerprint)?;
                        conn.execute(
                            "INSERT INTO idempotency_keys (tenant, key, request, run_id) VALUES (?1, ?2, ?3, ?4)",
                            params![record.tenant, key, request, record.id],
                        )?;
                        Started::Created(Lease::created(&record.id))
                    }
                };
                *slot.lock() = Some(started);
                Ok(())
            })),
        );
        let held = self.writer.held.clone();
        Box::pin(async move {
            created.await?;
            let started = outcome.lock().take().ok_or(StoreError::WriterStopped)?;
            if let Started::Created(lease) = &started {
                held.hold(lease);
            }
            Ok(started)
        })
    }
}
