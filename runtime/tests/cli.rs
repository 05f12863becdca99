//! The `stepbox` binary as a user runs it: outputs, summaries, exit codes
//! and error messages.

use std::process::{Command, Output};

use serde_json::{Value, json};
use stepbox_tests::guests;

/// A data directory for this test process, so tests never touch the user's.
fn data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("stepbox-cli-data-{}", std::process::id()))
}

fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stepbox"));
    command.env("STEPBOX_DATA_DIR", data_dir());
    command
}

fn stepbox(args: &[&str]) -> Output {
    command().args(args).output().expect("running stepbox")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn step_run_prints_the_output_and_a_summary() {
    let out = stepbox(&["step", "run", guests::HELLO, "--input", r#"{"name": "Ada"}"#]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(serde_json::from_str::<Value>(&stdout(&out)).unwrap(), json!({ "greeting": "Hello, Ada!" }));
    let summary = stderr(&out);
    assert!(summary.contains("greeting Ada in step hello"), "the step's log is shown: {summary}");
    let last = summary.lines().last().unwrap();
    assert!(
        last.starts_with("succeeded · ") && last.contains(" · fuel ") && last.contains(" · peak memory "),
        "{last}"
    );
}

#[test]
fn step_run_json_prints_the_whole_report() {
    let out =
        stepbox(&["step", "run", guests::HELLO, "--input", r#"{"name": "Ada"}"#, "--json", "--env", "GREETING=Hi"]);
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["output"], json!({ "greeting": "Hi, Ada!" }));
    assert!(report["fuel_consumed"].as_u64().unwrap() > 0);
    let (started, finished) = (report["started_ms"].as_f64().unwrap(), report["finished_ms"].as_f64().unwrap());
    assert!(started > 1.7e12 && finished >= started, "unix milliseconds: {report}");
    assert_eq!(report["logs"][0]["level"], "info");
}

#[test]
fn step_run_reads_input_files_config_and_directories() {
    let dir = std::env::temp_dir().join(format!("stepbox-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let order = dir.join("order.json");
    std::fs::write(
        &order,
        r#"{"id": "o1", "customer": {"first_name": "A", "last_name": "B"}, "items": [{"sku": "x", "quantity": 2, "unit_price_cents": 5}]}"#,
    )
    .unwrap();
    let out = stepbox(&[
        "step",
        "run",
        guests::TRANSFORM,
        "--input",
        &format!("@{}", order.display()),
        "--config",
        "currency=EUR",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let invoice: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((invoice["currency"].as_str(), invoice["total_cents"].as_u64()), (Some("EUR"), Some(10)));

    let grant = format!("{}:/data:ro", dir.display());
    let out = stepbox(&["step", "run", guests::FS_READ, "--dir", &grant, "--input", r#"{"path": "/data/order.json"}"#]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(r#""path":"/data/order.json""#));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_failed_step_exits_1_with_its_class() {
    let out = stepbox(&["step", "run", guests::SPIN, "--timeout", "300ms", "--fuel", "1_000_000_000_000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains("failed (timeout): the attempt ran longer than its timeout of 300ms"),
        "{}",
        stderr(&out)
    );

    let out = stepbox(&["step", "run", guests::MEMORY_HOG, "--memory", "16MiB", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((report["status"].as_str(), report["failure"]["kind"].as_str()), (Some("failed"), Some("memory-limit")));
}

#[test]
fn usage_errors_exit_2_and_say_what_is_wrong() {
    let out = stepbox(&["step", "run", guests::HELLO, "--input", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("the input is not valid JSON"), "{}", stderr(&out));

    let out = stepbox(&["step", "run", guests::HELLO, "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--memory"), "{}", stderr(&out));

    let out = stepbox(&["step", "run", guests::HELLO, "--dir", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("HOST:GUEST"), "{}", stderr(&out));

    let out = stepbox(&["step", "run", guests::HELLO, "--input", "@/no/such/input.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read the input file /no/such/input.json"), "{}", stderr(&out));

    let out = stepbox(&["worker", "--slots", "4000", "--reserve", "100"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("make 4100 attempts at once; give at most 4096 together"), "{}", stderr(&out));

    let hello = format!("{}/../examples/diamond.yaml", env!("CARGO_MANIFEST_DIR"));
    // Refused before the run is recorded: nothing is left behind.
    let own = std::env::temp_dir().join(format!("stepbox-cli-metrics-{}", std::process::id()));
    let in_own = |args: &[&str]| command().env("STEPBOX_DATA_DIR", &own).args(args).output().unwrap();
    let out = in_own(&["run", &hello, "--metrics-listen", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot listen on nowhere"), "{}", stderr(&out));
    assert!(stderr(&out).contains("choose another --metrics-listen"), "{}", stderr(&out));
    let runs = in_own(&["runs"]);
    assert!(!stdout(&runs).contains("diamond"), "{}", stdout(&runs));

    let out = stepbox(&["worker", "--lease", "10ms"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--lease 10ms is too short"), "{}", stderr(&out));
}

#[test]
fn a_file_that_is_not_a_step_exits_3_naming_the_problem() {
    let module = std::env::temp_dir().join(format!("stepbox-core-{}.wasm", std::process::id()));
    std::fs::write(&module, wat::parse_str("(module)").unwrap()).unwrap();
    let out = stepbox(&["step", "run", module.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("is a core WebAssembly module without a `_start` export"), "{}", stderr(&out));

    std::fs::write(&module, wat::parse_str("(component)").unwrap()).unwrap();
    let out = stepbox(&["step", "run", module.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("exports neither `run` nor `wasi:cli/run`"), "{}", stderr(&out));
    std::fs::remove_file(module).unwrap();
}

#[test]
fn every_command_has_help_with_examples() {
    let commands = [
        "run", "resume", "retry", "runs", "show", "logs", "gc", "validate", "graph", "schema", "new", "compile", "step",
    ];
    let mut all: Vec<Vec<&str>> = commands.iter().map(|command| vec![*command, "--help"]).collect();
    all.push(vec!["--help"]);
    all.push(vec!["step", "run", "--help"]);
    for args in &all {
        let out = stepbox(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(stdout(&out).contains("Examples:"), "{args:?}: {}", stdout(&out));
    }
}

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_example_workflow_runs_as_documented() {
    // Two examples fail on purpose: they show what happens then.
    let failing = ["cleanup.yaml", "on-failure.yaml"];
    let mut names: Vec<String> = std::fs::read_dir(example(""))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let out = stepbox(&["run", &example(&name), "--json"]);
        let expected = if failing.contains(&name.as_str()) { 1 } else { 0 };
        assert_eq!(out.status.code(), Some(expected), "{name}: {}", stderr(&out));
        let report: Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(report["status"], if expected == 0 { "succeeded" } else { "failed" }, "{name}");
        assert!(report["output_errors"].as_array().unwrap().is_empty(), "{name}: {}", report["output_errors"]);
    }
}

#[test]
fn run_prints_outputs_a_summary_and_progress() {
    let out = stepbox(&["run", &example("fan-out-fan-in.yaml"), "--input", r#"names=["Ada", "Alan"]"#]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let outputs: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(outputs, json!({ "greetings": ["Hello, Ada!", "Hello, Alan!"] }));
    let err = stderr(&out);
    assert!(err.contains("greet[1]: attempt 1 started"), "plain progress lines off a terminal: {err}");
    assert!(err.contains("│ gather ") && err.contains("succeeded"), "a summary table: {err}");
    assert!(err.lines().last().unwrap().contains("succeeded in"), "{err}");
}

#[test]
fn run_and_validate_refuse_bad_workflows_and_inputs() {
    let dir = std::env::temp_dir().join(format!("stepbox-cli-wf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "name: x\nsteps:\n  - id: a\n    uses: nothing.wasm\n    dependson: [b]\n").unwrap();
    for command in ["run", "validate"] {
        let out = stepbox(&[command, bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{command}");
        assert!(stderr(&out).contains("bad.yaml:5:5: unknown field `dependson`"), "{}", stderr(&out));
        assert!(stderr(&out).contains("help: did you mean `depends_on`?"), "{}", stderr(&out));
    }
    let out = stepbox(&["validate", &example("diamond.yaml")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("is valid: workflow `diamond`, 4 steps, 2 components"));

    let out = stepbox(&["run", &example("fan-out-fan-in.yaml"), "--input", "nmes=[]"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("unknown input `nmes`") && stderr(&out).contains("did you mean `names`?"),
        "{}",
        stderr(&out)
    );
    let out = stepbox(&["run", &example("diamond.yaml"), "--max-parallel", "0"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn graph_draws_mermaid_and_dot_and_schema_describes_the_file() {
    let out = stepbox(&["graph", &example("diamond.yaml")]);
    assert_eq!(out.status.code(), Some(0));
    let mermaid = stdout(&out);
    assert!(mermaid.starts_with("flowchart TD\n"));
    assert!(
        mermaid.contains("s0 --> s1") && mermaid.contains("s1 --> s3") && mermaid.contains("s2 --> s3"),
        "{mermaid}"
    );
    let out = stepbox(&["graph", &example("on-failure.yaml"), "--format", "dot"]);
    let dot = stdout(&out);
    assert!(dot.starts_with("digraph \"on-failure\"") && dot.contains("s1 -> s2 [style=dashed"), "{dot}");

    let out = stepbox(&["schema"]);
    let schema: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(schema["title"], "WorkflowSpec");
    assert!(schema["properties"]["steps"].is_object());
    assert!(schema["required"].as_array().unwrap().contains(&json!("steps")));
}

#[cfg(unix)]
#[test]
fn ctrl_c_and_sigterm_cancel_a_run_and_record_the_cancelled_steps() {
    let dir = std::env::temp_dir().join(format!("stepbox-cli-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let workflow = dir.join("slow.yaml");
    // The step's own timeout is far off, so only the signal can end it.
    std::fs::write(
        &workflow,
        format!("name: slow\ncomponents:\n  sleepy: {}\nsteps:\n  - id: nap\n    uses: sleepy\n    with: {{ seconds: 60 }}\n    limits: {{ timeout: 2m }}\n", guests::SLEEPY),
    )
    .unwrap();
    for signal in ["INT", "TERM"] {
        let started = std::time::Instant::now();
        let mut child = command()
            .args(["run", workflow.to_str().unwrap(), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the step is running, then signal.
        let mut progress = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("nap: attempt 1 started") {
            line.clear();
            assert!(std::io::BufRead::read_line(&mut progress, &mut line).unwrap() > 0, "stepbox exited early");
        }
        let status = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "SIG{signal}");
        assert!(started.elapsed() < std::time::Duration::from_secs(50), "SIG{signal} ended the 60-second step");
        let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(report["status"], "cancelled", "SIG{signal}");
        assert_eq!(report["steps"][0]["status"], "cancelled", "SIG{signal}");
        let attempt = &report["steps"][0]["executions"][0]["attempts"][0];
        assert_eq!(attempt["failure"]["kind"], "cancelled", "SIG{signal}: {attempt}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

mod versions {
    #![allow(dead_code)] // only the C template's tools are installed here
    include!("../templates/versions.rs");
}

/// The tools the C template's build.sh runs besides zig, installed from
/// crates.io into `tools/bin` the first time, as its comment tells users.
fn c_template_tools(tools: &std::path::Path) {
    let wanted = [
        ("wit-bindgen", versions::WIT_BINDGEN, ["--features", "c"]),
        ("wasm-tools", versions::WASM_TOOLS, ["--features", "component"]),
    ];
    for (binary, package, features) in wanted {
        if tools.join("bin").join(binary).exists() {
            continue;
        }
        // Unoptimized: they run once, on small inputs, and compile in half
        // the time.
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .args(["install", "--quiet", "--locked", "--debug", "--no-default-features", "--root"])
            .arg(tools)
            .arg("--target-dir")
            .arg(tools.join("build"))
            .args(features)
            .arg(package);
        for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR"] {
            cargo.env_remove(var);
        }
        assert!(cargo.status().unwrap().success(), "installing {package} failed");
    }
}

/// `stepbox new` in `lang`: the printed commands build a step that runs.
/// The C build finds wit-bindgen and wasm-tools where `c_template_tools`
/// installs them, and zig where the tests' build script did (through
/// `STEPBOX_ZIG_DIR`, so its 100 MB are not fetched again). One test per
/// language, so they build side by side.
fn new_project_builds_and_runs_with_the_printed_commands(lang: &str) {
    let dir = std::env::temp_dir().join(format!("stepbox-new-{lang}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tools = std::path::Path::new(guests::HELLO).ancestors().nth(4).unwrap().join("tools");
    let path = format!("{}:{}", tools.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let zig = tools.join("zig");
    if lang == "c" {
        c_template_tools(&tools);
    }
    let project = dir.join(format!("greeter-{lang}"));
    let out = stepbox(&["new", project.to_str().unwrap(), "--lang", lang]);
    assert!(out.status.success(), "{lang}: {}", stderr(&out));
    let printed = stdout(&out);
    let commands: Vec<&str> = printed.lines().filter_map(|line| line.strip_prefix("  ")).collect();
    assert_eq!(commands.first(), Some(&format!("cd {}", project.display()).as_str()), "{printed}");
    let (run, build) = commands[1..].split_last().unwrap();
    for command in build {
        let status = Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(&project)
            .env("PATH", &path)
            .env("STEPBOX_ZIG_DIR", &zig)
            .env("ZIG_GLOBAL_CACHE_DIR", zig.join("cache"))
            .status();
        assert!(status.unwrap().success(), "{lang}: `{command}` failed");
    }
    let component = run.strip_prefix("stepbox step run ").unwrap().split_whitespace().next().unwrap();
    let component = project.join(component);
    let out = stepbox(&["step", "run", component.to_str().unwrap(), "--input", r#"{"name": "Ada"}"#]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).ok(),
        Some(json!({ "greeting": "Hello, Ada!" })),
        "{lang}: {}",
        stderr(&out)
    );
    let step_run = |input: &str| {
        stepbox(&["step", "run", component.to_str().unwrap(), "--input", input, "--config", "greeting=Hi"])
    };
    let out = step_run(r#"{"name": ""}"#);
    assert_eq!(out.status.code(), Some(1), "{lang}");
    assert!(stderr(&out).contains("failed (fatal): `name` must be a non-empty string"), "{lang}: {}", stderr(&out));
    let out = step_run(r#"{"name": "Ada"}"#);
    assert_eq!(stdout(&out).trim(), r#"{"greeting":"Hi, Ada!"}"#, "{lang}");
    let out = stepbox(&["new", project.to_str().unwrap(), "--lang", lang]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_new_rust_project_builds_and_runs() {
    new_project_builds_and_runs_with_the_printed_commands("rust");
}

#[test]
fn a_new_python_project_builds_and_runs() {
    new_project_builds_and_runs_with_the_printed_commands("python");
}

#[test]
fn a_new_javascript_project_builds_and_runs() {
    new_project_builds_and_runs_with_the_printed_commands("js");
}

#[test]
fn a_new_c_project_builds_and_runs() {
    new_project_builds_and_runs_with_the_printed_commands("c");
}

/// `stepbox compile` fills the data directory's cache; later commands load
/// from it, and a damaged entry is compiled again rather than trusted.
#[test]
fn compiled_components_are_cached_and_damaged_entries_replaced() {
    let data = std::env::temp_dir().join(format!("stepbox-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let run = |args: &[&str]| command().env("STEPBOX_DATA_DIR", &data).args(args).output().unwrap();
    let entries = |extension: &str| -> Vec<std::path::PathBuf> {
        let dir = data.join("compiled");
        let mut found: Vec<_> = std::fs::read_dir(&dir)
            .map(|entries| entries.map(|entry| entry.unwrap().path()).collect())
            .unwrap_or_default();
        found.retain(|path: &std::path::PathBuf| path.extension().is_some_and(|ext| ext == extension));
        found.sort();
        found
    };

    let out = run(&["compile", guests::HELLO, guests::WORDCOUNT_WASIP1]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 component(s) compiled"), "{}", stdout(&out));
    let cached = entries("cwasm");
    assert_eq!((cached.len(), entries("mwasm").len()), (1, 1), "a component and a preview1 module");

    std::fs::write(&cached[0], b"not compiled code").unwrap();
    let out = run(&["step", "run", guests::HELLO, "--input", r#"{"name": "Ada"}"#]);
    assert_eq!(stdout(&out).trim(), r#"{"greeting":"Hello, Ada!"}"#, "{}", stderr(&out));
    assert_ne!(std::fs::read(&cached[0]).unwrap(), b"not compiled code", "the damaged entry was replaced");
    assert_eq!(entries("cwasm").len(), 1);

    let out = run(&["compile", &example("demo.yaml")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(entries("cwasm").len() > 1, "the demo's components are cached too");
    let out = run(&["compile", "/no/such/step.wasm"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("cannot read /no/such/step.wasm"), "{}", stderr(&out));

    // `gc --cache` removes what no engine of this build can load, and with
    // --older-than what was not used for that long; it keeps the rest.
    let current = entries("cwasm");
    let stale = data.join("compiled").join(format!("{}-0000000000000000.cwasm", "ab".repeat(32)));
    std::fs::write(&stale, b"compiled by another wasmtime").unwrap();
    let out = run(&["gc", "--cache"]);
    assert!(stdout(&out).contains("removed 1 compiled file(s)"), "{}{}", stdout(&out), stderr(&out));
    assert!(!stale.exists());
    assert_eq!(entries("cwasm"), current);
    let unused = std::fs::File::options().write(true).open(&current[0]).unwrap();
    unused.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 3600)).unwrap();
    let out = run(&["gc", "--cache", "--older-than", "2h"]);
    assert!(stdout(&out).contains("removed 1 compiled file(s)"), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(entries("cwasm").len(), current.len() - 1);
    let out = run(&["gc"]);
    assert_eq!(out.status.code(), Some(2), "gc needs --older-than or --cache");
    std::fs::remove_dir_all(&data).unwrap();
}
