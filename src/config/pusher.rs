//! A tenant's Pusher Channels app: what clients written for Pusher (the
//! `pusher-js` library, Laravel Echo) and services using a Pusher server
//! library need to talk to the tenant.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Client events (`client-*`) one connection may send per second: Pusher's
/// own limit.
pub const DEFAULT_CLIENT_EVENTS_PER_SECOND: u32 = 10;
/// How long a Pusher client may stay silent before it pings: what
/// `pusher:connection_established` tells it (Pusher's own 120 s).
pub const DEFAULT_ACTIVITY_TIMEOUT: Duration = Duration::from_secs(120);

/// `[tenants.X.pusher]`: the tenant serves one Pusher app, its clients at
/// `/app/{key}`, its services at `/apps/{app_id}/…`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PusherConfig {
    /// The app's id in the HTTP API's paths.
    pub app_id: String,
    /// The public key clients connect with; also `auth_key` of signed
    /// API requests.
    pub key: String,
    /// Signs channel authorisations, API requests and webhooks.
    pub secret: String,
    /// Whether clients may send `client-*` events on private and presence
    /// channels.
    #[serde(default)]
    pub client_events: bool,
    /// Client events one connection may send per second; past it the
    /// event is refused (error 4301).
    #[serde(default = "default_client_events_per_second")]
    pub client_events_per_second: u32,
    /// Where the app's webhooks go (`channel_occupied`, `channel_vacated`,
    /// `member_added`, `member_removed`, `client_event`), in Pusher's
    /// format; none without it.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Whether a client that subscribes again after a reconnect may ask
    /// for what it missed: each event then carries its position (`pos`),
    /// and a `pusher:subscribe` with `since` gets the channel's messages
    /// after it from the tenant's history, then `pushgate:recovered`.
    #[serde(default)]
    pub recovery: bool,
    /// How long a client may stay silent before it pings.
    #[serde(default = "default_activity_timeout", with = "humantime_serde")]
    pub activity_timeout: Duration,
}

fn default_client_events_per_second() -> u32 {
    DEFAULT_CLIENT_EVENTS_PER_SECOND
}

fn default_activity_timeout() -> Duration {
    DEFAULT_ACTIVITY_TIMEOUT
}

impl PusherConfig {
    /// Checks what types alone cannot express.
    pub fn validate(&self, tenant: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("tenants.{tenant}.pusher.{name}");
        for (name, value) in [
            ("app_id", &self.app_id),
            ("key", &self.key),
            ("secret", &self.secret),
        ] {
            let plain = value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if value.is_empty() || value.len() > 128 || !plain {
                return Err(ConfigError::new(format!(
                    "{} is 1 to 128 letters, digits, '-', '_' or '.'",
                    field(name)
                )));
            }
        }
        if self.client_events_per_second == 0 {
            return Err(ConfigError::new(format!(
                "{} must be greater than 0",
                field("client_events_per_second")
            )));
        }
        if let Some(url) = &self.webhook_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::new(format!(
                "{} must be an http:// or https:// URL",
                field("webhook_url")
            )));
        }
        if self.activity_timeout < Duration::from_secs(1) {
            return Err(ConfigError::new(format!(
                "{} is at least 1s",
                field("activity_timeout")
            )));
        }
        Ok(())
    }
}
