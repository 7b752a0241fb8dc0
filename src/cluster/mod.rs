//! Keeps the nodes of a cluster in step, and is the one place where a
//! change to tenants or plugins is made.
//!
//! - Changes: the admin API hands a [`Change`] to [`Cluster::submit`],
//!   which puts it on the bus. Every node — this one included, on the
//!   local bus too — applies it when it comes back, in the order the bus
//!   delivers it, with [`Cluster::apply`]; the request that made it is
//!   answered with this node's outcome. Nodes apply the same changes in the
//!   same order to the same state, so they converge: two concurrent `PUT`s
//!   of one tenant end with the same settings everywhere, and a change that
//!   fails here fails alike on every node. Each admin domain (tenants,
//!   plugins, keys) is applied by its own function in [`admin_changes`];
//!   a node that lacks changes the broker dropped takes a snapshot
//!   ([`snapshot`]).
//! - Connections ([`connections`]): each user has an owner node among the live ones
//!   ([`ownership`]). A node announces the connections it opens and closes
//!   to their users' owners; an owner keeps its users' lists (see
//!   [`remote`]), holds the per-user cap across the cluster and answers
//!   presence for them. When the live nodes change, each node announces
//!   again the connections whose user has a new owner.
//! - Nodes ([`nodes`]): the bus's probes tell who is alive; a node that
//!   restarted, stopped or went silent — one path for all three — no
//!   longer counts against anybody's cap.
//!
//! Knows nothing of HTTP, sockets or bus engines: it reads and writes
//! opaque control records through the [`Bus`] trait.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};

mod admin_changes;
mod apply;
pub mod audit;
pub mod backup;
pub mod change;
mod connections;
pub mod control;
pub(crate) mod figures;
pub mod keys;
mod lifecycle;
mod locations;
mod nodes;
pub(crate) mod ownership;
mod placements;
mod pusher;
mod reading;
pub(crate) mod remote;
mod snapshot;
pub mod state;

use crate::bus::{Bus, BusError, ControlPosition};
use crate::clock::now_micros;
use crate::delivery::SessionManager;
use crate::delivery::dispatch::Lanes;
use crate::metrics;
use crate::plugin::CompiledPlugin;
use crate::plugin::registry::{PluginRegistry, RegistryError, VersionInfo};
use crate::sync::lock;
use crate::tenant::{MAX_USER_BYTES, TenantDirectory, Upserted};
pub(crate) use change::{Change, ControlEvent};
use change::{ConnectionRef, HeldConnection};
use control::ControlStore;
use keys::KeyRecord;
use nodes::Peer;
use ownership::Membership;
use remote::RemoteConnections;
use state::StateError;

/// Connection announcements waiting to go out; past this they are dropped
/// (and counted), and every connection of the node is announced again once
/// the queue has room (see [`Cluster::send_connection_events`]).
const CONNECTION_EVENTS_QUEUE: usize = 16_384;
/// The first wait before a batch of announcements the bus did not take is
/// sent again, doubled up to [`ANNOUNCE_RETRY_MOST`].
const ANNOUNCE_RETRY_FIRST: Duration = Duration::from_millis(100);
const ANNOUNCE_RETRY_MOST: Duration = Duration::from_secs(5);
/// Most announcements sent together.
const ANNOUNCE_BATCH: usize = 256;
/// A node not heard from for this many heartbeat intervals is gone.
const SILENT_HEARTBEATS: u32 = 10;
/// Heartbeats after its start before a node routes pushes to their users'
/// nodes: by then it has heard every other node (a node goes silent after
/// ten) and their connections announced again to it.
const ROUTING_SETTLES_HEARTBEATS: u32 = 5;
/// Heartbeats of silence after which a node no longer holds back the
/// routing fence of a new connection (see [`locations`]): by then it has
/// stopped, or every send it had started has ended (three send timeouts
/// at most: 9 s, within five heartbeats at the defaults).
const FENCE_SILENT_HEARTBEATS: u32 = 5;
/// How long a request waits for its change to come back through the bus.
const CHANGE_ROUND_TRIP: Duration = Duration::from_secs(30);
/// How often a node notes how far it read the control records (when it
/// moved): what a restart reads again.
const NOTE_POSITION_EVERY: Duration = Duration::from_secs(30);
/// How long a question waits for the owner's answer through the bus.
const ANSWER_ROUND_TRIP: Duration = Duration::from_secs(5);
/// Users one presence question may name.
pub(crate) const MAX_PRESENCE_USERS: usize = 1_000;

/// How often a node does its periodic work.
pub(crate) struct Timing {
    /// Probes: a node not heard from for [`SILENT_HEARTBEATS`] of them is gone.
    pub(crate) heartbeat_interval: Duration,
    /// Snapshots of the control state (`state.snapshot_every`).
    pub(crate) snapshot_every: Duration,
    /// This node's figures, shared (`admin.figures_every`).
    pub(crate) figures_every: Duration,
}

/// The state that changes apply to.
pub(crate) struct Replicated {
    pub(crate) tenants: Arc<TenantDirectory>,
    pub(crate) sessions: Arc<SessionManager>,
    pub(crate) plugins: Arc<PluginRegistry>,
    pub(crate) remote: Arc<RemoteConnections>,
    pub(crate) lanes: Arc<Lanes>,
    /// What the admin API changed, on disk; keys; the audit trail.
    pub(crate) control: Arc<ControlStore>,
    /// Who is on each Pusher channel, across the cluster.
    pub(crate) channels: Arc<crate::pusher::channels::Channels>,
}

/// What applying a change made of it, for the request that asked for it.
#[derive(Debug)]
pub(crate) enum Applied {
    Tenant(Upserted),
    TenantRemoved,
    Plugin(VersionInfo),
    PluginRemoved,
    Key(KeyRecord),
    KeyRevoked,
    /// A fact about connections or nodes.
    Noted,
    /// Connections of this node the change touched.
    Connections(usize),
}

/// One live connection of a user, on some node.
#[derive(Debug, Clone)]
pub(crate) struct LiveConnection {
    pub(crate) node: Arc<str>,
    pub(crate) id: u64,
    pub(crate) opened_at_micros: u64,
}

/// Longest reason a canary rollback may carry.
pub(crate) const MAX_ROLLBACK_REASON_BYTES: usize = 1_024;

/// Topics one subscriptions change may name.
pub(crate) const MAX_TOPICS_PER_CHANGE: usize = 64;

/// A user id from the bus is held to the push API's bounds.
fn check_user(user: &str) -> Result<(), ApplyError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES {
        return Err(ApplyError::Malformed("a user id is 1 to 256 bytes"));
    }
    Ok(())
}

/// Why a change was not made (the same on every node).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("invalid tenant settings: {0}")]
    InvalidTenant(String),
    #[error("no tenant {0:?}")]
    NoTenant(String),
    #[error(transparent)]
    Plugin(#[from] RegistryError),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("no key {0:?}")]
    NoKey(String),
    /// This node could not keep the change on disk: it did not make it.
    #[error(transparent)]
    State(#[from] StateError),
    #[error("this node failed while applying the change: {0}")]
    Node(String),
    /// A field no node would have sent (a forged or corrupt event).
    #[error("malformed change: {0}")]
    Malformed(&'static str),
}

/// Why a question about connections has no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("node {0:?}, which keeps these users' connections, did not answer within {1:?}")]
    NoAnswer(Arc<str>, Duration),
}

/// Why a submitted change has no outcome to report.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubmitError {
    /// The bus did not take it: it was made nowhere.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Every node refused it alike.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    /// The bus took it but it has not come back to this node yet: it will
    /// be applied when it does.
    #[error(
        "the cluster bus took the change but this node has not received it back within {0:?}; \
         it is applied when it arrives"
    )]
    NotBackYet(Duration),
}

/// A change of this node's on its way through the bus.
struct Pending {
    reply: oneshot::Sender<Result<Applied, ApplyError>>,
    /// The plugin compiled while validating the upload, so that this node
    /// does not compile it twice.
    prepared: Option<Arc<CompiledPlugin>>,
}

/// Removes entry `id` of a table of waiting requests (changes on their
/// way, questions) when dropped, however the waiting ended.
struct Forget<'a, V> {
    waiting: &'a Mutex<HashMap<u64, V>>,
    id: u64,
}

impl<V> Drop for Forget<'_, V> {
    fn drop(&mut self) {
        lock(self.waiting).remove(&self.id);
    }
}

/// This node's part in the cluster.
pub struct Cluster {
    node: String,
    /// The live nodes, and which of them owns a user.
    membership: Membership,
    /// Held while one connection announcement is checked and queued, so
    /// that a connection's close is never queued before an announcement
    /// of it that the same moment re-announces.
    announce_gate: Arc<Mutex<()>>,
    /// Set when an announcement found the outbox full and was dropped.
    announcements_dropped: AtomicBool,
    /// Questions of this node waiting for their answer, by id.
    questions: Mutex<HashMap<u64, oneshot::Sender<Vec<Vec<HeldConnection>>>>>,
    /// False on the local bus: connections are not announced.
    replicates_connections: bool,
    heartbeat_interval: Duration,
    bus: Arc<dyn Bus>,
    state: Replicated,
    peers: DashMap<String, Peer>,
    connection_events: mpsc::Sender<ControlEvent>,
    next_change: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Topics one connection may have (`websocket.max_topics_per_connection`),
    /// also when a service subscribes it.
    max_topics: usize,
    /// When this node started: control records stored before are history
    /// (read again to catch up with admin changes), not news.
    started_at_ms: u64,
    /// False until every control record stored before this node's start
    /// was applied (see [`Cluster::caught_up`]).
    caught_up: AtomicBool,
    /// The position of the last control record applied.
    last_read: Mutex<Option<ControlPosition>>,
    /// Set when the bus no longer keeps control records this node had not
    /// applied: it does not report ready (see [`Cluster::missing_changes`]).
    missing: Mutex<Option<String>>,
    /// This node started with an empty state directory.
    from_empty_state: bool,
    /// Set while this node lacks admin changes the broker no longer keeps
    /// and waits for a snapshot (see [`snapshot`]).
    recovery: Mutex<Option<snapshot::Recovery>>,
    /// This node's own first probe came back: it read every control record
    /// stored before it.
    own_probe_seen: AtomicBool,
    /// How often the owner of the task writes a snapshot.
    snapshot_every: Duration,
    /// Banned users, by tenant and user: until when (ms since the epoch).
    bans: DashMap<(String, String), u64>,
    /// This node's and the other nodes' latest figures of each tenant.
    figures: figures::Figures,
    /// Users this node owns that it told the webhooks are online (see
    /// [`lifecycle`]).
    online: DashMap<(String, String), ()>,
    /// Where every user's connections are, when the bus routes pushes to
    /// them (see [`locations`]).
    locations: Option<Arc<locations::Locations>>,
}

impl Cluster {
    /// This node's part, and the queue of its connection announcements
    /// for [`Cluster::send_connection_events`].
    pub(crate) fn new(
        node: String,
        timing: Timing,
        bus: Arc<dyn Bus>,
        state: Replicated,
        max_topics: usize,
    ) -> (Self, mpsc::Receiver<ControlEvent>) {
        let Timing {
            heartbeat_interval,
            snapshot_every,
            figures_every,
        } = timing;
        let (connection_events, outbox) = mpsc::channel(CONNECTION_EVENTS_QUEUE);
        let evictions = connection_events.clone();
        let origin = node.clone();
        state
            .remote
            .on_evict(Box::new(move |tenant, user, holder, id| {
                let event = ControlEvent {
                    origin: origin.clone(),
                    id: 0,
                    change: Change::CapExceeded {
                        tenant: tenant.to_owned(),
                        user: user.to_owned(),
                        connection: ConnectionRef {
                            node: holder.to_owned(),
                            id,
                        },
                    },
                };
                if evictions.try_send(event).is_err() {
                    ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => "dropped_announcement")
                        .increment(1);
                }
            }));
        ::metrics::gauge!(metrics::CLUSTER_NODES).set(1.0);
        let replicates_connections = bus.reaches_other_nodes();
        let locations = Arc::new(locations::Locations::new(
            heartbeat_interval * ROUTING_SETTLES_HEARTBEATS,
            heartbeat_interval * FENCE_SILENT_HEARTBEATS,
        ));
        let router = Arc::new(locations::SharedLocations(locations.clone()));
        let locations = bus.route_with(router).then_some(locations);
        let cluster = Self {
            locations,
            membership: Membership::new(&node),
            announce_gate: Arc::default(),
            announcements_dropped: AtomicBool::new(false),
            questions: Mutex::default(),
            node,
            replicates_connections,
            heartbeat_interval,
            bus,
            peers: DashMap::new(),
            connection_events,
            // A restarted node under the same name never reuses an id
            // that may still be on its way.
            next_change: AtomicU64::new(now_micros()),
            pending: Mutex::new(HashMap::new()),
            max_topics,
            started_at_ms: now_micros() / 1000,
            // On the local bus there is nothing to catch up with.
            caught_up: AtomicBool::new(!replicates_connections),
            last_read: Mutex::new(None),
            missing: Mutex::new(None),
            from_empty_state: state.control.fresh(),
            recovery: Mutex::new(None),
            own_probe_seen: AtomicBool::new(false),
            snapshot_every,
            bans: DashMap::new(),
            figures: figures::Figures::new(figures_every),
            online: DashMap::new(),
            state,
        };
        (cluster, outbox)
    }

    /// This node's name in the cluster.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// What the admin API changed, the keys, the audit trail.
    pub(crate) fn control(&self) -> &ControlStore {
        &self.state.control
    }

    /// True once this node applied every admin change the cluster made
    /// before it started (also those made while it was down): it reports
    /// ready only then.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Why this node lacks admin changes, if it does: the broker no longer
    /// keeps control records it had not applied (it was down, or its state
    /// directory is new, for longer than the broker keeps messages).
    pub fn missing_changes(&self) -> Option<String> {
        lock(&self.missing).clone()
    }

    /// Other nodes heard from recently.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Connections other nodes hold of the `tenant`'s users this node
    /// owns: what this node keeps of other nodes' connections.
    pub(crate) fn owned_users_connections_elsewhere(&self, tenant: &str) -> usize {
        self.state.remote.count(tenant)
    }

    /// The node that owns `user` of `tenant` as this node sees the cluster.
    pub(crate) fn owner(&self, tenant: &str, user: &str) -> Arc<str> {
        self.membership.owner(tenant, user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::local::LocalBus;
    use crate::config::Config;
    use crate::plugin::PluginHost;

    /// A cluster part on the local bus with tenant `acme`, its plugin store
    /// in `store`.
    fn cluster(store: &std::path::Path) -> Cluster {
        let mut config = Config::from_toml("[tenants.acme]\nauth = \"development\"").unwrap();
        config.state.dir = store.with_file_name("state");
        let control = Arc::new(ControlStore::open(&config, "n").unwrap());
        let tenants = Arc::new(TenantDirectory::from_config(&config).unwrap());
        let remote = Arc::new(RemoteConnections::new("n"));
        let plugins =
            PluginRegistry::open(PluginHost::new().unwrap(), store.to_path_buf()).unwrap();
        let (bus, _envelopes, _inbound) = LocalBus::new(8);
        let state = Replicated {
            tenants,
            sessions: Arc::new(SessionManager::new(remote.clone())),
            plugins: Arc::new(plugins),
            remote,
            lanes: Arc::default(),
            control,
            channels: Arc::default(),
        };
        let timing = Timing {
            heartbeat_interval: Duration::from_secs(1),
            snapshot_every: Duration::from_secs(3600),
            figures_every: Duration::from_secs(10),
        };
        Cluster::new("n".into(), timing, Arc::new(bus), state, 64).0
    }

    #[tokio::test]
    async fn plugin_changes_from_the_bus_are_held_to_the_admin_apis_rules() {
        let store = tempfile::tempdir().unwrap();
        let outside = store.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep.wasm"), b"keep").unwrap();
        let cluster = cluster(&store.path().join("plugins"));
        let change = |tenant: &str, version: &str| Change::PluginRemoved {
            tenant: tenant.to_owned(),
            version: version.to_owned(),
        };
        // A tenant name or a version that would be a path elsewhere.
        let refused = [
            change("../outside", &"a".repeat(64)),
            change("acme", "../../outside/keep"),
            change("unknown", &"a".repeat(64)),
        ];
        for change in refused {
            let label = format!("{change:?}");
            let result = cluster.apply_change("other", change, None).await;
            assert!(
                matches!(
                    result,
                    Err(ApplyError::NoTenant(_))
                        | Err(ApplyError::Plugin(RegistryError::NotFound(_)))
                ),
                "{label}: {result:?}"
            );
        }
        assert!(
            outside.join("keep.wasm").exists(),
            "nothing outside the store touched"
        );
        let installed = Change::PluginInstalled {
            tenant: "../outside".to_owned(),
            component: b"\0asm".to_vec(),
            activate: true,
        };
        assert!(matches!(
            cluster.apply_change("other", installed, None).await,
            Err(ApplyError::NoTenant(_))
        ));
    }
}
