//! API tokens: a random secret shown once, stored only as its SHA-256, so
//! a copy of the database does not hand out access. A token acts for one
//! tenant, or (an admin token) for any.

use crate::sandbox::hex;
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
}
