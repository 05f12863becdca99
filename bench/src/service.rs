//! The service's paths, each beside the same done in process without HTTP:
//! a run started with `POST …/runs` to its first attempt's start, one-step
//! runs per second through the API from many clients, and a webhook to its
//! first attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::Mac;
use stepbox::run::now_ms;
use stepbox::service::{Bundle, Scope, Service, ServiceConfig, StartRun, create_token};
use stepbox::workflow::Workflow;
use stepbox_tests::guests;

use crate::measure::percentile;

/// The webhook secret of the benchmark's workflow.
const SECRET: &str = "bench-secret-0123456789";

/// What the service's paths measured.
pub struct ServiceTimes {
    /// `POST …/runs` to the first attempt's start, p50 and p99.
    pub api: (Duration, Duration),
    /// `Service::start_run` in process to the first attempt's start.
    pub local: (Duration, Duration),
    /// A signed webhook to the first attempt's start, p50.
    pub webhook: Duration,
    /// Time per run with `clients` clients posting runs, all finished.
    pub api_per_run: Duration,
    /// The same started in process by as many tasks.
    pub local_per_run: Duration,
}

struct Bench {
    service: Arc<Service>,
    scope: Scope,
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Bench {
    /// Waits until no run is active, then gives the first attempt's start
    /// of run `id`, in unix ms.
    async fn first_attempt(&self, id: &str) -> anyhow::Result<f64> {
        while self.service.active_runs() > 0 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let report = self.service.report(&self.scope, id).await?;
        let attempt = report.steps.first().and_then(|step| step.executions.first()).and_then(|e| e.attempts.first());
        attempt.map(|attempt| attempt.started_ms).ok_or_else(|| anyhow::anyhow!("run {id} ran no attempt"))
    }

    async fn post_run(&self) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("{}/v1/workflows/one/runs", self.url))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({}))
            .send()
            .await?
            .error_for_status()?;
        let run: serde_json::Value = response.json().await?;
        Ok(run["id"].as_str().unwrap_or_default().to_owned())
    }

    async fn start_local(&self) -> anyhow::Result<String> {
        Ok(self.service.start_run(&self.scope, "one", StartRun::default(), None, None).await?.0.id)
    }

    async fn post_hook(&self, delivery: usize) -> anyhow::Result<String> {
        let body = b"{}";
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes())?;
        mac.update(body);
        let signature: String = mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect();
        let response = self
            .http
            .post(format!("{}/v1/hooks/bench/one", self.url))
            .header("X-Stepbox-Signature-256", format!("sha256={signature}"))
            .header("X-Stepbox-Delivery", delivery.to_string())
            .body(&body[..])
            .send()
            .await?
            .error_for_status()?;
        let run: serde_json::Value = response.json().await?;
        Ok(run["id"].as_str().unwrap_or_default().to_owned())
    }
}

/// Measures with `samples` runs one at a time for the latencies and `runs`
/// runs from `clients` clients for the rate.
pub async fn measure(samples: usize, runs: usize, clients: usize) -> anyhow::Result<ServiceTimes> {
    let dir = tempfile::tempdir()?;
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project)?;
    std::fs::copy(guests::NOOP, project.join("noop.wasm"))?;
    let file = project.join("one.yaml");
    std::fs::write(
        &file,
        format!(
            "name: one\non:\n  webhook:\n    secret: {SECRET}\ncomponents:\n  noop: noop.wasm\nsteps:\n  - id: s\n    uses: noop\n"
        ),
    )?;
    let mut config = ServiceConfig::new(dir.path().join("data"));
    config.max_active_runs = runs.max(samples) + 1;
    let service = Service::start(config).await?;
    let token = create_token(service.database().as_ref(), Some("bench"), "bench")?.secret;
    let scope = Scope::Tenant("bench".into());
    service
        .deploy(&scope, "one", Bundle::of_workflow(&Workflow::load(&file)?, &[]).map_err(anyhow::Error::msg)?.encode())
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(stepbox::server::serve(service.clone(), listener, stop.clone().cancelled_owned()));
    let bench = Arc::new(Bench { service: service.clone(), scope, url, token, http: reqwest::Client::new() });

    // Warm up: the component loaded, connections open.
    let id = bench.post_run().await?;
    bench.first_attempt(&id).await?;

    let (mut api, mut local, mut hook) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let sent = now_ms();
        let id = bench.post_run().await?;
        api.push(bench.first_attempt(&id).await? - sent);
        let sent = now_ms();
        let id = bench.start_local().await?;
        local.push(bench.first_attempt(&id).await? - sent);
        let sent = now_ms();
        let id = bench.post_hook(i).await?;
        hook.push(bench.first_attempt(&id).await? - sent);
    }

    let mut per_run = Vec::new();
    for through_api in [true, false] {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..clients {
            let bench = bench.clone();
            let count = runs / clients + usize::from(client < runs % clients);
            tasks.spawn(async move {
                for _ in 0..count {
                    if through_api {
                        bench.post_run().await?
                    } else {
                        bench.start_local().await?
                    };
                }
                anyhow::Ok(())
            });
        }
        while let Some(result) = tasks.join_next().await {
            result??;
        }
        while service.active_runs() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        per_run.push(started.elapsed() / runs.max(1) as u32);
    }

    stop.cancel();
    service.shutdown(Duration::from_secs(10)).await;
    server.await??;
    Ok(ServiceTimes {
        api: (percentile(&mut api, 0.5), percentile(&mut api, 0.99)),
        local: (percentile(&mut local, 0.5), percentile(&mut local, 0.99)),
        webhook: percentile(&mut hook, 0.5),
        api_per_run: per_run[0],
        local_per_run: per_run[1],
    })
}
