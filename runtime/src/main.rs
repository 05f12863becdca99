//! The `stepbox` command: a thin layer over the `stepbox` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
