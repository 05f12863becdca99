//! The queue on PostgreSQL. Claims take one transaction-scoped advisory
//! lock, so they are handed out one batch at a time across every process
//! and a tenant's `max_concurrent` holds for the whole cluster; within it,
//! the rows are locked `FOR UPDATE SKIP LOCKED`, so a claim never waits for
//! a worker renewing or completing a task.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Row;

use super::PgStore;
use super::listen::{RESULTS, TASKS};
use crate::run::now_ms;
use crate::store::StoreError;
use crate::store::queue::{Candidate, Claim, Claimed, Queue, Shares, Task, TaskState, fair_pick};
use crate::store::rows::{expiry, json, text};

/// The advisory lock claims take in turn.
const CLAIM_LOCK: i64 = 0x5354_4550_424f_5802;

const CLAIM_COLUMNS: &str = "id, run_id, key, attempt, tenant, request, owner, token, claims";

fn claim_from(row: &Row) -> Result<Claim, String> {
    Ok(Claim {
        id: row.get(0),
        task: Task {
            run_id: row.get(1),
            key: row.get(2),
            attempt: u32::try_from(row.get::<_, i64>(3)).map_err(|err| err.to_string())?,
            tenant: row.get(4),
            request: json(Some(row.get(5))).unwrap_or(Value::Null),
        },
        owner: row.get(6),
        token: row.get::<_, i64>(7).cast_unsigned(),
        claims: u32::try_from(row.get::<_, i64>(8)).unwrap_or(u32::MAX),
    })
}

impl Queue for PgStore {
    fn enqueue(&self, task: &Task) -> Result<i64, StoreError> {
        let task = task.clone();
        self.call(move |client| async move {
            let attempt = i64::from(task.attempt);
            let inserted = client
                .query_opt(
                    &format!(
                        "INSERT INTO tasks (run_id, key, attempt, tenant, request, state)
                         VALUES ($1, $2, $3, $4, $5, 'ready') ON CONFLICT (run_id, key, attempt) DO NOTHING
                         RETURNING id, pg_notify('{TASKS}', '')::text"
                    ),
                    &[&task.run_id, &task.key, &attempt, &task.tenant, &text(&task.request)],
                )
                .await?;
            match inserted {
                Some(row) => Ok(row.get(0)),
                None => {
                    let row = client
                        .query_one(
                            "SELECT id FROM tasks WHERE run_id = $1 AND key = $2 AND attempt = $3",
                            &[&task.run_id, &task.key, &attempt],
                        )
                        .await?;
                    Ok(row.get(0))
                }
            }
        })
    }

    fn claim(&self, owner: &str, max: usize, ttl: Duration, shares: &Shares) -> Result<Claimed, StoreError> {
        let (owner, shares, place) = (owner.to_owned(), shares.clone(), self.place.clone());
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let claimed = self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK]).await?;
            let now = now_ms() as i64;
            let holds: HashMap<String, usize> = tx
                .query(
                    "SELECT tenant, COUNT(*) FROM tasks WHERE state = 'claimed' AND expires_ms > $1 GROUP BY tenant",
                    &[&now],
                )
                .await?
                .iter()
                .map(|row| (row.get(0), usize::try_from(row.get::<_, i64>(1)).unwrap_or(usize::MAX)))
                .collect();
            // Each tenant's oldest claimable tasks, as many as one claim
            // could take of them.
            let candidates = tx
                .query(
                    "SELECT id, tenant FROM (
                         SELECT id, tenant, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY id) AS rank FROM tasks
                         WHERE state = 'ready' OR (state = 'claimed' AND expires_ms <= $1)
                     ) AS open WHERE rank <= $2",
                    &[&now, &limit],
                )
                .await?
                .iter()
                .map(|row| Candidate { id: row.get(0), tenant: row.get(1) })
                .collect();
            let (picked, held_back) = fair_pick(candidates, &holds, &shares, max);
            let rows = tx
                .query(
                    &format!(
                        "UPDATE tasks SET state = 'claimed', owner = $2, token = token + 1, claims = claims + 1,
                             expires_ms = $3
                         WHERE id IN (SELECT id FROM tasks WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)
                         RETURNING {CLAIM_COLUMNS}"
                    ),
                    &[&picked, &owner, &expiry(ttl)],
                )
                .await?;
            tx.commit().await?;
            let claims = rows.iter().map(claim_from).collect::<Result<Vec<_>, String>>();
            Ok(claims.map(|claims| Claimed { claims, held_back }))
        })?;
        claimed.map_err(|detail| StoreError::Database { place: place.to_string(), detail })
    }

    fn renew(&self, claim: &Claim, ttl: Duration) -> Result<(), StoreError> {
        let held = claim.clone();
        let renewed = self.call(move |client| async move {
            client
                .execute(
                    "UPDATE tasks SET expires_ms = $4 WHERE id = $1 AND owner = $2 AND token = $3 AND state = 'claimed'",
                    &[&held.id, &held.owner, &held.token.cast_signed(), &expiry(ttl)],
                )
                .await
        })?;
        if renewed == 0 { Err(StoreError::Fenced { task: claim.id }) } else { Ok(()) }
    }

    fn complete(&self, claim: &Claim, result: &Value) -> Result<(), StoreError> {
        let (held, result) = (claim.clone(), text(result));
        let completed = self.call(move |client| async move {
            client
                .query(
                    &format!(
                        "UPDATE tasks SET state = 'done', result = $4, owner = NULL, expires_ms = NULL
                         WHERE id = $1 AND owner = $2 AND token = $3 AND state = 'claimed'
                         RETURNING pg_notify('{RESULTS}', '')::text"
                    ),
                    &[&held.id, &held.owner, &held.token.cast_signed(), &result],
                )
                .await
        })?;
        if !completed.is_empty() {
            return Ok(());
        }
        // Done already with this claim's token: an earlier try committed,
        // and its answer was lost.
        let held = claim.clone();
        let mine = self.call(move |client| async move {
            client
                .query_opt(
                    "SELECT 1 FROM tasks WHERE id = $1 AND token = $2 AND state = 'done'",
                    &[&held.id, &held.token.cast_signed()],
                )
                .await
        })?;
        if mine.is_some() { Ok(()) } else { Err(StoreError::Fenced { task: claim.id }) }
    }

    fn find_task(&self, run_id: &str, key: &str, attempt: u32) -> Result<Option<i64>, StoreError> {
        let (run_id, key, attempt) = (run_id.to_owned(), key.to_owned(), i64::from(attempt));
        self.call(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT id FROM tasks WHERE run_id = $1 AND key = $2 AND attempt = $3",
                    &[&run_id, &key, &attempt],
                )
                .await?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn task_state(&self, id: i64) -> Result<TaskState, StoreError> {
        let found = self.rows(
            "SELECT state, owner, expires_ms, result FROM tasks WHERE id = $1".into(),
            vec![Box::new(id)],
            |row| {
                Ok(match row.get::<_, &str>(0) {
                    "done" => TaskState::Done(json(row.get(3)).unwrap_or(Value::Null)),
                    "claimed" => TaskState::Claimed {
                        owner: row.get::<_, Option<String>>(1).unwrap_or_default(),
                        expires_ms: row.get::<_, Option<i64>>(2).unwrap_or_default(),
                    },
                    _ => TaskState::Ready,
                })
            },
        )?;
        found.into_iter().next().ok_or(StoreError::NoSuchTask(id))
    }

    fn results(&self, ids: &[i64]) -> Result<Vec<(i64, Value)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        self.call(move |client| async move {
            let rows =
                client.query("SELECT id, result FROM tasks WHERE state = 'done' AND id = ANY($1)", &[&ids]).await?;
            Ok(rows.iter().map(|row| (row.get(0), json(row.get(1)).unwrap_or(Value::Null))).collect())
        })
    }

    fn signals(&self) -> &crate::store::Signals {
        &self.signals
    }
}
