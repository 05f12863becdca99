//! Hostile: abuses host calls. `{"attack": ..., "size": N}`:
//! `huge-log` logs one message of N bytes, `log-flood` logs N messages,
//! `resource-loop` opens key-value buckets without closing them,
//! `huge-output` returns N bytes, `stdin` reads all of stdin, `random` asks
//! the host for u64::MAX random bytes, `kv-flood` writes N-byte values to
//! four keys in turn until a write fails (and says which and why),
//! `cas-hoard` stores an N-byte value and opens compare-and-swap handles on
//! it without end (each makes the host keep a copy), `fields-hoard` builds
//! HTTP header fields of N bytes and keeps them all, `request-hoard` builds
//! HTTP requests with an N-byte path and a written body chunk and keeps
//! them all, `request-churn` builds and drops N such requests,
//! `kv-sizes` writes keys and values at and just past the host's caps and
//! says which were accepted, `env` returns the environment,
//! `request-parts` sets a request's method, scheme, authority and path to
//! N-byte names and says which the host accepted (no grant is needed for
//! any of them: nothing is sent).
use std::io::Read;

use serde::Deserialize;
use stepbox_sdk::{StepError, kv::Bucket, step};
use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::OutputStream;

#[derive(Deserialize)]
struct Input {
    attack: String,
    #[serde(default)]
    size: usize,
}

#[step]
fn run(input: Input) -> Result<serde_json::Value, StepError> {
    match input.attack.as_str() {
        "huge-log" => {
            let message = "x".repeat(input.size);
            stepbox_sdk::log::log(stepbox_sdk::log::Level::Info, "abuse", &message);
            Ok(serde_json::json!(message.len()))
        }
        // Cheap in fuel, dear in host work: only the clock stops it.
        "huge-log-loop" => {
            let message = "x".repeat(input.size);
            loop {
                stepbox_sdk::log::log(stepbox_sdk::log::Level::Info, "abuse", &message);
            }
        }
        "log-flood" => {
            for i in 0..input.size {
                stepbox_sdk::info!("flood message {i} with some padding to make it longer");
            }
            Ok(serde_json::json!(input.size))
        }
        "resource-loop" => {
            let mut open = Vec::new();
            loop {
                open.push(Bucket::open_default()?);
            }
        }
        "huge-output" => Ok(serde_json::Value::String("y".repeat(input.size))),
        "stdin" => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            Ok(serde_json::json!(text))
        }
        "kv-flood" => {
            let bucket = Bucket::open_default()?;
            let value = vec![b'k'; input.size];
            let mut written = 0u64;
            loop {
                if let Err(err) = bucket.set_bytes(&format!("flood-{}", written % 4), &value) {
                    return Err(StepError::fatal(format!("write {written} failed: {err}")));
                }
                written += 1;
            }
        }
        "cas-hoard" => {
            use stepbox_sdk::__private::bindings::wasi::keyvalue::{atomics::Cas, store};
            let failed = |err: store::Error| StepError::fatal(format!("{err:?}"));
            let bucket = store::open("default").map_err(failed)?;
            bucket.set("hoard", &vec![b'h'; input.size]).map_err(failed)?;
            let mut held = Vec::new();
            loop {
                held.push(Cas::new(&bucket, "hoard").map_err(failed)?);
            }
        }
        "fields-hoard" => {
            let mut held = Vec::new();
            loop {
                let entry = ("x-pad".to_owned(), vec![b'p'; input.size]);
                held.push(Fields::from_list(&[entry]).map_err(|err| StepError::fatal(format!("{err:?}")))?);
            }
        }
        "request-hoard" => {
            let mut held = Vec::new();
            loop {
                held.push(request(input.size)?);
            }
        }
        "kv-sizes" => {
            let bucket = Bucket::open_default()?;
            Ok(serde_json::json!({
                "key_1024": bucket.set_bytes(&"k".repeat(1024), b"v").is_ok(),
                "key_1025": bucket.set_bytes(&"k".repeat(1025), b"v").is_ok(),
                "value_1mib": bucket.set_bytes("v", &vec![b'v'; 1024 * 1024]).is_ok(),
                "value_1mib_and_1": bucket.set_bytes("v", &vec![b'v'; 1024 * 1024 + 1]).is_ok(),
            }))
        }
        "env" => Ok(serde_json::json!(std::env::vars().collect::<std::collections::BTreeMap<_, _>>())),
        "request-parts" => {
            let request = OutgoingRequest::new(Fields::new());
            let name = "a".repeat(input.size);
            Ok(serde_json::json!({
                "method": request.set_method(&Method::Other(name.clone())).is_ok(),
                "scheme": request.set_scheme(Some(&Scheme::Other(name.clone()))).is_ok(),
                "authority": request.set_authority(Some(&name)).is_ok(),
                "path": request.set_path_with_query(Some(&format!("/{name}"))).is_ok(),
            }))
        }
        "request-churn" => {
            for _ in 0..input.size {
                drop(request(1024)?);
            }
            Ok(serde_json::json!(input.size))
        }
        "random" => Ok(serde_json::json!(wasip2::random::random::get_random_bytes(u64::MAX).len())),
        other => Err(StepError::fatal(format!("unknown attack {other}"))),
    }
}

/// An HTTP request (never sent) with a path of `size` bytes and a body
/// holding one written chunk; in the order they may be dropped (a body's
/// stream before the body).
fn request(size: usize) -> Result<(OutputStream, OutgoingBody, OutgoingRequest), StepError> {
    let request = OutgoingRequest::new(Fields::new());
    let path = format!("/{}", "p".repeat(size));
    request.set_path_with_query(Some(&path)).map_err(|()| StepError::fatal("the path was refused"))?;
    let body = request.body().map_err(|()| StepError::fatal("no body"))?;
    let stream = body.write().map_err(|()| StepError::fatal("no body stream"))?;
    let room = stream.check_write().map_err(|err| StepError::fatal(format!("{err:?}")))?;
    stream.write(&vec![b'b'; room.min(64 * 1024) as usize]).map_err(|err| StepError::fatal(format!("{err:?}")))?;
    Ok((stream, body, request))
}
