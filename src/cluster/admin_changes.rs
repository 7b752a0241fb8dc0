//! Applying admin changes, one small function a domain: tenants, plugins,
//! keys. Each change is checked as the admin API checks it (what comes over
//! the bus may come from a forged or older node), written to the state
//! directory, then made in memory, then audited.

use std::sync::Arc;

use serde_json::{Value, json};

use super::change::{Actor, Change, KeyChange, PluginChange, TenantChange};
use super::keys::{KeyRecord, MAX_KEY_NAME_BYTES, MAX_KEYS, Role};
use super::{Applied, ApplyError, Cluster, MAX_ROLLBACK_REASON_BYTES};
use crate::config::{TenantConfig, key_fingerprint};
use crate::delivery::CloseReason;
use crate::plugin::registry::RegistryError;
use crate::plugin::{CompiledPlugin, hex_sha256};

impl Cluster {
    pub(super) async fn apply_tenant(&self, change: TenantChange) -> Result<Applied, ApplyError> {
        let state = &self.state;
        match change {
            TenantChange::Put {
                name,
                settings_json,
            } => {
                let config = serde_json::from_str::<TenantConfig>(&settings_json)
                    .map_err(|err| ApplyError::InvalidTenant(err.to_string()))?;
                self.put_tenant(&name, config).await
            }
            TenantChange::PushKeys { name, push_keys } => {
                let snapshot = state.tenants.snapshot();
                let tenant = snapshot
                    .get(&name)
                    .ok_or_else(|| ApplyError::NoTenant(name.clone()))?;
                let mut config = tenant.config.clone();
                config.push_keys = push_keys;
                self.put_tenant(&name, config).await
            }
            TenantChange::Removed { name } => {
                if state.tenants.snapshot().get(&name).is_none() {
                    return Err(ApplyError::NoTenant(name));
                }
                // Its keys go with it: a tenant made again under this name
                // is another customer.
                let gone = name.clone();
                state
                    .control
                    .update(move |s| {
                        s.tenants.remove(&gone);
                        s.keys.retain(|_, key| key.tenant.as_deref() != Some(&gone));
                    })
                    .await?;
                state.tenants.remove(&name);
                state
                    .sessions
                    .close_tenant(&name, CloseReason::TenantRemoved);
                state.sessions.forget_history(&name);
                state.remote.forget_tenant(&name);
                state.lanes.forget_tenant(&name);
                // Nothing of the old one's plugins may serve a tenant made
                // again under this name.
                let plugins = state.plugins.clone();
                tokio::task::spawn_blocking(move || plugins.remove_tenant(&name))
                    .await
                    .map_err(|err| ApplyError::Node(err.to_string()))?;
                Ok(Applied::TenantRemoved)
            }
        }
    }

    /// Checks, keeps on disk, then serves `config` as tenant `name`.
    async fn put_tenant(&self, name: &str, config: TenantConfig) -> Result<Applied, ApplyError> {
        let tenants = &self.state.tenants;
        tenants
            .check(name, &config)
            .map_err(|err| ApplyError::InvalidTenant(err.to_string()))?;
        let (kept_name, kept) = (name.to_owned(), config.clone());
        self.state
            .control
            .update(move |s| s.tenants.insert(kept_name, kept))
            .await?;
        let upserted = tenants
            .upsert(name, config)
            .map_err(|err| ApplyError::InvalidTenant(err.to_string()))?;
        Ok(Applied::Tenant(upserted))
    }

    pub(super) async fn apply_plugin(
        &self,
        tenant: String,
        change: PluginChange,
        prepared: Option<Arc<CompiledPlugin>>,
    ) -> Result<Applied, ApplyError> {
        let plugins = &self.state.plugins;
        let version = match &change {
            PluginChange::Activated { version }
            | PluginChange::RolledBack { version }
            | PluginChange::Removed { version }
            | PluginChange::Canary { version, .. }
            | PluginChange::CanaryFailed { version, .. } => Some(version.as_str()),
            PluginChange::Shadow { version } => version.as_deref(),
            PluginChange::Installed { .. } | PluginChange::CanaryEnded => None,
        };
        self.check_plugin_change(&tenant, version)?;
        match change {
            PluginChange::Installed {
                component,
                activate,
            } => {
                let registry = plugins.clone();
                let name = tenant.clone();
                let installed = tokio::task::spawn_blocking(move || match prepared {
                    Some(plugin) => registry.install_prepared(&name, &component, plugin, activate),
                    None => registry.install(&name, &component, activate),
                })
                .await
                .map_err(|err| ApplyError::Node(err.to_string()))??;
                self.prewarm(&tenant);
                Ok(Applied::Plugin(installed))
            }
            PluginChange::Activated { version } => {
                let activated = plugins.activate(&tenant, &version)?;
                self.prewarm(&tenant);
                Ok(Applied::Plugin(activated))
            }
            PluginChange::RolledBack { version } => {
                let active = plugins.roll_back_to(&tenant, &version)?;
                self.prewarm(&tenant);
                Ok(Applied::Plugin(active))
            }
            PluginChange::Removed { version } => {
                plugins.remove(&tenant, &version)?;
                Ok(Applied::PluginRemoved)
            }
            PluginChange::Canary { version, percent } => {
                let canary = plugins.set_canary(&tenant, &version, percent)?;
                self.prewarm(&tenant);
                Ok(Applied::Plugin(canary))
            }
            PluginChange::CanaryEnded => {
                plugins.end_canary(&tenant)?;
                Ok(Applied::Noted)
            }
            PluginChange::CanaryFailed { version, reason } => {
                if reason.len() > MAX_ROLLBACK_REASON_BYTES {
                    return Err(ApplyError::Malformed("a rollback reason is at most 1 KiB"));
                }
                plugins.roll_back_canary(&tenant, &version, &reason)?;
                Ok(Applied::Noted)
            }
            PluginChange::Shadow { version } => {
                plugins.set_shadow(&tenant, version.as_deref())?;
                self.prewarm(&tenant);
                Ok(Applied::Noted)
            }
        }
    }

    pub(super) async fn apply_key(&self, change: KeyChange) -> Result<Applied, ApplyError> {
        let control = &self.state.control;
        match change {
            KeyChange::Created(record) => {
                check_key(&record)?;
                if let Some(tenant) = &record.tenant
                    && self.state.tenants.snapshot().get(tenant).is_none()
                {
                    return Err(ApplyError::NoTenant(tenant.clone()));
                }
                let kept = record.clone();
                let added = control
                    .update(move |s| {
                        if s.keys.len() >= MAX_KEYS || s.keys.contains_key(&kept.id) {
                            return false;
                        }
                        s.keys.insert(kept.id.clone(), kept);
                        true
                    })
                    .await?;
                if !added {
                    return Err(ApplyError::InvalidKey(format!(
                        "key id {:?} is taken, or {MAX_KEYS} keys exist already",
                        record.id
                    )));
                }
                Ok(Applied::Key(record))
            }
            KeyChange::Revoked { id, .. } => {
                if control.key(&id).is_none() {
                    return Err(ApplyError::NoKey(id));
                }
                control
                    .update(move |s| {
                        s.keys.remove(&id);
                    })
                    .await?;
                Ok(Applied::KeyRevoked)
            }
        }
    }

    /// Records an admin change and how it ended in this node's audit trail.
    pub(super) fn audit(
        &self,
        by: &Actor,
        change: &Value,
        tenant: Option<&str>,
        result: &Result<Applied, ApplyError>,
    ) {
        let mut entry = super::audit::AuditEntry::new(by, tenant, change.clone(), &self.node);
        match result {
            Ok(_) => entry.outcome = "applied".into(),
            Err(err) => {
                entry.outcome = "refused".into();
                entry.error = Some(err.to_string());
            }
        }
        self.state.control.audit.record(entry);
    }

    /// Starts a warm instance of each of `tenant`'s serving plugin
    /// versions (active, canary, shadow) under its limits, off the
    /// caller's path.
    pub(super) fn prewarm(&self, tenant: &str) {
        let versions = self.state.plugins.serving(tenant);
        if versions.is_empty() {
            return;
        }
        let Some(settings) = self
            .state
            .tenants
            .snapshot()
            .get(tenant)
            .map(|t| t.plugin_settings.clone())
        else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            for plugin in versions {
                plugin.prewarm(&settings);
            }
        });
    }

    /// A plugin change names a tenant this node has and, if any, a version
    /// in the registry's form: what came over the bus is held to the same
    /// rules as what the admin API takes (names become paths in the store).
    pub(super) fn check_plugin_change(
        &self,
        tenant: &str,
        version: Option<&str>,
    ) -> Result<(), ApplyError> {
        if self.state.tenants.snapshot().get(tenant).is_none() {
            return Err(ApplyError::NoTenant(tenant.to_owned()));
        }
        if let Some(version) = version
            && !crate::plugin::is_version(version)
        {
            return Err(ApplyError::Plugin(RegistryError::NotFound(format!(
                "no version {version:?} for tenant {tenant:?}"
            ))));
        }
        Ok(())
    }

    /// Has every failing canary this node finds rolled back on every node.
    /// A rollback the bus did not take is retried with the next finding
    /// (the canary keeps failing, and a later failure reports it again).
    pub(crate) async fn roll_back_failing_canaries(self: Arc<Self>) {
        let Some(mut failing) = self.state.plugins.take_failing_canaries() else {
            return;
        };
        while let Some(canary) = failing.recv().await {
            tracing::warn!(
                tenant = %canary.tenant,
                version = %crate::plugin::short(&canary.version),
                reason = %canary.reason,
                "plugin canary failing: rolling it back on every node"
            );
            let change = Change::Plugin {
                by: Actor::node(&self.node, "plugin canary failing"),
                tenant: canary.tenant.clone(),
                change: PluginChange::CanaryFailed {
                    version: canary.version.clone(),
                    reason: canary.reason,
                },
            };
            if let Err(err) = self.submit(change, None).await {
                tracing::error!(tenant = %canary.tenant, %err, "plugin canary rollback not made");
                self.state
                    .plugins
                    .rearm_canary(&canary.tenant, &canary.version);
            }
        }
    }
}

/// A key from the bus is held to the admin API's rules.
fn check_key(record: &KeyRecord) -> Result<(), ApplyError> {
    let invalid = |why: &str| Err(ApplyError::InvalidKey(why.to_owned()));
    if record.name.is_empty() || record.name.len() > MAX_KEY_NAME_BYTES {
        return invalid("a key's name is 1 to 128 bytes");
    }
    if record.id.is_empty()
        || record.id.len() > 64
        || !record.id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return invalid("a key's id is 1 to 64 letters and digits");
    }
    if record.hash.len() != 64 || !record.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return invalid("a key's hash is 64 hex digits");
    }
    match (record.role, &record.tenant) {
        (Role::Operator, None) | (Role::TenantAdmin | Role::Viewer, Some(_)) => Ok(()),
        (Role::Operator, Some(_)) => invalid("an operator key is bound to no tenant"),
        (_, None) => invalid("a tenant-admin or viewer key names its tenant"),
    }
}

/// What an admin change did, for the audit trail: names and versions,
/// never a secret. `None` for the facts about connections and nodes.
pub(super) fn describe(change: &Change) -> Option<(Actor, Option<String>, Value)> {
    Some(match change {
        Change::Tenant { by, change } => match change {
            TenantChange::Put {
                name,
                settings_json,
            } => {
                let settings = serde_json::from_str::<TenantConfig>(settings_json)
                    .map(|config| config.redacted())
                    .unwrap_or(Value::Null);
                let what = json!({"action": "tenant_put", "settings": settings});
                (by.clone(), Some(name.clone()), what)
            }
            TenantChange::Removed { name } => (
                by.clone(),
                Some(name.clone()),
                json!({"action": "tenant_removed"}),
            ),
            TenantChange::PushKeys { name, push_keys } => {
                let shown: Vec<String> = push_keys.iter().map(|k| key_fingerprint(k)).collect();
                let what = json!({"action": "tenant_push_keys", "push_keys": shown});
                (by.clone(), Some(name.clone()), what)
            }
        },
        Change::Plugin { by, tenant, change } => {
            let what = match change {
                PluginChange::Installed {
                    component,
                    activate,
                } => json!({
                    "action": "plugin_installed",
                    "version": hex_sha256(component),
                    "bytes": component.len(),
                    "activate": activate,
                }),
                PluginChange::Activated { version } => {
                    json!({"action": "plugin_activated", "version": version})
                }
                PluginChange::RolledBack { version } => {
                    json!({"action": "plugin_rolled_back", "version": version})
                }
                PluginChange::Removed { version } => {
                    json!({"action": "plugin_removed", "version": version})
                }
                PluginChange::Canary { version, percent } => {
                    json!({"action": "plugin_canary", "version": version, "percent": percent})
                }
                PluginChange::CanaryEnded => json!({"action": "plugin_canary_ended"}),
                PluginChange::CanaryFailed { version, reason } => {
                    json!({"action": "plugin_canary_failed", "version": version, "reason": reason})
                }
                PluginChange::Shadow { version } => {
                    json!({"action": "plugin_shadow", "version": version})
                }
            };
            (by.clone(), Some(tenant.clone()), what)
        }
        Change::Key { by, change } => match change {
            KeyChange::Created(key) => (
                by.clone(),
                key.tenant.clone(),
                json!({
                    "action": "key_created",
                    "id": key.id,
                    "name": key.name,
                    "role": key.role,
                }),
            ),
            KeyChange::Revoked { id, tenant } => (
                by.clone(),
                tenant.clone(),
                json!({"action": "key_revoked", "id": id}),
            ),
        },
        _ => return None,
    })
}
