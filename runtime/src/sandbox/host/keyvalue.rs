//! `wasi:keyvalue`: every call runs on a blocking thread, so a slow disk
//! or another process's lock never stalls the async runtime, and the
//! attempt's timeout still ends an attempt waiting on one.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::StepState;
use crate::sandbox::bindings::wasi::keyvalue::atomics::{self, CasError};
use crate::sandbox::bindings::wasi::keyvalue::store::{self, Error, KeyResponse};
use crate::sandbox::host_memory::Charge;
use crate::store::{KeyValueStore, KvError, KvQuota, KvScope};

/// Caps on what a guest may pass into a key-value call, so one call cannot
/// make the host copy or store an unbounded amount.
const MAX_BUCKET_NAME: usize = 128;
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 1024 * 1024;
/// Keys returned per `list-keys` page.
const PAGE: usize = 1000;

/// An open bucket: just its name, since the scope comes from the attempt.
pub struct BucketHandle {
    name: String,
}

/// A compare-and-swap in progress: the value seen when it was created,
/// held in the attempt's host memory until the handle goes.
pub struct CasHandle {
    bucket: String,
    key: String,
    seen: Option<Vec<u8>>,
    _held: Charge,
}

type KvResult<T> = wasmtime::Result<Result<T, Error>>;

fn other(err: KvError) -> Error {
    Error::Other(err.to_string())
}

fn check_key(key: &str) -> Result<(), Error> {
    if key.contains('\0') {
        return Err(Error::Other("a key cannot hold a NUL character".into()));
    }
    if key.len() > MAX_KEY {
        return Err(Error::Other(format!("the key is {} bytes; keys may be at most {MAX_KEY} bytes", key.len())));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), Error> {
    if value.len() > MAX_VALUE {
        return Err(Error::Other(format!(
            "the value is {} bytes; values may be at most {MAX_VALUE} bytes",
            value.len()
        )));
    }
    Ok(())
}

impl StepState {
    fn bucket_name(&self, bucket: &Resource<BucketHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(bucket)?.name.clone())
    }

    /// A new compare-and-swap handle, its copy of the value charged to the
    /// attempt's host memory; past it the attempt ends.
    fn cas_handle(
        &mut self,
        bucket: String,
        key: String,
        seen: Option<Vec<u8>>,
    ) -> wasmtime::Result<Resource<CasHandle>> {
        let size = bucket.len() + key.len() + seen.as_ref().map_or(0, Vec::len);
        let held = self.host_memory.charge(size, "key-value compare-and-swap handles")?;
        Ok(self.table.push(CasHandle { bucket, key, seen, _held: held })?)
    }

    /// What a call needs, taken out of the state before it is awaited.
    fn store(&self) -> KvCall {
        KvCall { kv: self.kv.clone(), scope: self.kv_scope.clone(), quota: self.kv_quota }
    }
}

/// Key-value calls on blocking threads at once, over all attempts: the
/// store serializes writes anyway, and attempts that time out cannot pile
/// up blocking work (or the values they pass) behind it.
const IN_FLIGHT: usize = 16;

/// The key-value store as a sandbox's attempts share it.
#[derive(Clone)]
pub(crate) struct SharedKv {
    store: Arc<dyn KeyValueStore>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl SharedKv {
    pub(crate) fn new(store: Arc<dyn KeyValueStore>) -> Self {
        SharedKv { store, in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)) }
    }
}

/// The store as one attempt sees it.
struct KvCall {
    kv: SharedKv,
    scope: Arc<KvScope>,
    quota: KvQuota,
}

/// A blocking task that is called off when its attempt goes before it
/// starts (a running one cannot be stopped, and finishes).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KvCall {
    /// Runs `call` against the store on a blocking thread, once one of the
    /// calls in flight is free.
    async fn call<T: Send + 'static>(
        self,
        call: impl FnOnce(&dyn KeyValueStore, &KvScope, &KvQuota) -> Result<T, KvError> + Send + 'static,
    ) -> Result<T, Error> {
        let Ok(permit) = self.kv.in_flight.clone().acquire_owned().await else {
            return Err(Error::Other("the key-value store is closed".into()));
        };
        let store = self.kv.store;
        let mut task = AbortOnDrop(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            call(&*store, &self.scope, &self.quota)
        }));
        match (&mut task.0).await {
            Ok(result) => result.map_err(other),
            Err(failed) => Err(Error::Other(format!("the key-value call failed: {failed}"))),
        }
    }

    async fn read(self, bucket: String, key: String) -> Result<Option<Vec<u8>>, Error> {
        self.call(move |kv, scope, _| kv.get(scope, &bucket, &key)).await
    }
}

impl store::Host for StepState {
    async fn open(&mut self, identifier: String) -> KvResult<Resource<BucketHandle>> {
        if identifier.is_empty() || identifier.len() > MAX_BUCKET_NAME || identifier.contains('\0') {
            return Ok(Err(Error::NoSuchStore));
        }
        Ok(Ok(self.table.push(BucketHandle { name: identifier })?))
    }
}

impl store::HostBucket for StepState {
    async fn get(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<Option<Vec<u8>>> {
        let name = self.bucket_name(&bucket)?;
        if let Err(err) = check_key(&key) {
            return Ok(Err(err));
        }
        Ok(self.store().read(name, key).await)
    }

    async fn set(&mut self, bucket: Resource<BucketHandle>, key: String, value: Vec<u8>) -> KvResult<()> {
        let name = self.bucket_name(&bucket)?;
        if let Err(err) = check_key(&key).and_then(|()| check_value(&value)) {
            return Ok(Err(err));
        }
        Ok(self.store().call(move |kv, scope, quota| kv.set(scope, &name, &key, &value, quota)).await)
    }

    async fn delete(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<()> {
        let name = self.bucket_name(&bucket)?;
        if let Err(err) = check_key(&key) {
            return Ok(Err(err));
        }
        Ok(self.store().call(move |kv, scope, _| kv.delete(scope, &name, &key)).await)
    }

    async fn exists(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<bool> {
        let name = self.bucket_name(&bucket)?;
        if let Err(err) = check_key(&key) {
            return Ok(Err(err));
        }
        Ok(self.store().call(move |kv, scope, _| kv.get(scope, &name, &key).map(|value| value.is_some())).await)
    }

    async fn list_keys(&mut self, bucket: Resource<BucketHandle>, cursor: Option<String>) -> KvResult<KeyResponse> {
        let name = self.bucket_name(&bucket)?;
        if let Some(Err(err)) = cursor.as_deref().map(check_key) {
            return Ok(Err(err));
        }
        let keys =
            match self.store().call(move |kv, scope, _| kv.list_keys(scope, &name, cursor.as_deref(), PAGE)).await {
                Ok(keys) => keys,
                Err(err) => return Ok(Err(err)),
            };
        // The cursor is the last key returned: the next page starts after it.
        let cursor = if keys.len() == PAGE { keys.last().cloned() } else { None };
        Ok(Ok(KeyResponse { keys, cursor }))
    }

    async fn drop(&mut self, bucket: Resource<BucketHandle>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for StepState {
    async fn increment(&mut self, bucket: Resource<BucketHandle>, key: String, delta: i64) -> KvResult<i64> {
        let name = self.bucket_name(&bucket)?;
        if let Err(err) = check_key(&key) {
            return Ok(Err(err));
        }
        Ok(self.store().call(move |kv, scope, quota| kv.increment(scope, &name, &key, delta, quota)).await)
    }

    async fn swap(&mut self, cas: Resource<CasHandle>, value: Vec<u8>) -> wasmtime::Result<Result<(), CasError>> {
        // The old handle's charge is given back here.
        let CasHandle { bucket, key, seen, .. } = self.table.delete(cas)?;
        if let Err(err) = check_value(&value) {
            return Ok(Err(CasError::StoreError(err)));
        }
        let (b, k) = (bucket.clone(), key.clone());
        let swapped = self
            .store()
            .call(move |kv, scope, quota| kv.compare_and_swap(scope, &b, &k, seen.as_deref(), &value, quota));
        match swapped.await {
            Ok(true) => Ok(Ok(())),
            Ok(false) => match self.store().read(bucket.clone(), key.clone()).await {
                Ok(seen) => Ok(Err(CasError::CasFailed(self.cas_handle(bucket, key, seen)?))),
                Err(err) => Ok(Err(CasError::StoreError(err))),
            },
            Err(err) => Ok(Err(CasError::StoreError(err))),
        }
    }
}

impl atomics::HostCas for StepState {
    async fn new(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<Resource<CasHandle>> {
        let name = self.bucket_name(&bucket)?;
        if let Err(err) = check_key(&key) {
            return Ok(Err(err));
        }
        let seen = match self.store().read(name.clone(), key.clone()).await {
            Ok(seen) => seen,
            Err(err) => return Ok(Err(err)),
        };
        Ok(Ok(self.cas_handle(name, key, seen)?))
    }

    async fn current(&mut self, cas: Resource<CasHandle>) -> KvResult<Option<Vec<u8>>> {
        Ok(Ok(self.table.get(&cas)?.seen.clone()))
    }

    async fn drop(&mut self, cas: Resource<CasHandle>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}
