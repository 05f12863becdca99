use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap};

use super::{KeyValueStore, KvError, KvQuota, KvScope, KvUsage, add_to_stored};

type Key = (KvScope, String, String);

/// Key-value data kept in process memory: lost when the process exits. One
/// lock makes every operation atomic, which is plenty for one process.
#[derive(Debug, Default)]
pub struct MemoryKeyValueStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<Key, Vec<u8>>,
    /// By tenant.
    usage: HashMap<String, KvUsage>,
}

impl Inner {
    /// Stores `value` at `entry` if the tenant's quota allows it.
    fn put(&mut self, entry: Key, value: Vec<u8>, quota: &KvQuota) -> Result<(), KvError> {
        let old = self.entries.get(&entry).map(Vec::len);
        let usage = self.usage.get(&entry.0.tenant).copied().unwrap_or_default();
        let usage = usage.change(&entry.0, &entry.1, &entry.2, old, Some(value.len()), quota)?;
        self.usage.insert(entry.0.tenant.clone(), usage);
        self.entries.insert(entry, value);
        Ok(())
    }
}

impl MemoryKeyValueStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }
}

fn key(scope: &KvScope, bucket: &str, key: &str) -> Key {
    (scope.clone(), bucket.to_owned(), key.to_owned())
}

impl KeyValueStore for MemoryKeyValueStore {
    fn get(&self, scope: &KvScope, bucket: &str, k: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.inner().entries.get(&key(scope, bucket, k)).cloned())
    }

    fn set(&self, scope: &KvScope, bucket: &str, k: &str, value: &[u8], quota: &KvQuota) -> Result<(), KvError> {
        self.inner().put(key(scope, bucket, k), value.to_vec(), quota)
    }

    fn delete(&self, scope: &KvScope, bucket: &str, k: &str) -> Result<(), KvError> {
        let mut inner = self.inner();
        if let Some(old) = inner.entries.remove(&key(scope, bucket, k)) {
            let usage = inner.usage.entry(scope.tenant.clone()).or_default();
            *usage = usage.removed(scope, bucket, k, old.len());
        }
        Ok(())
    }

    fn list_keys(
        &self,
        scope: &KvScope,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        let start = key(scope, bucket, after.unwrap_or(""));
        let inner = self.inner();
        Ok(inner
            .entries
            .range(start..)
            .take_while(|((s, b, _), _)| s == scope && b == bucket)
            .map(|((_, _, k), _)| k)
            .filter(|k| after.is_none_or(|after| k.as_str() > after))
            .take(limit)
            .cloned()
            .collect())
    }

    fn increment(&self, scope: &KvScope, bucket: &str, k: &str, delta: i64, quota: &KvQuota) -> Result<i64, KvError> {
        let mut inner = self.inner();
        let entry = key(scope, bucket, k);
        let next = add_to_stored(k, inner.entries.get(&entry).map(Vec::as_slice), delta)?;
        inner.put(entry, next.to_string().into_bytes(), quota)?;
        Ok(next)
    }

    fn compare_and_swap(
        &self,
        scope: &KvScope,
        bucket: &str,
        k: &str,
        expected: Option<&[u8]>,
        new: &[u8],
        quota: &KvQuota,
    ) -> Result<bool, KvError> {
        let mut inner = self.inner();
        let entry = key(scope, bucket, k);
        if inner.entries.get(&entry).map(Vec::as_slice) != expected {
            return Ok(false);
        }
        inner.put(entry, new.to_vec(), quota)?;
        Ok(true)
    }
}
