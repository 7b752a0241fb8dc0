//! The tenant directory: who the tenants are, their limits, and which push
//! key belongs to which tenant.
//!
//! Readers take a snapshot ([`TenantDirectory::snapshot`]) without locking;
//! a change swaps in a whole new snapshot, so a reader never sees half of one.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::auth::Authenticator;
use crate::config::{AuthMode, Config, ConfigError, TenantConfig};
use crate::metrics::TenantMetrics;

/// One tenant as the running gateway sees it.
pub struct Tenant {
    /// The tenant's name, shared by every session of the tenant.
    pub name: Arc<str>,
    pub config: TenantConfig,
    pub authenticator: Authenticator,
    pub metrics: TenantMetrics,
}

impl Tenant {
    /// A tenant called `name` with `config`, with its authenticator and
    /// metric handles; the error names the configuration field at fault.
    pub fn new(name: &str, config: TenantConfig) -> Result<Self, String> {
        Ok(Self {
            name: Arc::from(name),
            authenticator: Authenticator::from_config(name, &config)?,
            metrics: TenantMetrics::new(name),
            config,
        })
    }

    /// True if a browser page from `origin` may connect.
    pub fn allows_origin(&self, origin: &str) -> bool {
        let allowed = &self.config.allowed_origins;
        allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }
}

/// An immutable view of every tenant.
#[derive(Default)]
pub struct TenantSnapshot {
    by_name: HashMap<Arc<str>, Arc<Tenant>>,
    /// SHA-256 of each push key → its tenant. Looking up a digest reveals
    /// nothing about how much of a guessed key was right, unlike comparing
    /// keys byte by byte.
    by_key_digest: HashMap<[u8; 32], Arc<Tenant>>,
}

impl TenantSnapshot {
    /// The tenant called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name)
    }

    /// The tenant that owns push key `key`.
    pub fn by_push_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.by_key_digest.get(&key_digest(key))
    }

    /// Every tenant.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_name.values()
    }
}

fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The live tenant directory.
pub struct TenantDirectory {
    current: ArcSwap<TenantSnapshot>,
}

impl TenantDirectory {
    /// Builds the directory from the tenants of `config`.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut snapshot = TenantSnapshot::default();
        for (name, tenant_config) in &config.tenants {
            if tenant_config.auth == AuthMode::Development {
                tracing::warn!(
                    tenant = %name,
                    "tenant uses the development authenticator: any client may claim any user id"
                );
            }
            let tenant =
                Arc::new(Tenant::new(name, tenant_config.clone()).map_err(ConfigError::new)?);
            for key in &tenant_config.push_keys {
                snapshot
                    .by_key_digest
                    .insert(key_digest(key), tenant.clone());
            }
            snapshot.by_name.insert(tenant.name.clone(), tenant);
        }
        Ok(Self {
            current: ArcSwap::from_pointee(snapshot),
        })
    }

    /// The current view; cheap, lock-free, and stable while held.
    pub fn snapshot(&self) -> Arc<TenantSnapshot> {
        self.current.load_full()
    }
}
