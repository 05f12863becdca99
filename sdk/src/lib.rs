//! Write stepbox workflow steps in Rust.
//!
//! A step is a function from a JSON input to a JSON output, marked with
//! [`step`]:
//!
//! ```ignore
//! use serde::{Deserialize, Serialize};
//! use stepbox_sdk::{step, Context, StepError};
//!
//! #[derive(Deserialize)]
//! struct Order { id: String, total_cents: u64 }
//!
//! #[derive(Serialize)]
//! struct Receipt { order: String, charged: u64 }
//!
//! #[step]
//! fn run(ctx: &Context, order: Order) -> Result<Receipt, StepError> {
//!     if order.total_cents == 0 {
//!         return Err(StepError::fatal("nothing to charge"));
//!     }
//!     stepbox_sdk::info!("charging {} (attempt {})", order.id, ctx.attempt);
//!     Ok(Receipt { order: order.id, charged: order.total_cents })
//! }
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2` as a `cdylib`. The SDK
//! binds the `stepbox:step/step-core` world of the WIT contract, so a step
//! crate depends on `stepbox-sdk` (and serde) only. Files, clocks, random
//! numbers and stdio come from Rust's standard library through WASI, as far as
//! the workflow grants them.

pub mod config;
mod error;
pub mod kv;
pub mod log;

pub use error::StepError;
pub use stepbox_sdk_macro::step;

/// Generated bindings for the `step-core` world.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "stepbox:step/step-core",
        generate_all,
        // Lets this wit-bindgen's parser resolve the gated timezone import of
        // the vendored `wasi:cli`; nothing here binds it.
        features: ["clocks-timezone"],
        pub_export_macro: true,
        export_macro_name: "__export_step",
        default_bindings_module: "::stepbox_sdk::__private::bindings",
    });
}

/// What the step is running as: stable across the attempts of one step
/// execution, except for `attempt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The workflow run this attempt belongs to.
    pub run_id: String,
    /// The step's id in the workflow.
    pub step_id: String,
    /// 1 for the first attempt, 2 for the first retry, and so on.
    pub attempt: u32,
    /// The same for every attempt and resume of this step execution: hand it
    /// to external systems so that a repeated attempt does not repeat a side
    /// effect.
    pub idempotency_key: String,
    /// The tenant the run belongs to.
    pub tenant: String,
}

impl Context {
    /// The attempt's W3C `traceparent` (`00-<trace id>-<span id>-<flags>`)
    /// while stepbox exports traces: pass it to the systems the step calls
    /// so their spans join the run's trace (its `wasi:http` requests carry
    /// it already).
    pub fn trace_parent(&self) -> Option<String> {
        bindings::stepbox::step::trace::traceparent()
    }

    /// The trace id of [`Context::trace_parent`]: 32 hex digits, the same
    /// for every attempt of the run.
    pub fn trace_id(&self) -> Option<String> {
        self.trace_parent().and_then(|parent| parent.split('-').nth(1).map(str::to_owned))
    }
}

impl From<bindings::stepbox::step::types::StepContext> for Context {
    fn from(ctx: bindings::stepbox::step::types::StepContext) -> Self {
        Context {
            run_id: ctx.run_id,
            step_id: ctx.step_id,
            attempt: ctx.attempt,
            idempotency_key: ctx.idempotency_key,
            tenant: ctx.tenant,
        }
    }
}

/// What the [`step`] macro expands to; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings;
    pub use crate::bindings::__export_step as export;
    pub use crate::bindings::Guest;
    pub use crate::bindings::stepbox::step::types::{StepContext, StepError as WitStepError};

    use crate::{Context, StepError};
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// Decodes the input, calls the step and encodes its output, so that every
    /// step reports bad input and unencodable output the same way.
    pub fn run_step<I, O>(
        ctx: StepContext,
        input: String,
        step: impl FnOnce(&Context, I) -> Result<O, StepError>,
    ) -> Result<String, WitStepError>
    where
        I: DeserializeOwned,
        O: Serialize,
    {
        let ctx = Context::from(ctx);
        let input: I = serde_json::from_str(&input).map_err(|err| {
            WitStepError::Fatal(format!(
                "the step's input does not match what `{}` expects: {err}",
                std::any::type_name::<I>()
            ))
        })?;
        let output = step(&ctx, input).map_err(StepError::into_wit)?;
        serde_json::to_string(&output)
            .map_err(|err| WitStepError::Fatal(format!("could not encode the step's output as JSON: {err}")))
    }
}
