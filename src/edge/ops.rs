//! Operator endpoints on the internal listener: `/metrics`, `/healthz`,
//! `/readyz`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::bus::BusStatus;
use crate::edge::gateway::Gateway;

/// Prometheus text exposition of every metric.
pub async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gateway.metrics.render(),
    )
        .into_response()
}

/// Liveness: 200 while the process serves HTTP at all.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Readiness: 200 while the node wants new clients and its bus carries
/// messages; 503 with the reason while it drains or its bus does not (for
/// example while the broker is unreachable), so that load balancers send
/// new clients elsewhere.
pub async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    if !gateway.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "reason": "the node is shutting down"})),
        )
            .into_response();
    }
    let engine = gateway.bus.engine();
    if let Some(reason) = gateway.cluster.missing_changes() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "missing_changes",
                "bus": engine,
                "node": gateway.cluster.node(),
                "reason": reason,
            })),
        )
            .into_response();
    }
    if !gateway.cluster.caught_up() && gateway.bus.status() == BusStatus::Ready {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "catching_up",
                "bus": engine,
                "node": gateway.cluster.node(),
                "reason": "applying the admin changes the cluster made before this node started",
            })),
        )
            .into_response();
    }
    match gateway.bus.status() {
        BusStatus::Ready => Json(json!({
            "status": "ready",
            "bus": engine,
            "node": gateway.cluster.node(),
            "peers": gateway.cluster.peer_count(),
            "connections": gateway.sessions.connection_count(),
        }))
        .into_response(),
        BusStatus::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "bus_unavailable",
                "bus": engine,
                "node": gateway.cluster.node(),
                "reason": reason,
            })),
        )
            .into_response(),
    }
}
