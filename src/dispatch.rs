//! Delivery on this node: consumes the bus, finds the local recipients of
//! each envelope and queues one shared frame to each of them.
//!
//! A frame is serialised once per message and shared (reference-counted) by
//! every recipient. Queuing never waits: a recipient whose queue is full is
//! closed as a slow client, so no client slows down anybody else.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::bus::BusReceiver;
use crate::envelope::{Envelope, Target, now_micros};
use crate::session::{ConnectionHandle, Enqueued, SessionManager};
use crate::tenant::TenantDirectory;

/// The JSON frame a client receives for each message.
#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    data: &'a RawValue,
}

/// Serialises the client frame of `envelope` once.
pub fn message_frame(envelope: &Envelope) -> Result<Message, serde_json::Error> {
    let data: &RawValue = serde_json::from_str(&envelope.data)?;
    let topic = match &envelope.target {
        Target::Topic(topic) => Some(topic.as_str()),
        Target::Users(_) | Target::Broadcast => None,
    };
    let json = serde_json::to_string(&MessageFrame {
        kind: "message",
        id: &envelope.id,
        topic,
        data,
    })?;
    Ok(Message::Text(Utf8Bytes::from(json)))
}

/// Tallies of one dispatch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DispatchOutcome {
    pub queued: u64,
    pub overflowed: u64,
    pub gone: u64,
}

/// Delivers envelopes to the connections this node holds.
pub struct Dispatcher {
    sessions: Arc<SessionManager>,
    tenants: Arc<TenantDirectory>,
}

impl Dispatcher {
    pub fn new(sessions: Arc<SessionManager>, tenants: Arc<TenantDirectory>) -> Self {
        Self { sessions, tenants }
    }

    /// Consumes `bus` until every publisher is gone.
    pub async fn run(self, mut bus: BusReceiver) {
        while let Some(envelope) = bus.next().await {
            self.dispatch(&envelope);
        }
    }

    /// Queues `envelope`'s frame to each local recipient and records metrics.
    pub fn dispatch(&self, envelope: &Envelope) -> DispatchOutcome {
        let snapshot = self.tenants.snapshot();
        let Some(tenant) = snapshot.get(&envelope.tenant) else {
            tracing::debug!(tenant = %envelope.tenant, id = %envelope.id, "message for an unknown tenant");
            return DispatchOutcome::default();
        };
        let frame = match message_frame(envelope) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::warn!(id = %envelope.id, %err, "message with invalid JSON data dropped");
                return DispatchOutcome::default();
            }
        };
        let mut outcome = DispatchOutcome::default();
        let mut deliver = |connection: &ConnectionHandle| match connection.enqueue(frame.clone()) {
            Enqueued::Queued => outcome.queued += 1,
            Enqueued::Overflowed => outcome.overflowed += 1,
            Enqueued::Gone => outcome.gone += 1,
        };
        let name = &envelope.tenant;
        match &envelope.target {
            Target::Users(users) => {
                for user in users {
                    self.sessions.for_each_of_user(name, user, &mut deliver);
                }
            }
            Target::Topic(topic) => self.sessions.for_each_of_topic(name, topic, &mut deliver),
            Target::Broadcast => self.sessions.for_each_of_tenant(name, &mut deliver),
        }

        let metrics = &tenant.metrics;
        metrics.delivered.increment(outcome.queued);
        if outcome.overflowed > 0 {
            metrics.dropped_queue_full.increment(outcome.overflowed);
            metrics.queue_overflows.increment(outcome.overflowed);
        }
        if outcome.gone > 0 {
            metrics.dropped_connection_gone.increment(outcome.gone);
        }
        if outcome == DispatchOutcome::default() {
            metrics.dropped_no_recipient.increment(1);
        }
        let waited = now_micros().saturating_sub(envelope.published_at_micros);
        metrics
            .delivery_latency
            .record(Duration::from_micros(waited).as_secs_f64());
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_embeds_data_verbatim_and_names_the_topic() {
        let envelope = Envelope::new("t", Target::Topic("news".into()), r#"{"x":[1,2]}"#.into());
        let Message::Text(text) = message_frame(&envelope).unwrap() else {
            panic!("text frame expected");
        };
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["type"], "message");
        assert_eq!(parsed["id"], envelope.id.as_str());
        assert_eq!(parsed["topic"], "news");
        assert_eq!(parsed["data"], serde_json::json!({"x":[1,2]}));
    }

    #[test]
    fn frame_of_a_user_message_has_no_topic() {
        let envelope = Envelope::new("t", Target::Users(vec!["u".into()]), "1".into());
        let Message::Text(text) = message_frame(&envelope).unwrap() else {
            panic!("text frame expected");
        };
        assert!(!text.contains("topic"), "{text}");
    }
}
