//! The plugin registry's files: one folder per tenant in the store
//! directory, each version as `<sha256>.wasm` and the rollout state as
//! `state.json` — read at start, written after every change (whole, never in
//! place), replaced whole by a snapshot, pruned to the newest versions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{
    DamagedStore, MAX_VERSIONS, PluginRegistry, RegistryError, STATE_FILE, SavedState,
    TenantPlugins,
};
use crate::durable::write_atomically;
use crate::plugin::{CompiledPlugin, hex_sha256, short};

impl PluginRegistry {
    pub(super) fn load(&self) -> Result<(), DamagedStore> {
        let Ok(entries) = std::fs::read_dir(&self.store_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let tenant = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path().join(STATE_FILE);
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Nothing activated yet.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(DamagedStore {
                        path,
                        reason: err.to_string(),
                    });
                }
            };
            let state =
                serde_json::from_slice::<SavedState>(&bytes).map_err(|err| DamagedStore {
                    path: path.clone(),
                    reason: err.to_string(),
                })?;
            self.load_tenant(&tenant, state, &BTreeMap::new());
        }
        Ok(())
    }

    /// Where the store keeps its files.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Makes `tenant`'s plugins those of `rollout` (a rollout file's
    /// content, as a backup or snapshot carries it) and `components` (by
    /// version): files written, then loaded as at a start. Versions this
    /// node compiled already are not compiled again.
    pub fn replace_tenant(
        &self,
        tenant: &str,
        rollout: &serde_json::Value,
        components: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), RegistryError> {
        let state = serde_json::from_value::<SavedState>(rollout.clone()).map_err(|err| {
            RegistryError::Conflict(format!("unreadable rollout state of {tenant:?}: {err}"))
        })?;
        let dir = self.store_dir.join(tenant);
        std::fs::create_dir_all(&dir)?;
        for (version, bytes) in components {
            if hex_sha256(bytes) != *version {
                return Err(RegistryError::Conflict(format!(
                    "version {version} of {tenant:?} does not match its content"
                )));
            }
            let path = dir.join(format!("{version}.wasm"));
            if !path.exists() {
                write_atomically(&path, bytes)?;
            }
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(version) = name.strip_suffix(".wasm")
                && !components.contains_key(version)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let bytes = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
        write_atomically(&dir.join(STATE_FILE), &bytes)?;
        let compiled = self
            .tenants
            .remove(tenant)
            .map(|(_, mut old)| {
                old.end_canary(tenant, "a snapshot replaced the tenant's plugins");
                old.end_shadow(tenant);
                old.versions
            })
            .unwrap_or_default();
        self.load_tenant(tenant, state, &compiled);
        Ok(())
    }

    /// Loads `tenant`'s versions that `state` lists from the store (those
    /// in `compiled` as they are) and serves them; versions that cannot be
    /// loaded are logged and left out.
    pub(super) fn load_tenant(
        &self,
        tenant: &str,
        mut state: SavedState,
        compiled: &BTreeMap<String, Arc<CompiledPlugin>>,
    ) {
        let dir = self.store_dir.join(tenant);
        let mut plugins = TenantPlugins::default();
        for version in state.uploaded_at.keys() {
            if let Some(plugin) = compiled.get(version) {
                plugins.versions.insert(version.clone(), plugin.clone());
                continue;
            }
            let path = dir.join(format!("{version}.wasm"));
            let loaded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    if hex_sha256(&bytes) != *version {
                        return Err("file does not match its version".to_owned());
                    }
                    self.host.compile(tenant, &bytes).map_err(|e| e.0)
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
        state
            .shadow
            .take_if(|shadow| !plugins.versions.contains_key(shadow.as_str()));
        if state
            .canary
            .as_ref()
            .is_some_and(|c| state.active.is_none() || !plugins.versions.contains_key(&c.version))
        {
            state.canary = None;
        }
        plugins.state = state;
        if let Some(canary) = plugins.state.canary.clone() {
            self.watch_canary(tenant, &plugins, &canary);
        }
        tracing::info!(
            %tenant,
            versions = plugins.versions.len(),
            active = plugins.state.active.as_deref().map(short),
            "plugins loaded"
        );
        self.tenants.insert(tenant.to_owned(), plugins);
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

    /// Deletes the plugins of every tenant `keep` refuses.
    pub fn retain_tenants(&self, keep: impl Fn(&str) -> bool) {
        let stored: Vec<String> = self.tenants.iter().map(|t| t.key().clone()).collect();
        for tenant in stored.iter().filter(|tenant| !keep(tenant)) {
            self.remove_tenant(tenant);
        }
    }

    /// Keeps at most [`MAX_VERSIONS`], dropping the oldest inactive ones.
    pub(super) fn prune(&self, dir: &Path, plugins: &mut TenantPlugins) {
        while plugins.versions.len() > MAX_VERSIONS {
            let oldest = plugins
                .state
                .uploaded_at
                .iter()
                .filter(|(v, _)| !plugins.serves(v))
                .min_by_key(|(_, at)| **at)
                .map(|(v, _)| v.clone());
            let Some(oldest) = oldest else { break };
            plugins.versions.remove(&oldest);
            plugins.state.uploaded_at.remove(&oldest);
            plugins.state.history.retain(|v| v != &oldest);
            let _ = std::fs::remove_file(dir.join(format!("{oldest}.wasm")));
        }
    }

    pub(super) fn save(&self, dir: &Path, plugins: &TenantPlugins) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let bytes = serde_json::to_vec_pretty(&plugins.state).map_err(std::io::Error::other)?;
        write_atomically(&dir.join(STATE_FILE), &bytes)
    }
}
