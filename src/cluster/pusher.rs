//! Pusher channels across the cluster: this node's part of each channel
//! goes to the others as a fact ([`Change::PusherChannels`]) when it
//! changes and every figures interval; what a change made of a channel
//! (occupied, vacated, a member added or removed) is sent by the node
//! that made it — as member events on the channel and as the app's
//! webhooks — and, for a node that went, by the channel's owner node.

use std::sync::Arc;
use std::time::Duration;

use super::{Change, Cluster};
use crate::bus::envelope::{Envelope, Target};
use crate::pusher::channels::{Changed, ChannelPart, Channels, Transition};
use crate::tenant::pusher_webhooks::PusherWebhookEvent;

/// How long a member event may wait for the bus before it is given up.
const MEMBER_EVENT_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
    /// The Pusher channels this node knows, across the cluster.
    pub(crate) fn pusher_channels(&self) -> &Arc<Channels> {
        &self.state.channels
    }

    /// This node's part of a channel changed: the other nodes learn it,
    /// and what it made of the channel follows (`except_socket`: the
    /// socket whose subscription made it, which hears of it otherwise).
    pub(crate) fn pusher_channel_changed(&self, changed: Changed, except_socket: Option<&str>) {
        let Changed { transitions, part } = changed;
        self.follow_up(&part.tenant, &part.channel, transitions, except_socket);
        self.queue_connection_event(Change::PusherChannels { parts: vec![part] });
    }

    /// Node `origin` told its parts of channels.
    pub(super) fn pusher_parts_received(&self, origin: &str, parts: Vec<ChannelPart>) {
        for part in parts {
            self.state.channels.apply(origin, part);
        }
    }

    /// Node `node` is gone: its parts no longer count, and the owner of
    /// each channel it held sends what that made of it.
    pub(super) fn forget_pusher_node(&self, node: &str) {
        for (tenant, channel, transitions) in self.state.channels.forget_node(node) {
            if self.membership.owns(&tenant, &channel) {
                self.follow_up(&tenant, &channel, transitions, None);
            }
        }
    }

    /// Tells the other nodes this node's part of every channel again.
    pub(super) fn announce_pusher_channels(&self) {
        let parts = self.state.channels.own_parts();
        for parts in parts.chunks(super::ANNOUNCE_BATCH) {
            self.queue_connection_event(Change::PusherChannels {
                parts: parts.to_vec(),
            });
        }
    }

    /// Sends what `transitions` made of `channel`: member events to its
    /// subscribers, and the app's webhooks.
    fn follow_up(
        &self,
        tenant: &str,
        channel: &str,
        transitions: Vec<Transition>,
        except_socket: Option<&str>,
    ) {
        if transitions.is_empty() {
            return;
        }
        let Some(tenant) = self.state.tenants.snapshot().get(tenant).cloned() else {
            return;
        };
        let mut member_events = Vec::new();
        for transition in transitions {
            let (name, user_id) = match &transition {
                Transition::Occupied => ("channel_occupied", None),
                Transition::Vacated => ("channel_vacated", None),
                Transition::MemberAdded(id, _) => ("member_added", Some(id.clone())),
                Transition::MemberRemoved(id) => ("member_removed", Some(id.clone())),
            };
            if let Some(webhooks) = &tenant.pusher_webhooks {
                webhooks.send(PusherWebhookEvent {
                    user_id,
                    ..PusherWebhookEvent::of(name, channel)
                });
            }
            let (event, data) = match transition {
                Transition::MemberAdded(id, info) => (
                    "pusher_internal:member_added",
                    member_data(&id, Some(&info)),
                ),
                Transition::MemberRemoved(id) => {
                    ("pusher_internal:member_removed", member_data(&id, None))
                }
                Transition::Occupied | Transition::Vacated => continue,
            };
            let mut envelope = Envelope::new(&tenant.name, Target::Topic(channel.to_owned()), data);
            envelope.event = Some(event.to_owned());
            envelope.except_socket = except_socket.map(str::to_owned);
            member_events.push(Arc::new(envelope));
        }
        if member_events.is_empty() {
            return;
        }
        let bus = self.bus.clone();
        tokio::spawn(async move {
            if let Err(err) = bus.publish(member_events, MEMBER_EVENT_TIMEOUT).await {
                tracing::warn!(%err, "presence member events lost");
            }
        });
    }
}

/// A member event's data: `{"user_id", "user_info"}` (`user_info` JSON).
fn member_data(id: &str, info: Option<&str>) -> String {
    let info: Option<Box<serde_json::value::RawValue>> =
        info.and_then(|info| serde_json::value::RawValue::from_string(info.to_owned()).ok());
    match info {
        Some(info) => serde_json::json!({ "user_id": id, "user_info": info }).to_string(),
        None => serde_json::json!({ "user_id": id }).to_string(),
    }
}
