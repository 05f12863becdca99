//! The queue in the SQLite store, for workers on one machine sharing a
//! data directory. A claim is one immediate transaction, which SQLite runs
//! one at a time across processes, so shares hold for every worker.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{OptionalExtension, Row, params};
use serde_json::Value;

use super::Database;
use crate::run::now_ms;
use crate::store::StoreError;
use crate::store::queue::{Candidate, Claim, Claimed, Queue, Room, Shares, Task, TaskState, fair_pick};
use crate::store::rows::{expiry, json, text};

const CLAIM_COLUMNS: &str = "id, run_id, key, attempt, tenant, request, owner, token, claims";

fn claim_from(row: &Row<'_>) -> rusqlite::Result<Claim> {
    Ok(Claim {
        id: row.get(0)?,
        task: Task {
            run_id: row.get(1)?,
            key: row.get(2)?,
            attempt: row.get(3)?,
            tenant: row.get(4)?,
            request: json(Some(row.get(5)?)).unwrap_or(Value::Null),
        },
        owner: row.get(6)?,
        token: row.get::<_, i64>(7)?.cast_unsigned(),
        claims: row.get(8)?,
    })
}

impl Queue for Database {
    fn enqueue(&self, task: &Task) -> Result<i64, StoreError> {
        let id = self.write(|tx| {
            tx.execute(
                "INSERT INTO tasks (run_id, key, attempt, tenant, request, state) VALUES (?1, ?2, ?3, ?4, ?5, 'ready')
                 ON CONFLICT (run_id, key, attempt) DO NOTHING",
                params![task.run_id, task.key, task.attempt, task.tenant, text(&task.request)],
            )?;
            tx.query_row(
                "SELECT id FROM tasks WHERE run_id = ?1 AND key = ?2 AND attempt = ?3",
                params![task.run_id, task.key, task.attempt],
                |row| row.get(0),
            )
        })?;
        self.signals.task(Some(&task.tenant));
        Ok(id)
    }

    fn claim(&self, owner: &str, room: Room, ttl: Duration, shares: &Shares) -> Result<Claimed, StoreError> {
        let limit = i64::try_from(room.total()).unwrap_or(i64::MAX);
        self.write(|tx| {
            let now = now_ms() as i64;
            let holds: HashMap<String, usize> = {
                let mut statement = tx.prepare_cached(
                    "SELECT tenant, COUNT(*) FROM tasks WHERE state = 'claimed' AND expires_ms > ?1 GROUP BY tenant",
                )?;
                let rows = statement.query_map(params![now], |row| {
                    Ok((row.get(0)?, usize::try_from(row.get::<_, i64>(1)?).unwrap_or(usize::MAX)))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let candidates: Vec<Candidate> = {
                let mut statement = tx.prepare_cached(
                    "SELECT id, tenant FROM (
                         SELECT id, tenant, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY id) AS rank FROM tasks
                         WHERE state = 'ready' OR (state = 'claimed' AND expires_ms <= ?1)
                     ) WHERE rank <= ?2",
                )?;
                let rows = statement
                    .query_map(params![now, limit], |row| Ok(Candidate { id: row.get(0)?, tenant: row.get(1)? }))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let until = expiry(ttl);
            let picked = fair_pick(candidates, &holds, shares, room);
            let mut claims = Vec::new();
            for id in picked.ids {
                let claim = tx
                    .query_row(
                        &format!(
                            "UPDATE tasks SET state = 'claimed', owner = ?2, token = token + 1, claims = claims + 1,
                                 expires_ms = ?3, started = 0
                             WHERE id = ?1 RETURNING {CLAIM_COLUMNS}"
                        ),
                        params![id, owner, until],
                        claim_from,
                    )
                    .optional()?;
                claims.extend(claim);
            }
            Ok(Claimed { claims, held_back: picked.held_back, passed_over: picked.passed_over })
        })
    }

    fn renew(&self, claim: &Claim, ttl: Duration) -> Result<(), StoreError> {
        let renewed = self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET expires_ms = ?4 WHERE id = ?1 AND owner = ?2 AND token = ?3 AND state = 'claimed'",
                params![claim.id, claim.owner, claim.token.cast_signed(), expiry(ttl)],
            )
        })?;
        if renewed == 0 { Err(StoreError::Fenced { task: claim.id }) } else { Ok(()) }
    }

    fn start(&self, claim: &Claim) -> Result<(), StoreError> {
        let started = self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET started = 1 WHERE id = ?1 AND owner = ?2 AND token = ?3 AND state = 'claimed'",
                params![claim.id, claim.owner, claim.token.cast_signed()],
            )
        })?;
        if started == 0 { Err(StoreError::Fenced { task: claim.id }) } else { Ok(()) }
    }

    fn complete(&self, claim: &Claim, result: &Value) -> Result<(), StoreError> {
        let completed = self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET state = 'done', result = ?4, owner = NULL, expires_ms = NULL
                 WHERE id = ?1 AND owner = ?2 AND token = ?3 AND state = 'claimed'",
                params![claim.id, claim.owner, claim.token.cast_signed(), text(result)],
            )
        })?;
        if completed == 0 {
            // Done already with this claim's token: it was completed before.
            let mine = self.read(|conn| {
                conn.query_row(
                    "SELECT 1 FROM tasks WHERE id = ?1 AND token = ?2 AND state = 'done'",
                    params![claim.id, claim.token.cast_signed()],
                    |_| Ok(()),
                )
                .optional()
            })?;
            return mine.ok_or(StoreError::Fenced { task: claim.id });
        }
        self.signals.result();
        Ok(())
    }

    fn find_task(&self, run_id: &str, key: &str, attempt: u32) -> Result<Option<i64>, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT id FROM tasks WHERE run_id = ?1 AND key = ?2 AND attempt = ?3",
                params![run_id, key, attempt],
                |row| row.get(0),
            )
            .optional()
        })
    }

    fn task_state(&self, id: i64) -> Result<TaskState, StoreError> {
        let found = self.read(|conn| {
            let sql = "SELECT state, owner, expires_ms, result, started FROM tasks WHERE id = ?1";
            conn.query_row(sql, params![id], |row| {
                Ok(match row.get::<_, String>(0)?.as_str() {
                    "done" => TaskState::Done(json(row.get(3)?).unwrap_or(Value::Null)),
                    "claimed" => TaskState::Claimed {
                        owner: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        expires_ms: row.get::<_, Option<i64>>(2)?.unwrap_or_default(),
                        started: row.get(4)?,
                    },
                    _ => TaskState::Ready,
                })
            })
            .optional()
        })?;
        found.ok_or(StoreError::NoSuchTask(id))
    }

    fn results(&self, ids: &[i64]) -> Result<Vec<(i64, Value)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(ids).unwrap_or_default();
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, result FROM tasks WHERE state = 'done' AND id IN (SELECT value FROM json_each(?1))",
            )?;
            let rows =
                statement.query_map(params![ids], |row| Ok((row.get(0)?, json(row.get(1)?).unwrap_or(Value::Null))))?;
            rows.collect()
        })
    }

    fn snapshot(&self) -> Result<crate::metrics::Snapshot, StoreError> {
        let rows = self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT tenant, state, COUNT(*) FROM tasks WHERE state IN ('ready', 'claimed') GROUP BY tenant, state",
            )?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect()
        })?;
        Ok(crate::store::queue::snapshot(rows))
    }

    fn signals(&self) -> &crate::store::Signals {
        &self.signals
    }
}
