//! Hostile: recurses without end.
use stepbox_sdk::{StepError, step};

#[inline(never)]
#[allow(unconditional_recursion)] // the point of this guest
fn deeper(depth: u64, pad: [u64; 8]) -> u64 {
    let pad = std::hint::black_box(pad);
    deeper(depth + 1, pad) + pad[(depth % 8) as usize]
}

#[step]
fn run(_input: serde_json::Value) -> Result<u64, StepError> {
    Ok(deeper(0, [1; 8]))
}
