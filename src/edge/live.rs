//! The live-connections API on the internal listener, for the tenant's
//! services (push key): who is online, on how many devices
//! (`POST /v1/presence`); closing a user's connections on every node
//! (`POST /v1/disconnect`, 4008: log out, ban); subscribing a user's live
//! connections to topics server-side (`POST /v1/subscriptions`).
//!
//! Presence is answered by each user's owner node (which keeps the user's
//! connections on every node as they were announced to it), over the bus
//! unless this node owns the user, with this node's own connections added
//! first-hand. Disconnects and subscriptions are changes made on every
//! node.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::admin::access::{Access, Caller};
use super::api_error::ApiError;
use super::gateway::Gateway;
use super::push::{caller_tenant, check_address, parse_body};
use crate::bus::envelope::Position;
use crate::cluster::change::{Change, ConnectionRef};
use crate::cluster::{
    Applied, AskError, LiveConnection, MAX_PRESENCE_USERS, MAX_TOPICS_PER_CHANGE,
};
use crate::delivery::{HistoryOf, read_history};
use crate::tenant::Tenant;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceRequest {
    users: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    user: String,
    /// Only this connection (as presence names it); all of the user's
    /// otherwise.
    #[serde(default)]
    connection: Option<ConnectionRef>,
    /// Also refuse the user's handshakes on every node for this long.
    #[serde(default)]
    ban_seconds: Option<u64>,
}

/// The longest ban: 30 days.
const MAX_BAN_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionsRequest {
    user: String,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    unsubscribe: Vec<String>,
}

fn respond(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(err) => err.into_response(),
    }
}

/// The connections of `users` on every node, as the users' owners know
/// them.
async fn presence_of(
    gateway: &Gateway,
    tenant: &Tenant,
    users: &[String],
) -> Result<Vec<Vec<LiveConnection>>, ApiError> {
    gateway
        .cluster
        .presence(&tenant.name, users)
        .await
        .map_err(|err: AskError| ApiError::unavailable(err.to_string()))
}

/// One user's connections as JSON, with the node that owns the user.
fn presence_json(gateway: &Gateway, tenant: &Tenant, user: &str, live: &[LiveConnection]) -> Value {
    let connections: Vec<Value> = live
        .iter()
        .map(|c| {
            json!({
                "node": &*c.node,
                "id": c.id,
                "opened_at_ms": c.opened_at_micros / 1000,
            })
        })
        .collect();
    json!({
        "count": connections.len(),
        "connections": connections,
        "owner": &*gateway.cluster.owner(&tenant.name, user),
    })
}

/// `POST /v1/presence`: `{"users": [...]}` → for each user, the
/// connections it holds on every node.
pub(super) async fn presence(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller_tenant(&gateway, &headers)?;
            presence_in(&gateway, tenant, &headers, body).await
        }
        .await,
    )
}

/// `POST /admin/v1/tenants/{name}/presence`: the same, with an admin key.
pub(super) async fn admin_presence(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller.tenant(Access::Read(&name))?;
            presence_in(&gateway, tenant, &headers, body).await
        }
        .await,
    )
}

async fn presence_in(
    gateway: &Gateway,
    tenant: Arc<Tenant>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let request: PresenceRequest = parse_body(&gateway.config.push, headers, body).await?;
    if request.users.is_empty() || request.users.len() > MAX_PRESENCE_USERS {
        return Err(ApiError::bad_request(format!(
            "users: 1 to {MAX_PRESENCE_USERS} user ids"
        )));
    }
    for user in &request.users {
        check_address("user id", user)?;
    }
    let live = presence_of(gateway, &tenant, &request.users).await?;
    let users: serde_json::Map<String, Value> = request
        .users
        .iter()
        .zip(&live)
        .map(|(user, live)| (user.clone(), presence_json(gateway, &tenant, user, live)))
        .collect();
    Ok(json!({ "users": users }))
}

/// `POST /v1/disconnect`: `{"user": …, "connection"?: {"node", "id"}}` →
/// closes them with 4008 on every node.
pub(super) async fn disconnect(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller_tenant(&gateway, &headers)?;
            disconnect_in(&gateway, tenant, &headers, body).await
        }
        .await,
    )
}

/// `POST /admin/v1/tenants/{name}/disconnect`: the same, with an admin key.
pub(super) async fn admin_disconnect(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller.tenant(Access::Manage(&name))?;
            disconnect_in(&gateway, tenant, &headers, body).await
        }
        .await,
    )
}

async fn disconnect_in(
    gateway: &Gateway,
    tenant: Arc<Tenant>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let request: DisconnectRequest = parse_body(&gateway.config.push, headers, body).await?;
    check_address("user id", &request.user)?;
    let banned_until = match request.ban_seconds {
        Some(seconds) if seconds == 0 || seconds > MAX_BAN_SECONDS => {
            return Err(ApiError::bad_request(format!(
                "ban_seconds: 1 to {MAX_BAN_SECONDS} (30 days)"
            )));
        }
        Some(_) if request.connection.is_some() => {
            return Err(ApiError::bad_request(
                "ban_seconds bans a user: name no connection",
            ));
        }
        // Banned first: a reconnect racing the disconnect is refused too.
        Some(seconds) => {
            let until_ms = crate::clock::now_micros() / 1000 + seconds * 1000;
            let ban = Change::Ban {
                tenant: tenant.name.to_string(),
                user: request.user.clone(),
                until_ms,
            };
            super::admin::make(gateway, ban, None).await?;
            Some(until_ms)
        }
        None => None,
    };
    let named = request.connection.clone();
    let change = Change::Disconnect {
        tenant: tenant.name.to_string(),
        user: request.user.clone(),
        connection: request.connection,
    };
    let (targeted, closed_here) =
        change_connections(gateway, &tenant, &request.user, change, |c| {
            named
                .as_ref()
                .is_none_or(|r| *c.node == *r.node && c.id == r.id)
        })
        .await?;
    Ok(json!({
        "connections": targeted,
        "closed_on_this_node": closed_here,
        "banned_until_ms": banned_until,
    }))
}

/// `POST /v1/subscriptions`: `{"user", "subscribe": [...], "unsubscribe":
/// [...]}` → applied to the user's live connections on every node
/// (within `websocket.max_topics_per_connection`; the service is trusted:
/// no subscription rule applies).
pub(super) async fn subscriptions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller_tenant(&gateway, &headers)?;
            subscriptions_in(&gateway, tenant, &headers, body).await
        }
        .await,
    )
}

/// `POST /admin/v1/tenants/{name}/subscriptions`: the same, with an admin key.
pub(super) async fn admin_subscriptions(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller.tenant(Access::Manage(&name))?;
            subscriptions_in(&gateway, tenant, &headers, body).await
        }
        .await,
    )
}

async fn subscriptions_in(
    gateway: &Gateway,
    tenant: Arc<Tenant>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let request: SubscriptionsRequest = parse_body(&gateway.config.push, headers, body).await?;
    check_address("user id", &request.user)?;
    let count = request.subscribe.len() + request.unsubscribe.len();
    if count == 0 || count > MAX_TOPICS_PER_CHANGE {
        return Err(ApiError::bad_request(format!(
            "subscribe and unsubscribe name 1 to {MAX_TOPICS_PER_CHANGE} topics together"
        )));
    }
    for topic in request.subscribe.iter().chain(&request.unsubscribe) {
        check_address("topic", topic)?;
    }
    let change = Change::Subscriptions {
        tenant: tenant.name.to_string(),
        user: request.user.clone(),
        subscribe: request.subscribe,
        unsubscribe: request.unsubscribe,
    };
    let (known, here) =
        change_connections(gateway, &tenant, &request.user, change, |_| true).await?;
    Ok(json!({ "connections": known, "changed_on_this_node": here }))
}

/// Makes `change` (to `user`'s connections) on every node; answers how
/// many of the user's connections `counts` picks, as this node knew them
/// before, and how many the change touched on this node.
pub(super) async fn change_connections(
    gateway: &Gateway,
    tenant: &Tenant,
    user: &str,
    change: Change,
    counts: impl Fn(&LiveConnection) -> bool,
) -> Result<(usize, usize), ApiError> {
    let known = presence_of(gateway, tenant, &[user.to_owned()])
        .await?
        .iter()
        .flatten()
        .filter(|c| counts(c))
        .count();
    let here = match super::admin::make(gateway, change, None).await? {
        Applied::Connections(count) => count,
        _ => 0,
    };
    Ok((known, here))
}

/// Most messages one history call answers.
const MAX_HISTORY_LIMIT: usize = 1_000;
/// Messages a history call answers when it names no `limit`.
const DEFAULT_HISTORY_LIMIT: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRequest {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    user: Option<String>,
    /// A position a client received (`pos`): only what came after it.
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `POST /v1/history`: `{"topic": …}` or `{"user": …}`, with `since` and
/// `limit` → the latest messages this node keeps of that topic (or to that
/// user, and broadcasts), oldest first, each as a client receives it (its
/// `pos` included; for a user, as the tenant's `on-deliver` plugin gives
/// it), and whether they are all that came after `since`. Every node keeps
/// the same messages (`[tenants.NAME.history]`), so any node answers.
pub(super) async fn history(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let tenant = caller_tenant(&gateway, &headers)?;
            let request: HistoryRequest = parse_body(&gateway.config.push, &headers, body).await?;
            let of = match (request.topic, request.user) {
                (Some(topic), None) => {
                    check_address("topic", &topic)?;
                    HistoryOf::Topic(topic)
                }
                (None, Some(user)) => {
                    check_address("user id", &user)?;
                    HistoryOf::User(user)
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "name either a \"topic\" or a \"user\"",
                    ));
                }
            };
            let since = match request.since.as_deref() {
                Some(text) => Some(Position::parse(text).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "since: {text:?} is not a position (as a client receives it in `pos`)"
                    ))
                })?),
                None => None,
            };
            let limit = request.limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
            if limit == 0 || limit > MAX_HISTORY_LIMIT {
                return Err(ApiError::bad_request(format!(
                    "limit: 1 to {MAX_HISTORY_LIMIT}"
                )));
            }
            let page = read_history(
                &gateway.sessions,
                (&gateway.plugins, &gateway.bus),
                &tenant,
                of,
                since,
                limit,
            )
            .await;
            let messages: Vec<Value> = page
                .frames
                .iter()
                .map(|frame| serde_json::from_str(frame.payload()).unwrap_or(Value::Null))
                .collect();
            Ok(json!({ "messages": messages, "complete": page.complete }))
        }
        .await,
    )
}
