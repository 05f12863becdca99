//! `stepbox runs`, `show`, `logs` and `gc`: reading the run history.

use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

use crate::store::{Database, RunFilter, StoredStep, unix_ms};

use super::{exit, open_database, parse_key_value};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox runs
  stepbox runs --status failed --workflow order-processing --limit 5
  stepbox runs --label trace=abc123 --json")]
pub(crate) struct RunsArgs {
    /// Only runs with this status: running, succeeded, failed, cancelled.
    #[arg(long)]
    status: Option<String>,
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
}

fn print_json(value: &impl serde::Serialize) -> u8 {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(err) => {
            eprintln!("error: {err}");
            exit::STEP_FAILED
        }
    }
}

fn when(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn with_db(data_dir: &Path, f: impl FnOnce(&Database) -> Result<u8, crate::store::StoreError>) -> u8 {
    let Some(db) = open_database(data_dir) else { return exit::STEP_FAILED };
    f(&db).unwrap_or_else(|err| {
        eprintln!("error: {err}");
        match err {
            crate::store::StoreError::NoSuchRun(_) => exit::USAGE,
            _ => exit::STEP_FAILED,
        }
    })
}

pub(crate) fn runs(args: RunsArgs, data_dir: &Path) -> u8 {
    with_db(data_dir, |db| {
        let filter = RunFilter { status: args.status, workflow: args.workflow, labels: args.labels, limit: args.limit };
        let runs = db.list_runs(&filter)?;
        if args.json {
            return Ok(print_json(&runs));
        }
        let mut table = Table::new();
        table.load_style(UTF8_BORDERS_ONLY).set_header(["run", "workflow", "status", "started", "duration", "labels"]);
        for run in &runs {
            let duration = run
                .finished_ms
                .map(|end| format!("{:.1?}", Duration::from_millis((end - run.created_ms).max(0) as u64)));
            let labels: Vec<String> = run.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            table.add_row([
                run.id.clone(),
                run.workflow.clone(),
                run.status.clone(),
                when(run.created_ms),
                duration.unwrap_or_default(),
                labels.join(" "),
            ]);
        }
        println!("{table}");
        Ok(0)
    })
}

pub(crate) fn show(args: ShowArgs, data_dir: &Path) -> u8 {
    with_db(data_dir, |db| {
        let run = db.load_run(&args.run_id)?;
        let steps = db.run_steps(&args.run_id)?;
        if args.json {
            return Ok(print_json(&serde_json::json!({ "run": run, "steps": steps })));
        }
        println!("run {} of `{}` ({}) — {}", run.id, run.workflow, run.workflow_path, run.status);
        println!("started {}, tenant {}, inputs {}", when(run.created_ms), run.tenant, run.inputs);
        let mut table = Table::new();
        table
            .load_style(UTF8_BORDERS_ONLY)
            .set_header(["step", "status", "attempts", "duration", "fuel", "memory", "error"]);
        for step in &steps {
            table.add_row(step_row(step));
        }
        println!("{table}");
        if let Some(outputs) = &run.outputs {
            println!("outputs: {outputs}");
        }
        Ok(0)
    })
}

fn step_row(step: &StoredStep) -> [String; 7] {
    let duration = match (step.started_ms, step.finished_ms) {
        (Some(start), Some(end)) => format!("{:.1?}", Duration::from_secs_f64((end - start).max(0.0) / 1000.0)),
        _ => String::new(),
    };
    let fuel: i64 = step.attempts.iter().filter_map(|a| a.fuel).sum();
    let memory = step.attempts.iter().filter_map(|a| a.peak_memory).max().unwrap_or(0);
    let error = step.reason.clone().or_else(|| {
        step.attempts
            .iter()
            .rev()
            .find_map(|a| a.message.as_ref().map(|m| format!("{}: {m}", a.kind.as_deref().unwrap_or("failed"))))
    });
    let ran = !step.attempts.is_empty();
    [
        step.id.clone(),
        step.status.clone(),
        if ran { step.attempts.len().to_string() } else { String::new() },
        duration,
        if ran { fuel.to_string() } else { String::new() },
        if ran { ByteSize(memory as u64).display().iec().to_string() } else { String::new() },
        if step.status == "succeeded" { String::new() } else { error.unwrap_or_default() },
    ]
}

pub(crate) fn logs(args: LogsArgs, data_dir: &Path) -> u8 {
    with_db(data_dir, |db| {
        db.load_run(&args.run_id)?;
        let steps: Vec<StoredStep> = db
            .run_steps(&args.run_id)?
            .into_iter()
            .filter(|step| args.step.as_ref().is_none_or(|wanted| &step.id == wanted))
            .collect();
        if let Some(wanted) = args.step.as_ref().filter(|_| steps.is_empty()) {
            eprintln!("error: run {} has no step `{wanted}` with records", args.run_id);
            return Ok(exit::USAGE);
        }
        if args.json {
            return Ok(print_json(&steps));
        }
        for step in &steps {
            for attempt in &step.attempts {
                println!("== {} attempt {} ({}) — {}", step.id, attempt.attempt, attempt.key, attempt.status);
                for record in attempt.logs.as_ref().and_then(|l| l.as_array()).into_iter().flatten() {
                    println!(
                        "[{}] {}: {}",
                        record["level"].as_str().unwrap_or("?"),
                        record["context"].as_str().unwrap_or(""),
                        record["message"].as_str().unwrap_or("")
                    );
                }
                for (name, text) in [("stdout", &attempt.stdout), ("stderr", &attempt.stderr)] {
                    if let Some(text) = text.as_deref().filter(|t| !t.is_empty()) {
                        println!("--- {name}\n{}", text.trim_end());
                    }
                }
                if let Some(message) = &attempt.message {
                    println!("failed ({}): {message}", attempt.kind.as_deref().unwrap_or("?"));
                }
            }
        }
        Ok(0)
    })
}

pub(crate) fn gc(args: GcArgs, data_dir: &Path) -> u8 {
    if args.cache {
        let Some(sandbox) = super::sandbox_with(super::engine_config(data_dir)) else { return exit::STEP_FAILED };
        return match sandbox.gc_cache(args.older_than.map(Into::into)) {
            Ok(removed) => {
                println!(
                    "removed {} compiled file(s), {}, from {}",
                    removed.entries,
                    ByteSize(removed.bytes).display().iec(),
                    data_dir.join("compiled").display()
                );
                0
            }
            Err(err) => {
                eprintln!("error: cannot clean {}: {err}", data_dir.join("compiled").display());
                exit::STEP_FAILED
            }
        };
    }
    let Some(older_than) = args.older_than else { return exit::USAGE };
    with_db(data_dir, |db| {
        let age: Duration = older_than.into();
        let removed = db.gc(unix_ms() - age.as_millis() as i64)?;
        println!("removed {removed} run(s) started more than {older_than} ago");
        Ok(0)
    })
}
