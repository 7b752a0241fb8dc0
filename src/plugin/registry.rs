//! Each tenant's plugin versions: which is active, which came before (for
//! rollback), which runs as a canary for some users or as a shadow beside
//! the active one, and their files in the store directory.
//!
//! Swaps are hot: the active version is an `Arc` that callers clone for one
//! call, so calls in flight finish on the version they started with and the
//! next call uses the new one. A failed upload never touches the active
//! version.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::rollout::{CanaryFailing, in_canary};
use super::shadow::{Shadow, ShadowLog, ShadowRunner};
use super::{CompiledPlugin, Hook, InvalidPlugin, PluginHost, short};
use crate::durable::write_atomically;

mod rollouts;
mod store;

/// A tenant's rollout file in the plugin store that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the plugin store's file {path} is damaged ({reason}); nothing of it was used. Restore a \
     backup with `pushgate state import FILE`, or remove the tenant's folder to start it \
     without plugins"
)]
pub struct DamagedStore {
    pub path: PathBuf,
    pub reason: String,
}

/// Versions kept per tenant; the oldest inactive ones go first.
const MAX_VERSIONS: usize = 10;
const STATE_FILE: &str = "state.json";

/// What the store directory remembers of a tenant.
#[derive(Default, Serialize, Deserialize)]
struct SavedState {
    active: Option<String>,
    /// Versions activated before the active one, oldest first.
    history: Vec<String>,
    /// Upload time of each version, milliseconds since the Unix epoch.
    uploaded_at: BTreeMap<String, u64>,
    #[serde(default)]
    canary: Option<CanaryInfo>,
    #[serde(default)]
    shadow: Option<String>,
    #[serde(default)]
    last_canary_rollback: Option<CanaryRollback>,
}

/// A version serving a share of the tenant's users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryInfo {
    pub version: String,
    /// Users it serves, in percent (stable by user id).
    pub percent: u8,
}

/// A canary rolled back because it failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryRollback {
    pub version: String,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Default)]
struct TenantPlugins {
    versions: BTreeMap<String, Arc<CompiledPlugin>>,
    state: SavedState,
    /// What the shadow version did on this node.
    shadow_log: Arc<ShadowLog>,
}

impl TenantPlugins {
    fn active(&self) -> Option<&Arc<CompiledPlugin>> {
        self.state
            .active
            .as_ref()
            .and_then(|v| self.versions.get(v))
    }

    fn activate(&mut self, tenant: &str, version: &str) {
        if let Some(previous) = self.state.active.replace(version.to_owned())
            && previous != version
        {
            self.state.history.retain(|v| v != &previous);
            self.state.history.push(previous);
        }
        self.state.history.retain(|v| v != version);
        self.active_changed(tenant);
    }

    /// A canary is judged against the active version it ran beside, and a
    /// shadow is compared with it: either ends when the active version
    /// changes (a canary promoted by activating it, too).
    fn active_changed(&mut self, tenant: &str) {
        if self.state.canary.is_some() {
            self.end_canary(tenant, "the active version changed");
        }
        if self.state.shadow.is_some() && self.state.shadow == self.state.active {
            self.end_shadow(tenant);
        }
        self.release_inactive();
    }

    fn end_canary(&mut self, tenant: &str, why: &str) {
        if let Some(canary) = self.state.canary.take() {
            if let Some(plugin) = self.versions.get(&canary.version) {
                plugin.watch_as_canary(None);
            }
            crate::metrics::plugin_canary_percent(tenant, short(&canary.version), 0);
            tracing::info!(%tenant, version = %short(&canary.version), why, "plugin canary ended");
        }
        self.release_inactive();
    }

    fn end_shadow(&mut self, tenant: &str) {
        if let Some(shadow) = self.state.shadow.take() {
            tracing::info!(%tenant, version = %short(&shadow), "plugin shadow ended");
        }
        self.release_inactive();
    }

    /// True if `version` serves calls: active, canary or shadow.
    fn serves(&self, version: &str) -> bool {
        self.state.active.as_deref() == Some(version)
            || self.state.shadow.as_deref() == Some(version)
            || self
                .state
                .canary
                .as_ref()
                .is_some_and(|c| c.version == version)
    }

    /// Versions that serve no calls keep no warm instance (nor the memory
    /// it holds).
    fn release_inactive(&self) {
        for (version, plugin) in &self.versions {
            if !self.serves(version) {
                plugin.release_instances();
            }
        }
    }
}

/// The versions that serve one hook of a tenant: the active one, a canary
/// for a share of its users, a shadow compared off the delivery path.
/// Canary and shadow take part only in the hooks the active version
/// exports too.
#[derive(Clone)]
pub struct HookPlugins {
    pub active: Arc<CompiledPlugin>,
    pub canary: Option<(Arc<CompiledPlugin>, u8)>,
    pub shadow: Option<Shadow>,
}

impl HookPlugins {
    /// The version that serves `user` (or another stable key).
    pub fn serving(&self, user: &str) -> &Arc<CompiledPlugin> {
        match &self.canary {
            Some((canary, percent)) if in_canary(user, *percent) => canary,
            _ => &self.active,
        }
    }

    /// `items` split by the version that serves each one's user: the
    /// active's share first, then the canary's (if any).
    pub fn split_by_user<T>(
        &self,
        items: Vec<T>,
        user: impl Fn(&T) -> &str,
    ) -> Vec<(&Arc<CompiledPlugin>, Vec<T>)> {
        let Some((canary, percent)) = &self.canary else {
            return vec![(&self.active, items)];
        };
        let (canaries, actives): (Vec<T>, Vec<T>) = items
            .into_iter()
            .partition(|item| in_canary(user(item), *percent));
        vec![(&self.active, actives), (canary, canaries)]
    }
}

/// A registry error, for the admin API.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(#[from] InvalidPlugin),
    #[error("{0}")]
    NotFound(String),
    /// The change does not fit the tenant's versions as they are.
    #[error("{0}")]
    Conflict(String),
    #[error("could not store the plugin: {0}")]
    Storage(#[from] std::io::Error),
}

/// A version as the admin API lists it.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    pub version: String,
    pub hooks: Vec<&'static str>,
    pub size: usize,
    pub uploaded_at_ms: u64,
    pub active: bool,
    /// Users it serves as a canary, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    /// True while it runs as the shadow.
    pub shadow: bool,
}

/// A tenant's plugins as the admin API lists them.
#[derive(Debug, Serialize)]
pub struct TenantPluginsInfo {
    pub active: Option<String>,
    /// What a rollback would activate, most recent first.
    pub rollback_to: Vec<String>,
    pub canary: Option<CanaryInfo>,
    pub shadow: Option<String>,
    /// The latest canary rolled back automatically, and why.
    pub last_canary_rollback: Option<CanaryRollback>,
    pub versions: Vec<VersionInfo>,
}

/// Every tenant's plugins.
pub struct PluginRegistry {
    host: PluginHost,
    store_dir: PathBuf,
    tenants: DashMap<String, TenantPlugins>,
    shadows: ShadowRunner,
    /// Where canaries report that they fail.
    canary_reports: tokio::sync::mpsc::UnboundedSender<CanaryFailing>,
    /// Taken by whoever has failing canaries rolled back.
    failing_canaries: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<CanaryFailing>>>,
}

impl PluginRegistry {
    /// A registry storing under `store_dir`; loads what is already there.
    /// A stored version that no longer compiles is logged and skipped; a
    /// tenant's rollout file that cannot be read is refused (a tenant
    /// served without its plugins could admit whom its plugin refuses).
    pub fn open(host: PluginHost, store_dir: PathBuf) -> Result<Self, DamagedStore> {
        let (canary_reports, failing_canaries) = tokio::sync::mpsc::unbounded_channel();
        let registry = Self {
            host,
            store_dir,
            tenants: DashMap::new(),
            shadows: ShadowRunner::start(),
            canary_reports,
            failing_canaries: std::sync::Mutex::new(Some(failing_canaries)),
        };
        registry.load()?;
        Ok(registry)
    }

    /// The tenant's active plugin.
    pub fn active(&self, tenant: &str) -> Option<Arc<CompiledPlugin>> {
        self.tenants.get(tenant)?.active().cloned()
    }

    /// The versions that serve `hook` of `tenant`, if its active version
    /// exports it.
    pub fn hook(&self, tenant: &str, hook: Hook) -> Option<HookPlugins> {
        let plugins = self.tenants.get(tenant)?;
        let active = plugins.active().filter(|p| p.has(hook))?.clone();
        let exporting = |version: &str| {
            plugins
                .versions
                .get(version)
                .filter(|p| p.has(hook))
                .cloned()
        };
        let canary = plugins
            .state
            .canary
            .as_ref()
            .and_then(|c| Some((exporting(&c.version)?, c.percent)));
        let shadow = plugins
            .state
            .shadow
            .as_deref()
            .and_then(exporting)
            .map(|plugin| Shadow {
                plugin,
                log: plugins.shadow_log.clone(),
                runner: self.shadows.clone(),
            });
        Some(HookPlugins {
            active,
            canary,
            shadow,
        })
    }

    /// The tenant's versions that serve calls: active, canary, shadow.
    pub fn serving(&self, tenant: &str) -> Vec<Arc<CompiledPlugin>> {
        self.tenants.get(tenant).map_or_else(Vec::new, |plugins| {
            plugins
                .versions
                .iter()
                .filter(|(version, _)| plugins.serves(version))
                .map(|(_, plugin)| plugin.clone())
                .collect()
        })
    }

    /// Validates, compiles and stores `bytes` for `tenant`, and activates it
    /// if `activate`. Slow: call it off the async workers.
    pub fn install(
        &self,
        tenant: &str,
        bytes: &[u8],
        activate: bool,
    ) -> Result<VersionInfo, RegistryError> {
        let plugin = self.prepare(tenant, bytes)?;
        self.install_prepared(tenant, bytes, plugin, activate)
    }

    /// Validates and compiles `bytes` without installing them (see
    /// [`install_prepared`](Self::install_prepared)). Slow: call it off the
    /// async workers.
    pub fn prepare(
        &self,
        tenant: &str,
        bytes: &[u8],
    ) -> Result<Arc<CompiledPlugin>, RegistryError> {
        Ok(Arc::new(self.host.compile(tenant, bytes)?))
    }

    /// Stores and installs a plugin that [`prepare`](Self::prepare) made
    /// of `bytes`.
    pub fn install_prepared(
        &self,
        tenant: &str,
        bytes: &[u8],
        plugin: Arc<CompiledPlugin>,
        activate: bool,
    ) -> Result<VersionInfo, RegistryError> {
        let version = plugin.version.clone();
        let dir = self.store_dir.join(tenant);
        std::fs::create_dir_all(&dir)?;
        write_atomically(&dir.join(format!("{version}.wasm")), bytes)?;
        let mut plugins = self.tenants.entry(tenant.to_owned()).or_default();
        plugins
            .state
            .uploaded_at
            .entry(version.clone())
            .or_insert_with(|| crate::clock::now_micros() / 1000);
        plugins.versions.insert(version.clone(), plugin);
        if activate {
            plugins.activate(tenant, &version);
        }
        self.prune(&dir, &mut plugins);
        self.save(&dir, &plugins)?;
        tracing::info!(%tenant, version = %short(&version), activate, "plugin installed");
        Ok(info(&plugins, &version))
    }

    /// Makes `version` the active one.
    pub fn activate(&self, tenant: &str, version: &str) -> Result<VersionInfo, RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        require_version(&plugins, tenant, version)?;
        plugins.activate(tenant, version);
        self.save(&self.store_dir.join(tenant), &plugins)?;
        tracing::info!(%tenant, version = %short(version), "plugin activated");
        Ok(info(&plugins, version))
    }

    /// What a rollback would re-activate: the version active before the
    /// current one.
    pub fn rollback_target(&self, tenant: &str) -> Option<String> {
        self.tenants.get(tenant)?.state.history.last().cloned()
    }

    /// The installed versions of `tenant` that start with `prefix` (the
    /// 12 hex digits logs and metrics show, or more, or the whole version).
    pub fn versions_starting_with(&self, tenant: &str, prefix: &str) -> Vec<String> {
        self.tenants.get(tenant).map_or_else(Vec::new, |plugins| {
            plugins
                .versions
                .keys()
                .filter(|version| version.starts_with(prefix))
                .cloned()
                .collect()
        })
    }

    /// Rolls back to `version` (see [`rollback_target`](Self::rollback_target)):
    /// it becomes active and leaves the history; the version it replaces is
    /// not pushed on the history. Every node of a cluster makes the same
    /// rollback this way.
    pub fn roll_back_to(&self, tenant: &str, version: &str) -> Result<VersionInfo, RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        require_version(&plugins, tenant, version)?;
        plugins.state.history.retain(|v| v != version);
        plugins.state.active = Some(version.to_owned());
        plugins.active_changed(tenant);
        self.save(&self.store_dir.join(tenant), &plugins)?;
        tracing::info!(%tenant, version = %short(version), "plugin rolled back");
        Ok(info(&plugins, version))
    }

    /// Removes `version`; removing the active one leaves the tenant without
    /// a plugin (its built-in authenticator applies again).
    pub fn remove(&self, tenant: &str, version: &str) -> Result<(), RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        if plugins.versions.remove(version).is_none() {
            return Err(RegistryError::NotFound(format!(
                "no version {version} for tenant {tenant:?}"
            )));
        }
        if plugins.state.active.as_deref() == Some(version) {
            plugins.state.active = None;
            plugins.active_changed(tenant);
        }
        if plugins
            .state
            .canary
            .as_ref()
            .is_some_and(|c| c.version == version)
        {
            plugins.end_canary(tenant, "it was removed");
        }
        if plugins.state.shadow.as_deref() == Some(version) {
            plugins.end_shadow(tenant);
        }
        plugins.state.history.retain(|v| v != version);
        plugins.state.uploaded_at.remove(version);
        let dir = self.store_dir.join(tenant);
        let _ = std::fs::remove_file(dir.join(format!("{version}.wasm")));
        self.save(&dir, &plugins)?;
        tracing::info!(%tenant, version = %short(version), "plugin removed");
        Ok(())
    }

    /// The tenant's versions.
    /// Version `version` of `tenant`, as this node compiled it.
    pub fn version(&self, tenant: &str, version: &str) -> Option<Arc<CompiledPlugin>> {
        self.tenants
            .get(tenant)
            .and_then(|plugins| plugins.versions.get(version).cloned())
    }

    /// Every version of `tenant` this node holds, by version.
    pub fn versions(&self, tenant: &str) -> Vec<Arc<CompiledPlugin>> {
        self.tenants
            .get(tenant)
            .map(|plugins| plugins.versions.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn list(&self, tenant: &str) -> TenantPluginsInfo {
        let Some(plugins) = self.tenants.get(tenant) else {
            return TenantPluginsInfo {
                active: None,
                rollback_to: Vec::new(),
                canary: None,
                shadow: None,
                last_canary_rollback: None,
                versions: Vec::new(),
            };
        };
        TenantPluginsInfo {
            active: plugins.state.active.clone(),
            rollback_to: plugins.state.history.iter().rev().cloned().collect(),
            canary: plugins.state.canary.clone(),
            shadow: plugins.state.shadow.clone(),
            last_canary_rollback: plugins.state.last_canary_rollback.clone(),
            versions: plugins.versions.keys().map(|v| info(&plugins, v)).collect(),
        }
    }

    fn tenant_mut(
        &self,
        tenant: &str,
    ) -> Result<dashmap::mapref::one::RefMut<'_, String, TenantPlugins>, RegistryError> {
        self.tenants
            .get_mut(tenant)
            .ok_or_else(|| RegistryError::NotFound(format!("tenant {tenant:?} has no plugins")))
    }
}

fn info(plugins: &TenantPlugins, version: &str) -> VersionInfo {
    let plugin = &plugins.versions[version];
    VersionInfo {
        version: version.to_owned(),
        hooks: plugin.hooks.iter().map(|h| h.name()).collect(),
        size: plugin.size,
        uploaded_at_ms: plugins.state.uploaded_at.get(version).copied().unwrap_or(0),
        active: plugins.state.active.as_deref() == Some(version),
        canary_percent: plugins
            .state
            .canary
            .as_ref()
            .filter(|c| c.version == version)
            .map(|c| c.percent),
        shadow: plugins.state.shadow.as_deref() == Some(version),
    }
}

/// 404 unless the tenant has `version`.
fn require_version(
    plugins: &TenantPlugins,
    tenant: &str,
    version: &str,
) -> Result<(), RegistryError> {
    if plugins.versions.contains_key(version) {
        Ok(())
    } else {
        Err(RegistryError::NotFound(format!(
            "no version {version} for tenant {tenant:?}"
        )))
    }
}
