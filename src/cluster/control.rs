//! The control state of this node: what the admin API changed (kept in
//! the state directory, see [`super::state`]), the admin API's keys, and
//! the audit trail. Changed only by the apply path, one change at a time,
//! each on disk before it is answered.

use std::collections::BTreeMap;
use std::sync::Mutex;

use dashmap::DashMap;
use subtle::ConstantTimeEq;

use super::audit::{AuditEntry, AuditLog};
use super::change::Actor;
use super::keys::{self, KeyRecord};
use super::state::{ControlState, Seeded, StateDir, StateError};
use crate::bus::{ControlPosition, ResumeControl};
use crate::config::{Config, TenantConfig};
use crate::sync::lock;

/// This node's control state.
pub struct ControlStore {
    dir: StateDir,
    /// True if the directory held no state before this start.
    fresh: bool,
    state: Mutex<ControlState>,
    /// When each key was last used on this node (milliseconds since the
    /// Unix epoch); not kept across restarts.
    last_used: DashMap<String, u64>,
    pub(crate) audit: AuditLog,
}

impl ControlStore {
    /// Locks the state directory of `config`, reads what it keeps, and
    /// takes the configuration file's tenants by the rule of
    /// [`ControlState::seed`].
    pub fn open(config: &Config, node: &str) -> Result<Self, StateError> {
        let dir = StateDir::lock(&config.state.dir)?;
        let loaded = dir.load()?;
        let fresh = loaded.is_none();
        let mut state = loaded.unwrap_or_default();
        let Seeded { taken, kept } = state.seed(&config.tenants);
        dir.save(&state)?;
        let audit = AuditLog::open(
            dir.path(),
            config.state.audit_max_entries,
            config.state.audit_max_age,
        )
        .map_err(|source| StateError::Dir {
            dir: dir.path().to_path_buf(),
            source,
        })?;
        let by = Actor {
            key_id: "file".into(),
            key_name: "configuration file".into(),
            address: String::new(),
            route: "start".into(),
        };
        for name in &taken {
            let mut entry = AuditEntry::new(
                &by,
                Some(name),
                serde_json::json!({"action": "tenant_put", "from": "configuration file"}),
                node,
            );
            entry.outcome = "applied".into();
            audit.record(entry);
        }
        for name in &kept {
            tracing::warn!(
                tenant = %name,
                "the configuration file's settings of this tenant are older than those changed \
                 through the admin API: the admin API's are kept (edit the file to take it again)"
            );
        }
        Ok(Self {
            dir,
            fresh,
            state: Mutex::new(state),
            last_used: DashMap::new(),
            audit,
        })
    }

    /// Gives the state directory up (the node stopped): changes that still
    /// arrive are refused.
    pub fn release(&self) {
        self.dir.release();
    }

    /// Where a cluster bus should start reading control records for this
    /// state: after the last one it took into account; from the first one
    /// the broker keeps for a state that knows no position (a new state
    /// directory, one of a node that ran without a cluster bus, or of one
    /// that stopped before it noted a position): the node reaches the
    /// cluster's state by applying them all, or from a snapshot if some
    /// are gone.
    pub fn resume(&self) -> ResumeControl {
        match lock(&self.state).control_position.clone() {
            Some(position) => ResumeControl::After(position),
            None => ResumeControl::FromStart,
        }
    }

    /// True if the state directory held no state before this start.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// A copy of the state, for a snapshot.
    pub fn state(&self) -> ControlState {
        lock(&self.state).clone()
    }

    /// Notes that an admin change kept at `position` was applied.
    pub async fn note_applied(&self, position: Option<ControlPosition>) -> Result<(), StateError> {
        self.update(move |s| {
            s.changes += 1;
            if position.is_some() {
                s.control_position = position;
            }
        })
        .await
    }

    /// Notes that every control record up to `position` was taken into
    /// account (none of them changed the state): a restart need not read
    /// them again. Written only when it moved.
    pub async fn note_read(&self, position: ControlPosition) -> Result<(), StateError> {
        if lock(&self.state).control_position.as_ref() == Some(&position) {
            return Ok(());
        }
        self.update(move |s| s.control_position = Some(position))
            .await
    }

    /// The tenants the state holds.
    pub fn tenants(&self) -> BTreeMap<String, TenantConfig> {
        lock(&self.state).tenants.clone()
    }

    /// Applies `change` to a copy of the state, writes the copy to disk,
    /// and only then makes it the state. Runs on the apply path, one at a
    /// time.
    pub async fn update<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut ControlState) -> T,
    ) -> Result<T, StateError> {
        if !self.dir.is_held() {
            return Err(StateError::Write {
                path: self.dir.path().to_path_buf(),
                source: std::io::Error::other("the node stopped and gave up its state directory"),
            });
        }
        let mut next = lock(&self.state).clone();
        let outcome = change(&mut next);
        let path = self.dir.path().to_path_buf();
        let next = tokio::task::spawn_blocking(move || {
            // Locking is the node's; writing needs only the path.
            super::state::save_in(&path, &next).map(|()| next)
        })
        .await
        .map_err(|err| StateError::Write {
            path: self.dir.path().to_path_buf(),
            source: std::io::Error::other(err),
        })??;
        *lock(&self.state) = next;
        Ok(outcome)
    }

    /// The key `presented` is, if any; notes its use.
    pub fn authenticate(&self, presented: &str) -> Option<KeyRecord> {
        let hash = keys::hash(presented);
        let state = lock(&self.state);
        let found = state
            .keys
            .values()
            .find(|key| bool::from(key.hash.as_bytes().ct_eq(hash.as_bytes())))
            .cloned()?;
        self.last_used
            .insert(found.id.clone(), crate::clock::now_micros() / 1000);
        Some(found)
    }

    /// The keys of `tenant` (every key for `None`), oldest first, with
    /// when each was last used on this node.
    pub fn keys(&self, tenant: Option<&str>) -> Vec<(KeyRecord, Option<u64>)> {
        let state = lock(&self.state);
        let mut keys: Vec<_> = state
            .keys_of(tenant)
            .map(|key| (key.clone(), self.last_used.get(&key.id).map(|at| *at)))
            .collect();
        keys.sort_by_key(|(key, _)| key.created_at_ms);
        keys
    }

    /// Whether key `id` exists, and its tenant.
    pub fn key(&self, id: &str) -> Option<KeyRecord> {
        lock(&self.state).keys.get(id).cloned()
    }
}
