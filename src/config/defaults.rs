//! Every setting's default, named: the values a node runs with when the
//! configuration file and the environment say nothing, and the `Default`
//! of each section built from them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

/// Where WebSocket clients connect, by default.
pub const DEFAULT_PUBLIC_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 8080);

/// Where the push, admin and operations APIs listen, by default: clear of
/// the monitoring stack's own ports (Prometheus 9090, Pushgateway 9091,
/// Alertmanager 9093, node exporter 9100), which often run on the same host.
pub const DEFAULT_INTERNAL_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 8081);

/// Clock skew a JWT's `exp` and `nbf` are allowed, by default.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 30;
/// The query parameter a JWT may come in, by default.
pub const DEFAULT_JWT_QUERY_PARAM: &str = "token";
/// The claim listing a connection's topics, by default.
pub const DEFAULT_JWT_TOPICS_CLAIM: &str = "topics";

/// How often a node takes its tenants' figures, by default.
pub const DEFAULT_ADMIN_FIGURES_EVERY: Duration = Duration::from_secs(10);

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: None,
            figures_every: DEFAULT_ADMIN_FIGURES_EVERY,
        }
    }
}

/// The state directory, by default (relative to the working directory).
pub const DEFAULT_STATE_DIR: &str = "pushgate-data";

/// Audit entries kept, by default.
pub const DEFAULT_AUDIT_MAX_ENTRIES: usize = 10_000;

/// How long audit entries are kept, by default: 90 days.
pub const DEFAULT_AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// How often a snapshot of the control state is written, by default: a
/// third of the broker's default retention (72 h) and then some.
pub const DEFAULT_SNAPSHOT_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Messages that may wait for one tenant's `on-deliver` plugin, by default.
pub const DEFAULT_WAITING_MESSAGES: usize = 1_024;

/// Calls of one tenant's plugin that may run at once, by default.
pub const DEFAULT_PLUGIN_CONCURRENCY: usize = 2;

/// The longest plugin call timeout tenants may set, by default.
pub const DEFAULT_MAX_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The default of [`RocketmqConfig::queues`].
pub const DEFAULT_ROCKETMQ_QUEUES: u32 = 8;
/// The default of [`RocketmqConfig::max_batch_messages`].
pub const DEFAULT_ROCKETMQ_MAX_BATCH_MESSAGES: usize = 256;
/// The default of [`RocketmqConfig::max_batch_bytes`].
pub const DEFAULT_ROCKETMQ_MAX_BATCH_BYTES: usize = 2 << 20;
/// The default of [`RocketmqConfig::max_batches_in_flight`].
pub const DEFAULT_ROCKETMQ_MAX_BATCHES_IN_FLIGHT: usize = 1;
/// The default of [`RocketmqConfig::send_timeout`].
pub const DEFAULT_ROCKETMQ_SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// The default of [`RocketmqConfig::heartbeat_interval`].
pub const DEFAULT_ROCKETMQ_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Worker threads of the RocketMQ client's runtime: one measured best on
/// two cores (13 % less node CPU per push at 1,000/s, a quarter more
/// throughput at the ceiling, BENCHMARKS.md).
pub const DEFAULT_ROCKETMQ_CLIENT_THREADS: usize = 1;
/// The default of [`HistoryConfig::max_messages`].
pub const DEFAULT_HISTORY_MAX_MESSAGES: usize = 1_000;
/// The default of [`HistoryConfig::max_bytes`].
pub const DEFAULT_HISTORY_MAX_BYTES: usize = 1 << 20;
/// The default of [`HistoryConfig::max_age`].
pub const DEFAULT_HISTORY_MAX_AGE: Duration = Duration::from_secs(120);
/// The default of [`CanaryPolicy::margin`].
pub const DEFAULT_CANARY_MARGIN: f64 = 0.05;
/// The default of [`CanaryPolicy::window`].
pub const DEFAULT_CANARY_WINDOW: Duration = Duration::from_secs(60);
/// The default of [`CanaryPolicy::min_calls`].
pub const DEFAULT_CANARY_MIN_CALLS: u32 = 20;
/// The default of [`TenantPluginConfig::max_memory_bytes`].
pub const DEFAULT_PLUGIN_MAX_MEMORY_BYTES: usize = 32 << 20;
/// The default of [`TenantPluginConfig::timeout`].
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_millis(50);
/// The default of [`PluginsConfig::max_plugin_bytes`].
pub const DEFAULT_PLUGINS_MAX_PLUGIN_BYTES: usize = 32 << 20;
/// The default of [`WebSocketConfig::handshake_timeout`].
pub const DEFAULT_WEBSOCKET_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of [`WebSocketConfig::ping_interval`].
pub const DEFAULT_WEBSOCKET_PING_INTERVAL: Duration = Duration::from_secs(25);
/// The default of [`WebSocketConfig::idle_timeout`].
pub const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default of [`WebSocketConfig::max_message_bytes`].
pub const DEFAULT_WEBSOCKET_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The default of [`WebSocketConfig::outbound_queue`].
pub const DEFAULT_WEBSOCKET_OUTBOUND_QUEUE: usize = 256;
/// The default of [`WebSocketConfig::read_buffer_bytes`].
pub const DEFAULT_WEBSOCKET_READ_BUFFER_BYTES: usize = 256;
/// The default of [`WebSocketConfig::max_connections_per_ip`].
pub const DEFAULT_WEBSOCKET_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// The default of [`WebSocketConfig::max_topics_per_connection`].
pub const DEFAULT_WEBSOCKET_MAX_TOPICS_PER_CONNECTION: usize = 64;
/// The default of [`PushConfig::max_body_bytes`].
pub const DEFAULT_PUSH_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The default of [`PushConfig::max_batch`].
pub const DEFAULT_PUSH_MAX_BATCH: usize = 1_000;
/// The default of [`PushConfig::max_users_per_message`].
pub const DEFAULT_PUSH_MAX_USERS_PER_MESSAGE: usize = 1_000;
/// The default of [`PushConfig::bus_timeout`].
pub const DEFAULT_PUSH_BUS_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of [`BusConfig::local_queue`].
pub const DEFAULT_BUS_LOCAL_QUEUE: usize = 4_096;
/// The default of [`ShutdownConfig::drain_window`].
pub const DEFAULT_SHUTDOWN_DRAIN_WINDOW: Duration = Duration::from_secs(10);
/// The default of [`ShutdownConfig::grace_period`].
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// The default of [`TenantConfig::max_connections_per_user`].
pub const DEFAULT_TENANT_MAX_CONNECTIONS_PER_USER: usize = 8;
/// The default of [`TenantConfig::max_message_bytes`].
pub const DEFAULT_TENANT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The default of [`TenantConfig::max_connections`].
pub const DEFAULT_TENANT_MAX_CONNECTIONS: usize = 0;
/// The default of [`TenantConfig::push_rate_per_second`].
pub const DEFAULT_TENANT_PUSH_RATE_PER_SECOND: u32 = 0;
/// The default of [`TenantConfig::push_burst`].
pub const DEFAULT_TENANT_PUSH_BURST: u32 = 1_000;
/// The default of [`TenantConfig::handshakes_per_second_per_ip`].
pub const DEFAULT_TENANT_HANDSHAKES_PER_SECOND_PER_IP: u32 = 0;

/// The name server a node looks for, by default (one on the same host).
pub const DEFAULT_ROCKETMQ_NAME_SERVER: &str = "127.0.0.1:9876";
/// The topic every push goes on, by default.
pub const DEFAULT_ROCKETMQ_TOPIC: &str = "pushgate";
/// The consumer and producer group of every node, by default.
pub const DEFAULT_ROCKETMQ_GROUP: &str = "pushgate-nodes";

impl Default for RocketmqConfig {
    fn default() -> Self {
        Self {
            name_servers: vec![DEFAULT_ROCKETMQ_NAME_SERVER.to_owned()],
            topic: DEFAULT_ROCKETMQ_TOPIC.to_owned(),
            queues: DEFAULT_ROCKETMQ_QUEUES,
            consumer_group: DEFAULT_ROCKETMQ_GROUP.to_owned(),
            producer_group: DEFAULT_ROCKETMQ_GROUP.to_owned(),
            instance_name: None,
            max_batch_messages: DEFAULT_ROCKETMQ_MAX_BATCH_MESSAGES,
            max_batch_bytes: DEFAULT_ROCKETMQ_MAX_BATCH_BYTES,
            max_batches_in_flight: DEFAULT_ROCKETMQ_MAX_BATCHES_IN_FLIGHT,
            send_timeout: DEFAULT_ROCKETMQ_SEND_TIMEOUT,
            heartbeat_interval: DEFAULT_ROCKETMQ_HEARTBEAT_INTERVAL,
            client_threads: DEFAULT_ROCKETMQ_CLIENT_THREADS,
            route_to_holders: false,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: std::path::PathBuf::from(DEFAULT_STATE_DIR),
            audit_max_entries: DEFAULT_AUDIT_MAX_ENTRIES,
            audit_max_age: DEFAULT_AUDIT_MAX_AGE,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }
}

impl Default for HistoryConfig {
    /// About two minutes of a busy tenant (as long as peers resume).
    fn default() -> Self {
        Self {
            max_messages: DEFAULT_HISTORY_MAX_MESSAGES,
            max_bytes: DEFAULT_HISTORY_MAX_BYTES,
            max_age: DEFAULT_HISTORY_MAX_AGE,
        }
    }
}

impl Default for CanaryPolicy {
    fn default() -> Self {
        Self {
            margin: DEFAULT_CANARY_MARGIN,
            window: DEFAULT_CANARY_WINDOW,
            min_calls: DEFAULT_CANARY_MIN_CALLS,
        }
    }
}

impl Default for TenantPluginConfig {
    fn default() -> Self {
        Self {
            config: BTreeMap::new(),
            failure_policy: FailurePolicy::Open,
            max_memory_bytes: DEFAULT_PLUGIN_MAX_MEMORY_BYTES,
            timeout: DEFAULT_PLUGIN_TIMEOUT,
            max_concurrent_calls: DEFAULT_PLUGIN_CONCURRENCY,
            max_waiting_messages: DEFAULT_WAITING_MESSAGES,
            canary: CanaryPolicy::default(),
            shadow: ShadowPolicy::default(),
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            store_dir: None,
            // A JavaScript plugin carries its engine: ~12 MB.
            max_plugin_bytes: DEFAULT_PLUGINS_MAX_PLUGIN_BYTES,
            max_call_timeout: DEFAULT_MAX_CALL_TIMEOUT,
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            public: SocketAddr::from(DEFAULT_PUBLIC_ADDR),
            internal: SocketAddr::from(DEFAULT_INTERNAL_ADDR),
            tls: None,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_WEBSOCKET_HANDSHAKE_TIMEOUT,
            ping_interval: DEFAULT_WEBSOCKET_PING_INTERVAL,
            idle_timeout: DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
            max_message_bytes: DEFAULT_WEBSOCKET_MAX_MESSAGE_BYTES,
            outbound_queue: DEFAULT_WEBSOCKET_OUTBOUND_QUEUE,
            read_buffer_bytes: DEFAULT_WEBSOCKET_READ_BUFFER_BYTES,
            max_connections_per_ip: DEFAULT_WEBSOCKET_MAX_CONNECTIONS_PER_IP,
            max_topics_per_connection: DEFAULT_WEBSOCKET_MAX_TOPICS_PER_CONNECTION,
        }
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_PUSH_MAX_BODY_BYTES,
            max_batch: DEFAULT_PUSH_MAX_BATCH,
            max_users_per_message: DEFAULT_PUSH_MAX_USERS_PER_MESSAGE,
            bus_timeout: DEFAULT_PUSH_BUS_TIMEOUT,
        }
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            engine: BusEngine::Local,
            local_queue: DEFAULT_BUS_LOCAL_QUEUE,
            rocketmq: RocketmqConfig::default(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_window: DEFAULT_SHUTDOWN_DRAIN_WINDOW,
            grace_period: DEFAULT_SHUTDOWN_GRACE_PERIOD,
        }
    }
}

/// What is logged, by default (a `tracing` filter).
pub const DEFAULT_LOG_FILTER: &str = "info";

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: DEFAULT_LOG_FILTER.to_owned(),
        }
    }
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            push_keys: Vec::new(),
            auth: AuthMode::None,
            max_connections_per_user: DEFAULT_TENANT_MAX_CONNECTIONS_PER_USER,
            max_message_bytes: DEFAULT_TENANT_MAX_MESSAGE_BYTES,
            jwt: None,
            allowed_origins: Vec::new(),
            max_connections: DEFAULT_TENANT_MAX_CONNECTIONS,
            push_rate_per_second: DEFAULT_TENANT_PUSH_RATE_PER_SECOND,
            push_burst: DEFAULT_TENANT_PUSH_BURST,
            handshakes_per_second_per_ip: DEFAULT_TENANT_HANDSHAKES_PER_SECOND_PER_IP,
            plugin: TenantPluginConfig::default(),
            subscriptions: SubscriptionsConfig::default(),
            history: HistoryConfig::default(),
            webhooks: None,
            pusher: None,
        }
    }
}

/// How long one webhook `POST` may take, by default.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhook events waiting to be sent per tenant and node, at most, by default.
pub const DEFAULT_WEBHOOK_MAX_QUEUE: usize = 10_000;
/// How long a webhook batch is retried, by default.
pub const DEFAULT_WEBHOOK_RETRY_FOR: Duration = Duration::from_secs(300);

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
            state: StateConfig::default(),
            plugins: PluginsConfig::default(),
            log: LogConfig::default(),
            tenants: BTreeMap::new(),
        }
    }
}
