//! What every key-value backend must do, run against each of them.

use super::{KeyValueStore, KvError, KvQuota, KvScope, MemoryKeyValueStore};

fn scope(tenant: &str) -> KvScope {
    KvScope { tenant: tenant.into(), workflow: "wf".into() }
}

fn roomy() -> KvQuota {
    KvQuota::default()
}

/// Each backend, fresh, with what keeps it alive (a directory, a
/// database, the store that owns the connections).
fn backends() -> Vec<(std::sync::Arc<dyn KeyValueStore>, Box<dyn std::any::Any>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = super::sqlite::KeyValueDatabase::open(dir.path()).unwrap();
    let database = stepbox_tests::postgres::TestDatabase::create();
    let postgres = super::PgStore::open(&database.url).unwrap();
    vec![
        (std::sync::Arc::new(MemoryKeyValueStore::new()), Box::new(())),
        (std::sync::Arc::new(sqlite), Box::new(dir)),
        (postgres.key_values(), Box::new((postgres, database))),
    ]
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
        // By bytes, whatever the database's locale: a cursor pages the same.
        for k in ["é", "B", "_x", "Z", "a-b", "ab"] {
            kv.set(&scope("t"), "bytes", k, b"x", &roomy()).unwrap();
        }
        assert_eq!(kv.list_keys(&scope("t"), "bytes", None, 10).unwrap(), ["B", "Z", "_x", "a-b", "ab", "é"]);
        assert_eq!(kv.list_keys(&scope("t"), "bytes", Some("_x"), 2).unwrap(), ["a-b", "ab"]);
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

/// What a key of bucket `b` in workflow `wf` of a one-letter tenant costs.
fn row(key: &str, value: usize) -> u64 {
    (1 + 2 + 1 + key.len() + super::KV_ROW_OVERHEAD + value) as u64
}

#[test]
fn a_tenant_cannot_keep_more_bytes_than_its_quota_and_can_always_shrink() {
    let full = row("a", 60) + row("c", 38);
    let quota = KvQuota { max_bytes: bytesize::ByteSize::b(full), max_keys: 100 };
    for (kv, _dir) in backends() {
        let t = scope("t");
        // Exactly the quota.
        kv.set(&t, "b", "a", &[0; 60], &quota).unwrap();
        kv.set(&t, "b", "c", &[0; 38], &quota).unwrap();
        let err = kv.set(&t, "b", "d", &[], &quota).unwrap_err();
        assert_eq!(err, KvError::Quota { tenant: "t".into(), what: "bytes", wanted: full + row("d", 0), quota: full });
        assert!(err.to_string().contains("kv.max_bytes"), "{err}");
        // Empty values are not free: names and the row count.
        assert!(row("d", 0) > 30);
        // Growing a key is refused too; the same size or smaller is not.
        assert!(matches!(kv.set(&t, "b", "a", &[0; 61], &quota), Err(KvError::Quota { .. })));
        assert!(matches!(
            kv.compare_and_swap(&t, "b", "a", Some(&[0; 60]), &[1; 61], &quota),
            Err(KvError::Quota { .. })
        ));
        assert!(matches!(kv.increment(&t, "b", "n", 1, &quota), Err(KvError::Quota { .. })));
        kv.set(&t, "b", "a", &[1; 60], &quota).unwrap();
        kv.set(&t, "b", "a", &[1; 10], &quota).unwrap();
        // Other tenants keep their own account.
        kv.set(&scope("u"), "b", "a", &[0; 60], &quota).unwrap();
        // Deleting frees room, also for another workflow of the tenant.
        kv.delete(&t, "b", "c").unwrap();
        kv.delete(&t, "b", "never-set").unwrap();
        let other_workflow = KvScope { tenant: "t".into(), workflow: "other".into() };
        kv.set(&other_workflow, "b", "g", &[0; 40], &quota).unwrap();
    }
}

#[test]
fn a_tenant_cannot_keep_more_keys_than_its_quota() {
    let quota = KvQuota { max_bytes: bytesize::ByteSize::mib(1), max_keys: 3 };
    for (kv, _dir) in backends() {
        let t = scope("t");
        for key in ["a", "b", "c"] {
            kv.set(&t, "b", key, b"", &quota).unwrap();
        }
        // Overwriting keeps the count.
        kv.set(&t, "b", "a", b"x", &quota).unwrap();
        let err = kv.increment(&t, "b", "d", 1, &quota).unwrap_err();
        assert!(matches!(err, KvError::Quota { what: "keys", wanted: 4, quota: 3, .. }), "{err:?}");
        kv.delete(&t, "b", "a").unwrap();
        kv.increment(&t, "b", "d", 1, &quota).unwrap();
    }
}
