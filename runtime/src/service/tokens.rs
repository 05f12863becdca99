//! API tokens: a random secret shown once, stored only as its SHA-256, so
//! a copy of the database does not hand out access. A token acts for one
//! tenant, or (an admin token) for any.

use std::time::{Duration, Instant};

use crate::sandbox::hex;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::run::now_ms;
use crate::store::{Registry, StoreError, TokenRecord};

/// What every token starts with, so a leaked one is easy to search for.
pub const TOKEN_PREFIX: &str = "sbx_";

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// One tenant: it sees and touches only its own workflows and runs.
    Tenant(String),
    /// An operator, who may act for any tenant.
    Admin,
}

/// A newly created token: its record, and the secret, which is not kept.
#[derive(Debug)]
pub struct NewToken {
    /// The stored record.
    pub record: TokenRecord,
    /// The bearer token; shown to its creator once.
    pub secret: String,
}

/// The stored form of a secret.
fn hash(secret: &str) -> String {
    format!("{:x}", Sha256::digest(secret.as_bytes()))
}

/// Creates a token for `tenant` (an admin token for `None`), named `name`.
pub fn create(registry: &dyn Registry, tenant: Option<&str>, name: &str) -> Result<NewToken, StoreError> {
    let random: [u8; 32] = rand::random();
    let secret = format!("{TOKEN_PREFIX}{}", hex(&random));
    let id = hex(&rand::random::<[u8; 6]>());
    let record = TokenRecord {
        id,
        tenant: tenant.map(ToOwned::to_owned),
        name: name.to_owned(),
        created_ms: now_ms() as i64,
        revoked_ms: None,
    };
    registry.create_token(&record, &hash(&secret))?;
    Ok(NewToken { record, secret })
}

/// Who the bearer of `secret` is, if it is a live token. Looked up by its
/// hash: the secret is 256 random bits, so the lookup's timing says nothing
/// an attacker could use.
pub fn authenticate(registry: &dyn Registry, secret: &str) -> Result<Option<Principal>, StoreError> {
    if !secret.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    Ok(registry.find_token(&hash(secret))?.map(|record| match record.tenant {
        Some(tenant) => Principal::Tenant(tenant),
        None => Principal::Admin,
    }))
}

/// How long a token found live is believed without reading the registry
/// again, so a revoked token stops working within this long. Revoking is
/// another process's write (`stepbox token revoke`) that nothing tells a
/// server of, and reading the registry on every request cost the API a
/// third of its runs a second (BENCHMARKS.md, "The service").
pub const TOKEN_TTL: Duration = Duration::from_secs(1);

/// Tokens a server remembers at most. Only live tokens are remembered, so
/// callers with made-up tokens cannot fill it.
const REMEMBERED: usize = 10_000;

/// Tokens lately found live, by the SHA-256 of their secret.
pub(crate) struct LiveTokens {
    recent: Mutex<lru::LruCache<[u8; 32], (Principal, Instant)>>,
    ttl: Duration,
}

impl LiveTokens {
    /// Remembers each token found live for `ttl`.
    pub(crate) fn new(ttl: Duration) -> Self {
        let capacity = std::num::NonZeroUsize::new(REMEMBERED).unwrap_or(std::num::NonZeroUsize::MIN);
        LiveTokens { recent: Mutex::new(lru::LruCache::new(capacity)), ttl }
    }

    /// Who the bearer of `secret` is, if the token was found live less
    /// than the ttl ago.
    pub(crate) fn get(&self, secret: &str) -> Option<Principal> {
        let key = Self::key(secret);
        let mut recent = self.recent.lock();
        match recent.get(&key) {
            Some((principal, found)) if found.elapsed() < self.ttl => Some(principal.clone()),
            Some(_) => {
                recent.pop(&key);
                None
            }
            None => None,
        }
    }

    /// The token of `secret` was found live, acting for `principal`, by a
    /// read of the registry that began at `asked`: the ttl counts from
    /// then, so a slow read does not stretch it.
    pub(crate) fn remember(&self, secret: &str, principal: Principal, asked: Instant) {
        self.recent.lock().put(Self::key(secret), (principal, asked));
    }

    /// What a token is remembered by: not the secret itself.
    fn key(secret: &str) -> [u8; 32] {
        Sha256::digest(secret.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Database;

    #[test]
    fn a_token_authenticates_as_its_tenant_until_revoked_and_only_its_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        let token = create(&db, Some("acme"), "ci").unwrap();
        let admin = create(&db, None, "ops").unwrap();
        assert_eq!(authenticate(&db, &token.secret).unwrap(), Some(Principal::Tenant("acme".into())));
        assert_eq!(authenticate(&db, &admin.secret).unwrap(), Some(Principal::Admin));
        assert_eq!(authenticate(&db, "sbx_0000").unwrap(), None);
        assert_eq!(authenticate(&db, &token.secret[..token.secret.len() - 1]).unwrap(), None);
        let file = std::fs::read(db.path()).unwrap();
        let wal = std::fs::read(db.path().with_extension("db-wal")).unwrap_or_default();
        let needle = token.secret.as_bytes();
        assert!(!file.windows(needle.len()).chain(wal.windows(needle.len())).any(|window| window == needle));
        assert!(db.revoke_token(&token.record.id).unwrap());
        assert_eq!(authenticate(&db, &token.secret).unwrap(), None);
    }

    #[test]
    fn a_live_token_is_remembered_for_its_ttl_from_its_read_and_no_longer() {
        let secret = "sbx_0123";
        let remembering = LiveTokens::new(Duration::from_secs(3600));
        assert_eq!(remembering.get(secret), None);
        remembering.remember(secret, Principal::Tenant("acme".into()), Instant::now());
        assert_eq!(remembering.get(secret), Some(Principal::Tenant("acme".into())));
        assert_eq!(remembering.get("sbx_0124"), None);
        let forgetting = LiveTokens::new(Duration::ZERO);
        forgetting.remember(secret, Principal::Admin, Instant::now());
        assert_eq!(forgetting.get(secret), None);
        assert!(forgetting.recent.lock().is_empty(), "a stale token is dropped when found stale");
        // A read that began a ttl ago is stale however late it returned.
        let second = LiveTokens::new(Duration::from_secs(1));
        let asked = Instant::now().checked_sub(Duration::from_secs(2)).unwrap();
        second.remember(secret, Principal::Admin, asked);
        assert_eq!(second.get(secret), None);
    }

    #[test]
    fn at_most_ten_thousand_tokens_are_remembered() {
        let remembering = LiveTokens::new(Duration::from_secs(3600));
        for i in 0..REMEMBERED + 100 {
            remembering.remember(&format!("sbx_{i}"), Principal::Admin, Instant::now());
        }
        assert_eq!(remembering.recent.lock().len(), REMEMBERED);
        assert_eq!(remembering.get("sbx_0"), None, "the least recently used went first");
    }
}
