//! Hostile: allocates 1 MiB chunks and keeps them all, forever.
use stepbox_sdk::{StepError, step};

#[step]
fn run(_input: serde_json::Value) -> Result<usize, StepError> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(std::hint::black_box(vec![1u8; 1024 * 1024]));
    }
}
