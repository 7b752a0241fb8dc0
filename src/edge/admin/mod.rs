//! The admin API on the internal listener: manage tenants, their plugins
//! and the API's own keys while the node runs, read the audit trail, drain
//! the node. Each route needs a role ([`access`]): `operator` (the
//! configuration's `admin.token`, or a key made so), `tenant-admin` or
//! `viewer` of one tenant.
//!
//! - `GET /admin/v1/tenants`, `GET /admin/v1/tenants/{name}`
//! - `PUT /admin/v1/tenants/{name}` (a tenant's settings as JSON: create or replace)
//! - `DELETE /admin/v1/tenants/{name}` (its clients are closed with 4004)
//! - `POST /admin/v1/tenants/{name}/plugins` (body: a component; `?activate=false` to only install)
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
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub(crate) mod access;
pub(crate) mod keys;

use access::{Access, Caller};

use super::Gateway;
use super::api_error::ApiError;
use super::push::read_body;
use crate::bus::BusError;
use crate::cluster::change::{PluginChange, TenantChange};
use crate::cluster::{Applied, ApplyError, Change, SubmitError};
use crate::config::TenantConfig;
use crate::plugin::CompiledPlugin;
use crate::plugin::registry::RegistryError;
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

fn registry_error(err: RegistryError) -> ApiError {
    match err {
        RegistryError::Invalid(invalid) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_plugin", invalid.0)
        }
        RegistryError::NotFound(message) => ApiError::not_found(message),
        RegistryError::Conflict(message) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", message)
        }
        RegistryError::Storage(err) => {
            tracing::error!(%err, "plugin store failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                err.to_string(),
            )
        }
    }
}

/// Query of an upload.
#[derive(serde::Deserialize)]
pub(super) struct UploadQuery {
    #[serde(default = "yes")]
    activate: bool,
}

fn yes() -> bool {
    true
}

/// `POST /admin/v1/tenants/{name}/plugins`: validates, compiles, stores
/// and (unless `?activate=false`) activates a component. A refused upload
/// leaves the active version serving.
pub(super) async fn upload_plugin(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Query(query): Query<UploadQuery>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        caller.tenant(Access::Manage(&name))?;
        let limit = gateway.config.plugins.max_plugin_bytes;
        let bytes = read_body(&headers, body, limit).await.map_err(|err| {
            if err.status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_plugin",
                    format!(
                        "the component is larger than plugins.max_plugin_bytes ({limit} bytes)"
                    ),
                )
            } else {
                err
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_plugin",
                "the body is empty: send the component's bytes",
            ));
        }
        let plugins = gateway.plugins.clone();
        let tenant = name.clone();
        let component = bytes.clone();
        let prepared = blocking(move || plugins.prepare(&tenant, &component)).await?;
        let change = Change::Plugin {
            by: caller.actor(),
            tenant: name.clone(),
            change: PluginChange::Installed {
                component: bytes.to_vec(),
                activate: query.activate,
            },
        };
        let installed = version_info(make(&gateway, change, Some(prepared)).await?)?;
        Ok((StatusCode::CREATED, installed).into_response())
    }
    .await;
    respond(result)
}

/// Runs slow registry work (compiling) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                err.to_string(),
            )
        })?
        .map_err(registry_error)
}

/// 404 unless `tenant` has plugin version `version`.
/// Shortest version prefix accepted (what logs and metrics show is 12).
const MIN_VERSION_PREFIX: usize = 6;

/// The installed version `prefix` names uniquely: the whole version, or a
/// prefix of at least [`MIN_VERSION_PREFIX`] hex digits (logs and metrics
/// show 12).
fn resolve_version(gateway: &Gateway, tenant: &str, prefix: &str) -> Result<String, ApiError> {
    let hex = prefix
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex || prefix.len() < MIN_VERSION_PREFIX || prefix.len() > 64 {
        return Err(ApiError::bad_request(format!(
            "a version is {MIN_VERSION_PREFIX} to 64 lowercase hex digits of its SHA-256 \
             (logs and metrics show the first 12)"
        )));
    }
    let mut matching = gateway.plugins.versions_starting_with(tenant, prefix);
    match matching.len() {
        0 => Err(ApiError::not_found(format!(
            "no version {prefix} for tenant {tenant:?}"
        ))),
        1 => Ok(matching.remove(0)),
        _ => {
            matching.sort();
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "ambiguous_version",
                format!("{prefix} names several versions: {}", matching.join(", ")),
            ))
        }
    }
}

/// `GET /admin/v1/tenants/{name}/plugins`
pub(super) async fn list_plugins(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    respond(
        caller
            .tenant(Access::Read(&name))
            .map(|_| Json(gateway.plugins.list(&name)).into_response()),
    )
}

/// `POST /admin/v1/tenants/{name}/plugins/{version}/activate`
pub(super) async fn activate_plugin(
    State(gateway): State<Arc<Gateway>>,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    let result = async {
        caller.tenant(Access::Manage(&name))?;
        let version = resolve_version(&gateway, &name, &version)?;
        let change = caller.plugin_change(&name, PluginChange::Activated { version });
        version_info(make(&gateway, change, None).await?)
    }
    .await;
    respond(result)
}

/// `POST /admin/v1/tenants/{name}/plugins/rollback`
pub(super) async fn rollback_plugin(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    let result = async {
        caller.tenant(Access::Manage(&name))?;
        let Some(previous) = gateway.plugins.rollback_target(&name) else {
            return Err(ApiError::not_found(format!(
                "tenant {name:?} has no earlier version to roll back to"
            )));
        };
        let change = caller.plugin_change(&name, PluginChange::RolledBack { version: previous });
        version_info(make(&gateway, change, None).await?)
    }
    .await;
    respond(result)
}

/// `DELETE /admin/v1/tenants/{name}/plugins/{version}`
pub(super) async fn remove_plugin(
    State(gateway): State<Arc<Gateway>>,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    let result = async {
        caller.tenant(Access::Manage(&name))?;
        let version = resolve_version(&gateway, &name, &version)?;
        let change = caller.plugin_change(&name, PluginChange::Removed { version });
        make(&gateway, change, None).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    respond(result)
}

/// Body of `POST …/plugins/{version}/canary`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CanaryRequest {
    percent: u8,
}

/// `POST /admin/v1/tenants/{name}/plugins/{version}/canary`: `version`
/// serves `percent` of the tenant's users (stable by user id), on every
/// node; the same call raises or lowers the share. Activating the version
/// promotes it.
pub(super) async fn set_canary(
    State(gateway): State<Arc<Gateway>>,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
    body: Bytes,
) -> Response {
    let result = async {
        caller.tenant(Access::Manage(&name))?;
        let request: CanaryRequest = serde_json::from_slice(&body).map_err(|err| {
            ApiError::bad_request(format!("the body is {{\"percent\": 1 to 100}}: {err}"))
        })?;
        if !(1..=100).contains(&request.percent) {
            return Err(ApiError::bad_request(
                "percent is 1 to 100 (end a canary with DELETE …/plugins/canary)",
            ));
        }
        let version = resolve_version(&gateway, &name, &version)?;
        let change = caller.plugin_change(
            &name,
            PluginChange::Canary {
                version,
                percent: request.percent,
            },
        );
        version_info(make(&gateway, change, None).await?)
    }
    .await;
    respond(result)
}

/// `DELETE /admin/v1/tenants/{name}/plugins/canary`: every user is served
/// by the active version again.
pub(super) async fn end_canary(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    let change = caller.plugin_change(&name, PluginChange::CanaryEnded);
    respond(make_tenant_change(&gateway, &caller, &name, change).await)
}

/// Makes a change of tenant `name` that answers with no content.
async fn make_tenant_change(
    gateway: &Gateway,
    caller: &Caller,
    name: &str,
    change: Change,
) -> Result<Response, ApiError> {
    caller.tenant(Access::Manage(name))?;
    make(gateway, change, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /admin/v1/tenants/{name}/plugins/{version}/shadow`: `version`
/// gets a copy of every call of the active version, on every node, and
/// its differing verdicts are counted and sampled.
pub(super) async fn set_shadow(
    State(gateway): State<Arc<Gateway>>,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    let result = async {
        caller.tenant(Access::Manage(&name))?;
        let version = resolve_version(&gateway, &name, &version)?;
        let change = caller.plugin_change(
            &name,
            PluginChange::Shadow {
                version: Some(version),
            },
        );
        make(&gateway, change, None).await?;
        Ok(shadow_json(&gateway, &name).into_response())
    }
    .await;
    respond(result)
}

/// `GET /admin/v1/tenants/{name}/plugins/shadow`: the shadow version and
/// what it did on this node (counts by hook, the latest differing inputs).
pub(super) async fn shadow_report(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    respond(caller.tenant(Access::Read(&name)).and_then(|_| {
        if gateway.plugins.shadow_report(&name).is_none() {
            return Err(ApiError::not_found(format!(
                "tenant {name:?} has no shadow version"
            )));
        }
        Ok(shadow_json(&gateway, &name).into_response())
    }))
}

fn shadow_json(gateway: &Gateway, tenant: &str) -> Json<Value> {
    let report = gateway.plugins.shadow_report(tenant);
    Json(match report {
        Some((version, report)) => json!({
            "version": version,
            "node": gateway.cluster.node(),
            "calls": report.calls,
            "differences": report.differences,
            "samples": report.samples,
        }),
        None => Value::Null,
    })
}

/// `DELETE /admin/v1/tenants/{name}/plugins/shadow`
pub(super) async fn end_shadow(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    let change = caller.plugin_change(&name, PluginChange::Shadow { version: None });
    respond(make_tenant_change(&gateway, &caller, &name, change).await)
}
