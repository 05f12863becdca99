//! The queue on PostgreSQL. Claims take one transaction-scoped advisory
//! lock, so they are handed out one batch at a time across every process
//! and a tenant's `max_concurrent` holds for the whole cluster; within it,
//! the rows are locked `FOR UPDATE SKIP LOCKED`, so a claim never waits for
//! a worker renewing or completing a task.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::PgStore;
use super::listen::{RESULTS, TASKS, announced, notify};
use crate::run::now_ms;
use crate::store::StoreError;
use crate::store::queue::{Candidate, Claim, Claimed, Queue, Room, Shares, Task, TaskState, fair_pick};
use crate::store::rows::{expiry, json, text};

/// The advisory lock claims take in turn.
const CLAIM_LOCK: i64 = 0x5354_4550_424f_5802;

/// Each statement is prepared once per connection (the pool keeps them), so
/// a call costs one round trip rather than two.
const ENQUEUE: &str = "INSERT INTO tasks (run_id, key, attempt, tenant, request, state)
     VALUES ($1, $2, $3, $4, $5, 'ready') ON CONFLICT (run_id, key, attempt) DO NOTHING RETURNING id";
const FIND: &str = "SELECT id FROM tasks WHERE run_id = $1 AND key = $2 AND attempt = $3";
const RENEW: &str =
    "UPDATE tasks SET expires_ms = $4 WHERE id = $1 AND owner = $2 AND token = $3 AND state = 'claimed'";
const START: &str = "UPDATE tasks SET started = TRUE WHERE id = $1 AND owner = $2 AND token = $3 AND state = 'claimed'";
const COMPLETE: &str = "UPDATE tasks SET state = 'done', result = $4, owner = NULL, expires_ms = NULL
     WHERE id = $1 AND owner = $2 AND token = $3 AND state = 'claimed'";
const OPEN_BY_TENANT: &str =
    "SELECT tenant, state, COUNT(*) FROM tasks WHERE state IN ('ready', 'claimed') GROUP BY tenant, state";
const RESULTS_OF: &str = "SELECT id, result FROM tasks WHERE state = 'done' AND id = ANY($1)";
/// A claim's commit does not wait for the disk, so the claims' turn is not
/// held across a WAL flush. A claim the database loses in a crash is
/// handed out again, as if it had expired (another holder's result is
/// refused; attempts are at least once anyway, keyed by their idempotency
/// key), and nothing else is lost: enqueues and results commit durably.
const QUICK_COMMIT: &str = "SELECT set_config('synchronous_commit', 'off', true)";
/// Claims take turns on [`CLAIM_LOCK`].
const CLAIM_TURN: &str = "SELECT pg_advisory_xact_lock($1)";
/// Live claims by tenant.
const HOLDS: &str = "SELECT tenant, COUNT(*) FROM tasks WHERE state = 'claimed' AND expires_ms > $1 GROUP BY tenant";
/// Each tenant's oldest ready tasks, as many as one claim could take of
/// them, and the tasks whose claims expired; in queue order within each
/// tenant. The tenants are found by skipping through the ready tasks'
/// index a tenant at a time, and each tenant's tasks read from its head, so
/// a claim reads about what it could take, however many tasks wait.
const CANDIDATES: &str = "WITH RECURSIVE tenants (tenant) AS (
         SELECT MIN(tenant) FROM tasks WHERE state = 'ready'
         UNION ALL
         SELECT (SELECT MIN(tenant) FROM tasks WHERE state = 'ready' AND tenant > tenants.tenant)
         FROM tenants WHERE tenant IS NOT NULL
     )
     SELECT id, tenant FROM (
         SELECT ready.id, ready.tenant FROM tenants CROSS JOIN LATERAL (
             SELECT id, tenant FROM tasks WHERE state = 'ready' AND tasks.tenant = tenants.tenant
             ORDER BY id LIMIT $2
         ) AS ready
         UNION ALL
         SELECT id, tenant FROM tasks WHERE state = 'claimed' AND expires_ms <= $1
     ) AS open ORDER BY tenant, id";
/// Claims the picked tasks that are still claimable.
const TAKE: &str = "UPDATE tasks SET state = 'claimed', owner = $2, token = token + 1, claims = claims + 1,
         expires_ms = $3, started = FALSE
     WHERE id IN (SELECT id FROM tasks WHERE id = ANY($1)
                  AND (state = 'ready' OR (state = 'claimed' AND expires_ms <= $4)) FOR UPDATE SKIP LOCKED)
     RETURNING id, run_id, key, attempt, tenant, request, owner, token, claims";

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
            let (insert, find) = (client.prepare_cached(ENQUEUE).await?, client.prepare_cached(FIND).await?);
            let inserted = client
                .query_opt(&insert, &[&task.run_id, &task.key, &attempt, &task.tenant, &text(&task.request)])
                .await?;
            let id = match inserted {
                Some(row) => row.get(0),
                None => client.query_one(&find, &[&task.run_id, &task.key, &attempt]).await?.get(0),
            };
            // Also when it was there already: an earlier try's notice may
            // have been lost with its answer.
            notify(&client, TASKS, announced(&task.tenant)).await;
            Ok(id)
        })
    }

    fn claim(&self, owner: &str, room: Room, ttl: Duration, shares: &Shares) -> Result<Claimed, StoreError> {
        let (owner, shares, place) = (owner.to_owned(), shares.clone(), self.place.clone());
        let limit = i64::try_from(room.total()).unwrap_or(i64::MAX);
        let claimed = self.call(move |mut client| async move {
            let tx = client.transaction().await?;
            // Prepared before anything is sent (once per connection; the
            // pool keeps them), so the three reads go out together, in
            // order, and the lock is held for two round trips rather than
            // two a statement.
            let (quick, turn, holds, candidates, take) = (
                tx.prepare_cached(QUICK_COMMIT).await?,
                tx.prepare_cached(CLAIM_TURN).await?,
                tx.prepare_cached(HOLDS).await?,
                tx.prepare_cached(CANDIDATES).await?,
                tx.prepare_cached(TAKE).await?,
            );
            let now = now_ms() as i64;
            let (holds_params, candidates_params): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) =
                ([&now], [&now, &limit]);
            let (_, _, holds, candidates) = futures_util::try_join!(
                tx.query(&quick, &[]),
                tx.execute(&turn, &[&CLAIM_LOCK]),
                tx.query(&holds, &holds_params),
                tx.query(&candidates, &candidates_params),
            )?;
            let holds: HashMap<String, usize> = holds
                .iter()
                .map(|row| (row.get(0), usize::try_from(row.get::<_, i64>(1)).unwrap_or(usize::MAX)))
                .collect();
            let candidates = candidates.iter().map(|row| Candidate { id: row.get(0), tenant: row.get(1) }).collect();
            let picked = fair_pick(candidates, &holds, &shares, room);
            let rows = tx.query(&take, &[&picked.ids, &owner, &expiry(ttl), &now]).await?;
            tx.commit().await?;
            let claims = rows.iter().map(claim_from).collect::<Result<Vec<_>, String>>();
            Ok(claims.map(|claims| Claimed { claims, held_back: picked.held_back, passed_over: picked.passed_over }))
        })?;
        claimed.map_err(|detail| StoreError::Database { place: place.to_string(), detail })
    }

    fn renew(&self, claim: &Claim, ttl: Duration) -> Result<(), StoreError> {
        let held = claim.clone();
        let renewed = self.call(move |client| async move {
            let renew = client.prepare_cached(RENEW).await?;
            client.execute(&renew, &[&held.id, &held.owner, &held.token.cast_signed(), &expiry(ttl)]).await
        })?;
        if renewed == 0 { Err(StoreError::Fenced { task: claim.id }) } else { Ok(()) }
    }

    fn start(&self, claim: &Claim) -> Result<(), StoreError> {
        let held = claim.clone();
        let started = self.call(move |client| async move {
            let start = client.prepare_cached(START).await?;
            client.execute(&start, &[&held.id, &held.owner, &held.token.cast_signed()]).await
        })?;
        if started == 0 { Err(StoreError::Fenced { task: claim.id }) } else { Ok(()) }
    }

    fn complete(&self, claim: &Claim, result: &Value) -> Result<(), StoreError> {
        let (held, result) = (claim.clone(), text(result));
        let completed = self.call(move |client| async move {
            let complete = client.prepare_cached(COMPLETE).await?;
            let completed =
                client.execute(&complete, &[&held.id, &held.owner, &held.token.cast_signed(), &result]).await?;
            if completed > 0 {
                notify(&client, RESULTS, "").await;
            }
            Ok(completed)
        })?;
        if completed > 0 {
            return Ok(());
        }
        // Done already with this claim's token: an earlier try committed,
        // and its answer was lost.
        let held = claim.clone();
        let mine = self.call(move |client| async move {
            let mine = client
                .query_opt(
                    "SELECT 1 FROM tasks WHERE id = $1 AND token = $2 AND state = 'done'",
                    &[&held.id, &held.token.cast_signed()],
                )
                .await?;
            // Its notice may have been lost with the answer.
            if mine.is_some() {
                notify(&client, RESULTS, "").await;
            }
            Ok(mine)
        })?;
        if mine.is_some() { Ok(()) } else { Err(StoreError::Fenced { task: claim.id }) }
    }

    fn find_task(&self, run_id: &str, key: &str, attempt: u32) -> Result<Option<i64>, StoreError> {
        let (run_id, key, attempt) = (run_id.to_owned(), key.to_owned(), i64::from(attempt));
        self.call(move |client| async move {
            let find = client.prepare_cached(FIND).await?;
            Ok(client.query_opt(&find, &[&run_id, &key, &attempt]).await?.map(|row| row.get(0)))
        })
    }

    fn task_state(&self, id: i64) -> Result<TaskState, StoreError> {
        let found = self.rows(
            "SELECT state, owner, expires_ms, result, started FROM tasks WHERE id = $1".into(),
            vec![Box::new(id)],
            |row| {
                Ok(match row.get::<_, &str>(0) {
                    "done" => TaskState::Done(json(row.get(3)).unwrap_or(Value::Null)),
                    "claimed" => TaskState::Claimed {
                        owner: row.get::<_, Option<String>>(1).unwrap_or_default(),
                        expires_ms: row.get::<_, Option<i64>>(2).unwrap_or_default(),
                        started: row.get(4),
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
            let results = client.prepare_cached(RESULTS_OF).await?;
            let rows = client.query(&results, &[&ids]).await?;
            Ok(rows.iter().map(|row| (row.get(0), json(row.get(1)).unwrap_or(Value::Null))).collect())
        })
    }

    fn snapshot(&self) -> Result<crate::metrics::Snapshot, StoreError> {
        let rows = self.call(|client| async move {
            let rows = client.query(OPEN_BY_TENANT, &[]).await?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect())
        })?;
        Ok(crate::store::queue::snapshot(rows))
    }

    fn signals(&self) -> &crate::store::Signals {
        &self.signals
    }
}
