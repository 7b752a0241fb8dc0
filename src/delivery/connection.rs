//! One registered connection as delivery sees it: a bounded outbound
//! queue, a close request with its reason, and a wake-up for the task that
//! writes to the socket.
//!
//! Knows nothing of sockets: the edge's connection task drains the queue
//! and obeys the close request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::sync::lock;

/// Unique id of a connection within this node.
pub type ConnectionId = u64;

/// Session metadata: facts an authenticator established about a session.
pub type Metadata = BTreeMap<String, String>;

/// Why the gateway closes a client connection; each has a documented
/// WebSocket close code that clients can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The user opened more connections than the tenant allows; this, the
    /// oldest, was closed. Reconnecting would close another one.
    Replaced,
    /// The client did not read fast enough and its outbound queue filled up.
    SlowClient,
    /// Nothing arrived from the client (not even a pong) within the idle timeout.
    IdleTimeout,
    /// The node is shutting down or draining: reconnect (to another node).
    ShuttingDown,
    /// The tenant was removed by an operator.
    TenantRemoved,
    /// The client kept asking for topics it may not read.
    SubscriptionsRefused,
    /// The client sent commands faster than a client needs to.
    CommandFlood,
    /// The token the client was authenticated with expired, and no fresh
    /// one came on the connection.
    TokenExpired,
    /// A service closed the user's connections (log out, ban): do not
    /// reconnect on your own.
    Disconnected,
}

impl CloseReason {
    /// The WebSocket close code sent to the client.
    pub fn code(self) -> u16 {
        match self {
            Self::Replaced => 4001,
            Self::SlowClient => 4002,
            Self::IdleTimeout => 4003,
            Self::ShuttingDown => 1012,
            Self::TenantRemoved => 4004,
            Self::SubscriptionsRefused => 4005,
            Self::CommandFlood => 4006,
            Self::TokenExpired => 4007,
            Self::Disconnected => 4008,
        }
    }

    /// The close reason text sent to the client.
    pub fn text(self) -> &'static str {
        match self {
            Self::Replaced => "connection limit reached: replaced by a newer connection",
            Self::SlowClient => "outbound queue full: client too slow",
            Self::IdleTimeout => "idle timeout",
            Self::ShuttingDown => "server restarting: reconnect",
            Self::TenantRemoved => "tenant removed",
            Self::SubscriptionsRefused => "too many refused subscriptions",
            Self::CommandFlood => "too many commands",
            Self::TokenExpired => "token expired: reconnect with a fresh token",
            Self::Disconnected => "disconnected by the service",
        }
    }

    /// The `reason` label of [`DISCONNECTS`](crate::metrics::DISCONNECTS).
    pub fn label(self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::SlowClient => "slow_client",
            Self::IdleTimeout => "idle_timeout",
            Self::ShuttingDown => "shutdown",
            Self::TenantRemoved => "tenant_removed",
            Self::SubscriptionsRefused => "subscriptions_refused",
            Self::CommandFlood => "command_flood",
            Self::TokenExpired => "token_expired",
            Self::Disconnected => "disconnected",
        }
    }

    /// Whether frames already queued are written before the close frame.
    /// Not for a slow client (it would not read them) nor for a removed
    /// tenant (its messages are no longer wanted).
    pub fn flushes_queue(self) -> bool {
        matches!(
            self,
            Self::Replaced | Self::ShuttingDown | Self::IdleTimeout
        )
    }
}

/// What became of a frame handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// The queue was full: the connection is being closed as a slow client.
    Overflowed,
    /// The connection had already ended.
    Gone,
}

/// Queues that grew past this many slots during a burst give their memory
/// back once drained: an idle connection should cost almost nothing.
const SHRINK_ABOVE_SLOTS: usize = 16;

struct ConnectionShared {
    id: ConnectionId,
    /// When it was registered, in microseconds since the Unix epoch: the
    /// age that decides which connection a cap closes, on every node.
    opened_at_micros: u64,
    tenant: Arc<str>,
    user: Arc<str>,
    metadata: Arc<Metadata>,
    /// The outbound queue. A `VecDeque` allocates nothing until the first
    /// frame, unlike a channel, which allocates a block of slots up front:
    /// at a million idle connections that difference is gigabytes.
    outbound: Mutex<VecDeque<Message>>,
    capacity: usize,
    /// The topics it is subscribed to (kept with the index in
    /// [`SessionManager`](super::SessionManager)).
    topics: Mutex<Vec<Arc<str>>>,
    close_reason: OnceLock<CloseReason>,
    /// Set when the connection's task has ended.
    ended: AtomicBool,
    /// Wakes the connection's task: a frame was queued or a close was asked.
    wake: Notify,
}

/// A registered connection as the rest of the gateway sees it: where to
/// queue frames and how to ask it to close. Cheap to clone.
#[derive(Clone)]
pub struct ConnectionHandle(Arc<ConnectionShared>);

impl ConnectionHandle {
    /// A connection with an empty queue of at most `capacity` frames.
    pub(super) fn new(
        id: ConnectionId,
        tenant: Arc<str>,
        user: Arc<str>,
        metadata: Arc<Metadata>,
        capacity: usize,
    ) -> Self {
        Self(Arc::new(ConnectionShared {
            id,
            opened_at_micros: crate::clock::now_micros(),
            tenant,
            user,
            metadata,
            outbound: Mutex::new(VecDeque::new()),
            capacity,
            topics: Mutex::new(Vec::new()),
            close_reason: OnceLock::new(),
            ended: AtomicBool::new(false),
            wake: Notify::new(),
        }))
    }

    pub fn id(&self) -> ConnectionId {
        self.0.id
    }

    pub fn tenant(&self) -> &Arc<str> {
        &self.0.tenant
    }

    pub fn user(&self) -> &Arc<str> {
        &self.0.user
    }

    pub fn opened_at_micros(&self) -> u64 {
        self.0.opened_at_micros
    }

    /// The session's metadata. Sessions with equal metadata share one
    /// allocation (see [`SessionManager::register`](super::SessionManager::register)), so the pointer
    /// identifies the set.
    pub fn metadata(&self) -> &Arc<Metadata> {
        &self.0.metadata
    }

    pub(super) fn lock_topics(&self) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
        lock(&self.0.topics)
    }

    fn lock_outbound(&self) -> std::sync::MutexGuard<'_, VecDeque<Message>> {
        lock(&self.0.outbound)
    }

    /// Queues `frame` without waiting. A full queue closes the connection:
    /// one slow client must never hold up delivery to the others.
    pub fn enqueue(&self, frame: Message) -> Enqueued {
        if self.0.close_reason.get().is_some() || self.0.ended.load(Ordering::Acquire) {
            return Enqueued::Gone;
        }
        let mut outbound = self.lock_outbound();
        if outbound.len() >= self.0.capacity {
            drop(outbound);
            self.close(CloseReason::SlowClient);
            return Enqueued::Overflowed;
        }
        outbound.push_back(frame);
        drop(outbound);
        // notify_one keeps a permit if the task is not waiting right now.
        self.0.wake.notify_one();
        Enqueued::Queued
    }

    /// Takes the oldest queued frame, for the connection's writer.
    pub fn next_frame(&self) -> Option<Message> {
        let mut outbound = self.lock_outbound();
        let frame = outbound.pop_front();
        if outbound.is_empty() && outbound.capacity() > SHRINK_ABOVE_SLOTS {
            *outbound = VecDeque::new();
        }
        frame
    }

    /// True if frames are waiting.
    pub fn has_frames(&self) -> bool {
        !self.lock_outbound().is_empty()
    }

    /// Asks the connection to close for `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self.0.close_reason.set(reason).is_ok() {
            self.0.wake.notify_one();
        }
    }

    /// Why the connection was asked to close, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.0.close_reason.get().copied()
    }

    /// Resolves when a frame was queued or a close was asked since the last
    /// wake-up (or right away if that happened while nobody waited).
    pub async fn woken(&self) {
        self.0.wake.notified().await;
    }

    /// Resolves once [`close`](Self::close) was called; returns the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close_reason() {
                return reason;
            }
            self.woken().await;
        }
    }

    /// True once the connection was unregistered.
    pub(super) fn has_ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    /// Marks the connection as ended; true the first time only.
    pub(super) fn mark_ended(&self) -> bool {
        !self.0.ended.swap(true, Ordering::AcqRel)
    }
}
