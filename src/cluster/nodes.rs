//! The nodes of the cluster as this node knows them: who is alive (their
//! probes), who joined, restarted, stopped or went silent — and what a
//! node gone means for the rest (its connections no longer count, its
//! users have new owners, to whom this node announces its connections
//! again). A node leaving, however it leaves, goes through
//! [`Cluster::node_gone`].

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::connections::opened;
use super::ownership::View;
use super::{Change, Cluster, ControlEvent, SILENT_HEARTBEATS};
use crate::bus::BusStatus;
use crate::bus::envelope::RoutingReport;
use crate::delivery::{ConnectionHandle, SessionManager};
use crate::metrics;
use crate::sync::lock;

/// What this node knows of another one.
pub(super) struct Peer {
    pub(super) started_at_micros: u64,
    pub(super) last_seen: Instant,
}

/// How a node left.
#[derive(Debug, Clone, Copy)]
pub(super) enum NodeGone {
    /// It said so as it stopped.
    Stopped,
    /// Nothing heard of it for [`SILENT_HEARTBEATS`] heartbeats.
    Silent,
    /// It came back under its name, having lost what it kept: a new run.
    Restarted { started_at_micros: u64 },
}

impl Cluster {
    /// Forgets what node `node` held — its connections no longer count
    /// against anybody's cap — and takes in the new membership.
    pub(super) fn node_gone(&self, node: &str, how: NodeGone) {
        self.forget_figures_of(node);
        match how {
            NodeGone::Stopped => {
                tracing::info!(%node, "node left");
                self.peers.remove(node);
                self.state.remote.forget_node(node, None);
                self.forget_locations_of(node, None);
                self.membership_changed(None);
                self.forget_pusher_node(node);
            }
            NodeGone::Silent => {
                tracing::warn!(%node, "node went silent: its connections no longer count");
                self.peers.remove(node);
                self.state.remote.forget_node(node, None);
                self.forget_locations_of(node, None);
                self.membership_changed(None);
                self.forget_pusher_node(node);
            }
            NodeGone::Restarted { started_at_micros } => {
                tracing::info!(%node, "node restarted: its older connections are gone");
                self.state.remote.forget_node(node, Some(started_at_micros));
                self.forget_locations_of(node, Some(started_at_micros));
                self.membership_changed(Some(node));
                self.forget_pusher_node(node);
            }
        }
    }

    pub(super) fn peer_alive(
        &self,
        node: String,
        started_at_micros: u64,
        routing: Option<RoutingReport>,
    ) {
        if let Some(locations) = &self.locations {
            locations.peer_reported(&node, routing);
        }
        ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => "heartbeat").increment(1);
        let mut joined = false;
        let restarted = {
            let mut peer = self.peers.entry(node.clone()).or_insert_with(|| {
                tracing::info!(%node, "node joined");
                joined = true;
                Peer {
                    started_at_micros,
                    last_seen: Instant::now(),
                }
            });
            peer.last_seen = Instant::now();
            let restarted = peer.started_at_micros != started_at_micros;
            peer.started_at_micros = started_at_micros;
            restarted
        };
        if restarted {
            self.node_gone(&node, NodeGone::Restarted { started_at_micros });
        } else if joined {
            self.membership_changed(None);
        }
    }

    pub(super) fn forget_silent_peers(&self) {
        // While this node hears nothing at all, silence says nothing of
        // the others.
        if self.bus.status() != BusStatus::Ready {
            return;
        }
        let silent_for = self.heartbeat_interval * SILENT_HEARTBEATS;
        let silent: Vec<String> = self
            .peers
            .iter()
            .filter(|peer| peer.last_seen.elapsed() >= silent_for)
            .map(|peer| peer.key().clone())
            .collect();
        for node in silent {
            self.node_gone(&node, NodeGone::Silent);
        }
    }

    /// Takes in a change of the live nodes (`restarted`: a node that came
    /// back under its name, and lost what it kept): forgets the lists of
    /// users this node no longer owns, and announces again this node's
    /// connections whose user has a new owner, or an owner that restarted.
    pub(super) fn membership_changed(&self, restarted: Option<&str>) {
        self.change_membership(restarted);
        self.recheck_online_users();
    }

    fn change_membership(&self, restarted: Option<&str>) {
        let peers: Vec<String> = self.peers.iter().map(|peer| peer.key().clone()).collect();
        let (before, after) = match self.membership.set_peers(peers.iter().map(String::as_str)) {
            Some(views) => views,
            None if restarted.is_some() => (self.membership.view(), self.membership.view()),
            None => return,
        };
        ::metrics::gauge!(metrics::CLUSTER_NODES).set(after.len() as f64);
        let this = self.membership.this().clone();
        self.state
            .remote
            .retain_users(|tenant, user| *after.owner(tenant, user) == this);
        // A routing node announces all of its connections to a node that
        // joined or restarted: that node routes pushes by them.
        let newcomer =
            self.locations.is_some() && (after.len() > before.len() || restarted.is_some());
        let moved: Vec<ConnectionHandle> = self
            .state
            .sessions
            .all_connections()
            .into_iter()
            .filter(|handle| {
                let owner = after.owner(handle.tenant(), handle.user());
                newcomer
                    || *owner != this
                        && (before.owner(handle.tenant(), handle.user()) != owner
                            || restarted.is_some_and(|node| **owner == *node))
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        tracing::info!(
            connections = moved.len(),
            nodes = after.len(),
            "announcing connections to their users' new owners"
        );
        self.announce_again_in_background(moved, after);
    }

    /// Announces `handles` again to their users' owners in `view`, in the
    /// background (see [`announce_again`]).
    pub(super) fn announce_again_in_background(&self, handles: Vec<ConnectionHandle>, view: View) {
        tokio::spawn(announce_again(
            handles,
            view,
            self.node.clone(),
            self.connection_events.clone(),
            self.announce_gate.clone(),
            self.state.sessions.clone(),
        ));
    }

    /// Forgets where `node`'s connections were (those opened before
    /// `opened_before_micros` only, when it restarted).
    fn forget_locations_of(&self, node: &str, opened_before_micros: Option<u64>) {
        if let Some(locations) = &self.locations {
            locations.forget_node(node, opened_before_micros);
            if opened_before_micros.is_none() {
                locations.peer_gone(node);
            }
        }
    }

    /// Tells the other nodes that this node stopped (best effort).
    pub(crate) async fn announce_departure(&self) {
        if !self.replicates_connections {
            return;
        }
        let event = self.fact(Change::NodeStopped);
        if let Err(err) = self.bus.announce(vec![event.encode()]).await {
            tracing::warn!(%err, "could not announce this node's departure");
        }
    }
}

/// Announces `moved` (this node's connections whose users have a new
/// owner in `view`) to those owners, waiting for room in the outbox rather
/// than dropping any. A connection that closed meanwhile is skipped: the
/// gate orders each check with the close's own announcement.
pub(super) async fn announce_again(
    moved: Vec<ConnectionHandle>,
    view: View,
    origin: String,
    outbox: mpsc::Sender<ControlEvent>,
    gate: Arc<Mutex<()>>,
    sessions: Arc<SessionManager>,
) {
    for handle in moved {
        let Ok(room) = outbox.reserve().await else {
            return;
        };
        let _gate = lock(&gate);
        let mut still_open = false;
        sessions.for_each_of_user(handle.tenant(), handle.user(), |held| {
            still_open |= held.id() == handle.id();
        });
        if still_open {
            room.send(ControlEvent {
                origin: origin.clone(),
                id: 0,
                change: opened(view.owner(handle.tenant(), handle.user()), &handle),
            });
        }
    }
}
