//! For stepbox's tests (here, in `runtime/tests` and in the runtime's own):
//! the paths of the guest examples, built by build.rs, the tools it
//! fetched, and a PostgreSQL database per test.

/// Paths of the compiled guest examples, one constant per example.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Test tools the build script fetched.
pub mod tools {
    include!(concat!(env!("OUT_DIR"), "/tools.rs"));
}

pub mod postgres;
