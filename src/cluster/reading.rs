//! This node's loop over what the bus hands the cluster part: control
//! records in order (a snapshot's request or part, an admin change held
//! while recovering, anything else applied), lost records, probes; and
//! its periodic work — forgetting silent nodes, noting how far it read,
//! writing and asking for snapshots.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::change::ConnectionFact;
use super::locations::Announcement;
use super::{Change, Cluster, ControlEvent, NOTE_POSITION_EVERY};
use crate::bus::{ControlPosition, Inbound};
use crate::metrics;
use crate::sync::lock;

impl Cluster {
    /// Applies what arrives from the bus until it stops, and forgets nodes
    /// that went silent.
    pub(crate) async fn run(self: Arc<Self>, mut inbound: mpsc::Receiver<Inbound>) {
        let mut sweep = tokio::time::interval(self.heartbeat_interval);
        let mut note_position = tokio::time::interval(NOTE_POSITION_EVERY);
        let mut snapshots = tokio::time::interval_at(
            tokio::time::Instant::now() + self.snapshot_every,
            self.snapshot_every,
        );
        let mut ask_for_snapshot = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                next = inbound.recv() => match next {
                    Some(Inbound::Control { record, position, stored_at_ms }) => {
                        match ControlEvent::decode(&record) {
                            Ok(event) => {
                                let announcement = self.announcement(&event);
                                self.take_record(event, &position, stored_at_ms).await;
                                self.routing_applied(position.as_ref(), announcement);
                            }
                            Err(err) => {
                                tracing::warn!(%err, "unreadable control record ignored");
                                ::metrics::counter!(metrics::ENVELOPES_REJECTED, "reason" => "malformed")
                                    .increment(1);
                            }
                        }
                        // What a recovering node read is not taken into
                        // account before its snapshot is installed.
                        if position.is_some() && !self.recovering() {
                            *lock(&self.last_read) = position;
                        }
                    }
                    Some(Inbound::ControlLost { missing, first_read }) => {
                        self.start_recovery(&missing, first_read);
                    }
                    Some(Inbound::OwnProbe) => {
                        self.own_probe_seen.store(true, Ordering::Release);
                        self.mark_caught_up_if_probed();
                    }
                    Some(Inbound::PeerProbe { node, started_at_micros, routing }) => {
                        self.peer_alive(node, started_at_micros, routing);
                    }
                    None => return,
                },
                // On the local bus there are no peers: no periodic work.
                _ = sweep.tick(), if self.replicates_connections => self.forget_silent_peers(),
                _ = snapshots.tick(), if self.replicates_connections => self.periodic_snapshot().await,
                _ = ask_for_snapshot.tick(), if self.recovering() => self.ask_for_snapshot().await,
                _ = note_position.tick(), if self.replicates_connections => {
                    let last_read = lock(&self.last_read).clone();
                    if let Some(position) = last_read
                        && let Err(err) = self.state.control.note_read(position).await
                    {
                        tracing::warn!(%err, "cannot note how far this node read the control records");
                    }
                }
            }
        }
    }

    /// Takes one control record in: a snapshot's request or part, an
    /// admin change held while recovering, or anything else applied.
    pub(super) async fn take_record(
        &self,
        event: ControlEvent,
        position: &Option<ControlPosition>,
        stored_at_ms: u64,
    ) {
        match event.change {
            Change::SnapshotWanted { attempt } => {
                self.snapshot_wanted(&event.origin, attempt, position).await;
            }
            Change::SnapshotDue => self.snapshot_due(&event.origin, position).await,
            Change::SnapshotPart(part) => self.snapshot_part(&event.origin, part).await,
            _ if self.hold_while_recovering(&event, position, stored_at_ms) => {}
            _ => self.apply(event, position.clone(), stored_at_ms).await,
        }
    }

    /// What `event` announces of a connection, for the routing fence.
    fn announcement(&self, event: &ControlEvent) -> Option<Announcement> {
        let own = event.origin == self.node;
        match &event.change {
            Change::ConnectionHeld { connection, .. } if own => {
                Some(Announcement::Own(vec![*connection]))
            }
            Change::ConnectionHeld { .. } | Change::ConnectionOpened { .. } => {
                Some(Announcement::Others)
            }
            Change::Connections(facts) => {
                let mut held = facts.iter().filter_map(|fact| match fact {
                    ConnectionFact::Held {
                        connection,
                        awaited,
                        ..
                    } => Some((*connection, *awaited)),
                    ConnectionFact::Closed { .. } => None,
                });
                if own {
                    let ids: Vec<u64> = held.map(|(id, _)| id).collect();
                    (!ids.is_empty()).then_some(Announcement::Own(ids))
                } else {
                    // Others' fences matter only to a connection waiting
                    // for them.
                    let awaited = held.any(|(_, awaited)| awaited);
                    awaited.then_some(Announcement::Others)
                }
            }
            _ => None,
        }
    }

    /// Notes for the routing fence that the record at `position` was
    /// applied (see [`super::locations`]).
    fn routing_applied(
        &self,
        position: Option<&ControlPosition>,
        announcement: Option<Announcement>,
    ) {
        if let (Some(locations), Some(position)) = (&self.locations, position) {
            locations.applied(position, announcement);
        }
    }

    /// Reports ready once the own probe came back and nothing is missing.
    pub(super) fn mark_caught_up_if_probed(&self) {
        if self.own_probe_seen.load(Ordering::Acquire)
            && self.missing_changes().is_none()
            && !self.caught_up.swap(true, Ordering::AcqRel)
        {
            tracing::info!("caught up with the cluster's control records");
        }
    }
}
