//! `stepbox:step/trace` (contract 0.2.0): the attempt's W3C trace context,
//! so a step can hand it to the systems it calls.

use super::StepState;
use crate::sandbox::bindings::stepbox::step::trace::Host;

impl Host for StepState {
    async fn traceparent(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self.span.traceparent().map(|parent| parent.as_str().to_owned()))
    }
}
