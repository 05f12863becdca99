//! Hostile: a 256 MiB zeroed static makes the module's initial memory that
//! large, so the instance asks for it before any code runs.
use stepbox_sdk::{StepError, step};

static mut BIG: [u8; 256 * 1024 * 1024] = [0; 256 * 1024 * 1024];

#[step]
fn run(index: usize) -> Result<u8, StepError> {
    // SAFETY: one call at a time per instance; the write keeps the static
    // (and its memory) from being optimized away.
    unsafe {
        let big = std::hint::black_box(std::ptr::addr_of_mut!(BIG).cast::<u8>());
        let at = big.add(index % (256 * 1024 * 1024));
        at.write(at.read().wrapping_add(1));
        Ok(at.read())
    }
}
