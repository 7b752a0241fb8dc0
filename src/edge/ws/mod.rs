//! The WebSocket endpoint `/ws/{tenant}`: handshake checks, authentication,
//! and one task per connection that writes queued frames, reads client
//! commands, sends heartbeats and enforces the idle timeout.
//!
//! Knows nothing of tenants' business rules or of the bus: it registers the
//! connection with the [`SessionManager`] and drains the queue it is given.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::delivery::{CloseReason, ConnectionHandle};
use crate::edge::api_error::ApiError;
use crate::edge::gateway::Gateway;
use crate::edge::listener::ConnectionContext;
use crate::metrics;
use crate::plugin::{CompiledPlugin, Handshake as PluginHandshake, Header, Hook};
use crate::tenant::Identity;
use crate::tenant::auth::{Admission, AuthError, Handshake, selected_subprotocol};
use crate::tenant::{RetryAfter, Tenant};

/// Longest request target the public listener accepts (414 above it).
pub const MAX_REQUEST_TARGET_BYTES: usize = 8 * 1024;
/// Longest user id an authenticator may establish (as long as the push API
/// accepts).
pub const MAX_USER_BYTES: usize = crate::edge::push::MAX_ADDRESS_BYTES;
/// Longest topic name a client may subscribe to.
pub const MAX_TOPIC_BYTES: usize = 256;
/// What a client refused for the tenant's connection limit is told to wait.
const TENANT_FULL_RETRY: Duration = Duration::from_secs(10);
/// Frames written in one go before the socket is flushed.
const WRITE_BATCH: usize = 64;
/// Time allowed for a close frame to leave before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type ClientSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// `GET /ws/{tenant}`: checks the upgrade request, authenticates the client
/// and, when all is well, answers 101 and starts the connection task.
pub async fn handshake(
    State(gateway): State<Arc<Gateway>>,
    Path(tenant_name): Path<String>,
    mut request: Request,
) -> Response {
    let outcome = accept(&gateway, &tenant_name, &mut request);
    let (label, response) = match outcome {
        Ok(response) => ("accepted", response),
        Err((label, error)) => (label, error.into_response()),
    };
    metrics::handshake(metric_tenant(&gateway, &tenant_name), label);
    response
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

fn accept(
    gateway: &Arc<Gateway>,
    tenant_name: &str,
    request: &mut Request,
) -> Result<Response, (&'static str, ApiError)> {
    let uri = request.uri();
    let target_bytes = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if target_bytes > MAX_REQUEST_TARGET_BYTES {
        let error = ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("request target longer than {MAX_REQUEST_TARGET_BYTES} bytes"),
        );
        return Err(("bad_request", error));
    }
    let Some(tenant) = gateway.tenants.snapshot().get(tenant_name).cloned() else {
        let error = ApiError::not_found(format!("unknown tenant {tenant_name:?}"));
        return Err(("unknown_tenant", error));
    };
    let key = check_upgrade_request(request.headers()).map_err(|e| ("bad_request", e))?;
    let context = request.extensions().get::<ConnectionContext>().cloned();
    if let Some(context) = &context
        && let Err(RetryAfter(wait)) = tenant.admit_handshake(context.remote.ip())
    {
        let error =
            ApiError::too_many_requests("too many handshakes from your address").retry_after(wait);
        return Err(("rate_limited", error));
    }
    let limit = tenant.config.max_connections;
    if limit > 0 && gateway.sessions.tenant_connections(&tenant.name) >= limit {
        let error = ApiError::unavailable("this tenant has reached its connection limit")
            .retry_after(TENANT_FULL_RETRY);
        return Err(("tenant_full", error));
    }
    if let Some(origin) = request.headers().get(header::ORIGIN)
        && !tenant.allows_origin(origin.to_str().unwrap_or(""))
    {
        let error = ApiError::forbidden("this origin may not connect to this tenant");
        return Err(("origin_refused", error));
    }
    let handshake = Handshake {
        uri: request.uri(),
        headers: request.headers(),
    };
    let remote = context.as_ref().map(|c| c.remote);
    let Admission {
        identity,
        subprotocol,
    } = match gateway.plugins.hook(&tenant.name, Hook::Authenticate) {
        Some(plugin) => plugin_admission(&tenant, &plugin, &handshake, remote)?,
        None => tenant
            .authenticator
            .authenticate(&handshake)
            .map_err(|err| match err {
                AuthError::Unauthenticated(message) => {
                    ("unauthorized", ApiError::unauthorized(message))
                }
                AuthError::Refused(message) => ("refused", ApiError::forbidden(message)),
            })?,
    };
    if identity.user.len() > MAX_USER_BYTES {
        let error = ApiError::unauthorized(format!("a user id is at most {MAX_USER_BYTES} bytes"));
        return Err(("unauthorized", error));
    }
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        let error = ApiError::bad_request("connection cannot be upgraded");
        return Err(("bad_request", error));
    };

    let gateway = gateway.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // Keeps the per-address slot taken for the connection's life.
                let _context = context;
                serve_client(gateway, tenant, identity, upgraded).await;
            }
            Err(err) => tracing::debug!(%err, "upgrade failed"),
        }
    });

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if let Some(protocol) = subprotocol {
        // Browsers fail a handshake whose offered subprotocols get no answer.
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok(response
        .body(Body::empty())
        .expect("static response parts are valid"))
}

/// Authenticates with the tenant's plugin. A plugin that fails (trap,
/// timeout, memory) refuses the client: authentication fails closed.
fn plugin_admission(
    tenant: &Tenant,
    plugin: &CompiledPlugin,
    handshake: &Handshake<'_>,
    remote: Option<std::net::SocketAddr>,
) -> Result<Admission, (&'static str, ApiError)> {
    let request = PluginHandshake {
        path: handshake.uri.path().to_owned(),
        query: handshake.uri.query().unwrap_or("").to_owned(),
        headers: handshake
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some(Header {
                    name: name.as_str().to_owned(),
                    value: value.to_str().ok()?.to_owned(),
                })
            })
            .collect(),
        remote_address: remote.map(|r| r.to_string()).unwrap_or_default(),
    };
    let unavailable = || {
        let error = ApiError::unavailable("the tenant's authenticator is failing; try again later");
        ("plugin_failed", error)
    };
    match plugin.authenticate(&tenant.plugin_settings, &request) {
        Ok(Ok(identity)) if !identity.user.is_empty() => Ok(Admission {
            identity: Identity {
                user: identity.user,
                topics: identity.topics,
                metadata: identity.metadata.into_iter().collect(),
            },
            subprotocol: selected_subprotocol(handshake.headers),
        }),
        Ok(Ok(_)) => {
            plugin.bad_output(Hook::Authenticate);
            Err(unavailable())
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
            Err((label, ApiError::new(status, "rejected", rejection.reason)))
        }
        Err(_) => Err(unavailable()),
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 6455 §4.2.1: returns the client's `Sec-WebSocket-Key` if the request
/// is a valid version-13 upgrade.
fn check_upgrade_request(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only: send an Upgrade: websocket request",
        )
        .with_header(header::UPGRADE, "websocket"));
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(ApiError::bad_request(
            "Connection header must include \"upgrade\"",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "only WebSocket version 13 is supported",
        )
        .with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::bad_request("Sec-WebSocket-Key header is missing"))?;
    let decoded_len = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map(|nonce| nonce.len());
    if decoded_len != Ok(16) {
        return Err(ApiError::bad_request(
            "Sec-WebSocket-Key must be 16 bytes encoded in base64",
        ));
    }
    Ok(key.clone())
}

/// Connection settings derived once from the configuration.
struct ConnectionSettings {
    ping_interval: Duration,
    idle_timeout: Duration,
    max_topics: usize,
}

/// How a connection ended, for the disconnect metric.
type EndLabel = &'static str;

async fn serve_client(
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    mut identity: Identity,
    upgraded: hyper::upgrade::Upgraded,
) {
    let ws_config = &gateway.config.websocket;
    let frame_config = WebSocketConfig::default()
        .read_buffer_size(ws_config.read_buffer_bytes)
        // Frames are batched by the writer loop; the buffer only holds a
        // batch while the socket drains.
        .write_buffer_size(0)
        .max_message_size(Some(ws_config.max_message_bytes))
        .max_frame_size(Some(ws_config.max_message_bytes));
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(frame_config))
            .await;

    let settings = ConnectionSettings {
        ping_interval: ws_config.ping_interval,
        idle_timeout: ws_config.idle_timeout,
        max_topics: ws_config.max_topics_per_connection,
    };
    // Initial topics come from a token or a plugin: hold them to the same
    // rules as subscriptions.
    identity
        .topics
        .retain(|t| !t.is_empty() && t.len() <= MAX_TOPIC_BYTES);
    identity.topics.sort_unstable();
    identity.topics.dedup();
    identity.topics.truncate(settings.max_topics);
    let topics: Vec<Arc<str>> = identity
        .topics
        .iter()
        .map(|t| Arc::from(t.as_str()))
        .collect();
    let handle = gateway
        .sessions
        .register(&tenant, identity, ws_config.outbound_queue);
    gateway.cluster.connection_opened(&handle);
    let mut registration = Registration {
        gateway: &gateway,
        handle,
        topics,
    };
    let label = drive(&mut socket, &mut registration, &settings).await;
    metrics::disconnect(&tenant.name, label);
}

/// Unregisters the connection when its task ends, however it ends.
struct Registration<'a> {
    gateway: &'a Gateway,
    handle: ConnectionHandle,
    topics: Vec<Arc<str>>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.gateway.sessions.unregister(&self.handle, &self.topics);
        self.gateway.cluster.connection_closed(&self.handle);
    }
}

/// Messages a client may send.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientCommand {
    Ping,
    Subscribe { topic: String },
    Unsubscribe { topic: String },
}

fn json_frame(value: serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}

fn error_frame(message: &str) -> Message {
    json_frame(serde_json::json!({"type": "error", "message": message}))
}

/// The connection's loop; returns how it ended.
async fn drive(
    socket: &mut ClientSocket,
    registration: &mut Registration<'_>,
    settings: &ConnectionSettings,
) -> EndLabel {
    let handle = registration.handle.clone();
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + settings.ping_interval;
    // A write that cannot finish within the idle timeout means the client
    // stopped reading.
    let write_timeout = settings.idle_timeout;

    loop {
        // Checked before every wait: a wake-up consumed elsewhere (e.g. by
        // `closed()` during a write) never strands a frame or a close.
        if let Some(reason) = handle.close_reason() {
            if reason.flushes_queue() {
                let flushed = async {
                    while handle.has_frames() {
                        write_queued(socket, &handle).await?;
                    }
                    Ok::<_, WsError>(())
                };
                if !matches!(timeout(CLOSE_TIMEOUT, flushed).await, Ok(Ok(()))) {
                    return reason.label();
                }
            }
            close(socket, reason.code(), reason.text()).await;
            return reason.label();
        }
        if handle.has_frames() {
            tokio::select! {
                biased;
                reason = handle.closed() => {
                    // The socket may hold half a frame: drop it without
                    // waiting on a client that does not read.
                    return reason.label();
                }
                written = timeout(write_timeout, write_queued(socket, &handle)) => match written {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return "write_error",
                    Err(_) => return "write_timeout",
                },
            }
        }
        tokio::select! {
            biased;
            () = handle.woken() => {}
            incoming = socket.next() => {
                last_heard = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let reply = command(&text, registration, settings);
                        if timeout(write_timeout, socket.send(reply)).await.is_err() {
                            return "write_timeout";
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let reply = error_frame("binary frames are not accepted; send JSON text");
                        if timeout(write_timeout, socket.send(reply)).await.is_err() {
                            return "write_timeout";
                        }
                    }
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; send it.
                        let _ = timeout(CLOSE_TIMEOUT, socket.flush()).await;
                        return "client_closed";
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Err(err)) => return fail(socket, err).await,
                    None => return "client_gone",
                }
            }
            () = sleep_until(next_ping) => {
                if last_heard.elapsed() >= settings.idle_timeout {
                    let reason = CloseReason::IdleTimeout;
                    close(socket, reason.code(), reason.text()).await;
                    return reason.label();
                }
                next_ping = Instant::now() + settings.ping_interval;
                if timeout(write_timeout, socket.send(Message::Ping(Default::default()))).await.is_err() {
                    return "write_timeout";
                }
            }
        }
    }
}

/// Writes queued frames (up to a batch), then flushes once: one syscall
/// for a burst instead of one per frame.
async fn write_queued(socket: &mut ClientSocket, handle: &ConnectionHandle) -> Result<(), WsError> {
    for _ in 0..WRITE_BATCH {
        match handle.next_frame() {
            Some(frame) => socket.feed(frame).await?,
            None => break,
        }
    }
    socket.flush().await
}

/// Executes one client command and returns the reply frame.
fn command(
    text: &str,
    registration: &mut Registration<'_>,
    settings: &ConnectionSettings,
) -> Message {
    let command = match serde_json::from_str::<ClientCommand>(text) {
        Ok(command) => command,
        Err(err) => return error_frame(&format!("invalid command: {err}")),
    };
    match command {
        ClientCommand::Ping => json_frame(serde_json::json!({"type": "pong"})),
        ClientCommand::Subscribe { topic } => {
            if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
                return error_frame(&format!("a topic is 1 to {MAX_TOPIC_BYTES} bytes"));
            }
            if !registration.topics.iter().any(|t| **t == *topic) {
                if registration.topics.len() >= settings.max_topics {
                    return error_frame(&format!(
                        "subscription limit of {} topics reached",
                        settings.max_topics
                    ));
                }
                let topic: Arc<str> = Arc::from(topic.as_str());
                registration
                    .gateway
                    .sessions
                    .subscribe(&registration.handle, topic.clone());
                registration.topics.push(topic);
            }
            json_frame(serde_json::json!({"type": "subscribed", "topic": topic}))
        }
        ClientCommand::Unsubscribe { topic } => {
            registration.topics.retain(|t| **t != *topic);
            registration
                .gateway
                .sessions
                .unsubscribe(&registration.handle, &topic);
            json_frame(serde_json::json!({"type": "unsubscribed", "topic": topic}))
        }
    }
}

/// Answers a broken client frame with the close code RFC 6455 asks for.
async fn fail(socket: &mut ClientSocket, err: WsError) -> EndLabel {
    let (code, label) = match &err {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (CloseCode::Size, "too_large"),
        WsError::Utf8(_) => (CloseCode::Invalid, "invalid_utf8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return "client_gone",
        WsError::Protocol(_) => (CloseCode::Protocol, "protocol_error"),
        _ => return "io_error",
    };
    tracing::debug!(%err, "closing a client after a bad frame");
    close(socket, code.into(), &err.to_string()).await;
    label
}

/// Sends a close frame (reason cut to fit a control frame) and waits a
/// moment for the client's reply.
async fn close(socket: &mut ClientSocket, code: u16, reason: &str) {
    let mut reason = reason.to_owned();
    // A close frame carries at most 123 bytes of reason.
    while reason.len() > 123 {
        reason.pop();
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(reason),
    };
    // Wait for the client's close reply before dropping the socket: closing
    // TCP first could reset the connection and lose the close frame on
    // its way.
    let closing = async {
        socket.close(Some(frame)).await?;
        while let Some(Ok(_)) = socket.next().await {}
        Ok::<_, WsError>(())
    };
    let _ = timeout(CLOSE_TIMEOUT, closing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        headers
    }

    #[test]
    fn a_valid_upgrade_passes() {
        assert!(check_upgrade_request(&upgrade_headers()).is_ok());
    }

    #[test]
    fn a_key_that_is_not_16_bytes_is_refused() {
        let mut headers = upgrade_headers();
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert_eq!(
            check_upgrade_request(&headers).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn another_version_gets_426_naming_13() {
        let mut headers = upgrade_headers();
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        let response = check_upgrade_request(&headers).unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }
}
