//! The `stepbox` command; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    stepbox::cli::main()
}
