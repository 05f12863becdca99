//! A run has one owner at a time: the process running it holds its lease
//! (an owner name, an expiry it renews while it runs, and an epoch that
//! grows with every new holder). Another process cannot resume or retry a
//! run whose lease is live; a run whose holder died is `interrupted`.
//!
//! The epoch is a fencing token: a holder that lost its lease (it was
//! paused past the expiry, and another process took over) cannot renew it,
//! and stops, and the journal refuses its records of the run meanwhile
//! ([`Held`]). Workers that run a run's attempts on other machines hold
//! claims on their tasks, not the run's lease.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// How soon a renewal is tried again while the database is away.
const RETRY: Duration = Duration::from_secs(1);

/// A lease on one run, as its holder knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The run.
    pub run_id: String,
    /// Who holds it ([`this_owner`]).
    pub owner: String,
    /// Which taking of the lease this is.
    pub epoch: u64,
}

/// What renewing a lease found besides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    /// A cancel of the run was asked for ([`super::Journal::request_cancel`]).
    pub cancel_requested: bool,
}

impl Lease {
    /// The lease a new run is created with: this process's, first taking.
    pub fn created(run_id: &str) -> Self {
        Lease { run_id: run_id.to_owned(), owner: this_owner().to_owned(), epoch: 1 }
    }
}

/// This process's name as a lease owner: `HOST:PID:NONCE`, so another
/// process on the same machine can tell at once that it died.
pub fn this_owner() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| {
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        format!("{}:{}:{}", host_name(), std::process::id(), &nonce[nonce.len() - 8..])
    })
}

/// Whether `owner` is a process on this machine that is no longer running.
/// An owner elsewhere is alive until its lease expires.
pub fn is_gone(owner: &str) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (_nonce, pid, host) = (parts.next(), parts.next(), parts.next());
    match (host, pid.and_then(|pid| pid.parse::<u32>().ok())) {
        (Some(host), Some(pid)) if host == host_name() => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

fn host_name() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".into())
    })
}

/// Keeps a lease alive while its run goes on: renews it every third of
/// [`LEASE_TTL`], and cancels `lost` when it cannot (another process took
/// the run over, or the database stayed away until the lease ran out).
/// Cancels `cancel` when another process asks for the run to be cancelled
/// (renewed at once where the store says someone asked, else found at the
/// next renewal).
/// [`Heartbeat::release`] gives the lease up; dropped without it, the
/// release is queued and not waited for.
pub struct Heartbeat {
    store: Arc<dyn Store>,
    lease: Lease,
    stop: CancellationToken,
    released: bool,
}

impl Heartbeat {
    /// Starts renewing `lease`.
    pub fn start(store: Arc<dyn Store>, lease: Lease, lost: CancellationToken, cancel: CancellationToken) -> Self {
        let stop = CancellationToken::new();
        let (renewing, held, stopped) = (store.clone(), lease.clone(), stop.clone());
        let mut requests = Some(store.signals().cancels.subscribe());
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            let mut next = renewed + LEASE_TTL / 3;
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    () = tokio::time::sleep_until(next) => {}
                    request = async { requests.as_mut()?.recv().await.ok() }, if requests.is_some() => {
                        match request {
                            Some(run_id) if run_id != held.run_id => {}
                            // Asked of this run, or some notices were
                            // missed: renewed at once, and the record says
                            // whether the ask stands (a late notice may be
                            // meant for an earlier taking of the run).
                            _ => next = tokio::time::Instant::now(),
                        }
                        // No sender left: renewals alone look.
                        if requests.as_ref().is_some_and(|requests| requests.is_closed()) {
                            requests = None;
                        }
                        continue;
                    }
                }
                let (store, lease) = (renewing.clone(), held.clone());
                match tokio::task::spawn_blocking(move || store.renew_lease(&lease, LEASE_TTL)).await {
                    Ok(Ok(found)) => {
                        if found.cancel_requested {
                            cancel.cancel();
                        }
                        renewed = tokio::time::Instant::now();
                        next = renewed + LEASE_TTL / 3;
                    }
                    // The database is away (it restarts): tried again, often,
                    // for two thirds of the lease it last granted; the last
                    // third is the margin for another process's clock.
                    Ok(Err(err)) if err.is_away() && renewed.elapsed() + RETRY < LEASE_TTL * 2 / 3 => {
                        tracing::warn!(run = held.run_id, "cannot renew the run's lease: {err}; trying again");
                        next = tokio::time::Instant::now() + RETRY;
                    }
                    _ => {
                        tracing::error!(run = held.run_id, "the run's lease could not be renewed; stopping");
                        lost.cancel();
                        return;
                    }
                }
            }
        });
        Heartbeat { store, lease, stop, released: false }
    }

    /// Stops renewing and gives the lease up, durably.
    pub async fn release(mut self) {
        self.stop.cancel();
        self.released = true;
        if let Err(err) = self.store.release_lease(&self.lease).await {
            tracing::warn!(run = self.lease.run_id, "could not release the run's lease: {err}");
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.cancel();
        if !self.released {
            // Queued at once; it commits with the next batch.
            drop(self.store.release_lease(&self.lease));
        }
    }
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat").field("lease", &self.lease).finish()
    }
}

/// The leases one store handle took, by run: the epoch of each. Its
/// journal writer commits a run's record only while the run's lease still
/// has the epoch it had when the record was queued, checked in the
/// record's own transaction; so a holder that lost its lease (paused past
/// the expiry, partitioned) cannot record anything after another process
/// took the run over, even before its next renewal tells it so.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held(Arc<Mutex<HashMap<String, u64>>>);

impl Held {
    /// From now on the run's records need this lease.
    pub(crate) fn hold(&self, lease: &Lease) {
        self.0.lock().insert(lease.run_id.clone(), lease.epoch);
    }

    /// The run is being created: its first record takes the lease.
    pub(crate) fn forget(&self, run_id: &str) {
        self.0.lock().remove(run_id);
    }

    /// The lease is being given up (the release itself touches only the
    /// lease it names, so it needs no fence).
    pub(crate) fn release(&self, lease: &Lease) {
        let mut held = self.0.lock();
        if held.get(&lease.run_id) == Some(&lease.epoch) {
            held.remove(&lease.run_id);
        }
    }

    /// The epoch a record of the run queued now needs, if any.
    pub(crate) fn fence(&self, run_id: &str) -> Option<u64> {
        self.0.lock().get(run_id).copied()
    }
}

/// The error for a run someone else holds.
pub(crate) fn leased(run_id: &str, owner: &str, until_ms: f64) -> StoreError {
    StoreError::Leased { run_id: run_id.to_owned(), owner: owner.to_owned(), until_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_on_this_machine_is_gone_when_its_process_is() {
        assert!(!is_gone(this_owner()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(is_gone(&format!("{}:{pid}:abcdef12", host_name())));
        assert!(!is_gone(&format!("elsewhere:{pid}:abcdef12")), "another machine's owner lives until it expires");
    }
}
