//! One Pusher client's connection (protocol 7): `pusher:connection_
//! established`, pings both ways within the app's activity timeout,
//! subscriptions to public, private, encrypted, presence and the signed-in
//! user's channels, client events and `pusher:signin`.
//!
//! The connection is a tenant connection like any other (the session
//! index, the per-user cap, the cluster's facts): deliverers queue the
//! gateway's message frames to it, and this task writes each as the
//! Pusher event it is — the frame's topic is the channel, its `event` the
//! event's name, its data the event's `data`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

mod client_events;
mod subscribe;

use super::Refused;
use crate::config::PusherConfig;
use crate::delivery::{CloseReason, ConnectionHandle, Reservation, WireFrame};
use crate::edge::Gateway;
use crate::edge::listener::ConnectionContext;
use crate::edge::ws::{close, fail};
use crate::metrics;
use crate::pusher::{
    DEFAULT_EVENT, EventFrame, USER_CHANNEL_PREFIX, anonymous_user, error_frame, signature,
    socket_id,
};
use crate::sync::rate_limiter;
use crate::tenant::{Identity, MAX_USER_BYTES, Tenant};

/// How long a client has to answer the server's `pusher:ping`.
const PONG_WAIT: Duration = Duration::from_secs(30);
/// Messages one client may send per second, steadily …
const MESSAGES_PER_SECOND: u32 = 100;
/// … and at once (a reconnecting client subscribes to all its channels):
/// past it the connection is closed (4100).
const MESSAGE_BURST: u32 = 200;
/// Frames written before one flush.
const WRITE_BATCH: usize = 64;
/// Time allowed for a close frame to leave.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<super::io::PusherIo>;

/// A client the handshake admitted, and the slots it holds.
pub(super) struct Opening {
    pub(super) tenant: Arc<Tenant>,
    pub(super) held: (Option<ConnectionContext>, Reservation),
}

/// Serves an upgraded client: says why it was refused, or registers it
/// and runs its connection until it ends.
pub(super) async fn serve(
    gateway: Arc<Gateway>,
    upgraded: hyper::upgrade::Upgraded,
    opening: Result<Opening, Refused>,
) {
    let ws = &gateway.config.websocket;
    let config = WebSocketConfig::default()
        .read_buffer_size(ws.read_buffer_bytes)
        .max_message_size(Some(ws.max_message_bytes))
        .max_frame_size(Some(ws.max_message_bytes));
    let mut socket = WebSocketStream::from_raw_socket(
        super::io::PusherIo::of(upgraded),
        Role::Server,
        Some(config),
    )
    .await;
    let Opening { tenant, held } = match opening {
        Ok(opening) => opening,
        Err(refused) => {
            let _ = socket
                .send(text(error_frame(Some(refused.code), &refused.message)))
                .await;
            close(&mut socket, refused.code, &refused.message).await;
            return;
        }
    };
    if tenant.config.pusher.is_none() {
        return;
    }
    let identity = Identity {
        user: anonymous_user(),
        topics: Vec::new(),
        metadata: Default::default(),
        grant: Default::default(),
        expires_at_secs: None,
    };
    let handle = gateway
        .sessions
        .register(&tenant, identity, ws.outbound_queue);
    gateway.cluster.connection_opened(&handle);
    if !gateway.is_ready() {
        handle.close(CloseReason::ShuttingDown);
    } else if gateway.tenants.snapshot().get(&tenant.name).is_none() {
        handle.close(CloseReason::TenantRemoved);
    }
    let client = Client {
        socket_id: socket_id(gateway.cluster.node(), handle.id()),
        gateway,
        tenant,
        handle,
        channels: Subscriptions::default(),
        signed_in: None,
        taken_before_signin: HashSet::new(),
        messages: limiter(MESSAGES_PER_SECOND, MESSAGE_BURST),
        client_events: None,
        refused: 0,
    };
    let established = serde_json::json!({
        "socket_id": client.socket_id,
        "activity_timeout": client.app().activity_timeout.as_secs(),
    });
    let sent = socket
        .send(text(event(
            "pusher:connection_established",
            None,
            &established,
        )))
        .await;
    if sent.is_err() {
        metrics::disconnect(&client.tenant.name, "write_error");
        return;
    }
    // A task of its own, holding only what the connection needs from now
    // on: what the handshake and the upgrade needed is freed.
    tokio::spawn(run(socket, client, held));
}

/// A connection's task. (A block, not an `async fn`: an `async fn` moves
/// its arguments into locals, and its task would hold room for both.)
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's task is larger per connection"
)]
fn run(
    mut socket: Socket,
    mut client: Client,
    held: impl Send + 'static,
) -> impl Future<Output = ()> + Send {
    async move {
        let label = drive(&mut socket, &mut client).await;
        metrics::disconnect(&client.tenant.name, label);
        drop(client);
        drop(held);
    }
}

fn limiter(per_second: u32, burst: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(per_second.max(1)).expect("non-zero");
    let burst = NonZeroU32::new(burst.max(1)).expect("non-zero");
    rate_limiter(Quota::per_second(rate).allow_burst(burst))
}

fn text(text: String) -> Message {
    Message::Text(Utf8Bytes::from(text))
}

/// A server event whose `data` is `data` (sent as a JSON string, as the
/// protocol has it).
fn event(name: &str, channel: Option<&str>, data: &serde_json::Value) -> String {
    EventFrame {
        event: name,
        channel,
        data: &data.to_string(),
        user_id: None,
        pos: None,
    }
    .to_json()
}

/// A refused subscription, as pusher-js and Laravel Echo read it.
fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> String {
    let data = serde_json::json!({ "type": kind, "error": error, "status": status });
    serde_json::json!({ "event": "pusher:subscription_error", "channel": channel, "data": data })
        .to_string()
}

/// The connection as its task knows it; leaves its channels and
/// unregisters it when the task ends, however it ends.
struct Client {
    gateway: Arc<Gateway>,
    tenant: Arc<Tenant>,
    handle: ConnectionHandle,
    /// Given at `pusher:connection_established`; the same for the
    /// connection's life (channel signatures name it).
    socket_id: String,
    /// Subscribed channels (topics), with the presence member each is
    /// subscribed as.
    channels: Subscriptions,
    /// The user `pusher:signin` signed in, and whether its channel is
    /// subscribed.
    signed_in: Option<(String, bool)>,
    /// Ids of the messages written from the queue of the connection
    /// before it signed in: skipped if they come again on the new one.
    taken_before_signin: HashSet<String>,
    messages: DefaultDirectRateLimiter,
    client_events: Option<Box<DefaultDirectRateLimiter>>,
    refused: u32,
}

/// A connection's channels, with the presence member each is subscribed
/// as: a few, in a vector (a map's buckets cost more than its lookups
/// save at this size).
#[derive(Default)]
struct Subscriptions(Vec<(String, Option<String>)>);

impl Subscriptions {
    fn contains(&self, channel: &str) -> bool {
        self.0.iter().any(|(name, _)| name == channel)
    }

    /// The presence member `channel` is subscribed as.
    fn member(&self, channel: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(name, _)| name == channel)
            .and_then(|(_, member)| member.clone())
    }

    fn insert(&mut self, channel: String, member: Option<String>) {
        if !self.contains(&channel) {
            self.0.push((channel, member));
        }
    }

    /// Removes `channel`: the member it was subscribed as, if it was.
    fn remove(&mut self, channel: &str) -> Option<Option<String>> {
        let index = self.0.iter().position(|(name, _)| name == channel)?;
        Some(self.0.swap_remove(index).1)
    }

    fn names(&self) -> Vec<String> {
        self.0.iter().map(|(name, _)| name.clone()).collect()
    }
}

impl Client {
    /// The app, as the tenant had it when the client connected.
    fn app(&self) -> &PusherConfig {
        self.tenant
            .config
            .pusher
            .as_ref()
            .expect("a Pusher client's tenant has an app")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let cluster = &self.gateway.cluster;
        for (channel, member) in std::mem::take(&mut self.channels.0) {
            let changed =
                cluster
                    .pusher_channels()
                    .leave(&self.tenant.name, &channel, member.as_deref());
            cluster.pusher_channel_changed(changed, None);
        }
        self.gateway.sessions.unregister(&self.handle);
        self.gateway.cluster.connection_closed(&self.handle);
    }
}

/// A message frame of the gateway, as far as a Pusher client needs it.
#[derive(Deserialize)]
struct NativeFrame<'a> {
    #[serde(rename = "type")]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    except_socket: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pos: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// What a client sends.
#[derive(Deserialize)]
struct Incoming {
    event: String,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    channel: Option<String>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
    /// The position of the last event the client saw (recovery).
    #[serde(default)]
    since: Option<String>,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// What answering a client's message needs: replies, and maybe a close.
#[derive(Default)]
struct Answer {
    replies: Vec<String>,
    close: Option<(u16, &'static str, &'static str)>,
}

impl Answer {
    fn reply(reply: String) -> Self {
        Self {
            replies: vec![reply],
            close: None,
        }
    }

    fn error(code: Option<u16>, message: &str) -> Self {
        Self::reply(error_frame(code, message))
    }
}

/// A client message's `data`: an object, or (as some clients send it)
/// the object's JSON in a string.
fn data_of<'a, T: Deserialize<'a>>(data: Option<&'a RawValue>) -> Option<T> {
    let data = data?;
    serde_json::from_str(data.get()).ok()
}

fn data_in_string<T: for<'de> Deserialize<'de>>(data: Option<&RawValue>) -> Option<T> {
    let inner: String = serde_json::from_str(data?.get()).ok()?;
    serde_json::from_str(&inner).ok()
}

impl Client {
    /// The Pusher event a message frame of the gateway is for this
    /// client, if any.
    fn translate(&self, frame: &WireFrame) -> Option<String> {
        let native: NativeFrame<'_> = serde_json::from_str(frame.payload()).ok()?;
        if native.kind != "message" || native.except_socket.as_deref() == Some(&self.socket_id) {
            return None;
        }
        if let Some(id) = &native.id
            && !self.taken_before_signin.is_empty()
            && self.taken_before_signin.contains(id.as_ref())
        {
            return None;
        }
        let user_channel = match &self.signed_in {
            Some((user, true)) => Some(format!("{USER_CHANNEL_PREFIX}{user}")),
            _ => None,
        };
        let channel = native.topic.as_deref().or(user_channel.as_deref());
        Some(
            EventFrame {
                event: native.event.as_deref().unwrap_or(DEFAULT_EVENT),
                channel,
                data: native.data.map_or("null", RawValue::get),
                user_id: None,
                pos: native.pos.as_deref().filter(|_| self.app().recovery),
            }
            .to_json(),
        )
    }

    /// Answers one message of the client.
    async fn answer(&mut self, message: &str) -> Answer {
        let Ok(incoming) = serde_json::from_str::<Incoming>(message) else {
            return Answer::error(
                None,
                "malformed message: expected {\"event\", \"data\"} JSON",
            );
        };
        let data = incoming.data.as_deref();
        match incoming.event.as_str() {
            "pusher:ping" => Answer::reply(event("pusher:pong", None, &serde_json::json!({}))),
            "pusher:pong" => Answer::default(),
            "pusher:subscribe" => {
                match data_of::<SubscribeData>(data).or_else(|| data_in_string(data)) {
                    Some(subscribe) => Box::pin(self.subscribe(subscribe)).await,
                    None => Answer::error(None, "pusher:subscribe needs data.channel"),
                }
            }
            "pusher:unsubscribe" => {
                match data_of::<SubscribeData>(data).or_else(|| data_in_string(data)) {
                    Some(subscribe) => {
                        self.unsubscribe(&subscribe.channel);
                        Answer::default()
                    }
                    None => Answer::error(None, "pusher:unsubscribe needs data.channel"),
                }
            }
            "pusher:signin" => match data_of::<SigninData>(data).or_else(|| data_in_string(data)) {
                Some(signin) => self.signin(signin),
                None => Answer::error(None, "pusher:signin needs data.auth and data.user_data"),
            },
            name if name.starts_with("client-") => {
                let channel = incoming.channel.as_deref().unwrap_or("");
                Box::pin(self.client_event(name, channel, data)).await
            }
            _ => Answer::default(),
        }
    }

    /// `pusher:signin`: the connection becomes the user's (its messages,
    /// its cap, its presence), keeping its channels.
    fn signin(&mut self, signin: SigninData) -> Answer {
        if self.signed_in.is_some() {
            return Answer::error(None, "already signed in");
        }
        if !signature::user_authorised(self.app(), &self.socket_id, &signin.user_data, &signin.auth)
        {
            let mut answer = Answer::error(Some(4009), "invalid signature for pusher:signin");
            answer.close = Some((4009, "invalid signature", "unauthorized"));
            return answer;
        }
        let user = serde_json::from_str::<serde_json::Value>(&signin.user_data)
            .ok()
            .and_then(|data| data.get("id")?.as_str().map(str::to_owned))
            .filter(|id| !id.is_empty() && id.len() <= MAX_USER_BYTES);
        let Some(user) = user else {
            return Answer::error(None, "user_data needs an id: a string of 1 to 256 bytes");
        };
        if let Some(until_ms) = self.gateway.cluster.banned_until(&self.tenant.name, &user) {
            let message = format!("this user is banned until {until_ms} (ms since the Unix epoch)");
            let mut answer = Answer::error(Some(4009), &message);
            answer.close = Some((4009, "banned", "banned"));
            return answer;
        }
        // The user's connection first, then the anonymous one goes: a
        // message meanwhile comes on both (and is written once), never on
        // neither.
        let identity = Identity {
            user: user.clone(),
            topics: self.channels.names(),
            metadata: Default::default(),
            grant: Default::default(),
            expires_at_secs: None,
        };
        let capacity = self.gateway.config.websocket.outbound_queue;
        let signed_in = self
            .gateway
            .sessions
            .register(&self.tenant, identity, capacity);
        self.gateway.cluster.connection_opened(&signed_in);
        let anonymous = std::mem::replace(&mut self.handle, signed_in);
        self.gateway.sessions.unregister(&anonymous);
        self.gateway.cluster.connection_closed(&anonymous);
        self.signed_in = Some((user, false));
        let mut answer = Answer::default();
        while let Some(frame) = anonymous.next_frame() {
            if let Some(id) = frame_id(&frame) {
                self.taken_before_signin.insert(id);
            }
            answer.replies.extend(self.translate(&frame));
        }
        answer.replies.push(event(
            "pusher:signin_success",
            None,
            &serde_json::json!({ "user_data": signin.user_data }),
        ));
        answer
    }
}

/// A message frame's id.
fn frame_id(frame: &WireFrame) -> Option<String> {
    let native: NativeFrame<'_> = serde_json::from_str(frame.payload()).ok()?;
    native.id.map(Cow::into_owned)
}

/// The connection's loop; returns how it ended.
async fn drive(socket: &mut Socket, client: &mut Client) -> &'static str {
    let activity = client.app().activity_timeout;
    let write_timeout = client.gateway.config.websocket.idle_timeout;
    let mut last_heard = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    loop {
        if let Some(reason) = client.handle.close_reason() {
            if reason.flushes_queue() {
                let _ = timeout(CLOSE_TIMEOUT, write_frames(socket, client)).await;
            }
            let _ = socket
                .send(text(error_frame(Some(reason.pusher_code()), reason.text())))
                .await;
            close(socket, reason.pusher_code(), reason.text()).await;
            return reason.label();
        }
        if client.handle.has_frames() {
            match timeout(write_timeout, write_frames(socket, client)).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return "write_error",
                Err(_) => return "write_timeout",
            }
        }
        client.taken_before_signin.clear();
        let deadline = ping_sent.map_or(last_heard + activity, |at| at + PONG_WAIT);
        tokio::select! {
            biased;
            () = client.handle.woken() => {}
            incoming = socket.next() => {
                last_heard = Instant::now();
                ping_sent = None;
                let answer = match incoming {
                    Some(Ok(Message::Text(_) | Message::Binary(_))) if client.messages.check().is_err() => {
                        close(socket, 4100, "too many messages").await;
                        return "command_flood";
                    }
                    Some(Ok(Message::Text(message))) => Box::pin(client.answer(&message)).await,
                    Some(Ok(Message::Binary(_))) => {
                        Answer::error(None, "binary frames are not accepted: send JSON text")
                    }
                    Some(Ok(Message::Close(_))) => {
                        let _ = timeout(CLOSE_TIMEOUT, socket.flush()).await;
                        return "client_closed";
                    }
                    Some(Ok(_)) => Answer::default(),
                    Some(Err(err)) => return fail(socket, err).await,
                    None => return "client_gone",
                };
                for reply in answer.replies {
                    if timeout(write_timeout, socket.send(text(reply))).await.is_err() {
                        return "write_timeout";
                    }
                }
                if let Some((code, reason, label)) = answer.close {
                    close(socket, code, reason).await;
                    return label;
                }
            }
            () = sleep_until(deadline) => {
                if ping_sent.is_some() {
                    close(socket, 4201, "Pong reply not received").await;
                    return "idle_timeout";
                }
                let ping = event("pusher:ping", None, &serde_json::json!({}));
                if timeout(write_timeout, socket.send(text(ping))).await.is_err() {
                    return "write_timeout";
                }
                ping_sent = Some(Instant::now());
            }
        }
    }
}

/// Writes a batch of queued messages as Pusher events, with one flush.
async fn write_frames(socket: &mut Socket, client: &mut Client) -> Result<(), tungstenite::Error> {
    for _ in 0..WRITE_BATCH {
        let Some(frame) = client.handle.next_frame() else {
            break;
        };
        if let Some(event) = client.translate(&frame) {
            socket.feed(text(event)).await?;
        }
    }
    socket.flush().await
}
