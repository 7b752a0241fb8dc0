//! Control events: changes made through one node's admin API, and facts
//! about connections and nodes, that every other node of a cluster applies.
//!
//! They travel the bus beside pushed messages (see [`crate::envelope`]) and
//! carry only data; [`crate::cluster`] applies them.

use serde::{Deserialize, Serialize};

/// One change, announced by the node it happened on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlEvent {
    /// Instance name of the announcing node.
    pub origin: String,
    pub change: Change,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The node is alive. Its own heartbeat coming back also proves to a
    /// node that its consumer receives. A new `started_at_micros` means the
    /// node restarted: its older connections are gone.
    Heartbeat {
        started_at_micros: u64,
    },
    /// The node stopped: it holds no connection any more.
    NodeStopped,
    /// Sent by a draining node to every queue of the topic: once all copies
    /// came back, it has received everything stored before. Others ignore it.
    Barrier {
        id: u64,
    },
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
    /// A user opened a connection on the origin node.
    ConnectionOpened {
        tenant: String,
        user: String,
        connection: u64,
        opened_at_micros: u64,
    },
    /// A connection on the origin node ended.
    ConnectionClosed {
        tenant: String,
        user: String,
        connection: u64,
    },
}

impl Change {
    /// The event's name, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Heartbeat { .. } => "heartbeat",
            Self::NodeStopped => "node_stopped",
            Self::Barrier { .. } => "barrier",
            Self::TenantPut { .. } => "tenant_put",
            Self::TenantRemoved { .. } => "tenant_removed",
            Self::PluginInstalled { .. } => "plugin_installed",
            Self::PluginActivated { .. } => "plugin_activated",
            Self::PluginRolledBack { .. } => "plugin_rolled_back",
            Self::PluginRemoved { .. } => "plugin_removed",
            Self::ConnectionOpened { .. } => "connection_opened",
            Self::ConnectionClosed { .. } => "connection_closed",
        }
    }
}
