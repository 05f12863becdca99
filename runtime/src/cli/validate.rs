//! `stepbox validate`, `stepbox compile`, `stepbox graph` and `stepbox
//! schema`: checking, compiling and drawing a workflow without running it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::scheduler;
use crate::workflow::{Action, Workflow, WorkflowSpec};

use super::run::collect_inputs;
use super::{CliError, engine_config, parse_key_value, sandbox_with};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox validate examples/diamond.yaml
  stepbox validate order.yaml --input order_id=42

Checks the file, every template and every component; with --input, also the inputs.")]
pub(crate) struct ValidateArgs {
    /// The workflow file.
    file: PathBuf,
    /// Check these inputs too, as `stepbox run` would. Repeatable.
    #[arg(long = "input", short, value_parser = parse_key_value, value_name = "NAME=VALUE")]
    inputs: Vec<(String, String)>,
    /// A JSON file with an object of inputs.
    #[arg(long, value_name = "FILE")]
    input_file: Option<PathBuf>,
}

pub(crate) async fn validate(args: ValidateArgs, data_dir: &Path) -> Result<u8, CliError> {
    let workflow = Workflow::load(&args.file)?;
    if !args.inputs.is_empty() || args.input_file.is_some() {
        let inputs = collect_inputs(args.input_file.as_ref(), &args.inputs).map_err(CliError::Usage)?;
        workflow.bind_inputs(&inputs)?;
    }
    let sandbox = sandbox_with(engine_config(data_dir))?;
    scheduler::compile(&workflow, &sandbox).await?;
    println!(
        "{} is valid: workflow `{}`, {} steps, {} components",
        args.file.display(),
        workflow.name,
        workflow.steps.len(),
        workflow.components.len()
    );
    Ok(0)
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox compile examples/demo.yaml
  stepbox compile steps/*.wasm

Compiled code is kept in the data directory's compiled/ and used by every later run, validate and step run.")]
pub(crate) struct CompileArgs {
    /// Workflow files (all their components) or component files (.wasm).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub(crate) async fn compile(args: CompileArgs, data_dir: &Path) -> Result<u8, CliError> {
    let sandbox = sandbox_with(engine_config(data_dir))?;
    // Every file is tried; the command fails if any did.
    let mut failed = Vec::new();
    for file in &args.files {
        let started = std::time::Instant::now();
        let result = if file.extension().is_some_and(|ext| ext == "wasm") {
            let (sandbox, path) = (sandbox.clone(), file.clone());
            match tokio::task::spawn_blocking(move || sandbox.load(&path)).await {
                Ok(loaded) => loaded.map(|_| 1).map_err(|err| format!("error: {err}")),
                Err(err) => Err(format!("error: compiling stopped: {err}")),
            }
        } else {
            match Workflow::load(file) {
                Ok(workflow) => scheduler::compile(&workflow, &sandbox)
                    .await
                    .map(|components| components.len())
                    .map_err(|err| err.to_string()),
                Err(err) => Err(err.to_string()),
            }
        };
        match result {
            Ok(n) => println!("{}: {n} component(s) compiled in {:.1?}", file.display(), started.elapsed()),
            Err(message) => failed.push(message),
        }
    }
    if failed.is_empty() { Ok(0) } else { Err(CliError::Invalid(failed.join("\n"))) }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum GraphFormat {
    Mermaid,
    Dot,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox graph examples/diamond.yaml
  stepbox graph examples/diamond.yaml --format dot | dot -Tsvg > diamond.svg")]
pub(crate) struct GraphArgs {
    /// The workflow file.
    file: PathBuf,
    #[arg(long, value_enum, default_value = "mermaid")]
    format: GraphFormat,
}

pub(crate) fn graph(args: GraphArgs) -> Result<u8, CliError> {
    let workflow = Workflow::load(&args.file)?;
    print!("{}", draw(&workflow, args.format));
    Ok(0)
}

/// The DAG as text: dependencies as solid edges, failure handlers dashed.
fn draw(workflow: &Workflow, format: GraphFormat) -> String {
    let mut out = String::new();
    let label = |i: usize| {
        let step = &workflow.steps[i];
        let what = match &step.action {
            Action::Run { component } => component.clone(),
            Action::Include { path, .. } => format!("include {path}"),
            Action::Wait { event, .. } => format!("wait for {event}"),
        };
        format!("{}\\n{what}", step.id)
    };
    match format {
        GraphFormat::Mermaid => {
            out.push_str("flowchart TD\n");
            for (i, _) in workflow.steps.iter().enumerate() {
                let _ = writeln!(out, "    s{i}[\"{}\"]", label(i).replace("\\n", "<br/>").replace('"', "'"));
            }
            for (i, step) in workflow.steps.iter().enumerate() {
                for &dep in &step.depends_on {
                    if step.handles.contains(&dep) {
                        let _ = writeln!(out, "    s{dep} -. on failure .-> s{i}");
                    } else {
                        let _ = writeln!(out, "    s{dep} --> s{i}");
                    }
                }
            }
        }
        GraphFormat::Dot => {
            let _ = writeln!(
                out,
                "digraph \"{}\" {{\n    rankdir=TB;\n    node [shape=box];",
                workflow.name.replace('"', "'")
            );
            for (i, _) in workflow.steps.iter().enumerate() {
                let _ = writeln!(out, "    s{i} [label=\"{}\"];", label(i).replace('"', "'"));
            }
            for (i, step) in workflow.steps.iter().enumerate() {
                for &dep in &step.depends_on {
                    let style = if step.handles.contains(&dep) { " [style=dashed, label=\"on failure\"]" } else { "" };
                    let _ = writeln!(out, "    s{dep} -> s{i}{style};");
                }
            }
            out.push_str("}\n");
        }
    }
    out
}

/// The JSON Schema of workflow files, for editor completion.
pub(crate) fn schema() -> Result<u8, CliError> {
    let schema = schemars::schema_for!(WorkflowSpec);
    let text = serde_json::to_string_pretty(&schema).map_err(|err| CliError::Failed(err.to_string()))?;
    println!("{text}");
    Ok(0)
}
