//! State that outlives an attempt: the key-value data behind `wasi:keyvalue`.
//!
//! The sandbox talks to a [`KeyValueStore`] only, so the in-memory store used
//! today and a durable one can be swapped without touching the host bindings.

mod journal;
mod memory;
mod sqlite;
mod writer;

use std::path::PathBuf;

pub use journal::{
    AttemptRow, ExecutionRow, Journal, NewRun, ResumeState, RunFilter, RunSummary, StepRow, StoredAttempt, StoredRun,
    StoredStep,
};
pub use memory::MemoryKeyValueStore;
pub use sqlite::now_ms as unix_ms;
pub use sqlite::{DATABASE_FILE, Database, SCHEMA_VERSION};
pub use writer::Durable;

/// A new run id: a UUIDv7, unique across processes and machines and
/// sorting by creation time.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Why the store could not be used; each says what to do about it. Nothing
/// already committed is lost by any of them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot use the data directory {path}: {source}; choose a writable one with --data-dir or STEPBOX_DATA_DIR"
    )]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not a usable stepbox database ({detail}); move it aside to start a new one, or restore it from a backup"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} was written by a newer stepbox (schema version {found}; this one knows up to {supported}); upgrade stepbox"
    )]
    NewerSchema { path: PathBuf, found: u32, supported: u32 },
    #[error("{path} is locked by another stepbox process; wait for it to finish, or use another --data-dir")]
    Locked { path: PathBuf },
    #[error(
        "the disk holding {path} is full; what was recorded before is kept; free some space, then `stepbox resume` the run"
    )]
    DiskFull { path: PathBuf },
    #[error("cannot write {path} ({detail}); check its permissions, or use another --data-dir")]
    NotWritable { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    Sqlite { path: PathBuf, detail: String },
    #[error(
        "the journal writer has stopped, so nothing more can be recorded; restart stepbox and `stepbox resume` the run"
    )]
    WriterStopped,
    #[error("no run `{0}` in this data directory; `stepbox runs` lists them")]
    NoSuchRun(String),
}

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
