//! Property-based fuzzing of everything a tenant's workflow file goes
//! through before anything runs: YAML decoding, validation, the tenant
//! check, input binding and templates. 10,500 cases in all; a panic in any
//! of them fails the test (proptest reports the smallest input it finds).
//! Errors are fine: they are what bad input should get.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::{Value, json};
use stepbox::tenant::Tenant;
use stepbox::workflow::{Workflow, WorkflowSpec, template};
use stepbox_tests::guests;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Validates a decoded spec and, when it is valid, does what a run does
/// before its first step: the tenant check, input binding, the fingerprint
/// and the graph walk.
fn exercise(spec: WorkflowSpec, base_dir: &Path) {
    let Ok(workflow) = Workflow::from_spec(spec, "fuzz.yaml", base_dir) else { return };
    let _ = Tenant::unconstrained("fuzz").check(&workflow);
    let _ = workflow.bind_inputs(&Default::default());
    let _ = workflow.bind_inputs(&serde_json::from_value(json!({ "n": 1, "name": "x" })).unwrap());
    if !workflow.steps.is_empty() {
        let _ = workflow.downstream(0).count();
    }
}

/// Decodes YAML text as a workflow and exercises it.
fn exercise_text(text: &str, base_dir: &Path) {
    if let Ok(spec) = serde_saphyr::from_str::<WorkflowSpec>(text) {
        exercise(spec, base_dir);
    }
}

fn pick<T: Clone + std::fmt::Debug + 'static>(options: &[T]) -> impl Strategy<Value = T> + use<T> {
    proptest::sample::select(options.to_vec())
}

const IDS: &[&str] = &["a", "b", "c", "d", "a.b", "x[1]", "", " ", "é", "0"];
const TEMPLATES: &[&str] = &[
    "{{ inputs.n }}",
    "{{ inputs.nope }}",
    "{{ steps.a.output }}",
    "{{ steps.zz.output.x }}",
    "{{ item }}",
    "{{ range(3)|list }}",
    "{{ [0] * 1000 }}",
    "{{ 'x' * 1000000 }}",
    "{{ 1 / 0 }}",
    "{% for i in range(10) %}{{ i }}{% endfor %}",
    "{{ oops",
    "}}{{",
    "plain",
    "{{ run.id }}-{{ vars.k }}",
    "{{ steps['a'].status == 'succeeded' }}",
];
const DURATIONS: &[&str] =
    &["0s", "1ms", "5s", "366d", "367d", "300000000y", "18446744073709551615s", "-1s", "soon", ""];
const SIZES: &[&str] = &["0", "1KiB", "64MiB", "5GiB", "18446744073709551615", "huge"];

fn template_or_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        pick(TEMPLATES).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::Null),
        proptest::collection::btree_map("[a-z]{1,3}", pick(TEMPLATES).prop_map(Value::from), 0..3)
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        proptest::collection::vec(pick(TEMPLATES).prop_map(Value::from), 0..3).prop_map(Value::Array),
    ]
}

/// One step, mostly well formed, with fields drawn from values that probe
/// the edges (huge numbers and durations, bad names, self-references).
fn step() -> impl Strategy<Value = Value> {
    (
        pick(IDS),
        prop_oneof![pick(&["hello", "nope", "x.wasm"]).prop_map(Value::from), Just(Value::String(guests::HELLO.into()))],
        proptest::option::of(pick(&["sub/greet-twice.yaml", "{{ inputs.name }}.yaml", "../../etc/passwd", "fuzz.yaml"])),
        proptest::collection::vec(pick(IDS), 0..3),
        template_or_json(),
        proptest::option::of(prop_oneof![pick(TEMPLATES).prop_map(Value::from), Just(json!([1, 2, 3]))]),
        (any::<u32>(), pick(DURATIONS), pick(DURATIONS), any::<f64>()),
        (any::<u64>(), pick(DURATIONS), pick(SIZES)),
        (proptest::option::of(any::<u32>()), proptest::option::of(pick(TEMPLATES)), any::<bool>()),
        (pick(&["d:/d", ":", "x", "/nonexistent:/x:ro"]), pick(&["10.0.0.1:443", "nope", "GET@*.x.com", "*"])),
    )
        .prop_map(
            |(
                id,
                uses,
                include,
                depends_on,
                with,
                for_each,
                (attempts, initial, max, multiplier),
                (fuel, timeout, memory),
                (max_concurrent, when, required),
                (dir, net),
            )| {
                let mut step = json!({
                    "id": id,
                    "depends_on": depends_on,
                    "with": with,
                    "retry": { "attempts": attempts, "initial": initial, "max": max, "multiplier": multiplier, "deadline": max },
                    "limits": { "fuel": fuel, "timeout": timeout, "memory": memory, "stdio": memory, "output": memory },
                    "required": required,
                    "dirs": [dir],
                    "network": { "connect": [net], "http": [net] },
                    "secrets": { "k": { "env": "STEPBOX_FUZZ_UNSET" } },
                    "on_failure": [id],
                });
                match include {
                    Some(include) => step["include"] = include.into(),
                    None => step["uses"] = uses,
                }
                if let Some(for_each) = for_each {
                    step["for_each"] = for_each;
                }
                if let Some(n) = max_concurrent {
                    step["max_concurrent"] = n.into();
                }
                if let Some(when) = when {
                    step["when"] = when.into();
                }
                step
            },
        )
}

fn spec() -> impl Strategy<Value = Value> {
    (
        pick(&["w", "", "  ", "é"]),
        proptest::collection::vec(step(), 0..6),
        pick(&["string", "number", "boolean", "list", "object"]),
        template_or_json(),
        proptest::collection::btree_map("[a-z]{1,2}", pick(TEMPLATES), 0..3),
        (any::<u32>(), pick(DURATIONS), pick(DURATIONS)),
    )
        .prop_map(|(name, steps, kind, default, outputs, (failures, cool_down, per))| {
            json!({
                "name": name,
                "inputs": { "n": { "type": kind, "default": default } },
                "vars": { "k": default },
                "components": {
                    "hello": guests::HELLO,
                    "limited": { "path": guests::HELLO, "rate_limit": { "starts": failures, "per": per }, "circuit_breaker": { "failures": failures, "cool_down": cool_down } },
                },
                "defaults": { "retry": { "attempts": failures }, "circuit_breaker": { "failures": failures, "cool_down": cool_down } },
                "steps": steps,
                "outputs": outputs,
            })
        })
}

/// An edit of a workflow file's text.
#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: &'static str },
    DuplicateLine { at: usize },
    Swap { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    const TOKENS: &[&str] = &[
        "{{",
        "}}",
        ":",
        "- ",
        "\n",
        "  ",
        "[",
        "]",
        "{",
        "}",
        "'",
        "\"",
        "&a",
        "*a",
        "!!binary",
        "~",
        "99999999999999999999",
        "{{ [0] * 100000000 }}",
        "depends_on: [a]",
        "include: x.yaml",
        "for_each: 3",
        "\t",
        "#",
        "|",
        ">",
    ];
    prop_oneof![
        (any::<usize>(), 1..20usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), pick(TOKENS)).prop_map(|(at, text)| Edit::Insert { at, text }),
        any::<usize>().prop_map(|at| Edit::DuplicateLine { at }),
        any::<usize>().prop_map(|at| Edit::Swap { at }),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut text: Vec<char> = text.chars().collect();
    for edit in edits {
        let len = text.len().max(1);
        match *edit {
            Edit::Delete { at, len: n } => {
                let at = at % len;
                text.drain(at.min(text.len())..(at + n).min(text.len()));
            }
            Edit::Insert { at, text: token } => {
                let at = at % (text.len() + 1);
                text.splice(at..at, token.chars());
            }
            Edit::DuplicateLine { at } => {
                let lines: Vec<String> = text.iter().collect::<String>().lines().map(str::to_owned).collect();
                if !lines.is_empty() {
                    let mut lines = lines;
                    let line = lines[at % lines.len()].clone();
                    lines.insert(at % lines.len(), line);
                    text = lines.join("\n").chars().collect();
                }
            }
            Edit::Swap { at } => {
                if text.len() > 1 {
                    let at = at % (text.len() - 1);
                    text.swap(at, at + 1);
                }
            }
        }
    }
    text.into_iter().collect()
}

fn example_texts() -> Vec<String> {
    let mut texts: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect();
    texts.sort();
    assert!(texts.len() >= 10, "the examples are there to mutate");
    texts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn structured_workflows_validate_without_panicking(spec in spec()) {
        if let Ok(spec) = serde_json::from_value::<WorkflowSpec>(spec) {
            exercise(spec, &examples_dir());
        }
    }

    #[test]
    fn mutated_example_workflows_validate_without_panicking(example in any::<prop::sample::Index>(), edits in proptest::collection::vec(edit(), 1..6)) {
        thread_local!(static TEXTS: Vec<String> = example_texts());
        let text = TEXTS.with(|texts| texts[example.index(texts.len())].clone());
        exercise_text(&apply(&text, &edits), &examples_dir());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_documents_decode_without_panicking(text in "[a-z_:{}\\[\\], \n\"'0-9.*|>&!%@#-]{0,200}") {
        exercise_text(&text, &examples_dir());
    }

}

proptest! {
    // Huge values are the unit tests' job (template::tests): each takes
    // seconds to refuse.
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_templates_check_and_render_without_panicking(parts in proptest::collection::vec(prop_oneof![
        pick(TEMPLATES).prop_map(str::to_owned),
        "[a-z.\\[\\]'|()+*/~ 0-9{}%-]{0,12}",
    ], 1..5)) {
        let text = parts.concat();
        let context = template::to_jinja(&json!({
            "inputs": { "n": 2, "name": "Ada" },
            "steps": { "a": { "output": { "x": [1, 2] }, "status": "succeeded" } },
            "item": [1, 2],
            "vars": { "k": "v" },
            "run": { "id": "r" },
        }));
        let _ = template::referenced_paths(&text, false);
        let _ = template::referenced_paths(&text, true);
        let _ = template::render_string(&text, &context);
        let _ = template::is_true(&text, &context);
    }
}
