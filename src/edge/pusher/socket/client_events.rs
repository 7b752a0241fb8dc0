//! Client events (`client-*`): what one client sends to the other
//! subscribers of a private or presence channel, when the app allows it.

use std::sync::Arc;

use serde_json::value::RawValue;

use super::{Answer, Client, limiter};
use crate::bus::envelope::{Envelope, Target};
use crate::edge::push::{MAX_EVENT_NAME_BYTES, Published, admit, on_publish, publish};
use crate::pusher::ChannelKind;
use crate::tenant::pusher_webhooks::PusherWebhookEvent;

/// Largest client event's data (Pusher's own 10 KB).
const MAX_CLIENT_EVENT_BYTES: usize = 10 * 1024;

impl Client {
    /// A `client-*` event on a private or presence channel, when the app
    /// allows them: published to the channel's other subscribers like a
    /// push (the tenant's plugin, limits and metrics apply).
    pub(super) async fn client_event(
        &mut self,
        name: &str,
        channel: &str,
        data: Option<&RawValue>,
    ) -> Answer {
        if !self.app().client_events {
            return Answer::error(None, "client events are not enabled for this app");
        }
        if !self.channels.contains(channel) || !ChannelKind::of(channel).takes_client_events() {
            return Answer::error(
                None,
                "client events go on a private or presence channel this connection subscribed to",
            );
        }
        let per_second = self.app().client_events_per_second;
        if self
            .client_events
            .get_or_insert_with(|| Box::new(limiter(per_second, per_second)))
            .check()
            .is_err()
        {
            return Answer::error(Some(4301), "client event rejected due to rate limit");
        }
        let data = data.map_or("null", RawValue::get);
        if data.len() > MAX_CLIENT_EVENT_BYTES.min(self.tenant.config.max_message_bytes) {
            return Answer::error(None, "client event data over 10 KB");
        }
        if name.len() > MAX_EVENT_NAME_BYTES {
            return Answer::error(None, "event name over 200 bytes");
        }
        let mut envelope = Envelope::new(
            &self.tenant.name,
            Target::Topic(channel.to_owned()),
            data.to_owned(),
        );
        envelope.event = Some(name.to_owned());
        envelope.except_socket = Some(self.socket_id.clone());
        if let Err(error) = admit(&self.tenant, 1) {
            return Answer::error(Some(4301), &error.message);
        }
        let published = match on_publish(&self.gateway, &self.tenant, vec![envelope]).await {
            Ok(published) => published,
            Err(error) => return Answer::error(None, &error.message),
        };
        let Some(Published::Kept(envelope)) = published.into_iter().next() else {
            return Answer::default();
        };
        let envelope = Arc::new(envelope);
        if let Err(error) = publish(&self.gateway, &self.tenant, vec![envelope.clone()]).await {
            return Answer::error(None, &error.message);
        }
        if let Some(webhooks) = &self.tenant.pusher_webhooks {
            let member = self.channels.member(channel);
            webhooks.send(PusherWebhookEvent {
                user_id: member,
                event: Some(name.to_owned()),
                data: Some(envelope.data.clone()),
                socket_id: Some(self.socket_id.clone()),
                ..PusherWebhookEvent::of("client_event", channel)
            });
        }
        Answer::default()
    }
}
