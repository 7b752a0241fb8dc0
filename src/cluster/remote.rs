//! The connections other nodes hold of the users this node owns, and the
//! per-user cap rule counted over the whole cluster.
//!
//! Each user has one owner node (see [`super::ownership`]). The nodes that
//! hold the user's connections announce them to the owner, which alone
//! keeps the list and applies the rule: past the cap the oldest
//! connections go (sorted by opened at, node, id) — its own it closes, the
//! others' it names to their nodes. A node keeps nothing of users it does
//! not own, so its memory grows with its share of the users, not with the
//! cluster. This node's own connections live in the delivery part's index;
//! this rule is handed to it as its [`UserCap`].
//!
//! Lock order: the delivery index locks a user's entry, then calls the rule,
//! which locks that user's remote list. Nothing here calls back into the
//! index while holding a remote list.

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;

use crate::delivery::{ConnectionHandle, ConnectionId, LocalCap, UserCap};

/// A connection that another node of the cluster holds.
#[derive(Debug, Clone)]
struct RemoteConnection {
    node: Arc<str>,
    id: ConnectionId,
    opened_at_micros: u64,
}

/// One tenant's users and the connections other nodes hold for each.
type RemoteUsers = DashMap<Arc<str>, Vec<RemoteConnection>>;

/// Tells another node to close one of its connections: tenant, user,
/// node, connection.
pub(crate) type Evict = Box<dyn Fn(&str, &str, &str, ConnectionId) + Send + Sync>;

/// Other nodes' connections of the users this node owns, by tenant and user.
pub(crate) struct RemoteConnections {
    /// This node's name, for the rule's tie-break.
    node: Arc<str>,
    /// One shared copy of each other node's name, for the entries of
    /// their connections.
    node_names: DashMap<String, Arc<str>>,
    tenants: DashMap<Arc<str>, Arc<RemoteUsers>>,
    /// How the rule has another node close a connection beyond the cap.
    evict: OnceLock<Evict>,
}

impl RemoteConnections {
    /// No connection known yet, on node `node`.
    pub(crate) fn new(node: &str) -> Self {
        Self {
            node: Arc::from(node),
            node_names: DashMap::new(),
            tenants: DashMap::new(),
            evict: OnceLock::new(),
        }
    }

    /// Sets how another node is told to close a connection beyond the cap
    /// (once; until then such connections are only forgotten here).
    pub(crate) fn on_evict(&self, evict: Evict) {
        let _ = self.evict.set(evict);
    }

    fn users(&self, tenant: &str) -> Arc<RemoteUsers> {
        if let Some(users) = self.tenants.get(tenant) {
            return users.clone();
        }
        self.tenants.entry(Arc::from(tenant)).or_default().clone()
    }

    /// Notes a connection that node `node` holds for `user` (once, however
    /// often it is announced). The caller then has the cap enforced for the
    /// user.
    pub(crate) fn opened(
        &self,
        tenant: &str,
        user: &str,
        node: &str,
        id: ConnectionId,
        opened_at_micros: u64,
    ) {
        let connection = RemoteConnection {
            node: self.node_name(node),
            id,
            opened_at_micros,
        };
        let users = self.users(tenant);
        let mut connections = users.entry(Arc::from(user)).or_default();
        if !connections
            .iter()
            .any(|c| c.id == id && c.node == connection.node)
        {
            connections.push(connection);
        }
    }

    /// Keeps only the users `keep` names (by tenant and user): those this
    /// node still owns after a membership change.
    pub(crate) fn retain_users(&self, keep: impl Fn(&str, &str) -> bool) {
        for users in self.tenants.iter() {
            users.retain(|user, _| keep(users.key(), user));
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
    pub(crate) fn closed(&self, tenant: &str, user: &str, node: &str, id: ConnectionId) {
        if let Some(users) = self.tenants.get(tenant) {
            users.remove_if_mut(user, |_, connections| {
                connections.retain(|c| !(c.id == id && &*c.node == node));
                connections.is_empty()
            });
        }
    }

    /// Forgets the connections of node `node` opened before
    /// `opened_before_micros` (all of them if `None`): the node stopped or
    /// restarted.
    pub(crate) fn forget_node(&self, node: &str, opened_before_micros: Option<u64>) {
        let gone = |c: &RemoteConnection| {
            &*c.node == node
                && opened_before_micros.is_none_or(|before| c.opened_at_micros < before)
        };
        for users in self.tenants.iter() {
            users.retain(|_, connections| {
                connections.retain(|c| !gone(c));
                !connections.is_empty()
            });
        }
    }

    /// Forgets every connection of a removed tenant.
    pub(crate) fn forget_tenant(&self, tenant: &str) {
        self.tenants.remove(tenant);
    }

    /// True if another node holds a connection of `user` (a user this node
    /// owns).
    pub(crate) fn has_user(&self, tenant: &str, user: &str) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|users| users.contains_key(user))
    }

    /// The connections other nodes hold for `user`: node, id, opened at.
    pub(crate) fn of_user(&self, tenant: &str, user: &str) -> Vec<(Arc<str>, ConnectionId, u64)> {
        self.tenants
            .get(tenant)
            .and_then(|users| {
                users.get(user).map(|connections| {
                    connections
                        .iter()
                        .map(|c| (c.node.clone(), c.id, c.opened_at_micros))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Visits each user of `tenant` (this node owns them) that another node
    /// holds a connection of.
    pub(crate) fn for_each_user(&self, tenant: &str, mut visit: impl FnMut(&str)) {
        if let Some(users) = self.tenants.get(tenant) {
            users.iter().for_each(|entry| visit(entry.key()));
        }
    }

    /// Connections of other nodes this node knows of, for the admin API.
    pub(crate) fn count(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |users| {
            users.iter().map(|entry| entry.value().len()).sum()
        })
    }
}

impl UserCap for RemoteConnections {
    /// Counts this node's (`local`) and the other nodes' connections alike;
    /// has the other nodes close theirs beyond the cap (and forgets them)
    /// and returns this node's.
    fn beyond_cap(
        &self,
        tenant: &str,
        user: &str,
        local: &[ConnectionHandle],
        cap: usize,
    ) -> Vec<ConnectionId> {
        let Some(users) = self.tenants.get(tenant).map(|users| users.clone()) else {
            return LocalCap.beyond_cap(tenant, user, local, cap);
        };
        let Some(mut remote) = users.get_mut(user) else {
            return LocalCap.beyond_cap(tenant, user, local, cap);
        };
        let total = local.len() + remote.len();
        if total <= cap {
            return Vec::new();
        }
        let mut ages: Vec<(u64, &str, ConnectionId, bool)> = local
            .iter()
            .map(|c| (c.opened_at_micros(), &*self.node, c.id(), true))
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
        if let Some(evict) = self.evict.get() {
            for (node, id) in &remote_keys {
                evict(tenant, user, node, *id);
            }
        }
        local_ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::sessions::testing::{identity, ids, tenant};
    use crate::delivery::{CloseReason, SessionManager};
    use crate::tenant::Tenant;

    /// The index of node `node`, and what it knows of the others.
    fn node(node: &str) -> (SessionManager, Arc<RemoteConnections>) {
        let remote = Arc::new(RemoteConnections::new(node));
        (SessionManager::new(remote.clone()), remote)
    }

    fn remote_opened(
        manager: &SessionManager,
        remote: &RemoteConnections,
        tenant: &Tenant,
        (user, node, id, opened_at_micros): (&str, &str, ConnectionId, u64),
    ) {
        remote.opened(&tenant.name, user, node, id, opened_at_micros);
        manager.enforce_cap(tenant, user);
    }

    #[test]
    fn the_cap_counts_other_nodes_and_closes_the_oldest_wherever_it_is() {
        let (manager, remote) = node("b");
        let evicted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let told = evicted.clone();
        remote.on_evict(Box::new(move |tenant, user, node, id| {
            told.lock()
                .unwrap()
                .push(format!("{tenant}/{user}: {node} #{id}"));
        }));
        let tenant = tenant(2);
        let local = manager.register(&tenant, identity("u", &[]), 4);
        // Node a announces an older and then a newer connection of u.
        let at = local.opened_at_micros();
        remote_opened(&manager, &remote, &tenant, ("u", "a", 7, at - 10));
        assert_eq!(
            local.close_reason(),
            None,
            "two connections: within the cap"
        );
        // Announced again (the user's owner changed meanwhile): counted once.
        remote_opened(&manager, &remote, &tenant, ("u", "a", 7, at - 10));
        assert!(evicted.lock().unwrap().is_empty());
        remote_opened(&manager, &remote, &tenant, ("u", "a", 8, at + 10));
        assert_eq!(
            local.close_reason(),
            None,
            "the older one is on node a: node a closes it"
        );
        assert_eq!(*evicted.lock().unwrap(), ["t/u: a #7"]);
        remote_opened(&manager, &remote, &tenant, ("u", "c", 1, at + 20));
        assert_eq!(local.close_reason(), Some(CloseReason::Replaced));
        assert!(ids(&manager, "u").is_empty());
        assert_eq!(remote.count("t"), 2, "a #8 and c #1 are kept");
    }

    #[test]
    fn a_user_no_longer_owned_is_forgotten() {
        let (_, remote) = node("b");
        remote.opened("t", "kept", "a", 1, 1);
        remote.opened("t", "moved", "a", 2, 1);
        remote.retain_users(|tenant, user| tenant == "t" && user == "kept");
        assert_eq!(remote.of_user("t", "kept").len(), 1);
        assert!(remote.of_user("t", "moved").is_empty());
    }

    #[test]
    fn forgotten_nodes_no_longer_count() {
        let (manager, remote) = node("b");
        let tenant = tenant(1);
        remote_opened(&manager, &remote, &tenant, ("u", "a", 7, 1));
        remote.forget_node("a", None);
        let local = manager.register(&tenant, identity("u", &[]), 4);
        assert_eq!(local.close_reason(), None);
        let at = local.opened_at_micros();
        remote_opened(&manager, &remote, &tenant, ("u", "a", 9, at + 1));
        assert_eq!(local.close_reason(), Some(CloseReason::Replaced));
        remote.closed("t", "u", "a", 9);
        assert_eq!(remote.count("t"), 0);
    }
}
