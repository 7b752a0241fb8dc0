//! What a client may send on its connection — `ping`, `subscribe`,
//! `unsubscribe`, `refresh` — and how each is answered: within the
//! client's command budget, the tenant's current subscription rules and
//! its authenticator (a refresh goes through the plugin, within the
//! tenant's share, and a failed one is charged to the client's address).

use std::sync::Arc;

use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use super::{
    ConnectionSettings, MAX_REFUSED_SUBSCRIPTIONS, Registration, error_frame, instant_of,
    json_frame, subscribe_denied,
};
use crate::config::WebhookEvent;
use crate::delivery::{CloseReason, Subscribed};
use crate::edge::ws::MAX_TOPIC_BYTES;
use crate::edge::ws::authenticate::plugin_refresh;
use crate::metrics;
use crate::plugin::Hook;

/// Messages a client may send.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientCommand {
    Ping,
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    /// A fresh token, before the one the connection was opened with expires.
    Refresh {
        token: String,
    },
}

/// Executes one client command: the reply frame, and the reason to close
/// the connection after it, if the client has gone too far.
pub(super) async fn command(
    text: &str,
    registration: &mut Registration,
    settings: &ConnectionSettings,
) -> (Message, Option<CloseReason>) {
    let command = match serde_json::from_str::<ClientCommand>(text) {
        Ok(command) => command,
        Err(err) => return (error_frame(&format!("invalid command: {err}")), None),
    };
    let reply = match command {
        ClientCommand::Ping => super::drive::pong(settings),
        ClientCommand::Subscribe { topic } => {
            if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
                return (
                    error_frame(&format!("a topic is 1 to {MAX_TOPIC_BYTES} bytes")),
                    None,
                );
            }
            registration.take_current_settings();
            let outcome = if registration.may_subscribe(&topic) {
                "allowed"
            } else {
                "denied"
            };
            ::metrics::counter!(
                metrics::SUBSCRIPTIONS,
                "tenant" => registration.tenant.name.to_string(),
                "outcome" => outcome
            )
            .increment(1);
            if outcome == "denied" {
                registration.refused += 1;
                let refused = subscribe_denied(&topic);
                let close = (registration.refused >= MAX_REFUSED_SUBSCRIPTIONS)
                    .then_some(CloseReason::SubscriptionsRefused);
                return (refused, close);
            }
            let subscribed = registration.gateway.sessions.subscribe(
                &registration.handle,
                Arc::from(topic.as_str()),
                settings.max_topics,
            );
            if subscribed == Subscribed::AtLimit {
                let limit = settings.max_topics;
                return (
                    error_frame(&format!("subscription limit of {limit} topics reached")),
                    None,
                );
            }
            registration.tell(WebhookEvent::Subscribed, &topic);
            json_frame(serde_json::json!({"type": "subscribed", "topic": topic}))
        }
        ClientCommand::Refresh { token } => {
            registration.take_current_settings();
            let user = registration.handle.user().clone();
            let tenant = &*registration.tenant;
            // An address whose tokens keep making the plugin fail is
            // refused before the plugin runs, as its handshakes are.
            if let Some(remote) = registration.remote
                && tenant
                    .admit_after_failed_authentications(remote.ip())
                    .is_err()
            {
                return (
                    json_frame(serde_json::json!({
                        "type": "error",
                        "code": "refresh_refused",
                        "message": "too many failed authentications from this address; try again later",
                    })),
                    None,
                );
            }
            let refreshed = match registration
                .gateway
                .plugins
                .hook(&tenant.name, Hook::Authenticate)
            {
                // Boxed: an idle connection's task holds no room for it.
                Some(plugins) => {
                    let refreshed = Box::pin(plugin_refresh(
                        tenant,
                        plugins.active,
                        &user,
                        registration.remote,
                        &token,
                    ))
                    .await;
                    if let (Err(failure), Some(remote)) = (&refreshed, registration.remote)
                        && failure.plugin_failed
                    {
                        // The token made the plugin fail: the client pays.
                        tenant.charge_failed_authentication(remote.ip());
                    }
                    refreshed.map_err(|failure| failure.message)
                }
                None => tenant
                    .authenticator
                    .refresh(&user, &token)
                    .map_err(|err| err.to_string()),
            };
            match refreshed {
                Ok(expires_at_secs) => {
                    registration.expires_at = expires_at_secs.map(instant_of);
                    json_frame(serde_json::json!({
                        "type": "refreshed",
                        "expires_at": expires_at_secs,
                    }))
                }
                Err(message) => json_frame(serde_json::json!({
                    "type": "error",
                    "code": "refresh_refused",
                    "message": message,
                })),
            }
        }
        ClientCommand::Unsubscribe { topic } => {
            registration
                .gateway
                .sessions
                .unsubscribe(&registration.handle, &topic);
            registration.tell(WebhookEvent::Unsubscribed, &topic);
            json_frame(serde_json::json!({"type": "unsubscribed", "topic": topic}))
        }
    };
    (reply, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outside input of a connection: every client text frame.
    #[test]
    fn fuzz_client_commands_are_parsed_or_refused_never_a_panic() {
        const WORDS: &[&str] = &[
            "type",
            "ping",
            "subscribe",
            "unsubscribe",
            "refresh",
            "topic",
            "token",
            "",
        ];
        arbtest::arbtest(|u| {
            let text = crate::fuzzing::text(u, WORDS)?;
            let _ = serde_json::from_str::<ClientCommand>(&text);
            Ok(())
        })
        .run();
    }
}
