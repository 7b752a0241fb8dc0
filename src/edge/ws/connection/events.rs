//! A Server-Sent Events client (`GET /sse/{tenant}`), for networks that
//! refuse WebSocket: admitted by the same phases, registered the same way,
//! it receives the same JSON frames as `text/event-stream` — one event per
//! frame, `id:` a message's position (what a reconnecting `EventSource`
//! sends back as `Last-Event-ID`), `data:` the frame — with a comment
//! every `websocket.ping_interval` to keep proxies from closing an idle
//! stream. Its first event (`{"type": "hello", "stream", "secret"}`) names
//! the stream and the secret its commands (`subscribe`, `unsubscribe`,
//! `refresh`, `ping`) must carry to `POST /sse/{tenant}/commands`, whose
//! answer is the reply a WebSocket client would get. A closing reason
//! comes as a last frame `{"type": "close", "code", "reason"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Buf;
use subtle::ConstantTimeEq;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;

use super::{
    Admitted, CLOSE_TIMEOUT, ConnectionSettings, EndLabel, Registration, command, register_client,
};
use crate::delivery::{CloseReason, ConnectionId, WireFrame};
use crate::edge::Gateway;
use crate::edge::api_error::ApiError;
use crate::metrics;
use crate::tenant::Tenant;

/// Events waiting for the client's socket to take them, besides the
/// connection's own queue (which bounds what a slow client may lag).
const OUT_EVENTS: usize = 16;
/// How long a command waits for the stream's task to answer it.
const COMMAND_PATIENCE: Duration = Duration::from_secs(10);

/// A command for a stream's task, and where its reply goes.
type Command = (String, oneshot::Sender<String>);

/// A stream's command waiting for its task (one at a time), and the task's
/// wake-up: a stream costs these few bytes, not a channel's block.
#[derive(Default)]
struct Inbox {
    waiting: std::sync::Mutex<Option<Command>>,
    arrived: tokio::sync::Notify,
}

/// What `POST /sse/{tenant}/commands` needs of a live stream.
pub(crate) struct EventStream {
    tenant: Arc<str>,
    secret: String,
    inbox: Arc<Inbox>,
}

/// Every live Server-Sent Events stream on this node, by connection id.
pub(crate) type EventStreams = dashmap::DashMap<ConnectionId, EventStream>;

/// Registers an admitted client and answers its event stream; a task of
/// its own feeds it until the connection ends, holding `held`.
pub(in crate::edge::ws) async fn serve_events(
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    admitted: Admitted,
    held: impl Send + 'static,
) -> Response {
    let (out, events) = mpsc::channel::<Bytes>(OUT_EVENTS);
    start(gateway, tenant, admitted, held, Sink::Channel(out)).await;
    let body = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(event), events))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Proxies that buffer responses (nginx) would hold events back.
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .expect("static response parts are valid")
}

/// Registers the client, puts its hello on `sink`, and starts the task
/// that feeds it.
async fn start(
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    admitted: Admitted,
    held: impl Send + 'static,
    sink: Sink,
) {
    let (registration, settings) = register_client(gateway.clone(), tenant, admitted).await;
    let inbox = Arc::new(Inbox::default());
    let id = registration.handle.id();
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let hello = serde_json::json!({"type": "hello", "stream": id, "secret": secret});
    // As bytes, which the first send consumes: the task keeps nothing of it.
    let hello = data_event(None, &hello.to_string());
    gateway.event_streams.insert(
        id,
        EventStream {
            tenant: registration.tenant.name.clone(),
            secret,
            inbox: inbox.clone(),
        },
    );
    tokio::spawn(async move {
        let mut registration = registration;
        let label = match sink.send(hello, settings.idle_timeout).await {
            Ok(()) => drive(&mut registration, &settings, &sink, &inbox).await,
            Err(label) => label,
        };
        registration.gateway.event_streams.remove(&id);
        metrics::disconnect(&registration.tenant.name, label);
        drop(registration);
        drop(held);
    });
}

/// Serves an admitted client on its own socket (the public listener read
/// its request's head): the response's head, then events as they come,
/// the body delimited by the connection's end. Holds none of hyper's
/// buffers: an idle stream costs about what a WebSocket client does.
pub(in crate::edge::ws) async fn serve_events_on_socket(
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    admitted: Admitted,
    held: impl Send + 'static,
    tcp: TcpStream,
    origin: Option<HeaderValue>,
) {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         x-accel-buffering: no\r\nconnection: close\r\n",
    );
    if let Some(origin) = origin.as_ref().and_then(|o| o.to_str().ok()) {
        head.push_str(&format!(
            "access-control-allow-origin: {origin}\r\nvary: origin\r\n"
        ));
    }
    head.push_str("\r\n");
    let sink = Sink::Socket(tcp);
    if sink.send(Bytes::from(head), CLOSE_TIMEOUT).await.is_err() {
        return;
    }
    start(gateway, tenant, admitted, held, sink).await;
}

/// Answers a refused event stream on its socket, and closes it.
pub(in crate::edge::ws) async fn answer_on_socket(tcp: TcpStream, response: Response) {
    use http_body_util::BodyExt;
    let (parts, body) = response.into_parts();
    let body = match timeout(CLOSE_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if let Ok(value) = value.to_str() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let sink = Sink::Socket(tcp);
    let mut answer = head.into_bytes();
    answer.extend_from_slice(&body);
    let _ = sink.send(Bytes::from(answer), CLOSE_TIMEOUT).await;
}

/// Where a stream's events go: hyper's response body (over TLS), or the
/// client's socket itself.
enum Sink {
    Channel(mpsc::Sender<Bytes>),
    Socket(TcpStream),
}

impl Sink {
    /// Puts `event` on the stream; the ending if the client does not take
    /// it within `limit`. (A frame's event is its prefix, the frame's own
    /// shared payload and a line break: written to a socket together,
    /// copied for no recipient.)
    async fn send(&self, mut event: impl Buf + Send, limit: Duration) -> Result<(), EndLabel> {
        match self {
            Self::Channel(out) => {
                let event = event.copy_to_bytes(event.remaining());
                match timeout(limit, out.send(event)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err("client_gone"),
                    Err(_) => Err("write_timeout"),
                }
            }
            Self::Socket(tcp) => {
                let write = async {
                    while event.has_remaining() {
                        tcp.writable().await?;
                        let mut slices = [std::io::IoSlice::new(&[]); 3];
                        let count = event.chunks_vectored(&mut slices);
                        match tcp.try_write_vectored(&slices[..count]) {
                            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                            Ok(n) => event.advance(n),
                            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(err) => return Err(err),
                        }
                    }
                    Ok::<_, std::io::Error>(())
                };
                match timeout(limit, write).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err("client_gone"),
                    Err(_) => Err("write_timeout"),
                }
            }
        }
    }

    /// Resolves when the client is gone (an event stream's client sends
    /// nothing after its request: what it sends is ignored).
    async fn closed(&self) {
        match self {
            Self::Channel(out) => out.closed().await,
            Self::Socket(tcp) => loop {
                if tcp.readable().await.is_err() {
                    return;
                }
                let mut ignored = [0u8; 256];
                match tcp.try_read(&mut ignored) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            },
        }
    }
}

/// One event: `id:` if given, then the frame as `data:` (JSON text has no
/// raw line breaks).
fn data_event(id: Option<&str>, data: &str) -> Bytes {
    let mut event = String::with_capacity(data.len() + 40);
    if let Some(id) = id {
        event.push_str("id: ");
        event.push_str(id);
        event.push('\n');
    }
    event.push_str("data: ");
    event.push_str(data);
    event.push_str("\n\n");
    Bytes::from(event)
}

/// The event of a queued frame — a message's carries its position as
/// `id` — as its prefix, the frame's payload (shared) and the blank line.
fn frame_event(frame: &WireFrame) -> impl Buf + Send + use<> {
    let payload = frame.payload();
    // `pos` comes before `data` in a message frame, and nothing before
    // `data` can hold an unescaped quote.
    let head = &payload[..payload.find(",\"data\":").unwrap_or(payload.len())];
    let position = head.find("\"pos\":\"").and_then(|at| {
        let rest = &head[at + 7..];
        rest.find('"').map(|end| &rest[..end])
    });
    let prefix = match position {
        Some(id) => Bytes::from(format!("id: {id}\ndata: ")),
        None => Bytes::from_static(b"data: "),
    };
    prefix
        .chain(frame.payload_bytes())
        .chain(Bytes::from_static(b"\n\n"))
}

fn close_event(reason: CloseReason) -> Bytes {
    let close =
        serde_json::json!({"type": "close", "code": reason.code(), "reason": reason.text()});
    data_event(None, &close.to_string())
}

/// Ends the stream for `reason`, its queue flushed first if it asks.
async fn end(out: &Sink, registration: &Registration, reason: CloseReason) -> EndLabel {
    let handle = &registration.handle;
    if reason.flushes_queue() {
        while let Some(frame) = handle.next_frame() {
            if out.send(frame_event(&frame), CLOSE_TIMEOUT).await.is_err() {
                return reason.label();
            }
        }
    }
    let _ = out.send(close_event(reason), CLOSE_TIMEOUT).await;
    reason.label()
}

/// The stream's loop; returns how it ended.
async fn drive(
    registration: &mut Registration,
    settings: &ConnectionSettings,
    out: &Sink,
    inbox: &Inbox,
) -> EndLabel {
    let handle = registration.handle.clone();
    let mut next_ping = Instant::now() + settings.ping_interval;
    // An event the client cannot take within the idle timeout means it
    // stopped reading.
    let write_timeout = settings.idle_timeout;
    loop {
        if let Some(reason) = handle.close_reason() {
            return end(out, registration, reason).await;
        }
        if let Some(frame) = handle.next_frame() {
            if let Err(label) = out.send(frame_event(&frame), write_timeout).await {
                return label;
            }
            continue;
        }
        if registration
            .expires_at
            .is_some_and(|at| at <= Instant::now())
        {
            return end(out, registration, CloseReason::TokenExpired).await;
        }
        tokio::select! {
            biased;
            () = handle.woken() => {}
            () = out.closed() => return "client_gone",
            () = inbox.arrived.notified() => {
                let Some((text, reply)) = crate::sync::lock(&inbox.waiting).take() else {
                    continue;
                };
                if !registration.admit_command() {
                    let reason = CloseReason::CommandFlood;
                    let _ = reply.send(close_event_json(reason));
                    return end(out, registration, reason).await;
                }
                let (answer, then_close) = Box::pin(command(&text, registration, settings)).await;
                let _ = reply.send(match answer {
                    Message::Text(text) => text.to_string(),
                    _ => String::new(),
                });
                if let Some(reason) = then_close {
                    return end(out, registration, reason).await;
                }
            }
            () = sleep_until(registration.expires_at.map_or(next_ping, |at| at.min(next_ping))) => {
                if Instant::now() >= next_ping {
                    next_ping = Instant::now() + settings.ping_interval;
                    if let Err(label) = out.send(Bytes::from_static(b": ping\n\n"), write_timeout).await {
                        return label;
                    }
                }
            }
        }
    }
}

fn close_event_json(reason: CloseReason) -> String {
    serde_json::json!({"type": "close", "code": reason.code(), "reason": reason.text()}).to_string()
}

/// Body of `POST /sse/{tenant}/commands`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::edge::ws) struct CommandRequest {
    stream: ConnectionId,
    secret: String,
    /// A command as a WebSocket client sends it, e.g.
    /// `{"type": "subscribe", "topic": "news"}`.
    command: serde_json::Value,
}

/// Hands a command to the stream it names, if its secret is the stream's,
/// and answers the stream's reply.
pub(in crate::edge::ws) async fn stream_command(
    gateway: &Gateway,
    tenant: &str,
    request: CommandRequest,
) -> Result<serde_json::Value, ApiError> {
    let unknown =
        || ApiError::not_found("no such stream on this node (it ended, or is on another node)");
    let inbox = {
        let stream = gateway
            .event_streams
            .get(&request.stream)
            .ok_or_else(unknown)?;
        let secret_matches = bool::from(stream.secret.as_bytes().ct_eq(request.secret.as_bytes()));
        if *stream.tenant != *tenant || !secret_matches {
            return Err(ApiError::forbidden("not this stream's secret"));
        }
        stream.inbox.clone()
    };
    let (reply, answer) = oneshot::channel();
    {
        let mut waiting = crate::sync::lock(&inbox.waiting);
        if waiting.is_some() {
            return Err(ApiError::unavailable(
                "the stream is busy with a command: send the next one after its answer",
            ));
        }
        *waiting = Some((request.command.to_string(), reply));
    }
    inbox.arrived.notify_one();
    let answer = timeout(COMMAND_PATIENCE, answer)
        .await
        .map_err(|_| ApiError::unavailable("the stream did not answer"))?
        .map_err(|_| unknown())?;
    Ok(serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null))
}
