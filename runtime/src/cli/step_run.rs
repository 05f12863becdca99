//! `stepbox step run`: one attempt of one component, for trying out a step.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytesize::ByteSize;

use super::report::{millis, printable};
use super::{CliError, exit, parse_key_value, sandbox_with};
use crate::run::Attempt;
use crate::sandbox::{AttemptRequest, DirGrant, EngineConfig, ExitCodes, Grants, HttpGrant, Limits, StepContext};
use crate::store::new_run_id;
use crate::workflow::spec::LimitsSpec;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox step run hello.wasm --input '{\"name\": \"Ada\"}'
  stepbox step run transform.wasm --input @order.json --config currency=EUR
  stepbox step run fs-read.wasm --dir ./data:/data:ro --input '{\"path\": \"/data/notes.txt\"}'
  stepbox step run spin.wasm --fuel 10_000_000 --timeout 2s --json")]
pub(crate) struct Args {
    /// The step component (.wasm) to run.
    component: PathBuf,
    /// The step's input: JSON text, or @FILE to read it from a file.
    #[arg(long, short, default_value = "{}", value_name = "JSON|@FILE")]
    input: String,
    /// Fuel for the attempt (roughly one unit per wasm instruction).
    #[arg(long, value_parser = parse_count, value_name = "N")]
    fuel: Option<u64>,
    /// Wall-clock limit for the attempt, e.g. 500ms, 5s, 1m.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<humantime::Duration>,
    /// Memory limit for the whole instance, e.g. 64MiB.
    #[arg(long, value_name = "SIZE")]
    memory: Option<ByteSize>,
    /// Grant a host directory: HOST:GUEST, HOST:GUEST:ro (read-only) or HOST:GUEST:rw. Repeatable.
    #[arg(long = "dir", value_name = "HOST:GUEST[:ro]", value_parser = |spec: &str| DirGrant::parse(spec, std::path::Path::new("")))]
    dirs: Vec<DirGrant>,
    /// A config value the step reads through wasi:config. Repeatable.
    #[arg(long = "config", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    config: Vec<(String, String)>,
    /// An environment variable for the step. Repeatable.
    #[arg(long = "env", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    env: Vec<(String, String)>,
    /// A secret config value, KEY=ENV_VAR: read from the host environment variable ENV_VAR and
    /// redacted from everything the attempt leaves behind. Repeatable.
    #[arg(long = "secret", value_parser = parse_key_value, value_name = "KEY=ENV_VAR")]
    secrets: Vec<(String, String)>,
    /// A command-line argument for the step. Repeatable.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Give the step this file as its stdin.
    #[arg(long, value_name = "FILE")]
    stdin: Option<PathBuf>,
    /// Give the step a private scratch directory at /scratch, removed afterwards.
    #[arg(long)]
    scratch: bool,
    /// Fix the clocks and seed randomness with this number, so the same input gives the same output.
    #[arg(long, value_name = "SEED")]
    deterministic: Option<u64>,
    /// Let the step connect (TCP) or send (UDP) to this IP:PORT. Repeatable.
    #[arg(long = "allow-connect", value_name = "IP:PORT")]
    network: Vec<std::net::SocketAddr>,
    /// Let the step make HTTP requests matching [METHODS@]HOST[:PORT], like GET@api.example.com. Repeatable.
    #[arg(long = "allow-http", value_name = "RULE")]
    http: Vec<HttpGrant>,
    /// For a command: an exit code that is a retryable failure (default 75). Repeatable.
    #[arg(long = "retryable-exit", value_name = "CODE")]
    retryable_exit: Vec<i32>,
    /// Print the whole attempt report as JSON on stdout instead of the output.
    #[arg(long)]
    json: bool,
}

/// Parses a count that may contain `_` separators, as in 500_000_000.
fn parse_count(text: &str) -> Result<u64, String> {
    text.replace('_', "").parse().map_err(|err| format!("`{text}` is not a whole number: {err}"))
}

fn read_input(input: &str) -> Result<String, String> {
    let text = match input.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|err| format!("cannot read the input file {path}: {err}"))?
        }
        None => input.to_owned(),
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|err| format!("the input is not valid JSON: {err}; pass JSON text or @FILE"))?;
    Ok(text)
}

pub(crate) async fn run(args: Args, data_dir: &std::path::Path) -> Result<u8, CliError> {
    let input = read_input(&args.input).map_err(CliError::Usage)?;
    let mut secrets = BTreeMap::new();
    for (key, var) in &args.secrets {
        let value = std::env::var(var)
            .map_err(|_| CliError::Usage(format!("--secret {key}={var}: the environment variable {var} is not set")))?;
        secrets.insert(key.clone(), value);
    }
    let stdin = match &args.stdin {
        Some(path) => {
            std::fs::read(path).map_err(|err| CliError::Usage(format!("cannot read {}: {err}", path.display())))?
        }
        None => Vec::new(),
    };
    let limits = LimitsSpec {
        fuel: args.fuel,
        timeout: args.timeout.map(Into::into),
        memory: args.memory,
        ..LimitsSpec::default()
    }
    .over(&Limits::default());
    let engine_config = EngineConfig {
        max_concurrent_attempts: 4,
        max_memory: limits.memory.max(ByteSize::mib(64)),
        ..super::engine_config(data_dir)
    };
    let sandbox = sandbox_with(engine_config)?;
    let path = args.component.clone();
    let loader = sandbox.clone();
    let component = tokio::task::spawn_blocking(move || loader.load(&path))
        .await
        .map_err(|err| CliError::Failed(format!("loading the component failed: {err}")))??;

    let run_id = new_run_id();
    let step_id = args.component.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "step".into());
    let request = AttemptRequest {
        context: StepContext {
            idempotency_key: format!("{run_id}/{step_id}"),
            run_id,
            step_id,
            attempt: 1,
            tenant: "default".into(),
            workflow: "step-run".into(),
            kv_quota: Default::default(),
        },
        input,
        limits,
        grants: Grants {
            dirs: args.dirs,
            env: args.env.into_iter().collect(),
            config: args.config.into_iter().collect::<BTreeMap<_, _>>(),
            stdin,
            secrets,
            args: args.args,
            scratch: args.scratch,
            deterministic: args.deterministic,
            network: args.network,
            http: args.http,
            http_secrets: Vec::new(),
        },
        exit_codes: if args.retryable_exit.is_empty() {
            ExitCodes::default()
        } else {
            ExitCodes { retryable: args.retryable_exit }
        },
        span: crate::traces::Span::default(),
    };
    let attempt = sandbox.run(&component, request).await;
    print_attempt(&attempt, args.json)?;
    Ok(if attempt.failure().is_some() { exit::FAILED } else { 0 })
}

fn print_attempt(attempt: &Attempt, json: bool) -> Result<(), CliError> {
    if json {
        let text = serde_json::to_string_pretty(attempt).map_err(|err| CliError::Failed(err.to_string()))?;
        println!("{text}");
    } else {
        for record in &attempt.logs {
            eprintln!("[{}] {}: {}", record.level, printable(&record.context), printable(&record.message));
        }
        match attempt.output() {
            Some(output) => println!("{output}"),
            None => {
                for (name, captured) in [("stdout", &attempt.stdout), ("stderr", &attempt.stderr)] {
                    let lines: Vec<&str> = captured.text.lines().collect();
                    if !lines.is_empty() {
                        eprintln!("--- step {name} (last lines) ---");
                        for line in &lines[lines.len().saturating_sub(10)..] {
                            eprintln!("{}", printable(line));
                        }
                    }
                }
            }
        }
    }
    eprintln!("{}", summary(attempt));
    Ok(())
}

/// One line: status, duration, fuel, memory.
fn summary(attempt: &Attempt) -> String {
    let status = match attempt.failure() {
        None => "succeeded".to_owned(),
        Some(failure) => format!("failed ({}): {}", failure.kind, printable(&failure.message)),
    };
    format!(
        "{status} · {:.1?} · fuel {} · peak memory {}",
        millis(attempt.duration_ms()),
        attempt.fuel_consumed,
        ByteSize(attempt.peak_memory).display().iec()
    )
}
