use wasmtime::component::Resource;

use super::StepState;
use crate::sandbox::bindings::wasi::keyvalue::atomics::{self, CasError};
use crate::sandbox::bindings::wasi::keyvalue::store::{self, Error, KeyResponse};
use crate::store::KvError;

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

/// A compare-and-swap in progress: the value seen when it was created.
pub struct CasHandle {
    bucket: String,
    key: String,
    seen: Option<Vec<u8>>,
}

type KvResult<T> = wasmtime::Result<Result<T, Error>>;

fn other(err: KvError) -> Error {
    Error::Other(err.to_string())
}

fn check_key(key: &str) -> Result<(), Error> {
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

    fn read(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.kv.get(&self.kv_scope, bucket, key).map_err(other)
    }
}

impl store::Host for StepState {
    async fn open(&mut self, identifier: String) -> KvResult<Resource<BucketHandle>> {
        if identifier.is_empty() || identifier.len() > MAX_BUCKET_NAME {
            return Ok(Err(Error::NoSuchStore));
        }
        Ok(Ok(self.table.push(BucketHandle { name: identifier })?))
    }
}

impl store::HostBucket for StepState {
    async fn get(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<Option<Vec<u8>>> {
        let name = self.bucket_name(&bucket)?;
        Ok(check_key(&key).and_then(|()| self.read(&name, &key)))
    }

    async fn set(&mut self, bucket: Resource<BucketHandle>, key: String, value: Vec<u8>) -> KvResult<()> {
        let name = self.bucket_name(&bucket)?;
        Ok(check_key(&key)
            .and_then(|()| check_value(&value))
            .and_then(|()| self.kv.set(&self.kv_scope, &name, &key, &value).map_err(other)))
    }

    async fn delete(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<()> {
        let name = self.bucket_name(&bucket)?;
        Ok(check_key(&key).and_then(|()| self.kv.delete(&self.kv_scope, &name, &key).map_err(other)))
    }

    async fn exists(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<bool> {
        let name = self.bucket_name(&bucket)?;
        Ok(check_key(&key).and_then(|()| self.read(&name, &key)).map(|value| value.is_some()))
    }

    async fn list_keys(&mut self, bucket: Resource<BucketHandle>, cursor: Option<String>) -> KvResult<KeyResponse> {
        let name = self.bucket_name(&bucket)?;
        let keys = match self.kv.list_keys(&self.kv_scope, &name, cursor.as_deref(), PAGE) {
            Ok(keys) => keys,
            Err(err) => return Ok(Err(other(err))),
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
        Ok(check_key(&key).and_then(|()| self.kv.increment(&self.kv_scope, &name, &key, delta).map_err(other)))
    }

    async fn swap(&mut self, cas: Resource<CasHandle>, value: Vec<u8>) -> wasmtime::Result<Result<(), CasError>> {
        let CasHandle { bucket, key, seen } = self.table.delete(cas)?;
        if let Err(err) = check_value(&value) {
            return Ok(Err(CasError::StoreError(err)));
        }
        match self.kv.compare_and_swap(&self.kv_scope, &bucket, &key, seen.as_deref(), &value) {
            Ok(true) => Ok(Ok(())),
            Ok(false) => match self.read(&bucket, &key) {
                Ok(seen) => Ok(Err(CasError::CasFailed(self.table.push(CasHandle { bucket, key, seen })?))),
                Err(err) => Ok(Err(CasError::StoreError(err))),
            },
            Err(err) => Ok(Err(CasError::StoreError(other(err)))),
        }
    }
}

impl atomics::HostCas for StepState {
    async fn new(&mut self, bucket: Resource<BucketHandle>, key: String) -> KvResult<Resource<CasHandle>> {
        let name = self.bucket_name(&bucket)?;
        let seen = match check_key(&key).and_then(|()| self.read(&name, &key)) {
            Ok(seen) => seen,
            Err(err) => return Ok(Err(err)),
        };
        Ok(Ok(self.table.push(CasHandle { bucket: name, key, seen })?))
    }

    async fn current(&mut self, cas: Resource<CasHandle>) -> KvResult<Option<Vec<u8>>> {
        Ok(Ok(self.table.get(&cas)?.seen.clone()))
    }

    async fn drop(&mut self, cas: Resource<CasHandle>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}
