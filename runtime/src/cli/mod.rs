//! Command-line parsing and dispatch. Exit codes: 0 success, 1 a step or
//! run failed, 2 a usage error, 3 the workflow or component is not valid,
//! 130 the run was cancelled.
//!
//! Every command returns its exit code, or a `CliError` that
//! [`main_with_args`] prints once.

mod client;
mod error;
mod history;
mod new;
mod report;
mod resume;
mod run;
mod serve;
mod step_run;
mod validate;
mod worker;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use clap::{Parser, Subcommand};

use crate::sandbox::{EngineConfig, Sandbox};
use crate::store::{self, KeyValueStore, MemoryKeyValueStore, Store};
use crate::tenant::{Tenant, Tenants};
use crate::workflow::{Workflow, WorkflowError};
pub(crate) use error::{CliError, exit};

const ABOUT_EXAMPLES: &str = "Examples:
  stepbox run examples/diamond.yaml
  stepbox runs --status failed
  stepbox resume 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47
  stepbox validate examples/diamond.yaml
  stepbox graph examples/diamond.yaml --format mermaid
  stepbox step run hello.wasm --input '{\"name\": \"Ada\"}'

Exit codes: 0 success, 1 a step or run failed, 2 usage error, 3 the workflow or component is not valid, 130 cancelled.
Set RUST_LOG=debug for more detail.";

#[derive(Debug, Parser)]
#[command(name = "stepbox", version, about = "Run workflow steps as sandboxed WebAssembly components", after_help = ABOUT_EXAMPLES)]
struct Cli {
    /// Where runs and key-value state are kept [default: $XDG_DATA_HOME/stepbox, else ~/.local/share/stepbox].
    #[arg(long, global = true, env = "STEPBOX_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep runs and key-value state in this PostgreSQL database (postgres://USER@HOST:PORT/DB), shared by every process that names it, instead of the data directory's SQLite files; compiled components stay in the data directory.
    #[arg(long, global = true, env = "STEPBOX_DB", value_name = "URL", hide_env_values = true)]
    db: Option<String>,
    /// The tenants file with each tenant's ceilings [default: tenants.yaml in the data directory, if there is one].
    #[arg(long, global = true, env = "STEPBOX_TENANTS", value_name = "FILE")]
    tenants: Option<PathBuf>,
    /// Where `{ file: NAME }` secrets are read from (as container platforms mount them, e.g. /run/secrets).
    #[arg(long, global = true, env = "STEPBOX_SECRETS_DIR", value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// The address of a `stepbox serve` to work with, e.g. http://127.0.0.1:7433.
    #[arg(long, global = true, env = "STEPBOX_SERVER", value_name = "URL")]
    server: Option<String>,
    /// The API token to use with --server (`stepbox token create` makes one).
    #[arg(long, global = true, env = "STEPBOX_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Where a run's records go, which ceilings apply to it and where its
/// secrets are.
pub(crate) struct Place<'a> {
    pub(crate) data_dir: &'a Path,
    /// The PostgreSQL database, when the records go there.
    pub(crate) db: Option<&'a str>,
    pub(crate) tenants: Option<&'a Path>,
    pub(crate) secrets_dir: Option<&'a Path>,
}

/// The tenant `name` with its ceilings from the tenants file (unconstrained
/// without one), after checking `workflow` against them.
pub(crate) fn admit(place: &Place<'_>, name: &str, workflow: &Workflow) -> Result<Arc<Tenant>, WorkflowError> {
    let tenant = match place.tenants {
        Some(file) => Tenants::load(file)?.get(name)?,
        None => Tenant::unconstrained(name),
    };
    tenant.check(workflow)?;
    Ok(Arc::new(tenant))
}

/// The data directory when none is given.
fn default_data_dir() -> PathBuf {
    let home = || std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share"));
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(home)
        .map(|dir| dir.join("stepbox"))
        .unwrap_or_else(|| PathBuf::from(".stepbox"))
}

/// The store: the `--db` database, else the data directory's.
pub(crate) fn open_database(place: &Place<'_>) -> Result<Arc<dyn Store>, CliError> {
    Ok(store::open(place.db, place.data_dir)?)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a workflow file.
    Run(run::Args),
    /// Continue an interrupted or failed run; what succeeded does not run again.
    Resume(resume::ResumeArgs),
    /// Run a failed run again from its failed steps, or from a given step.
    Retry(resume::RetryArgs),
    /// Cancel a run: an interrupted or waiting one at once, a running one on a server.
    Cancel(resume::CancelArgs),
    /// List recorded runs.
    Runs(history::RunsArgs),
    /// Show a run: its steps, attempts, errors and outputs.
    Show(history::ShowArgs),
    /// Print the logs and output of a run's attempts.
    Logs(history::LogsArgs),
    /// Delete old runs.
    Gc(history::GcArgs),
    /// Check a workflow file, its templates and its components without running it.
    Validate(validate::ValidateArgs),
    /// Compile components ahead of time into the data directory's cache, so runs start without compiling.
    Compile(validate::CompileArgs),
    /// Draw a workflow's step graph as Mermaid or Graphviz dot.
    Graph(validate::GraphArgs),
    /// Print the JSON Schema of workflow files, for editor completion.
    #[command(after_help = "Examples:\n  stepbox schema > stepbox.schema.json")]
    Schema,
    /// Serve the HTTP API: tenants deploy workflows and start, follow and manage runs.
    Serve(serve::ServeArgs),
    /// Create, list and revoke the service's API tokens.
    #[command(subcommand)]
    Token(serve::TokenCommand),
    /// Upload a workflow with everything it references to a `stepbox serve`.
    Deploy(serve::DeployArgs),
    /// Run attempts that `stepbox run --queue` and `stepbox serve --queue` hand to workers through a shared database.
    Worker(worker::WorkerArgs),
    /// Create a step project in Rust, Python, JavaScript or C.
    New(new::Args),
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

/// Runs the `stepbox` command with the process's arguments.
pub fn main() -> ExitCode {
    main_with_args(std::env::args_os())
}

/// Runs the `stepbox` command with these arguments (the first is the
/// program name), as the binary would.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(exit::USAGE),
            };
        }
    };
    // Spans go out over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT says where;
    // what is left is exported when `_exporting` goes, at exit (after the
    // runtime, made later, has ended the spans still open).
    let _exporting = match crate::traces::export(None) {
        Ok(exporting) => exporting,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    );
    // An embedding program may have installed its own subscriber already.
    let _ = tracing_subscriber::registry().with(log).try_init();
    // Attempts' open files count against this process's limit, and each
    // attempt's share of it is what the soft limit allows.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("cannot raise the open-files limit: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let tenants = cli.tenants.clone().or_else(|| Some(data_dir.join("tenants.yaml")).filter(|path| path.is_file()));
    let place = Place {
        data_dir: &data_dir,
        db: cli.db.as_deref(),
        tenants: tenants.as_deref(),
        secrets_dir: cli.secrets_dir.as_deref(),
    };
    let result = runtime.block_on(async {
        // With --server, these commands work on a `stepbox serve`.
        let remote = match cli.server.as_deref() {
            Some(server) => match client::Client::new(Some(server), cli.token.as_deref()) {
                Ok(client) => Some(client),
                Err(err) => return Err(err),
            },
            None => None,
        };
        let source = match &remote {
            Some(client) => history::Source::Remote(client),
            None => history::Source::Local(&place),
        };
        match cli.command {
            Command::Run(args) => run::run(args, &place, remote.as_ref()).await,
            Command::Compile(args) => validate::compile(args, &data_dir).await,
            Command::Resume(args) => resume::resume(args, &place, remote.as_ref()).await,
            Command::Retry(args) => resume::retry(args, &place, remote.as_ref()).await,
            Command::Cancel(args) => resume::cancel(args, &place, remote.as_ref()).await,
            Command::Runs(args) => history::runs(args, source).await,
            Command::Show(args) => history::show(args, source).await,
            Command::Logs(args) => history::logs(args, source).await,
            Command::Gc(args) => history::gc(args, &place),
            Command::Validate(args) => validate::validate(args, &data_dir).await,
            Command::Graph(args) => validate::graph(args),
            Command::Schema => validate::schema(),
            Command::New(args) => new::new(args),
            Command::Serve(args) => serve::serve(args, &place).await,
            Command::Token(command) => serve::token(command, &place),
            Command::Worker(args) => worker::worker(args, &place).await,
            Command::Deploy(args) => match &remote {
                Some(client) => serve::deploy(args, client).await,
                None => Err(CliError::Usage("give the service's address with --server URL (or STEPBOX_SERVER)".into())),
            },
            Command::Step(StepCommand::Run(args)) => step_run::run(args, &data_dir).await,
        }
    });
    ExitCode::from(result.unwrap_or_else(|err| err.print()))
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = terminate => {}
    }
}

/// A sandbox with an in-memory key-value store and the given engine
/// settings.
pub(crate) fn sandbox_with(config: EngineConfig) -> Result<Sandbox, CliError> {
    sandbox_with_kv(config, Arc::new(MemoryKeyValueStore::new()))
}

/// A sandbox whose steps keep their key-value state in `kv`.
pub(crate) fn sandbox_with_kv(config: EngineConfig, kv: Arc<dyn KeyValueStore>) -> Result<Sandbox, CliError> {
    Sandbox::new(config, kv).map_err(|err| CliError::Failed(format!("{err:#}")))
}

/// The engine settings of a command that keeps its state in `data_dir`.
pub(crate) fn engine_config(data_dir: &Path) -> EngineConfig {
    EngineConfig { data_dir: Some(data_dir.to_owned()), ..Default::default() }
}

pub(crate) fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}
