//! Snapshots of the control state on the control queue: how a node reaches
//! the cluster's state when the broker no longer keeps the admin changes it
//! lacks.
//!
//! The control queue is the log of admin changes, and a broker keeps its
//! log only so long (`fileReservedTime`, 72 h by default), dropping it a
//! segment at a time. A node that was down longer, or that joins a cluster
//! whose first changes are gone, finds a hole between where it stopped and
//! the first record the broker still has ([`Inbound::ControlLost`]).
//!
//! - Such a node **recovers**: it asks for a snapshot
//!   ([`Change::SnapshotWanted`]), keeps applying what is not an admin
//!   change, and holds the admin changes it reads. It does not report ready.
//! - One node that is caught up answers (the owner of the request among the
//!   live nodes other than the one asking; another one at the next attempt,
//!   every [`ASK_AGAIN_EVERY`]). When it reads the request — its state then
//!   holds exactly the records before it — it exports its state (the
//!   document of `pushgate state export`) and puts it on the control queue
//!   in parts ([`Change::SnapshotPart`]), made "as of" the request's
//!   position.
//! - The recovering node installs the first complete snapshot made as of a
//!   record it read itself (so that it holds every admin change after it),
//!   then applies the held changes that came after that record, in order,
//!   and is ready.
//! - The owner of the snapshot task among the caught-up nodes also writes
//!   one every `state.snapshot_every` (24 h by default; keep it below a third
//!   of the broker's retention): it puts a [`Change::SnapshotDue`] marker on
//!   the queue and, reading it back, sends a snapshot as of it. The broker
//!   then always keeps a marker with its snapshot, also when every node
//!   was down at once.
//!
//! A node whose state directory is new and that hears no answer (no node
//! is caught up: the whole cluster started at once past the retention)
//! starts from its configuration file and what the broker still keeps, as
//! before; a node that had a state stays unready and says why: restore it
//! from another node's export.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use super::backup::Backup;
use super::change::{Actor, Change, ControlEvent, SnapshotPart, TenantChange};
use super::{Applied, ApplyError, Cluster};
use crate::bus::ControlPosition;
use crate::plugin::hex_sha256;
use crate::sync::lock;

/// Bytes of a snapshot one part carries (a control record stays far below
/// `bus.rocketmq.max_batch_bytes`).
const PART_BYTES: usize = 256 * 1024;
/// How long a recovering node waits for a snapshot before it asks again
/// (another node answers the next attempt).
pub(crate) const ASK_AGAIN_EVERY: Duration = Duration::from_secs(10);
/// Attempts after which a node with a new state directory gives up waiting
/// and starts from its configuration file and what the broker keeps.
const ATTEMPTS_BEFORE_FILE: u32 = 3;
/// Snapshots being received at once; older ones are dropped.
const ASSEMBLING_AT_ONCE: usize = 4;
/// Largest snapshot a node takes in (its parts together).
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// A snapshot whose parts are arriving.
struct Assembling {
    as_of: ControlPosition,
    sha256: String,
    parts: Vec<Option<Vec<u8>>>,
    bytes: usize,
}

/// What a node that lacks admin changes keeps until it has a snapshot.
pub(crate) struct Recovery {
    /// The first control record read after the hole: a snapshot helps if
    /// it was made as of this record or a later one (which this node read
    /// too).
    first_read: ControlPosition,
    /// Admin changes read since, in order, to apply after the snapshot.
    held: Vec<(ControlEvent, ControlPosition, u64)>,
    /// Snapshots being received, by origin node and id.
    assembling: BTreeMap<(String, u64), Assembling>,
    attempt: u32,
    last_asked: Option<Instant>,
    /// The node's state directory was new when it started.
    fresh: bool,
}

impl Recovery {
    pub(crate) fn new(first_read: ControlPosition, fresh: bool) -> Self {
        Self {
            first_read,
            held: Vec::new(),
            assembling: BTreeMap::new(),
            attempt: 0,
            last_asked: None,
            fresh,
        }
    }

    /// True if a snapshot as of `as_of` covers everything before what this
    /// node read itself.
    fn usable(&self, as_of: &ControlPosition) -> bool {
        as_of.broker == self.first_read.broker
            && as_of.queue == self.first_read.queue
            && as_of.offset >= self.first_read.offset
    }

    /// Takes `part` in; the whole snapshot once every part arrived and it
    /// is usable.
    fn take_part(&mut self, origin: &str, part: SnapshotPart) -> Option<(ControlPosition, Backup)> {
        if part.count == 0 || part.index >= part.count || !self.usable(&part.as_of) {
            return None;
        }
        let key = (origin.to_owned(), part.id);
        if !self.assembling.contains_key(&key) && self.assembling.len() >= ASSEMBLING_AT_ONCE {
            let oldest = self.assembling.keys().next().cloned()?;
            self.assembling.remove(&oldest);
        }
        let assembling = self
            .assembling
            .entry(key.clone())
            .or_insert_with(|| Assembling {
                as_of: part.as_of.clone(),
                sha256: part.sha256.clone(),
                parts: vec![None; part.count as usize],
                bytes: 0,
            });
        if assembling.parts.len() != part.count as usize || assembling.sha256 != part.sha256 {
            return None;
        }
        assembling.bytes += part.bytes.len();
        if assembling.bytes > MAX_SNAPSHOT_BYTES {
            self.assembling.remove(&key);
            return None;
        }
        assembling.parts[part.index as usize] = Some(part.bytes);
        if assembling.parts.iter().any(Option::is_none) {
            return None;
        }
        let done = self.assembling.remove(&key)?;
        let whole: Vec<u8> = done.parts.into_iter().flatten().flatten().collect();
        if hex_sha256(&whole) != done.sha256 {
            tracing::warn!(node = %origin, "a snapshot did not match its checksum: ignored");
            return None;
        }
        match serde_json::from_slice::<Backup>(&whole) {
            Ok(backup) => Some((done.as_of, backup)),
            Err(err) => {
                tracing::warn!(node = %origin, %err, "an unreadable snapshot ignored");
                None
            }
        }
    }
}

/// Splits a snapshot's document into the parts that carry it.
fn parts(id: u64, as_of: &ControlPosition, document: &[u8]) -> Vec<SnapshotPart> {
    let sha256 = hex_sha256(document);
    let chunks: Vec<&[u8]> = document.chunks(PART_BYTES).collect();
    let count = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, bytes)| SnapshotPart {
            id,
            as_of: as_of.clone(),
            index: index as u32,
            count,
            sha256: sha256.clone(),
            bytes: bytes.to_vec(),
        })
        .collect()
}

impl Cluster {
    /// The bus no longer keeps the control records from `missing` on; this
    /// node read from `first_read`: it recovers from a snapshot.
    pub(super) fn start_recovery(&self, missing: &ControlPosition, first_read: u64) {
        let why = format!(
            "the broker no longer keeps the records {} to {} of the control queue {}/{}, which \
             this node had not applied: it waits for a snapshot of the cluster's state from a \
             running node (if none is running, restore its state directory from an export: \
             `pushgate state export` there, `pushgate state import` here, the node stopped)",
            missing.offset,
            first_read.saturating_sub(1),
            missing.broker,
            missing.queue
        );
        tracing::error!(%why, "this node misses admin changes: it does not report ready");
        *lock(&self.missing) = Some(why);
        let first_read = ControlPosition {
            offset: first_read,
            ..missing.clone()
        };
        *lock(&self.recovery) = Some(Recovery::new(first_read, self.from_empty_state));
    }

    /// True while this node waits for a snapshot.
    pub(super) fn recovering(&self) -> bool {
        lock(&self.recovery).is_some()
    }

    /// Holds an admin change read while recovering; `false` if not
    /// recovering (apply it).
    pub(super) fn hold_while_recovering(
        &self,
        event: &ControlEvent,
        position: &Option<ControlPosition>,
        stored_at_ms: u64,
    ) -> bool {
        let mut recovery = lock(&self.recovery);
        let (Some(recovery), Some(position)) = (recovery.as_mut(), position) else {
            return false;
        };
        if super::admin_changes::describe(&event.change.clone().into_current(&event.origin))
            .is_none()
        {
            return false;
        }
        recovery
            .held
            .push((event.clone(), position.clone(), stored_at_ms));
        true
    }

    /// Asks for a snapshot if it is time (at once, then every
    /// [`ASK_AGAIN_EVERY`]); a node with a new state directory gives up
    /// after a few attempts once it read all the broker keeps.
    pub(super) async fn ask_for_snapshot(&self) {
        let attempt = {
            let mut recovery = lock(&self.recovery);
            let Some(recovery) = recovery.as_mut() else {
                return;
            };
            if recovery
                .last_asked
                .is_some_and(|at| at.elapsed() < ASK_AGAIN_EVERY)
            {
                return;
            }
            if recovery.fresh
                && recovery.attempt >= ATTEMPTS_BEFORE_FILE
                && self
                    .own_probe_seen
                    .load(std::sync::atomic::Ordering::Acquire)
            {
                None
            } else {
                recovery.attempt += 1;
                recovery.last_asked = Some(Instant::now());
                Some(recovery.attempt)
            }
        };
        let Some(attempt) = attempt else {
            self.give_up_recovery().await;
            return;
        };
        tracing::info!(attempt, "asking the cluster for a snapshot of its state");
        let event = self.fact(Change::SnapshotWanted { attempt });
        if let Err(err) = self.bus.append_to_log(vec![event.encode()]).await {
            tracing::warn!(%err, "could not ask for a snapshot");
        }
    }

    /// A node with a new state directory heard no snapshot: it keeps its
    /// configuration file's state and applies what the broker still keeps.
    async fn give_up_recovery(&self) {
        let Some(recovery) = lock(&self.recovery).take() else {
            return;
        };
        tracing::error!(
            "no node sent a snapshot: this node's state starts from its configuration file and \
             the admin changes the broker still keeps; older ones are missing"
        );
        *lock(&self.missing) = None;
        for (event, position, stored_at_ms) in recovery.held {
            self.apply(event, Some(position), stored_at_ms).await;
        }
        self.mark_caught_up_if_probed();
    }

    /// Another node asked for a snapshot (the request read at `position`):
    /// this node answers if it is the one the attempt names and it has the
    /// whole state.
    pub(super) async fn snapshot_wanted(
        &self,
        origin: &str,
        attempt: u32,
        position: &Option<ControlPosition>,
    ) {
        if origin == self.node || !self.caught_up() || self.recovering() {
            return;
        }
        let task = format!("snapshot-{attempt}");
        if self.membership.owner_except(&task, origin) != *self.membership.this() {
            return;
        }
        if let Some(as_of) = position {
            tracing::info!(node = %origin, attempt, "sending a snapshot of the control state");
            self.send_snapshot(as_of.clone()).await;
        }
    }

    /// Puts the periodic snapshot's marker on the control queue if this
    /// node owns the task.
    pub(super) async fn periodic_snapshot(&self) {
        if !self.caught_up() || self.recovering() {
            return;
        }
        if self.membership.owner_except("snapshot-periodic", "") != *self.membership.this() {
            return;
        }
        let event = self.fact(Change::SnapshotDue);
        if let Err(err) = self.bus.append_to_log(vec![event.encode()]).await {
            tracing::warn!(%err, "could not start the periodic snapshot");
        }
    }

    /// This node's periodic marker came back (read at `position`): the
    /// snapshot is sent as of it.
    pub(super) async fn snapshot_due(&self, origin: &str, position: &Option<ControlPosition>) {
        if origin != self.node || !self.caught_up() || self.recovering() {
            return;
        }
        if let Some(as_of) = position {
            tracing::info!("writing the periodic snapshot of the control state");
            self.send_snapshot(as_of.clone()).await;
        }
    }

    /// Exports this node's state and puts it on the control queue, in
    /// parts, as of the record `as_of` being taken in: the state holds
    /// exactly the records before it.
    async fn send_snapshot(&self, as_of: ControlPosition) {
        let state = self.state.control.state();
        let store = self.state.plugins.store_dir().to_path_buf();
        let exported =
            tokio::task::spawn_blocking(move || super::backup::export_from(state, &store)).await;
        let backup = match exported {
            Ok(Ok(backup)) => backup,
            Ok(Err(err)) => {
                tracing::error!(%err, "cannot export the control state for a snapshot");
                return;
            }
            Err(err) => {
                tracing::error!(%err, "cannot export the control state for a snapshot");
                return;
            }
        };
        let document = serde_json::to_vec(&backup).expect("a backup serializes");
        let id = self
            .next_change
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parts = parts(id, &as_of, &document);
        let count = parts.len();
        let bus = self.bus.clone();
        let events: Vec<Vec<u8>> = parts
            .into_iter()
            .map(|part| self.fact(Change::SnapshotPart(part)).encode())
            .collect();
        // Sent beside the apply path, which goes on reading meanwhile.
        tokio::spawn(async move {
            for event in events {
                if let Err(err) = bus.append_to_log(vec![event]).await {
                    tracing::warn!(%err, "a snapshot was not sent whole");
                    return;
                }
            }
            ::metrics::counter!(crate::metrics::CONTROL_SNAPSHOTS, "event" => "sent").increment(1);
            tracing::info!(
                bytes = document.len(),
                parts = count,
                offset = as_of.offset,
                "snapshot of the control state sent"
            );
        });
    }

    /// Takes in a part of a snapshot; installs the snapshot once whole if
    /// this node is recovering and it covers what the node lacks.
    pub(super) async fn snapshot_part(&self, origin: &str, part: SnapshotPart) {
        let complete = {
            let mut recovery = lock(&self.recovery);
            let Some(recovery) = recovery.as_mut() else {
                return;
            };
            recovery.take_part(origin, part)
        };
        let Some((as_of, backup)) = complete else {
            return;
        };
        let Some(recovery) = lock(&self.recovery).take() else {
            return;
        };
        match self.install_snapshot(origin, &as_of, backup).await {
            Ok(()) => {
                ::metrics::counter!(crate::metrics::CONTROL_SNAPSHOTS, "event" => "installed")
                    .increment(1);
                tracing::info!(
                    node = %origin,
                    offset = as_of.offset,
                    "installed a snapshot of the cluster's control state"
                );
                *lock(&self.missing) = None;
            }
            Err(err) => {
                tracing::error!(%err, "cannot install a snapshot: this node stays unready");
                *lock(&self.missing) = Some(format!("a snapshot could not be installed: {err}"));
                return;
            }
        }
        for (event, position, stored_at_ms) in recovery.held {
            if position.offset > as_of.offset {
                self.apply(event, Some(position), stored_at_ms).await;
            }
        }
        self.mark_caught_up_if_probed();
    }

    /// Makes this node's control state the snapshot's: tenants, keys,
    /// plugins and their rollouts; removed tenants go as a removal does.
    async fn install_snapshot(
        &self,
        origin: &str,
        as_of: &ControlPosition,
        backup: Backup,
    ) -> Result<(), ApplyError> {
        let by = Actor::node(origin, "snapshot");
        let here = self.state.control.tenants();
        for name in here
            .keys()
            .filter(|name| !backup.state.tenants.contains_key(*name))
        {
            self.apply_tenant(TenantChange::Removed { name: name.clone() })
                .await?;
        }
        for (name, config) in &backup.state.tenants {
            let same = here.get(name).is_some_and(|kept| {
                serde_json::to_value(kept).ok() == serde_json::to_value(config).ok()
            });
            if !same {
                let settings_json = serde_json::to_string(config).expect("settings serialize");
                self.apply_tenant(TenantChange::Put {
                    name: name.clone(),
                    settings_json,
                })
                .await?;
            }
        }
        let decoded = backup.components().map_err(|_| {
            ApplyError::Malformed("a snapshot's plugins do not match their tenants or versions")
        })?;
        let mut components: BTreeMap<String, _> = decoded
            .into_iter()
            .map(|(tenant, versions)| {
                let rollout = backup.plugins[&tenant].state.clone();
                (tenant, (rollout, versions))
            })
            .collect();
        let registry = self.state.plugins.clone();
        let tenants: Vec<String> = backup.state.tenants.keys().cloned().collect();
        tokio::task::spawn_blocking(move || {
            for tenant in tenants {
                match components.remove(&tenant) {
                    Some((rollout, versions)) => {
                        registry.replace_tenant(&tenant, &rollout, &versions)?
                    }
                    None => registry.remove_tenant(&tenant),
                }
            }
            Ok::<_, ApplyError>(())
        })
        .await
        .map_err(|err| ApplyError::Node(err.to_string()))??;
        for tenant in backup.state.tenants.keys() {
            self.prewarm(tenant);
        }
        let (keys, changes, position) = (backup.state.keys, backup.state.changes, as_of.clone());
        self.state
            .control
            .update(move |s| {
                s.keys = keys;
                s.changes = changes;
                s.control_position = Some(position);
            })
            .await?;
        let what = json!({"action": "snapshot_installed", "as_of": as_of});
        self.audit(&by, &what, None, &Ok(Applied::Noted));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(offset: u64) -> ControlPosition {
        ControlPosition {
            broker: "b".into(),
            queue: 0,
            offset,
        }
    }

    #[test]
    fn a_snapshot_is_whole_only_with_every_part_and_only_if_it_covers_the_hole() {
        let backup = Backup {
            format: 1,
            exported_at_ms: 1,
            state: Default::default(),
            plugins: BTreeMap::new(),
        };
        let document = serde_json::to_vec(&backup).unwrap();
        let mut big = document.clone();
        big.resize(PART_BYTES * 2 + 10, b' ');
        let split = parts(7, &position(41), &big);
        assert_eq!(split.len(), 3);

        // Made before the first record this node read: of no use.
        let mut recovery = Recovery::new(position(42), false);
        for part in split.clone() {
            assert!(recovery.take_part("a", part).is_none());
        }

        let mut recovery = Recovery::new(position(41), false);
        let mut parts_in = split.clone();
        let last = parts_in.remove(1);
        for part in parts_in {
            assert!(recovery.take_part("a", part).is_none());
        }
        let (as_of, _) = recovery.take_part("a", last).expect("whole");
        assert_eq!(as_of, position(41));

        // A damaged part is caught by the checksum.
        let mut recovery = Recovery::new(position(41), false);
        let mut damaged = split;
        damaged[2].bytes[0] ^= 1;
        for part in damaged {
            assert!(recovery.take_part("a", part).is_none());
        }
    }
}
