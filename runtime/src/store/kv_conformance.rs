//! What every key-value backend must do, run against each of them.

use super::{KeyValueStore, KvError, KvQuota, KvScope, MemoryKeyValueStore};

fn scope(tenant: &str) -> KvScope {
    KvScope { tenant: tenant.into(), workflow: "wf".into() }
}

fn roomy() -> KvQuota {
    KvQuota::default()
}

/// Each backend, fresh; the directory keeps the SQLite one alive.
fn backends() -> Vec<(Box<dyn KeyValueStore>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = super::sqlite::KeyValueDatabase::open(dir.path()).unwrap();
    vec![(Box::new(MemoryKeyValueStore::new()), None), (Box::new(sqlite), Some(dir))]
}

#[test]
fn scopes_do_not_see_each_other() {
    for (kv, _dir) in backends() {
        kv.set(&scope("a"), "default", "k", b"1", &roomy()).unwrap();
        assert_eq!(kv.get(&scope("b"), "default", "k").unwrap(), None);
        assert_eq!(kv.list_keys(&scope("b"), "default", None, 10).unwrap(), Vec::<String>::new());
        assert_eq!(kv.get(&scope("a"), "default", "k").unwrap(), Some(b"1".to_vec()));
    }
}

#[test]
fn list_keys_pages_in_order() {
    for (kv, _dir) in backends() {
        for k in ["c", "a", "b", "d"] {
            kv.set(&scope("t"), "default", k, b"x", &roomy()).unwrap();
        }
        kv.set(&scope("t"), "other", "aa", b"x", &roomy()).unwrap();
        assert_eq!(kv.list_keys(&scope("t"), "default", None, 2).unwrap(), ["a", "b"]);
        assert_eq!(kv.list_keys(&scope("t"), "default", Some("b"), 10).unwrap(), ["c", "d"]);
    }
}

#[test]
fn increment_counts_from_zero_and_rejects_non_integers() {
    for (kv, _dir) in backends() {
        assert_eq!(kv.increment(&scope("t"), "default", "n", 5, &roomy()).unwrap(), 5);
        assert_eq!(kv.increment(&scope("t"), "default", "n", -2, &roomy()).unwrap(), 3);
        kv.set(&scope("t"), "default", "s", b"\"text\"", &roomy()).unwrap();
        assert_eq!(
            kv.increment(&scope("t"), "default", "s", 1, &roomy()),
            Err(KvError::NotAnInteger { key: "s".into() })
        );
        kv.set(&scope("t"), "default", "max", i64::MAX.to_string().as_bytes(), &roomy()).unwrap();
        assert_eq!(
            kv.increment(&scope("t"), "default", "max", 1, &roomy()),
            Err(KvError::Overflow { key: "max".into() })
        );
    }
}

#[test]
fn compare_and_swap_only_swaps_the_expected_value() {
    for (kv, _dir) in backends() {
        assert!(kv.compare_and_swap(&scope("t"), "b", "k", None, b"1", &roomy()).unwrap());
        assert!(!kv.compare_and_swap(&scope("t"), "b", "k", None, b"2", &roomy()).unwrap());
        assert!(kv.compare_and_swap(&scope("t"), "b", "k", Some(b"1"), b"2", &roomy()).unwrap());
        assert_eq!(kv.get(&scope("t"), "b", "k").unwrap(), Some(b"2".to_vec()));
    }
}

#[test]
fn a_tenant_cannot_keep_more_bytes_or_keys_than_its_quota_and_can_always_shrink() {
    let quota = KvQuota { max_bytes: bytesize::ByteSize::b(100), max_keys: 3 };
    for (kv, _dir) in backends() {
        let t = scope("t");
        // 1 + 60 bytes, then 1 + 38: 100 in all, exactly the quota.
        kv.set(&t, "b", "a", &[0; 60], &quota).unwrap();
        kv.set(&t, "b", "c", &[0; 38], &quota).unwrap();
        let err = kv.set(&t, "b", "d", &[0; 1], &quota).unwrap_err();
        assert_eq!(err, KvError::Quota { tenant: "t".into(), what: "bytes", wanted: 102, quota: 100 });
        assert!(err.to_string().contains("kv.max_bytes"), "{err}");
        // Growing a key is refused too; the same size or smaller is not.
        assert!(matches!(kv.set(&t, "b", "a", &[0; 61], &quota), Err(KvError::Quota { .. })));
        assert!(matches!(
            kv.compare_and_swap(&t, "b", "a", Some(&[0; 60]), &[1; 61], &quota),
            Err(KvError::Quota { .. })
        ));
        kv.set(&t, "b", "a", &[1; 60], &quota).unwrap();
        kv.set(&t, "b", "a", &[1; 10], &quota).unwrap();
        // Keys: a third fits, a fourth does not.
        kv.set(&t, "b", "e", b"", &quota).unwrap();
        let err = kv.increment(&t, "b", "f", 1, &quota).unwrap_err();
        assert!(matches!(err, KvError::Quota { what: "keys", wanted: 4, quota: 3, .. }), "{err:?}");
        // Other tenants keep their own account.
        kv.set(&scope("u"), "b", "a", &[0; 99], &quota).unwrap();
        // Deleting frees room, also across workflows of the tenant.
        kv.delete(&t, "b", "a").unwrap();
        kv.delete(&t, "b", "never-set").unwrap();
        let other_workflow = KvScope { tenant: "t".into(), workflow: "other".into() };
        kv.set(&other_workflow, "b", "g", &[0; 40], &quota).unwrap();
        assert!(matches!(kv.set(&other_workflow, "b", "h", b"", &quota), Err(KvError::Quota { what: "keys", .. })));
    }
}
