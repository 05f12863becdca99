use parking_lot::{Mutex, MutexGuard};
use std::collections::BTreeMap;

use super::{KeyValueStore, KvError, KvScope, add_to_stored};

type Key = (KvScope, String, String);

/// Key-value data kept in process memory: lost when the process exits. One
/// lock makes every operation atomic, which is plenty for one process.
#[derive(Debug, Default)]
pub struct MemoryKeyValueStore {
    entries: Mutex<BTreeMap<Key, Vec<u8>>>,
}

impl MemoryKeyValueStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<Key, Vec<u8>>> {
        self.entries.lock()
    }
}

fn key(scope: &KvScope, bucket: &str, key: &str) -> Key {
    (scope.clone(), bucket.to_owned(), key.to_owned())
}

impl KeyValueStore for MemoryKeyValueStore {
    fn get(&self, scope: &KvScope, bucket: &str, k: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.entries().get(&key(scope, bucket, k)).cloned())
    }

    fn set(&self, scope: &KvScope, bucket: &str, k: &str, value: &[u8]) -> Result<(), KvError> {
        self.entries().insert(key(scope, bucket, k), value.to_vec());
        Ok(())
    }

    fn delete(&self, scope: &KvScope, bucket: &str, k: &str) -> Result<(), KvError> {
        self.entries().remove(&key(scope, bucket, k));
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
        let entries = self.entries();
        Ok(entries
            .range(start..)
            .take_while(|((s, b, _), _)| s == scope && b == bucket)
            .map(|((_, _, k), _)| k)
            .filter(|k| after.is_none_or(|after| k.as_str() > after))
            .take(limit)
            .cloned()
            .collect())
    }

    fn increment(&self, scope: &KvScope, bucket: &str, k: &str, delta: i64) -> Result<i64, KvError> {
        let mut entries = self.entries();
        let entry = key(scope, bucket, k);
        let next = add_to_stored(k, entries.get(&entry).map(Vec::as_slice), delta)?;
        entries.insert(entry, next.to_string().into_bytes());
        Ok(next)
    }

    fn compare_and_swap(
        &self,
        scope: &KvScope,
        bucket: &str,
        k: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, KvError> {
        let mut entries = self.entries();
        let entry = key(scope, bucket, k);
        if entries.get(&entry).map(Vec::as_slice) != expected {
            return Ok(false);
        }
        entries.insert(entry, new.to_vec());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(tenant: &str) -> KvScope {
        KvScope { tenant: tenant.into(), workflow: "wf".into() }
    }

    #[test]
    fn scopes_do_not_see_each_other() {
        let kv = MemoryKeyValueStore::new();
        kv.set(&scope("a"), "default", "k", b"1").unwrap();
        assert_eq!(kv.get(&scope("b"), "default", "k").unwrap(), None);
        assert_eq!(kv.list_keys(&scope("b"), "default", None, 10).unwrap(), Vec::<String>::new());
        assert_eq!(kv.get(&scope("a"), "default", "k").unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn list_keys_pages_in_order() {
        let kv = MemoryKeyValueStore::new();
        for k in ["c", "a", "b", "d"] {
            kv.set(&scope("t"), "default", k, b"x").unwrap();
        }
        kv.set(&scope("t"), "other", "aa", b"x").unwrap();
        assert_eq!(kv.list_keys(&scope("t"), "default", None, 2).unwrap(), ["a", "b"]);
        assert_eq!(kv.list_keys(&scope("t"), "default", Some("b"), 10).unwrap(), ["c", "d"]);
    }

    #[test]
    fn increment_counts_from_zero_and_rejects_non_integers() {
        let kv = MemoryKeyValueStore::new();
        assert_eq!(kv.increment(&scope("t"), "default", "n", 5).unwrap(), 5);
        assert_eq!(kv.increment(&scope("t"), "default", "n", -2).unwrap(), 3);
        kv.set(&scope("t"), "default", "s", b"\"text\"").unwrap();
        assert_eq!(kv.increment(&scope("t"), "default", "s", 1), Err(KvError::NotAnInteger { key: "s".into() }));
    }

    #[test]
    fn compare_and_swap_only_swaps_the_expected_value() {
        let kv = MemoryKeyValueStore::new();
        assert!(kv.compare_and_swap(&scope("t"), "b", "k", None, b"1").unwrap());
        assert!(!kv.compare_and_swap(&scope("t"), "b", "k", None, b"2").unwrap());
        assert!(kv.compare_and_swap(&scope("t"), "b", "k", Some(b"1"), b"2").unwrap());
        assert_eq!(kv.get(&scope("t"), "b", "k").unwrap(), Some(b"2".to_vec()));
    }
}
