//! Delivery on this node: the local session index, each connection's
//! outbound queue, and the dispatcher that turns envelopes from the bus
//! into frames queued to the connections this node holds.
//!
//! Knows nothing of HTTP, of bus engines or of other nodes: envelopes
//! arrive through a [`BusReceiver`](crate::bus::BusReceiver), and the
//! per-user cap is a [`UserCap`] rule handed in by whoever knows more.

mod close_reason;
mod dedupe;
pub(crate) mod dispatch;
pub(crate) mod history;
pub(crate) mod outbound;
pub(crate) mod recovery;
pub(crate) mod sessions;
pub(crate) mod wire;

pub use close_reason::CloseReason;
pub use outbound::{ConnectionHandle, ConnectionId};
pub use recovery::{HistoryOf, read_history, subscribe_resuming};
pub(crate) use sessions::{LocalCap, UserCap};
pub use sessions::{Reservation, SessionManager, Subscribed};
pub use wire::WireFrame;

use crate::bus::envelope::{Envelope, Target};
use crate::plugin;

/// A tenant plugin's view of a pushed message.
pub(crate) fn plugin_message(envelope: &Envelope) -> plugin::Message {
    plugin::Message {
        id: envelope.id.clone(),
        tenant: envelope.tenant.clone(),
        target: match &envelope.target {
            Target::Users(users) => plugin::Target::Users(users.clone()),
            Target::Topic(topic) => plugin::Target::Topic(topic.clone()),
            Target::Broadcast => plugin::Target::Broadcast,
        },
        data: envelope.data.clone(),
    }
}
