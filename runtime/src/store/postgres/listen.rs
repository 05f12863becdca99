//! Other processes' events, through LISTEN/NOTIFY: enqueuing a task
//! notifies `stepbox_tasks` (with its tenant), completing one
//! `stepbox_results`, asking for a
//! run's cancel `stepbox_cancels` (with the run's id). One connection per
//! process listens and raises the matching [`Signals`]; when it drops, it
//! is made again with backoff, and the queue's signals rise (events may
//! have been missed meanwhile, and waiters poll as well; a cancel missed is
//! found when its run's lease is renewed).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::store::Signals;

/// The channel enqueues notify.
pub(super) const TASKS: &str = "stepbox_tasks";
/// The channel completions notify.
pub(super) const RESULTS: &str = "stepbox_results";
/// The channel cancel requests notify, with the run's id.
pub(super) const CANCELS: &str = "stepbox_cancels";

/// Wakes who listens on `channel`, once the change it announces has
/// committed, in a transaction of its own that does not wait for the disk.
/// NOTIFY takes a database-wide lock from its transaction's commit until the
/// commit is flushed, so sent inside the transactions that enqueue tasks
/// and record results it would make all of them, across every process,
/// flush one after another; sent apart, their commits flush together and
/// the notice's commit holds the lock for no flush at all. A notice is a
/// hint: one that fails is reported, not an error of the change it
/// announces (listeners poll as well, now and then). The three statements
/// go out together, in one round trip.
pub(super) async fn notify(client: &deadpool_postgres::ClientWrapper, channel: &str, payload: &str) {
    let sent = async {
        let statement = client.prepare_cached("SELECT pg_notify($1, $2)").await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&channel, &payload];
        futures_util::try_join!(
            client.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
            client.execute(&statement, &params),
            client.batch_execute("COMMIT"),
        )
    }
    .await;
    if let Err(err) = sent {
        // Not left inside a failed transaction for the pool's next user.
        let _ = client.batch_execute("ROLLBACK").await;
        tracing::warn!("cannot notify {channel}: {err}; its listeners find the change when they next poll");
    }
}

/// What a task's notice says of its tenant: the name, or nothing (any
/// tenant) for a name too long for a notice (PostgreSQL takes 8,000 bytes).
pub(super) fn announced(tenant: &str) -> &str {
    if tenant.len() <= 1_000 { tenant } else { "" }
}

/// Listens until the store's runtime shuts down.
pub(super) async fn listen(config: tokio_postgres::Config, signals: Arc<Signals>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok((client, mut connection)) = config.connect(NoTls).await {
            let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
            let pump = tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(message)) = messages.next().await {
                    if let AsyncMessage::Notification(notification) = message {
                        let _ = events.send((notification.channel().to_owned(), notification.payload().to_owned()));
                    }
                }
            });
            if client.batch_execute(&format!("LISTEN {TASKS}; LISTEN {RESULTS}; LISTEN {CANCELS}")).await.is_ok() {
                backoff = Duration::from_millis(100);
                // Missed while away: tasks of any tenant.
                signals.task(None);
                signals.result();
                while let Some((channel, payload)) = received.recv().await {
                    match channel.as_str() {
                        TASKS => signals.task(Some(payload.as_str()).filter(|tenant| !tenant.is_empty())),
                        CANCELS => signals.cancel(&payload),
                        _ => signals.result(),
                    }
                }
            }
            pump.abort();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
