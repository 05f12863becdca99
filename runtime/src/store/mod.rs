//! State that outlives an attempt: the key-value data behind `wasi:keyvalue`.
//!
//! The sandbox talks to a [`KeyValueStore`] only, so the in-memory store used
//! today and a durable one can be swapped without touching the host bindings.

mod memory;

pub use memory::MemoryKeyValueStore;

/// Whose state a key belongs to: steps of one tenant and workflow share it,
/// and nobody else can reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvScope {
    pub tenant: String,
    pub workflow: String,
}

/// A failure of the key-value store itself, shown to the guest as
/// `wasi:keyvalue/store.error.other`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("the value at `{key}` is not an integer, so it cannot be incremented")]
    NotAnInteger { key: String },
    #[error("incrementing `{key}` would overflow a 64-bit integer")]
    Overflow { key: String },
    #[error("key-value storage failed: {0}")]
    Storage(String),
}

/// Key-value storage for steps. Implementations must make `increment` and
/// `compare_and_swap` atomic: many attempts run at once against one store.
pub trait KeyValueStore: Send + Sync {
    fn get(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    fn set(&self, scope: &KvScope, bucket: &str, key: &str, value: &[u8]) -> Result<(), KvError>;
    fn delete(&self, scope: &KvScope, bucket: &str, key: &str) -> Result<(), KvError>;
    /// Up to `limit` keys of `bucket` that sort after `after`, in order.
    fn list_keys(
        &self,
        scope: &KvScope,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError>;
    /// Add `delta` to the decimal integer stored at `key` (missing counts as
    /// 0), store it and return it.
    fn increment(&self, scope: &KvScope, bucket: &str, key: &str, delta: i64) -> Result<i64, KvError>;
    /// Set `key` to `new` only if its value is still `expected` (`None`: not
    /// set). Returns whether it swapped.
    fn compare_and_swap(
        &self,
        scope: &KvScope,
        bucket: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, KvError>;
}

/// The integer an `increment` starts from: stored values are decimal text,
/// which is also what a JSON reader of the key sees.
pub(crate) fn add_to_stored(key: &str, stored: Option<&[u8]>, delta: i64) -> Result<i64, KvError> {
    let current = match stored {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .ok_or_else(|| KvError::NotAnInteger { key: key.to_owned() })?,
    };
    current.checked_add(delta).ok_or_else(|| KvError::Overflow { key: key.to_owned() })
}
