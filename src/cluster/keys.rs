//! The admin API's keys and what each may do.
//!
//! A key is made once through the admin API: the node that makes it draws
//! the secret, answers it once and sends only its SHA-256 on to the other
//! nodes and to disk. Every key has a role; all but `operator` are bound to
//! one tenant. `admin.token` from the configuration is an operator key of
//! its own, never stored.

use serde::{Deserialize, Serialize};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, for every tenant.
    Operator,
    /// Its own tenant's plugins and rollouts, push keys, connections and
    /// audit trail; never its limits, never another tenant, never keys.
    TenantAdmin,
    /// The reads of a tenant admin.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::TenantAdmin => "tenant-admin",
            Self::Viewer => "viewer",
        }
    }
}

/// A key as every node keeps it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// The tenant it is bound to (none for an operator key).
    pub tenant: Option<String>,
    /// Hex SHA-256 of the key.
    pub hash: String,
    pub created_at_ms: u64,
}

/// Prefix of every key the admin API makes, so that a leaked one is
/// recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "pgk_";
/// Longest key name.
pub const MAX_KEY_NAME_BYTES: usize = 128;
/// Most keys kept (made and not revoked).
pub const MAX_KEYS: usize = 10_000;

/// A fresh key: the prefix and 244 random bits, and its id.
pub fn generate() -> (String, String) {
    let secret = format!(
        "{KEY_PREFIX}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (id, secret)
}

/// Hex SHA-256 of `key`: what is kept of it.
pub fn hash(key: &str) -> String {
    crate::plugin::hex_sha256(key.as_bytes())
}
