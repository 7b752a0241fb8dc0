//! Each tenant's plugin versions: which is active, which came before (for
//! rollback), and their files in the store directory.
//!
//! Swaps are hot: the active version is an `Arc` that callers clone for one
//! call, so calls in flight finish on the version they started with and the
//! next call uses the new one. A failed upload never touches the active
//! version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::{CompiledPlugin, Hook, InvalidPlugin, PluginHost, hex_sha256, short};

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
}

#[derive(Default)]
struct TenantPlugins {
    versions: BTreeMap<String, Arc<CompiledPlugin>>,
    state: SavedState,
}

impl TenantPlugins {
    fn active(&self) -> Option<&Arc<CompiledPlugin>> {
        self.state
            .active
            .as_ref()
            .and_then(|v| self.versions.get(v))
    }

    fn activate(&mut self, version: &str) {
        if let Some(previous) = self.state.active.replace(version.to_owned())
            && previous != version
        {
            self.state.history.retain(|v| v != &previous);
            self.state.history.push(previous);
        }
        self.state.history.retain(|v| v != version);
        self.release_inactive();
    }

    /// Inactive versions keep no warm instance (nor the memory it holds).
    fn release_inactive(&self) {
        for (version, plugin) in &self.versions {
            if self.state.active.as_deref() != Some(version) {
                plugin.release_instances();
            }
        }
    }
}

/// A registry error, for the admin API.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(#[from] InvalidPlugin),
    #[error("{0}")]
    NotFound(String),
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
}

/// A tenant's plugins as the admin API lists them.
#[derive(Debug, Serialize)]
pub struct TenantPluginsInfo {
    pub active: Option<String>,
    /// What a rollback would activate, most recent first.
    pub rollback_to: Vec<String>,
    pub versions: Vec<VersionInfo>,
}

/// Every tenant's plugins.
pub struct PluginRegistry {
    host: PluginHost,
    store_dir: PathBuf,
    tenants: DashMap<String, TenantPlugins>,
}

impl PluginRegistry {
    /// A registry storing under `store_dir`; loads what is already there.
    /// A stored version that no longer compiles is logged and skipped.
    pub fn open(host: PluginHost, store_dir: PathBuf) -> Self {
        let registry = Self {
            host,
            store_dir,
            tenants: DashMap::new(),
        };
        registry.load();
        registry
    }

    fn load(&self) {
        let Ok(entries) = std::fs::read_dir(&self.store_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let tenant = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let Some(mut state) = std::fs::read(dir.join(STATE_FILE))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<SavedState>(&bytes).ok())
            else {
                continue;
            };
            let mut plugins = TenantPlugins::default();
            for version in state.uploaded_at.keys() {
                let path = dir.join(format!("{version}.wasm"));
                let loaded = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        if hex_sha256(&bytes) != *version {
                            return Err("file does not match its version".to_owned());
                        }
                        self.host.compile(&tenant, &bytes).map_err(|e| e.0)
                    });
                match loaded {
                    Ok(plugin) => {
                        plugins.versions.insert(version.clone(), Arc::new(plugin));
                    }
                    Err(err) => {
                        tracing::error!(%tenant, version = %short(version), %err, "stored plugin skipped")
                    }
                }
            }
            state
                .uploaded_at
                .retain(|v, _| plugins.versions.contains_key(v));
            state.history.retain(|v| plugins.versions.contains_key(v));
            if state
                .active
                .as_ref()
                .is_some_and(|v| !plugins.versions.contains_key(v))
            {
                state.active = state.history.pop();
            }
            plugins.state = state;
            tracing::info!(
                %tenant,
                versions = plugins.versions.len(),
                active = plugins.state.active.as_deref().map(short),
                "plugins loaded"
            );
            self.tenants.insert(tenant, plugins);
        }
    }

    /// The tenant's active plugin.
    pub fn active(&self, tenant: &str) -> Option<Arc<CompiledPlugin>> {
        self.tenants.get(tenant)?.active().cloned()
    }

    /// The tenant's active plugin, if it exports `hook`.
    pub fn hook(&self, tenant: &str, hook: Hook) -> Option<Arc<CompiledPlugin>> {
        self.active(tenant).filter(|p| p.has(hook))
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
            plugins.activate(&version);
        }
        self.prune(&dir, &mut plugins);
        self.save(&dir, &plugins)?;
        tracing::info!(%tenant, version = %short(&version), activate, "plugin installed");
        Ok(info(&plugins, &version))
    }

    /// Makes `version` the active one.
    pub fn activate(&self, tenant: &str, version: &str) -> Result<VersionInfo, RegistryError> {
        let mut plugins = self.tenant_mut(tenant)?;
        if !plugins.versions.contains_key(version) {
            return Err(RegistryError::NotFound(format!(
                "no version {version} for tenant {tenant:?}"
            )));
        }
        plugins.activate(version);
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
        if !plugins.versions.contains_key(version) {
            return Err(RegistryError::NotFound(format!(
                "no version {version} for tenant {tenant:?}"
            )));
        }
        plugins.state.history.retain(|v| v != version);
        plugins.state.active = Some(version.to_owned());
        plugins.release_inactive();
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
        }
        plugins.state.history.retain(|v| v != version);
        plugins.state.uploaded_at.remove(version);
        let dir = self.store_dir.join(tenant);
        let _ = std::fs::remove_file(dir.join(format!("{version}.wasm")));
        self.save(&dir, &plugins)?;
        tracing::info!(%tenant, version = %short(version), "plugin removed");
        Ok(())
    }

    /// Forgets every plugin of a removed tenant, files included.
    pub fn remove_tenant(&self, tenant: &str) {
        self.tenants.remove(tenant);
        let dir = self.store_dir.join(tenant);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(%tenant, "plugins of a removed tenant deleted"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::error!(%tenant, dir = %dir.display(), %err, "cannot delete a removed tenant's plugins")
            }
        }
    }

    /// The tenant's versions.
    pub fn list(&self, tenant: &str) -> TenantPluginsInfo {
        let Some(plugins) = self.tenants.get(tenant) else {
            return TenantPluginsInfo {
                active: None,
                rollback_to: Vec::new(),
                versions: Vec::new(),
            };
        };
        TenantPluginsInfo {
            active: plugins.state.active.clone(),
            rollback_to: plugins.state.history.iter().rev().cloned().collect(),
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

    /// Keeps at most [`MAX_VERSIONS`], dropping the oldest inactive ones.
    fn prune(&self, dir: &Path, plugins: &mut TenantPlugins) {
        while plugins.versions.len() > MAX_VERSIONS {
            let oldest = plugins
                .state
                .uploaded_at
                .iter()
                .filter(|(v, _)| plugins.state.active.as_deref() != Some(v.as_str()))
                .min_by_key(|(_, at)| **at)
                .map(|(v, _)| v.clone());
            let Some(oldest) = oldest else { break };
            plugins.versions.remove(&oldest);
            plugins.state.uploaded_at.remove(&oldest);
            plugins.state.history.retain(|v| v != &oldest);
            let _ = std::fs::remove_file(dir.join(format!("{oldest}.wasm")));
        }
    }

    fn save(&self, dir: &Path, plugins: &TenantPlugins) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let bytes = serde_json::to_vec_pretty(&plugins.state).map_err(std::io::Error::other)?;
        write_atomically(&dir.join(STATE_FILE), &bytes)
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
    }
}

/// Writes `bytes` to a temporary file and renames it over `path`, so that a
/// crash never leaves half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}
