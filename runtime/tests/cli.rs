//! The `stepbox` binary as a user runs it: outputs, summaries, exit codes
//! and error messages.

use std::process::{Command, Output};

use serde_json::{Value, json};
use stepbox_tests::guests;

fn stepbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stepbox")).args(args).output().expect("running stepbox")
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
    assert!(report["duration_ms"].as_f64().unwrap() > 0.0);
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
    assert_eq!((report["status"].as_str(), report["kind"].as_str()), (Some("failed"), Some("memory-limit")));
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
}

#[test]
fn a_file_that_is_not_a_step_exits_3_naming_the_problem() {
    let module = std::env::temp_dir().join(format!("stepbox-core-{}.wasm", std::process::id()));
    std::fs::write(&module, wat::parse_str("(module)").unwrap()).unwrap();
    let out = stepbox(&["step", "run", module.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("is a core WebAssembly module, not a component"), "{}", stderr(&out));
    std::fs::remove_file(module).unwrap();

    let out = stepbox(&["step", "run", guests::CLI_HELLO]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("does not export `run`"), "{}", stderr(&out));
}

#[test]
fn every_command_has_help_with_examples() {
    for args in [&["--help"][..], &["step", "--help"], &["step", "run", "--help"]] {
        let out = stepbox(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(stdout(&out).contains("Examples:"), "{args:?}: {}", stdout(&out));
    }
}
