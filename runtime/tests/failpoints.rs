//! Deterministic crashes. The `stepbox` binary of the test suite has
//! failpoints (src/failpoint.rs) at the boundaries that matter to
//! durability: around each journal commit and inside its batches, between
//! an attempt's effects and its end record, around the run lease, around
//! key-value writes and around the compile cache. For each in turn, a run
//! of a workflow with chains, a fan-out, an include, retries, key-value
//! updates and steps that read other steps' outputs is aborted exactly
//! there, then resumed, and must end as a clean run does without running
//! anything finished again.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use common::{journal_state, json, key_counts, output, stderr, stepbox, temp_dir, use_database};
use serde_json::{Value, json};
use stepbox_tests::guests;
use stepbox_tests::postgres::TestDatabase;

/// Where the runs' records go.
#[derive(Clone, Copy)]
enum Store {
    /// The data directory's SQLite files.
    Sqlite,
    /// A PostgreSQL database, a new one for each crash.
    Postgres,
}

impl Store {
    /// A fresh store for the `stepbox` commands this thread runs next; it
    /// lasts as long as what this returns.
    fn fresh(self) -> Option<TestDatabase> {
        let database = match self {
            Store::Sqlite => None,
            Store::Postgres => Some(TestDatabase::create()),
        };
        use_database(database.as_ref().map(|database| database.url.as_str()));
        database
    }
}

/// Every failpoint in stepbox's source, by name.
fn failpoints_in_source() -> HashSet<String> {
    let mut names = HashSet::new();
    let mut dirs = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") && !path.ends_with("failpoint.rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (_, rest) in text.match_indices("failpoint!(\"").map(|(i, _)| text.split_at(i + 12)) {
                    names.insert(rest[..rest.find('"').unwrap()].to_owned());
                }
            }
        }
    }
    names
}

/// The workflow (and its include) in `dir`; the side-effect steps append
/// their keys to `dir/out/keys.log`.
fn workflow(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    std::fs::write(
        dir.join("sub.yaml"),
        format!(
            "name: sub\ncomponents:\n  effect: {}\nsteps:\n  - id: one\n    uses: effect\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log }}\n  - id: two\n    uses: effect\n    depends_on: [one]\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log }}\noutputs:\n  keys: \"{{{{ [steps.one.output.key, steps.two.output.key] }}}}\"\n",
            guests::SIDE_EFFECT
        ),
    )
    .unwrap();
    let path = dir.join("crashy.yaml");
    std::fs::write(
        &path,
        format!(
            "name: crashy
components:
  effect: {effect}
  echo: {echo}
  flaky: {flaky}
  counter: {counter}
steps:
  - id: seed
    uses: echo
    with: {{ items: [1, 2, 3] }}
  - id: fan
    uses: effect
    depends_on: [seed]
    for_each: \"{{{{ steps.seed.output.items }}}}\"
    dirs: ['out:/out']
    with: {{ file: /out/keys.log }}
  - id: flaky
    uses: flaky
    with: {{ succeed_on_attempt: 3 }}
    retry: {{ attempts: 4, initial: 10ms }}
  - id: count
    uses: counter
    depends_on: [fan]
    with: {{ key: hits }}
  - id: sub
    include: sub.yaml
    depends_on: [flaky]
  - id: gather
    uses: echo
    depends_on: [fan, flaky, sub, count]
    with: {{ fan: \"{{{{ steps.fan.output }}}}\", flaky: \"{{{{ steps.flaky.output }}}}\", sub: \"{{{{ steps.sub.output }}}}\" }}
",
            effect = guests::SIDE_EFFECT,
            echo = guests::ECHO,
            flaky = guests::FLAKY,
            counter = guests::COUNTER,
        ),
    )
    .unwrap();
    path
}

/// Each step's output, with the run's id taken out, by step id. The
/// counter's is left aside (it depends on how often it ran), and the flaky
/// step's attempt number, which an interrupted attempt rightly moves on,
/// must be its last attempt's and is then left aside too.
fn outputs(shown: &Value) -> BTreeMap<String, String> {
    let id = shown["id"].as_str().unwrap();
    let mut outputs = BTreeMap::new();
    for step in shown["steps"].as_array().unwrap() {
        let mut output = step["output"].clone();
        let flaky = match step["id"].as_str().unwrap() {
            "count" => continue,
            "flaky" => Some(&mut output),
            "gather" => Some(&mut output["flaky"]),
            _ => None,
        };
        if let Some(flaky) = flaky {
            let last =
                shown["steps"].as_array().unwrap().iter().find(|step| step["id"] == "flaky").unwrap()["executions"][0]
                    ["attempts"]
                    .as_array()
                    .unwrap()
                    .last()
                    .unwrap()["attempt"]
                    .clone();
            assert_eq!(flaky["succeeded_on_attempt"], last, "the flaky step's output is its last attempt's");
            flaky["succeeded_on_attempt"] = json!("LAST");
        }
        outputs.insert(step["id"].as_str().unwrap().to_owned(), output.to_string().replace(id, "RUN"));
    }
    outputs
}

/// Every execution's attempt numbers, by idempotency key.
fn attempts(shown: &Value) -> HashMap<String, Vec<u64>> {
    let mut attempts = HashMap::new();
    for execution in common::executions(shown) {
        let numbers = execution["attempts"].as_array().unwrap().iter().map(|a| a["attempt"].as_u64().unwrap());
        attempts.insert(execution["idempotency_key"].as_str().unwrap().to_owned(), numbers.collect());
    }
    attempts
}

/// The counter step's output `count`: the key-value counter after it.
fn count(shown: &Value) -> i64 {
    let step = shown["steps"].as_array().unwrap().iter().find(|step| step["id"] == "count").unwrap();
    step["output"]["count"].as_i64().unwrap()
}

#[test]
fn a_run_aborted_at_any_failpoint_resumes_to_a_clean_runs_outputs_without_repeating_finished_work() {
    crash_everywhere(Store::Sqlite, "failpoints-sqlite");
}

#[test]
fn on_postgresql_a_run_aborted_at_any_failpoint_resumes_to_a_clean_runs_outputs_without_repeating_finished_work() {
    crash_everywhere(Store::Postgres, "failpoints-postgres");
}

/// Aborts a run at each failpoint in turn, each time with `store` fresh,
/// and checks that it resumes to the clean run's outputs.
fn crash_everywhere(store: Store, dir_name: &str) {
    let dir = temp_dir(dir_name);
    let clean_workflow = workflow(&dir);
    let _clean_database = store.fresh();

    // A clean run, which notes every failpoint it passes.
    let clean_data = dir.join("clean");
    let log = dir.join("visits.log");
    let out = stepbox(&clean_data)
        .args(["run", clean_workflow.to_str().unwrap(), "--json"])
        .env("STEPBOX_FAILPOINT_LOG", &log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let clean =
        json(&clean_data, &["show", json(&clean_data, &["runs", "--json"])[0]["id"].as_str().unwrap(), "--json"]);
    let mut visits: BTreeMap<String, usize> = BTreeMap::new();
    for name in std::fs::read_to_string(&log).unwrap().lines() {
        *visits.entry(name.to_owned()).or_default() += 1;
    }
    let declared = failpoints_in_source();
    let missed: Vec<_> = declared.iter().filter(|name| !visits.contains_key(*name)).collect();
    assert!(missed.is_empty(), "failpoints the workflow never reaches: {missed:?}");
    assert!(declared.len() >= 10, "{declared:?}");
    // Compiled components, so each crash need not compile them again
    // (except where the compile cache is what crashes).
    let compiled = clean_data.join("compiled");

    let mut crashed_at = Vec::new();
    for (name, &reached) in &visits {
        // Each visit of a failpoint passed at most three times; the first,
        // second and middle ones of the others (a group commit's count
        // varies between runs, so its last visit may not come).
        let nths: Vec<usize> = if reached <= 3 { (1..=reached).collect() } else { vec![1, 2, reached / 2] };
        for nth in nths.into_iter().collect::<std::collections::BTreeSet<_>>() {
            let case = dir.join(format!("{name}@{nth}"));
            let data = case.join("data");
            let _database = store.fresh();
            std::fs::create_dir_all(&case).unwrap();
            let workflow = workflow(&case);
            if !name.starts_with("cache.") {
                copy_dir(&compiled, &data.join("compiled"));
            }
            let out = stepbox(&data)
                .args(["run", workflow.to_str().unwrap()])
                .env("STEPBOX_FAILPOINT", format!("{name}@{nth}"))
                .output()
                .unwrap();
            assert_eq!(out.status.signal(), Some(6), "{name}@{nth}: the process did not abort there: {}", stderr(&out));
            crashed_at.push(format!("{name}@{nth}"));

            let runs = json(&data, &["runs", "--json"]);
            let Some(id) = runs[0]["id"].as_str().map(str::to_owned) else {
                // Aborted before the run was recorded: there is nothing to
                // resume, and nothing ran.
                assert!(key_counts(&case).is_empty(), "{name}@{nth}: a step ran before its run was recorded");
                let out = output(&data, &["run", workflow.to_str().unwrap()]);
                assert!(out.status.success(), "{name}@{nth}: {}", stderr(&out));
                continue;
            };
            let before = json(&data, &["show", &id, "--json"]);
            let (completed, interrupted) = journal_state(&data, &id);
            let counts_before = key_counts(&case);

            if before["status"] != "succeeded" {
                let out = output(&data, &["resume", &id, "--json"]);
                assert!(out.status.success(), "{name}@{nth}: resume failed: {}", stderr(&out));
            }
            let after = json(&data, &["show", &id, "--json"]);
            assert_eq!(after["status"], "succeeded", "{name}@{nth}");
            assert_eq!(outputs(&after), outputs(&clean), "{name}@{nth}: the outputs of a clean run");

            let (attempts_before, attempts_after) = (attempts(&before), attempts(&after));
            for (key, numbers) in &attempts_after {
                let ordered = numbers.windows(2).all(|pair| pair[0] < pair[1]);
                assert!(ordered, "{name}@{nth}: {key}: attempt numbers count on across resumes: {numbers:?}");
                if completed.contains(key) {
                    assert_eq!(Some(numbers), attempts_before.get(key), "{name}@{nth}: {key} finished, then ran again");
                }
            }
            // An attempt the abort interrupted stays in the record, and
            // the execution goes on with the next number.
            for (key, number) in &interrupted {
                let numbers = &attempts_after[key];
                assert!(
                    numbers.contains(number) && numbers.contains(&(number + 1)),
                    "{name}@{nth}: {key}: interrupted attempt {number}, then {numbers:?}"
                );
            }
            let counts_after = key_counts(&case);
            for (key, &count) in &counts_after {
                let allowed = 1 + interrupted.iter().filter(|(k, _)| k == key).count();
                assert!(count <= allowed, "{name}@{nth}: {key}'s effect happened {count} times");
                if completed.contains(key) {
                    assert_eq!(Some(&count), counts_before.get(key), "{name}@{nth}: {key}'s effect was repeated");
                }
            }
            assert_eq!(counts_after.len(), 5, "{name}@{nth}: every side effect happened: {counts_after:?}");
            // The counter's increment is repeated only by an attempt the
            // abort interrupted (before its end was recorded).
            let counter_interrupted = interrupted.iter().filter(|(key, _)| key.ends_with("/count")).count();
            let counted = count(&after);
            assert!((1..=1 + counter_interrupted as i64).contains(&counted), "{name}@{nth}: counted {counted}");
        }
    }
    println!("aborted at: {}", crashed_at.join(", "));
    let visited: HashSet<_> = crashed_at.iter().map(|case| case.split('@').next().unwrap().to_owned()).collect();
    assert_eq!(visited, declared, "every failpoint was crashed at");
    std::fs::remove_dir_all(dir).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
