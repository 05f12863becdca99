//! Baselines built from wasmtime alone: the floor of an attempt, a naive
//! embedding, and what fuel and epochs cost a CPU-bound loop.

use std::time::{Duration, Instant};

use wasmtime::component::{ComponentType, InstancePre, Lift, Linker, Lower, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// `stepbox:step/types.step-context`, for calling `run` without stepbox.
#[derive(ComponentType, Lower)]
#[component(record)]
struct Context {
    #[component(name = "run-id")]
    run_id: String,
    #[component(name = "step-id")]
    step_id: String,
    attempt: u32,
    #[component(name = "idempotency-key")]
    idempotency_key: String,
    tenant: String,
}

#[derive(ComponentType, Lift)]
#[component(variant)]
enum StepError {
    #[component(name = "retryable")]
    Retryable(String),
    #[component(name = "fatal")]
    Fatal(String),
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn linker(engine: &Engine) -> anyhow::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    // The step contract's types interface has no functions to provide.
    linker.instance("stepbox:step/types@0.1.0").map_err(|e| anyhow::anyhow!("{e:#}"))?;
    Ok(linker)
}

/// One call of `run` with `input` in a new store, as bare as wasmtime
/// allows, metered as stepbox meters an attempt when `stepbox`.
async fn call(engine: &Engine, pre: &InstancePre<State>, i: usize, input: &str, stepbox: bool) -> anyhow::Result<()> {
    let state = State { wasi: WasiCtx::builder().build(), table: ResourceTable::new() };
    let mut store = Store::new(engine, state);
    fuel_up(&mut store, stepbox);
    let instance = pre.instantiate_async(&mut store).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let run = instance
        .get_typed_func::<(Context, &str), (Result<String, StepError>,)>(&mut store, "run")
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let context = Context {
        run_id: "bench".into(),
        step_id: format!("s{i}"),
        attempt: 1,
        idempotency_key: format!("bench/s{i}"),
        tenant: "default".into(),
    };
    let (result,) = run.call_async(&mut store, (context, input)).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
    match result {
        Ok(_) => Ok(()),
        Err(StepError::Retryable(message) | StepError::Fatal(message)) => {
            anyhow::bail!("the step failed: {message}")
        }
    }
}

pub struct Floor {
    engine: Engine,
    pre: InstancePre<State>,
    /// Whether each call is metered as stepbox meters an attempt.
    stepbox: bool,
}

impl Floor {
    /// The component at `path` on `engine`, each call metered as stepbox
    /// meters an attempt when `stepbox`.
    pub fn new(engine: &Engine, path: &str, stepbox: bool) -> anyhow::Result<Self> {
        let component =
            wasmtime::component::Component::from_file(engine, path).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let pre = linker(engine)?.instantiate_pre(&component).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(Floor { engine: engine.clone(), pre, stepbox })
    }

    /// `n` attempts, `parallel` at a time (on tokio's threads, as
    /// stepbox's attempts run).
    pub async fn run(&self, n: usize, parallel: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..parallel {
            let (engine, pre, stepbox) = (self.engine.clone(), self.pre.clone(), self.stepbox);
            workers.spawn(async move {
                for i in (worker..n).step_by(parallel) {
                    call(&engine, &pre, i, "null", stepbox).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = workers.join_next().await {
            done??;
        }
        Ok(started.elapsed())
    }
}

/// The ways wasmtime can be set up to run a no-op step, each timed one at a
/// time and `parallel` at a time.
pub struct Floors {
    /// `(what, one at a time, parallel)` for each setting, in the order
    /// of [`SETTINGS`].
    pub each: Vec<(&'static str, Duration, Duration)>,
}

/// How wasmtime can be set up: its defaults (instances allocated on
/// demand, no fuel, no epochs); a pool whose slots keep their pages
/// resident, still unmetered; stepbox's own engine (that pool, metered as
/// `stepbox::sandbox::meter` meters an attempt), which is not a floor but
/// what stepbox pays to wasmtime; and, last, that pool resetting only the
/// pages the kernel reports written (`PAGEMAP_SCAN`), not a floor either:
/// in wasmtime 48 it leaves a dirty page the kernel has swapped out or is
/// migrating as the attempt left it, for the next attempt in the slot to
/// read (BENCHMARKS.md).
pub const SETTINGS: [&str; 4] = [
    "wasmtime's default settings",
    "pooled instances kept resident, no fuel or epochs",
    "stepbox's engine settings (pool, fuel in slices, the yield hook)",
    "pooled, only written pages reset (PAGEMAP_SCAN; unsafe between tenants in wasmtime 48)",
];

impl Floors {
    /// Times `n` no-op attempts of the component at `path` each way, the
    /// settings interleaved so a noisy neighbour hits them all; `stepbox`
    /// is stepbox's own engine.
    pub async fn measure(stepbox: &Engine, path: &str, n: usize, parallel: usize) -> anyhow::Result<Self> {
        let engines =
            [bare_engine(Pool::None)?, bare_engine(Pool::Resident)?, stepbox.clone(), bare_engine(Pool::Scanned)?];
        let floors = engines
            .iter()
            .enumerate()
            .map(|(i, engine)| Floor::new(engine, path, i == 2))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut best = [(Duration::MAX, Duration::MAX); SETTINGS.len()];
        // The fastest of two turns of each.
        for _ in 0..2 {
            for (floor, best) in floors.iter().zip(&mut best) {
                best.0 = best.0.min(floor.run(n, 1).await? / n as u32);
                best.1 = best.1.min(floor.run(n, parallel).await? / n as u32);
            }
        }
        Ok(Floors { each: SETTINGS.iter().zip(best).map(|(what, (one, many))| (*what, one, many)).collect() })
    }

    /// The floor: the fastest unmetered setting safe between tenants, one
    /// at a time and in parallel, with its name.
    pub fn fastest(&self) -> ((&'static str, Duration), (&'static str, Duration)) {
        let bare = &self.each[..2];
        let one = bare.iter().min_by_key(|(_, one, _)| *one).map(|(what, one, _)| (*what, *one));
        let many = bare.iter().min_by_key(|(_, _, many)| *many).map(|(what, _, many)| (*what, *many));
        (one.unwrap_or(("none", Duration::MAX)), many.unwrap_or(("none", Duration::MAX)))
    }
}

/// How an unmetered engine allocates instances.
enum Pool {
    /// On demand: wasmtime's defaults.
    None,
    /// From a pool of slots that keep their touched pages resident between
    /// instances, resetting them in place (as stepbox's pool does).
    Resident,
    /// The same, resetting only the pages the kernel reports written.
    Scanned,
}

/// An unmetered engine allocating instances as `pool` says.
fn bare_engine(pool: Pool) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    let scan = match pool {
        Pool::None => None,
        Pool::Resident => Some(wasmtime::Enabled::No),
        // Where the kernel lacks the scan (before 6.7), as `Resident`.
        Pool::Scanned => Some(wasmtime::Enabled::Auto),
    };
    if let Some(scan) = scan {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.linear_memory_keep_resident(4 << 20).table_keep_resident(64 << 10).pagemap_scan(scan);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))
}

/// `n` attempts that each build an engine and compile the component anew.
pub async fn naive(path: &str, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for i in 0..n {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let floor = Floor::new(&engine, path, true)?;
        call(&floor.engine, &floor.pre, i, "null", true).await?;
    }
    Ok(started.elapsed())
}

/// What a CPU-bound guest takes metered each way: fastest of several.
pub struct LimitsCost {
    /// No fuel, no epochs: wasmtime at its fastest.
    pub bare: Duration,
    pub fuel: Duration,
    pub epoch: Duration,
    /// Fuel and epoch interruption both: what stepbox ran until the tenth
    /// session.
    pub both: Duration,
    /// Fuel in slices, yielding after slow host calls: what stepbox runs
    /// ([`stepbox::sandbox::meter`]).
    pub stepbox: Duration,
}

/// An engine with fuel or epoch interruption on or off; otherwise
/// wasmtime's defaults.
fn engine(fuel: bool, epoch: bool) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true).consume_fuel(fuel).epoch_interruption(epoch);
    Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))
}

/// The fastest of `runs` timings of `each(engine, stepbox)` metered each
/// way; interleaved, so a noisy neighbour hits them all.
async fn each_way<F, Fut>(runs: usize, each: F) -> anyhow::Result<LimitsCost>
where
    F: Fn(Engine, bool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Duration>>,
{
    let ways =
        [(false, false, false), (true, false, false), (false, true, false), (true, true, false), (true, false, true)];
    let mut best = [Duration::MAX; 5];
    for _ in 0..runs {
        for (slot, (fuel, epoch, stepbox)) in ways.into_iter().enumerate() {
            best[slot] = best[slot].min(each(engine(fuel, epoch)?, stepbox).await?);
        }
    }
    let [bare, fuel, epoch, both, stepbox] = best;
    Ok(LimitsCost { bare, fuel, epoch, both, stepbox })
}

/// Fuel for a guest, plenty: metered as stepbox meters an attempt when
/// `stepbox`, else all at once (on an engine without fuel, nothing).
fn fuel_up<T: Send + 'static>(store: &mut Store<T>, stepbox: bool) {
    if stepbox {
        stepbox::sandbox::meter(store, u64::MAX / 2);
    } else {
        let _ = store.set_fuel(u64::MAX / 2);
        store.set_epoch_deadline(u64::MAX / 2);
    }
}

/// The step component at `path` run with `input`.
pub async fn step_limits_cost(path: &str, input: &str, runs: usize) -> anyhow::Result<LimitsCost> {
    each_way(runs, |engine, stepbox| async move {
        let floor = Floor::new(&engine, path, stepbox)?;
        let started = Instant::now();
        call(&engine, &floor.pre, 0, input, stepbox).await?;
        Ok(started.elapsed())
    })
    .await
}

/// A counting loop of `iterations`: the worst case, where a fuel or epoch
/// check is most of each iteration.
pub async fn loop_limits_cost(iterations: u64, runs: usize) -> anyhow::Result<LimitsCost> {
    let wat = r#"(module (func (export "spin") (param $n i64) (result i64)
        (local $i i64)
        (loop $again
          (local.set $i (i64.add (local.get $i) (i64.const 1)))
          (br_if $again (i64.lt_u (local.get $i) (local.get $n))))
        (local.get $i)))"#;
    each_way(runs, |engine, stepbox| async move {
        let module = wasmtime::Module::new(&engine, wat::parse_str(wat)?).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let mut store = Store::new(&engine, ());
        fuel_up(&mut store, stepbox);
        let instance =
            wasmtime::Instance::new_async(&mut store, &module, &[]).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let spin = instance.get_typed_func::<i64, i64>(&mut store, "spin").map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let started = Instant::now();
        let counted = spin.call_async(&mut store, iterations as i64).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
        anyhow::ensure!(counted as u64 == iterations, "the loop counted {counted}");
        Ok(started.elapsed())
    })
    .await
}
