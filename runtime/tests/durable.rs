//! Durable runs: the journal, resume after SIGKILL, retry, the history
//! commands, and a store in bad conditions.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{journal_state, json, key_counts, output, stderr, stepbox, temp_dir};
use serde_json::Value;
use stepbox_tests::guests;

/// splitmix64: a small seeded generator, so a failing seed can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

/// 2 parallel chains of 30 steps; every step appends its key to a file.
fn crash_workflow(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let mut yaml = format!(
        "name: crash\ncomponents:\n  effect: {}\ndefaults:\n  limits: {{ timeout: 30s }}\nsteps:\n",
        guests::SIDE_EFFECT
    );
    // Chains of thirty: long enough that twenty short-lived processes cannot
    // finish the run, even when nothing has to compile.
    for chain in 0..2 {
        for link in 0..30 {
            yaml.push_str(&format!(
                "  - id: c{chain}-s{link}\n    uses: effect\n    dirs: ['out:/out']\n    with: {{ file: /out/keys.log, millis: 200 }}\n"
            ));
            if link > 0 {
                yaml.push_str(&format!("    depends_on: [c{chain}-s{}]\n", link - 1));
            }
        }
    }
    let path = dir.join("crash.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn a_run_killed_at_random_moments_resumes_without_repeating_finished_steps() {
    let seed: u64 = std::env::var("STEPBOX_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("crash test seed: {seed} (set STEPBOX_CRASH_SEED={seed} to replay)");
    let mut random = Random(seed);
    let dir = temp_dir("crash");
    let data = dir.join("data");
    let workflow = crash_workflow(&dir);

    let mut run_id: Option<String> = None;
    let mut interrupted: HashSet<(String, u64)> = HashSet::new();
    // Counts of each key at the moment the journal first held it completed.
    let mut counted_when_completed: HashMap<String, usize> = HashMap::new();
    for kill in 0..20 {
        let mut command = stepbox(&data);
        match &run_id {
            None => command.args(["run", workflow.to_str().unwrap()]),
            Some(id) => command.args(["resume", id]),
        };
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // Killed a random while after its first attempt started, so every
        // kill lands in the middle of work however slow the machine is.
        let progress = std::io::BufReader::new(child.stderr.take().unwrap());
        let (started, started_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(progress).map_while(Result::ok) {
                if line.contains(": attempt ") && line.ends_with(" started") {
                    let _ = started.send(());
                }
            }
        });
        assert!(
            started_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "seed {seed}: kill {kill}: no attempt started"
        );
        std::thread::sleep(Duration::from_millis(random.between(0, 450)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "seed {seed}: the run finished before kill {kill}; make its steps slower"
        );
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        let id = run_id.get_or_insert_with(|| json(&data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned());
        let (completed, running) = journal_state(&data, id);
        let counts = key_counts(&dir);
        interrupted.extend(running);
        for key in completed {
            let now = counts.get(&key).copied().unwrap_or(0);
            let then = *counted_when_completed.entry(key.clone()).or_insert(now);
            assert_eq!(now, then, "seed {seed}, kill {kill}: {key} ran again after it was recorded as completed");
        }
    }

    assert!(!counted_when_completed.is_empty(), "seed {seed}: the killed processes made progress");
    // Kills that only ever landed between attempts would prove nothing.
    assert!(!interrupted.is_empty(), "seed {seed}: no kill interrupted an attempt");
    let id = run_id.unwrap();
    let out = output(&data, &["resume", &id, "--json"]);
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|err| panic!("seed {seed}: {err}: {}", stderr(&out)));
    assert_eq!(report["status"], "succeeded", "seed {seed}: {}", stderr(&out));
    let shown = json(&data, &["show", &id, "--json"]);
    assert_eq!(shown["status"], "succeeded");
    let steps = shown["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 60);
    let counts = key_counts(&dir);
    for step in steps {
        let key = format!("{id}/{}", step["id"].as_str().unwrap());
        assert_eq!(step["status"], "succeeded", "seed {seed}: {step}");
        assert_eq!(step["output"]["key"], key, "seed {seed}: every output is recorded");
        let count = counts.get(&key).copied().unwrap_or(0);
        let allowed = 1 + interrupted.iter().filter(|(k, _)| *k == key).count();
        assert!(
            (1..=allowed).contains(&count),
            "seed {seed}: {key} ran {count} times; it was interrupted {} times",
            allowed - 1
        );
        if let Some(&then) = counted_when_completed.get(&key) {
            assert_eq!(count, then, "seed {seed}: {key} ran again after it completed");
        }
    }
}

fn small_workflow(dir: &Path, succeed_on_attempt: u32) -> PathBuf {
    let path = dir.join("small.yaml");
    std::fs::write(
        &path,
        format!(
            "name: small\ncomponents:\n  hello: {}\n  flaky: {}\nsteps:\n  - id: a\n    uses: hello\n    with: {{ name: a }}\n  - id: b\n    uses: flaky\n    depends_on: [a]\n    with: {{ succeed_on_attempt: {succeed_on_attempt} }}\n  - id: c\n    uses: hello\n    depends_on: [b]\n    with: {{ name: c }}\n",
            guests::HELLO,
            guests::FLAKY
        ),
    )
    .unwrap();
    path
}

#[test]
fn retry_reruns_the_failed_step_and_resume_refuses_changed_files() {
    let dir = temp_dir("retry");
    let data = dir.join("data");
    let workflow = small_workflow(&dir, 3);
    let out = output(&data, &["run", workflow.to_str().unwrap(), "--label", "order=42"]);
    assert_eq!(out.status.code(), Some(1));
    let runs = json(&data, &["runs", "--label", "order=42", "--json"]);
    let id = runs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(runs[0]["status"], "failed");
    assert!(json(&data, &["runs", "--label", "order=7", "--json"]).as_array().unwrap().is_empty());

    // retry runs the failed step again (its attempt 2, which fails too) and reuses a.
    let report: Value = serde_json::from_slice(&output(&data, &["retry", &id, "--json"]).stdout).unwrap();
    assert_eq!(report["status"], "failed");
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps[0]["executions"][0]["reused"], true, "a is not run again");
    assert_eq!(steps[1]["executions"][0]["attempts"][0]["attempt"], 2, "attempts count on");

    // retry --from a runs a again too; b's attempt 3 succeeds, then c runs.
    let report: Value =
        serde_json::from_slice(&output(&data, &["retry", &id, "--from", "a", "--json"]).stdout).unwrap();
    assert_eq!(report["status"], "succeeded");
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps[0]["executions"][0]["reused"], false, "--from a runs a again");
    assert_eq!(steps[0]["executions"][0]["attempts"][0]["attempt"], 2);
    assert_eq!(steps[1]["executions"][0]["attempts"][0]["attempt"], 3);
    assert_eq!(steps[2]["status"], "succeeded");
    let out = output(&data, &["retry", &id]);
    assert_eq!(out.status.code(), Some(2), "a succeeded run cannot be retried");
    assert!(stderr(&out).contains("only a failed or cancelled run can be retried"), "{}", stderr(&out));
    let out = output(&data, &["resume", &id]);
    assert!(stderr(&out).contains("already succeeded"), "{}", stderr(&out));

    // A changed component makes resume refuse, naming what changed.
    let failing = dir.join("failing");
    std::fs::create_dir_all(&failing).unwrap();
    let copy = failing.join("flaky.wasm");
    std::fs::copy(guests::FLAKY, &copy).unwrap();
    let path = failing.join("wf.yaml");
    std::fs::write(&path, "name: changes\ncomponents:\n  flaky: flaky.wasm\nsteps:\n  - id: x\n    uses: flaky\n    with: { succeed_on_attempt: 5 }\n").unwrap();
    assert_eq!(output(&data, &["run", path.to_str().unwrap()]).status.code(), Some(1));
    let id = json(&data, &["runs", "--workflow", "changes", "--json"])[0]["id"].as_str().unwrap().to_owned();
    std::fs::copy(guests::HELLO, &copy).unwrap();
    let out = output(&data, &["resume", &id]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("component `flaky` changed"), "{}", stderr(&out));
}

#[test]
fn resume_refuses_a_changed_workflow_file() {
    let dir = temp_dir("changed-file");
    let data = dir.join("data");
    let workflow = small_workflow(&dir, 3);
    assert_eq!(output(&data, &["run", workflow.to_str().unwrap()]).status.code(), Some(1));
    let id = json(&data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&workflow).unwrap();
    std::fs::write(&workflow, text.replace("name: c }", "name: d }")).unwrap();
    let out = output(&data, &["resume", &id]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("the workflow file changed"), "{}", stderr(&out));
    let shown = json(&data, &["show", &id, "--json"]);
    assert_eq!(shown["steps"][1]["executions"][0]["attempts"].as_array().unwrap().len(), 1, "nothing ran again");
}

#[test]
fn resume_and_retry_are_held_to_the_tenants_ceilings_of_today() {
    let dir = temp_dir("tenant-resume");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let workflow = small_workflow(&dir, 3);
    std::fs::write(data.join("tenants.yaml"), "tenants:\n  roomy: { components: any }\n").unwrap();
    let out = output(&data, &["run", workflow.to_str().unwrap(), "--tenant", "roomy"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let id = json(&data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
    // The operator takes the components away from the tenant.
    std::fs::write(data.join("tenants.yaml"), "tenants:\n  roomy: {}\n").unwrap();
    for command in ["resume", "retry"] {
        let out = output(&data, &[command, &id]);
        assert_eq!(out.status.code(), Some(3), "{command}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("is not under tenant `roomy`'s allowed component paths"),
            "{command}: {}",
            stderr(&out)
        );
    }
    let shown = json(&data, &["show", &id, "--json"]);
    assert_eq!(shown["steps"][1]["executions"][0]["attempts"].as_array().unwrap().len(), 1, "nothing ran again");
}

#[test]
fn resume_refuses_a_workflow_included_through_a_template_that_changed() {
    let dir = temp_dir("templated-include");
    let data = dir.join("data");
    let inner = |succeed_on_attempt: u32| {
        let yaml = format!(
            "name: inner\ncomponents:\n  flaky: {}\nsteps:\n  - id: x\n    uses: flaky\n    with: {{ succeed_on_attempt: {succeed_on_attempt} }}\n",
            guests::FLAKY
        );
        std::fs::write(dir.join("inner.yaml"), yaml).unwrap();
    };
    inner(5);
    let outer = dir.join("outer.yaml");
    std::fs::write(
        &outer,
        "name: outer\ninputs:\n  which: { type: string, default: inner }\nsteps:\n  - id: inc\n    include: \"{{ inputs.which }}.yaml\"\n",
    )
    .unwrap();
    assert_eq!(output(&data, &["run", outer.to_str().unwrap()]).status.code(), Some(1));
    let id = json(&data, &["runs", "--workflow", "outer", "--json"])[0]["id"].as_str().unwrap().to_owned();

    // Unchanged, the resume reads the same file and goes on (attempt 2).
    let report: Value = serde_json::from_slice(&output(&data, &["resume", &id, "--json"]).stdout).unwrap();
    let inc = &report["steps"][0];
    assert_eq!(inc["steps"][0]["executions"][0]["attempts"][0]["attempt"], 2, "{report}");

    // Changed, the include step refuses it and nothing of it runs.
    inner(1);
    let report: Value = serde_json::from_slice(&output(&data, &["resume", &id, "--json"]).stdout).unwrap();
    let inc = &report["steps"][0];
    assert_eq!(inc["status"], "failed", "{report}");
    let reason = inc["reason"].as_str().unwrap();
    assert!(
        reason.contains("the included workflow changed since the run started (the workflow file changed)"),
        "{reason}"
    );
    assert!(inc["steps"].as_array().is_none_or(Vec::is_empty), "{report}");

    // retry --from the include step takes the file as it is now.
    let report: Value =
        serde_json::from_slice(&output(&data, &["retry", &id, "--from", "inc", "--json"]).stdout).unwrap();
    assert_eq!(report["status"], "succeeded", "{report}");
}

#[test]
fn history_commands_show_steps_logs_and_collect_garbage() {
    let dir = temp_dir("history");
    let data = dir.join("data");
    let workflow = small_workflow(&dir, 1);
    assert_eq!(output(&data, &["run", workflow.to_str().unwrap()]).status.code(), Some(0));
    let id = json(&data, &["runs", "--status", "succeeded", "--json"])[0]["id"].as_str().unwrap().to_owned();
    let out = output(&data, &["show", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("run {id} of `small`")) && text.contains("│ c ") && text.contains("succeeded"),
        "{text}"
    );
    let logs = output(&data, &["logs", &id, "a"]);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("[info] hello: greeting a in step a"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );
    let out = output(&data, &["show", "run-nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no run `run-nope`"));

    let out = output(&data, &["gc", "--older-than", "1h"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 0 run(s)"));
    std::thread::sleep(Duration::from_millis(1100));
    let out = output(&data, &["gc", "--older-than", "1s"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 1 run(s)"));
    assert!(json(&data, &["runs", "--json"]).as_array().unwrap().is_empty());
}

#[test]
fn key_value_state_persists_across_runs() {
    let dir = temp_dir("kv");
    let data = dir.join("data");
    let path = dir.join("count.yaml");
    std::fs::write(
        &path,
        format!("name: count\ncomponents:\n  counter: {}\nsteps:\n  - id: count\n    uses: counter\n", guests::COUNTER),
    )
    .unwrap();
    for expected in 1..=3 {
        let out = output(&data, &["run", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let id = json(&data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
        let shown = json(&data, &["show", &id, "--json"]);
        assert_eq!(shown["steps"][0]["output"]["count"], expected, "{shown}");
    }
    // Another tenant has its own state.
    let out = output(&data, &["run", path.to_str().unwrap(), "--tenant", "other", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["output"]["count"], 1);
}

#[test]
fn bad_data_directories_get_clear_errors_and_keep_what_was_recorded() {
    let dir = temp_dir("bad");
    let workflow = small_workflow(&dir, 1);

    // Not a database.
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("stepbox.db"), b"this is not sqlite, just text that is long enough to be a header....")
        .unwrap();
    let out = output(&corrupt, &["runs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a usable stepbox database") && stderr(&out).contains("move it aside"),
        "{}",
        stderr(&out)
    );

    // Not a directory we can create.
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = output(&file.join("data"), &["runs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot use the data directory") && stderr(&out).contains("--data-dir"),
        "{}",
        stderr(&out)
    );

    // A database from a newer stepbox.
    let newer = dir.join("newer");
    assert_eq!(output(&newer, &["run", workflow.to_str().unwrap()]).status.code(), Some(0));
    let db = newer.join("stepbox.db");
    let status = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sqlite3; c = sqlite3.connect({:?}); c.execute('PRAGMA user_version = 99'); c.commit()",
                db.display().to_string()
            ),
        ])
        .status();
    if status.is_ok_and(|s| s.success()) {
        let out = output(&newer, &["runs"]);
        assert!(stderr(&out).contains("written by a newer stepbox (schema version 99"), "{}", stderr(&out));
    } else {
        panic!("python3 with sqlite3 is needed to write a newer schema version");
    }
}

#[test]
fn a_database_locked_by_another_writer_is_reported() {
    let dir = temp_dir("locked");
    let data = dir.join("data");
    let workflow = small_workflow(&dir, 1);
    assert_eq!(output(&data, &["run", workflow.to_str().unwrap()]).status.code(), Some(0));
    // Another process takes the write lock and holds it.
    let db = data.join("stepbox.db");
    let mut holder = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sqlite3, sys, time\nc = sqlite3.connect({:?}, isolation_level=None)\nc.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(20)",
                db.display().to_string()
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed to hold a lock on the database");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let out = output(&data, &["run", workflow.to_str().unwrap()]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is locked by another stepbox process"), "{}", stderr(&out));
    // Reading is not blocked, and nothing recorded was lost.
    assert_eq!(json(&data, &["runs", "--json"]).as_array().unwrap().len(), 1);
}

/// Mounts a tiny tmpfs (the tests run as root in CI) to fill up: room for
/// a new database and a few runs.
struct TinyDisk(PathBuf);

impl TinyDisk {
    fn mount(dir: &Path) -> TinyDisk {
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(dir).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "mounting a 1 MiB tmpfs on {} failed: this test needs root (CI runs as root)",
            dir.display()
        );
        TinyDisk(dir.to_owned())
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_run_with_a_clear_error_and_keeps_earlier_records() {
    let dir = temp_dir("full");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let _disk = TinyDisk::mount(&data);
    let path = dir.join("chatty.yaml");
    std::fs::write(
        &path,
        format!("name: chatty\ncomponents:\n  chatty: {}\nsteps:\n  - id: talk\n    uses: chatty\n    with: {{ lines: 3000 }}\n", guests::CHATTY),
    )
    .unwrap();
    let mut succeeded = 0;
    let mut error = None;
    for _ in 0..100 {
        let out = output(&data, &["run", path.to_str().unwrap()]);
        if out.status.code() == Some(0) {
            succeeded += 1;
        } else {
            error = Some(stderr(&out));
            break;
        }
    }
    let error = error.expect("the disk never filled up");
    assert!(error.contains("is full") && error.contains("free some space"), "{error}");
    assert!(succeeded > 0, "some runs fit before the disk filled up");
    // Everything recorded before is still there and readable.
    let runs = json(&data, &["runs", "--status", "succeeded", "--limit", "0", "--json"]);
    assert_eq!(runs.as_array().unwrap().len(), succeeded, "{runs}");
    let id = runs[0]["id"].as_str().unwrap();
    assert_eq!(json(&data, &["show", id, "--json"])["steps"][0]["output"], 3000);
}

#[test]
fn secrets_never_reach_the_journal_or_any_output() {
    const SECRET: &str = "sk_live_journal_0123456789";
    let dir = temp_dir("secrets");
    let data = dir.join("data");
    let path = dir.join("secret.yaml");
    std::fs::write(
        &path,
        format!(
            "name: secrets\ncomponents:\n  probe: {}\nsteps:\n  - id: leak\n    uses: probe\n    secrets: {{ api_key: {{ env: STEPBOX_TEST_SECRET }} }}\n    with: {{ probe: leak-secret }}\n  - id: fail\n    uses: probe\n    required: false\n    secrets: {{ api_key: {{ env: STEPBOX_TEST_SECRET }} }}\n    with: {{ probe: leak-secret-in-error }}\noutputs:\n  key: '{{{{ steps.leak.output.key }}}}'\n",
            guests::PROBE
        ),
    )
    .unwrap();
    let out = stepbox(&data)
        .env("STEPBOX_TEST_SECRET", SECRET)
        .args(["run", path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!printed.contains(SECRET), "the run's report shows the secret");
    assert!(printed.contains("[redacted]"));
    let id = json(&data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
    for args in [vec!["show", &id, "--json"], vec!["logs", &id, "--json"], vec!["runs", "--json"]] {
        let out = output(&data, &args);
        assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET), "{args:?} shows the secret");
    }
    // Every byte stepbox wrote (the database, the compile cache), not just
    // what the commands show.
    let mut dirs = vec![data.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "the secret is in {}",
                path.display()
            );
        }
    }
    // Without the variable the step fails with a message naming it.
    let out = output(&data, &["run", path.to_str().unwrap(), "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["steps"][0]["reason"].as_str().unwrap().contains("STEPBOX_TEST_SECRET, which is not set"),
        "{report}"
    );
}

#[test]
fn runs_over_a_tenant_ceiling_are_refused_before_they_start() {
    let dir = temp_dir("tenants");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let workflow = small_workflow(&dir, 1);
    // `acme` leaves `components` out, so it may run none.
    std::fs::write(
        data.join("tenants.yaml"),
        "tenants:\n  acme:\n    limits: { timeout: 1s }\n  roomy:\n    max_concurrent: 1\n    components: any\n",
    )
    .unwrap();
    let out = output(&data, &["run", workflow.to_str().unwrap(), "--tenant", "acme"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("is not under tenant `acme`'s allowed component paths"), "{}", stderr(&out));
    let out = output(&data, &["run", workflow.to_str().unwrap(), "--tenant", "nobody"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("tenant `nobody` is not in the tenants file"), "{}", stderr(&out));
    assert!(json(&data, &["runs", "--json"]).as_array().unwrap().is_empty(), "refused runs are not recorded");
    let out = output(&data, &["run", workflow.to_str().unwrap(), "--tenant", "roomy"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn file_secrets_come_from_the_secrets_directory_and_only_when_granted() {
    const SECRET: &str = "sk_file_secret_0123456789";
    let dir = temp_dir("file-secrets");
    let data = dir.join("data");
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(secrets.join("acme")).unwrap();
    std::fs::write(secrets.join("acme/api-key"), format!("{SECRET}\n")).unwrap();
    std::fs::write(dir.join("host-only"), "not for tenants").unwrap();
    std::os::unix::fs::symlink("../../host-only", secrets.join("acme/sneaky")).unwrap();
    let workflow = |name: &str| {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "name: {name}\ncomponents:\n  probe: {}\nsteps:\n  - id: leak\n    uses: probe\n    secrets: {{ api_key: {{ file: acme/{name} }} }}\n    with: {{ probe: leak-secret }}\n",
                guests::PROBE
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    let tenants = dir.join("tenants.yaml");
    std::fs::write(
        &tenants,
        "tenants:\n  acme: { components: any, secrets: ['file:acme/api-*'] }\n  globex: { components: any }\n",
    )
    .unwrap();
    let run = |name: &str, tenant: &str| {
        stepbox(&data)
            .args(["--secrets-dir", secrets.to_str().unwrap(), "--tenants", tenants.to_str().unwrap()])
            .args(["run", &workflow(name), "--tenant", tenant, "--json"])
            .output()
            .unwrap()
    };
    // Granted: the step reads the file's value, which is redacted from the
    // report.
    let out = run("api-key", "acme");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["output"]["key"], "[redacted]", "{report}");
    // Not granted to this tenant: refused before the run starts.
    let out = run("api-key", "globex");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("secret `api_key` (file:acme/api-key) is not among tenant `globex`'s allowed secrets"),
        "{}",
        stderr(&out)
    );
    // A symlink in the secrets directory does not lead out of it.
    std::fs::write(&tenants, "tenants:\n  acme: { components: any, secrets: ['file:acme/*'] }\n").unwrap();
    let out = run("sneaky", "acme");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reason = report["steps"][0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("secret `api_key`: cannot read the file acme/sneaky"), "{report}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("not for tenants"));
}

#[test]
fn the_data_directory_and_its_database_are_private_to_their_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("private");
    let data = dir.join("data");
    let workflow = small_workflow(&dir, 1);
    assert_eq!(output(&data, &["run", workflow.to_str().unwrap()]).status.code(), Some(0));
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&path), expected, "{}", path.display());
    }
    // An age that reaches back before 1970 is a mistake, not "everything".
    let out = output(&data, &["gc", "--older-than", "300000000y"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("reaches back before 1970"), "{}", stderr(&out));
    assert_eq!(json(&data, &["runs", "--json"]).as_array().unwrap().len(), 1);
}

/// A workflow whose one step sleeps `millis`.
fn slow_workflow(dir: &Path, millis: u64) -> PathBuf {
    let path = dir.join("slow.yaml");
    std::fs::write(
        &path,
        format!(
            "name: slow\ncomponents:\n  sleepy: {}\nsteps:\n  - id: nap\n    uses: sleepy\n    with: {{ millis: {millis} }}\n    limits: {{ timeout: 60s }}\n",
            guests::SLEEPY
        ),
    )
    .unwrap();
    path
}

/// Starts `stepbox run` of `workflow` and waits until its first attempt
/// started; returns the process and the run's id.
/// Waits until `child` (a `stepbox run` with its stderr piped) has started
/// its first attempt, then drains its stderr so it never blocks on a full
/// pipe.
fn wait_for_first_attempt(child: &mut std::process::Child) {
    let mut progress = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("attempt 1 started") {
        line.clear();
        let read = std::io::BufRead::read_line(&mut progress, &mut line).unwrap();
        assert!(read > 0, "stepbox exited before its first attempt");
    }
    std::thread::spawn(move || std::io::copy(&mut progress, &mut std::io::sink()));
}

fn start_run(data: &Path, workflow: &Path) -> (std::process::Child, String) {
    let mut child = stepbox(data).args(["run", workflow.to_str().unwrap()]).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_first_attempt(&mut child);
    let id = json(data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
    (child, id)
}

#[test]
fn a_run_has_one_owner_and_a_dead_owners_run_is_interrupted() {
    let dir = temp_dir("lease");
    let data = dir.join("data");
    let (mut child, id) = start_run(&data, &slow_workflow(&dir, 30_000));
    let run = &json(&data, &["runs", "--json"])[0];
    assert_eq!(run["status"], "running");
    let owner = run["owner"].as_str().unwrap().to_owned();
    assert!(owner.contains(&format!(":{}:", child.id())), "{owner}");

    // A second process cannot continue it, nor can gc remove it.
    let out = output(&data, &["resume", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("run {id} is being run by {owner}")), "{}", stderr(&out));
    let out = output(&data, &["gc", "--older-than", "0s", "--interrupted"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 0 run(s)"), "{}", stderr(&out));

    // Its process dies: the run is interrupted at once (another process
    // may resume it, as the SIGKILL test does); gc removes it only when
    // asked.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(json(&data, &["runs", "--json"])[0]["status"], "interrupted");
    assert_eq!(json(&data, &["runs", "--status", "interrupted", "--json"]).as_array().unwrap().len(), 1);
    assert!(json(&data, &["runs", "--status", "running", "--json"]).as_array().unwrap().is_empty());
    let out = output(&data, &["gc", "--older-than", "0s"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 0 run(s)"));
    let out = output(&data, &["gc", "--older-than", "0s", "--interrupted"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 1 run(s)"), "{}", stderr(&out));
}

#[test]
fn stepbox_cancel_asks_the_process_running_a_run_and_records_a_run_nobody_runs() {
    let dir = temp_dir("cancel");
    let workflow = slow_workflow(&dir, 30_000);

    // Another process runs it: asked, it stops the attempt and records the
    // run cancelled when it next renews its lease.
    let data = dir.join("running");
    let (mut child, id) = start_run(&data, &workflow);
    let out = output(&data, &["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("cancelling run {id}: the process running it stops")), "{}", stderr(&out));
    let asked = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(asked.elapsed() < Duration::from_secs(25), "the run's process did not hear the cancel");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "the run ends cancelled");
    let run = &json(&data, &["runs", "--json"])[0];
    assert_eq!(run["status"], "cancelled");
    assert!(run.get("cancel_requested").is_none(), "the ask ends with the run: {run}");
    let out = output(&data, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("run {id} already cancelled")), "{}", stderr(&out));

    // Its process died: nobody runs it, so it is recorded cancelled at once.
    let data = dir.join("interrupted");
    let (mut child, id) = start_run(&data, &workflow);
    child.kill().unwrap();
    child.wait().unwrap();
    let out = output(&data, &["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("run {id} was cancelled")), "{}", stderr(&out));
    assert_eq!(json(&data, &["runs", "--json"])[0]["status"], "cancelled");
}

#[test]
fn stepbox_raises_its_open_files_limit_to_the_hard_limit_at_start() {
    let dir = temp_dir("nofile");
    let data = dir.join("data");
    let workflow = slow_workflow(&dir, 30_000);
    // Started with a low soft limit, as many shells and services do.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_stepbox"), "run"])
        .arg(&workflow)
        .env("STEPBOX_DATA_DIR", &data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_first_attempt(&mut child);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files: Vec<&str> =
        limits.lines().find(|line| line.starts_with("Max open files")).unwrap().split_whitespace().collect();
    let (soft, hard) = (open_files[3], open_files[4]);
    assert_eq!(soft, hard, "{limits}");
    assert_ne!(soft, "256", "the hard limit here is above 256: {limits}");
    let _ = child.kill();
    child.wait().unwrap();
}

/// The most memory the process `pid` has held resident (VmHWM), in bytes.
fn peak_resident(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn a_fan_out_of_chatty_steps_keeps_the_process_small() {
    let dir = temp_dir("chatty");
    let data = dir.join("data");
    let path = dir.join("chatty.yaml");
    // 1,000 items that each write 3 MiB to stdout and to stderr. Each
    // attempt keeps 1 MiB of each while it runs, the journal 64 KiB; kept
    // in memory to the end of the run they would take 2 GiB.
    std::fs::write(
        &path,
        format!(
            "name: chatty\ncomponents:\n  chatty: {}\nsteps:\n  - id: flood\n    uses: chatty\n    for_each: \"{{{{ range(1000)|list }}}}\"\n    with: {{ bytes: 3145728 }}\n",
            guests::CHATTY
        ),
    )
    .unwrap();
    let mut child = stepbox(&data)
        .args(["run", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        peak = peak.max(peak_resident(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(peak > 0, "the process's memory was read");
    assert!(peak < 512 * 1024 * 1024, "the process held {} MiB", peak / 1024 / 1024);
    let id = json(&data, &["runs", "--json"])[0]["id"].as_str().unwrap().to_owned();
    let logs = json(&data, &["logs", &id, "--json"]);
    let stdout = logs[0]["executions"][999]["attempts"][0]["stdout"]["text"].as_str().unwrap().to_owned();
    assert!(
        stdout.starts_with("xxx") && stdout.ends_with("more bytes not kept in the journal]"),
        "the journal keeps the head"
    );
    // 64 KiB of it, and the marker.
    assert!((64 * 1024..64 * 1024 + 100).contains(&stdout.len()), "{} bytes kept", stdout.len());
}
