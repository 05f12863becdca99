//! stepbox runs workflow steps as sandboxed WebAssembly components.
//!
//! The data path reads top to bottom: [`sandbox`] compiles components and
//! runs attempts in fresh, limited instances; [`store`] holds the state that
//! outlives an attempt.

pub mod sandbox;
pub mod store;
