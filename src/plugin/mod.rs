//! The WebAssembly plugin host: one wasmtime engine per process, each
//! uploaded plugin version validated and compiled once, pre-linked, and run
//! from a small pool of reused instances under memory and time limits.
//!
//! A plugin is a component of the `pushgate:plugin@0.1.0` package (`wit/`).
//! It may import only `pushgate:plugin/host` (log, its tenant's plugin
//! configuration, the clock) and the WASI command-line and I/O interfaces
//! that Rust's standard library links for panic messages; those are linked
//! as traps. Anything else — a filesystem, sockets, HTTP — is refused at
//! upload.
//!
//! Knows nothing of sockets or the bus: callers hand it a hook's input and
//! get the plugin's verdict, or a [`PluginFailure`] to apply the tenant's
//! failure policy to.

pub mod registry;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{
    Component, HasSelf, Instance, InstancePre, Linker, types::ComponentItem,
};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};

use crate::clock::now_micros;

wasmtime::component::bindgen!({
    world: "plugin",
    path: "wit",
});

pub use exports::pushgate::plugin::{authenticate, on_deliver, on_publish};
pub use pushgate::plugin::types::{
    DeliverVerdict, Handshake, Header, Identity, Message, PublishVerdict, Recipient, Rejection,
    Target,
};

/// The version of the WIT package this host speaks.
pub const WIT_PACKAGE: &str = "pushgate:plugin@0.1.0";
/// How often the epoch advances: the resolution of call time limits.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Instances kept warm per plugin version.
const POOL_SIZE: usize = 8;
/// Consecutive failures after which a plugin version is tripped.
const TRIP_AFTER_FAILURES: u32 = 5;
/// How long a tripped plugin version is skipped before it is tried again.
const TRIP_FOR: Duration = Duration::from_secs(30);

/// Imports a plugin may have besides `pushgate:plugin/host`: what Rust's
/// standard library links on `wasm32-wasip2` for panic messages and exit.
/// They are linked as traps: calling one stops the call.
const TOLERATED_IMPORTS: &[&str] = &[
    "wasi:cli/environment@",
    "wasi:cli/exit@",
    "wasi:cli/stdin@",
    "wasi:cli/stdout@",
    "wasi:cli/stderr@",
    "wasi:cli/terminal-input@",
    "wasi:cli/terminal-output@",
    "wasi:cli/terminal-stdin@",
    "wasi:cli/terminal-stdout@",
    "wasi:cli/terminal-stderr@",
    "wasi:io/error@",
    "wasi:io/streams@",
    "wasi:io/poll@",
];

/// One hook of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Authenticate = 0,
    OnPublish = 1,
    OnDeliver = 2,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Authenticate, Hook::OnPublish, Hook::OnDeliver];

    /// The hook's name, as in the WIT package and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Authenticate => "authenticate",
            Self::OnPublish => "on-publish",
            Self::OnDeliver => "on-deliver",
        }
    }

    fn export_name(self) -> String {
        format!("pushgate:plugin/{}@0.1.0", self.name())
    }
}

/// Why an upload was refused; the message says why, for the uploader.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPlugin(pub String);

/// Why a call did not produce a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginFailure {
    /// The plugin trapped (a panic, an unreachable, a trapping import).
    Trap,
    /// It ran past the tenant's time limit.
    Timeout,
    /// It tried to grow its memory past the tenant's limit.
    Memory,
    /// It failed too often lately and is skipped for a while.
    Tripped,
    /// It returned something unusable (e.g. data that is not JSON).
    BadOutput,
}

impl PluginFailure {
    /// The `outcome` label of the plugin-call metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::Tripped => "tripped",
            Self::BadOutput => "bad_output",
        }
    }
}

/// Limits and configuration a call runs with (from the tenant's settings).
#[derive(Debug, Clone)]
pub struct CallSettings {
    pub config: Arc<BTreeMap<String, String>>,
    pub max_memory_bytes: usize,
    pub timeout: Duration,
}

/// What a plugin's instance sees of the gateway.
struct PluginState {
    tenant: Arc<str>,
    config: Arc<BTreeMap<String, String>>,
    limits: StoreLimits,
}

impl pushgate::plugin::types::Host for PluginState {}

impl pushgate::plugin::host::Host for PluginState {
    fn log(&mut self, level: pushgate::plugin::host::Level, message: String) {
        use pushgate::plugin::host::Level;
        let tenant = &*self.tenant;
        match level {
            Level::Debug => tracing::debug!(tenant, plugin_log = %message),
            Level::Info => tracing::info!(tenant, plugin_log = %message),
            Level::Warn => tracing::warn!(tenant, plugin_log = %message),
            Level::Error => tracing::error!(tenant, plugin_log = %message),
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn now_millis(&mut self) -> u64 {
        now_micros() / 1000
    }
}

/// The process's plugin engine. Cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<PluginState>>,
}

impl PluginHost {
    /// Creates the engine and starts its epoch ticker: a plain thread, so
    /// that time limits hold however busy the async runtime is.
    pub fn new() -> wasmtime::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".to_owned())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(wasmtime::Error::new)?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
        })
    }

    /// Validates and compiles a component: it must be a component, import
    /// nothing beyond what plugins may use, and export at least one hook of
    /// this host's WIT version with the right types. Slow (milliseconds to
    /// seconds): run it off the async workers.
    pub fn compile(&self, tenant: &str, bytes: &[u8]) -> Result<CompiledPlugin, InvalidPlugin> {
        if is_core_module(bytes) {
            return Err(InvalidPlugin(
                "this is a core WebAssembly module, not a component: build for wasm32-wasip2 \
                 (or wrap it with `wasm-tools component new`)"
                    .to_owned(),
            ));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|err| InvalidPlugin(format!("not a valid WebAssembly component: {err}")))?;
        let component_type = component.component_type();
        let mut forbidden = Vec::new();
        for (name, item) in component_type.imports(&self.engine) {
            // `types` only carries type definitions; `host` is what we offer.
            if name.starts_with("pushgate:plugin/host@0.1")
                || name.starts_with("pushgate:plugin/types@0.1")
            {
                continue;
            }
            let tolerated = TOLERATED_IMPORTS.iter().any(|p| name.starts_with(p));
            if !tolerated || !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
                forbidden.push(name.to_owned());
            }
        }
        if !forbidden.is_empty() {
            return Err(InvalidPlugin(format!(
                "the component imports {}, which plugins may not use (no filesystem, network, \
                 clock or other system access: use pushgate:plugin/host)",
                forbidden.join(", ")
            )));
        }
        let mut linker = Linker::clone(&self.linker);
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|err| InvalidPlugin(format!("cannot link the component: {err}")))?;
        let instance_pre = linker.instantiate_pre(&component).map_err(|err| {
            InvalidPlugin(format!(
                "the component's imports do not match {WIT_PACKAGE}: {err:#}"
            ))
        })?;
        let hooks: Vec<Hook> = Hook::ALL
            .into_iter()
            .filter(|hook| {
                component
                    .get_export_index(None, hook.export_name())
                    .is_some()
            })
            .collect();
        if hooks.is_empty() {
            let exports: Vec<String> = component_type
                .exports(&self.engine)
                .map(|(name, _)| name.to_owned())
                .collect();
            return Err(InvalidPlugin(format!(
                "the component exports none of {WIT_PACKAGE}'s hooks (authenticate, on-publish, \
                 on-deliver); it exports {exports:?}. Build it against the WIT package in wit/"
            )));
        }
        let indices = HookIndices::new(&instance_pre, &hooks)?;
        let version = hex_sha256(bytes);
        let ok_metrics = Hook::ALL.map(|hook| {
            crate::metrics::PluginCallMetrics::new(tenant, short(&version), hook.name())
        });
        let plugin = CompiledPlugin {
            ok_metrics,
            version,
            size: bytes.len(),
            hooks,
            tenant: Arc::from(tenant),
            engine: self.engine.clone(),
            instance_pre,
            indices,
            pool: Mutex::new(Vec::new()),
            health: Health::default(),
        };
        // Instantiating once checks every export's types now, not at the
        // first message.
        let settings = CallSettings {
            config: Arc::default(),
            max_memory_bytes: 64 << 20,
            timeout: Duration::from_secs(5),
        };
        let warm = plugin.instantiate(&settings).map_err(|err| {
            InvalidPlugin(format!("the component cannot be instantiated: {err:#}"))
        })?;
        plugin.give_back(warm);
        Ok(plugin)
    }
}

/// A core module starts with the magic and version 1; a component with the
/// magic and a component-model layer. Checking it gives a clearer error.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// The plugin version: hex SHA-256 of its bytes.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Export indices of the hooks a plugin has, resolved once.
struct HookIndices {
    authenticate: Option<authenticate::GuestIndices>,
    on_publish: Option<on_publish::GuestIndices>,
    on_deliver: Option<on_deliver::GuestIndices>,
}

impl HookIndices {
    fn new(pre: &InstancePre<PluginState>, hooks: &[Hook]) -> Result<Self, InvalidPlugin> {
        let wrong = |hook: Hook, err: wasmtime::Error| {
            InvalidPlugin(format!(
                "the export `{}` does not match {WIT_PACKAGE}: {err}",
                hook.export_name()
            ))
        };
        let has = |hook| hooks.contains(&hook);
        Ok(Self {
            authenticate: has(Hook::Authenticate)
                .then(|| authenticate::GuestIndices::new(pre))
                .transpose()
                .map_err(|e| wrong(Hook::Authenticate, e))?,
            on_publish: has(Hook::OnPublish)
                .then(|| on_publish::GuestIndices::new(pre))
                .transpose()
                .map_err(|e| wrong(Hook::OnPublish, e))?,
            on_deliver: has(Hook::OnDeliver)
                .then(|| on_deliver::GuestIndices::new(pre))
                .transpose()
                .map_err(|e| wrong(Hook::OnDeliver, e))?,
        })
    }
}

/// A live instance with its store and typed hook handles.
struct Warm {
    store: Store<PluginState>,
    authenticate: Option<authenticate::Guest>,
    on_publish: Option<on_publish::Guest>,
    on_deliver: Option<on_deliver::Guest>,
}

/// Failure counting for the circuit breaker.
#[derive(Default)]
struct Health {
    consecutive_failures: AtomicU32,
    /// Micros since the Unix epoch until which the version is tripped.
    tripped_until: AtomicU64,
}

/// One compiled plugin version, ready to call.
pub struct CompiledPlugin {
    /// Hex SHA-256 of the component's bytes.
    pub version: String,
    pub size: usize,
    /// The hooks it exports.
    pub hooks: Vec<Hook>,
    tenant: Arc<str>,
    engine: Engine,
    instance_pre: InstancePre<PluginState>,
    indices: HookIndices,
    pool: Mutex<Vec<Warm>>,
    health: Health,
    /// Successful-call metrics, by hook (indexed like [`Hook::ALL`]).
    ok_metrics: [crate::metrics::PluginCallMetrics; 3],
}

impl CompiledPlugin {
    /// True if the plugin exports `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    fn instantiate(&self, settings: &CallSettings) -> wasmtime::Result<Warm> {
        let mut store = Store::new(
            &self.engine,
            PluginState {
                tenant: self.tenant.clone(),
                config: settings.config.clone(),
                limits: limits(settings),
            },
        );
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(deadline_ticks(settings.timeout));
        let instance: Instance = self.instance_pre.instantiate(&mut store)?;
        Ok(Warm {
            authenticate: self
                .indices
                .authenticate
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            on_publish: self
                .indices
                .on_publish
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            on_deliver: self
                .indices
                .on_deliver
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            store,
        })
    }

    fn give_back(&self, warm: Warm) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_SIZE {
            pool.push(warm);
        }
    }

    /// Runs `call` on a warm instance under `settings`' limits. A failed
    /// instance is dropped (a trap poisons its store); a healthy one goes
    /// back to the pool.
    fn run<R>(
        &self,
        hook: Hook,
        settings: &CallSettings,
        call: impl FnOnce(&mut Warm) -> wasmtime::Result<R>,
    ) -> Result<R, PluginFailure> {
        let now = now_micros();
        if self.health.tripped_until.load(Ordering::Relaxed) > now {
            self.record(hook, "tripped", Duration::ZERO);
            return Err(PluginFailure::Tripped);
        }
        let started = Instant::now();
        let taken = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let outcome = match taken {
            Some(warm) => Ok(warm),
            None => self.instantiate(settings),
        }
        .and_then(|mut warm| {
            let state = warm.store.data_mut();
            state.config = settings.config.clone();
            state.limits = limits(settings);
            warm.store
                .set_epoch_deadline(deadline_ticks(settings.timeout));
            call(&mut warm).map(|result| (warm, result))
        });
        let elapsed = started.elapsed();
        match outcome {
            Ok((warm, result)) => {
                self.give_back(warm);
                self.health.consecutive_failures.store(0, Ordering::Relaxed);
                let metrics = &self.ok_metrics[hook as usize];
                metrics.ok.increment(1);
                metrics.duration.record(elapsed.as_secs_f64());
                Ok(result)
            }
            Err(err) => {
                let failure = classify(&err);
                tracing::warn!(
                    tenant = %self.tenant,
                    version = %short(&self.version),
                    hook = hook.name(),
                    outcome = failure.label(),
                    error = %format!("{err:#}"),
                    "plugin call failed"
                );
                self.record(hook, failure.label(), elapsed);
                self.count_failure();
                Err(failure)
            }
        }
    }

    fn count_failure(&self) {
        let failures = self
            .health
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures >= TRIP_AFTER_FAILURES {
            let until = now_micros() + TRIP_FOR.as_micros() as u64;
            self.health.tripped_until.store(until, Ordering::Relaxed);
            self.health.consecutive_failures.store(0, Ordering::Relaxed);
            tracing::error!(
                tenant = %self.tenant,
                version = %short(&self.version),
                "plugin tripped after {TRIP_AFTER_FAILURES} failures in a row; skipped for {TRIP_FOR:?}"
            );
        }
    }

    /// Counts a call the gateway did not make (e.g. `backlog`: too many
    /// messages waiting for this plugin); the failure policy applies.
    pub fn record_skipped(&self, hook: Hook, outcome: &'static str) {
        self.record(hook, outcome, Duration::ZERO);
    }

    /// Counts a failure the caller found in the plugin's output.
    pub fn bad_output(&self, hook: Hook) {
        self.record(hook, PluginFailure::BadOutput.label(), Duration::ZERO);
        self.count_failure();
    }

    fn record(&self, hook: Hook, outcome: &'static str, elapsed: Duration) {
        crate::metrics::plugin_call(
            &self.tenant,
            short(&self.version),
            hook.name(),
            outcome,
            elapsed,
        );
    }

    /// `authenticate`: `Ok(Ok(identity))`, `Ok(Err(rejection))`, or a failure.
    pub fn authenticate(
        &self,
        settings: &CallSettings,
        request: &Handshake,
    ) -> Result<Result<Identity, Rejection>, PluginFailure> {
        self.run(Hook::Authenticate, settings, |warm| {
            let guest = warm.authenticate.as_ref().ok_or_else(missing)?;
            guest.call_authenticate(&mut warm.store, request)
        })
    }

    /// `on-publish`.
    pub fn on_publish(
        &self,
        settings: &CallSettings,
        message: &Message,
    ) -> Result<PublishVerdict, PluginFailure> {
        self.run(Hook::OnPublish, settings, |warm| {
            let guest = warm.on_publish.as_ref().ok_or_else(missing)?;
            guest.call_on_publish(&mut warm.store, message)
        })
    }

    /// `on-deliver`: one verdict per recipient (a wrong count is a failure).
    /// `profiles` are the distinct metadata sets the recipients refer to.
    pub fn on_deliver(
        &self,
        settings: &CallSettings,
        message: &Message,
        profiles: &[Vec<(String, String)>],
        recipients: &[Recipient],
    ) -> Result<Vec<DeliverVerdict>, PluginFailure> {
        let verdicts = self.run(Hook::OnDeliver, settings, |warm| {
            let guest = warm.on_deliver.as_ref().ok_or_else(missing)?;
            guest.call_on_deliver(&mut warm.store, message, profiles, recipients)
        })?;
        if verdicts.len() != recipients.len() {
            self.bad_output(Hook::OnDeliver);
            return Err(PluginFailure::BadOutput);
        }
        Ok(verdicts)
    }
}

fn missing() -> wasmtime::Error {
    wasmtime::format_err!("the plugin does not export this hook")
}

fn limits(settings: &CallSettings) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(settings.max_memory_bytes)
        .instances(4)
        .tables(8)
        .memories(2)
        .trap_on_grow_failure(true)
        .build()
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

fn classify(err: &wasmtime::Error) -> PluginFailure {
    if let Some(trap) = err.downcast_ref::<Trap>()
        && *trap == Trap::Interrupt
    {
        return PluginFailure::Timeout;
    }
    let text = format!("{err:#}");
    if text.contains("growing memory") || text.contains("memory") && text.contains("limit") {
        return PluginFailure::Memory;
    }
    PluginFailure::Trap
}

/// The first 12 hex digits of a version, for labels and logs.
pub fn short(version: &str) -> &str {
    &version[..version.len().min(12)]
}
