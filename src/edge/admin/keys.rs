//! The admin API's own keys, and the audit trail.
//!
//! - `POST /admin/v1/keys` (operator): `{"name", "role", "tenant"?}` →
//!   `201 {"id", "name", "role", "tenant", "key"}`; the key is shown in
//!   this answer only, and kept (on every node, on disk) as its hash.
//! - `GET /admin/v1/keys`: ids, names, roles, tenants, created and
//!   last-used times (an operator sees every key, a tenant's key its
//!   tenant's).
//! - `DELETE /admin/v1/keys/{id}` (operator): revoked on every node as the
//!   change reaches it.
//! - `GET /admin/v1/audit?tenant=&limit=`: the newest entries first.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::access::{Access, Caller};
use super::{make, respond, unexpected};
use crate::cluster::Applied;
use crate::cluster::change::{Change, KeyChange};
use crate::cluster::keys::{self, KeyRecord, MAX_KEY_NAME_BYTES, Role};
use crate::edge::Gateway;
use crate::edge::api_error::ApiError;

/// Body of `POST /admin/v1/keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewKey {
    name: String,
    role: Role,
    #[serde(default)]
    tenant: Option<String>,
}

fn key_json(key: &KeyRecord, last_used_ms: Option<u64>) -> serde_json::Value {
    json!({
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "tenant": key.tenant,
        "created_at_ms": key.created_at_ms,
        "last_used_ms": last_used_ms,
    })
}

/// `POST /admin/v1/keys`
pub(crate) async fn create_key(
    State(gateway): State<Arc<Gateway>>,
    caller: Caller,
    body: Bytes,
) -> Response {
    let result = async {
        caller.may(Access::Operator)?;
        let request: NewKey = serde_json::from_slice(&body).map_err(|err| {
            ApiError::bad_request(format!(
                "the body is {{\"name\", \"role\": \"operator\" | \"tenant-admin\" | \
                 \"viewer\", \"tenant\"}}: {err}"
            ))
        })?;
        if request.name.is_empty() || request.name.len() > MAX_KEY_NAME_BYTES {
            return Err(ApiError::bad_request("name: 1 to 128 bytes"));
        }
        match (request.role, &request.tenant) {
            (Role::Operator, Some(_)) => {
                return Err(ApiError::bad_request("an operator key names no tenant"));
            }
            (Role::TenantAdmin | Role::Viewer, None) => {
                return Err(ApiError::bad_request(
                    "a tenant-admin or viewer key names its tenant",
                ));
            }
            (_, Some(tenant)) if gateway.tenants.snapshot().get(tenant).is_none() => {
                return Err(ApiError::not_found(format!("no tenant {tenant:?}")));
            }
            _ => {}
        }
        let (id, secret) = keys::generate();
        let record = KeyRecord {
            id,
            name: request.name,
            role: request.role,
            tenant: request.tenant,
            hash: keys::hash(&secret),
            created_at_ms: crate::clock::now_micros() / 1000,
        };
        let change = Change::Key {
            by: caller.actor(),
            change: KeyChange::Created(record),
        };
        let Applied::Key(made) = make(&gateway, change, None).await? else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the key change had an unexpected outcome",
            ));
        };
        let mut answer = key_json(&made, None);
        answer["key"] = json!(secret);
        Ok((StatusCode::CREATED, Json(answer)).into_response())
    }
    .await;
    respond(result)
}

/// `GET /admin/v1/keys`
pub(crate) async fn list_keys(State(gateway): State<Arc<Gateway>>, caller: Caller) -> Response {
    let keys: Vec<_> = gateway
        .cluster
        .control()
        .keys(caller.scope())
        .iter()
        .map(|(key, last_used)| key_json(key, *last_used))
        .collect();
    Json(json!({ "keys": keys })).into_response()
}

/// `DELETE /admin/v1/keys/{id}`
pub(crate) async fn revoke_key(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    caller: Caller,
) -> Response {
    let result = async {
        caller.may(Access::Operator)?;
        let key = gateway
            .cluster
            .control()
            .key(&id)
            .ok_or_else(|| ApiError::not_found(format!("no key {id:?}")))?;
        let change = Change::Key {
            by: caller.actor(),
            change: KeyChange::Revoked {
                id,
                tenant: key.tenant,
            },
        };
        match make(&gateway, change, None).await? {
            Applied::KeyRevoked => Ok(StatusCode::NO_CONTENT.into_response()),
            other => Err(unexpected(other)),
        }
    }
    .await;
    respond(result)
}

/// Query of `GET /admin/v1/audit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

/// Entries one answer carries, unless `limit` says otherwise.
const DEFAULT_AUDIT_LIMIT: usize = 100;
/// Most entries one answer carries.
const MAX_AUDIT_LIMIT: usize = 10_000;

fn default_limit() -> usize {
    DEFAULT_AUDIT_LIMIT
}

/// `GET /admin/v1/whoami`: the key's name, role and tenant, and the
/// tenants it sees — what the console signs in with.
pub(crate) async fn whoami(State(gateway): State<Arc<Gateway>>, caller: Caller) -> Response {
    let mut tenants: Vec<String> = gateway
        .tenants
        .snapshot()
        .iter()
        .filter(|t| caller.scope().is_none_or(|own| *t.name == *own))
        .map(|t| t.name.to_string())
        .collect();
    tenants.sort();
    let actor = caller.actor();
    Json(json!({
        "key_id": actor.key_id,
        "key_name": actor.key_name,
        "role": caller.role.as_str(),
        "tenant": caller.tenant,
        "tenants": tenants,
        "node": gateway.cluster.node(),
    }))
    .into_response()
}

/// `GET /admin/v1/audit?tenant=shop&limit=100`: a tenant's key reads its
/// own tenant's entries (and must name it or name none).
pub(crate) async fn audit(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<AuditQuery>,
    caller: Caller,
) -> Response {
    let result = (|| {
        let tenant = match (caller.scope(), query.tenant.as_deref()) {
            (None, tenant) => tenant,
            (Some(own), None) => Some(own),
            (Some(_), Some(asked)) => {
                caller.may(Access::Read(asked))?;
                Some(asked)
            }
        };
        let entries = gateway
            .cluster
            .control()
            .audit
            .newest(tenant, query.limit.clamp(1, MAX_AUDIT_LIMIT));
        Ok(Json(json!({ "entries": entries })).into_response())
    })();
    respond(result)
}
