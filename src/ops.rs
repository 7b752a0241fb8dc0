//! Operator endpoints on the internal listener: `/metrics`, `/healthz`,
//! `/readyz`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::gateway::Gateway;

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

/// Readiness: 200 while the node wants new clients; 503 with the reason
/// once it drains, so that load balancers take it out first.
pub async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.is_ready() {
        Json(json!({
            "status": "ready",
            "bus": gateway.bus.engine(),
            "connections": gateway.sessions.connection_count(),
        }))
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "reason": "the node is shutting down"})),
        )
            .into_response()
    }
}
