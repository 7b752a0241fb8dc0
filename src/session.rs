//! Sessions: tenant → user → that user's connections, and topic
//! subscriptions.
//!
//! Owns the index the dispatcher searches for recipients and the per-user
//! connection cap. Knows nothing of sockets or HTTP: a connection is a
//! bounded outbound queue plus a close signal, which the `ws` module drains
//! and obeys. Stale sessions do not linger: each connection's task
//! unregisters it when it ends (in a drop guard, so on every path), and the
//! idle timeout ends connections whose peer vanished without a close.
//!
//! Lookups on the delivery path take one shard lock of one map, never a lock
//! over all tenants or all users.
//!
//! In a cluster the per-user cap holds across nodes: each node also knows
//! the connections other nodes announced (user → node, id, opened at), and
//! every node applies the same rule to the same facts: past the cap, the
//! oldest connections go, each closed by the node that holds it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::metrics::TenantMetrics;
use crate::tenant::Tenant;

/// Unique id of a connection within this node.
pub type ConnectionId = u64;

/// Session metadata: facts an authenticator established about a session.
pub type Metadata = BTreeMap<String, String>;

/// Who a client is, as its tenant's authenticator established at handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Topics the connection is subscribed to from the start.
    pub topics: Vec<String>,
    /// Free-form facts about the session (language, role, device …).
    pub metadata: BTreeMap<String, String>,
}

/// Why the gateway closes a client connection; each has a documented
/// WebSocket close code that clients can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The user opened more connections than the tenant allows; this, the
    /// oldest, was closed. Reconnecting would close another one.
    Replaced,
    /// The client did not read fast enough and its outbound queue filled up.
    SlowClient,
    /// Nothing arrived from the client (not even a pong) within the idle timeout.
    IdleTimeout,
    /// The node is shutting down or draining: reconnect (to another node).
    ShuttingDown,
    /// The tenant was removed by an operator.
    TenantRemoved,
}

impl CloseReason {
    /// The WebSocket close code sent to the client.
    pub fn code(self) -> u16 {
        match self {
            Self::Replaced => 4001,
            Self::SlowClient => 4002,
            Self::IdleTimeout => 4003,
            Self::ShuttingDown => 1012,
            Self::TenantRemoved => 4004,
        }
    }

    /// The close reason text sent to the client.
    pub fn text(self) -> &'static str {
        match self {
            Self::Replaced => "connection limit reached: replaced by a newer connection",
            Self::SlowClient => "outbound queue full: client too slow",
            Self::IdleTimeout => "idle timeout",
            Self::ShuttingDown => "server restarting: reconnect",
            Self::TenantRemoved => "tenant removed",
        }
    }

    /// The `reason` label of [`metrics::DISCONNECTS`].
    pub fn label(self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::SlowClient => "slow_client",
            Self::IdleTimeout => "idle_timeout",
            Self::ShuttingDown => "shutdown",
            Self::TenantRemoved => "tenant_removed",
        }
    }

    /// Whether frames already queued are written before the close frame.
    /// Not for a slow client (it would not read them) nor for a removed
    /// tenant (its messages are no longer wanted).
    pub fn flushes_queue(self) -> bool {
        matches!(
            self,
            Self::Replaced | Self::ShuttingDown | Self::IdleTimeout
        )
    }
}

/// What became of a frame handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// The queue was full: the connection is being closed as a slow client.
    Overflowed,
    /// The connection had already ended.
    Gone,
}

/// Queues that grew past this many slots during a burst give their memory
/// back once drained: an idle connection should cost almost nothing.
const SHRINK_ABOVE_SLOTS: usize = 16;

struct ConnectionShared {
    id: ConnectionId,
    /// When it was registered, in microseconds since the Unix epoch: the
    /// age that decides which connection a cap closes, on every node.
    opened_at_micros: u64,
    tenant: Arc<str>,
    user: Arc<str>,
    metadata: Arc<Metadata>,
    /// The outbound queue. A `VecDeque` allocates nothing until the first
    /// frame, unlike a channel, which allocates a block of slots up front:
    /// at a million idle connections that difference is gigabytes.
    outbound: Mutex<VecDeque<Message>>,
    capacity: usize,
    close_reason: OnceLock<CloseReason>,
    /// Set when the connection's task has ended.
    ended: AtomicBool,
    /// Wakes the connection's task: a frame was queued or a close was asked.
    wake: Notify,
}

/// A registered connection as the rest of the gateway sees it: where to
/// queue frames and how to ask it to close. Cheap to clone.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

impl ConnectionHandle {
    pub fn id(&self) -> ConnectionId {
        self.0.id
    }

    pub fn tenant(&self) -> &Arc<str> {
        &self.0.tenant
    }

    pub fn user(&self) -> &Arc<str> {
        &self.0.user
    }

    pub fn opened_at_micros(&self) -> u64 {
        self.0.opened_at_micros
    }

    /// The session's metadata. Sessions with equal metadata share one
    /// allocation (see [`SessionManager::register`]), so the pointer
    /// identifies the set.
    pub fn metadata(&self) -> &Arc<Metadata> {
        &self.0.metadata
    }

    fn lock_outbound(&self) -> std::sync::MutexGuard<'_, VecDeque<Message>> {
        // A panic while holding this lock cannot leave the deque invalid.
        self.0
            .outbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `frame` without waiting. A full queue closes the connection:
    /// one slow client must never hold up delivery to the others.
    pub fn enqueue(&self, frame: Message) -> Enqueued {
        if self.0.close_reason.get().is_some() || self.0.ended.load(Ordering::Acquire) {
            return Enqueued::Gone;
        }
        let mut outbound = self.lock_outbound();
        if outbound.len() >= self.0.capacity {
            drop(outbound);
            self.close(CloseReason::SlowClient);
            return Enqueued::Overflowed;
        }
        outbound.push_back(frame);
        drop(outbound);
        // notify_one keeps a permit if the task is not waiting right now.
        self.0.wake.notify_one();
        Enqueued::Queued
    }

    /// Takes the oldest queued frame, for the connection's writer.
    pub fn next_frame(&self) -> Option<Message> {
        let mut outbound = self.lock_outbound();
        let frame = outbound.pop_front();
        if outbound.is_empty() && outbound.capacity() > SHRINK_ABOVE_SLOTS {
            *outbound = VecDeque::new();
        }
        frame
    }

    /// True if frames are waiting.
    pub fn has_frames(&self) -> bool {
        !self.lock_outbound().is_empty()
    }

    /// Asks the connection to close for `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self.0.close_reason.set(reason).is_ok() {
            self.0.wake.notify_one();
        }
    }

    /// Why the connection was asked to close, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.0.close_reason.get().copied()
    }

    /// Resolves when a frame was queued or a close was asked since the last
    /// wake-up (or right away if that happened while nobody waited).
    pub async fn woken(&self) {
        self.0.wake.notified().await;
    }

    /// Resolves once [`close`](Self::close) was called; returns the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close_reason() {
                return reason;
            }
            self.woken().await;
        }
    }

    /// Marks the connection as ended; true the first time only.
    fn mark_ended(&self) -> bool {
        !self.0.ended.swap(true, Ordering::AcqRel)
    }
}

/// Every connection of one user in one tenant, oldest first.
#[derive(Default)]
struct UserSession {
    connections: Vec<ConnectionHandle>,
}

/// A connection that another node of the cluster holds.
#[derive(Debug, Clone)]
struct RemoteConnection {
    node: Arc<str>,
    id: ConnectionId,
    opened_at_micros: u64,
}

/// The sessions of one tenant.
struct TenantSessions {
    users: DashMap<Arc<str>, UserSession>,
    /// Connections other nodes announced, by user (cluster mode only).
    remote: DashMap<Arc<str>, Vec<RemoteConnection>>,
    topics: DashMap<Arc<str>, HashMap<ConnectionId, ConnectionHandle>>,
    connections: AtomicUsize,
    metrics: TenantMetrics,
}

impl TenantSessions {
    fn new(metrics: TenantMetrics) -> Self {
        Self {
            users: DashMap::new(),
            remote: DashMap::new(),
            topics: DashMap::new(),
            connections: AtomicUsize::new(0),
            metrics,
        }
    }

    fn remove_from_topic(&self, topic: &str, id: ConnectionId) {
        self.topics.remove_if_mut(topic, |_, members| {
            members.remove(&id);
            members.is_empty()
        });
    }
}

/// Closes the oldest connections of one user beyond `cap`, counting this
/// node's (`local`) and the other nodes' (`remote`) alike. Every node sorts
/// by the same key (opened at, node, id), so all of them agree on which
/// connections go. Removes them from both lists and returns this node's.
fn evict_beyond_cap(
    node: &Arc<str>,
    local: &mut Vec<ConnectionHandle>,
    remote: &mut Vec<RemoteConnection>,
    cap: usize,
) -> Vec<ConnectionHandle> {
    let total = local.len() + remote.len();
    if total <= cap {
        return Vec::new();
    }
    let mut ages: Vec<(u64, &str, ConnectionId, bool)> = local
        .iter()
        .map(|c| (c.opened_at_micros(), &**node, c.id(), true))
        .chain(
            remote
                .iter()
                .map(|r| (r.opened_at_micros, &*r.node, r.id, false)),
        )
        .collect();
    ages.sort_unstable();
    let mut local_ids = Vec::new();
    let mut remote_keys = Vec::new();
    for (_, owner, id, is_local) in ages.into_iter().take(total - cap) {
        if is_local {
            local_ids.push(id);
        } else {
            remote_keys.push((Arc::<str>::from(owner), id));
        }
    }
    remote.retain(|r| {
        !remote_keys
            .iter()
            .any(|(n, id)| *n == r.node && *id == r.id)
    });
    let mut evicted = Vec::new();
    local.retain(|c| {
        let keep = !local_ids.contains(&c.id());
        if !keep {
            evicted.push(c.clone());
        }
        keep
    });
    evicted
}

/// The node's index of sessions.
pub struct SessionManager {
    /// This node's name in the cluster (its bus instance name).
    node: Arc<str>,
    /// One shared copy of each other node's name, for the entries of
    /// their connections.
    node_names: DashMap<String, Arc<str>>,
    tenants: DashMap<Arc<str>, Arc<TenantSessions>>,
    /// One shared copy of each distinct metadata set in use: most sessions
    /// carry one of a few sets (language, role …), and sharing them saves
    /// memory per connection and lets `on-deliver` send each set once.
    /// Each set with the number of open connections using it.
    metadata_sets: DashMap<Arc<Metadata>, usize>,
    next_id: AtomicU64,
    live: AtomicUsize,
    emptied: Notify,
}

impl Default for SessionManager {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionManager {
    pub fn new() -> Self {
        Self::for_node("local")
    }

    /// The index of node `node` (its name in the cluster).
    pub fn for_node(node: &str) -> Self {
        Self {
            node: Arc::from(node),
            node_names: DashMap::new(),
            tenants: DashMap::new(),
            metadata_sets: DashMap::new(),
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            emptied: Notify::new(),
        }
    }

    fn tenant_sessions(&self, tenant: &Tenant) -> Arc<TenantSessions> {
        if let Some(found) = self.tenants.get(&*tenant.name) {
            return found.clone();
        }
        self.tenants
            .entry(tenant.name.clone())
            .or_insert_with(|| Arc::new(TenantSessions::new(tenant.metrics.clone())))
            .clone()
    }

    /// Registers a new connection of `identity.user` with an outbound queue
    /// of `queue_capacity` frames, subscribes it to its initial topics, and
    /// closes the user's oldest connections beyond the tenant's cap.
    pub fn register(
        &self,
        tenant: &Tenant,
        identity: Identity,
        queue_capacity: usize,
    ) -> ConnectionHandle {
        let sessions = self.tenant_sessions(tenant);
        let user: Arc<str> = Arc::from(identity.user);
        let handle = ConnectionHandle(Arc::new(ConnectionShared {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            opened_at_micros: crate::envelope::now_micros(),
            tenant: tenant.name.clone(),
            user: user.clone(),
            metadata: self.shared_metadata(identity.metadata),
            outbound: Mutex::new(VecDeque::new()),
            capacity: queue_capacity,
            close_reason: OnceLock::new(),
            ended: AtomicBool::new(false),
            wake: Notify::new(),
        }));
        self.live.fetch_add(1, Ordering::Relaxed);
        sessions.connections.fetch_add(1, Ordering::Relaxed);
        sessions.metrics.connections.increment(1.0);

        let evicted: Vec<ConnectionHandle> = {
            let mut session = sessions.users.entry(user.clone()).or_insert_with(|| {
                sessions.metrics.users.increment(1.0);
                UserSession::default()
            });
            session.connections.push(handle.clone());
            let cap = tenant.config.max_connections_per_user;
            // Lock order: the user's session, then its remote list.
            match sessions.remote.get_mut(&user) {
                Some(mut remote) => {
                    evict_beyond_cap(&self.node, &mut session.connections, &mut remote, cap)
                }
                None => {
                    let excess = session.connections.len().saturating_sub(cap);
                    session.connections.drain(..excess).collect()
                }
            }
        };
        // Evicted connections leave the index now, so no new frame reaches
        // them; their tasks send the close frame and call `unregister`.
        for old in &evicted {
            old.close(CloseReason::Replaced);
        }
        for topic in identity.topics {
            self.subscribe(&handle, Arc::from(topic));
        }
        handle
    }

    /// Notes a connection that node `node` opened for `user`, and closes
    /// this node's connections of the user that it puts beyond the cap.
    pub fn remote_opened(
        &self,
        tenant: &Tenant,
        user: &str,
        node: &str,
        id: ConnectionId,
        opened_at_micros: u64,
    ) {
        let sessions = self.tenant_sessions(tenant);
        let user: Arc<str> = Arc::from(user);
        let connection = RemoteConnection {
            node: self.node_name(node),
            id,
            opened_at_micros,
        };
        let cap = tenant.config.max_connections_per_user;
        let evicted = match sessions.users.get_mut(&user) {
            Some(mut session) => {
                let mut remote = sessions.remote.entry(user.clone()).or_default();
                remote.push(connection);
                evict_beyond_cap(&self.node, &mut session.connections, &mut remote, cap)
            }
            None => {
                let mut remote = sessions.remote.entry(user.clone()).or_default();
                remote.push(connection);
                evict_beyond_cap(&self.node, &mut Vec::new(), &mut remote, cap)
            }
        };
        for old in &evicted {
            old.close(CloseReason::Replaced);
        }
    }

    /// The shared copy of another node's name.
    fn node_name(&self, node: &str) -> Arc<str> {
        if let Some(name) = self.node_names.get(node) {
            return name.clone();
        }
        self.node_names
            .entry(node.to_owned())
            .or_insert_with(|| Arc::from(node))
            .clone()
    }

    /// Forgets a connection that node `node` announced closed.
    pub fn remote_closed(&self, tenant: &str, user: &str, node: &str, id: ConnectionId) {
        if let Some(sessions) = self.tenants.get(tenant) {
            sessions.remote.remove_if_mut(user, |_, connections| {
                connections.retain(|c| !(c.id == id && &*c.node == node));
                connections.is_empty()
            });
        }
    }

    /// Forgets the connections of node `node` opened before
    /// `opened_before_micros` (all of them if `None`): the node stopped or
    /// restarted.
    pub fn forget_node(&self, node: &str, opened_before_micros: Option<u64>) {
        let gone = |c: &RemoteConnection| {
            &*c.node == node
                && opened_before_micros.is_none_or(|before| c.opened_at_micros < before)
        };
        for sessions in self.tenants.iter() {
            sessions.remote.retain(|_, connections| {
                connections.retain(|c| !gone(c));
                !connections.is_empty()
            });
        }
    }

    /// Connections of other nodes this node knows of, for the admin API.
    pub fn remote_connection_count(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |s| {
            s.remote.iter().map(|entry| entry.value().len()).sum()
        })
    }

    /// The shared copy of `metadata`, counted as used once more.
    fn shared_metadata(&self, metadata: Metadata) -> Arc<Metadata> {
        if let Some(mut users) = self.metadata_sets.get_mut(&metadata) {
            *users += 1;
            return users.key().clone();
        }
        let mut users = self.metadata_sets.entry(Arc::new(metadata)).or_insert(0);
        *users += 1;
        users.key().clone()
    }

    /// Removes a connection that ended, with the topics it was subscribed to.
    pub fn unregister(&self, handle: &ConnectionHandle, topics: &[Arc<str>]) {
        if !handle.mark_ended() {
            return;
        }
        self.metadata_sets
            .remove_if_mut(handle.metadata().as_ref(), |_, users| {
                *users -= 1;
                *users == 0
            });
        let Some(sessions) = self.tenants.get(handle.tenant()).map(|s| s.clone()) else {
            return;
        };
        for topic in topics {
            sessions.remove_from_topic(topic, handle.id());
        }
        let removed_user = sessions.users.remove_if_mut(handle.user(), |_, session| {
            session.connections.retain(|c| c.id() != handle.id());
            session.connections.is_empty()
        });
        if removed_user.is_some() {
            sessions.metrics.users.decrement(1.0);
        }
        sessions.connections.fetch_sub(1, Ordering::Relaxed);
        sessions.metrics.connections.decrement(1.0);
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }

    /// Subscribes a connection to `topic`.
    pub fn subscribe(&self, handle: &ConnectionHandle, topic: Arc<str>) {
        if let Some(sessions) = self.tenants.get(handle.tenant()) {
            sessions
                .topics
                .entry(topic)
                .or_default()
                .insert(handle.id(), handle.clone());
        }
    }

    /// Unsubscribes a connection from `topic`.
    pub fn unsubscribe(&self, handle: &ConnectionHandle, topic: &str) {
        if let Some(sessions) = self.tenants.get(handle.tenant()) {
            sessions.remove_from_topic(topic, handle.id());
        }
    }

    /// Calls `visit` for each connection of `user` in `tenant`.
    pub fn for_each_of_user(&self, tenant: &str, user: &str, visit: impl FnMut(&ConnectionHandle)) {
        if let Some(sessions) = self.tenants.get(tenant)
            && let Some(session) = sessions.users.get(user)
        {
            session.connections.iter().for_each(visit);
        }
    }

    /// Calls `visit` for each connection subscribed to `topic` in `tenant`.
    pub fn for_each_of_topic(
        &self,
        tenant: &str,
        topic: &str,
        visit: impl FnMut(&ConnectionHandle),
    ) {
        if let Some(sessions) = self.tenants.get(tenant)
            && let Some(members) = sessions.topics.get(topic)
        {
            members.values().for_each(visit);
        }
    }

    /// Calls `visit` for each connection of `tenant`.
    pub fn for_each_of_tenant(&self, tenant: &str, mut visit: impl FnMut(&ConnectionHandle)) {
        let Some(sessions) = self.tenants.get(tenant).map(|s| s.clone()) else {
            return;
        };
        for session in sessions.users.iter() {
            session.connections.iter().for_each(&mut visit);
        }
    }

    /// Open connections of `tenant` on this node.
    pub fn tenant_connections(&self, tenant: &str) -> usize {
        self.tenants
            .get(tenant)
            .map_or(0, |s| s.connections.load(Ordering::Relaxed))
    }

    /// Open connections on this node.
    pub fn connection_count(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Every connection of this node, e.g. to close them one by one.
    pub fn all_connections(&self) -> Vec<ConnectionHandle> {
        let mut all = Vec::with_capacity(self.connection_count());
        for sessions in self.tenants.iter() {
            for session in sessions.users.iter() {
                all.extend(session.connections.iter().cloned());
            }
        }
        all
    }

    /// Asks every connection to close for `reason`, spread evenly over
    /// `window` so that clients do not all reconnect at the same moment.
    pub async fn close_gradually(&self, reason: CloseReason, window: std::time::Duration) {
        let connections = self.all_connections();
        let count = connections.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        for (index, connection) in connections.into_iter().enumerate() {
            tokio::time::sleep_until(start + window * index as u32 / count).await;
            connection.close(reason);
        }
    }

    /// Asks every connection of `tenant` to close for `reason`.
    pub fn close_tenant(&self, tenant: &str, reason: CloseReason) {
        self.for_each_of_tenant(tenant, |c| c.close(reason));
    }

    /// Resolves once no connection is registered.
    pub async fn wait_until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.connection_count() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    fn tenant(cap: usize) -> Tenant {
        Tenant::new(
            "t",
            TenantConfig {
                max_connections_per_user: cap,
                ..TenantConfig::default()
            },
        )
        .unwrap()
    }

    fn identity(user: &str, topics: &[&str]) -> Identity {
        Identity {
            user: user.to_owned(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            metadata: BTreeMap::new(),
        }
    }

    fn ids(manager: &SessionManager, user: &str) -> Vec<ConnectionId> {
        let mut found = Vec::new();
        manager.for_each_of_user("t", user, |c| found.push(c.id()));
        found
    }

    #[test]
    fn cap_evicts_the_oldest_connection() {
        let manager = SessionManager::new();
        let tenant = tenant(2);
        let first = manager.register(&tenant, identity("u", &[]), 4);
        let second = manager.register(&tenant, identity("u", &[]), 4);
        let third = manager.register(&tenant, identity("u", &[]), 4);
        assert_eq!(ids(&manager, "u"), vec![second.id(), third.id()]);
        assert_eq!(first.close_reason(), Some(CloseReason::Replaced));
        assert_eq!(second.close_reason(), None);
    }

    #[test]
    fn the_cap_counts_other_nodes_and_closes_the_oldest_wherever_it_is() {
        let manager = SessionManager::for_node("b");
        let tenant = tenant(2);
        let local = manager.register(&tenant, identity("u", &[]), 4);
        // Node a announces an older and then a newer connection of u.
        manager.remote_opened(&tenant, "u", "a", 7, local.opened_at_micros() - 10);
        assert_eq!(
            local.close_reason(),
            None,
            "two connections: within the cap"
        );
        manager.remote_opened(&tenant, "u", "a", 8, local.opened_at_micros() + 10);
        assert_eq!(
            local.close_reason(),
            None,
            "the older one is on node a: node a closes it"
        );
        manager.remote_opened(&tenant, "u", "c", 1, local.opened_at_micros() + 20);
        assert_eq!(local.close_reason(), Some(CloseReason::Replaced));
        assert!(ids(&manager, "u").is_empty());
    }

    #[test]
    fn forgotten_nodes_no_longer_count() {
        let manager = SessionManager::for_node("b");
        let tenant = tenant(1);
        manager.remote_opened(&tenant, "u", "a", 7, 1);
        manager.forget_node("a", None);
        let local = manager.register(&tenant, identity("u", &[]), 4);
        assert_eq!(local.close_reason(), None);
        manager.remote_opened(&tenant, "u", "a", 9, local.opened_at_micros() + 1);
        assert_eq!(local.close_reason(), Some(CloseReason::Replaced));
        manager.remote_closed("t", "u", "a", 9);
        assert_eq!(manager.remote_connection_count("t"), 0);
    }

    #[test]
    fn unregister_removes_user_and_topics() {
        let manager = SessionManager::new();
        let tenant = tenant(4);
        let handle = manager.register(&tenant, identity("u", &["news"]), 4);
        let mut members = 0;
        manager.for_each_of_topic("t", "news", |_| members += 1);
        assert_eq!(members, 1);
        manager.unregister(&handle, &[Arc::from("news")]);
        assert!(ids(&manager, "u").is_empty());
        let mut members = 0;
        manager.for_each_of_topic("t", "news", |_| members += 1);
        assert_eq!(members, 0);
        assert_eq!(manager.connection_count(), 0);
    }

    #[test]
    fn full_queue_closes_the_connection() {
        let manager = SessionManager::new();
        let tenant = tenant(4);
        let handle = manager.register(&tenant, identity("u", &[]), 1);
        assert_eq!(handle.enqueue(Message::text("a")), Enqueued::Queued);
        assert_eq!(handle.enqueue(Message::text("b")), Enqueued::Overflowed);
        assert_eq!(handle.close_reason(), Some(CloseReason::SlowClient));
        // A closing connection takes no more frames.
        assert_eq!(handle.enqueue(Message::text("c")), Enqueued::Gone);
        assert_eq!(handle.next_frame(), Some(Message::text("a")));
        assert_eq!(handle.next_frame(), None);
    }

    #[test]
    fn equal_metadata_is_shared_and_forgotten_with_its_last_session() {
        let manager = SessionManager::new();
        let tenant = tenant(4);
        let with_lang = |user: &str, lang: &str| Identity {
            user: user.to_owned(),
            topics: Vec::new(),
            metadata: BTreeMap::from([("lang".to_owned(), lang.to_owned())]),
        };
        let a = manager.register(&tenant, with_lang("a", "fr"), 4);
        let b = manager.register(&tenant, with_lang("b", "fr"), 4);
        let c = manager.register(&tenant, with_lang("c", "en"), 4);
        assert!(Arc::ptr_eq(a.metadata(), b.metadata()));
        assert!(!Arc::ptr_eq(a.metadata(), c.metadata()));
        assert_eq!(manager.metadata_sets.len(), 2);
        manager.unregister(&a, &[]);
        assert_eq!(manager.metadata_sets.len(), 2, "b still uses the fr set");
        manager.unregister(&b, &[]);
        manager.unregister(&c, &[]);
        assert!(manager.metadata_sets.is_empty());
    }
}
