//! A tenant's Pusher app's webhooks, in Pusher's format: `POST
//! {"time_ms", "events"}` with `X-Pusher-Key` and `X-Pusher-Signature`
//! (hex HMAC-SHA256 of the body under the app's secret), batched and
//! retried like the lifecycle webhooks ([`super::webhooks`]), which send
//! them.

use serde::Serialize;

use super::webhooks::{WebhookFormat, WebhookQueue, WebhookTarget};
use crate::config::{
    DEFAULT_WEBHOOK_MAX_QUEUE, DEFAULT_WEBHOOK_RETRY_FOR, DEFAULT_WEBHOOK_TIMEOUT, PusherConfig,
};
use crate::pusher::signature::sign;

/// One event as Pusher sends it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PusherWebhookEvent {
    /// `channel_occupied`, `channel_vacated`, `member_added`,
    /// `member_removed` or `client_event`.
    pub name: &'static str,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// A client event's name, data and sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<String>,
}

impl PusherWebhookEvent {
    /// An event of `channel` with nothing more.
    pub fn of(name: &'static str, channel: &str) -> Self {
        Self {
            name,
            channel: channel.to_owned(),
            user_id: None,
            event: None,
            data: None,
            socket_id: None,
        }
    }
}

struct PusherFormat {
    key: String,
    secret: String,
}

impl WebhookFormat for PusherFormat {
    type Event = PusherWebhookEvent;

    fn request(&self, batch: &[PusherWebhookEvent]) -> (String, Vec<(&'static str, String)>) {
        let time_ms = crate::clock::now_micros() / 1000;
        let body = serde_json::json!({ "time_ms": time_ms, "events": batch }).to_string();
        let headers = vec![
            ("x-pusher-key", self.key.clone()),
            ("x-pusher-signature", sign(&self.secret, body.as_bytes())),
        ];
        (body, headers)
    }
}

/// One app's webhooks on this node.
pub struct PusherWebhooks(WebhookQueue<PusherWebhookEvent>);

impl PusherWebhooks {
    /// The app's webhooks, if it has a `webhook_url`.
    pub fn of(tenant: &str, app: &PusherConfig) -> Option<Self> {
        let url = app.webhook_url.clone()?;
        let target = WebhookTarget {
            url,
            timeout: DEFAULT_WEBHOOK_TIMEOUT,
            retry_for: DEFAULT_WEBHOOK_RETRY_FOR,
            max_queue: DEFAULT_WEBHOOK_MAX_QUEUE,
        };
        let format = PusherFormat {
            key: app.key.clone(),
            secret: app.secret.clone(),
        };
        Some(Self(WebhookQueue::new(tenant, target, format)))
    }

    /// Queues `event`; never waits.
    pub fn send(&self, event: PusherWebhookEvent) {
        self.0.push(event);
    }
}
