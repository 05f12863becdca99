//! Command-line parsing and dispatch. Exit codes: 0 success, 1 the step
//! failed, 2 a usage error, 3 the component could not be loaded.

mod step_run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes shared by every command.
pub(crate) mod exit {
    pub const STEP_FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const INVALID_COMPONENT: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "stepbox",
    version,
    about = "Run workflow steps as sandboxed WebAssembly components",
    after_help = "Examples:\n  stepbox step run hello.wasm --input '{\"name\": \"Ada\"}'\n  stepbox step run --help\n\n\
                  Exit codes: 0 success, 1 the step failed, 2 usage error, 3 the component could not be loaded.\n\
                  Set RUST_LOG=debug for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with single steps.
    #[command(
        subcommand,
        after_help = "Examples:\n  stepbox step run hello.wasm --input '{\"name\": \"Ada\"}'\n  stepbox step run spin.wasm --timeout 2s --json"
    )]
    Step(StepCommand),
}

#[derive(Debug, Subcommand)]
enum StepCommand {
    /// Run one attempt of a step component and print its output.
    Run(step_run::Args),
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(exit::USAGE),
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Step(StepCommand::Run(args)) => step_run::run(args).await,
        }
    });
    ExitCode::from(code)
}
