//! Keeps the nodes of a cluster in step: announces this node's changes and
//! connections on the bus, and applies what the other nodes announce.
//!
//! - Admin changes (tenants, plugins) are validated and announced by the
//!   node that received them, then made there; every other node makes the
//!   same change when the event arrives.
//! - Connections: each node announces the connections it opens and closes,
//!   so that every node knows every user's connections and the per-user
//!   cap holds across the cluster (see [`crate::session`]).
//! - Nodes: heartbeats tell who is alive; a node that restarted, stopped or
//!   went silent no longer counts against anybody's cap.
//!
//! With the local bus there is nobody to tell, and none of this costs
//! anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::bus::{Bus, BusError, BusStatus};
use crate::config::TenantConfig;
use crate::control::{Change, ControlEvent};
use crate::metrics;
use crate::plugin::registry::PluginRegistry;
use crate::session::{CloseReason, ConnectionHandle, SessionManager};
use crate::tenant::TenantDirectory;

/// Connection announcements waiting to go out; past this they are dropped
/// (and counted): the cap is best effort while the bus is slow.
const CONNECTION_EVENTS_QUEUE: usize = 16_384;
/// Most announcements sent together.
const ANNOUNCE_BATCH: usize = 256;
/// A node not heard from for this many heartbeat intervals is gone.
const SILENT_HEARTBEATS: u32 = 10;

/// What this node knows of another one.
struct Peer {
    started_at_micros: u64,
    last_seen: Instant,
}

/// This node's part in the cluster.
pub struct Cluster {
    node: String,
    /// False on the local bus: nothing is announced.
    enabled: bool,
    heartbeat_interval: Duration,
    bus: Arc<dyn Bus>,
    tenants: Arc<TenantDirectory>,
    sessions: Arc<SessionManager>,
    plugins: Arc<PluginRegistry>,
    peers: DashMap<String, Peer>,
    connection_events: mpsc::Sender<ControlEvent>,
}

impl Cluster {
    /// This node's part, and the queue of its connection announcements
    /// for [`Cluster::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        enabled: bool,
        heartbeat_interval: Duration,
        bus: Arc<dyn Bus>,
        tenants: Arc<TenantDirectory>,
        sessions: Arc<SessionManager>,
        plugins: Arc<PluginRegistry>,
    ) -> (Self, mpsc::Receiver<ControlEvent>) {
        let (connection_events, outbox) = mpsc::channel(CONNECTION_EVENTS_QUEUE);
        let cluster = Self {
            node,
            enabled,
            heartbeat_interval,
            bus,
            tenants,
            sessions,
            plugins,
            peers: DashMap::new(),
            connection_events,
        };
        (cluster, outbox)
    }

    /// This node's name in the cluster.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Other nodes heard from recently.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Announces an admin change to the other nodes; `Ok` once the bus
    /// took it (at once on the local bus).
    pub async fn announce(&self, change: Change) -> Result<(), BusError> {
        if !self.enabled {
            return Ok(());
        }
        self.bus
            .announce(vec![ControlEvent {
                origin: self.node.clone(),
                change,
            }])
            .await
    }

    /// Tells the other nodes that this node opened `handle`.
    pub fn connection_opened(&self, handle: &ConnectionHandle) {
        self.queue_connection_event(Change::ConnectionOpened {
            tenant: handle.tenant().to_string(),
            user: handle.user().to_string(),
            connection: handle.id(),
            opened_at_micros: handle.opened_at_micros(),
        });
    }

    /// Tells the other nodes that `handle` ended.
    pub fn connection_closed(&self, handle: &ConnectionHandle) {
        self.queue_connection_event(Change::ConnectionClosed {
            tenant: handle.tenant().to_string(),
            user: handle.user().to_string(),
            connection: handle.id(),
        });
    }

    fn queue_connection_event(&self, change: Change) {
        if !self.enabled {
            return;
        }
        let event = ControlEvent {
            origin: self.node.clone(),
            change,
        };
        if self.connection_events.try_send(event).is_err() {
            ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => "dropped_announcement")
                .increment(1);
        }
    }

    /// Tells the other nodes that this node stopped (best effort).
    pub async fn announce_departure(&self) {
        if self.enabled
            && let Err(err) = self.announce(Change::NodeStopped).await
        {
            tracing::warn!(%err, "could not announce this node's departure");
        }
    }

    /// Sends this node's connection announcements, many at a time, in order.
    pub async fn send_connection_events(self: Arc<Self>, mut outbox: mpsc::Receiver<ControlEvent>) {
        let mut batch = Vec::with_capacity(ANNOUNCE_BATCH);
        while outbox.recv_many(&mut batch, ANNOUNCE_BATCH).await > 0 {
            let events = std::mem::take(&mut batch);
            if let Err(err) = self.bus.announce(events).await {
                tracing::debug!(%err, "connection announcements lost");
                ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => "dropped_announcement")
                    .increment(1);
            }
        }
    }

    /// Applies the other nodes' events until the bus stops, and forgets
    /// nodes that went silent.
    pub async fn run(self: Arc<Self>, mut events: mpsc::Receiver<ControlEvent>) {
        let mut sweep = tokio::time::interval(self.heartbeat_interval);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.apply(event).await,
                    None => return,
                },
                _ = sweep.tick() => self.forget_silent_peers(),
            }
        }
    }

    fn forget_silent_peers(&self) {
        // While this node hears nothing at all, silence says nothing of
        // the others.
        if self.bus.status() != BusStatus::Ready {
            return;
        }
        let silent = self.heartbeat_interval * SILENT_HEARTBEATS;
        self.peers.retain(|node, peer| {
            let alive = peer.last_seen.elapsed() < silent;
            if !alive {
                tracing::warn!(%node, "node went silent: its connections no longer count");
                self.sessions.forget_node(node, None);
            }
            alive
        });
    }

    async fn apply(&self, event: ControlEvent) {
        let ControlEvent { origin, change } = event;
        if origin == self.node {
            return;
        }
        let label = change.label();
        ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => label).increment(1);
        match change {
            Change::Heartbeat { started_at_micros } => {
                let mut peer = self.peers.entry(origin.clone()).or_insert_with(|| {
                    tracing::info!(node = %origin, "node joined");
                    Peer {
                        started_at_micros,
                        last_seen: Instant::now(),
                    }
                });
                if peer.started_at_micros != started_at_micros {
                    tracing::info!(node = %origin, "node restarted: its older connections are gone");
                    self.sessions.forget_node(&origin, Some(started_at_micros));
                    peer.started_at_micros = started_at_micros;
                }
                peer.last_seen = Instant::now();
            }
            Change::Barrier { .. } => {}
            Change::NodeStopped => {
                tracing::info!(node = %origin, "node left");
                self.peers.remove(&origin);
                self.sessions.forget_node(&origin, None);
            }
            Change::TenantPut {
                name,
                settings_json,
            } => {
                let applied = serde_json::from_str::<TenantConfig>(&settings_json)
                    .map_err(|err| err.to_string())
                    .and_then(|config| {
                        self.tenants
                            .upsert(&name, config)
                            .map_err(|err| err.to_string())
                    });
                match applied {
                    Ok(_) => {
                        tracing::info!(tenant = %name, node = %origin, "tenant changed on another node")
                    }
                    Err(err) => {
                        tracing::error!(tenant = %name, node = %origin, %err, "tenant change from another node refused")
                    }
                }
            }
            Change::TenantRemoved { name } => {
                if self.tenants.remove(&name) {
                    self.sessions
                        .close_tenant(&name, CloseReason::TenantRemoved);
                    tracing::info!(tenant = %name, node = %origin, "tenant removed on another node");
                }
            }
            Change::PluginInstalled {
                tenant,
                component,
                activate,
            } => {
                let plugins = self.plugins.clone();
                let name = tenant.clone();
                let installed = tokio::task::spawn_blocking(move || {
                    plugins.install(&name, &component, activate)
                })
                .await;
                match installed {
                    Ok(Ok(version)) => {
                        tracing::info!(%tenant, node = %origin, version = %version.version, activate, "plugin installed on another node")
                    }
                    Ok(Err(err)) => {
                        tracing::error!(%tenant, node = %origin, %err, "plugin from another node refused")
                    }
                    Err(err) => tracing::error!(%tenant, %err, "plugin install failed"),
                }
            }
            change @ (Change::PluginActivated { .. }
            | Change::PluginRolledBack { .. }
            | Change::PluginRemoved { .. }) => self.apply_plugin_change(&origin, change),
            Change::ConnectionOpened {
                tenant,
                user,
                connection,
                opened_at_micros,
            } => {
                if let Some(tenant) = self.tenants.snapshot().get(&tenant) {
                    self.sessions.remote_opened(
                        tenant,
                        &user,
                        &origin,
                        connection,
                        opened_at_micros,
                    );
                }
            }
            Change::ConnectionClosed {
                tenant,
                user,
                connection,
            } => self
                .sessions
                .remote_closed(&tenant, &user, &origin, connection),
        }
    }

    /// Activates, rolls back to or removes a version, as another node did.
    fn apply_plugin_change(&self, origin: &str, change: Change) {
        let label = change.label();
        let (tenant, result) = match change {
            Change::PluginActivated { tenant, version } => {
                let result = self.plugins.activate(&tenant, &version).map(drop);
                (tenant, result)
            }
            Change::PluginRolledBack { tenant, version } => {
                let result = self.plugins.roll_back_to(&tenant, &version).map(drop);
                (tenant, result)
            }
            Change::PluginRemoved { tenant, version } => {
                let result = self.plugins.remove(&tenant, &version);
                (tenant, result)
            }
            _ => return,
        };
        match result {
            Ok(()) => {
                tracing::info!(%tenant, node = %origin, change = label, "plugin change made on another node")
            }
            Err(err) => {
                tracing::error!(%tenant, node = %origin, change = label, %err, "plugin change from another node failed")
            }
        }
    }
}
