//! The WIT contract is all a guest needs: the same `transform` step written
//! in Rust, Python, JavaScript and C gives the same output in the same
//! workflow, and fails the same way.

mod common;

use std::sync::Arc;

use common::sandbox;
use serde_json::json;
use stepbox::run::{FailureKind, StepStatus};
use stepbox::scheduler::{self, RunOptions};
use stepbox::workflow::Workflow;
use stepbox_tests::guests;

const LANGUAGES: [(&str, &str); 4] = [
    ("rust", guests::TRANSFORM),
    ("python", guests::TRANSFORM_PY),
    ("javascript", guests::TRANSFORM_JS),
    ("c", guests::TRANSFORM_C),
];

/// An invoice, a refused empty order, and a refused config value.
const WORKFLOW: &str = r#"name: invoices
inputs:
  order: { type: object }
components:
  transform: COMPONENT
defaults:
  limits: { timeout: 60s, fuel: 20_000_000_000 }
steps:
  - id: invoice
    uses: transform
    with: "{{ inputs.order }}"
    config: { currency: EUR, tax_percent: "10" }
  - id: empty
    uses: transform
    with: { id: o-8, customer: { first_name: Ada, last_name: Lovelace }, items: [] }
    required: false
  - id: bad-tax
    uses: transform
    with: "{{ inputs.order }}"
    config: { tax_percent: lots }
    required: false
outputs:
  invoice: "{{ steps.invoice.output }}"
"#;

/// Whether the component at `path` names `import` (its import names are
/// plain text in the binary).
fn names(path: &str, import: &str) -> bool {
    std::fs::read(path).unwrap().windows(import.len()).any(|window| window == import.as_bytes())
}

/// The JavaScript step is built against contract 0.1.0 (`wit/v0.1.0`), the
/// others against 0.2.0: the test below runs both alike.
#[test]
fn the_javascript_step_targets_the_earlier_contract_and_the_others_the_current_one() {
    assert!(names(guests::TRANSFORM_JS, "stepbox:step/types@0.1.0"));
    assert!(!names(guests::TRANSFORM_JS, "stepbox:step/types@0.2.0"));
    for (language, path) in [("rust", guests::TRANSFORM), ("python", guests::TRANSFORM_PY), ("c", guests::TRANSFORM_C)]
    {
        assert!(names(path, "stepbox:step/types@0.2.0"), "{language}");
        assert!(!names(path, "stepbox:step/types@0.1.0"), "{language}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_step_in_four_languages_gives_the_same_results() {
    let dir = std::env::temp_dir().join(format!("stepbox-languages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let order = json!({
        "id": "o-7",
        "customer": { "first_name": "Grace", "last_name": "Hopper \"Amazing\" ✓" },
        "items": [
            { "sku": "tea", "quantity": 3, "unit_price_cents": 250 },
            { "sku": "cup", "quantity": 1, "unit_price_cents": 1000 }
        ]
    });
    let inputs = json!({ "order": order }).as_object().cloned().unwrap();
    for (language, component) in LANGUAGES {
        let path = dir.join(format!("{language}.yaml"));
        std::fs::write(&path, WORKFLOW.replace("COMPONENT", component)).unwrap();
        let workflow = Workflow::load(&path).unwrap_or_else(|err| panic!("{language}: {err}"));
        let inputs = workflow.bind_inputs(&inputs).unwrap_or_else(|err| panic!("{language}: {err}"));
        let report = scheduler::run(sandbox(), Arc::new(workflow), inputs, RunOptions::new(language))
            .await
            .unwrap_or_else(|err| panic!("{language}: {err}"));

        assert_eq!(
            report.run.outputs.as_ref().unwrap()["invoice"],
            json!({
                "invoice_for": "o-7",
                "bill_to": "Grace Hopper \"Amazing\" ✓",
                "currency": "EUR",
                "lines": [ { "sku": "tea", "amount_cents": 750 }, { "sku": "cup", "amount_cents": 1000 } ],
                "subtotal_cents": 1750,
                "tax_cents": 175,
                "total_cents": 1925
            }),
            "{language}: {report:#?}"
        );
        let failure = |id: &str| {
            let step = report.step(id).unwrap();
            assert_eq!(step.status, StepStatus::Failed, "{language}: {step:?}");
            let attempt = step.executions[0].attempts.last().unwrap();
            attempt.failure().cloned().unwrap()
        };
        let empty = failure("empty");
        assert_eq!((empty.kind, empty.message.as_str()), (FailureKind::Fatal, "order o-8 has no items"), "{language}");
        let bad_tax = failure("bad-tax");
        assert_eq!(bad_tax.kind, FailureKind::Fatal, "{language}");
        assert!(
            bad_tax.message.starts_with(r#"the config value `tax_percent` = "lots" is not a valid u64"#),
            "{language}: {}",
            bad_tax.message
        );
    }
}
