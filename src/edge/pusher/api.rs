//! Pusher's HTTP API for an app's services, on the internal listener,
//! every request signed with the app's secret (see
//! `pusher::signature::check_api_request`): trigger events and batches,
//! query channels and presence users, terminate a user's connections.
//! Events become the tenant's messages: the tenant's `on-publish`
//! plugin, push rate and metrics apply as to `/v1/push`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bus::envelope::{Envelope, Target};
use crate::cluster::change::Change;
use crate::edge::api_error::ApiError;
use crate::edge::gateway::Gateway;
use crate::edge::push::{Published, admit, check_event_name, on_publish, publish, read_body};
use crate::pusher::channels::ChannelView;
use crate::pusher::{
    ChannelKind, USER_CHANNEL_PREFIX, message_data, signature, valid_channel_name, valid_socket_id,
};
use crate::tenant::Tenant;

/// Channels one event may name (Pusher's own limit).
const MAX_CHANNELS_PER_EVENT: usize = 100;
/// Events one batch may hold (Pusher's own limit).
const MAX_BATCH_EVENTS: usize = 10;

/// One event as a server library triggers it.
#[derive(Deserialize)]
struct EventRequest {
    name: String,
    /// A string (the libraries send the data's JSON), or any JSON.
    data: Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    /// `subscription_count`, `user_count`, comma-separated.
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct BatchRequest {
    batch: Vec<EventRequest>,
}

/// The app's tenant, once the request's signature is checked.
fn signed_tenant(
    gateway: &Gateway,
    app_id: &str,
    request: &axum::http::request::Parts,
    body: &[u8],
) -> Result<Arc<Tenant>, ApiError> {
    let tenant = gateway
        .tenants
        .snapshot()
        .by_pusher_app(app_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("unknown app {app_id:?}")))?;
    let app = tenant.config.pusher.as_ref().expect("indexed by its app");
    let now = crate::clock::now_micros() / 1_000_000;
    signature::check_api_request(
        app,
        request.method.as_str(),
        request.uri.path(),
        request.uri.query().unwrap_or(""),
        body,
        now,
    )
    .map_err(|err| ApiError::unauthorized(err.to_string()))?;
    Ok(tenant)
}

/// Reads and checks a request: the tenant and the body.
async fn signed(
    gateway: &Gateway,
    app_id: &str,
    request: Request,
) -> Result<(Arc<Tenant>, Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body, gateway.config.push.max_body_bytes).await?;
    let tenant = signed_tenant(gateway, app_id, &parts, &body)?;
    Ok((tenant, body))
}

fn respond(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(value) => (StatusCode::OK, Json(value)).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `POST /apps/{app_id}/events`.
pub(crate) async fn events(
    State(gateway): State<Arc<Gateway>>,
    Path(app_id): Path<String>,
    request: Request,
) -> Response {
    respond(
        async {
            let (tenant, body) = signed(&gateway, &app_id, request).await?;
            let event: EventRequest = parse(&body)?;
            let info = event.info.clone();
            let envelopes = to_envelopes(&tenant, event)?;
            let channels: Vec<String> = envelopes.iter().map(|(c, _)| c.clone()).collect();
            trigger(&gateway, &tenant, envelopes).await?;
            Ok(match info {
                Some(info) => {
                    json!({ "channels": channel_infos(&gateway, &tenant, &channels, &info)? })
                }
                None => json!({}),
            })
        }
        .await,
    )
}

/// `POST /apps/{app_id}/batch_events`: all events are checked first;
/// either all are triggered or none.
pub(crate) async fn batch_events(
    State(gateway): State<Arc<Gateway>>,
    Path(app_id): Path<String>,
    request: Request,
) -> Response {
    respond(
        async {
            let (tenant, body) = signed(&gateway, &app_id, request).await?;
            let batch: BatchRequest = parse(&body)?;
            if batch.batch.len() > MAX_BATCH_EVENTS {
                return Err(ApiError::bad_request(format!(
                    "a batch holds at most {MAX_BATCH_EVENTS} events"
                )));
            }
            let mut infos = Vec::new();
            let mut envelopes = Vec::new();
            for event in batch.batch {
                let info = event.info.clone();
                let made = to_envelopes(&tenant, event)?;
                infos.push((made.first().map(|(c, _)| c.clone()), info));
                envelopes.extend(made);
            }
            trigger(&gateway, &tenant, envelopes).await?;
            if infos.iter().all(|(_, info)| info.is_none()) {
                return Ok(json!({}));
            }
            let mut answers = Vec::new();
            for (channel, info) in infos {
                answers.push(match (channel, info) {
                    (Some(channel), Some(info)) => {
                        let view = gateway
                            .cluster
                            .pusher_channels()
                            .view(&tenant.name, &channel);
                        channel_info(&channel, &view, &info)?
                    }
                    _ => json!({}),
                });
            }
            Ok(json!({ "batch": answers }))
        }
        .await,
    )
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("malformed body: {err}")))
}

/// One envelope per channel the event names; a user's channel
/// (`#server-to-user-{id}`, what `sendToUser` triggers on) is a message
/// to that user.
fn to_envelopes(tenant: &Tenant, event: EventRequest) -> Result<Vec<(String, Envelope)>, ApiError> {
    check_event_name(&event.name)?;
    let channels = match (event.channels, event.channel) {
        (Some(channels), None) => channels,
        (None, Some(channel)) => vec![channel],
        _ => {
            return Err(ApiError::bad_request(
                "name either \"channels\" or \"channel\"",
            ));
        }
    };
    if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_EVENT {
        return Err(ApiError::bad_request(format!(
            "an event names 1 to {MAX_CHANNELS_PER_EVENT} channels"
        )));
    }
    if let Some(socket_id) = &event.socket_id
        && !valid_socket_id(socket_id)
    {
        return Err(ApiError::bad_request("socket_id is <digits>.<digits>"));
    }
    let data = match &event.data {
        Value::String(text) => message_data(text),
        other => other.to_string(),
    };
    let max = tenant.config.max_message_bytes;
    if data.len() > max {
        return Err(ApiError::too_large(format!(
            "data is {} bytes; this app's limit is {max}",
            data.len()
        )));
    }
    let mut envelopes = Vec::with_capacity(channels.len());
    for channel in channels {
        if !valid_channel_name(&channel) {
            return Err(ApiError::bad_request(format!(
                "invalid channel name {channel:?}"
            )));
        }
        let target = match ChannelKind::of(&channel) {
            ChannelKind::User(user) => Target::Users(vec![user]),
            _ => Target::Topic(channel.clone()),
        };
        let mut envelope = Envelope::new(&tenant.name, target, data.clone());
        envelope.event = Some(event.name.clone());
        envelope.except_socket = event.socket_id.clone();
        envelopes.push((channel, envelope));
    }
    Ok(envelopes)
}

/// Publishes events as pushes: the push rate, `on-publish`, the bus.
async fn trigger(
    gateway: &Gateway,
    tenant: &Arc<Tenant>,
    envelopes: Vec<(String, Envelope)>,
) -> Result<(), ApiError> {
    admit(tenant, envelopes.len())?;
    let published = on_publish(
        gateway,
        tenant,
        envelopes.into_iter().map(|(_, e)| e).collect(),
    )
    .await?;
    let kept: Vec<Arc<Envelope>> = published
        .into_iter()
        .filter_map(|p| match p {
            Published::Kept(envelope) => Some(Arc::new(envelope)),
            Published::Dropped(_) => None,
        })
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    publish(gateway, tenant, kept).await
}

/// What `info` asks of a channel: `subscription_count`, and
/// `user_count` of a presence channel.
fn channel_info(channel: &str, view: &ChannelView, info: &str) -> Result<Value, ApiError> {
    let mut answer = serde_json::Map::new();
    for field in info.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        match field {
            "subscription_count" => {
                answer.insert(field.into(), json!(view.subscriptions));
            }
            "user_count" if ChannelKind::of(channel) == ChannelKind::Presence => {
                answer.insert(field.into(), json!(view.members.len()));
            }
            "user_count" => {
                return Err(ApiError::bad_request(
                    "user_count is known of presence channels only",
                ));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown info attribute {other:?}"
                )));
            }
        }
    }
    Ok(Value::Object(answer))
}

fn channel_infos(
    gateway: &Gateway,
    tenant: &Tenant,
    channels: &[String],
    info: &str,
) -> Result<Value, ApiError> {
    let directory = gateway.cluster.pusher_channels();
    let mut answer = serde_json::Map::new();
    for channel in channels {
        if channel.starts_with(USER_CHANNEL_PREFIX) {
            continue;
        }
        let view = directory.view(&tenant.name, channel);
        answer.insert(channel.clone(), channel_info(channel, &view, info)?);
    }
    Ok(Value::Object(answer))
}

#[derive(Deserialize)]
struct ChannelsQuery {
    #[serde(default)]
    filter_by_prefix: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

fn query<T: for<'de> Deserialize<'de>>(request: &Request) -> Result<T, ApiError> {
    serde_urlencoded::from_str(request.uri().query().unwrap_or(""))
        .map_err(|err| ApiError::bad_request(format!("malformed query: {err}")))
}

/// `GET /apps/{app_id}/channels`: occupied channels, across the cluster.
pub(crate) async fn channels(
    State(gateway): State<Arc<Gateway>>,
    Path(app_id): Path<String>,
    request: Request,
) -> Response {
    respond(
        async {
            let asked: ChannelsQuery = query(&request)?;
            let (tenant, _) = signed(&gateway, &app_id, request).await?;
            let prefix = asked.filter_by_prefix.unwrap_or_default();
            let info = asked.info.unwrap_or_default();
            if info.contains("user_count") && !prefix.starts_with("presence-") {
                return Err(ApiError::bad_request(
                    "info=user_count needs filter_by_prefix=presence-",
                ));
            }
            let mut answer = serde_json::Map::new();
            for (channel, view) in gateway.cluster.pusher_channels().occupied(&tenant.name) {
                if channel.starts_with(&prefix) {
                    answer.insert(channel.clone(), channel_info(&channel, &view, &info)?);
                }
            }
            Ok(json!({ "channels": answer }))
        }
        .await,
    )
}

/// `channel` across the cluster, for a signed request.
async fn signed_view(
    gateway: &Gateway,
    app_id: &str,
    channel: &str,
    request: Request,
) -> Result<ChannelView, ApiError> {
    let (tenant, _) = signed(gateway, app_id, request).await?;
    Ok(gateway
        .cluster
        .pusher_channels()
        .view(&tenant.name, channel))
}

/// `GET /apps/{app_id}/channels/{channel}`.
pub(crate) async fn channel(
    State(gateway): State<Arc<Gateway>>,
    Path((app_id, channel)): Path<(String, String)>,
    request: Request,
) -> Response {
    respond(
        async {
            let asked: ChannelsQuery = query(&request)?;
            let view = signed_view(&gateway, &app_id, &channel, request).await?;
            let mut answer = channel_info(&channel, &view, &asked.info.unwrap_or_default())?;
            answer["occupied"] = json!(view.subscriptions > 0);
            Ok(answer)
        }
        .await,
    )
}

/// `GET /apps/{app_id}/channels/{channel}/users`: a presence channel's
/// members.
pub(crate) async fn users(
    State(gateway): State<Arc<Gateway>>,
    Path((app_id, channel)): Path<(String, String)>,
    request: Request,
) -> Response {
    respond(
        async {
            let view = signed_view(&gateway, &app_id, &channel, request).await?;
            if ChannelKind::of(&channel) != ChannelKind::Presence {
                return Err(ApiError::bad_request(
                    "users are known of presence channels only",
                ));
            }
            let users: Vec<Value> = view.members.keys().map(|id| json!({ "id": id })).collect();
            Ok(json!({ "users": users }))
        }
        .await,
    )
}

/// `POST /apps/{app_id}/users/{user_id}/terminate_connections`: closes
/// the user's connections on every node (4009: do not reconnect).
pub(crate) async fn terminate_connections(
    State(gateway): State<Arc<Gateway>>,
    Path((app_id, user)): Path<(String, String)>,
    request: Request,
) -> Response {
    respond(
        async {
            let (tenant, _) = signed(&gateway, &app_id, request).await?;
            crate::edge::push::check_address("user id", &user)?;
            let change = Change::Disconnect {
                tenant: tenant.name.to_string(),
                user: user.clone(),
                connection: None,
            };
            crate::edge::live::change_connections(&gateway, &tenant, &user, change, |_| true)
                .await?;
            Ok(json!({}))
        }
        .await,
    )
}
