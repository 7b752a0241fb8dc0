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
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::Gateway;
use crate::metrics;

mod admission;
pub(in crate::edge) use admission::admit_pusher_client;
pub(in crate::edge) use authenticate::Refusal;
pub(crate) use connection::events::EventStreams;
mod authenticate;
mod connection;
pub(in crate::edge) use connection::{close, fail};
mod stream;
pub(in crate::edge) use stream::plain_tcp;
mod upgrade;
pub(in crate::edge) use upgrade::upgrade;

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
    let origin = request.headers().get(header::ORIGIN).cloned();
    let outcome = admission::admit_events(&gateway, &tenant_name, &mut request).await;
    let (label, mut response) = match outcome {
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
    // A page of another origin reads its stream (and its refusal) if the
    // tenant admits that origin, which the admission checked.
    allow_origin(&mut response, origin, |_| true);
    response
}

/// A `GET /sse/{tenant}` request whose head the public listener read:
/// admitted as [`events`] admits it, then served on `tcp` itself.
pub(crate) async fn events_on_socket(
    gateway: Arc<Gateway>,
    mut request: Request,
    tcp: tokio::net::TcpStream,
) {
    let tenant_name = request
        .uri()
        .path()
        .strip_prefix("/sse/")
        .unwrap_or_default()
        .to_owned();
    let origin = request.headers().get(header::ORIGIN).cloned();
    let outcome = admission::admit_events(&gateway, &tenant_name, &mut request).await;
    drop(request);
    let label = match outcome {
        Ok(passed) => {
            metrics::handshake(metric_tenant(&gateway, &tenant_name), "accepted");
            connection::events::serve_events_on_socket(
                gateway.clone(),
                passed.tenant,
                passed.admitted,
                passed.held,
                tcp,
                origin,
            )
            .await;
            return;
        }
        Err(refusal) => {
            let mut response = refusal.error.into_response();
            allow_origin(&mut response, origin, |_| true);
            connection::events::answer_on_socket(tcp, response).await;
            refusal.label
        }
    };
    metrics::handshake(metric_tenant(&gateway, &tenant_name), label);
}

/// Lets a page of `origin` read `response` (CORS) if `admitted` says so.
/// No credentials: a cookie never makes a cross-origin read possible.
fn allow_origin(
    response: &mut Response,
    origin: Option<HeaderValue>,
    admitted: impl FnOnce(&str) -> bool,
) {
    if let Some(origin) = origin
        && admitted(origin.to_str().unwrap_or(""))
    {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
    }
}

/// `POST /sse/{tenant}/commands`: `{"stream", "secret", "command"}` — a
/// command of a Server-Sent Events client, as a WebSocket client would
/// send it on its socket; answers the reply it would get there.
/// (The body is JSON whatever its content type: a page sends it as
/// `text/plain`, which needs no CORS preflight.)
pub(crate) async fn events_command(
    State(gateway): State<Arc<Gateway>>,
    Path(tenant_name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mut response = match serde_json::from_slice(&body) {
        Ok(request) => {
            match connection::events::stream_command(&gateway, &tenant_name, request).await {
                Ok(reply) => axum::Json(reply).into_response(),
                Err(error) => error.into_response(),
            }
        }
        Err(err) => super::ApiError::bad_request(format!(
            "the body is {{\"stream\", \"secret\", \"command\"}}: {err}"
        ))
        .into_response(),
    };
    let tenant = gateway.tenants.snapshot().get(&tenant_name).cloned();
    allow_origin(
        &mut response,
        headers.get(header::ORIGIN).cloned(),
        |origin| tenant.is_some_and(|tenant| tenant.allows_origin(origin)),
    );
    response
}

/// Unknown tenants share one label, so that scanners cannot grow the
/// metric's cardinality without bound.
pub(super) fn metric_tenant<'a>(gateway: &Gateway, name: &'a str) -> &'a str {
    if gateway.tenants.snapshot().get(name).is_some() {
        name
    } else {
        "unknown"
    }
}
