//! The edge: everything that speaks to the world outside the node.
//!
//! Owns the listeners (accept loop, TLS, connections per address), the
//! WebSocket endpoint (handshake admission, the connection task, every
//! client frame and close code), and the HTTP APIs of the internal
//! listener: push, admin and operations.
//!
//! Turns requests into calls on the other parts and their answers into
//! statuses, JSON bodies and close codes. Its only state is per connection
//! (and the count of connections per address); the admin API never changes
//! the tenants or the plugins itself: it hands a change to the cluster
//! part, which applies it on every node alike. Knows nothing of bus
//! engines or of how delivery finds recipients; what it reports of other
//! nodes, it asks the cluster part.

use std::sync::Arc;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};

pub(crate) mod admin;
pub(crate) mod api_error;
mod console;
mod gateway;
pub(crate) mod listener;
mod live;
mod ops;
pub(crate) mod push;
mod pusher;
pub(crate) mod tls;
pub(crate) mod ws;

pub(crate) use admin::figures::keep_taking as keep_figures;
pub(crate) use gateway::Gateway;

use api_error::ApiError;

async fn not_found() -> axum::response::Response {
    ApiError::not_found("no such endpoint").into_response()
}

/// Serves a Server-Sent Events request on the client's socket (the public
/// listener reads its head; see [`ws::events_on_socket`]).
pub(crate) fn event_stream_server(gateway: Arc<Gateway>) -> listener::EventStreamServer {
    Arc::new(move |request, tcp| Box::pin(ws::events_on_socket(gateway.clone(), request, tcp)))
}

/// The routes of the public listener: WebSocket and event-stream clients.
pub(crate) fn public_router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/ws/{tenant}", get(ws::handshake))
        // Over TLS (the plain listener serves them on their socket).
        .route("/sse/{tenant}", get(ws::events))
        .route("/sse/{tenant}/commands", post(ws::events_command))
        .route("/app/{key}", get(pusher::handshake))
        .fallback(not_found)
        .with_state(gateway)
}

/// The routes of the internal listener: push API, operations, admin API.
pub(crate) fn internal_router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/push", post(push::push_one))
        .route("/v1/push/batch", post(push::push_batch))
        .route("/v1/presence", post(live::presence))
        .route("/v1/disconnect", post(live::disconnect))
        .route("/v1/subscriptions", post(live::subscriptions))
        .route("/v1/history", post(live::history))
        .route("/apps/{app_id}/events", post(pusher::api::events))
        .route(
            "/apps/{app_id}/batch_events",
            post(pusher::api::batch_events),
        )
        .route("/apps/{app_id}/channels", get(pusher::api::channels))
        .route(
            "/apps/{app_id}/channels/{channel}",
            get(pusher::api::channel),
        )
        .route(
            "/apps/{app_id}/channels/{channel}/users",
            get(pusher::api::users),
        )
        .route(
            "/apps/{app_id}/users/{user}/terminate_connections",
            post(pusher::api::terminate_connections),
        )
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/admin/v1/tenants", get(admin::list_tenants))
        .route(
            "/admin/v1/tenants/{name}",
            get(admin::get_tenant)
                .put(admin::put_tenant)
                .delete(admin::delete_tenant),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins",
            get(admin::plugins::list_plugins).post(admin::plugins::upload_plugin),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/rollback",
            post(admin::plugins::rollback_plugin),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/{version}",
            axum::routing::delete(admin::plugins::remove_plugin),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/{version}/activate",
            post(admin::plugins::activate_plugin),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/canary",
            axum::routing::delete(admin::plugins::end_canary),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/{version}/canary",
            post(admin::plugins::set_canary),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/shadow",
            get(admin::plugins::shadow_report).delete(admin::plugins::end_shadow),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/{version}/shadow",
            post(admin::plugins::set_shadow),
        )
        .route(
            "/admin/v1/tenants/{name}/push-keys",
            axum::routing::put(admin::put_push_keys),
        )
        .route(
            "/admin/v1/tenants/{name}/presence",
            post(live::admin_presence),
        )
        .route(
            "/admin/v1/tenants/{name}/disconnect",
            post(live::admin_disconnect),
        )
        .route(
            "/admin/v1/tenants/{name}/subscriptions",
            post(live::admin_subscriptions),
        )
        .route(
            "/admin/v1/keys",
            get(admin::keys::list_keys).post(admin::keys::create_key),
        )
        .route(
            "/admin/v1/keys/{id}",
            axum::routing::delete(admin::keys::revoke_key),
        )
        .route(
            "/admin/v1/tenants/{name}/plugins/{version}/try",
            post(admin::plugins::try_version),
        )
        .route(
            "/admin/v1/tenants/{name}/figures",
            get(admin::figures::tenant_figures),
        )
        .route("/admin/v1/whoami", get(admin::keys::whoami))
        .route("/admin/v1/audit", get(admin::keys::audit))
        .route("/admin/v1/drain", post(admin::drain))
        .route("/console", get(console::to_page))
        .route("/console/", get(console::file))
        .route("/console/{file}", get(console::file))
        .fallback(not_found)
        .with_state(gateway)
}
