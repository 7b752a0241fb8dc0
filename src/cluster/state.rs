//! The control state on disk: tenants, their settings and push keys, the
//! admin API's keys — everything the admin API changes but the plugins,
//! which the plugin registry keeps in `plugins/` beside it.
//!
//! One file, `state.json`, rewritten whole after every change (a temporary
//! file flushed and renamed over it): a crash at any moment leaves the
//! state as it was after some change, all of it, never a mix — and a
//! change is on disk before it is answered. Its first line carries the
//! SHA-256 of the rest: a file damaged or cut short is refused at start,
//! naming the file, never served half-read.
//!
//! The node holds a lock on `lock` in the directory while it runs: a second
//! node, or `pushgate state import`, on the same directory is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::keys::KeyRecord;
use crate::bus::ControlPosition;
use crate::config::TenantConfig;
use crate::durable::write_atomically;
use crate::plugin::hex_sha256;

/// The state file, in the state directory.
pub const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// First word of the state file's header line.
const MAGIC: &str = "pushgate-state";
/// Format of the state file this build writes (and the newest it reads).
const FORMAT: u32 = 1;

/// What the admin API changed, as kept on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlState {
    /// Admin changes applied since the state began.
    pub changes: u64,
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Tenants the configuration file named at the last start, with the
    /// SHA-256 of the settings it gave: the file's settings are taken again
    /// only once they change (see [`ControlState::seed`]).
    pub from_file: BTreeMap<String, String>,
    /// The admin API's keys, by id.
    pub keys: BTreeMap<String, KeyRecord>,
    /// On a cluster bus: where the last control record this state took
    /// into account is kept. A restarted node reads the records after it.
    pub control_position: Option<ControlPosition>,
}

/// What taking the configuration file's tenants changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    /// Tenants whose settings came from the file (new or edited there).
    pub taken: Vec<String>,
    /// Tenants the file names whose settings the state keeps (changed or
    /// removed through the admin API since the file last changed).
    pub kept: Vec<String>,
}

impl ControlState {
    /// Takes the configuration file's tenants. The rule: whichever changed
    /// last wins. A tenant whose settings in the file are new or differ
    /// from what the file said at the last start is taken from the file;
    /// one the file still describes as before keeps what the state has
    /// (changed, or removed, through the admin API). A tenant dropped from
    /// the file stays: remove it through the admin API.
    pub fn seed(&mut self, file: &BTreeMap<String, TenantConfig>) -> Seeded {
        let mut seeded = Seeded::default();
        let mut from_file = BTreeMap::new();
        for (name, config) in file {
            let fingerprint = settings_fingerprint(config);
            if self.from_file.get(name) == Some(&fingerprint) {
                if self.tenants.get(name).map(settings_fingerprint) != Some(fingerprint.clone()) {
                    seeded.kept.push(name.clone());
                }
            } else {
                self.tenants.insert(name.clone(), config.clone());
                seeded.taken.push(name.clone());
            }
            from_file.insert(name.clone(), fingerprint);
        }
        self.from_file = from_file;
        seeded
    }

    /// The keys of `tenant` (all keys for `None`).
    pub fn keys_of(&self, tenant: Option<&str>) -> impl Iterator<Item = &KeyRecord> {
        self.keys
            .values()
            .filter(move |key| tenant.is_none() || key.tenant.as_deref() == tenant)
    }
}

fn settings_fingerprint(config: &TenantConfig) -> String {
    hex_sha256(
        serde_json::to_string(config)
            .expect("tenant settings serialize")
            .as_bytes(),
    )
}

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state directory {0} is in use by another running node (or import): stop it first")]
    Locked(PathBuf),
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is damaged ({reason}); nothing of it was used. Restore a \
         backup with `pushgate state import FILE`, or move the file away to start from the \
         configuration file alone"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        reason: CorruptState,
    },
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The state directory of a running node (or of an import): locked while
/// this value lives.
pub struct StateDir {
    dir: PathBuf,
    /// Held until [`StateDir::release`]; the lock goes with it.
    lock: std::sync::Mutex<Option<File>>,
}

impl StateDir {
    /// Creates the directory if needed and locks it.
    pub fn lock(dir: &Path) -> Result<Self, StateError> {
        let dir_error = |source| StateError::Dir {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_error)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(dir_error)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked(dir.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(dir_error(source)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }

    /// Gives the directory up: nothing is written to it any more.
    pub fn release(&self) {
        crate::sync::lock(&self.lock).take();
    }

    /// Whether the directory is still this value's to write.
    pub fn is_held(&self) -> bool {
        crate::sync::lock(&self.lock).is_some()
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The state as last written; `None` if there is none yet.
    pub fn load(&self) -> Result<Option<ControlState>, StateError> {
        read(&self.dir.join(STATE_FILE))
    }

    /// Writes `state` whole (see the module's comment).
    pub fn save(&self, state: &ControlState) -> Result<(), StateError> {
        save_in(&self.dir, state)
    }
}

/// Writes `state` whole into the state directory `dir`, which the caller
/// holds locked.
pub fn save_in(dir: &Path, state: &ControlState) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    write_atomically(&path, &encode(state)).map_err(|source| StateError::Write { path, source })
}

/// The state file's bytes: a header line with the format and the SHA-256
/// of the body, then the body as JSON.
pub fn encode(state: &ControlState) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(state).expect("the state serializes");
    let mut bytes = format!("{MAGIC} {FORMAT} {}\n", hex_sha256(&body)).into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Reads a state file; `None` if it does not exist.
pub fn read(path: &Path) -> Result<Option<ControlState>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })
}

/// What makes a state file unreadable.
#[derive(Debug, thiserror::Error)]
pub enum CorruptState {
    #[error("no header line")]
    NoHeader,
    #[error("not a state file: its header is {0:?}")]
    NotAStateFile(String),
    #[error("no format in the header")]
    NoFormat,
    #[error("written in format {0} by a newer pushgate; this one reads up to {FORMAT}")]
    Newer(u32),
    #[error("no checksum in the header")]
    NoChecksum,
    #[error("its content does not match its checksum (cut short or altered)")]
    Checksum,
    #[error("unreadable content: {0}")]
    Content(#[source] serde_json::Error),
}

fn decode(bytes: &[u8]) -> Result<ControlState, CorruptState> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(CorruptState::NoHeader)?;
    let header = String::from_utf8_lossy(&bytes[..newline]);
    let body = &bytes[newline + 1..];
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(CorruptState::NotAStateFile(header.into_owned()));
    }
    let format: u32 = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or(CorruptState::NoFormat)?;
    if format > FORMAT {
        return Err(CorruptState::Newer(format));
    }
    let checksum = words.next().ok_or(CorruptState::NoChecksum)?;
    if hex_sha256(body) != checksum {
        return Err(CorruptState::Checksum);
    }
    serde_json::from_slice(body).map_err(CorruptState::Content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(keys: &[&str]) -> TenantConfig {
        let mut config: TenantConfig = serde_json::from_str(r#"{"auth":"development"}"#).unwrap();
        config.push_keys = keys.iter().map(|k| k.to_string()).collect();
        config
    }

    #[test]
    fn a_damaged_or_cut_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::lock(dir.path()).unwrap();
        let mut state = ControlState::default();
        state.tenants.insert("shop".into(), tenant(&["k"]));
        state_dir.save(&state).unwrap();
        assert_eq!(encode(&state_dir.load().unwrap().unwrap()), encode(&state));
        let path = dir.path().join(STATE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        for damaged in [
            bytes[..bytes.len() - 3].to_vec(),
            bytes
                .iter()
                .map(|&b| if b == b'k' { b'q' } else { b })
                .collect(),
            b"{}".to_vec(),
        ] {
            std::fs::write(&path, damaged).unwrap();
            let err = state_dir.load().unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("damaged"), "{err}");
        }
    }

    #[test]
    fn a_locked_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateDir::lock(dir.path()).unwrap();
        assert!(matches!(
            StateDir::lock(dir.path()),
            Err(StateError::Locked(_))
        ));
    }

    #[test]
    fn whichever_changed_last_wins_between_the_file_and_the_api() {
        let mut state = ControlState::default();
        let mut file = BTreeMap::from([("shop".to_string(), tenant(&["a"]))]);
        assert_eq!(state.seed(&file).taken, ["shop"]);
        // Changed through the API: the unchanged file does not undo it.
        state.tenants.insert("shop".into(), tenant(&["b"]));
        assert_eq!(state.seed(&file).kept, ["shop"]);
        assert_eq!(state.tenants["shop"].push_keys, ["b"]);
        // Removed through the API: stays removed.
        state.tenants.remove("shop");
        state.seed(&file);
        assert!(!state.tenants.contains_key("shop"));
        // Edited in the file: the file's new settings are taken.
        file.insert("shop".into(), tenant(&["c"]));
        assert_eq!(state.seed(&file).taken, ["shop"]);
        assert_eq!(state.tenants["shop"].push_keys, ["c"]);
        // Dropped from the file: stays.
        state.seed(&BTreeMap::new());
        assert!(state.tenants.contains_key("shop"));
    }
}
