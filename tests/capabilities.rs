//! Capabilities a step gets only when granted: arguments, a private scratch
//! directory, network addresses, deterministic clocks and randomness, and
//! secrets that never show up in what an attempt leaves behind.

mod common;

use common::{request, run};
use serde_json::json;
use stepbox::sandbox::{FailureKind, REDACTED};
use stepbox_tests::guests;

#[tokio::test]
async fn arguments_are_passed_only_when_granted() {
    let report = run(guests::PROBE, request(json!({ "probe": "args" }))).await;
    assert_eq!(report.output(), Some(&json!([])));
    let mut req = request(json!({ "probe": "args" }));
    req.grants.args = vec!["step".into(), "--fast".into()];
    assert_eq!(run(guests::PROBE, req).await.output(), Some(&json!(["step", "--fast"])));
}

#[tokio::test]
async fn each_attempt_gets_its_own_empty_scratch_directory() {
    let report = run(guests::PROBE, request(json!({ "probe": "scratch" }))).await;
    assert_eq!(report.failure().unwrap().kind, FailureKind::Fatal, "no scratch unless granted");
    for _ in 0..2 {
        let mut req = request(json!({ "probe": "scratch" }));
        req.grants.scratch = true;
        let report = run(guests::PROBE, req).await;
        assert_eq!(report.output(), Some(&json!({ "before": [], "read": "scribbled" })), "{report:?}");
    }
}

#[tokio::test]
async fn deterministic_steps_see_a_fixed_clock_and_seeded_randomness() {
    let probe = |seed: Option<u64>| {
        let mut req = request(json!({ "probe": "clock-and-random" }));
        req.grants.deterministic = seed;
        run(guests::PROBE, req)
    };
    let first = probe(Some(7)).await.output().cloned().unwrap();
    let again = probe(Some(7)).await.output().cloned().unwrap();
    assert_eq!(first, again, "the same seed gives the same output");
    assert_eq!(first["now"], 946_684_800, "2000-01-01T00:00:00Z");
    let other = probe(Some(8)).await.output().cloned().unwrap();
    assert_ne!(first["random"], other["random"]);
    let real = probe(None).await.output().cloned().unwrap();
    assert!(real["now"].as_u64().unwrap() > 1_700_000_000, "{real}");
    let (a, b) = (probe(None).await.output().cloned().unwrap(), probe(None).await.output().cloned().unwrap());
    assert_ne!(a["random"], b["random"], "real randomness differs between attempts");
}

#[tokio::test]
async fn only_granted_addresses_can_be_reached() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let granted = listener.local_addr().unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let connect = |address: String| {
        let mut req = request(json!({ "attack": "connect", "address": address }));
        req.grants.network = vec![granted];
        run(guests::NET_PROBE, req)
    };
    let report = connect(granted.to_string()).await;
    assert_eq!(report.output(), Some(&json!({ "outcome": "done: connected" })), "{report:?}");
    assert!(listener.accept().is_ok());
    let report = connect(other.local_addr().unwrap().to_string()).await;
    assert!(report.output().unwrap()["outcome"].as_str().unwrap().starts_with("refused: "));
    let mut req = request(json!({ "attack": "dns", "host": "localhost" }));
    req.grants.network = vec![granted];
    let report = run(guests::NET_PROBE, req).await;
    assert!(report.output().unwrap()["outcome"].as_str().unwrap().starts_with("refused: "), "no name lookups");
}

#[tokio::test]
async fn secrets_are_readable_but_redacted_from_everything_recorded() {
    const SECRET: &str = "sk_live_0123456789abcdef";
    let mut req = request(json!({ "probe": "leak-secret" }));
    req.grants.secrets.insert("api_key".into(), SECRET.into());
    let report = run(guests::PROBE, req).await;
    assert_eq!(report.output(), Some(&json!({ "key": REDACTED })));
    assert_eq!(report.logs[0].message, format!("the key is {REDACTED}"));
    assert!(report.stdout.text.contains(&format!("stdout: {REDACTED}")));
    assert!(report.stderr.text.contains(&format!("stderr: {REDACTED}")));
    assert!(!format!("{report:?}").contains(SECRET));

    let mut req = request(json!({ "probe": "leak-secret-in-error" }));
    req.grants.secrets.insert("api_key".into(), SECRET.into());
    let report = run(guests::PROBE, req).await;
    assert_eq!(report.failure().unwrap().message, format!("upstream refused key {REDACTED}"));
}
