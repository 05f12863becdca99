//! Running attempts on other processes, on this machine or others: a run's
//! coordinator hands them to `stepbox worker` processes through the queue
//! of the store they share ([`QueueExecutor`]), and workers claim, run and
//! report them ([`work`]). See docs/architecture.md for the leases, tokens
//! and what happens on each failure.

mod executor;
mod wire;
mod worker;

pub use executor::{HANDED_OVER, QueueExecutor};
pub use worker::{WorkerConfig, work};
