//! Typed configuration: its shape and named defaults here; reading (an
//! optional TOML file and `PUSHGATE_*` environment overrides) and checks in
//! [`load`].
//!
//! Owns nothing at run time and knows nothing of the parts that use it: it
//! builds no authenticator, TLS acceptor or socket (the node does, and
//! refuses what cannot work, see `node::check`). The rest of the gateway
//! receives a checked [`Config`] and never reads files or the environment
//! itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of the tenant that a node without a configuration file serves.
pub const DEMO_TENANT: &str = "demo";
/// Push key of the demo tenant. Only ever present when no file is given.
pub const DEMO_PUSH_KEY: &str = "demo-key";

/// Prefix of environment overrides; `__` separates nesting levels, e.g.
/// `PUSHGATE_LISTEN__PUBLIC=0.0.0.0:8080`.
pub const ENV_PREFIX: &str = "PUSHGATE_";

/// A configuration error that names the field at fault and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// The whole configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub websocket: WebSocketConfig,
    pub push: PushConfig,
    pub bus: BusConfig,
    pub shutdown: ShutdownConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub plugins: PluginsConfig,
    pub log: LogConfig,
    /// Tenants by name. The name is the `{tenant}` of `/ws/{tenant}`.
    pub tenants: BTreeMap<String, TenantConfig>,
}

/// Listener addresses. Both default to loopback so that a node started by
/// hand is not exposed by accident.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// WebSocket clients connect here.
    pub public: SocketAddr,
    /// Push API, metrics, health and admin: never expose to the internet.
    pub internal: SocketAddr,
    /// TLS on the public listener (`wss://`); plain when absent.
    pub tls: Option<TlsConfig>,
    /// Load balancers and proxies in front of the public listener (address
    /// ranges): for a connection from one of them, the client's address is
    /// taken from `X-Forwarded-For` (its last address not in these ranges),
    /// and every per-address limit applies to it. From anywhere else the
    /// header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Every connection to the public listener starts with a PROXY
    /// protocol header (v1 or v2, as load balancers such as HAProxy or AWS
    /// NLB send): the client's address is taken from it. Connections
    /// without one are dropped. Only behind such a load balancer.
    pub proxy_protocol: bool,
}

/// Certificate and key of the public listener, as PEM files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

/// WebSocket connection handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Time allowed from TCP accept to a complete upgrade request.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a connection may stay silent before the server sends it a
    /// protocol ping. A client that pings on its own is allowed a fifth
    /// more (within `idle_timeout`), so that its ping, not a second one of
    /// the server's, keeps the connection alive. The server's pings and
    /// the client pings its pongs ask for fall on the node's heartbeat
    /// grid (whole seconds at the default), to be taken together.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection from which nothing (not even a pong) arrived for this
    /// long is closed with 4003.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest client frame and message, in bytes (close 1009 above it).
    pub max_message_bytes: usize,
    /// Frames that may wait for one slow client before it is closed (4002).
    pub outbound_queue: usize,
    /// Bytes each connection keeps for reading what its client sends
    /// (commands and pongs, a few dozen bytes each): a larger frame grows
    /// it. 256 bytes: 0.6 KiB less per idle connection than 1 KiB.
    pub read_buffer_bytes: usize,
    /// Concurrent TCP connections from one IP address (429 above it).
    pub max_connections_per_ip: usize,
    /// Topics one connection may subscribe to.
    pub max_topics_per_connection: usize,
}

/// HTTP push API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Most messages in one `POST /v1/push/batch`.
    pub max_batch: usize,
    /// Most user ids one message may address.
    pub max_users_per_message: usize,
    /// How long a push may wait for the bus before it answers 503.
    #[serde(with = "humantime_serde")]
    pub bus_timeout: Duration,
}

/// Which bus engine carries messages between the push API and delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusEngine {
    /// In-process: one node, no broker (the embedded default).
    Local,
    /// RocketMQ: every node publishes to one topic and consumes all of it
    /// (broadcasting), so a push through any node reaches every node.
    Rocketmq,
}

/// Bus settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub engine: BusEngine,
    /// Messages the local engine holds before publishers wait; also the
    /// bound of the queue between the RocketMQ consumer and the dispatcher.
    pub local_queue: usize,
    /// Settings of the RocketMQ engine (`engine = "rocketmq"`).
    pub rocketmq: RocketmqConfig,
}

/// The RocketMQ engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RocketmqConfig {
    /// Name server addresses, `host:port` each.
    pub name_servers: Vec<String>,
    /// The topic every node publishes to and consumes; created (with
    /// `queues` queues) at start if the broker does not have it yet.
    pub topic: String,
    /// Queues of the topic when this node creates it.
    pub queues: u32,
    /// Consumer group of the nodes (every node consumes every message).
    pub consumer_group: String,
    /// Producer group of the nodes.
    pub producer_group: String,
    /// This node's name in the cluster: unique among the nodes, and stable
    /// across restarts. Default: `<host name>-<internal port>`.
    pub instance_name: Option<String>,
    /// Most messages in one RocketMQ batch; push requests that arrive
    /// while a batch is being sent go out together in the next one.
    pub max_batch_messages: usize,
    /// Most bytes in one RocketMQ batch (the broker refuses more than its
    /// `maxMessageSize`, 4 MiB by default).
    pub max_batch_bytes: usize,
    /// Batches being sent at once. One gathers the most pushes per batch
    /// while it is on its way, which measured best (BENCHMARKS.md).
    pub max_batches_in_flight: usize,
    /// How long one send may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// How often each node announces itself on the bus; a node also proves
    /// with it that its consumer receives (readiness).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Worker threads of the RocketMQ client's own runtime (sends, pulls,
    /// heartbeats). One measured best on two cores: more threads hand
    /// each message between more threads (BENCHMARKS.md).
    pub client_threads: usize,
    /// Pushes to users go only to the nodes that hold a connection of
    /// those users (tagged for them; the broker filters each node's
    /// pulls), instead of to every node — once every live node has it on
    /// and runs this version. See docs/cluster.md.
    pub route_to_holders: bool,
}

/// Shutdown and drain behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Clients are closed (1012) spread evenly over this window, so that
    /// the other nodes do not see a reconnect storm.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Longest wait, after the drain window, for clients to be gone before
    /// the process exits.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

/// The admin API (`/admin/v1/…` on the internal listener) and the console
/// (`/console/`) on its keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token the admin API requires; without one the admin API
    /// refuses every call.
    pub token: Option<String>,
    /// How often each node takes its tenants' figures for the console's
    /// charts (15 minutes of them are kept) and shares its connections and
    /// users with the other nodes.
    #[serde(with = "humantime_serde")]
    pub figures_every: Duration,
}

/// Where the node keeps what the admin API changes (tenants, keys,
/// plugins, their rollout, the audit trail), so that it survives restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The state directory: `state.json`, `audit.jsonl`, `plugins/`. One
    /// running node at a time may use it (it is locked while the node runs).
    pub dir: std::path::PathBuf,
    /// Audit entries kept; the oldest go first.
    pub audit_max_entries: usize,
    /// Audit entries older than this are dropped.
    #[serde(with = "humantime_serde")]
    pub audit_max_age: Duration,
    /// On a cluster bus: how often a snapshot of the control state is
    /// written to the control queue. Keep it below a third of the broker's
    /// retention (`fileReservedTime`), so that the broker always keeps one.
    #[serde(with = "humantime_serde")]
    pub snapshot_every: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub filter: String,
}

/// How a tenant's WebSocket clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Nobody may connect (the default until an authenticator is chosen).
    None,
    /// Development only: the `user` query parameter is the user id, trusted
    /// blindly. Logged as a warning at start.
    Development,
    /// A signed JWT (see [`JwtConfig`]): `sub` is the user id.
    Jwt,
}

/// JWT settings of a tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `ES256` or `ES384`.
    pub algorithm: String,
    /// Shared secret, for the HS algorithms.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key, for the RS and ES algorithms.
    #[serde(default)]
    pub public_key_pem: Option<String>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Query parameter that may carry the token (browsers cannot set headers).
    #[serde(default = "default_query_param")]
    pub query_param: String,
    /// Cookie that may carry the token (an `EventSource` sends its site's
    /// cookies, and no header). Browsers send cookies with any site's
    /// WebSocket handshake too: a tenant that sets this must list its
    /// `allowed_origins`.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Claim holding the initial topics (an array of strings).
    #[serde(default = "default_topics_claim")]
    pub topics_claim: String,
    /// Claims copied into the session metadata.
    #[serde(default)]
    pub metadata_claims: Vec<String>,
}

fn default_leeway_secs() -> u64 {
    DEFAULT_JWT_LEEWAY_SECS
}

fn default_query_param() -> String {
    DEFAULT_JWT_QUERY_PARAM.to_owned()
}

fn default_topics_claim() -> String {
    DEFAULT_JWT_TOPICS_CLAIM.to_owned()
}

/// One tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Keys that business services present as `Authorization: Bearer …`.
    pub push_keys: Vec<String>,
    pub auth: AuthMode,
    /// Connections one user may hold; the oldest is closed (4001) past it.
    pub max_connections_per_user: usize,
    /// Largest `data` of one pushed message, in bytes (413 above it).
    pub max_message_bytes: usize,
    /// Settings of the JWT authenticator (`auth = "jwt"`).
    pub jwt: Option<JwtConfig>,
    /// Browser origins allowed to connect; empty allows any. A handshake
    /// without `Origin` (not from a browser) is not affected.
    pub allowed_origins: Vec<String>,
    /// Open connections the tenant may have on this node; 0 = no limit
    /// (503 above it).
    pub max_connections: usize,
    /// Messages per second the tenant may push (batch messages count one
    /// each); 0 = no limit (429 with Retry-After above it).
    pub push_rate_per_second: u32,
    /// Messages the tenant may push at once above the steady rate.
    pub push_burst: u32,
    /// WebSocket handshakes per second from one IP address; 0 = no limit
    /// (429 with Retry-After above it).
    pub handshakes_per_second_per_ip: u32,
    /// How the tenant's plugin runs.
    pub plugin: TenantPluginConfig,
    /// Who may subscribe to what.
    pub subscriptions: SubscriptionsConfig,
    /// What each node keeps of the tenant's recent messages, for clients
    /// that reconnect and resume from their last position.
    pub history: HistoryConfig,
    /// Where the tenant's service hears of its connections and users.
    pub webhooks: Option<WebhookConfig>,
    /// The tenant's Pusher Channels app, if it serves Pusher clients.
    pub pusher: Option<PusherConfig>,
}

/// Lifecycle webhooks: each node `POST`s the events it sees to `url`,
/// batched, signed with `secret`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://`.
    pub url: String,
    /// The key of each batch's HMAC-SHA256 signature.
    pub secret: String,
    /// The events sent; the others are not.
    pub events: Vec<WebhookEvent>,
    /// How long one `POST` may take before it is retried.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Events waiting to be sent, at most; past it they are dropped (and
    /// counted), never holding up a client.
    #[serde(default = "default_webhook_max_queue")]
    pub max_queue: usize,
    /// How long a batch is retried (on 5xx, time-outs and refused
    /// connections) before it is dropped.
    #[serde(default = "default_webhook_retry_for", with = "humantime_serde")]
    pub retry_for: Duration,
}

fn default_webhook_timeout() -> Duration {
    DEFAULT_WEBHOOK_TIMEOUT
}

fn default_webhook_max_queue() -> usize {
    DEFAULT_WEBHOOK_MAX_QUEUE
}

fn default_webhook_retry_for() -> Duration {
    DEFAULT_WEBHOOK_RETRY_FOR
}

/// What a webhook tells of.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A connection was admitted (sent by the node holding it).
    Connected,
    /// A connection ended.
    Disconnected,
    /// A connection subscribed to a topic (its own command, or the API).
    Subscribed,
    Unsubscribed,
    /// A user's first connection anywhere opened (sent once, by the
    /// user's owner node).
    UserOnline,
    /// A user's last connection anywhere ended.
    UserOffline,
}

impl WebhookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Subscribed => "subscribed",
            Self::Unsubscribed => "unsubscribed",
            Self::UserOnline => "user_online",
            Self::UserOffline => "user_offline",
        }
    }
}

/// A tenant's message history on each node: a client that reconnects
/// with its last position (`since`) receives what it missed within it.
/// Every bound holds at once; `max_messages = 0` keeps none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    pub max_messages: usize,
    /// Message data kept, in bytes.
    pub max_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

/// What a failing filter does with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Deliver it as if there were no plugin.
    #[default]
    Open,
    /// Drop it.
    Closed,
}

/// A tenant's plugin settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantPluginConfig {
    /// Key/value settings the plugin reads through `host.config`.
    pub config: BTreeMap<String, String>,
    /// What a failing `on-publish` or `on-deliver` does; a failing
    /// `authenticate` always refuses the client (503).
    pub failure_policy: FailurePolicy,
    /// Linear memory one plugin instance may use.
    pub max_memory_bytes: usize,
    /// Time one call may take (at most `plugins.max_call_timeout`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The tenant's share of the node: how many of its `authenticate` and
    /// `on-publish` calls may run at once. Past it, its handshakes and
    /// pushes get 503 with `Retry-After`; other tenants see nothing.
    pub max_concurrent_calls: usize,
    /// Messages that may wait for the tenant's `on-deliver` plugin; past
    /// it, newer ones wait behind them and get the failure policy without
    /// a plugin call (in order).
    pub max_waiting_messages: usize,
    /// When a canary version is rolled back on its own.
    pub canary: CanaryPolicy,
    /// What a shadow version's differing samples keep.
    pub shadow: ShadowPolicy,
}

/// When a canary version is rolled back automatically: its failure rate
/// (traps, timeouts, memory, unusable output, tripped calls) over `window`
/// exceeds the active version's by more than `margin`, once it made at
/// least `min_calls` calls in that window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryPolicy {
    /// Allowed excess failure rate, 0 to 1 (0.05: five percentage points).
    pub margin: f64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub min_calls: u32,
}

/// Longest canary window: what a version's call tally keeps.
pub const MAX_CANARY_WINDOW: Duration = Duration::from_secs(3_600);

/// What a shadow version's differing samples keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowPolicy {
    /// Keep only the size and a hash of message data and user ids, never
    /// the data itself.
    pub redact_samples: bool,
}

/// A tenant's subscription rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// Topic patterns any authenticated client of the tenant may subscribe
    /// to, besides what its token or plugin granted: `*` one segment, `**`
    /// (last) the rest, `{user}` the client's own user id. Clients of the
    /// development authenticator may subscribe to anything.
    pub allow: Vec<String>,
}

/// Where plugins are kept, and how large one may be.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Uploaded plugins are stored here and reloaded at start; by default
    /// `plugins/` in the state directory (`state.dir`). An older setting,
    /// still read.
    pub store_dir: Option<std::path::PathBuf>,
    /// Largest component an upload may carry, in bytes.
    pub max_plugin_bytes: usize,
    /// The longest `plugin.timeout` a tenant may set: the operator's bound
    /// on how long one call may hold a thread.
    #[serde(with = "humantime_serde")]
    pub max_call_timeout: Duration,
}

impl Config {
    /// Where uploaded plugins are stored: `plugins.store_dir` if set,
    /// otherwise `plugins/` in the state directory.
    pub fn plugin_store_dir(&self) -> std::path::PathBuf {
        self.plugins
            .store_dir
            .clone()
            .unwrap_or_else(|| self.state.dir.join("plugins"))
    }
}

mod defaults;
pub mod load;
mod pusher;
mod redact;

pub use defaults::*;
pub use load::{check_unique_push_keys, is_valid_tenant_name};
pub use pusher::PusherConfig;
pub use redact::{REDACTED, key_fingerprint};
