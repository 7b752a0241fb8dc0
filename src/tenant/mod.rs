//! The tenant directory: who the tenants are, their limits and
//! authenticators, and which push key belongs to which tenant.
//!
//! Readers take a snapshot ([`TenantDirectory::snapshot`]) without locking;
//! a change (from the admin API) builds and swaps in a whole new snapshot,
//! so a reader never sees half of one and no connection is disturbed.
//!
//! Also owns who a client is ([`Identity`]) and the built-in
//! authenticators ([`auth`]). Knows nothing of sockets, sessions, the bus
//! or other nodes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

pub mod auth;
pub mod pusher_webhooks;
pub mod subscriptions;
pub mod webhooks;

use crate::config::{AuthMode, Config, ConfigError, TenantConfig, check_unique_push_keys};
use crate::metrics::TenantMetrics;
use crate::plugin::CallSettings;
use crate::sync::{lock, rate_limiter};
use auth::Authenticator;
use subscriptions::{Grant, SubscriptionRules};

/// Longest user id: what an authenticator may establish, the push API
/// accepts, and a connection event from the bus may name.
pub const MAX_USER_BYTES: usize = 256;
/// Longest topic name: what a client may subscribe to, or a service.
pub const MAX_TOPIC_BYTES: usize = 256;

/// A tenant's settings that cannot work; names the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct TenantSettingsError {
    pub field: String,
    pub problem: String,
}

/// Who a client is, as its tenant's authenticator established at handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Topics the connection is subscribed to from the start.
    pub topics: Vec<String>,
    /// Free-form facts about the session (language, role, device …).
    pub metadata: BTreeMap<String, String>,
    /// What the authenticator granted it to subscribe to.
    pub grant: Grant,
    /// When its credentials expire (seconds since the Unix epoch): the
    /// connection is closed then, unless it sent a fresh token before.
    pub expires_at_secs: Option<u64>,
}

/// One tenant as the running gateway sees it.
pub struct Tenant {
    /// The tenant's name, shared by every session of the tenant.
    pub name: Arc<str>,
    pub config: TenantConfig,
    pub authenticator: Authenticator,
    /// Who may subscribe to what, besides what a client was granted.
    pub subscriptions: SubscriptionRules,
    pub metrics: TenantMetrics,
    /// Where the tenant's service hears of connections and users.
    pub webhooks: Option<webhooks::Webhooks>,
    /// Where its Pusher app's webhooks go, in Pusher's format.
    pub pusher_webhooks: Option<pusher_webhooks::PusherWebhooks>,
    /// Limits and configuration of the tenant's plugin calls.
    pub plugin_settings: CallSettings,
    /// The tenant's share of the blocking threads for its plugin calls.
    plugin_share: Arc<Semaphore>,
    push_rate: Option<DefaultDirectRateLimiter>,
    handshake_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Failed `authenticate` calls each client address caused lately.
    auth_failures: DashMap<IpAddr, FailedAuthentications>,
}

/// Failed plugin authentications one address may cause within
/// [`FAILED_AUTHENTICATIONS_WINDOW`]; past that it is refused (429) before
/// the plugin is called. A bad input costs the client who sends it, not the
/// tenant's other clients.
pub const FAILED_AUTHENTICATIONS_PER_ADDRESS: u32 = 3;
/// See [`FAILED_AUTHENTICATIONS_PER_ADDRESS`].
pub const FAILED_AUTHENTICATIONS_WINDOW: Duration = Duration::from_secs(60);

/// One address's failed authentications in its current window.
#[derive(Debug, Clone, Copy)]
struct FailedAuthentications {
    since: std::time::Instant,
    count: u32,
}

/// The tenant's share of plugin calls is in use; retry after this long.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this tenant's plugin is busy with as many calls as it may run at once")]
pub struct ShareUsedUp;

/// A rate limit was hit; retry after this long.
#[derive(Debug, Clone, Copy)]
pub struct RetryAfter(pub Duration);

impl Tenant {
    /// A tenant called `name` with `config`, with its authenticator, rate
    /// limiters and metric handles; the error names the field at fault.
    pub fn new(name: &str, config: TenantConfig) -> Result<Self, TenantSettingsError> {
        let push_rate = NonZeroU32::new(config.push_rate_per_second).map(|rate| {
            let burst = NonZeroU32::new(config.push_burst).unwrap_or(rate);
            rate_limiter(Quota::per_second(rate).allow_burst(burst))
        });
        let handshake_rate = NonZeroU32::new(config.handshakes_per_second_per_ip)
            .map(|rate| governor::RateLimiter::keyed(Quota::per_second(rate)));
        let plugin_settings = CallSettings {
            config: Arc::new(config.plugin.config.clone()),
            max_memory_bytes: config.plugin.max_memory_bytes,
            timeout: config.plugin.timeout,
            max_output_bytes: config.max_message_bytes,
            canary: config.plugin.canary,
            shadow: config.plugin.shadow,
        };
        Ok(Self {
            name: Arc::from(name),
            authenticator: Authenticator::from_config(name, &config)?,
            subscriptions: SubscriptionRules::new(name, &config.subscriptions.allow)?,
            metrics: TenantMetrics::new(name),
            webhooks: config
                .webhooks
                .clone()
                .map(|webhooks| webhooks::Webhooks::new(name, webhooks)),
            pusher_webhooks: config
                .pusher
                .as_ref()
                .and_then(|app| pusher_webhooks::PusherWebhooks::of(name, app)),
            plugin_settings,
            plugin_share: Arc::new(Semaphore::new(config.plugin.max_concurrent_calls)),
            config,
            push_rate,
            handshake_rate,
            auth_failures: DashMap::new(),
        })
    }

    /// Runs `work` (a call of the tenant's plugin) on the blocking pool,
    /// within the tenant's share: never on the async workers, and never
    /// more of it at once than `plugin.max_concurrent_calls`, so that a slow
    /// plugin spends only its own tenant's share. Refused at once when the
    /// share is used up.
    pub async fn run_plugin_work<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ShareUsedUp> {
        let permit = self
            .plugin_share
            .clone()
            .try_acquire_owned()
            .map_err(|_| ShareUsedUp)?;
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await;
        match outcome {
            Ok(result) => Ok(result),
            // A panic in the host (a plugin's own trap is an error value,
            // never a panic) is a bug: passed on as such.
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // The runtime is stopping: answered as busy (503, retry).
            Err(_) => Err(ShareUsedUp),
        }
    }

    /// [`run_plugin_work`](Self::run_plugin_work), waiting (off the async
    /// workers) for a slot of the tenant's share rather than refused when
    /// it is used up: for work a client waits for anyway (a resume). `None`
    /// when the node is stopping.
    pub async fn run_plugin_work_when_free<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let permit = self.plugin_share.clone().acquire_owned().await.ok()?;
        match tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        {
            Ok(result) => Some(result),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => None,
        }
    }

    /// True if a browser page from `origin` may connect.
    pub fn allows_origin(&self, origin: &str) -> bool {
        let allowed = &self.config.allowed_origins;
        allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }

    /// Takes `messages` from the tenant's push budget.
    pub fn admit_push(&self, messages: u32) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.push_rate else {
            return Ok(());
        };
        let Some(messages) = NonZeroU32::new(messages) else {
            return Ok(());
        };
        match limiter.check_n(messages) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RetryAfter(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            // More than the burst at once can never pass: wait a second
            // and send smaller batches.
            Err(_) => Err(RetryAfter(Duration::from_secs(1))),
        }
    }

    /// Takes one handshake from `ip`'s budget.
    pub fn admit_handshake(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.handshake_rate else {
            return Ok(());
        };
        limiter.check_key(&ip).map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Forgets addresses whose handshake budget is full again, so that the
    /// limiter's memory follows the active addresses only.
    pub fn forget_idle_addresses(&self) {
        if let Some(limiter) = &self.handshake_rate {
            limiter.retain_recent();
        }
        self.auth_failures
            .retain(|_, failed| failed.since.elapsed() < FAILED_AUTHENTICATIONS_WINDOW);
    }

    /// Charges `ip` with a failed call of the tenant's `authenticate` plugin.
    pub fn charge_failed_authentication(&self, ip: IpAddr) {
        let mut failed = self
            .auth_failures
            .entry(ip)
            .or_insert(FailedAuthentications {
                since: std::time::Instant::now(),
                count: 0,
            });
        if failed.since.elapsed() >= FAILED_AUTHENTICATIONS_WINDOW {
            *failed = FailedAuthentications {
                since: std::time::Instant::now(),
                count: 0,
            };
        }
        failed.count += 1;
    }

    /// Refuses `ip` while it has caused too many failed authentications.
    pub fn admit_after_failed_authentications(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        let Some(failed) = self.auth_failures.get(&ip).map(|f| *f) else {
            return Ok(());
        };
        let elapsed = failed.since.elapsed();
        if failed.count >= FAILED_AUTHENTICATIONS_PER_ADDRESS
            && elapsed < FAILED_AUTHENTICATIONS_WINDOW
        {
            return Err(RetryAfter(FAILED_AUTHENTICATIONS_WINDOW - elapsed));
        }
        Ok(())
    }
}

/// An immutable view of every tenant.
#[derive(Default)]
pub struct TenantSnapshot {
    by_name: HashMap<Arc<str>, Arc<Tenant>>,
    /// SHA-256 of each push key → its tenant. Looking up a digest reveals
    /// nothing about how much of a guessed key was right, unlike comparing
    /// keys byte by byte.
    by_key_digest: HashMap<[u8; 32], Arc<Tenant>>,
    /// Tenants with a Pusher app, by the app's public key …
    by_pusher_key: HashMap<String, Arc<Tenant>>,
    /// … and by its id.
    by_pusher_app: HashMap<String, Arc<Tenant>>,
}

impl TenantSnapshot {
    /// The tenant called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name)
    }

    /// The tenant that owns push key `key`.
    pub fn by_push_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.by_key_digest.get(&key_digest(key))
    }

    /// Every tenant.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_name.values()
    }

    /// The tenant whose Pusher app has public key `key`.
    pub fn by_pusher_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.by_pusher_key.get(key)
    }

    /// The tenant whose Pusher app has id `app_id`.
    pub fn by_pusher_app(&self, app_id: &str) -> Option<&Arc<Tenant>> {
        self.by_pusher_app.get(app_id)
    }

    fn insert(&mut self, tenant: Arc<Tenant>) {
        for key in &tenant.config.push_keys {
            self.by_key_digest.insert(key_digest(key), tenant.clone());
        }
        if let Some(app) = &tenant.config.pusher {
            self.by_pusher_key.insert(app.key.clone(), tenant.clone());
            self.by_pusher_app
                .insert(app.app_id.clone(), tenant.clone());
        }
        self.by_name.insert(tenant.name.clone(), tenant);
    }
}

fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether an upsert made a new tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    Created,
    Updated,
}

/// The live tenant directory.
pub struct TenantDirectory {
    current: ArcSwap<TenantSnapshot>,
    /// The operator's bound on a tenant's plugin timeout.
    max_call_timeout: Duration,
    /// Serialises changes, so that two concurrent admin calls cannot lose
    /// one another's update.
    writer: Mutex<()>,
}

fn warn_if_development(name: &str, config: &TenantConfig) {
    if config.auth == AuthMode::Development {
        tracing::warn!(
            tenant = %name,
            "tenant uses the development authenticator: any client may claim any user id"
        );
    }
}

/// Checks that `config`'s push keys belong to no tenant of `current` but
/// `name`.
fn check_keys_against(
    current: &TenantSnapshot,
    name: &str,
    config: &TenantConfig,
) -> Result<(), ConfigError> {
    let mut configs: BTreeMap<String, TenantConfig> = current
        .iter()
        .filter(|t| &*t.name != name)
        .map(|t| (t.name.to_string(), t.config.clone()))
        .collect();
    configs.insert(name.to_owned(), config.clone());
    check_unique_push_keys(&configs)
}

impl TenantDirectory {
    /// Builds the directory from the tenants of `config`.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Self::new(&config.tenants, config.plugins.max_call_timeout)
    }

    /// Builds the directory of `tenants`; `max_call_timeout` bounds their
    /// plugins' timeouts.
    pub fn new(
        tenants: &BTreeMap<String, TenantConfig>,
        max_call_timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let mut snapshot = TenantSnapshot::default();
        for (name, tenant_config) in tenants {
            warn_if_development(name, tenant_config);
            let tenant = Tenant::new(name, tenant_config.clone())
                .map_err(|err| ConfigError::new(err.to_string()))?;
            snapshot.insert(Arc::new(tenant));
        }
        Ok(Self {
            current: ArcSwap::from_pointee(snapshot),
            max_call_timeout,
            writer: Mutex::new(()),
        })
    }

    /// The current view; cheap, lock-free, and stable while held.
    pub fn snapshot(&self) -> Arc<TenantSnapshot> {
        self.current.load_full()
    }

    /// Creates or replaces tenant `name`. Open connections stay; new limits
    /// apply from the next handshake or push.
    pub fn upsert(&self, name: &str, config: TenantConfig) -> Result<Upserted, ConfigError> {
        config.validate(name)?;
        config.check_plugin_timeout(name, self.max_call_timeout)?;
        let _writer = lock(&self.writer);
        let current = self.snapshot();
        check_keys_against(&current, name, &config)?;
        warn_if_development(name, &config);

        let mut next = TenantSnapshot::default();
        for tenant in current.iter().filter(|t| &*t.name != name) {
            next.insert(tenant.clone());
        }
        next.insert(Arc::new(
            Tenant::new(name, config).map_err(|err| ConfigError::new(err.to_string()))?,
        ));
        self.current.store(Arc::new(next));
        Ok(if current.get(name).is_some() {
            Upserted::Updated
        } else {
            Upserted::Created
        })
    }

    /// Checks, without changing anything, that [`upsert`](Self::upsert)
    /// would take `config` for tenant `name` now.
    pub fn check(&self, name: &str, config: &TenantConfig) -> Result<(), ConfigError> {
        config.validate(name)?;
        config.check_plugin_timeout(name, self.max_call_timeout)?;
        Authenticator::from_config(name, config)
            .map_err(|err| ConfigError::new(err.to_string()))?;
        SubscriptionRules::new(name, &config.subscriptions.allow)
            .map_err(|err| ConfigError::new(err.to_string()))?;
        check_keys_against(&self.snapshot(), name, config)
    }

    /// Removes tenant `name`; false if there was none.
    pub fn remove(&self, name: &str) -> bool {
        let _writer = lock(&self.writer);
        let current = self.snapshot();
        if current.get(name).is_none() {
            return false;
        }
        let mut next = TenantSnapshot::default();
        for tenant in current.iter().filter(|t| &*t.name != name) {
            next.insert(tenant.clone());
        }
        self.current.store(Arc::new(next));
        true
    }
}
