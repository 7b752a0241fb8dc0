//! The HTTP push API on the internal listener: `POST /v1/push` and
//! `POST /v1/push/batch`.
//!
//! Authenticates the calling service by its tenant push key, validates the
//! request, and answers `202` only once the bus has taken the message(s).
//! Knows nothing of how delivery happens; it shares with delivery only the
//! form a plugin sees a message in (`delivery::plugin_message`), so that
//! `on-publish` here and `on-deliver` there see the same.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::bus::BusError;
use crate::bus::envelope::{Envelope, Target};
use crate::config::{FailurePolicy, PushConfig};
use crate::edge::api_error::ApiError;
use crate::edge::gateway::Gateway;
use crate::metrics;
use crate::plugin::registry::HookPlugins;
use crate::plugin::{Hook, PluginFailure, PublishVerdict};
use crate::tenant::{RetryAfter, Tenant};

/// Longest user id or topic a message may address.
pub const MAX_ADDRESS_BYTES: usize = crate::tenant::MAX_USER_BYTES;

/// One message as a caller pushes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// Optional: the tenant the caller means. When present it must be the
    /// tenant of the key (403 otherwise, 404 if there is no such tenant).
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    users: Option<Vec<String>>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    broadcast: bool,
    data: Box<RawValue>,
    /// The caller's key for this message (else the `Idempotency-Key`
    /// header of a single push): a retry with the same key within the
    /// window is delivered at most once.
    #[serde(default)]
    idempotency_key: Option<String>,
    /// A single push to users answers how many were offline: always on
    /// one node, where it is free; in a cluster when asked (their owners
    /// are asked over the bus, a round trip before the answer).
    #[serde(default)]
    report_offline: Option<bool>,
    /// The event's name, for clients that bind to names (Pusher clients;
    /// without one they receive `message`).
    #[serde(default)]
    event: Option<String>,
}

/// Longest event name (Pusher's own limit).
pub const MAX_EVENT_NAME_BYTES: usize = 200;

/// An event name a client can bind to: 1 to [`MAX_EVENT_NAME_BYTES`]
/// bytes.
pub(crate) fn check_event_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_EVENT_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "an event name is 1 to {MAX_EVENT_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// The `Idempotency-Key` header, if any.
fn idempotency_header(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|value| {
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))
        })
        .transpose()
}

/// Many messages in one request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    messages: Vec<PushRequest>,
}

/// `POST /v1/push`.
pub async fn push_one(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let tenant = caller_tenant(&gateway, &headers)?;
        let mut request: PushRequest = parse_body(&gateway.config.push, &headers, body).await?;
        if let Some(key) = idempotency_header(&headers)? {
            request.idempotency_key.get_or_insert(key);
        }
        let report_offline = request
            .report_offline
            .unwrap_or(!gateway.bus.reaches_other_nodes());
        let envelope = to_envelope(&gateway, &tenant, request)?;
        admit(&tenant, 1)?;
        let id = envelope.id.clone();
        let published = on_publish(&gateway, &tenant, vec![envelope]).await?;
        match published.into_iter().next() {
            Some(Published::Kept(envelope)) => {
                // For a push to users: how many had no connection anywhere
                // (the caller may choose another channel for them), asked
                // of their owners while the push is published.
                let envelope = Arc::new(envelope);
                let offline = async {
                    match &envelope.target {
                        Target::Users(users) if report_offline => {
                            gateway.cluster.offline_users(&tenant.name, users).await
                        }
                        Target::Users(_) | Target::Topic(_) | Target::Broadcast => None,
                    }
                };
                let (published, offline) =
                    tokio::join!(publish(&gateway, &tenant, vec![envelope.clone()]), offline);
                published?;
                Ok::<_, ApiError>(match offline {
                    Some(offline) => json!({ "id": id, "offline_users": offline }),
                    None => json!({ "id": id }),
                })
            }
            Some(Published::Dropped(reason)) => Ok(json!({ "id": id, "dropped": reason })),
            None => Err(ApiError::unavailable(
                "the message was lost on its way to the plugin",
            )),
        }
    }
    .await;
    respond("push", result)
}

/// `POST /v1/push/batch`: all messages are validated first; either all are
/// accepted (202 with their ids, in order) or none is.
pub async fn push_batch(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let tenant = caller_tenant(&gateway, &headers)?;
        let limits = &gateway.config.push;
        let batch: BatchRequest = parse_body(limits, &headers, body).await?;
        if batch.messages.is_empty() {
            return Err(ApiError::bad_request("messages must not be empty"));
        }
        if batch.messages.len() > limits.max_batch {
            return Err(ApiError::bad_request(format!(
                "a batch holds at most {} messages, this one has {}",
                limits.max_batch,
                batch.messages.len()
            )));
        }
        let envelopes = batch
            .messages
            .into_iter()
            .enumerate()
            .map(|(index, request)| {
                to_envelope(&gateway, &tenant, request).map_err(|mut err| {
                    err.message = format!("messages[{index}]: {}", err.message);
                    err
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        admit(&tenant, envelopes.len())?;
        let ids: Vec<String> = envelopes.iter().map(|e| e.id.clone()).collect();
        let mut dropped = serde_json::Map::new();
        let mut accepted = Vec::with_capacity(envelopes.len());
        let published = on_publish(&gateway, &tenant, envelopes).await?;
        for (index, outcome) in published.into_iter().enumerate() {
            match outcome {
                Published::Kept(envelope) => accepted.push(Arc::new(envelope)),
                Published::Dropped(reason) => {
                    dropped.insert(index.to_string(), json!(reason));
                }
            }
        }
        if !accepted.is_empty() {
            publish(&gateway, &tenant, accepted).await?;
        }
        if dropped.is_empty() {
            Ok(json!({ "ids": ids }))
        } else {
            Ok(json!({ "ids": ids, "dropped": dropped }))
        }
    }
    .await;
    respond("push_batch", result)
}

fn respond(route: &'static str, result: Result<serde_json::Value, ApiError>) -> Response {
    let response = match result {
        Ok(body) => (StatusCode::ACCEPTED, Json(body)).into_response(),
        Err(err) => err.into_response(),
    };
    metrics::push_request(route, response.status().as_u16());
    response
}

/// The tenant whose push key the caller presents.
pub(super) fn caller_tenant(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<Arc<Tenant>, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <push key>"))?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization must be: Bearer <push key>"))?;
    gateway
        .tenants
        .snapshot()
        .by_push_key(key)
        .cloned()
        .ok_or_else(|| ApiError::unauthorized("unknown push key"))
}

/// Reads at most `push.max_body_bytes` and parses it as JSON.
pub(super) async fn parse_body<T: for<'de> Deserialize<'de>>(
    limits: &PushConfig,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, limits.max_body_bytes).await?;
    serde_json::from_slice(&bytes)
        .map_err(|err| ApiError::bad_request(format!("malformed JSON body: {err}")))
}

/// Reads a request body of at most `limit` bytes (413 above it), refusing
/// early when `Content-Length` already says it is too large.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("request body exceeds {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let bytes: Bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(err) => {
            return Err(ApiError::bad_request(format!(
                "could not read the body: {err}"
            )));
        }
    };
    Ok(bytes)
}

pub(super) fn check_address(kind: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_ADDRESS_BYTES {
        return Err(ApiError::bad_request(format!(
            "a {kind} is 1 to {MAX_ADDRESS_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Validates one message against the caller's tenant and the limits.
fn to_envelope(
    gateway: &Gateway,
    tenant: &Tenant,
    request: PushRequest,
) -> Result<Envelope, ApiError> {
    if let Some(named) = &request.tenant
        && **named != *tenant.name
    {
        return Err(if gateway.tenants.snapshot().get(named).is_none() {
            ApiError::not_found(format!("unknown tenant {named:?}"))
        } else {
            ApiError::forbidden(format!("this push key does not belong to tenant {named:?}"))
        });
    }
    let target = match (request.users, request.topic, request.broadcast) {
        (Some(users), None, false) => {
            if users.is_empty() {
                return Err(ApiError::bad_request("users must not be empty"));
            }
            let max = gateway.config.push.max_users_per_message;
            if users.len() > max {
                return Err(ApiError::bad_request(format!(
                    "a message addresses at most {max} users, this one {}",
                    users.len()
                )));
            }
            for user in &users {
                check_address("user id", user)?;
            }
            Target::Users(users)
        }
        (None, Some(topic), false) => {
            check_address("topic", &topic)?;
            Target::Topic(topic)
        }
        (None, None, true) => Target::Broadcast,
        _ => {
            return Err(ApiError::bad_request(
                "address exactly one of: \"users\", \"topic\" or \"broadcast\": true",
            ));
        }
    };
    let data = request.data.get();
    let max = tenant.config.max_message_bytes;
    if data.len() > max {
        return Err(ApiError::too_large(format!(
            "data is {} bytes; this tenant's limit is {max}",
            data.len()
        )));
    }
    if let Some(key) = &request.idempotency_key {
        let visible = key.bytes().all(|b| b.is_ascii_graphic());
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES || !visible {
            return Err(ApiError::bad_request(format!(
                "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"
            )));
        }
    }
    if let Some(event) = &request.event {
        check_event_name(event)?;
    }
    let mut envelope = Envelope::new(&tenant.name, target, data.to_owned());
    envelope.idempotency_key = request.idempotency_key;
    envelope.event = request.event;
    Ok(envelope)
}

/// What the tenant's `on-publish` hook made of one message.
pub(crate) enum Published {
    /// Published as it is now (perhaps rewritten by the plugin).
    Kept(Envelope),
    /// Not published, for this reason.
    Dropped(String),
}

/// How long a caller refused for a busy plugin is told to wait.
const PLUGIN_BUSY_RETRY: Duration = Duration::from_secs(1);

/// Runs the tenant's `on-publish` hook on each of `envelopes`, in order,
/// on the blocking pool within the tenant's share (never on the async
/// workers); with no hook, keeps them all. A share in use answers 503.
pub(crate) async fn on_publish(
    gateway: &Gateway,
    tenant: &Arc<Tenant>,
    envelopes: Vec<Envelope>,
) -> Result<Vec<Published>, ApiError> {
    let Some(plugin) = gateway.plugins.hook(&tenant.name, Hook::OnPublish) else {
        return Ok(envelopes.into_iter().map(Published::Kept).collect());
    };
    let (calling, caller) = (plugin.clone(), tenant.clone());
    tenant
        .run_plugin_work(move || {
            envelopes
                .into_iter()
                .map(|envelope| publish_hook(&caller, &calling, envelope))
                .collect()
        })
        .await
        .map_err(|busy| {
            plugin.active.record_skipped(Hook::OnPublish, "busy");
            ApiError::unavailable(busy.to_string()).retry_after(PLUGIN_BUSY_RETRY)
        })
}

/// One `on-publish` call: the message passes, is rewritten, or is dropped.
/// A failed call applies the tenant's failure policy. During a canary, a
/// message for one user is decided by the version serving that user, any
/// other message by the version its id falls to; a shadow version gets a
/// copy of the call.
fn publish_hook(tenant: &Tenant, plugins: &HookPlugins, mut envelope: Envelope) -> Published {
    let fail_open = tenant.config.plugin.failure_policy == FailurePolicy::Open;
    let failed = |envelope: Envelope, reason: &str| {
        if fail_open {
            Published::Kept(envelope)
        } else {
            tenant.metrics.dropped_by_plugin.increment(1);
            Published::Dropped(reason.to_owned())
        }
    };
    let key = match &envelope.target {
        Target::Users(users) if users.len() == 1 => users[0].as_str(),
        _ => envelope.id.as_str(),
    };
    let message = crate::delivery::plugin_message(&envelope);
    let verdict = plugins
        .serving(key)
        .on_publish(&tenant.plugin_settings, &message);
    if let Some(shadow) = &plugins.shadow {
        shadow.on_publish(&tenant.plugin_settings, &message, &verdict);
    }
    match verdict {
        Ok(PublishVerdict::Pass) => Published::Kept(envelope),
        Ok(PublishVerdict::Drop(reason)) => {
            tenant.metrics.dropped_by_plugin.increment(1);
            Published::Dropped(reason)
        }
        // Checked in the call: JSON within the tenant's max_message_bytes.
        Ok(PublishVerdict::Replace(data)) => {
            envelope.data = data;
            Published::Kept(envelope)
        }
        Err(PluginFailure::BadOutput) => failed(
            envelope,
            "the tenant's plugin returned data that is not JSON or over max_message_bytes",
        ),
        Err(_) => failed(envelope, "the tenant's plugin failed"),
    }
}

/// Takes `messages` from the tenant's push rate budget.
pub(crate) fn admit(tenant: &Tenant, messages: usize) -> Result<(), ApiError> {
    let messages = u32::try_from(messages).unwrap_or(u32::MAX);
    tenant.admit_push(messages).map_err(|RetryAfter(wait)| {
        ApiError::too_many_requests(format!(
            "this tenant may push {} messages per second (bursts of {})",
            tenant.config.push_rate_per_second, tenant.config.push_burst
        ))
        .retry_after(wait)
    })
}

/// Hands envelopes to the bus. The bus withdraws them if it has not started
/// sending them within `push.bus_timeout` (an error: published nowhere).
pub(crate) async fn publish(
    gateway: &Gateway,
    tenant: &Tenant,
    envelopes: Vec<Arc<Envelope>>,
) -> Result<(), ApiError> {
    let count = envelopes.len() as u64;
    match gateway
        .bus
        .publish(envelopes, gateway.config.push.bus_timeout)
        .await
    {
        Ok(()) => {
            tenant.metrics.pushed.increment(count);
            Ok(())
        }
        Err(err @ BusError::TooLarge { .. }) => Err(ApiError::too_large(err.to_string())),
        Err(err @ BusError::Unknown(_)) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            format!("{err}; retry with the same Idempotency-Key to have it delivered at most once"),
        )),
        Err(err) => Err(ApiError::unavailable(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outside input of the push API: a body, parsed and its addresses
    /// checked as the handlers do.
    #[test]
    fn fuzz_push_bodies_are_parsed_or_refused_never_a_panic() {
        const WORDS: &[&str] = &[
            "users",
            "topic",
            "broadcast",
            "data",
            "tenant",
            "messages",
            "idempotency_key",
            "",
        ];
        arbtest::arbtest(|u| {
            let body = crate::fuzzing::text(u, WORDS)?;
            if let Ok(request) = serde_json::from_str::<PushRequest>(&body) {
                for user in request.users.iter().flatten() {
                    let _ = check_address("user id", user);
                }
                if let Some(topic) = &request.topic {
                    let _ = check_address("topic", topic);
                }
            }
            let _ = serde_json::from_str::<BatchRequest>(&body);
            Ok(())
        })
        .run();
    }
}
