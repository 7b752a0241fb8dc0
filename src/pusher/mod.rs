//! The Pusher Channels protocol (version 7), spoken by the gateway for
//! tenants that serve a Pusher app: what a channel is, who may subscribe
//! to it ([`signature`]), and who is on it across the cluster
//! ([`channels`]). Knows nothing of sockets, the bus or tenants: the edge
//! speaks it to clients (`/app/{key}`) and services (`/apps/{app_id}/…`),
//! the cluster shares its channels, a tenant sends its app's webhooks.
//!
//! One gateway underneath: a channel is a tenant topic, an event is a
//! message whose envelope carries the event's name, a user signed in with
//! `pusher:signin` is a user of the tenant. What a service pushes through
//! either API reaches both kinds of clients.

pub mod channels;
pub mod signature;

use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The channel pusher-js subscribes to once signed in: the user's own
/// events (`sendToUser`), which are a tenant's messages to that user.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";
/// Longest channel name (Pusher's own limit).
pub const MAX_CHANNEL_NAME_BYTES: usize = 164;
/// Members one presence channel may have (Pusher's own limit).
pub const MAX_PRESENCE_MEMBERS: usize = 100;
/// Longest `user_info` of a presence member, in bytes (Pusher's limit).
pub const MAX_USER_INFO_BYTES: usize = 1024;
/// The event name a Pusher client receives for a message pushed without
/// one.
pub const DEFAULT_EVENT: &str = "message";

/// What a channel's name makes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    /// Anyone with the app's key may subscribe.
    Public,
    /// `private-`: the app's auth endpoint must sign the subscription.
    Private,
    /// `private-encrypted-`: as private; the gateway relays ciphertext.
    Encrypted,
    /// `presence-`: as private, and its members are known.
    Presence,
    /// `#server-to-user-{id}`: only the connection signed in as `id`.
    User(String),
}

impl ChannelKind {
    pub fn of(channel: &str) -> Self {
        if let Some(user) = channel.strip_prefix(USER_CHANNEL_PREFIX) {
            Self::User(user.to_owned())
        } else if channel.starts_with("private-encrypted-") {
            Self::Encrypted
        } else if channel.starts_with("private-") {
            Self::Private
        } else if channel.starts_with("presence-") {
            Self::Presence
        } else {
            Self::Public
        }
    }

    /// Whether clients may send `client-*` events on it (when the app
    /// allows them at all).
    pub fn takes_client_events(&self) -> bool {
        matches!(self, Self::Private | Self::Presence)
    }
}

/// A channel name Pusher accepts: 1 to 164 of `A-Za-z0-9_-=@,.;` (and the
/// `#` of a user's channel).
pub fn valid_channel_name(name: &str) -> bool {
    let body = name.strip_prefix(USER_CHANNEL_PREFIX).unwrap_or(name);
    !body.is_empty()
        && name.len() <= MAX_CHANNEL_NAME_BYTES
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// A connection's `socket_id`: `<node>.<connection>`, digits only, as the
/// server libraries check. The node's part is the first four bytes of
/// the SHA-256 of its name, so ids of two nodes do not collide.
pub fn socket_id(node: &str, connection: u64) -> String {
    let digest = Sha256::digest(node.as_bytes());
    let node = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    format!("{node}.{connection}")
}

/// A `socket_id` as the server libraries send it: `<digits>.<digits>`.
pub fn valid_socket_id(id: &str) -> bool {
    id.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.len() <= 20
            && b.len() <= 20
            && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
    })
}

/// The tenant user of a connection that has not signed in: one of its
/// own (`#pusher-<random>`), so that the per-user cap never closes one
/// anonymous client for another.
pub fn anonymous_user() -> String {
    format!("#pusher-{}", uuid::Uuid::new_v4().simple())
}

/// An event's `data` as a message carries it: JSON text as it is (what
/// every server library sends), anything else as a JSON string.
pub fn message_data(text: &str) -> String {
    if serde_json::from_str::<&RawValue>(text).is_ok() {
        text.to_owned()
    } else {
        serde_json::Value::String(text.to_owned()).to_string()
    }
}

/// One event frame as a Pusher client reads it: `data` is a string.
#[derive(Serialize)]
pub struct EventFrame<'a> {
    pub event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    /// JSON text, sent as a string.
    pub data: &'a str,
    /// The sender of a client event on a presence channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
    /// The event's position, for a client that recovers (an app with
    /// `recovery`): what it sends as `since` when it subscribes again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pos: Option<&'a str>,
}

impl EventFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event frame serialises")
    }
}

/// `pusher:error` with `code` (4000–4299 as the protocol defines them).
pub fn error_frame(code: Option<u16>, message: &str) -> String {
    serde_json::json!({
        "event": "pusher:error",
        "data": { "code": code, "message": message },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_and_kinds_follow_the_protocol() {
        assert_eq!(ChannelKind::of("news"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("private-a"), ChannelKind::Private);
        assert_eq!(
            ChannelKind::of("private-encrypted-a"),
            ChannelKind::Encrypted
        );
        assert_eq!(ChannelKind::of("presence-a"), ChannelKind::Presence);
        assert_eq!(
            ChannelKind::of("#server-to-user-7"),
            ChannelKind::User("7".into())
        );
        assert!(valid_channel_name("private-chat.1=@,;_-"));
        assert!(valid_channel_name("#server-to-user-ann"));
        for bad in ["", "a b", "ä", "#x", "#server-to-user-", &"x".repeat(165)] {
            assert!(!valid_channel_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn socket_ids_are_digits_dot_digits_and_differ_by_node() {
        let a = socket_id("node-a", 7);
        assert!(valid_socket_id(&a), "{a}");
        assert_ne!(a, socket_id("node-b", 7));
        for bad in ["", "1", "1.", ".1", "1.2.3", "a.1", "1.-2"] {
            assert!(!valid_socket_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn data_that_is_json_stays_as_it_is_and_other_text_becomes_a_string() {
        assert_eq!(message_data(r#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(message_data("hello"), r#""hello""#);
        let frame = EventFrame {
            event: "e",
            channel: Some("c"),
            data: r#"{"a":1}"#,
            user_id: None,
            pos: None,
        };
        assert_eq!(
            frame.to_json(),
            r#"{"event":"e","channel":"c","data":"{\"a\":1}"}"#
        );
    }
}
