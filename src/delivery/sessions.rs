//! The local session index: tenant → user → that user's connections on
//! this node, and topic subscriptions.
//!
//! Owns the index the dispatcher searches for recipients, and enforces the
//! per-user cap through a [`UserCap`] rule: this node's connections of a
//! user are handed to the rule under the user's lock, and those it names
//! are closed. Knows nothing of sockets, HTTP or other nodes: the rule
//! may count connections held elsewhere, this index never does.
//!
//! Stale sessions do not linger: each connection's task unregisters it
//! when it ends (in a drop guard, so on every path), and the idle timeout
//! ends connections whose peer vanished without a close.
//!
//! Lookups on the delivery path take one shard lock of one map, never a lock
//! over all tenants or all users.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

use super::close_reason::CloseReason;
use super::outbound::{ConnectionHandle, ConnectionId, Metadata};
use crate::metrics::TenantMetrics;
use crate::sync::InFlight;
use crate::tenant::{Identity, Tenant};

/// Decides which of a user's connections a new connection puts beyond the
/// tenant's per-user cap. The rule may know of connections held elsewhere.
pub(crate) trait UserCap: Send + Sync {
    /// `local` holds this node's connections of `user`, oldest first.
    /// Returns the ids of those to close. Called with the user's entry
    /// locked: an implementation may take its own locks, never this index's.
    fn beyond_cap(
        &self,
        tenant: &str,
        user: &str,
        local: &[ConnectionHandle],
        cap: usize,
    ) -> Vec<ConnectionId>;
}

/// The cap counted over this node's connections only: the oldest beyond
/// it go.
pub(crate) struct LocalCap;

impl UserCap for LocalCap {
    fn beyond_cap(
        &self,
        _tenant: &str,
        _user: &str,
        local: &[ConnectionHandle],
        cap: usize,
    ) -> Vec<ConnectionId> {
        let excess = local.len().saturating_sub(cap);
        local[..excess].iter().map(ConnectionHandle::id).collect()
    }
}

/// Every connection of one user in one tenant, oldest first.
#[derive(Default)]
struct UserSession {
    connections: Vec<ConnectionHandle>,
}

/// What became of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    Added,
    /// It was subscribed already (or has ended).
    Already,
    /// It has as many topics as it may.
    AtLimit,
}

/// The sessions of one tenant.
struct TenantSessions {
    users: DashMap<Arc<str>, UserSession>,
    topics: DashMap<Arc<str>, HashMap<ConnectionId, ConnectionHandle>>,
    connections: AtomicUsize,
    /// Connections reserved at handshake (held until they end): what the
    /// tenant's `max_connections` counts, so that a burst of handshakes
    /// cannot pass it between the check and the registration.
    reserved: AtomicUsize,
    metrics: TenantMetrics,
}

/// A connection slot of a tenant, reserved before the upgrade and held for
/// the connection's life.
pub struct Reservation {
    sessions: Arc<TenantSessions>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.sessions.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TenantSessions {
    fn new(metrics: TenantMetrics) -> Self {
        Self {
            users: DashMap::new(),
            topics: DashMap::new(),
            connections: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
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

/// The node's index of sessions.
pub struct SessionManager {
    /// Which connections a new one puts beyond the per-user cap.
    cap: Arc<dyn UserCap>,
    tenants: DashMap<Arc<str>, Arc<TenantSessions>>,
    /// One shared copy of each distinct metadata set in use: most sessions
    /// carry one of a few sets (language, role …), and sharing them saves
    /// memory per connection and lets `on-deliver` send each set once.
    /// Each set with the number of open connections using it.
    metadata_sets: DashMap<Arc<Metadata>, usize>,
    next_id: AtomicU64,
    open: InFlight,
    /// Each tenant's recent messages, for clients that resume.
    pub(crate) history: super::history::Histories,
}

impl SessionManager {
    /// An empty index whose per-user cap follows `cap`.
    pub(crate) fn new(cap: Arc<dyn UserCap>) -> Self {
        Self {
            cap,
            tenants: DashMap::new(),
            metadata_sets: DashMap::new(),
            next_id: AtomicU64::new(1),
            open: InFlight::default(),
            history: Default::default(),
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

    /// Reserves a connection slot of `tenant`, or `None` when its
    /// `max_connections` (0: no limit) are all taken.
    pub(crate) fn reserve(&self, tenant: &Tenant) -> Option<Reservation> {
        let sessions = self.tenant_sessions(tenant);
        let limit = tenant.config.max_connections;
        sessions
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (limit == 0 || taken < limit).then_some(taken + 1)
            })
            .ok()?;
        Some(Reservation { sessions })
    }

    /// Registers a new connection of `identity.user` with an outbound queue
    /// of `queue_capacity` frames, subscribes it to its initial topics, and
    /// closes the user's connections beyond the tenant's cap.
    pub fn register(
        &self,
        tenant: &Tenant,
        identity: Identity,
        queue_capacity: usize,
    ) -> ConnectionHandle {
        let sessions = self.tenant_sessions(tenant);
        let user: Arc<str> = Arc::from(identity.user);
        let handle = ConnectionHandle::new(
            self.next_id.fetch_add(1, Ordering::Relaxed),
            tenant.name.clone(),
            user.clone(),
            self.shared_metadata(identity.metadata),
            queue_capacity,
        );
        self.open.start();
        sessions.connections.fetch_add(1, Ordering::Relaxed);
        sessions.metrics.connections.increment(1.0);

        let evicted: Vec<ConnectionHandle> = {
            let mut session = sessions.users.entry(user.clone()).or_insert_with(|| {
                sessions.metrics.users.increment(1.0);
                UserSession::default()
            });
            session.connections.push(handle.clone());
            let cap = tenant.config.max_connections_per_user;
            let beyond = self
                .cap
                .beyond_cap(&tenant.name, &user, &session.connections, cap);
            take_connections(&mut session.connections, &beyond)
        };
        // Evicted connections leave the index now, so no new frame reaches
        // them; their tasks send the close frame and call `unregister`.
        for old in &evicted {
            old.close(CloseReason::Replaced);
        }
        for topic in identity.topics {
            self.subscribe(&handle, Arc::from(topic), usize::MAX);
        }
        handle
    }

    /// Applies the cap rule to `user`'s connections again (the rule
    /// learned of connections elsewhere) and closes those it names.
    pub(crate) fn enforce_cap(&self, tenant: &Tenant, user: &str) {
        let cap = tenant.config.max_connections_per_user;
        let evicted = match self
            .tenants
            .get(&*tenant.name)
            .map(|sessions| sessions.clone())
        {
            Some(sessions) => match sessions.users.get_mut(user) {
                Some(mut session) => {
                    let beyond = self
                        .cap
                        .beyond_cap(&tenant.name, user, &session.connections, cap);
                    take_connections(&mut session.connections, &beyond)
                }
                None => {
                    self.cap.beyond_cap(&tenant.name, user, &[], cap);
                    Vec::new()
                }
            },
            None => {
                self.cap.beyond_cap(&tenant.name, user, &[], cap);
                Vec::new()
            }
        };
        for old in &evicted {
            old.close(CloseReason::Replaced);
        }
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
    pub fn unregister(&self, handle: &ConnectionHandle) {
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
        for topic in std::mem::take(&mut *handle.lock_topics()) {
            sessions.remove_from_topic(&topic, handle.id());
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
        self.open.finish();
    }

    /// Subscribes a connection to `topic`, unless it has `limit` topics
    /// already.
    pub fn subscribe(
        &self,
        handle: &ConnectionHandle,
        topic: Arc<str>,
        limit: usize,
    ) -> Subscribed {
        let mut topics = handle.lock_topics();
        if topics.contains(&topic) {
            return Subscribed::Already;
        }
        if topics.len() >= limit {
            return Subscribed::AtLimit;
        }
        // An ended connection stays out of the index.
        if handle.has_ended() {
            return Subscribed::Already;
        }
        topics.push(topic.clone());
        if let Some(sessions) = self.tenants.get(handle.tenant()) {
            sessions
                .topics
                .entry(topic)
                .or_default()
                .insert(handle.id(), handle.clone());
        }
        Subscribed::Added
    }

    /// Unsubscribes a connection from `topic`.
    pub fn unsubscribe(&self, handle: &ConnectionHandle, topic: &str) {
        let mut topics = handle.lock_topics();
        let before = topics.len();
        topics.retain(|t| **t != *topic);
        if topics.len() != before
            && let Some(sessions) = self.tenants.get(handle.tenant())
        {
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
        self.open.count()
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

    /// Forgets what this node kept of a removed tenant's messages.
    pub(crate) fn forget_history(&self, tenant: &str) {
        self.history.forget(tenant);
    }

    /// Resolves once no connection is registered.
    pub async fn wait_until_empty(&self) {
        self.open.wait_until_none().await;
    }
}

/// Removes the connections named in `ids` from `connections` and returns them.
fn take_connections(
    connections: &mut Vec<ConnectionHandle>,
    ids: &[ConnectionId],
) -> Vec<ConnectionHandle> {
    if ids.is_empty() {
        return Vec::new();
    }
    let mut taken = Vec::with_capacity(ids.len());
    connections.retain(|c| {
        let keep = !ids.contains(&c.id());
        if !keep {
            taken.push(c.clone());
        }
        keep
    });
    taken
}

/// What tests of the session index (here and in other parts) share.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::TenantConfig;

    pub(crate) fn tenant(cap: usize) -> Tenant {
        Tenant::new(
            "t",
            TenantConfig {
                max_connections_per_user: cap,
                ..TenantConfig::default()
            },
        )
        .unwrap()
    }

    pub(crate) fn identity(user: &str, topics: &[&str]) -> Identity {
        Identity {
            user: user.to_owned(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            metadata: BTreeMap::new(),
            grant: Default::default(),
            expires_at_secs: None,
        }
    }

    pub(crate) fn ids(manager: &SessionManager, user: &str) -> Vec<ConnectionId> {
        let mut found = Vec::new();
        manager.for_each_of_user("t", user, |c| found.push(c.id()));
        found
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::testing::{identity, ids, tenant};
    use super::*;
    use crate::delivery::outbound::Enqueued;
    use crate::delivery::wire::WireFrame;

    #[test]
    fn cap_evicts_the_oldest_connection() {
        let manager = SessionManager::new(Arc::new(LocalCap));
        let tenant = tenant(2);
        let first = manager.register(&tenant, identity("u", &[]), 4);
        let second = manager.register(&tenant, identity("u", &[]), 4);
        let third = manager.register(&tenant, identity("u", &[]), 4);
        assert_eq!(ids(&manager, "u"), vec![second.id(), third.id()]);
        assert_eq!(first.close_reason(), Some(CloseReason::Replaced));
        assert_eq!(second.close_reason(), None);
    }

    #[test]
    fn unregister_removes_user_and_topics() {
        let manager = SessionManager::new(Arc::new(LocalCap));
        let tenant = tenant(4);
        let handle = manager.register(&tenant, identity("u", &["news"]), 4);
        let mut members = 0;
        manager.for_each_of_topic("t", "news", |_| members += 1);
        assert_eq!(members, 1);
        manager.unregister(&handle);
        assert!(ids(&manager, "u").is_empty());
        let mut members = 0;
        manager.for_each_of_topic("t", "news", |_| members += 1);
        assert_eq!(members, 0);
        assert_eq!(manager.connection_count(), 0);
    }

    #[test]
    fn full_queue_closes_the_connection() {
        let manager = SessionManager::new(Arc::new(LocalCap));
        let tenant = tenant(4);
        let handle = manager.register(&tenant, identity("u", &[]), 1);
        assert_eq!(handle.enqueue(WireFrame::text("a")), Enqueued::Queued);
        assert_eq!(handle.enqueue(WireFrame::text("b")), Enqueued::Overflowed);
        assert_eq!(handle.close_reason(), Some(CloseReason::SlowClient));
        // A closing connection takes no more frames.
        assert_eq!(handle.enqueue(WireFrame::text("c")), Enqueued::Gone);
        assert_eq!(handle.next_frame(), Some(WireFrame::text("a")));
        assert_eq!(handle.next_frame(), None);
    }

    #[test]
    fn equal_metadata_is_shared_and_forgotten_with_its_last_session() {
        let manager = SessionManager::new(Arc::new(LocalCap));
        let tenant = tenant(4);
        let with_lang = |user: &str, lang: &str| Identity {
            user: user.to_owned(),
            topics: Vec::new(),
            metadata: BTreeMap::from([("lang".to_owned(), lang.to_owned())]),
            grant: Default::default(),
            expires_at_secs: None,
        };
        let a = manager.register(&tenant, with_lang("a", "fr"), 4);
        let b = manager.register(&tenant, with_lang("b", "fr"), 4);
        let c = manager.register(&tenant, with_lang("c", "en"), 4);
        assert!(Arc::ptr_eq(a.metadata(), b.metadata()));
        assert!(!Arc::ptr_eq(a.metadata(), c.metadata()));
        assert_eq!(manager.metadata_sets.len(), 2);
        manager.unregister(&a);
        assert_eq!(manager.metadata_sets.len(), 2, "b still uses the fr set");
        manager.unregister(&b);
        manager.unregister(&c);
        assert!(manager.metadata_sets.is_empty());
    }
}
