//! Control events: changes made through one node's admin API, and facts
//! about connections and nodes, that every node of a cluster applies in
//! the order the bus delivers them.
//!
//! They carry only data. The bus carries their binary form as an opaque
//! control record (see [`crate::bus::envelope`]); [`super::apply`] applies
//! them.

use serde::{Deserialize, Serialize};

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

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The node stopped: it holds no connection any more.
    NodeStopped,
    /// A tenant was created or replaced; its settings as JSON (the admin
    /// API's form, which older and newer nodes both read).
    TenantPut {
        name: String,
        settings_json: String,
    },
    TenantRemoved {
        name: String,
    },
    /// A plugin component was uploaded (and activated, if `activate`).
    PluginInstalled {
        tenant: String,
        component: Vec<u8>,
        activate: bool,
    },
    PluginActivated {
        tenant: String,
        version: String,
    },
    /// The tenant rolled back to `version`.
    PluginRolledBack {
        tenant: String,
        version: String,
    },
    PluginRemoved {
        tenant: String,
        version: String,
    },
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
    /// `version` serves `percent` of the tenant's users (a canary).
    PluginCanary {
        tenant: String,
        version: String,
        percent: u8,
    },
    /// The tenant's canary ended: the active version serves everyone.
    PluginCanaryEnded {
        tenant: String,
    },
    /// A node found the canary `version` failing: it is rolled back.
    PluginCanaryFailed {
        tenant: String,
        version: String,
        reason: String,
    },
    /// `version` runs as the tenant's shadow, or (`None`) none does.
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
        }
    }
}

impl Change {
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
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
