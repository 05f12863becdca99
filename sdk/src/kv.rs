//! Key-value state through `wasi:keyvalue`, with values stored as JSON.
//!
//! State is scoped by the host to the tenant and the workflow, so it lives
//! across runs: a counter, a cache, a last-seen marker.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bindings::wasi::keyvalue::{atomics, store};

/// A key-value operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The host has no bucket of that name.
    NoSuchBucket(String),
    /// The step may not use that bucket.
    AccessDenied(String),
    /// The stored value is not the JSON the caller expected.
    Decode { key: String, message: String },
    /// Any other failure the host reported (a size limit, storage I/O).
    Other(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::NoSuchBucket(name) => write!(f, "key-value bucket `{name}` does not exist"),
            KvError::AccessDenied(name) => write!(f, "access to key-value bucket `{name}` was denied"),
            KvError::Decode { key, message } => write!(f, "key `{key}` does not hold the expected JSON: {message}"),
            KvError::Other(msg) => write!(f, "key-value store: {msg}"),
        }
    }
}

impl std::error::Error for KvError {}

impl KvError {
    fn from_store(bucket: &str, err: store::Error) -> Self {
        match err {
            store::Error::NoSuchStore => KvError::NoSuchBucket(bucket.to_owned()),
            store::Error::AccessDenied => KvError::AccessDenied(bucket.to_owned()),
            store::Error::Other(msg) => KvError::Other(msg),
        }
    }
}

/// A named collection of keys. The host provides the bucket `default`.
pub struct Bucket {
    name: String,
    inner: store::Bucket,
}

impl Bucket {
    /// Open the bucket `name`.
    pub fn open(name: &str) -> Result<Self, KvError> {
        let inner = store::open(name).map_err(|err| KvError::from_store(name, err))?;
        Ok(Bucket { name: name.to_owned(), inner })
    }

    /// Open the bucket `default`.
    pub fn open_default() -> Result<Self, KvError> {
        Self::open("default")
    }

    fn wrap<T>(&self, result: Result<T, store::Error>) -> Result<T, KvError> {
        result.map_err(|err| KvError::from_store(&self.name, err))
    }

    /// The value of `key` decoded from JSON, or `None` when it is not set.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, KvError> {
        self.get_bytes(key)?.map(|bytes| decode(key, &bytes)).transpose()
    }

    /// Store `value` at `key` as JSON.
    pub fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), KvError> {
        self.set_bytes(key, &encode(key, value)?)
    }

    /// The raw bytes stored at `key`.
    pub fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.wrap(self.inner.get(key))
    }

    /// Store raw bytes at `key`.
    pub fn set_bytes(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.wrap(self.inner.set(key, value))
    }

    /// Remove `key`; removing a missing key is not an error.
    pub fn delete(&self, key: &str) -> Result<(), KvError> {
        self.wrap(self.inner.delete(key))
    }

    /// Whether `key` is set.
    pub fn exists(&self, key: &str) -> Result<bool, KvError> {
        self.wrap(self.inner.exists(key))
    }

    /// Every key in the bucket, in no particular order.
    pub fn keys(&self) -> Result<Vec<String>, KvError> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.wrap(self.inner.list_keys(cursor.as_deref()))?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Atomically add `delta` to the integer at `key` (a missing key counts as
    /// 0) and return the new value.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        self.wrap(atomics::increment(&self.inner, key, delta))
    }

    /// Atomically replace the JSON value at `key` with `update(current)`,
    /// trying again whenever another writer got there first. Returns the value
    /// written.
    pub fn update<T, F>(&self, key: &str, mut update: F) -> Result<T, KvError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T,
    {
        let mut cas = self.wrap(atomics::Cas::new(&self.inner, key))?;
        loop {
            let current = self.wrap(cas.current())?.map(|bytes| decode(key, &bytes)).transpose()?;
            let next = update(current);
            match atomics::swap(cas, &encode(key, &next)?) {
                Ok(()) => return Ok(next),
                Err(atomics::CasError::CasFailed(newer)) => cas = newer,
                Err(atomics::CasError::StoreError(err)) => return Err(KvError::from_store(&self.name, err)),
            }
        }
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, KvError> {
    serde_json::from_slice(bytes).map_err(|err| KvError::Decode { key: key.to_owned(), message: err.to_string() })
}

fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>, KvError> {
    serde_json::to_vec(value)
        .map_err(|err| KvError::Other(format!("could not encode the value for `{key}` as JSON: {err}")))
}
