//! `cargo demo`: its build script builds the guests `examples/demo.yaml`
//! uses, then this runs the workflow exactly as `stepbox run` would.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let workflow = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo.yaml");
    stepbox::cli::main_with_args(["stepbox".as_ref(), "run".as_ref(), workflow.as_os_str()])
}
