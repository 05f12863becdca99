//! The paths of the guest examples, built by build.rs, for stepbox's
//! integration tests (here and in `runtime/tests`).

/// Paths of the compiled guest examples, one constant per example.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Test tools the build script fetched.
pub mod tools {
    include!(concat!(env!("OUT_DIR"), "/tools.rs"));
}
