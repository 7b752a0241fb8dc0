//! Calling a tenant's `authenticate` plugin, for a handshake (admission)
//! and for a fresh token an open connection sends (`refresh`), and the
//! [`Refusal`] a client gets when it is not let in: both the admission
//! phases and the connection task use them, neither owns them.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{StatusCode, header};

use super::PLUGIN_BUSY_RETRY;
use crate::edge::api_error::ApiError;
use crate::plugin::limits::{MAX_REJECTION_BYTES, truncated};
use crate::plugin::shadow::Shadow;
use crate::plugin::{self, Authenticated, CompiledPlugin, Hook};
use crate::tenant::subscriptions::Grant;
use crate::tenant::{Identity, Tenant};

/// A refused handshake: the answer, and the `outcome` label it is counted
/// under.
pub(in crate::edge) struct Refusal {
    pub(in crate::edge) label: &'static str,
    pub(in crate::edge) error: ApiError,
}

impl Refusal {
    pub(super) fn new(label: &'static str, error: ApiError) -> Self {
        Self { label, error }
    }
}

/// Runs the plugin's `authenticate` within the tenant's share and turns
/// its answer into an identity, or the refusal to answer with. A plugin
/// that fails (trap, timeout, memory, bad output) refuses the client:
/// authentication fails closed. A `shadow` version is handed the same
/// handshake to compare.
pub(super) async fn call_authenticate(
    tenant: &Tenant,
    plugin: Arc<CompiledPlugin>,
    shadow: Option<Shadow>,
    request: plugin::Handshake,
) -> Result<Identity, Refusal> {
    let settings = tenant.plugin_settings.clone();
    let calling = plugin.clone();
    let verdict = tenant
        .run_plugin_work(move || {
            let verdict = calling.authenticate(&settings, &request);
            if let Some(shadow) = shadow {
                shadow.authenticate(&settings, &request, &verdict);
            }
            verdict
        })
        .await
        .map_err(|busy| {
            plugin.record_skipped(Hook::Authenticate, "busy");
            let error = ApiError::unavailable(busy.to_string()).retry_after(PLUGIN_BUSY_RETRY);
            Refusal::new("plugin_busy", error)
        })?;
    let unavailable = || {
        let error = ApiError::unavailable("the tenant's authenticator is failing; try again later");
        Refusal::new("plugin_failed", error)
    };
    match verdict {
        // The identity's bounds were checked in the call (a bad one is a
        // `bad_output` failure).
        Ok(Ok(Authenticated {
            identity,
            expires_at_millis,
        })) => {
            let (topics, grant) = Grant::from_entries(identity.topics);
            Ok(Identity {
                user: identity.user,
                topics,
                metadata: identity.metadata.into_iter().collect(),
                grant,
                // Rounded up: never earlier than the plugin said.
                expires_at_secs: expires_at_millis.map(|ms| ms.div_ceil(1000)),
            })
        }
        Ok(Err(rejection)) => {
            let status = StatusCode::from_u16(rejection.status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::FORBIDDEN);
            let label = if status == StatusCode::UNAUTHORIZED {
                "unauthorized"
            } else {
                "refused"
            };
            let reason = truncated(&rejection.reason, MAX_REJECTION_BYTES).to_owned();
            Err(Refusal::new(
                label,
                ApiError::new(status, "rejected", reason),
            ))
        }
        Err(_) => Err(unavailable()),
    }
}

/// Verifies a fresh token an open connection of `user` sent (`refresh`)
/// with the tenant's plugin: `authenticate` is called as for a handshake
/// to `path` carrying `authorization: Bearer <token>`, and must admit the
/// same user. Returns when the connection must now end (`None`: never).
pub(super) async fn plugin_refresh(
    tenant: &Tenant,
    plugin: Arc<CompiledPlugin>,
    user: &str,
    remote: Option<SocketAddr>,
    token: &str,
) -> Result<Option<u64>, RefreshFailure> {
    let request = plugin::Handshake {
        path: format!("/ws/{}", tenant.name),
        query: String::new(),
        headers: vec![plugin::Header {
            name: header::AUTHORIZATION.as_str().to_owned(),
            value: format!("Bearer {token}"),
        }],
        remote_address: remote.map(|r| r.to_string()).unwrap_or_default(),
    };
    match call_authenticate(tenant, plugin, None, request).await {
        Ok(identity) if identity.user == user => Ok(identity.expires_at_secs),
        Ok(_) => Err(RefreshFailure {
            message: "the token is for another user".to_owned(),
            plugin_failed: false,
        }),
        Err(refusal) => Err(RefreshFailure {
            plugin_failed: refusal.label == "plugin_failed",
            message: refusal.error.message,
        }),
    }
}

/// Why a fresh token was not taken.
pub(super) struct RefreshFailure {
    pub(super) message: String,
    /// The plugin failed on it (trapped, timed out): charged to the
    /// client's address like a handshake that made it fail.
    pub(super) plugin_failed: bool,
}
