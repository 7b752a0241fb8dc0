//! The WebSocket endpoint `/ws/{tenant}`: the handshake's admission
//! phases ([`admission`]) and one task per connection ([`connection`])
//! that writes queued frames, reads client commands, sends heartbeats and
//! enforces the idle timeout.
//!
//! Knows nothing of tenants' business rules or of the bus's engines (of the
//! bus it knows only [`Position`](crate::bus::envelope::Position), what a
//! client resumes from): it registers the connection with the session
//! index and drains the queue it is given.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};

use super::Gateway;
use crate::metrics;

mod admission;
pub(crate) use connection::events::EventStreams;
mod authenticate;
mod connection;
mod stream;
mod upgrade;

/// Longest request target the public listener accepts (414 above it).
pub const MAX_REQUEST_TARGET_BYTES: usize = 8 * 1024;
pub use crate::tenant::MAX_TOPIC_BYTES;
pub use crate::tenant::MAX_USER_BYTES;
/// What a client refused for the tenant's connection limit is told to wait.
const TENANT_FULL_RETRY: Duration = Duration::from_secs(10);
/// What a client refused for a busy plugin is told to wait.
const PLUGIN_BUSY_RETRY: Duration = Duration::from_secs(1);

/// `GET /ws/{tenant}`: runs the admission phases and, when all pass,
/// answers 101 and starts the connection task.
pub(crate) async fn handshake(
    State(gateway): State<Arc<Gateway>>,
    Path(tenant_name): Path<String>,
    mut request: Request,
) -> Response {
    let outcome = admission::admit(&gateway, &tenant_name, &mut request).await;
    let (label, response) = match outcome {
        Ok(response) => ("accepted", response),
        Err(refusal) => (refusal.label, refusal.error.into_response()),
    };
    metrics::handshake(metric_tenant(&gateway, &tenant_name), label);
    response
}

/// `GET /sse/{tenant}`: the same admission phases as `/ws/{tenant}` but
/// the upgrade, then the client's frames as Server-Sent Events (see
/// [`connection::events`]).
pub(crate) async fn events(
    State(gateway): State<Arc<Gateway>>,
    Path(tenant_name): Path<String>,
    mut request: Request,
) -> Response {
    let outcome = admission::admit_events(&gateway, &tenant_name, &mut request).await;
    let (label, response) = match outcome {
        Ok(passed) => (
            "accepted",
            connection::events::serve_events(
                gateway.clone(),
                passed.tenant,
                passed.admitted,
                passed.held,
            )
            .await,
        ),
        Err(refusal) => (refusal.label, refusal.error.into_response()),
    };
    metrics::handshake(metric_tenant(&gateway, &tenant_name), label);
    response
}

/// `POST /sse/{tenant}/commands`: `{"stream", "secret", "command"}` — a
/// command of a Server-Sent Events client, as a WebSocket client would
/// send it on its socket; answers the reply it would get there.
pub(crate) async fn events_command(
    State(gateway): State<Arc<Gateway>>,
    Path(tenant_name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return super::ApiError::bad_request(format!(
                "the body is {{\"stream\", \"secret\", \"command\"}}: {err}"
            ))
            .into_response();
        }
    };
    match connection::events::stream_command(&gateway, &tenant_name, request).await {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(error) => error.into_response(),
    }
}

/// Unknown tenants share one label, so that scanners cannot grow the
/// metric's cardinality without bound.
fn metric_tenant<'a>(gateway: &Gateway, name: &'a str) -> &'a str {
    if gateway.tenants.snapshot().get(name).is_some() {
        name
    } else {
        "unknown"
    }
}
