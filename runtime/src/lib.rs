//! stepbox runs workflow steps as sandboxed WebAssembly components.
//!
//! The data path reads top to bottom: [`workflow`] parses and validates a
//! workflow file; [`scheduler`] runs its steps as a graph, with retries and
//! failure policies; [`sandbox`] compiles components and runs each attempt
//! in a fresh, limited instance; [`store`] holds the state that outlives an
//! attempt; [`run`] is what a run is and did, the records all of them pass
//! along. [`cli`] is the `stepbox` command, a thin layer over the rest.

#![warn(missing_docs)]

pub mod cli;
pub mod cluster;
mod failpoint;
pub mod metrics;
pub mod run;
pub mod sandbox;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod store;
pub mod tenant;
pub mod traces;
pub mod workflow;
