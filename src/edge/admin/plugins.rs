//! The admin API's plugin routes: upload, list, activate, roll back and
//! remove a tenant's versions; canaries and shadows. Each is a change made
//! through the cluster part, like the tenant routes of [`super`].

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::access::{Access, Caller};
use super::{make, respond, version_info};
use crate::cluster::Change;
use crate::cluster::change::PluginChange;
use crate::edge::Gateway;
use crate::edge::api_error::ApiError;
use crate::edge::push::read_body;
use crate::plugin::registry::RegistryError;

pub(super) fn registry_error(err: RegistryError) -> ApiError {
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
pub(crate) struct UploadQuery {
    #[serde(default = "yes")]
    activate: bool,
}

fn yes() -> bool {
    true
}

/// `POST /admin/v1/tenants/{name}/plugins`: validates, compiles, stores
/// and (unless `?activate=false`) activates a component. A refused upload
/// leaves the active version serving.
pub(crate) async fn upload_plugin(
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
pub(crate) async fn list_plugins(
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
pub(crate) async fn activate_plugin(
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
pub(crate) async fn rollback_plugin(
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
pub(crate) async fn remove_plugin(
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
pub(crate) struct CanaryRequest {
    percent: u8,
}

/// `POST /admin/v1/tenants/{name}/plugins/{version}/canary`: `version`
/// serves `percent` of the tenant's users (stable by user id), on every
/// node; the same call raises or lowers the share. Activating the version
/// promotes it.
pub(crate) async fn set_canary(
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
pub(crate) async fn end_canary(
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
pub(crate) async fn set_shadow(
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
pub(crate) async fn shadow_report(
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
pub(crate) async fn end_shadow(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    let change = caller.plugin_change(&name, PluginChange::Shadow { version: None });
    respond(make_tenant_change(&gateway, &caller, &name, change).await)
}

/// Body of `POST …/plugins/{version}/try`: the hook and what to call it
/// with, as `pushgate plugin try` takes them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, tag = "hook", rename_all = "kebab-case")]
pub(crate) enum TryRequest {
    OnPublish {
        data: Value,
        #[serde(default)]
        topic: Option<String>,
        #[serde(default)]
        users: Option<Vec<String>>,
    },
    OnDeliver {
        data: Value,
        recipients: Vec<TryRecipient>,
    },
    Authenticate {
        /// Path and query of the handshake, e.g. `/ws/shop?token=…`.
        request: String,
        #[serde(default)]
        headers: std::collections::BTreeMap<String, String>,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TryRecipient {
    user: String,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
}

/// `POST /admin/v1/tenants/{name}/plugins/{version}/try`: calls one hook
/// of a version this node holds on a sample message or handshake, in the
/// node's sandbox under the tenant's limits — twice, on a copy of the
/// version that no traffic, figure or canary sees — and answers what
/// `pushgate plugin try` prints. Changes nothing: a tenant admin's right,
/// audited like the changes.
pub(crate) async fn try_version(
    State(gateway): State<Arc<Gateway>>,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    use crate::plugin::Target;
    use crate::plugin::trial::{TrialInput, try_compiled};
    let result = async {
        let tenant = caller.tenant(Access::Manage(&name))?;
        let version = resolve_version(&gateway, &name, &version)?;
        let request: TryRequest =
            crate::edge::push::parse_body(&gateway.config.push, &headers, body).await?;
        let input = match request {
            TryRequest::OnPublish { data, topic, users } => TrialInput::Publish {
                data: data.to_string(),
                target: match (topic, users) {
                    (Some(topic), _) => Target::Topic(topic),
                    (None, Some(users)) => Target::Users(users),
                    (None, None) => Target::Broadcast,
                },
            },
            TryRequest::OnDeliver { data, recipients } => {
                if recipients.is_empty() {
                    return Err(ApiError::bad_request("recipients: at least one"));
                }
                TrialInput::Deliver {
                    data: data.to_string(),
                    recipients: recipients
                        .into_iter()
                        .map(|r| (r.user, r.metadata.into_iter().collect()))
                        .collect(),
                }
            }
            TryRequest::Authenticate { request, headers } => TrialInput::Authenticate {
                path_and_query: request,
                headers: headers.into_iter().collect(),
            },
        };
        let plugin = gateway
            .plugins
            .version(&name, &version)
            .ok_or_else(|| ApiError::not_found(format!("no version {version} on this node")))?;
        let settings = tenant.plugin_settings.clone();
        let report = tokio::task::spawn_blocking(move || {
            try_compiled(
                &plugin.for_trial(),
                std::time::Duration::ZERO,
                &input,
                &settings,
            )
        })
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "trial",
                "the trial failed",
            )
        })?
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
        let mut answer = report.to_json();
        answer["version"] = json!(version);
        Ok(Json(answer).into_response())
    }
    .await;
    respond(result)
}
