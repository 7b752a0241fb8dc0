//! Backing the control state up and restoring it: `pushgate state export`
//! writes one JSON document — the state file's content and every stored
//! plugin version with its rollout state — and `pushgate state import`
//! puts such a document in place of a state directory's content.
//!
//! Export reads the directory as it is (a running node's too: each file is
//! replaced whole, never written in place). Import needs the node stopped:
//! it takes the directory's lock. The audit trail is neither exported nor
//! replaced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::state::{self, ControlState, StateDir, StateError};
use crate::config::Config;
use crate::durable::{sync_dir, write_atomically};
use crate::plugin::hex_sha256;

/// Format of the backup document this build writes (and the newest it
/// reads).
const BACKUP_FORMAT: u32 = 1;
/// A tenant's rollout state in the plugin store (the registry's file).
const PLUGIN_STATE_FILE: &str = "state.json";

/// A backup.
#[derive(Serialize, Deserialize)]
pub struct Backup {
    pub format: u32,
    pub exported_at_ms: u64,
    pub state: ControlState,
    /// By tenant: its rollout state and its versions.
    pub plugins: BTreeMap<String, TenantPlugins>,
}

impl Backup {
    /// Each tenant's plugin components by version, decoded: every one
    /// checked against its version (its SHA-256), and its tenant against
    /// the backup's tenants.
    pub fn components(&self) -> Result<BTreeMap<String, BTreeMap<String, Vec<u8>>>, BackupError> {
        let mut components = BTreeMap::new();
        for (tenant, plugins) in &self.plugins {
            if !self.state.tenants.contains_key(tenant)
                || !crate::config::load::is_valid_tenant_name(tenant)
            {
                return Err(BackupError::Invalid(format!(
                    "plugins of {tenant:?}, which is not one of its tenants"
                )));
            }
            let mut versions = BTreeMap::new();
            for (version, encoded) in &plugins.versions {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|err| BackupError::Invalid(format!("version {version}: {err}")))?;
                if hex_sha256(&bytes) != *version {
                    return Err(BackupError::Invalid(format!(
                        "version {version} of {tenant:?} does not match its content"
                    )));
                }
                versions.insert(version.clone(), bytes);
            }
            components.insert(tenant.clone(), versions);
        }
        Ok(components)
    }
}

/// One tenant's plugins in a backup.
#[derive(Serialize, Deserialize)]
pub struct TenantPlugins {
    /// The rollout state as the plugin store keeps it.
    pub state: Value,
    /// Each version's component, base64, by version (its SHA-256).
    pub versions: BTreeMap<String, String>,
}

/// Why a backup could not be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a pushgate backup: {0}")]
    Invalid(String),
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The backup of the state directory `config` names.
pub fn export(config: &Config) -> Result<Backup, BackupError> {
    let state = state::read(&config.state.dir.join(state::STATE_FILE))?.unwrap_or_default();
    export_from(state, &config.plugin_store_dir())
}

/// The backup of `state` with the plugins the store `store` keeps of its
/// tenants.
pub fn export_from(state: ControlState, store: &Path) -> Result<Backup, BackupError> {
    let store = store.to_path_buf();
    let mut plugins = BTreeMap::new();
    let entries = match std::fs::read_dir(&store) {
        Ok(entries) => entries.flatten().collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(read_error(&store)(err)),
    };
    for entry in entries {
        let tenant = entry.file_name().to_string_lossy().into_owned();
        if !state.tenants.contains_key(&tenant) {
            continue;
        }
        let dir = entry.path();
        let state_path = dir.join(PLUGIN_STATE_FILE);
        let Ok(bytes) = std::fs::read(&state_path) else {
            continue;
        };
        let rollout: Value = serde_json::from_slice(&bytes)
            .map_err(|err| BackupError::Invalid(format!("{}: {err}", state_path.display())))?;
        let mut versions = BTreeMap::new();
        let listed = rollout["uploaded_at"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for version in listed.keys() {
            let path = dir.join(format!("{version}.wasm"));
            let component = std::fs::read(&path).map_err(read_error(&path))?;
            versions.insert(
                version.clone(),
                base64::engine::general_purpose::STANDARD.encode(component),
            );
        }
        plugins.insert(
            tenant,
            TenantPlugins {
                state: rollout,
                versions,
            },
        );
    }
    Ok(Backup {
        format: BACKUP_FORMAT,
        exported_at_ms: crate::clock::now_micros() / 1000,
        state,
        plugins,
    })
}

/// What an import put in place.
#[derive(Debug, Serialize)]
pub struct Imported {
    pub tenants: usize,
    pub keys: usize,
    pub plugin_versions: usize,
}

/// Replaces the content of `config`'s state directory with `backup`
/// (everything checked first: a bad backup changes nothing). Refused while
/// a node runs on the directory.
pub fn import(config: &Config, backup: &Backup) -> Result<Imported, BackupError> {
    if backup.format > BACKUP_FORMAT {
        return Err(BackupError::Invalid(format!(
            "written in format {} by a newer pushgate; this one reads up to {BACKUP_FORMAT}",
            backup.format
        )));
    }
    let components: Vec<(String, String, Vec<u8>)> = backup
        .components()?
        .into_iter()
        .flat_map(|(tenant, versions)| {
            versions
                .into_iter()
                .map(move |(version, bytes)| (tenant.clone(), version, bytes))
        })
        .collect();
    let dir = StateDir::lock(&config.state.dir)?;
    // The plugins first, beside the store, then swapped in; the state
    // file last: an import cut short leaves the old state file.
    let store = config.plugin_store_dir();
    let incoming = store.with_extension("importing");
    let _ = std::fs::remove_dir_all(&incoming);
    for (tenant, plugins) in &backup.plugins {
        let tenant_dir = incoming.join(tenant);
        std::fs::create_dir_all(&tenant_dir).map_err(write_error(&tenant_dir))?;
        let path = tenant_dir.join(PLUGIN_STATE_FILE);
        let rollout = serde_json::to_vec(&plugins.state).expect("JSON serializes");
        write_atomically(&path, &rollout).map_err(write_error(&path))?;
    }
    for (tenant, version, bytes) in &components {
        let path = incoming.join(tenant).join(format!("{version}.wasm"));
        write_atomically(&path, bytes).map_err(write_error(&path))?;
    }
    let _ = std::fs::remove_dir_all(&store);
    if let Some(parent) = store.parent() {
        std::fs::create_dir_all(parent).map_err(write_error(parent))?;
    }
    std::fs::create_dir_all(&incoming).map_err(write_error(&incoming))?;
    std::fs::rename(&incoming, &store).map_err(write_error(&store))?;
    sync_dir(&store).map_err(write_error(&store))?;
    dir.save(&backup.state)?;
    Ok(Imported {
        tenants: backup.state.tenants.len(),
        keys: backup.state.keys.len(),
        plugin_versions: components.len(),
    })
}
