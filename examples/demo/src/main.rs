//! `cargo demo`: builds the guest examples (through its dependency on the
//! tests crate) and runs `examples/demo.yaml` exactly as `stepbox run`
//! would.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let workflow = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo.yaml");
    // Naming one guest keeps the dependency that builds them all.
    let _built = stepbox_tests::guests::HELLO;
    stepbox::cli::main_with_args(["stepbox".as_ref(), "run".as_ref(), workflow.as_os_str()])
}
