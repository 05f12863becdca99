//! Helpers shared by the integration tests in this directory.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use stepbox::run::Attempt;
use stepbox::sandbox::{AttemptRequest, EngineConfig, Grants, Limits, Sandbox, StepComponent, StepContext};
use stepbox::store::MemoryKeyValueStore;

/// One sandbox per test binary, as in a real process. Its compile cache is
/// shared by the test binaries (under the target directory), as a machine's
/// is by its processes, so a test run compiles each guest once.
pub fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let config = EngineConfig { data_dir: Some(data_dir()), ..EngineConfig::default() };
        Sandbox::new(config, Arc::new(MemoryKeyValueStore::new())).expect("building the sandbox")
    })
}

/// The data directory of the tests' sandboxes, under the target directory.
pub fn data_dir() -> PathBuf {
    let target = Path::new(stepbox_tests::guests::HELLO).ancestors().nth(4).expect("guests live under target/");
    target.join("tests-data")
}

pub fn load(path: &str) -> StepComponent {
    sandbox().load(Path::new(path)).unwrap_or_else(|err| panic!("loading {path}: {err}"))
}

/// A request as `stepbox step run` would make it, with the default limits
/// and no grants.
pub fn request(input: serde_json::Value) -> AttemptRequest {
    AttemptRequest {
        context: StepContext {
            run_id: "run-1".into(),
            step_id: "step".into(),
            attempt: 1,
            idempotency_key: "run-1/step".into(),
            tenant: "tenant".into(),
            workflow: "tests".into(),
            kv_quota: Default::default(),
        },
        input: input.to_string(),
        limits: Limits::default(),
        grants: Grants::default(),
        exit_codes: Default::default(),
        span: Default::default(),
    }
}

pub async fn run(path: &str, request: AttemptRequest) -> Attempt {
    sandbox().run(&load(path), request).await
}
