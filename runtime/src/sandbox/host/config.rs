use super::StepState;
use crate::sandbox::bindings::wasi::config::store::{Error, Host};

impl Host for StepState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, Error>> {
        Ok(Ok(self.config.get(&key).cloned()))
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, Error>> {
        Ok(Ok(self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
    }
}
