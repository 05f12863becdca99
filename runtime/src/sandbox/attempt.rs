//! One attempt: a fresh store and instance, the call to `run`, and the
//! classification of how it ended.

use std::path::Path;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_http::WasiHttpCtx;

use super::bindings::stepbox::step::types::{StepContext as WitContext, StepError};
use super::capture::CappedPipe;
use super::component::{Entry, StepComponent};
use super::grants::Grants;
use super::host::StepState;
use super::host::filesystem::ScratchUse;
use super::host::http::HttpPolicy;
use super::host::keyvalue::SharedKv;
use super::host::logging::LogBuffer;
use super::host::preview1::SCRATCH_FD;
use super::host_memory::HostMemory;
use super::limits::{InstanceLimiter, Limits};
use super::redact::Redactor;
use super::scratch::{ScratchHandles, ScratchRoot, ScratchSpace};
use crate::run::{Attempt, Failure, FailureKind, LogRecord, Outcome, now_ms};
use crate::store::{KvQuota, KvScope};

/// The most bytes one host call may copy out of the guest (strings, lists):
/// wasmtime refuses more, so a guest cannot make the host allocate without
/// bound. Every host interface stepbox serves needs far less.
const HOST_CALL_BYTES: usize = 128 * 1024 * 1024;

/// Who is running: passed to the step as its context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    /// The run.
    pub run_id: String,
    /// The step's path in the run (`charge`, `billing.charge[3]`).
    pub step_id: String,
    /// From 1; counts on across resumes.
    pub attempt: u32,
    /// The same for every attempt of the execution.
    pub idempotency_key: String,
    /// The tenant the run belongs to.
    pub tenant: String,
    /// Key-value state is shared by the steps of one workflow (and tenant).
    pub workflow: String,
    /// How much key-value state the tenant may keep.
    pub kv_quota: KvQuota,
}

/// Everything one attempt needs besides the component.
#[derive(Debug, Clone)]
pub struct AttemptRequest {
    /// Who is running.
    pub context: StepContext,
    /// The step's input as JSON text.
    pub input: String,
    /// Its ceilings.
    pub limits: Limits,
    /// What it may reach.
    pub grants: Grants,
    /// How a command's exit code is classified (step components ignore it).
    pub exit_codes: ExitCodes,
    /// The attempt's span: the step reads it as a `traceparent`
    /// (`stepbox:step/trace`), its outgoing HTTP requests carry it, and
    /// its capability denials are its events. None when not traced.
    pub span: crate::traces::Span,
}

/// Which non-zero exit codes of a command are worth another attempt; every
/// other non-zero code is a fatal failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitCodes {
    /// Exit codes that are retryable failures.
    pub retryable: Vec<i32>,
}

impl Default for ExitCodes {
    /// 75 is `EX_TEMPFAIL` in sysexits.h: "try again later".
    fn default() -> Self {
        ExitCodes { retryable: vec![75] }
    }
}

/// What the guest's entry point gave back.
enum Returned {
    Step(Result<String, StepError>),
    /// A command's exit code: 0 for success.
    Exit(i32),
}

/// Where an attempt's own files go, and what it must never reach.
pub(crate) struct Places<'a> {
    /// Scratch directories are made here.
    pub(crate) scratch: &'a ScratchRoot,
    /// stepbox's own directories (the data directory, the scratch
    /// directories), which no grant may overlap.
    pub(crate) reserved: &'a [&'a Path],
    /// The most host resources any attempt may hold, whatever its limits.
    pub(crate) max_resources: u32,
}

pub(crate) async fn run(
    engine: &Engine,
    kv: SharedKv,
    places: &Places<'_>,
    component: &StepComponent,
    request: AttemptRequest,
) -> Attempt {
    let AttemptRequest { context, input, limits, mut grants, exit_codes, span } = request;
    // Values sent only in headers are redacted too: a server may echo them.
    let redactor = Redactor::new(grants.secrets.values().chain(grants.http_secrets.iter().map(|secret| &secret.value)));
    let stdio_cap = usize::try_from(limits.stdio.as_u64()).unwrap_or(usize::MAX);
    let host_memory = HostMemory::new(limits.host_memory);
    let started = Attempt::started(context.attempt, now_ms());
    // The captures and the logs are charged to the host memory limit as
    // they fill: it must hold them all, so that output past their own caps
    // is cut, never an error.
    let logs_cap = usize::try_from(limits.logs.as_u64()).unwrap_or(usize::MAX);
    let buffers = stdio_cap.saturating_add(redactor.longest()).saturating_mul(2).saturating_add(logs_cap);
    if buffers as u64 > limits.host_memory.as_u64() {
        let failure = Failure::new(
            FailureKind::Fatal,
            format!(
                "limits.host_memory ({}) cannot hold the stdout and stderr captures and the logs ({} with these \
                 limits); raise it or lower limits.stdio",
                limits.host_memory.display().iec(),
                bytesize::ByteSize(buffers as u64).display().iec()
            ),
        );
        return Attempt::refused(context.attempt, now_ms(), failure);
    }
    let stdout = CappedPipe::new(stdio_cap, redactor.longest(), host_memory.clone(), "stdout capture");
    let stderr = CappedPipe::new(stdio_cap, redactor.longest(), host_memory.clone(), "stderr capture");

    let command = component.is_command();
    if command {
        if !grants.stdin.is_empty() {
            let failure = Failure::new(
                FailureKind::Fatal,
                "a command reads the step's input on stdin, so it cannot also be given `stdin`; remove it",
            );
            return report(started, Outcome::Failed { failure }, 0, 0, Vec::new(), &stdout, &stderr, &redactor);
        }
        grants.stdin = input.clone().into_bytes();
        // Programs expect their own name first.
        let program = component.path().file_stem().map(|stem| stem.to_string_lossy().into_owned());
        grants.args.insert(0, program.unwrap_or_else(|| "step".into()));
    }
    // Removed when dropped, at the end of this function.
    let scratch = match grants.scratch.then(|| places.scratch.attempt_dir()).transpose() {
        Ok(scratch) => scratch,
        Err(err) => {
            let failure = Failure::new(FailureKind::Trap, format!("cannot create the scratch directory: {err}"));
            return report(started, Outcome::Failed { failure }, 0, 0, Vec::new(), &stdout, &stderr, &redactor);
        }
    };
    let scratch_path = scratch.as_ref().map(tempfile::TempDir::path);
    let mut wasi = match grants.wasi_builder(&stdout, &stderr, scratch_path, places.reserved) {
        Ok(wasi) => wasi,
        Err(err) => {
            // A grant the host cannot honour (a missing directory) is a
            // problem of the step's configuration: retrying will not fix it.
            let failure = Failure::new(FailureKind::Fatal, format!("{err:#}"));
            return report(started, Outcome::Failed { failure }, 0, 0, Vec::new(), &stdout, &stderr, &redactor);
        }
    };
    let max_resources = limits.host_resources.min(places.max_resources) as usize;
    let mut table = ResourceTable::new();
    table.set_max_capacity(max_resources);
    let (wasi, preview1) = match component.entry {
        Entry::Module(_) => {
            // A preview1 module keeps its descriptors in a table of its
            // own, held to the same cap.
            let mut preview1 = wasi.build_p1();
            wasmtime_wasi::WasiView::ctx(&mut preview1).table.set_max_capacity(max_resources);
            (WasiCtxBuilder::new().build(), Some(preview1))
        }
        _ => (wasi.build(), None),
    };
    let scratch_use = scratch.as_ref().map(|_| ScratchUse {
        space: ScratchSpace::new(limits.scratch),
        handles: ScratchHandles::default(),
        // A module's scratch directory is its first preopen.
        preview1_fds: preview1.iter().map(|_| SCRATCH_FD).collect(),
    });
    let state = StepState {
        wasi,
        preview1,
        table,
        http: {
            let mut http = WasiHttpCtx::new();
            http.set_field_size_limit(super::host::http::FIELDS_LIMIT);
            http
        },
        http_policy: HttpPolicy::new(grants.http, grants.http_secrets, span.clone()),
        span,
        limiter: InstanceLimiter::new(&limits),
        logs: LogBuffer::new(context.step_id.clone(), logs_cap, redactor.clone(), host_memory.clone()),
        config: Arc::new(grants.config.into_iter().chain(grants.secrets).collect()),
        kv,
        kv_scope: Arc::new(KvScope { tenant: context.tenant.clone(), workflow: context.workflow.clone() }),
        kv_quota: context.kv_quota,
        host_memory: host_memory.clone(),
        scratch: scratch_use,
        http_held: Default::default(),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_hostcall_fuel(HOST_CALL_BYTES);
    // Fuel in slices, which also makes the count readable after a timeout
    // cuts a call off (compiled code writes it back as a slice ends).
    super::meter(&mut store, limits.fuel);

    let wit_context = WitContext {
        run_id: context.run_id,
        step_id: context.step_id,
        attempt: context.attempt,
        idempotency_key: context.idempotency_key,
        tenant: context.tenant,
    };
    let call = async {
        match &component.entry {
            Entry::Step(pre) => {
                let step = pre.instantiate_async(&mut store).await?;
                step.call_run(&mut store, &wit_context, &input).await.map(Returned::Step)
            }
            Entry::Command(pre) => {
                let program = pre.instantiate_async(&mut store).await?;
                match program.wasi_cli_run().call_run(&mut store).await {
                    Ok(Err(())) => Ok(Returned::Exit(1)),
                    Ok(Ok(())) => exited(Ok(())),
                    Err(err) => exited(Err(err)),
                }
            }
            Entry::Module(pre) => {
                let instance = pre.instantiate_async(&mut store).await?;
                let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                exited(start.call_async(&mut store, ()).await)
            }
        }
    };
    // The guest yields as it computes and host calls are async, so the
    // timeout fires whether the guest computes or waits.
    let result = tokio::time::timeout(limits.timeout, call).await;

    let fuel_consumed = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
    let outcome = match result {
        Err(_elapsed) => failed(Failure::new(
            FailureKind::Timeout,
            format!("the attempt ran longer than its timeout of {}", humantime::format_duration(limits.timeout)),
        )),
        Ok(Err(err)) => failed(classify_error(&err, &store, &stderr.captured(&redactor).text)),
        Ok(Ok(Returned::Step(Err(StepError::Retryable(message))))) => {
            failed(Failure::new(FailureKind::Retryable, message))
        }
        Ok(Ok(Returned::Step(Err(StepError::Fatal(message))))) => failed(Failure::new(FailureKind::Fatal, message)),
        Ok(Ok(Returned::Step(Ok(output)))) => check_output(&output, &limits, false),
        Ok(Ok(Returned::Exit(0))) => {
            let captured = stdout.captured(&redactor);
            if captured.dropped_bytes > 0 {
                failed(Failure::new(
                    FailureKind::OutputLimit,
                    format!("the command wrote more than {} to stdout, its output", limits.stdio.display().iec()),
                ))
            } else {
                check_output(&captured.text, &limits, true)
            }
        }
        Ok(Ok(Returned::Exit(code))) => failed(exit_failure(code, &exit_codes, &stderr.captured(&redactor).text)),
    };
    // A refused host buffer ends the attempt, however the guest took the
    // refusal.
    let outcome = match host_memory.refused() {
        Some(why) => failed(Failure::new(FailureKind::MemoryLimit, why)),
        None => outcome,
    };
    let peak_memory = store.data().limiter.peak_memory();
    let logs = store.data_mut().logs.take_records();
    drop(store);
    drop(scratch);
    // A command's stdout is its output; it is not kept twice.
    let stdout = if command { CappedPipe::new(0, 0, host_memory, "stdout capture") } else { stdout };
    report(started, outcome, fuel_consumed, peak_memory, logs, &stdout, &stderr, &redactor)
}

fn failed(failure: Failure) -> Outcome {
    Outcome::Failed { failure }
}

/// How a program ended: returning from its entry point is exit code 0, and
/// `exit(N)` arrives as an error carrying N.
fn exited(result: wasmtime::Result<()>) -> wasmtime::Result<Returned> {
    match result {
        Ok(()) => Ok(Returned::Exit(0)),
        Err(err) => match err.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Ok(Returned::Exit(exit.0)),
            None => Err(err),
        },
    }
}

/// A command's non-zero exit, classified by `exit_codes`, with the last line
/// it wrote to stderr (usually the reason).
fn exit_failure(code: i32, exit_codes: &ExitCodes, stderr: &str) -> Failure {
    let kind = if exit_codes.retryable.contains(&code) { FailureKind::Retryable } else { FailureKind::Fatal };
    match stderr.lines().rev().map(str::trim).find(|line| !line.is_empty()) {
        Some(last) => Failure::new(kind, format!("the command exited with code {code}: {last}")),
        None => Failure::new(kind, format!("the command exited with code {code}")),
    }
}

/// The finished attempt, with secrets taken out of everything in it.
#[allow(clippy::too_many_arguments)]
fn report(
    started: Attempt,
    outcome: Outcome,
    fuel_consumed: u64,
    peak_memory: u64,
    logs: Vec<LogRecord>,
    stdout: &CappedPipe,
    stderr: &CappedPipe,
    redactor: &Redactor,
) -> Attempt {
    let outcome = match outcome {
        Outcome::Succeeded { output } => Outcome::Succeeded { output: redactor.json(output) },
        Outcome::Failed { failure } => failed(Failure { message: redactor.text(&failure.message), ..failure }),
        Outcome::Running => Outcome::Running,
    };
    Attempt {
        outcome,
        finished_ms: Some(now_ms()),
        fuel_consumed,
        peak_memory,
        logs,
        stdout: stdout.captured(redactor),
        stderr: stderr.captured(redactor),
        ..started
    }
}

/// The output if it is within the limit: JSON, or for a command (`lenient`)
/// anything else as a string.
fn check_output(output: &str, limits: &Limits, lenient: bool) -> Outcome {
    if output.len() as u64 > limits.output.as_u64() {
        return failed(Failure::new(
            FailureKind::OutputLimit,
            format!(
                "the step returned {} bytes of output; the limit is {}",
                output.len(),
                limits.output.display().iec()
            ),
        ));
    }
    match serde_json::from_str(output) {
        Ok(output) => Outcome::Succeeded { output },
        Err(_) if lenient => Outcome::Succeeded { output: serde_json::Value::String(output.trim_end().to_owned()) },
        Err(err) => failed(Failure::new(
            FailureKind::Fatal,
            format!("the step's output is not valid JSON ({err}); a step must return JSON text"),
        )),
    }
}

/// Names the failure behind an error from instantiating or calling the guest.
fn classify_error(err: &wasmtime::Error, store: &Store<StepState>, stderr: &str) -> Failure {
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Failure::new(
            FailureKind::Trap,
            format!("the step called exit({}) instead of returning from `run`", exit.0),
        );
    }
    let trap = err.downcast_ref::<Trap>();
    match trap {
        Some(Trap::OutOfFuel) => {
            return Failure::new(
                FailureKind::OutOfFuel,
                "the attempt used up its fuel (raise `limits.fuel` if it needs more)",
            );
        }
        Some(Trap::StackOverflow) => {
            return Failure::new(
                FailureKind::StackOverflow,
                "the step overflowed its call stack (unbounded recursion?)",
            );
        }
        Some(Trap::Interrupt) => return Failure::new(FailureKind::Timeout, "the attempt was interrupted"),
        _ => {}
    }
    // A refused growth explains what follows it: an allocation failure, or
    // an instance whose initial memory does not fit.
    if let Some(hit) = store.data().limiter.hit() {
        return Failure::new(FailureKind::MemoryLimit, hit.0.clone());
    }
    let mut message = match trap {
        Some(trap) => format!("the step trapped: {trap}"),
        // wasmtime's refusal carries no type of its own.
        None if format!("{err:#}").contains("fuel allocated for hostcalls has been exhausted") => format!(
            "the step passed more than {} to one host call",
            bytesize::ByteSize(HOST_CALL_BYTES as u64).display().iec()
        ),
        None => format!("{err:#}"),
    };
    if let Some(panic) = panic_message(stderr) {
        message.push_str(&format!(" ({panic})"));
    }
    Failure::new(FailureKind::Trap, message)
}

/// The message of a Rust panic, as the standard library prints it to stderr:
/// "thread '…' panicked at FILE:LINE:COL:\nMESSAGE".
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.rfind("panicked at ")?;
    let mut lines = stderr[start..].lines();
    let location = lines.next()?.trim_end_matches(':');
    let message = lines.next().unwrap_or("").trim();
    Some(format!("{location}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_panic_message_from_stderr() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:7:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(panic_message(stderr).unwrap(), "panicked at src/lib.rs:7:5: boom");
        assert_eq!(panic_message("nothing here"), None);
    }
}
