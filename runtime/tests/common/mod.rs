//! What the tests that drive the `stepbox` binary share.
#![allow(dead_code)] // Each test file uses its own part.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

/// What `GET /metrics` at `url` (`http://ADDR/metrics`) answers, over a
/// plain HTTP/1.0 connection.
pub fn scrape(url: &str) -> String {
    use std::io::{Read, Write};
    let address = url.strip_prefix("http://").and_then(|rest| rest.strip_suffix("/metrics")).unwrap();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample `series` (its name and labels as written) in a
/// scrape, if the scrape has it.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A webhook's `X-Stepbox-Signature-256` of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

/// A fresh directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepbox-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

thread_local! {
    /// The PostgreSQL database this thread's `stepbox` commands use.
    static DATABASE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Makes the `stepbox` commands this thread runs keep their records in the
/// PostgreSQL database at `url` (`None`: in their data directory).
pub fn use_database(url: Option<&str>) {
    DATABASE.with(|database| *database.borrow_mut() = url.map(str::to_owned));
}

/// The `stepbox` binary, with `data` as its data directory (and the
/// database [`use_database`] named, if any).
pub fn stepbox(data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stepbox"));
    command.env("STEPBOX_DATA_DIR", data).env_remove("STEPBOX_DB");
    DATABASE.with(|database| {
        if let Some(url) = &*database.borrow() {
            command.env("STEPBOX_DB", url);
        }
    });
    command
}

/// Runs `stepbox ARGS` to the end.
pub fn output(data: &Path, args: &[&str]) -> Output {
    stepbox(data).args(args).output().unwrap()
}

/// Runs `stepbox ARGS` (which print JSON) and parses what it printed.
pub fn json(data: &Path, args: &[&str]) -> Value {
    let out = output(data, args);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{args:?}: {err}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// What a finished `stepbox` printed to stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// How many times each idempotency key was appended to `out/keys.log`
/// under `dir` by the side-effect step.
pub fn key_counts(dir: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (key, _) in effects(dir) {
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Each effect the side-effect step had under `dir`, in order: the
/// execution's idempotency key and the attempt that had it.
pub fn effects(dir: &Path) -> Vec<(String, u32)> {
    let log = std::fs::read_to_string(dir.join("out/keys.log")).unwrap_or_default();
    log.lines()
        .map(|line| {
            let (key, attempt) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not `KEY ATTEMPT`: {line:?}"));
            (key.to_owned(), attempt.parse().unwrap_or_else(|_| panic!("not `KEY ATTEMPT`: {line:?}")))
        })
        .collect()
}

/// Executions the journal holds as succeeded, and attempts (key and
/// number) it holds as still running: the ones a kill interrupted.
pub fn journal_state(data: &Path, run_id: &str) -> (HashSet<String>, Vec<(String, u64)>) {
    let shown = json(data, &["show", run_id, "--json"]);
    let mut completed = HashSet::new();
    let mut interrupted = Vec::new();
    for execution in executions(&shown) {
        let key = execution["idempotency_key"].as_str().unwrap().to_owned();
        for attempt in execution["attempts"].as_array().unwrap() {
            match attempt["status"].as_str().unwrap() {
                "succeeded" => {
                    completed.insert(key.clone());
                }
                "running" => interrupted.push((key.clone(), attempt["attempt"].as_u64().unwrap())),
                _ => {}
            }
        }
    }
    (completed, interrupted)
}

/// Every execution of a run's report (`stepbox show --json`), those of
/// the steps of included workflows too.
pub fn executions(shown: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    let mut steps: Vec<&Value> = shown["steps"].as_array().unwrap().iter().collect();
    while let Some(step) = steps.pop() {
        found.extend(step["executions"].as_array().unwrap());
        steps.extend(step["steps"].as_array().into_iter().flatten());
    }
    found
}

/// A `stepbox serve` process; killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Where it serves, `http://ADDR`.
    pub url: String,
}

impl Server {
    /// Starts `stepbox serve` on a free port with `data` and `args`.
    pub fn start(data: &Path, args: &[&str]) -> Server {
        Server::start_with(data, args, &[])
    }

    /// [`Server::start`] with `env` set for the server.
    pub fn start_with(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = stepbox(data)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("stepbox is serving ")
            .and_then(|url| url.strip_suffix("/v1"))
            .unwrap_or_else(|| panic!("stepbox serve printed {line:?}"))
            .to_owned();
        Server { child, url }
    }

    /// SIGTERM, then waits for the process to exit; returns its exit code.
    pub fn terminate(mut self) -> Option<i32> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn api(&self, token: &str) -> Api {
        Api { http: reqwest::Client::new(), url: self.url.clone(), token: token.to_owned(), tenant: None }
    }
}

/// An API client acting as one token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
    /// The `Stepbox-Tenant` header, for an admin acting for a tenant.
    pub tenant: Option<String>,
}

impl Api {
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(tenant) = &self.tenant {
            request = request.header("Stepbox-Tenant", tenant);
        }
        request
    }

    pub async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{status}: not JSON ({err}): {text}"));
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        Self::send(self.request(reqwest::Method::POST, path).json(&body)).await
    }

    /// Starts a run of `workflow`; returns its id.
    pub async fn start(&self, workflow: &str, body: Value) -> String {
        let (status, run) = self.post(&format!("/v1/workflows/{workflow}/runs"), body).await;
        assert_eq!(status, StatusCode::CREATED, "{run}");
        run["id"].as_str().unwrap().to_owned()
    }

    /// Waits until run `id` is in a final state; returns its report.
    pub async fn finished(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, report) = self.get(&format!("/v1/runs/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{report}");
            if ["succeeded", "failed", "cancelled"].contains(&report["status"].as_str().unwrap()) {
                return report;
            }
            assert!(Instant::now() < deadline, "run {id} did not finish: {report}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Follows run `id`'s events from after `last` to its end, reconnecting
    /// with the last number seen (as a browser's `EventSource` does) while
    /// a stream ends with the run parked.
    pub async fn follow(&self, id: &str, mut last: u64) -> Vec<(u64, Value)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let events = self.events(id, Some(last), |event| event["type"] == "run_finished").await;
            last = events.last().map_or(last, |(number, _)| *number);
            seen.extend(events);
            if seen.last().is_some_and(|(_, event)| event["type"] == "run_finished" && event["status"] != "waiting") {
                return seen;
            }
            assert!(Instant::now() < deadline, "run {id} never went on: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads run `id`'s event stream from after `last` until it ends or
    /// `stop` says so: the events with their numbers.
    pub async fn events(&self, id: &str, last: Option<u64>, stop: impl Fn(&Value) -> bool) -> Vec<(u64, Value)> {
        let mut request = self.request(reqwest::Method::GET, &format!("/v1/runs/{id}/events"));
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let mut response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let (mut buffer, mut events) = (String::new(), Vec::new());
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), response.chunk()).await.unwrap().unwrap()
        {
            buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let (mut number, mut data) = (None, None);
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("id: ") {
                        number = Some(value.parse().unwrap());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(value).unwrap());
                    }
                }
                if let (Some(number), Some(data)) = (number, data) {
                    let done = stop(&data);
                    events.push((number, data));
                    if done {
                        return events;
                    }
                }
            }
        }
        events
    }
}

/// A token made with `stepbox token create`: for `tenant`, or an admin's.
pub fn token(data: &Path, tenant: Option<&str>) -> String {
    let mut args = vec!["token", "create"];
    match tenant {
        Some(tenant) => args.extend(["--tenant", tenant]),
        None => args.push("--admin"),
    }
    let out = output(data, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Deploys `workflow` with `stepbox deploy`; returns what it printed.
pub fn deploy(server: &Server, token: &str, workflow: &Path) -> String {
    let out = stepbox(Path::new("/nonexistent"))
        .args(["deploy", workflow.to_str().unwrap(), "--server", &server.url, "--token", token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// A workflow project: `name.yaml` beside a copy of each component, as a
/// user's repository holds them.
pub fn project(dir: &Path, name: &str, yaml: &str, components: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (file, source) in components {
        std::fs::copy(source, dir.join(file)).unwrap();
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A worker process, killed when dropped.
pub struct Worker {
    pub child: Child,
    log: PathBuf,
}

impl Worker {
    /// Starts `stepbox worker` with its own data directory under `dir`
    /// and waits until it is ready to claim.
    pub fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Worker {
        let log = dir.join(format!("{name}.log"));
        let mut command = stepbox(&dir.join(name));
        command.arg("worker").args(args).envs(env.iter().copied()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("running up to") {
            line.clear();
            assert!(lines.read_line(&mut line).unwrap() > 0, "the worker exited at start");
        }
        let mut file = std::fs::File::create(&log).unwrap();
        std::thread::spawn(move || std::io::copy(&mut lines, &mut file));
        Worker { child, log }
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").args([signal, &self.child.id().to_string()]).status();
        assert!(status.unwrap().success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
