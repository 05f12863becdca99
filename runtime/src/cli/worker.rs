//! `stepbox worker`: runs the attempts coordinators hand over through the
//! shared database's queue.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{CliError, Place, engine_config, open_database, sandbox_with_kv};
use crate::cluster::{WorkerConfig, work};
use crate::sandbox::EngineConfig;
use crate::scheduler::default_max_parallel;
use crate::store::this_owner;
use crate::tenant::Tenants;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox worker --db postgres://postgres@127.0.0.1:5432/stepbox --slots 8
  stepbox worker --db postgres://stepbox@db.internal/stepbox --tenants tenants.yaml --secrets-dir /run/secrets

Give every worker the service's tenants file: a worker holds each attempt to its tenant's ceilings and shares
the workers by its weights. Without one it runs tenant `default` only. Secrets and directories are read on the
worker's machine. Ctrl-C or SIGTERM stops claiming and finishes the attempts held.")]
pub(crate) struct WorkerArgs {
    /// Attempts run at once, 1 to 4096 [default: twice the CPU cores, at least 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    slots: Option<u32>,
    /// Attempts run at once beyond --slots, only for tenants holding fewer than half as many (per weight) across the cluster as the busiest tenant: a tenant arriving while others keep every slot busy starts at once instead of waiting for their attempts to end. Slots and reserve together at most 4096 [default: a quarter of the slots, at least 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=4096))]
    reserve: Option<u32>,
    /// How long a claim holds without renewal (renewed every third of it): a worker that stops (killed, paused, cut off) loses its attempts to another after it. At least 300ms.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    lease: humantime::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free one; the address is printed): the queue's attempts waiting and running by tenant, and this worker's compile cache. No token is asked for: give an address only operators reach.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// Attempts a worker may run at once, its reserve included: each holds an
/// instance slot of the sandbox's pool, with its address space reserved.
const MOST_AT_ONCE: usize = 4096;

pub(crate) async fn worker(args: WorkerArgs, place: &Place<'_>) -> Result<u8, CliError> {
    let lease: Duration = args.lease.into();
    if lease < Duration::from_millis(300) {
        return Err(CliError::Usage(format!(
            "--lease {} is too short for a claim to be renewed in time; give at least 300ms",
            args.lease
        )));
    }
    let tenants = place.tenants.map(Tenants::load).transpose()?.map(Arc::new);
    let slots = args.slots.map_or_else(default_max_parallel, |n| n as usize);
    let reserve = args.reserve.map_or_else(|| slots.div_ceil(4), |n| n as usize);
    if slots + reserve > MOST_AT_ONCE {
        return Err(CliError::Usage(format!(
            "--slots {slots} and --reserve {reserve} make {} attempts at once; give at most {MOST_AT_ONCE} together",
            slots + reserve
        )));
    }
    let db = open_database(place)?;
    let config = EngineConfig {
        // Host memory and instances are shared out among all it may run.
        max_concurrent_attempts: u32::try_from(slots + reserve).unwrap_or(u32::MAX),
        ..engine_config(place.data_dir)
    };
    let sandbox = sandbox_with_kv(config, db.key_values())?;
    let owner = this_owner().to_owned();
    eprintln!(
        "stepbox worker {owner}: running up to {slots} attempts at once, {reserve} more for tenants below the busiest, from {}",
        db.place()
    );
    let stop = CancellationToken::new();
    // Served until the attempts held are finished, after claiming stops.
    let metrics_stop = CancellationToken::new();
    if let Some(address) = &args.metrics_listen {
        let listener = crate::metrics::bind(address).await.map_err(CliError::Usage)?;
        let queue = db.clone();
        let snapshots: crate::metrics::Snapshots =
            Arc::new(move || crate::metrics::queue_snapshot(&*queue).into_iter().collect());
        tokio::spawn(crate::metrics::serve(listener, snapshots, metrics_stop.clone().cancelled_owned()));
    }
    let stopping = stop.clone();
    tokio::spawn(async move {
        super::interrupted().await;
        eprintln!("stepbox worker: stopping; finishing the attempts held");
        stopping.cancel();
    });
    let config =
        WorkerConfig { slots, reserve, lease, owner, tenants, secrets_dir: place.secrets_dir.map(ToOwned::to_owned) };
    work(db, sandbox, config, stop).await;
    metrics_stop.cancel();
    Ok(0)
}
