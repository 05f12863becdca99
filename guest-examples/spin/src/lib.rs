//! Hostile: never returns. Only fuel or the timeout stops it.
use stepbox_sdk::{StepError, step};

#[step]
fn run(_input: serde_json::Value) -> Result<u64, StepError> {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}
