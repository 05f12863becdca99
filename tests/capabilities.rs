//! Capabilities a step gets only when granted: arguments, a private scratch
//! directory, network addresses, outbound HTTP, deterministic clocks and
//! randomness, and secrets that never show up in what an attempt leaves
//! behind.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{request, run, sandbox};
use serde_json::json;
use stepbox::run::FailureKind;
use stepbox::sandbox::{EngineConfig, REDACTED, Sandbox};
use stepbox::store::MemoryKeyValueStore;
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
async fn concurrent_attempts_get_private_scratch_directories_removed_afterwards() {
    let data = std::env::temp_dir().join(format!("stepbox-scratch-private-{}", std::process::id()));
    let config = EngineConfig { data_dir: Some(data.clone()), ..EngineConfig::default() };
    let sandbox = Arc::new(Sandbox::new(config, Arc::new(MemoryKeyValueStore::new())).unwrap());
    let probe = sandbox.load(std::path::Path::new(guests::PROBE)).unwrap();
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let (sandbox, probe) = (sandbox.clone(), probe.clone());
            let mut req = request(json!({ "probe": "scratch" }));
            req.grants.scratch = true;
            tokio::spawn(async move { sandbox.run(&probe, req).await })
        })
        .collect();
    for attempt in attempts {
        let report = attempt.await.unwrap();
        // Each wrote note.txt; none saw another's.
        assert_eq!(report.output(), Some(&json!({ "before": [], "read": "scribbled" })), "{report:?}");
    }
    // This process's part of scratch/ holds no attempt's directory now.
    let mut left = Vec::new();
    for part in std::fs::read_dir(data.join("scratch")).unwrap() {
        let part = part.unwrap().path();
        if part.is_dir() {
            left.extend(std::fs::read_dir(&part).unwrap().map(|entry| entry.unwrap().path()));
        }
    }
    assert!(left.is_empty(), "{left:?}");
    drop(sandbox);
    std::fs::remove_dir_all(data).unwrap();
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

/// A plain HTTP/1.1 server on loopback that answers every request with
/// `METHOD PATH BODY` (and ` AUTHORIZATION` when there is one) and counts
/// the requests that reached it.
async fn echo_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut reader = BufReader::new(socket);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).await.unwrap();
                let (mut length, mut authorization) = (0, None);
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).await.unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap();
                        } else if name.eq_ignore_ascii_case("authorization") {
                            authorization = Some(value.trim().to_owned());
                        }
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).await.unwrap();
                let mut parts = request_line.split_whitespace();
                let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
                let mut answer = format!("{method} {path} {}", String::from_utf8_lossy(&body));
                if let Some(authorization) = authorization {
                    answer.push_str(&format!(" {authorization}"));
                }
                let response =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}", answer.len());
                reader.into_inner().write_all(response.as_bytes()).await.unwrap();
            });
        }
    });
    (address, served)
}

#[tokio::test]
async fn only_granted_http_requests_leave_the_sandbox() {
    let (server, served) = echo_server().await;
    let send = |method: &str, url: String, grants: &[&str]| {
        let mut req = request(json!({ "method": method, "url": url, "body": "ping" }));
        req.grants.http = grants.iter().map(|grant| grant.parse().unwrap()).collect();
        run(guests::HTTP_PROBE, req)
    };
    let url = format!("http://{server}/orders?page=2");
    let denied = json!({ "refused": "ErrorCode::HttpRequestDenied" });

    let report = send("GET", url.clone(), &[]).await;
    assert_eq!(report.output(), Some(&denied), "nothing is granted by default: {report:?}");

    let grant = format!("GET,POST@{server}");
    let report = send("POST", url.clone(), &[&grant]).await;
    assert_eq!(report.output(), Some(&json!({ "response": { "status": 200, "body": "POST /orders?page=2 ping" } })));
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // The wrong method, port, host name or scheme default never connects.
    assert_eq!(send("DELETE", url.clone(), &[&grant]).await.output(), Some(&denied));
    let other_port = format!("GET@127.0.0.1:{}", server.port() + 1);
    assert_eq!(send("GET", url.clone(), &[&other_port]).await.output(), Some(&denied));
    let by_name = format!("http://localhost:{}/", server.port());
    assert_eq!(send("GET", by_name, &[&grant]).await.output(), Some(&denied));
    assert_eq!(send("GET", url.clone(), &["127.0.0.1"]).await.output(), Some(&denied), "port 80 only");
    assert_eq!(served.load(Ordering::SeqCst), 1, "a denied request must not reach the server");

    let wildcard = format!("*.localhost:{}", server.port());
    assert_eq!(send("GET", format!("http://localhost:{}/", server.port()), &[&wildcard]).await.output(), Some(&denied));
}

#[tokio::test]
async fn hop_by_hop_and_proxy_headers_never_leave_the_sandbox() {
    let (server, served) = echo_server().await;
    let send = |header: &str| {
        let mut req = request(json!({ "url": format!("http://{server}/"), "bearer": "k", "bearer_header": header }));
        req.grants.config.insert("k".into(), "v".into());
        req.grants.http = vec![format!("GET@{server}").parse().unwrap()];
        run(guests::HTTP_PROBE, req)
    };
    let forbidden = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "http2-settings",
    ];
    for header in forbidden {
        let report = send(header).await;
        let refused = report.output().map(|output| output["refused"].clone());
        assert_eq!(
            refused,
            Some(json!("ErrorCode::InternalError(Some(\"HeaderError::Forbidden\"))")),
            "{header}: {report:?}"
        );
    }
    assert_eq!(served.load(Ordering::SeqCst), 0, "no request with such a header was sent");
    let report = send("x-api-key").await;
    assert_eq!(report.output().map(|output| output["response"]["status"].clone()), Some(json!(200)), "{report:?}");
}

/// A step that may only send a secret: it sees a placeholder, the host puts
/// the value in the headers of the requests `send_to` allows, and nothing
/// the step records holds the value.
#[tokio::test]
async fn a_send_only_secret_reaches_only_the_granted_hosts_headers_and_never_the_guest() {
    const SECRET: &str = "sk_live_send_only_42";
    let (server, _) = echo_server().await;
    let (other, _) = echo_server().await;
    let dir = std::env::temp_dir().join(format!("stepbox-send-only-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets/api"), SECRET).unwrap();
    let yaml = format!(
        "name: send-only\ncomponents:\n  probe: {probe}\nsteps:\n  - id: granted\n    uses: probe\n    with: {{ method: POST, url: \"http://{server}/v1\", body: x, bearer: api }}\n    network: {{ http: [\"{server}\", \"{other}\"] }}\n    secrets: {{ api: {{ file: api, send_to: [\"POST@{server}\"] }} }}\n  - id: elsewhere\n    uses: probe\n    with: {{ method: POST, url: \"http://{other}/v1\", body: x, bearer: api }}\n    network: {{ http: [\"{server}\", \"{other}\"] }}\n    secrets: {{ api: {{ file: api, send_to: [\"POST@{server}\"] }} }}\n  - id: echoed\n    uses: probe\n    with: {{ method: POST, url: \"http://{server}/v1\", body: x, bearer: api, bearer_header: x-echo }}\n    network: {{ http: [\"{server}\"] }}\n    secrets: {{ api: {{ file: api, send_to: [\"POST@{server}\"] }} }}\n",
        probe = guests::HTTP_PROBE
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let workflow = stepbox::workflow::Workflow::load(&dir.join("wf.yaml")).unwrap();
    let inputs = workflow.bind_inputs(&Default::default()).unwrap();
    let options = stepbox::scheduler::RunOptions {
        secrets_dir: Some(dir.join("secrets")),
        ..stepbox::scheduler::RunOptions::new("send-only")
    };
    let report = stepbox::scheduler::run(sandbox(), Arc::new(workflow), inputs, options).await.unwrap();
    let output = |i: usize| report.steps[i].output.clone().unwrap_or_else(|| panic!("{:?}", report.steps[i]));

    // The granted host got the value; the guest put only a placeholder, and
    // the echo of the value came back redacted.
    let granted = output(0)["response"].clone();
    let sent = granted["sent"].as_str().unwrap();
    assert!(sent.starts_with("Bearer stepbox-secret-api-"), "{granted}");
    assert_eq!(granted["body"], format!("POST /v1 x Bearer {REDACTED}"), "{granted}");
    // Another host, even one the step may call, got the placeholder.
    let elsewhere = output(1)["response"].clone();
    assert!(elsewhere["body"].as_str().unwrap().starts_with("POST /v1 x Bearer stepbox-secret-api-"), "{elsewhere}");
    assert_ne!(elsewhere["sent"], granted["sent"], "each execution has its own placeholder");
    // Anywhere but `authorization` (where a server might echo it back), the
    // placeholder refuses the request.
    let echoed = output(2)["refused"].as_str().unwrap().to_owned();
    assert!(echoed.contains("a send-only secret may go only in the `authorization` header"), "{echoed}");
    assert!(!format!("{report:?}").contains(SECRET));

    // `send_to` must fit inside the step's HTTP grants.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("name: bad\ncomponents:\n  probe: {}\nsteps:\n  - id: a\n    uses: probe\n    secrets: {{ api: {{ env: X, send_to: [\"evil.example\"] }} }}\n", guests::HTTP_PROBE),
    )
    .unwrap();
    let err = stepbox::workflow::Workflow::load(&bad).unwrap_err().to_string();
    assert!(err.contains("secret `api` may be sent to `evil.example`, which `network.http` does not grant"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
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
