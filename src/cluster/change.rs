//! Control events: changes made through one node's admin API, and facts
//! about connections and nodes, that every node of a cluster applies in
//! the order the bus delivers them.
//!
//! They carry only data. The bus carries their binary form as an opaque
//! control record (see [`crate::bus::envelope`]); [`super::apply`] applies
//! them.

use serde::{Deserialize, Serialize};

mod fact;
pub use fact::ConnectionFact;

/// One change, announced by the node it happened on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlEvent {
    /// Instance name of the announcing node.
    pub origin: String,
    /// Tells the announcing node's changes apart, so that it can answer the
    /// request that made one once the change came back to it and was
    /// applied.
    pub id: u64,
    pub change: Change,
}

impl ControlEvent {
    /// The binary form, for the bus.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("writing to a Vec cannot fail")
    }

    /// Reads what [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        let (event, _appended) = postcard::take_from_bytes(bytes)?;
        Ok(event)
    }
}

/// What changed. Admin changes come in three domains — [`TenantChange`],
/// [`PluginChange`], [`KeyChange`] — each with the [`Actor`] that made it;
/// the rest are facts about connections and nodes and the questions
/// between nodes.
///
/// Nodes read one another's variants by position (postcard): a variant is
/// only ever appended. The flat admin variants at the top are what nodes
/// before the domains sent; they are still read, as the domain form
/// ([`Change::into_current`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The node stopped: it holds no connection any more.
    NodeStopped,
    /// Older form of [`TenantChange::Put`].
    TenantPut { name: String, settings_json: String },
    /// Older form of [`TenantChange::Removed`].
    TenantRemoved { name: String },
    /// Older form of [`PluginChange::Installed`].
    PluginInstalled {
        tenant: String,
        component: Vec<u8>,
        activate: bool,
    },
    /// Older form of [`PluginChange::Activated`].
    PluginActivated { tenant: String, version: String },
    /// Older form of [`PluginChange::RolledBack`].
    PluginRolledBack { tenant: String, version: String },
    /// Older form of [`PluginChange::Removed`].
    PluginRemoved { tenant: String, version: String },
    /// A user opened a connection on the origin node. Sent by nodes that
    /// came before users had owners (every node kept every connection):
    /// kept by the node that owns the user as it sees the cluster, so that
    /// the cap holds through a rolling upgrade.
    ConnectionOpened {
        tenant: String,
        user: String,
        connection: u64,
        opened_at_micros: u64,
    },
    /// A connection on the origin node ended; whichever node keeps it
    /// forgets it.
    ConnectionClosed {
        tenant: String,
        user: String,
        connection: u64,
    },
    /// A service asked to close `user`'s connections on every node (log
    /// out, ban), or the one `connection` names.
    Disconnect {
        tenant: String,
        user: String,
        connection: Option<ConnectionRef>,
    },
    /// A service subscribed `user`'s live connections to topics, or
    /// unsubscribed them, on every node.
    Subscriptions {
        tenant: String,
        user: String,
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
    },
    /// Older form of [`PluginChange::Canary`].
    PluginCanary {
        tenant: String,
        version: String,
        percent: u8,
    },
    /// Older form of [`PluginChange::CanaryEnded`].
    PluginCanaryEnded { tenant: String },
    /// Older form of [`PluginChange::CanaryFailed`].
    PluginCanaryFailed {
        tenant: String,
        version: String,
        reason: String,
    },
    /// Older form of [`PluginChange::Shadow`].
    PluginShadow {
        tenant: String,
        version: Option<String>,
    },
    /// The owner of `user` put `connection` beyond the per-user cap: the
    /// node that holds it closes it (4001).
    CapExceeded {
        tenant: String,
        user: String,
        connection: ConnectionRef,
    },
    /// The origin node asks `owner` for the connections of `users`.
    PresenceAsked {
        owner: String,
        id: u64,
        tenant: String,
        users: Vec<String>,
    },
    /// `owner`'s answer to node `to`'s question `id`: each user's
    /// connections, in the order asked.
    PresenceAnswered {
        to: String,
        id: u64,
        users: Vec<Vec<HeldConnection>>,
    },
    /// The origin node holds a connection of `user` (it opened it, or the
    /// user has a new owner): for `owner`, the node that keeps the user's
    /// connections for the per-user cap. (A variant of its own, not a
    /// field added to `ConnectionOpened`: nodes read the other's variants
    /// by position, and an older node must not misread it.)
    ConnectionHeld {
        owner: String,
        tenant: String,
        user: String,
        connection: u64,
        opened_at_micros: u64,
    },
    /// A tenant was created, replaced or removed.
    Tenant { by: Actor, change: TenantChange },
    /// A plugin version of `tenant` was installed, or its rollout changed.
    Plugin {
        by: Actor,
        tenant: String,
        change: PluginChange,
    },
    /// An admin API key was made or revoked.
    Key { by: Actor, change: KeyChange },
    /// A service banned `user`: every node refuses its handshakes (and
    /// resumes) until `until_ms` (milliseconds since the Unix epoch).
    Ban {
        tenant: String,
        user: String,
        until_ms: u64,
    },
    /// The origin node lacks admin changes the broker no longer keeps: it
    /// asks for a snapshot of the control state (`attempt` picks the node
    /// that answers).
    SnapshotWanted { attempt: u32 },
    /// One part of a snapshot of the control state.
    SnapshotPart(SnapshotPart),
    /// The origin node writes its periodic snapshot as of this record.
    SnapshotDue,
    /// The origin node's figures of the tenants it serves, taken every
    /// `interval_ms`: what the console sums over the cluster.
    Figures {
        interval_ms: u64,
        tenants: Vec<TenantFigures>,
    },
    /// The origin node's part of Pusher channels: its subscriptions and
    /// presence members on each (see `pusher::channels`).
    PusherChannels {
        parts: Vec<crate::pusher::channels::ChannelPart>,
    },
    /// Many connection facts of the origin node in one record, in order:
    /// each node reads one record where it read one per connection (a
    /// ramp of a million connections on fifty nodes is fifty million
    /// records read otherwise). Sent only while every node routes, which
    /// says every live node reads this form (see `send_connection_events`).
    Connections(Vec<ConnectionFact>),
}

/// One part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPart {
    /// The snapshot's id (unique for its origin node).
    pub id: u64,
    /// The last control record the state it holds took into account.
    pub as_of: crate::bus::ControlPosition,
    /// This part's index, from 0, and how many there are.
    pub index: u32,
    pub count: u32,
    /// SHA-256 of the whole snapshot (the parts joined).
    pub sha256: String,
    pub bytes: Vec<u8>,
}

/// Who made an admin change: kept in the audit trail of every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The key's id (`config` for `admin.token`, `node` for a node's own
    /// decision, `file` for the configuration file).
    pub key_id: String,
    pub key_name: String,
    /// The client's address, as the node that took the call saw it.
    pub address: String,
    /// Method and route template, e.g. `PUT /admin/v1/tenants/{name}`.
    pub route: String,
}

impl Actor {
    /// A change a node decided on by itself (a failing canary rolled
    /// back), or one from a node that sent no actor.
    pub fn node(node: &str, why: &str) -> Self {
        Self {
            key_id: "node".into(),
            key_name: node.into(),
            address: String::new(),
            route: why.into(),
        }
    }
}

/// A change of the tenants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TenantChange {
    /// Created or replaced; its settings as JSON (the admin API's form,
    /// which older and newer nodes both read).
    Put {
        name: String,
        settings_json: String,
    },
    Removed {
        name: String,
    },
    /// Only its push keys replaced (what a tenant's own admin may do).
    PushKeys {
        name: String,
        push_keys: Vec<String>,
    },
}

/// A change of one tenant's plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PluginChange {
    /// A component was uploaded (and activated, if `activate`).
    Installed {
        component: Vec<u8>,
        activate: bool,
    },
    Activated {
        version: String,
    },
    /// The tenant rolled back to `version`.
    RolledBack {
        version: String,
    },
    Removed {
        version: String,
    },
    /// `version` serves `percent` of the tenant's users (a canary).
    Canary {
        version: String,
        percent: u8,
    },
    /// The canary ended: the active version serves everyone.
    CanaryEnded,
    /// A node found the canary `version` failing: it is rolled back.
    CanaryFailed {
        version: String,
        reason: String,
    },
    /// `version` runs as the tenant's shadow, or (`None`) none does.
    Shadow {
        version: Option<String>,
    },
}

/// A change of the admin API's keys. Only a key's hash travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyChange {
    Created(super::keys::KeyRecord),
    /// Key `id`, bound to `tenant`, revoked.
    Revoked {
        id: String,
        tenant: Option<String>,
    },
}

/// One tenant's figures on one node over its last interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantFigures {
    pub tenant: String,
    /// Connections the node holds.
    pub connections: u64,
    /// Users the node owns with a connection on any node: summed over the
    /// nodes, each online user once.
    pub users: u64,
    /// Messages pushed through the node, and delivered by it, in the
    /// interval.
    pub pushed: u64,
    pub delivered: u64,
}

/// A connection as the owner of its user knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldConnection {
    pub node: String,
    pub id: u64,
    pub opened_at_micros: u64,
}

/// One connection in the cluster: the node that holds it and its id there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRef {
    pub node: String,
    pub id: u64,
}

impl Change {
    /// The event's name, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NodeStopped => "node_stopped",
            Self::TenantPut { .. } => "tenant_put",
            Self::TenantRemoved { .. } => "tenant_removed",
            Self::PluginInstalled { .. } => "plugin_installed",
            Self::PluginActivated { .. } => "plugin_activated",
            Self::PluginRolledBack { .. } => "plugin_rolled_back",
            Self::PluginRemoved { .. } => "plugin_removed",
            Self::ConnectionOpened { .. } => "connection_opened",
            Self::ConnectionClosed { .. } => "connection_closed",
            Self::Disconnect { .. } => "disconnect",
            Self::Subscriptions { .. } => "subscriptions",
            Self::PluginCanary { .. } => "plugin_canary",
            Self::PluginCanaryEnded { .. } => "plugin_canary_ended",
            Self::PluginCanaryFailed { .. } => "plugin_canary_failed",
            Self::PluginShadow { .. } => "plugin_shadow",
            Self::CapExceeded { .. } => "cap_exceeded",
            Self::PresenceAsked { .. } => "presence_asked",
            Self::PresenceAnswered { .. } => "presence_answered",
            Self::ConnectionHeld { .. } => "connection_held",
            Self::Figures { .. } => "figures",
            Self::PusherChannels { .. } => "pusher_channels",
            Self::Connections(_) => "connections",
            Self::Tenant { change, .. } => match change {
                TenantChange::Put { .. } => "tenant_put",
                TenantChange::Removed { .. } => "tenant_removed",
                TenantChange::PushKeys { .. } => "tenant_push_keys",
            },
            Self::Plugin { change, .. } => match change {
                PluginChange::Installed { .. } => "plugin_installed",
                PluginChange::Activated { .. } => "plugin_activated",
                PluginChange::RolledBack { .. } => "plugin_rolled_back",
                PluginChange::Removed { .. } => "plugin_removed",
                PluginChange::Canary { .. } => "plugin_canary",
                PluginChange::CanaryEnded => "plugin_canary_ended",
                PluginChange::CanaryFailed { .. } => "plugin_canary_failed",
                PluginChange::Shadow { .. } => "plugin_shadow",
            },
            Self::Ban { .. } => "ban",
            Self::SnapshotWanted { .. } => "snapshot_wanted",
            Self::SnapshotPart(_) => "snapshot_part",
            Self::SnapshotDue => "snapshot_due",
            Self::Key { change, .. } => match change {
                KeyChange::Created(_) => "key_created",
                KeyChange::Revoked { .. } => "key_revoked",
            },
        }
    }
}

impl Change {
    /// The same change in its domain form: the flat admin variants of
    /// older nodes become [`Change::Tenant`] and [`Change::Plugin`], made
    /// by an unknown actor on node `origin`.
    pub fn into_current(self, origin: &str) -> Self {
        let by = || Actor::node(origin, "a node without audit");
        let plugin = |tenant: String, change| Self::Plugin {
            by: by(),
            tenant,
            change,
        };
        match self {
            Self::TenantPut {
                name,
                settings_json,
            } => Self::Tenant {
                by: by(),
                change: TenantChange::Put {
                    name,
                    settings_json,
                },
            },
            Self::TenantRemoved { name } => Self::Tenant {
                by: by(),
                change: TenantChange::Removed { name },
            },
            Self::PluginInstalled {
                tenant,
                component,
                activate,
            } => plugin(
                tenant,
                PluginChange::Installed {
                    component,
                    activate,
                },
            ),
            Self::PluginActivated { tenant, version } => {
                plugin(tenant, PluginChange::Activated { version })
            }
            Self::PluginRolledBack { tenant, version } => {
                plugin(tenant, PluginChange::RolledBack { version })
            }
            Self::PluginRemoved { tenant, version } => {
                plugin(tenant, PluginChange::Removed { version })
            }
            Self::PluginCanary {
                tenant,
                version,
                percent,
            } => plugin(tenant, PluginChange::Canary { version, percent }),
            Self::PluginCanaryEnded { tenant } => plugin(tenant, PluginChange::CanaryEnded),
            Self::PluginCanaryFailed {
                tenant,
                version,
                reason,
            } => plugin(tenant, PluginChange::CanaryFailed { version, reason }),
            Self::PluginShadow { tenant, version } => {
                plugin(tenant, PluginChange::Shadow { version })
            }
            current => current,
        }
    }

    /// True for facts about connections and nodes and for the questions
    /// and answers between nodes (not admin changes): the node they come
    /// from has nothing to apply when they come back to it.
    pub fn is_connection_fact(&self) -> bool {
        matches!(
            self,
            Self::NodeStopped
                | Self::ConnectionOpened { .. }
                | Self::ConnectionHeld { .. }
                | Self::ConnectionClosed { .. }
                | Self::CapExceeded { .. }
                | Self::PresenceAsked { .. }
                | Self::PresenceAnswered { .. }
                | Self::SnapshotWanted { .. }
                | Self::SnapshotPart(_)
                | Self::SnapshotDue
                | Self::Figures { .. }
                | Self::PusherChannels { .. }
                | Self::Connections(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_connection_facts_reads_back_as_its_single_records() {
        let singles = vec![
            Change::ConnectionHeld {
                owner: "b".into(),
                tenant: "acme".into(),
                user: "eve".into(),
                connection: 7,
                opened_at_micros: 1,
            },
            Change::ConnectionClosed {
                tenant: "acme".into(),
                user: "eve".into(),
                connection: 7,
            },
        ];
        let facts: Vec<ConnectionFact> = singles
            .iter()
            .cloned()
            .map(|change| ConnectionFact::of(change).unwrap())
            .collect();
        let event = ControlEvent {
            origin: "a".into(),
            id: 0,
            change: Change::Connections(facts),
        };
        let Change::Connections(read) = ControlEvent::decode(&event.encode()).unwrap().change
        else {
            panic!("not a batch");
        };
        let read: Vec<Change> = read.into_iter().map(ConnectionFact::into_change).collect();
        assert_eq!(read, singles);
        assert!(ConnectionFact::of(Change::SnapshotDue).is_err());
    }

    #[test]
    fn fuzz_decoding_arbitrary_bytes_never_panics() {
        arbtest::arbtest(|u| {
            let bytes: &[u8] = u.arbitrary()?;
            if let Ok(event) = ControlEvent::decode(bytes) {
                assert_eq!(ControlEvent::decode(&event.encode()).unwrap(), event);
            }
            Ok(())
        })
        .run();
    }
}
