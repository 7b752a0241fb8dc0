//! One client connection's task: writes queued frames in batches, reads
//! client commands (ping, subscribe, unsubscribe), sends protocol pings,
//! enforces the idle timeout, and closes with the code each ending calls
//! for (RFC 6455 for broken frames, the documented 4xxx codes for the
//! gateway's own reasons).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use super::MAX_TOPIC_BYTES;
use super::stream::ClientIo;

mod commands;
mod drive;
pub(super) mod events;
use crate::bus::envelope::Position;
use crate::delivery::recovery::{register_resuming, register_resuming_from_bus};
use crate::delivery::{CloseReason, ConnectionHandle, WireFrame};
use crate::edge::Gateway;
use crate::metrics;
use crate::sync::rate_limiter;
use crate::tenant::subscriptions::Grant;
use crate::tenant::{Identity, Tenant};
use commands::command;
use drive::drive;

/// Commands one connection may send per second, steadily …
const COMMANDS_PER_SECOND: u32 = 20;
/// … and at once: past it the connection is closed (4006).
const COMMAND_BURST: u32 = 50;
/// Subscriptions a connection may have refused before it is closed (4005).
pub(super) const MAX_REFUSED_SUBSCRIPTIONS: u32 = 10;
/// Time allowed for a close frame to leave before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a resume on a routing node waits for every node to route its
/// pushes here: about an early probe's spacing (100 ms) when every node is
/// healthy, up to five heartbeats (10 s) when one went silent (see
/// `cluster::locations`).
const ROUTED_HERE_PATIENCE: Duration = Duration::from_secs(15);

/// What a connection's task needs of the stream under its WebSocket.
pub(in crate::edge) trait ClientStream:
    AsyncRead + AsyncWrite + Unpin + Send
{
}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for S {}

/// How queued frames reach the socket.
enum Writer {
    /// Deliverers write to the socket themselves; the task writes what
    /// they could not, when the socket drains.
    Direct(Arc<OwnedWriteHalf>),
    /// Through the WebSocket's stream (TLS): the task writes everything.
    Stream,
}

/// Connection settings derived once from the configuration.
struct ConnectionSettings {
    ping_interval: Duration,
    /// More silence allowed a client that speaks on its own (see
    /// [`drive::ping_grace`]).
    ping_grace: Duration,
    /// The node's heartbeat grid (see [`drive::heartbeat_grid`]).
    heartbeat_grid: Duration,
    idle_timeout: Duration,
    max_topics: usize,
}

/// How a connection ended, for the disconnect metric.
type EndLabel = &'static str;

/// What a client asks of its connection besides who it is.
#[derive(Debug, Default)]
pub(super) struct ResumeRequest {
    /// The position of the last message it saw: it receives what it
    /// missed, then the live stream.
    pub(super) since: Option<Position>,
    /// Topics to subscribe to from the start, within its rules …
    pub(super) topics: Vec<String>,
    /// … and those the rules refused (each answered with an error frame).
    pub(super) denied_topics: Vec<String>,
}

/// An admitted client: who it is, where from, what it asks.
pub(super) struct Admitted {
    pub(super) identity: Identity,
    pub(super) remote: Option<SocketAddr>,
    pub(super) resume: ResumeRequest,
}

/// Registers an admitted client with the session index (resuming it if it
/// asks), tells the cluster, and answers what its handshake's topics were
/// refused: the connection as its task (WebSocket or Server-Sent Events)
/// holds it.
async fn register_client(
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    admitted: Admitted,
) -> (Registration, ConnectionSettings) {
    let Admitted {
        mut identity,
        remote,
        resume,
    } = admitted;
    identity.topics.extend(resume.topics);
    let ws_config = &gateway.config.websocket;

    let settings = ConnectionSettings {
        ping_interval: ws_config.ping_interval,
        ping_grace: drive::ping_grace(ws_config.ping_interval, ws_config.idle_timeout),
        heartbeat_grid: drive::heartbeat_grid(ws_config.ping_interval, ws_config.idle_timeout),
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
    let grant = std::mem::take(&mut identity.grant);
    let expires_at = identity.expires_at_secs.map(instant_of);
    let mut announced = false;
    let handle = match resume.since {
        Some(since) if gateway.bus.routes() => {
            announced = true;
            let cluster = gateway.cluster.clone();
            Box::pin(register_resuming_from_bus(
                &gateway.sessions,
                (&gateway.plugins, &gateway.bus),
                &tenant,
                (identity, ws_config.outbound_queue),
                since,
                move |handle| {
                    cluster
                        .connection_opened_waiting(handle)
                        .wait(ROUTED_HERE_PATIENCE)
                },
            ))
            .await
        }
        Some(since) => {
            // Boxed: an idle connection's task holds no room for it.
            Box::pin(register_resuming(
                &gateway.sessions,
                &gateway.plugins,
                &tenant,
                identity,
                ws_config.outbound_queue,
                since,
            ))
            .await
        }
        None => gateway
            .sessions
            .register(&tenant, identity, ws_config.outbound_queue),
    };
    // Refusals at the handshake count toward the close like later ones.
    let refused_at_handshake = resume.denied_topics.len() as u32;
    for topic in resume.denied_topics {
        handle.enqueue(WireFrame::text(subscribe_denied_json(&topic).to_string()));
    }
    if !announced {
        gateway.cluster.connection_opened(&handle);
    }
    // A drain or the tenant's removal that began since the handshake did
    // not see this connection: it goes the same way. (Registered first,
    // checked after: one of the two sides always sees the other.)
    if !gateway.is_ready() {
        handle.close(CloseReason::ShuttingDown);
    } else if gateway.tenants.snapshot().get(&tenant.name).is_none() {
        handle.close(CloseReason::TenantRemoved);
    }
    let registration = Registration {
        gateway,
        handle: handle.clone(),
        tenant,
        grant,
        refused: refused_at_handshake,
        commands: None,
        expires_at,
        remote,
    };
    (registration, settings)
}

pub(super) async fn serve_client(
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    admitted: Admitted,
    upgraded: hyper::upgrade::Upgraded,
    held: impl Send + 'static,
) {
    let ws_config = &gateway.config.websocket;
    let frame_config = WebSocketConfig::default()
        .read_buffer_size(ws_config.read_buffer_bytes)
        // Frames are batched by the writer loop; the buffer only holds a
        // batch while the socket drains.
        .write_buffer_size(0)
        .max_message_size(Some(ws_config.max_message_bytes))
        .max_frame_size(Some(ws_config.max_message_bytes));
    let io = ClientIo::of(upgraded);
    let (registration, settings) = register_client(gateway, tenant, admitted).await;
    let handle = registration.handle.clone();
    match io {
        ClientIo::Tcp(halves) => {
            let writer = halves.writer();
            handle.attach_socket(writer.clone());
            let stream = halves.into_stream(handle);
            let socket =
                WebSocketStream::from_raw_socket(stream, Role::Server, Some(frame_config)).await;
            let writer = Writer::Direct(writer);
            tokio::spawn(run(socket, registration, settings, writer, held));
        }
        ClientIo::Other(stream) => {
            let socket =
                WebSocketStream::from_raw_socket(stream, Role::Server, Some(frame_config)).await;
            tokio::spawn(run(socket, registration, settings, Writer::Stream, held));
        }
    }
}

/// A connection's task.
/// (A block, not an `async fn`: an `async fn` moves its arguments into
/// locals, and its task would hold room for both.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's task is 0.6 KiB larger per connection"
)]
fn run(
    mut socket: WebSocketStream<impl ClientStream + 'static>,
    mut registration: Registration,
    settings: ConnectionSettings,
    writer: Writer,
    held: impl Send,
) -> impl Future<Output = ()> + Send {
    async move {
        let label = drive(&mut socket, &mut registration, &settings, &writer).await;
        metrics::disconnect(&registration.tenant.name, label);
        drop(registration);
        drop(held);
    }
}

/// The connection as its task knows it; unregisters it when the task
/// ends, however it ends.
struct Registration {
    gateway: Arc<Gateway>,
    handle: ConnectionHandle,
    tenant: Arc<Tenant>,
    /// What the client's authenticator granted it to subscribe to.
    grant: Grant,
    /// Subscriptions refused so far.
    refused: u32,
    /// The client's command budget, made at its first command: most
    /// connections never send one, and cost a pointer for it.
    commands: Option<Box<DefaultDirectRateLimiter>>,
    /// When the client's credentials expire (closed with 4007 then).
    expires_at: Option<Instant>,
    /// The client's address, for the plugin that checks a fresh token.
    remote: Option<SocketAddr>,
}

/// The moment `secs` (since the Unix epoch) will be, on this clock.
fn instant_of(secs: u64) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // A client's number: whatever it says, no overflow (an expiry past
    // this is as good as none).
    let left = Duration::from_secs(secs)
        .saturating_sub(now)
        .min(LONGEST_EXPIRY);
    Instant::now() + left
}

/// The furthest expiry a token sets: about a century.
const LONGEST_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Registration {
    /// Tells the tenant's webhooks of a change of this connection's topics.
    fn tell(&self, event: crate::config::WebhookEvent, topic: &str) {
        self.gateway.cluster.tell(
            &self.tenant.name,
            event,
            self.handle.user(),
            Some(self.handle.id()),
            Some(topic),
        );
    }

    /// Takes one command from the client's budget; false past it.
    fn admit_command(&mut self) -> bool {
        self.commands
            .get_or_insert_with(|| {
                let rate = NonZeroU32::new(COMMANDS_PER_SECOND).expect("non-zero");
                let burst = NonZeroU32::new(COMMAND_BURST).expect("non-zero");
                Box::new(rate_limiter(Quota::per_second(rate).allow_burst(burst)))
            })
            .check()
            .is_ok()
    }

    /// True if the client may subscribe to `topic`: its grant or its
    /// tenant's rules allow it.
    /// Takes the tenant's settings as they are now: a secret rotated or a
    /// rule removed through the admin API applies to the next command of
    /// a connection opened before.
    fn take_current_settings(&mut self) {
        if let Some(current) = self.gateway.tenants.snapshot().get(&self.tenant.name)
            && !Arc::ptr_eq(current, &self.tenant)
        {
            self.tenant = current.clone();
        }
    }

    fn may_subscribe(&self, topic: &str) -> bool {
        let user = self.handle.user();
        self.grant.covers(topic, user) || self.tenant.subscriptions.allow(topic, user)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.handle.detach_socket();
        self.gateway.sessions.unregister(&self.handle);
        self.gateway.cluster.connection_closed(&self.handle);
    }
}

fn json_frame(value: serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}

fn subscribe_denied(topic: &str) -> Message {
    json_frame(subscribe_denied_json(topic))
}

fn subscribe_denied_json(topic: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "error",
        "code": "subscribe_denied",
        "topic": topic,
        "message": "this connection may not subscribe to this topic",
    })
}

fn error_frame(message: &str) -> Message {
    json_frame(serde_json::json!({"type": "error", "message": message}))
}

/// Answers a broken client frame with the close code RFC 6455 asks for.
pub(in crate::edge) async fn fail(
    socket: &mut WebSocketStream<impl ClientStream>,
    err: tungstenite::Error,
) -> EndLabel {
    let (code, label) = match &err {
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { .. }) => {
            (CloseCode::Size, "too_large")
        }
        tungstenite::Error::Utf8(_) => (CloseCode::Invalid, "invalid_utf8"),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            return "client_gone";
        }
        tungstenite::Error::Protocol(_) => (CloseCode::Protocol, "protocol_error"),
        _ => return "io_error",
    };
    tracing::debug!(%err, "closing a client after a bad frame");
    close(socket, code.into(), &err.to_string()).await;
    label
}

/// Sends a close frame (reason cut to fit a control frame) and waits a
/// moment for the client's reply. Boxed: a connection ends once.
pub(in crate::edge) fn close<'a>(
    socket: &'a mut WebSocketStream<impl ClientStream>,
    code: u16,
    reason: &'a str,
) -> BoxFuture<'a, ()> {
    close_now(socket, code, reason).boxed()
}

async fn close_now(socket: &mut WebSocketStream<impl ClientStream>, code: u16, reason: &str) {
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
        Ok::<_, tungstenite::Error>(())
    };
    let _ = timeout(CLOSE_TIMEOUT, closing).await;
}
