//! Reading a configuration (defaults, file, environment) and checking what
//! types alone cannot express, with errors that name the field.

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::*;

impl Config {
    /// The configuration of a node started without a file (and without
    /// tenants in the environment): the `demo` tenant with the development
    /// authenticator and the key [`DEMO_PUSH_KEY`].
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
        // Tenants set in the environment are a deployment's own: the demo
        // tenant, whose key is published, is only for a node given nothing.
        let tenants_from_env = std::env::vars_os().any(|(name, _)| {
            name.to_str()
                .is_some_and(|name| name.starts_with(&format!("{ENV_PREFIX}TENANTS__")))
        });
        let base = match file {
            None if tenants_from_env => Figment::from(Serialized::defaults(Self::default())),
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
        if self.plugins.max_call_timeout.is_zero() {
            return Err(ConfigError(
                "plugins.max_call_timeout must be longer than 0s".to_owned(),
            ));
        }
        for (name, tenant) in &self.tenants {
            tenant.validate(name)?;
            tenant.check_plugin_timeout(name, self.plugins.max_call_timeout)?;
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
            ("client_threads", self.client_threads),
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
        if self.plugin.max_waiting_messages == 0 {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.max_waiting_messages must be greater than 0"
            )));
        }
        if self.plugin.max_concurrent_calls == 0 {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.max_concurrent_calls must be greater than 0"
            )));
        }
        let canary = &self.plugin.canary;
        if !(0.0..=1.0).contains(&canary.margin) {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.canary.margin is a failure rate from 0 to 1"
            )));
        }
        if canary.window < std::time::Duration::from_secs(1)
            || canary.window > super::MAX_CANARY_WINDOW
        {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.canary.window is 1s to {:?}",
                super::MAX_CANARY_WINDOW
            )));
        }
        if canary.min_calls == 0 {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.canary.min_calls must be greater than 0"
            )));
        }
        if self.jwt.as_ref().is_some_and(|jwt| jwt.cookie.is_some())
            && self.allowed_origins.is_empty()
        {
            return Err(ConfigError(format!(
                "tenants.{name}.jwt.cookie: a token in a cookie needs allowed_origins (a browser \
                 sends the cookie with any site's WebSocket handshake)"
            )));
        }
        if let Some(pusher) = &self.pusher {
            pusher.validate(name)?;
        }
        if let Some(webhooks) = &self.webhooks {
            let scheme_ok =
                webhooks.url.starts_with("http://") || webhooks.url.starts_with("https://");
            if !scheme_ok || webhooks.url.len() > 2048 {
                return Err(ConfigError(format!(
                    "tenants.{name}.webhooks.url must be an http:// or https:// URL"
                )));
            }
            if webhooks.secret.is_empty() {
                return Err(ConfigError(format!(
                    "tenants.{name}.webhooks.secret must not be empty"
                )));
            }
            if webhooks.events.is_empty() {
                return Err(ConfigError(format!(
                    "tenants.{name}.webhooks.events names at least one event"
                )));
            }
            if webhooks.timeout.is_zero() || webhooks.max_queue == 0 {
                return Err(ConfigError(format!(
                    "tenants.{name}.webhooks: timeout and max_queue must be greater than 0"
                )));
            }
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

impl TenantConfig {
    /// Checks the tenant's plugin timeout against the operator's bound.
    pub fn check_plugin_timeout(
        &self,
        name: &str,
        max_call_timeout: std::time::Duration,
    ) -> Result<(), ConfigError> {
        if self.plugin.timeout > max_call_timeout {
            return Err(ConfigError(format!(
                "tenants.{name}.plugin.timeout ({:?}) is longer than plugins.max_call_timeout \
                 ({max_call_timeout:?})",
                self.plugin.timeout
            )));
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
    // A Pusher app's key finds its tenant for a client, its id for a service.
    let mut app_owner: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for (name, tenant) in tenants {
        let Some(app) = &tenant.pusher else { continue };
        for (field, value) in [("key", app.key.as_str()), ("app_id", app.app_id.as_str())] {
            if let Some(other) = app_owner.insert((field, value), name) {
                return Err(ConfigError(format!(
                    "tenants.{name}.pusher.{field} is also tenant {other:?}'s; each Pusher app \
                     belongs to one tenant"
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

    #[test]
    fn webhooks_need_a_url_a_secret_and_known_events() {
        let webhooks = |settings: &str| {
            Config::from_toml(&format!("[tenants.t]\n[tenants.t.webhooks]\n{settings}"))
                .map_err(|err| err.to_string())
        };
        let good = r#"url = "https://x.example/h"
secret = "s"
events = ["user_online"]"#;
        let config = webhooks(good).unwrap();
        assert_eq!(
            config.tenants["t"].webhooks.as_ref().unwrap().events,
            [crate::config::WebhookEvent::UserOnline]
        );
        assert!(config.redacted().to_string().contains("<redacted>"));
        assert!(!config.redacted().to_string().contains("\"secret\":\"s\""));
        for (bad, says) in [
            (good.replace("https://x", "ftp://x"), "webhooks.url"),
            (good.replace("\"s\"", "\"\""), "webhooks.secret"),
            (good.replace("[\"user_online\"]", "[]"), "webhooks.events"),
            (good.replace("user_online", "user_joined"), "user_joined"),
        ] {
            let err = webhooks(&bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_token_in_a_cookie_needs_allowed_origins() {
        let jwt = "[tenants.t]\nauth = \"jwt\"\n[tenants.t.jwt]\nalgorithm = \"HS256\"\n\
                   secret = \"s\"\ncookie = \"push_token\"\n";
        let err = Config::from_toml(jwt).unwrap_err().to_string();
        assert!(err.contains("allowed_origins"), "{err}");
        let with_origins = jwt.replace(
            "auth = \"jwt\"",
            "auth = \"jwt\"\nallowed_origins = [\"https://a.example\"]",
        );
        Config::from_toml(&with_origins).unwrap();
    }
}
