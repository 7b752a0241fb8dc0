//! A Pusher client's subscriptions: who may subscribe to which channel
//! (signatures, presence data, the signed-in user's channel), joining and
//! leaving the cluster's view of the channel, and a recovering client's
//! missed messages.

use std::sync::Arc;

use super::{Answer, Client, SubscribeData, event, subscription_error};
use crate::bus::envelope::Position;
use crate::delivery::{Subscribed, subscribe_resuming};
use crate::pusher::{
    ChannelKind, MAX_PRESENCE_MEMBERS, MAX_USER_INFO_BYTES, USER_CHANNEL_PREFIX, signature,
    valid_channel_name,
};
use crate::tenant::MAX_USER_BYTES;

/// Refused subscriptions (bad signatures) before the client is closed.
const MAX_REFUSED_SUBSCRIPTIONS: u32 = 10;

impl Client {
    fn refuse(&mut self, channel: &str, kind: &str, error: &str, status: u16) -> Answer {
        self.refused += 1;
        let mut answer = Answer::reply(subscription_error(channel, kind, error, status));
        if self.refused >= MAX_REFUSED_SUBSCRIPTIONS {
            answer.close = Some((
                4009,
                "too many refused subscriptions",
                "subscriptions_refused",
            ));
        }
        answer
    }

    pub(super) async fn subscribe(&mut self, request: SubscribeData) -> Answer {
        let SubscribeData {
            channel,
            auth,
            channel_data,
            since,
        } = request;
        let since = match since {
            Some(since) if self.app().recovery => match Position::parse(&since) {
                Some(since) => Some(since),
                None => {
                    return self.refuse(&channel, "InvalidSince", "since: not a position", 400);
                }
            },
            _ => None,
        };
        if !valid_channel_name(&channel) {
            return self.refuse(&channel, "InvalidChannel", "invalid channel name", 400);
        }
        let kind = ChannelKind::of(&channel);
        let auth = auth.unwrap_or_default();
        let member = match &kind {
            ChannelKind::Public => None,
            ChannelKind::Private | ChannelKind::Encrypted => {
                if !signature::channel_authorised(
                    self.app(),
                    &self.socket_id,
                    &channel,
                    None,
                    &auth,
                ) {
                    return self.refuse(&channel, "AuthError", "invalid signature", 401);
                }
                None
            }
            ChannelKind::Presence => {
                let data = channel_data.as_deref().unwrap_or("");
                if !signature::channel_authorised(
                    self.app(),
                    &self.socket_id,
                    &channel,
                    Some(data),
                    &auth,
                ) {
                    return self.refuse(&channel, "AuthError", "invalid signature", 401);
                }
                match presence_member(data) {
                    Some(member) => Some(member),
                    None => {
                        return self.refuse(
                            &channel,
                            "InvalidChannelData",
                            "channel_data needs a user_id, and a user_info of at most 1 KB",
                            400,
                        );
                    }
                }
            }
            ChannelKind::User(user) => {
                return match &mut self.signed_in {
                    Some((signed_in, subscribed)) if signed_in == user => {
                        *subscribed = true;
                        Answer::reply(event(
                            "pusher_internal:subscription_succeeded",
                            Some(&channel),
                            &serde_json::json!({}),
                        ))
                    }
                    _ => self.refuse(&channel, "AuthError", "sign in as this user first", 403),
                };
            }
        };
        let directory = self.gateway.cluster.pusher_channels().clone();
        if let Some((id, _)) = &member {
            let view = directory.view(&self.tenant.name, &channel);
            if !view.members.contains_key(id) && view.members.len() >= MAX_PRESENCE_MEMBERS {
                return self.refuse(
                    &channel,
                    "LimitReached",
                    "the presence channel has its most members (100)",
                    403,
                );
            }
        }
        let limit = self.gateway.config.websocket.max_topics_per_connection;
        let topic: Arc<str> = Arc::from(channel.as_str());
        let (sessions, handle) = (self.gateway.sessions.clone(), self.handle.clone());
        let subscribe = || sessions.subscribe(&handle, topic.clone(), limit);
        let (subscribed, recovered) = match since {
            Some(since) => {
                let (subscribed, frames, complete) = subscribe_resuming(
                    &self.gateway.sessions,
                    &self.gateway.plugins,
                    &self.tenant,
                    &handle,
                    (&channel, since),
                    subscribe,
                )
                .await;
                (subscribed, Some((frames, complete)))
            }
            None => (subscribe(), None),
        };
        match subscribed {
            Subscribed::Added => {
                let joined = member
                    .as_ref()
                    .map(|(id, info)| (id.as_str(), info.as_str()));
                let changed = directory.join(&self.tenant.name, &channel, joined);
                self.gateway
                    .cluster
                    .pusher_channel_changed(changed, Some(&self.socket_id));
                self.channels
                    .insert(channel.clone(), member.map(|(id, _)| id));
            }
            Subscribed::Already => {}
            Subscribed::AtLimit => {
                return self.refuse(
                    &channel,
                    "LimitReached",
                    "this connection has as many channels as it may",
                    400,
                );
            }
        }
        let data = match kind {
            ChannelKind::Presence => {
                let view = directory.view(&self.tenant.name, &channel);
                let hash: serde_json::Map<String, serde_json::Value> = view
                    .members
                    .iter()
                    .map(|(id, info)| {
                        let info = serde_json::from_str(info).unwrap_or(serde_json::Value::Null);
                        (id.clone(), info)
                    })
                    .collect();
                let ids: Vec<&String> = view.members.keys().collect();
                serde_json::json!({ "presence": { "ids": ids, "hash": hash, "count": ids.len() } })
            }
            _ => serde_json::json!({}),
        };
        let mut answer = Answer::reply(event(
            "pusher_internal:subscription_succeeded",
            Some(&channel),
            &data,
        ));
        // What it missed follows, then whether that was all of it.
        if let Some((frames, complete)) = recovered {
            // Member events are not replayed: the members above are now's.
            let missed: Vec<String> = frames
                .iter()
                .filter(|frame| !frame.payload().contains("\"event\":\"pusher_internal:"))
                .filter_map(|frame| self.translate(frame))
                .collect();
            let replayed = missed.len();
            answer.replies.extend(missed);
            answer.replies.push(event(
                "pushgate:recovered",
                Some(&channel),
                &serde_json::json!({ "complete": complete, "replayed": replayed }),
            ));
        }
        answer
    }

    pub(super) fn unsubscribe(&mut self, channel: &str) {
        if let Some((user, subscribed)) = &mut self.signed_in
            && channel.strip_prefix(USER_CHANNEL_PREFIX) == Some(user.as_str())
        {
            *subscribed = false;
            return;
        }
        let Some(member) = self.channels.remove(channel) else {
            return;
        };
        self.gateway.sessions.unsubscribe(&self.handle, channel);
        let changed = self.gateway.cluster.pusher_channels().leave(
            &self.tenant.name,
            channel,
            member.as_deref(),
        );
        self.gateway.cluster.pusher_channel_changed(changed, None);
    }
}

/// A presence subscription's member: `user_id` (a string or a number)
/// and `user_info` (JSON text, at most 1 KB).
fn presence_member(channel_data: &str) -> Option<(String, String)> {
    let data: serde_json::Value = serde_json::from_str(channel_data).ok()?;
    let id = match data.get("user_id")? {
        serde_json::Value::String(id) => id.clone(),
        serde_json::Value::Number(id) => id.to_string(),
        _ => return None,
    };
    if id.is_empty() || id.len() > MAX_USER_BYTES {
        return None;
    }
    let info = data
        .get("user_info")
        .map_or_else(|| "null".to_owned(), |info| info.to_string());
    (info.len() <= MAX_USER_INFO_BYTES).then_some((id, info))
}
