//! The Pusher Channels protocol at the edge: clients at `/app/{key}` on
//! the public listener ([`socket`]), services at `/apps/{app_id}/…` on
//! the internal one ([`api`]), each for the tenant whose Pusher app it
//! names.
//!
//! A client is upgraded whatever happens next, as Pusher does: a refusal
//! (an unknown key, a missing protocol version, a full tenant) is a
//! `pusher:error` and a close code in the protocol's ranges, which tell
//! pusher-js whether and when to reconnect.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::Gateway;
use super::ws::{Refusal, admit_pusher_client, metric_tenant, upgrade};
use crate::metrics;

pub(super) mod api;
mod io;
mod socket;

/// Protocol versions spoken (pusher-js speaks 7).
const PROTOCOLS: std::ops::RangeInclusive<u32> = 5..=7;

/// Why a client is closed right after its upgrade: a close code in the
/// protocol's ranges, its message, and the handshake metric's label.
struct Refused {
    code: u16,
    message: String,
    label: &'static str,
}

impl Refused {
    fn new(code: u16, message: impl Into<String>, label: &'static str) -> Self {
        Self {
            code,
            message: message.into(),
            label,
        }
    }

    /// An admission phase's refusal, in the protocol's terms.
    fn of(refusal: Refusal) -> Self {
        let code = match refusal.label {
            // Reconnect at once: to another node.
            "draining" => 4200,
            "origin_refused" => 4009,
            // Reconnect after a back-off: the limit passes.
            _ => 4100,
        };
        Self::new(code, refusal.error.message, refusal.label)
    }
}

/// `GET /app/{key}`: upgrades, then serves the client or says why not.
pub(crate) async fn handshake(
    State(gateway): State<Arc<Gateway>>,
    Path(key): Path<String>,
    mut request: Request,
) -> Response {
    let accept = match upgrade(request.headers()) {
        Ok(key) => derive_accept_key(key.as_bytes()),
        Err(error) => return error.into_response(),
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return super::ApiError::bad_request("connection cannot be upgraded").into_response();
    };
    let opening = open(&gateway, &key, &request);
    let tenant_label = match &opening {
        Ok(opening) => opening.tenant.name.to_string(),
        Err(_) => gateway
            .tenants
            .snapshot()
            .by_pusher_key(&key)
            .map_or_else(|| "unknown".to_owned(), |t| t.name.to_string()),
    };
    let label = opening.as_ref().map_or_else(|r| r.label, |_| "accepted");
    metrics::handshake(metric_tenant(&gateway, &tenant_label), label);
    drop(request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => socket::serve(gateway, upgraded, opening).await,
            Err(err) => tracing::debug!(%err, "upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("static response parts are valid")
}

/// The handshake's checks: the protocol version, the app, then the
/// admission phases every client passes.
fn open(gateway: &Gateway, key: &str, request: &Request) -> Result<socket::Opening, Refused> {
    let query = request.uri().query().unwrap_or("");
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    let protocol = params.iter().find(|(name, _)| name == "protocol");
    match protocol.map(|(_, v)| v.parse::<u32>()) {
        None => {
            return Err(Refused::new(
                4008,
                "No protocol version supplied",
                "bad_request",
            ));
        }
        Some(Ok(version)) if PROTOCOLS.contains(&version) => {}
        Some(_) => {
            return Err(Refused::new(
                4007,
                format!(
                    "Unsupported protocol version: this server speaks {} to {}",
                    PROTOCOLS.start(),
                    PROTOCOLS.end()
                ),
                "bad_request",
            ));
        }
    }
    let Some(tenant) = gateway.tenants.snapshot().by_pusher_key(key).cloned() else {
        return Err(Refused::new(
            4001,
            format!("App key {key} not in this cluster"),
            "unknown_tenant",
        ));
    };
    let held = admit_pusher_client(gateway, &tenant, request).map_err(Refused::of)?;
    Ok(socket::Opening { tenant, held })
}
