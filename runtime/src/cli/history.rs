//! `stepbox runs`, `show`, `logs` and `gc`: reading the run history.

use std::time::Duration;

use bytesize::ByteSize;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

use super::client::Client;
use super::report::{millis, print_attempt, steps_table, when};
use super::{CliError, Place, engine_config, open_database, parse_key_value, sandbox_with};
use crate::run::{Run, RunReport, RunStatus, now_ms};
use crate::service::RunPage;
use crate::store::RunFilter;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox runs
  stepbox runs --status failed --workflow order-processing --limit 5
  stepbox runs --label trace=abc123 --json")]
pub(crate) struct RunsArgs {
    /// Only runs with this status: running, succeeded, failed, cancelled.
    #[arg(long)]
    status: Option<RunStatus>,
    /// Only runs of this workflow (its name).
    #[arg(long)]
    workflow: Option<String>,
    /// Only runs with this label, KEY=VALUE. Repeatable.
    #[arg(long = "label", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    labels: Vec<(String, String)>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  stepbox show 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47\n  stepbox show 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47 --json"
)]
pub(crate) struct ShowArgs {
    run_id: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  stepbox logs 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47\n  stepbox logs 019ad3c5-7a4e-7c1b-9a0e-5f2d8c3b1e47 charge --json"
)]
pub(crate) struct LogsArgs {
    run_id: String,
    /// Only this step.
    step: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox gc --older-than 30d           # runs finished and started more than 30 days ago
  stepbox gc --cache                    # compiled code no stepbox of this version can use
  stepbox gc --cache --older-than 7d    # ... and compiled code unused for 7 days (no runs are deleted)")]
#[group(required = true, multiple = true, args = ["older_than", "cache"])]
pub(crate) struct GcArgs {
    /// Delete finished runs started longer ago than this (e.g. 30d, 12h); with --cache, compiled
    /// code unused for this long instead.
    #[arg(long, value_name = "AGE")]
    older_than: Option<humantime::Duration>,
    /// Clean the compile cache (the data directory's compiled/) instead of the runs: remove code
    /// compiled by another version of stepbox or wasmtime, and files left by an interrupted compile.
    #[arg(long)]
    cache: bool,
    /// Delete interrupted runs too (their process died before they finished); a run a live process
    /// holds is never deleted.
    #[arg(long)]
    interrupted: bool,
}

fn print_json(value: &impl serde::Serialize) -> Result<u8, CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|err| CliError::Failed(err.to_string()))?;
    println!("{text}");
    Ok(0)
}

/// Where the history commands read runs: the data directory, or a
/// `stepbox serve` (`--server`), with the same output either way.
pub(crate) enum Source<'a> {
    /// This machine's store: the data directory's, or `--db`.
    Local(&'a Place<'a>),
    /// A server, through its API.
    Remote(&'a Client),
}

impl Source<'_> {
    async fn report(&self, id: &str) -> Result<RunReport, CliError> {
        match self {
            Source::Local(place) => Ok(open_database(place)?.run_report(id)?),
            Source::Remote(client) => client.get(&["runs", id], &[]).await,
        }
    }

    async fn runs(&self, filter: RunFilter) -> Result<Vec<Run>, CliError> {
        let client = match self {
            Source::Local(place) => return Ok(open_database(place)?.list_runs(&filter)?),
            Source::Remote(client) => client,
        };
        /// The most runs a page of the API holds.
        const PAGE: usize = 500;
        let mut runs = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let wanted = if filter.limit == 0 { PAGE } else { (filter.limit - runs.len()).min(PAGE) };
            let mut query = vec![("limit", wanted.to_string())];
            query.extend(filter.status.map(|status| ("status", status.to_string())));
            query.extend(filter.workflow.clone().map(|workflow| ("workflow", workflow)));
            query.extend(filter.labels.iter().map(|(key, value)| ("label", format!("{key}={value}"))));
            query.extend(cursor.clone().map(|cursor| ("cursor", cursor)));
            let page: RunPage = client.get(&["runs"], &query).await?;
            runs.extend(page.runs);
            match page.next_cursor {
                Some(next) if filter.limit == 0 || runs.len() < filter.limit => cursor = Some(next),
                _ => return Ok(runs),
            }
        }
    }
}

pub(crate) async fn runs(args: RunsArgs, source: Source<'_>) -> Result<u8, CliError> {
    let filter = RunFilter {
        status: args.status,
        workflow: args.workflow,
        labels: args.labels,
        limit: args.limit,
        ..RunFilter::default()
    };
    let runs = source.runs(filter).await?;
    if args.json {
        return print_json(&runs);
    }
    let mut table = Table::new();
    table.load_style(UTF8_BORDERS_ONLY).set_header(["run", "workflow", "status", "started", "duration", "labels"]);
    for run in &runs {
        let labels: Vec<String> = run.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.add_row([
            run.id.clone(),
            run.workflow.clone(),
            run.status.to_string(),
            when(run.created_ms),
            run.duration_ms().map(|ms| format!("{:.1?}", millis(ms))).unwrap_or_default(),
            labels.join(" "),
        ]);
    }
    println!("{table}");
    Ok(0)
}

pub(crate) async fn show(args: ShowArgs, source: Source<'_>) -> Result<u8, CliError> {
    let report = source.report(&args.run_id).await?;
    if args.json {
        return print_json(&report);
    }
    let run = &report.run;
    println!("run {} of `{}` ({}) — {}", run.id, run.workflow, run.workflow_path, run.status);
    println!(
        "started {}, tenant {}, inputs {}",
        when(run.created_ms),
        run.tenant,
        serde_json::Value::Object(run.inputs.clone())
    );
    println!("{}", steps_table(&report));
    if let Some(error) = &run.error {
        println!("error: {error}");
    }
    if let Some(outputs) = &run.outputs {
        println!("outputs: {}", serde_json::Value::Object(outputs.clone()));
    }
    Ok(0)
}

pub(crate) async fn logs(args: LogsArgs, source: Source<'_>) -> Result<u8, CliError> {
    let report = source.report(&args.run_id).await?;
    let steps: Vec<_> = report
        .all_steps()
        .into_iter()
        .filter(|step| args.step.as_ref().is_none_or(|wanted| step.id.to_string() == *wanted))
        .collect();
    if let Some(wanted) = args.step.as_ref().filter(|_| steps.is_empty()) {
        return Err(CliError::Usage(format!("run {} has no step `{wanted}` with records", args.run_id)));
    }
    if args.json {
        return print_json(&steps);
    }
    for step in steps {
        for execution in &step.executions {
            for attempt in &execution.attempts {
                print_attempt(step, &execution.idempotency_key, attempt);
            }
        }
    }
    Ok(0)
}

pub(crate) fn gc(args: GcArgs, place: &Place<'_>) -> Result<u8, CliError> {
    let data_dir = place.data_dir;
    if args.cache {
        let sandbox = sandbox_with(engine_config(data_dir))?;
        let compiled = data_dir.join("compiled");
        let removed = sandbox
            .gc_cache(args.older_than.map(Into::into))
            .map_err(|err| CliError::Failed(format!("cannot clean {}: {err}", compiled.display())))?;
        println!(
            "removed {} compiled file(s), {}, from {}",
            removed.entries,
            ByteSize(removed.bytes).display().iec(),
            compiled.display()
        );
        return Ok(0);
    }
    let older_than = args.older_than.ok_or_else(|| CliError::Usage("gc needs --older-than or --cache".into()))?;
    let db = open_database(place)?;
    let age: Duration = older_than.into();
    let before = now_ms() - age.as_secs_f64() * 1000.0;
    if before < 0.0 {
        return Err(CliError::Usage(format!("--older-than {older_than} reaches back before 1970; give a shorter age")));
    }
    let removed = db.gc(before, args.interrupted)?;
    println!("removed {removed} run(s) started more than {older_than} ago");
    Ok(0)
}
