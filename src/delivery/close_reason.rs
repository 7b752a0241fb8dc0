//! Why the gateway closes a client connection, and what each reason means
//! on the wire (the documented close codes and texts clients act on), in
//! metrics, and for the frames still queued.

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

    /// The close code a Pusher client gets (the protocol's ranges: 4000–
    /// 4099 do not reconnect, 4100–4199 reconnect after a back-off,
    /// 4200–4299 reconnect at once).
    pub fn pusher_code(self) -> u16 {
        match self {
            Self::Replaced
            | Self::SubscriptionsRefused
            | Self::TokenExpired
            | Self::Disconnected => 4009,
            Self::TenantRemoved => 4003,
            Self::SlowClient | Self::CommandFlood => 4100,
            Self::ShuttingDown => 4200,
            Self::IdleTimeout => 4201,
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
