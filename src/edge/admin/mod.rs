//! The admin API on the internal listener: manage tenants, their plugins
//! and the API's own keys while the node runs, read the audit trail, drain
//! the node. Each route needs a role ([`access`]): `operator` (the
//! configuration's `admin.token`, or a key made so), `tenant-admin` or
//! `viewer` of one tenant.
//!
//! - `GET /admin/v1/tenants`, `GET /admin/v1/tenants/{name}`
//! - `PUT /admin/v1/tenants/{name}` (a tenant's settings as JSON: create or replace)
//! - `DELETE /admin/v1/tenants/{name}` (its clients are closed with 4004)
//! - `POST /admin/v1/tenants/{name}/plugins` (body: a component; `?activate=false` to only install;
//!   the plugin routes are in [`plugins`])
//! - `GET /admin/v1/tenants/{name}/plugins`
//! - `POST /admin/v1/tenants/{name}/plugins/{version}/activate`
//! - `POST /admin/v1/tenants/{name}/plugins/rollback`
//! - `DELETE /admin/v1/tenants/{name}/plugins/{version}`
//! - `POST /admin/v1/tenants/{name}/plugins/{version}/canary` (`{"percent": 10}`:
//!   start a canary, or raise or lower its share), `DELETE …/plugins/canary`
//! - `POST /admin/v1/tenants/{name}/plugins/{version}/shadow`,
//!   `GET …/plugins/shadow` (this node's comparisons and samples),
//!   `DELETE …/plugins/shadow`
//! - `PUT /admin/v1/tenants/{name}/push-keys` (`{"push_keys": [...]}`)
//! - `POST /admin/v1/keys`, `GET /admin/v1/keys`, `DELETE /admin/v1/keys/{id}`
//!   (see [`keys`])
//! - `GET /admin/v1/audit?tenant=&limit=`
//! - `POST /admin/v1/drain`
//! - `GET /admin/v1/whoami` (the key's name, role and tenants: the console's sign-in)
//! - `GET /admin/v1/tenants/{name}/figures` (the console's charts, see [`figures`])
//! - `POST /admin/v1/tenants/{name}/plugins/{version}/try` (one hook on a sample)
//!
//! Push keys and JWT secrets are never shown: listings carry a fingerprint
//! of each key instead.
//!
//! A change is validated here, then handed to the cluster part, which puts
//! it on the bus and applies it on every node — this one included — in the
//! order the bus delivers it; the answer is this node's outcome. A change
//! the bus did not take (503) is made nowhere. This module never changes
//! tenants or plugins itself.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub(crate) mod access;
pub(crate) mod figures;
pub(crate) mod keys;
pub(crate) mod plugins;

use access::{Access, Caller};
use plugins::registry_error;

use super::Gateway;
use super::api_error::ApiError;
use crate::bus::BusError;
use crate::cluster::change::TenantChange;
use crate::cluster::{Applied, ApplyError, Change, SubmitError};
use crate::config::TenantConfig;
use crate::plugin::CompiledPlugin;
use crate::tenant::{Tenant, Upserted};

/// A tenant as the admin API shows it: its settings without secrets, its
/// open connections on this node, and those other nodes hold of the users
/// this node owns (what it keeps for the per-user cap).
fn tenant_view(gateway: &Gateway, tenant: &Tenant) -> Value {
    let mut view = tenant.config.redacted();
    view["name"] = json!(tenant.name);
    view["connections"] = json!(gateway.sessions.tenant_connections(&tenant.name));
    view["owned_users_connections_elsewhere"] = json!(
        gateway
            .cluster
            .owned_users_connections_elsewhere(&tenant.name)
    );
    view
}

/// Makes `change` on every node (see the module's comment) and returns
/// this node's outcome.
pub(super) async fn make(
    gateway: &Gateway,
    change: Change,
    prepared: Option<Arc<CompiledPlugin>>,
) -> Result<Applied, ApiError> {
    gateway
        .cluster
        .submit(change, prepared)
        .await
        .map_err(|err| match err {
            SubmitError::Bus(err @ BusError::TooLarge { .. }) => ApiError::too_large(format!(
                "the change is too large for the cluster bus: {err}"
            )),
            SubmitError::Bus(err @ BusError::Unknown(_)) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "change_pending",
                format!("{err}; the change is made on every node if it was"),
            ),
            SubmitError::Bus(BusError::Unavailable(why)) => ApiError::unavailable(format!(
                "the change was not made: the cluster bus did not take it ({why})"
            )),
            SubmitError::Refused(ApplyError::InvalidTenant(message)) => {
                ApiError::bad_request(message)
            }
            SubmitError::Refused(ApplyError::NoTenant(name)) => {
                ApiError::not_found(format!("no tenant {name:?}"))
            }
            SubmitError::Refused(ApplyError::Plugin(err)) => registry_error(err),
            SubmitError::Refused(ApplyError::InvalidKey(message)) => ApiError::bad_request(message),
            SubmitError::Refused(ApplyError::NoKey(id)) => {
                ApiError::not_found(format!("no key {id:?}"))
            }
            SubmitError::Refused(err @ ApplyError::State(_)) => {
                tracing::error!(%err, "control state not written");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage",
                    err.to_string(),
                )
            }
            // The admin API submits no connection facts: either is a bug.
            SubmitError::Refused(err @ (ApplyError::Node(_) | ApplyError::Malformed(_))) => {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    err.to_string(),
                )
            }
            err @ SubmitError::NotBackYet(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "change_pending",
                err.to_string(),
            ),
        })
}

/// What a change of the plugins made: the version it concerns.
fn version_info(applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::Plugin(info) => Ok(Json(info).into_response()),
        other => Err(unexpected(other)),
    }
}

fn unexpected(applied: Applied) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the change had an unexpected outcome: {applied:?}"),
    )
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /admin/v1/tenants`
pub(super) async fn list_tenants(State(gateway): State<Arc<Gateway>>, caller: Caller) -> Response {
    respond(Ok({
        // A tenant's key sees its own tenant only.
        let snapshot = gateway.tenants.snapshot();
        let mut tenants: Vec<Value> = snapshot
            .iter()
            .filter(|t| caller.scope().is_none_or(|own| *t.name == *own))
            .map(|t| tenant_view(&gateway, t))
            .collect();
        tenants.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Json(json!({ "tenants": tenants })).into_response()
    }))
}

/// `GET /admin/v1/tenants/{name}`
pub(super) async fn get_tenant(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    respond(caller.may(Access::Read(&name)).and_then(|()| {
        let snapshot = gateway.tenants.snapshot();
        let tenant = snapshot
            .get(&name)
            .ok_or_else(|| ApiError::not_found(format!("no tenant {name:?}")))?;
        Ok(Json(tenant_view(&gateway, tenant)).into_response())
    }))
}

/// `PUT /admin/v1/tenants/{name}`: creates or replaces the tenant. Its open
/// connections stay; new limits apply from the next handshake or push.
pub(super) async fn put_tenant(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
    body: Bytes,
) -> Response {
    let result = async {
        caller.may(Access::Operator)?;
        let config: TenantConfig = serde_json::from_slice(&body)
            .map_err(|err| ApiError::bad_request(format!("invalid tenant settings: {err}")))?;
        gateway
            .tenants
            .check(&name, &config)
            .map_err(|err| ApiError::bad_request(err.to_string()))?;
        let settings_json =
            serde_json::to_string(&config).map_err(|err| ApiError::bad_request(err.to_string()))?;
        let change = Change::Tenant {
            by: caller.actor(),
            change: TenantChange::Put {
                name: name.clone(),
                settings_json,
            },
        };
        put(&gateway, &name, change).await
    }
    .await;
    respond(result)
}

/// Makes `change`, which creates or replaces tenant `name`; answers the
/// tenant as it is then (201 if it was created).
async fn put(gateway: &Gateway, name: &str, change: Change) -> Result<Response, ApiError> {
    let upserted = match make(gateway, change, None).await? {
        Applied::Tenant(upserted) => upserted,
        other => return Err(unexpected(other)),
    };
    tracing::info!(tenant = %name, ?upserted, "tenant changed through the admin API");
    let snapshot = gateway.tenants.snapshot();
    // A concurrent DELETE may have won the race since.
    let tenant = snapshot
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("tenant {name:?} was removed meanwhile")))?;
    let status = match upserted {
        Upserted::Created => StatusCode::CREATED,
        Upserted::Updated => StatusCode::OK,
    };
    Ok((status, Json(tenant_view(gateway, tenant))).into_response())
}

/// `DELETE /admin/v1/tenants/{name}`: removes the tenant and closes its
/// clients (4004).
pub(super) async fn delete_tenant(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    let result = async {
        caller.tenant(Access::Operator)?;
        let change = Change::Tenant {
            by: caller.actor(),
            change: TenantChange::Removed { name: name.clone() },
        };
        make(&gateway, change, None).await?;
        tracing::info!(tenant = %name, "tenant removed through the admin API");
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    respond(result)
}

/// Body of `PUT …/push-keys`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PushKeysRequest {
    push_keys: Vec<String>,
}

/// `PUT /admin/v1/tenants/{name}/push-keys`: replaces the tenant's push
/// keys (and nothing else of its settings), on every node. What a
/// tenant's own admin may change of its settings.
pub(super) async fn put_push_keys(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
    body: Bytes,
) -> Response {
    let result = async {
        let tenant = caller.tenant(Access::Manage(&name))?;
        let request: PushKeysRequest = serde_json::from_slice(&body).map_err(|err| {
            ApiError::bad_request(format!("the body is {{\"push_keys\": [\"…\"]}}: {err}"))
        })?;
        let mut config = tenant.config.clone();
        config.push_keys = request.push_keys.clone();
        gateway
            .tenants
            .check(&name, &config)
            .map_err(|err| ApiError::bad_request(err.to_string()))?;
        let change = Change::Tenant {
            by: caller.actor(),
            change: TenantChange::PushKeys {
                name: name.clone(),
                push_keys: request.push_keys,
            },
        };
        put(&gateway, &name, change).await
    }
    .await;
    respond(result)
}

/// `POST /admin/v1/drain`: the node leaves the load balancer (`/readyz`
/// fails), stops accepting, closes its clients over the drain window, and
/// exits.
pub(super) async fn drain(State(gateway): State<Arc<Gateway>>, caller: Caller) -> Response {
    respond(caller.may(Access::Operator).map(|()| {
        tracing::info!("drain requested through the admin API");
        gateway.begin_drain();
        let window = gateway.config.shutdown.drain_window;
        (
            StatusCode::ACCEPTED,
            Json(json!({
                "status": "draining",
                "connections": gateway.sessions.connection_count(),
                "drain_window_ms": window.as_millis() as u64,
            })),
        )
            .into_response()
    }))
}
