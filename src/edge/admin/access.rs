//! Who calls the admin API, and what it may do.
//!
//! Every admin handler takes a [`Caller`]: the bearer key checked —
//! `admin.token` (an operator key of the configuration) or a key made
//! through `POST /admin/v1/keys` — before the handler runs (401 otherwise).
//! The handler then asks [`Caller::may`] for the access its route needs;
//! a refusal answers 403 naming the role that would be needed, and is
//! audited when the call would have changed something.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::{Method, header};
use subtle::ConstantTimeEq;

use crate::cluster::audit::AuditEntry;
use crate::cluster::change::{Actor, Change, PluginChange};
use crate::cluster::keys::Role;
use crate::edge::Gateway;
use crate::edge::api_error::ApiError;
use crate::edge::listener::ConnectionContext;
use crate::tenant::Tenant;

/// What a route needs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Access<'a> {
    /// The operator role: tenants' creation, settings and removal, keys,
    /// draining, everything of every tenant.
    Operator,
    /// Changing tenant `.0`'s plugins, rollouts, push keys, connections.
    Manage(&'a str),
    /// Reading tenant `.0`'s settings (redacted), plugins, keys, audit.
    Read(&'a str),
}

/// The key an admin call came with.
#[derive(Clone)]
pub(crate) struct Caller {
    pub(crate) role: Role,
    /// The tenant a non-operator key is bound to.
    pub(crate) tenant: Option<String>,
    /// The tenant the route's path names, if any.
    path_tenant: Option<String>,
    actor: Actor,
    mutating: bool,
    gateway: Arc<Gateway>,
}

impl FromRequestParts<Arc<Gateway>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let address = parts
            .extensions
            .get::<ConnectionContext>()
            .map(|context| context.client(&parts.headers).to_string())
            .unwrap_or_default();
        // The tenant a `/admin/v1/tenants/{name}/…` route concerns.
        let path_tenant = parts
            .uri
            .path()
            .strip_prefix("/admin/v1/tenants/")
            .and_then(|rest| rest.split('/').next())
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <admin key>"))?;
        let control = gateway.cluster.control();
        let operator_token = gateway.config.admin.token.as_deref();
        let (id, name, role, tenant) = if operator_token
            .is_some_and(|token| bool::from(presented.as_bytes().ct_eq(token.as_bytes())))
        {
            (
                "config".to_owned(),
                "admin.token".to_owned(),
                Role::Operator,
                None,
            )
        } else if let Some(key) = control.authenticate(presented) {
            (key.id, key.name, key.role, key.tenant)
        } else if operator_token.is_none() && control.keys(None).is_empty() {
            return Err(ApiError::forbidden(
                "the admin API is disabled: set admin.token in the configuration",
            ));
        } else {
            return Err(ApiError::unauthorized(
                "unknown admin key (revoked, or never made)",
            ));
        };
        Ok(Self {
            role,
            tenant,
            path_tenant,
            actor: Actor {
                key_id: id,
                key_name: name,
                address,
                route: format!("{} {route}", parts.method),
            },
            mutating: parts.method != Method::GET && parts.method != Method::HEAD,
            gateway: gateway.clone(),
        })
    }
}

impl Caller {
    /// Who made a change, for the audit trail.
    pub(crate) fn actor(&self) -> Actor {
        self.actor.clone()
    }

    /// A change of `tenant`'s plugins made by this key.
    pub(crate) fn plugin_change(&self, tenant: &str, change: PluginChange) -> Change {
        Change::Plugin {
            by: self.actor(),
            tenant: tenant.to_owned(),
            change,
        }
    }

    /// The one tenant this key sees, `None` for an operator (every one).
    pub(crate) fn scope(&self) -> Option<&str> {
        match self.role {
            Role::Operator => None,
            Role::TenantAdmin | Role::Viewer => Some(self.tenant.as_deref().unwrap_or("")),
        }
    }

    /// The tenant `access` names, if this key may reach it (403 otherwise)
    /// and it exists (404 otherwise).
    pub(crate) fn tenant(&self, access: Access<'_>) -> Result<Arc<Tenant>, ApiError> {
        self.may(access)?;
        let name = match access {
            Access::Manage(name) | Access::Read(name) => name,
            Access::Operator => self.path_tenant.as_deref().unwrap_or_default(),
        };
        self.gateway
            .tenants
            .snapshot()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no tenant {name:?}")))
    }

    /// Ok if this key may do what `access` names; 403 otherwise.
    pub(crate) fn may(&self, access: Access<'_>) -> Result<(), ApiError> {
        let own = |tenant: &str| self.tenant.as_deref() == Some(tenant);
        let allowed = match (self.role, access) {
            (Role::Operator, _) => true,
            (Role::TenantAdmin, Access::Manage(t) | Access::Read(t)) => own(t),
            (Role::Viewer, Access::Read(t)) => own(t),
            _ => false,
        };
        if allowed {
            return Ok(());
        }
        let needed = match access {
            Access::Operator => "the operator role".to_owned(),
            Access::Manage(t) => format!("the tenant-admin role for tenant {t:?} (or operator)"),
            Access::Read(t) => format!("the viewer role for tenant {t:?} (or above)"),
        };
        let held = match &self.tenant {
            Some(tenant) => format!("{} of tenant {tenant:?}", self.role.as_str()),
            None => self.role.as_str().to_owned(),
        };
        let message = format!(
            "this call needs {needed}; key {:?} is {held}",
            self.actor.key_name
        );
        if self.mutating {
            let tenant = match access {
                Access::Manage(t) | Access::Read(t) => Some(t),
                Access::Operator => self.path_tenant.as_deref(),
            };
            let mut entry = AuditEntry::new(
                &self.actor,
                tenant,
                serde_json::Value::Null,
                self.gateway.cluster.node(),
            );
            entry.outcome = "denied".into();
            entry.error = Some(message.clone());
            self.gateway.cluster.control().audit.record(entry);
        }
        Err(ApiError::forbidden(message))
    }
}
