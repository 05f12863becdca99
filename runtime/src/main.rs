//! The `stepbox` command; everything lives in the library's `cli` module.

/// mimalloc rather than the system's: attempts allocate and free many small
/// things on every runtime thread, and glibc's allocator took a tenth of
/// the CPU of a wide graph of no-op steps (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    stepbox::cli::main()
}
