//! The admin API on the internal listener, behind `admin.token`: manage
//! tenants while the node runs, and drain the node.
//!
//! - `GET /admin/v1/tenants`, `GET /admin/v1/tenants/{name}`
//! - `PUT /admin/v1/tenants/{name}` (a tenant's settings as JSON: create or replace)
//! - `DELETE /admin/v1/tenants/{name}` (its clients are closed with 4004)
//! - `POST /admin/v1/drain`
//!
//! Push keys and JWT secrets are never shown: listings carry a fingerprint
//! of each key instead.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::TenantConfig;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::session::CloseReason;
use crate::tenant::{Tenant, Upserted, key_fingerprint};

/// Checks `Authorization: Bearer <admin.token>` in constant time.
fn authorize(gateway: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = gateway.config.admin.token.as_deref() else {
        return Err(ApiError::forbidden(
            "the admin API is disabled: set admin.token in the configuration",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <admin token>"))?;
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong admin token"))
    }
}

/// A tenant as the admin API shows it: its settings without secrets, and
/// its open connections on this node.
fn tenant_view(gateway: &Gateway, tenant: &Tenant) -> Value {
    let mut view = serde_json::to_value(&tenant.config).unwrap_or(Value::Null);
    let fingerprints: Vec<String> = tenant
        .config
        .push_keys
        .iter()
        .map(|k| key_fingerprint(k))
        .collect();
    view["push_keys"] = json!(fingerprints);
    if let Some(secret) = view.pointer_mut("/jwt/secret")
        && !secret.is_null()
    {
        *secret = json!("<redacted>");
    }
    view["name"] = json!(tenant.name);
    view["connections"] = json!(gateway.sessions.tenant_connections(&tenant.name));
    view
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /admin/v1/tenants`
pub async fn list_tenants(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    respond(authorize(&gateway, &headers).map(|()| {
        let snapshot = gateway.tenants.snapshot();
        let mut tenants: Vec<Value> = snapshot.iter().map(|t| tenant_view(&gateway, t)).collect();
        tenants.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Json(json!({ "tenants": tenants })).into_response()
    }))
}

/// `GET /admin/v1/tenants/{name}`
pub async fn get_tenant(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(authorize(&gateway, &headers).and_then(|()| {
        let snapshot = gateway.tenants.snapshot();
        let tenant = snapshot
            .get(&name)
            .ok_or_else(|| ApiError::not_found(format!("no tenant {name:?}")))?;
        Ok(Json(tenant_view(&gateway, tenant)).into_response())
    }))
}

/// `PUT /admin/v1/tenants/{name}`: creates or replaces the tenant. Its open
/// connections stay; new limits apply from the next handshake or push.
pub async fn put_tenant(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(authorize(&gateway, &headers).and_then(|()| {
        let config: TenantConfig = serde_json::from_slice(&body)
            .map_err(|err| ApiError::bad_request(format!("invalid tenant settings: {err}")))?;
        let upserted = gateway
            .tenants
            .upsert(&name, config)
            .map_err(|err| ApiError::bad_request(err.to_string()))?;
        tracing::info!(tenant = %name, ?upserted, "tenant changed through the admin API");
        let snapshot = gateway.tenants.snapshot();
        let tenant = snapshot.get(&name).expect("the tenant was just stored");
        let status = match upserted {
            Upserted::Created => StatusCode::CREATED,
            Upserted::Updated => StatusCode::OK,
        };
        Ok((status, Json(tenant_view(&gateway, tenant))).into_response())
    }))
}

/// `DELETE /admin/v1/tenants/{name}`: removes the tenant and closes its
/// clients (4004).
pub async fn delete_tenant(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(authorize(&gateway, &headers).and_then(|()| {
        if !gateway.tenants.remove(&name) {
            return Err(ApiError::not_found(format!("no tenant {name:?}")));
        }
        gateway
            .sessions
            .close_tenant(&name, CloseReason::TenantRemoved);
        tracing::info!(tenant = %name, "tenant removed through the admin API");
        Ok(StatusCode::NO_CONTENT.into_response())
    }))
}

/// `POST /admin/v1/drain`: the node leaves the load balancer (`/readyz`
/// fails), stops accepting, closes its clients over the drain window, and
/// exits.
pub async fn drain(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    respond(authorize(&gateway, &headers).map(|()| {
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
