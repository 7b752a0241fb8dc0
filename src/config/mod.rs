//! Typed configuration: built-in defaults, an optional TOML file and
//! `PUSHGATE_*` environment overrides, validated once at start.
//!
//! Owns nothing at run time: the rest of the gateway receives a validated
//! [`Config`] and never reads files or the environment itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
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
    /// How often the server sends a protocol ping.
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
    /// Bytes reserved per read: the main per-connection memory cost.
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
}

impl Default for RocketmqConfig {
    fn default() -> Self {
        Self {
            name_servers: vec!["127.0.0.1:9876".to_owned()],
            topic: "pushgate".to_owned(),
            queues: 8,
            consumer_group: "pushgate-nodes".to_owned(),
            producer_group: "pushgate-nodes".to_owned(),
            instance_name: None,
            max_batch_messages: 256,
            max_batch_bytes: 2 << 20,
            max_batches_in_flight: 1,
            send_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(2),
        }
    }
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

/// The admin API (`/admin/v1/…` on the internal listener).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token the admin API requires; without one the admin API
    /// refuses every call.
    pub token: Option<String>,
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
    /// Claim holding the initial topics (an array of strings).
    #[serde(default = "default_topics_claim")]
    pub topics_claim: String,
    /// Claims copied into the session metadata.
    #[serde(default)]
    pub metadata_claims: Vec<String>,
}

fn default_leeway_secs() -> u64 {
    30
}

fn default_query_param() -> String {
    "token".to_owned()
}

fn default_topics_claim() -> String {
    "topics".to_owned()
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
    /// Time one call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for TenantPluginConfig {
    fn default() -> Self {
        Self {
            config: BTreeMap::new(),
            failure_policy: FailurePolicy::Open,
            max_memory_bytes: 32 << 20,
            timeout: Duration::from_millis(50),
        }
    }
}

/// Where plugins are kept, and how large one may be.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Uploaded plugins are stored here and reloaded at start.
    pub store_dir: std::path::PathBuf,
    /// Largest component an upload may carry, in bytes.
    pub max_plugin_bytes: usize,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            store_dir: std::path::PathBuf::from("pushgate-data/plugins"),
            max_plugin_bytes: 10 << 20,
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            public: SocketAddr::from(([127, 0, 0, 1], 8080)),
            internal: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tls: None,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_message_bytes: 64 * 1024,
            outbound_queue: 256,
            read_buffer_bytes: 1024,
            max_connections_per_ip: 1_000,
            max_topics_per_connection: 64,
        }
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_batch: 1_000,
            max_users_per_message: 1_000,
            bus_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            engine: BusEngine::Local,
            local_queue: 4_096,
            rocketmq: RocketmqConfig::default(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_window: Duration::from_secs(10),
            grace_period: Duration::from_secs(10),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            push_keys: Vec::new(),
            auth: AuthMode::None,
            max_connections_per_user: 8,
            max_message_bytes: 64 * 1024,
            jwt: None,
            allowed_origins: Vec::new(),
            max_connections: 0,
            push_rate_per_second: 0,
            push_burst: 1_000,
            handshakes_per_second_per_ip: 0,
            plugin: TenantPluginConfig::default(),
        }
    }
}

impl Default for Config {
    /// Built-in defaults, without tenants.
    fn default() -> Self {
        Self {
            listen: ListenConfig::default(),
            websocket: WebSocketConfig::default(),
            push: PushConfig::default(),
            bus: BusConfig::default(),
            shutdown: ShutdownConfig::default(),
            admin: AdminConfig::default(),
            plugins: PluginsConfig::default(),
            log: LogConfig::default(),
            tenants: BTreeMap::new(),
        }
    }
}

impl Config {
    /// The configuration of a node started without a file: the `demo` tenant
    /// with the development authenticator and the key [`DEMO_PUSH_KEY`].
    pub fn demo() -> Self {
        let mut config = Self::default();
        config.tenants.insert(
            DEMO_TENANT.to_owned(),
            TenantConfig {
                push_keys: vec![DEMO_PUSH_KEY.to_owned()],
                auth: AuthMode::Development,
                ..TenantConfig::default()
            },
        );
        config
    }

    /// Loads defaults, then `file` (if any), then `PUSHGATE_*` variables, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let base = match file {
            None => Figment::from(Serialized::defaults(Self::demo())),
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError(format!(
                        "configuration file {} does not exist or is not a file",
                        path.display()
                    )));
                }
                Figment::from(Serialized::defaults(Self::default())).merge(Toml::file(path))
            }
        };
        // PUSHGATE_CONFIG, _NODE and _ADMIN_TOKEN belong to the command line.
        let env = Env::prefixed(ENV_PREFIX)
            .split("__")
            .ignore(&["config", "node", "admin_token"]);
        let config: Self = base
            .merge(env)
            .extract()
            .map_err(|err| ConfigError(describe_figment_error(err)))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document on top of the built-in defaults (no environment);
    /// used by tests and by tools that build a configuration in memory.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = Figment::from(Serialized::defaults(Self::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|err| ConfigError(describe_figment_error(err)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ws = &self.websocket;
        let positive = [
            ("websocket.max_message_bytes", ws.max_message_bytes),
            ("websocket.outbound_queue", ws.outbound_queue),
            ("websocket.read_buffer_bytes", ws.read_buffer_bytes),
            (
                "websocket.max_connections_per_ip",
                ws.max_connections_per_ip,
            ),
            ("push.max_body_bytes", self.push.max_body_bytes),
            ("push.max_batch", self.push.max_batch),
            (
                "push.max_users_per_message",
                self.push.max_users_per_message,
            ),
            ("bus.local_queue", self.bus.local_queue),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!("{field} must be greater than 0")));
            }
        }
        let nonzero_durations = [
            ("websocket.handshake_timeout", ws.handshake_timeout),
            ("websocket.ping_interval", ws.ping_interval),
            ("push.bus_timeout", self.push.bus_timeout),
        ];
        for (field, value) in nonzero_durations {
            if value.is_zero() {
                return Err(ConfigError(format!("{field} must be longer than 0s")));
            }
        }
        if ws.idle_timeout <= ws.ping_interval {
            return Err(ConfigError(format!(
                "websocket.idle_timeout ({:?}) must be longer than websocket.ping_interval ({:?}), \
                 or healthy clients would be closed between two pings",
                ws.idle_timeout, ws.ping_interval
            )));
        }
        if self.bus.engine == BusEngine::Rocketmq {
            self.bus.rocketmq.validate()?;
        }
        if self.bus.local_queue < self.push.max_batch {
            return Err(ConfigError(format!(
                "bus.local_queue ({}) must be at least push.max_batch ({}): a batch is \
                 accepted whole or not at all",
                self.bus.local_queue, self.push.max_batch
            )));
        }
        // Port 0 asks the OS for a free port: two such listeners never clash.
        if self.listen.public == self.listen.internal && self.listen.public.port() != 0 {
            return Err(ConfigError(format!(
                "listen.public and listen.internal are both {}: they must differ",
                self.listen.public
            )));
        }
        if self
            .admin
            .token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError(
                "admin.token must not be empty (leave it out to disable the admin API)".to_owned(),
            ));
        }
        for (name, tenant) in &self.tenants {
            tenant.validate(name)?;
        }
        check_unique_push_keys(&self.tenants)?;
        Ok(())
    }
}

impl RocketmqConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name_servers.is_empty() {
            return Err(ConfigError::new(
                "bus.rocketmq.name_servers must list at least one host:port",
            ));
        }
        for addr in &self.name_servers {
            let valid = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(ConfigError(format!(
                    "bus.rocketmq.name_servers: {addr:?} is not host:port"
                )));
            }
        }
        // RocketMQ's own rule for topic and group names.
        let plain = |name: &str| {
            !name.is_empty()
                && name.len() <= 127
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'%')
        };
        for (field, value) in [
            ("topic", &self.topic),
            ("consumer_group", &self.consumer_group),
            ("producer_group", &self.producer_group),
        ] {
            if !plain(value) {
                return Err(ConfigError(format!(
                    "bus.rocketmq.{field} {value:?}: use 1 to 127 of a-z, A-Z, 0-9, '-', '_' and '%'"
                )));
            }
        }
        if let Some(name) = &self.instance_name
            && !plain(name)
        {
            return Err(ConfigError(format!(
                "bus.rocketmq.instance_name {name:?}: use 1 to 127 of a-z, A-Z, 0-9, '-', '_' and '%'"
            )));
        }
        let positive = [
            ("queues", self.queues as usize),
            ("max_batch_messages", self.max_batch_messages),
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_batches_in_flight", self.max_batches_in_flight),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!(
                    "bus.rocketmq.{field} must be greater than 0"
                )));
            }
        }
        for (field, value) in [
            ("send_timeout", self.send_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!(
                    "bus.rocketmq.{field} must be longer than 0s"
                )));
            }
        }
        Ok(())
    }
}

impl TenantConfig {
    /// Checks one tenant's settings; errors name the field under
    /// `tenants.{name}`.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        if !is_valid_tenant_name(name) {
            return Err(ConfigError(format!(
                "tenants.{name}: a tenant name is 1 to 64 characters of a-z, 0-9, '-' and '_'"
            )));
        }
        let positive = [
            ("max_connections_per_user", self.max_connections_per_user),
            ("max_message_bytes", self.max_message_bytes),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!(
                    "tenants.{name}.{field} must be greater than 0"
                )));
            }
        }
        if self.plugin.max_memory_bytes < (1 << 20) {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.max_memory_bytes must be at least 1 MiB"
            )));
        }
        if self.plugin.timeout.is_zero() {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.timeout must be longer than 0s"
            )));
        }
        if self.push_rate_per_second > 0 && self.push_burst == 0 {
            return Err(ConfigError(format!(
                "tenants.{name}.push_burst must be greater than 0 when push_rate_per_second is set"
            )));
        }
        for (index, key) in self.push_keys.iter().enumerate() {
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError(format!(
                    "tenants.{name}.push_keys: a key must be non-empty and without spaces"
                )));
            }
            if self.push_keys[..index].contains(key) {
                return Err(ConfigError(format!(
                    "tenants.{name}.push_keys: the same key is listed twice"
                )));
            }
        }
        Ok(())
    }
}

/// Each push key must identify exactly one tenant.
pub fn check_unique_push_keys(tenants: &BTreeMap<String, TenantConfig>) -> Result<(), ConfigError> {
    let mut key_owner: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, tenant) in tenants {
        for key in &tenant.push_keys {
            if let Some(other) = key_owner.insert(key, name)
                && other != name
            {
                return Err(ConfigError(format!(
                    "tenants.{name}.push_keys: a key is also a key of tenant {other:?}; \
                     each key must identify exactly one tenant"
                )));
            }
        }
    }
    Ok(())
}

/// Tenant names appear in URLs and metric labels: keep them plain.
pub fn is_valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Figment's errors carry the key path and the source (file or variable);
/// list every one of them.
fn describe_figment_error(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid_and_has_the_demo_tenant() {
        let config = Config::demo();
        config.validate().unwrap();
        assert_eq!(config.tenants[DEMO_TENANT].auth, AuthMode::Development);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = Config::from_toml("[websocket]\nmax_message_bytes = \"lots\"").unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = Config::from_toml("[websocket]\nmax_mesage_bytes = 5").unwrap_err();
        assert!(err.to_string().contains("max_mesage_bytes"), "{err}");
    }

    #[test]
    fn idle_timeout_must_exceed_ping_interval() {
        let err = Config::from_toml("[websocket]\nping_interval = \"30s\"\nidle_timeout = \"10s\"")
            .unwrap_err();
        assert!(err.to_string().contains("websocket.idle_timeout"), "{err}");
    }

    #[test]
    fn a_key_shared_by_two_tenants_is_refused() {
        let err = Config::from_toml(
            "[tenants.a]\npush_keys = [\"k1\"]\n[tenants.b]\npush_keys = [\"k1\"]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("tenants.b.push_keys"), "{err}");
    }

    #[test]
    fn bad_tenant_name_is_refused() {
        let err = Config::from_toml("[tenants.\"Bad Name\"]\n").unwrap_err();
        assert!(err.to_string().contains("Bad Name"), "{err}");
    }
}
