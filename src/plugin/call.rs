//! A compiled plugin version and its calls: a small pool of warm
//! instances, each call under the tenant's memory and time limits, every
//! outcome counted, and the [`Breaker`] consulted and told.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, Trap};

use super::breaker::Breaker;
use super::instance::{EPOCH_TICK, EpochClock, PluginState};
use super::limits::{BadOutput, PluginLimits, check_identity, check_replacement};
use super::rollout::{CallTally, CanaryWatch};
use super::{
    CallSettings, DeliverVerdict, Handshake, Hook, Identity, InvalidPlugin, Message, PluginFailure,
    PublishVerdict, Recipient, Rejection, WIT_PACKAGE, authenticate, on_deliver, on_publish, short,
};
use crate::log_budget::LogBudget;
use crate::sync::lock;

/// Instances kept warm per plugin version.
const POOL_SIZE: usize = 8;

/// Export indices of the hooks a plugin has, resolved once.
#[derive(Clone)]
pub(super) struct HookIndices {
    authenticate: Option<authenticate::GuestIndices>,
    on_publish: Option<on_publish::GuestIndices>,
    on_deliver: Option<on_deliver::GuestIndices>,
}

impl HookIndices {
    pub(super) fn new(
        pre: &InstancePre<PluginState>,
        hooks: &[Hook],
    ) -> Result<Self, InvalidPlugin> {
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
pub(super) struct Warm {
    store: Store<PluginState>,
    authenticate: Option<authenticate::Guest>,
    on_publish: Option<on_publish::Guest>,
    on_deliver: Option<on_deliver::Guest>,
}

/// What `authenticate` admitted: who, and until when.
#[derive(Debug)]
pub struct Authenticated {
    pub identity: Identity,
    /// When the credentials expire (`host.session-expires-at`), if the
    /// plugin said.
    pub expires_at_millis: Option<u64>,
}

/// One compiled plugin version, ready to call.
pub struct CompiledPlugin {
    /// Hex SHA-256 of the component's bytes.
    pub version: String,
    pub size: usize,
    /// The hooks it exports.
    pub hooks: Vec<Hook>,
    pub(crate) tenant: Arc<str>,
    clock: EpochClock,
    instance_pre: InstancePre<PluginState>,
    indices: HookIndices,
    pool: Mutex<Vec<Warm>>,
    /// One per hook (indexed like [`Hook::ALL`]); `authenticate`'s is
    /// never consulted (see [`Breaker`]).
    breakers: [Breaker; 3],
    /// Memory the warm instances hold, for operators.
    pooled_memory: metrics::Gauge,
    /// Successful-call metrics, by hook (indexed like [`Hook::ALL`]).
    ok_metrics: [crate::metrics::PluginCallMetrics; 3],
    /// Recent calls and failures, which a canary is judged by.
    pub(crate) tally: CallTally,
    /// Set while this version is a canary.
    canary: Mutex<Option<CanaryWatch>>,
    /// Failed calls are logged a few a minute (a client can cause them).
    failure_log: LogBudget,
    /// Calls and failures by hook (indexed like [`Hook::ALL`]) since this
    /// node loaded the version: the console's figures.
    totals: [HookTotals; 3],
    /// False for a copy made to try the version: its calls are no
    /// tenant's traffic and reach no metric.
    exported: bool,
}

/// One hook's calls and failures, as [`CompiledPlugin::totals`] reads them.
#[derive(Debug, Default)]
struct HookTotals {
    calls: std::sync::atomic::AtomicU64,
    failures: std::sync::atomic::AtomicU64,
}

impl HookTotals {
    fn count(&self, failed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        if failed {
            self.failures.fetch_add(1, Relaxed);
        }
    }
}

impl CompiledPlugin {
    /// A version ready to call, from what the host compiled and linked.
    pub(super) fn new(
        clock: EpochClock,
        tenant: &str,
        version: String,
        size: usize,
        hooks: Vec<Hook>,
        (instance_pre, indices): (InstancePre<PluginState>, HookIndices),
        ok_metrics: [crate::metrics::PluginCallMetrics; 3],
    ) -> Self {
        let pooled_memory = metrics::gauge!(
            crate::metrics::PLUGIN_POOLED_MEMORY,
            "tenant" => tenant.to_owned(),
            "version" => short(&version).to_owned()
        );
        Self {
            version,
            size,
            hooks,
            tenant: Arc::from(tenant),
            clock,
            instance_pre,
            indices,
            pool: Mutex::new(Vec::new()),
            breakers: Default::default(),
            pooled_memory,
            ok_metrics,
            tally: CallTally::default(),
            canary: Mutex::new(None),
            failure_log: LogBudget::default(),
            totals: Default::default(),
            exported: true,
        }
    }

    /// A copy of this version to try calls on (the console's "try"): the
    /// same compiled component, with instances, breakers and figures of its
    /// own, counted in no metric.
    pub fn for_trial(&self) -> Self {
        Self {
            version: self.version.clone(),
            size: self.size,
            hooks: self.hooks.clone(),
            tenant: self.tenant.clone(),
            clock: self.clock.clone(),
            instance_pre: self.instance_pre.clone(),
            indices: self.indices.clone(),
            pool: Mutex::new(Vec::new()),
            breakers: Default::default(),
            pooled_memory: metrics::Gauge::noop(),
            ok_metrics: std::array::from_fn(|_| crate::metrics::PluginCallMetrics {
                ok: metrics::Counter::noop(),
                duration: metrics::Histogram::noop(),
            }),
            tally: CallTally::default(),
            canary: Mutex::new(None),
            failure_log: LogBudget::default(),
            totals: Default::default(),
            exported: false,
        }
    }

    /// Calls and failures of `hook` since this node loaded the version.
    pub fn totals(&self, hook: Hook) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let totals = &self.totals[hook as usize];
        (totals.calls.load(Relaxed), totals.failures.load(Relaxed))
    }

    /// Makes this version a canary judged against `watch`'s baseline from
    /// now on, or (with `None`) no longer one. Both versions' calls are
    /// counted only meanwhile.
    pub(crate) fn watch_as_canary(&self, watch: Option<CanaryWatch>) {
        if let Some(new) = &watch {
            self.tally.watch();
            new.baseline.tally.watch();
        }
        let old = std::mem::replace(&mut *lock(&self.canary), watch);
        if let Some(old) = old {
            self.tally.unwatch();
            old.baseline.tally.unwatch();
        }
    }

    /// Counts a call's outcome; a failed call of a canary has it judged.
    fn count_outcome(&self, failed: bool, settings: &CallSettings) {
        self.tally.record(failed);
        if failed && let Some(watch) = lock(&self.canary).as_mut() {
            watch.judge(self, &settings.canary);
        }
    }

    /// True if the plugin exports `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    pub(super) fn instantiate(&self, settings: &CallSettings) -> wasmtime::Result<Warm> {
        let mut store = Store::new(
            &self.clock.engine,
            PluginState {
                tenant: self.tenant.clone(),
                config: settings.config.clone(),
                limits: PluginLimits::new(settings),
                session_expires_at_millis: None,
                printed: Vec::new(),
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

    /// Keeps `warm` for a next call, unless the pool holds enough: at most
    /// [`POOL_SIZE`] instances, and no more memory over all of them than
    /// one instance may hold — what a plugin grew stays counted. An
    /// instance grown past three quarters of its limit is retired: linear
    /// memory never shrinks, and a garbage-collected language's heap (a
    /// JavaScript plugin's) creeps up over thousands of calls until one
    /// call fails for memory; a fresh instance serves the next call instead.
    pub(super) fn give_back(&self, warm: Warm) {
        let limits = &warm.store.data().limits;
        let nearly_full = limits.memory() > limits.max_memory() / 4 * 3;
        let mut pool = lock(&self.pool);
        let pooled = pooled_memory(&pool);
        if pool.len() < POOL_SIZE && !nearly_full && pooled + limits.memory() <= limits.max_memory()
        {
            pool.push(warm);
        }
        self.pooled_memory.set(pooled_memory(&pool) as f64);
    }

    /// A warm instance, if the pool has one.
    fn take_warm(&self) -> Option<Warm> {
        let mut pool = lock(&self.pool);
        let warm = pool.pop();
        self.pooled_memory.set(pooled_memory(&pool) as f64);
        warm
    }

    /// Makes a warm instance under `settings` ahead of the first call, so
    /// that the first message after an upload does not wait for one (a
    /// JavaScript plugin's engine takes about a millisecond to start).
    pub fn prewarm(&self, settings: &CallSettings) {
        let _ticking = self.clock.ticking();
        match self.instantiate(settings) {
            Ok(warm) => self.give_back(warm),
            Err(err) => tracing::warn!(
                tenant = %self.tenant,
                version = %short(&self.version),
                error = %format!("{err:#}"),
                "plugin could not be pre-warmed; its first call will try again"
            ),
        }
    }

    /// Linear memory its warm instances hold now.
    pub fn warm_memory(&self) -> usize {
        pooled_memory(&lock(&self.pool))
    }

    /// Drops the warm instances (the version is no longer active).
    pub(crate) fn release_instances(&self) {
        lock(&self.pool).clear();
        self.pooled_memory.set(0.0);
    }

    /// Runs `call` on a warm instance under `settings`' limits. A failed
    /// instance is dropped (a trap poisons its store); a healthy one goes
    /// back to the pool.
    fn run<R>(
        &self,
        hook: Hook,
        settings: &CallSettings,
        call: impl FnOnce(&mut Warm) -> wasmtime::Result<R>,
        check: impl FnOnce(&R) -> Result<(), BadOutput>,
    ) -> Result<R, PluginFailure> {
        let breaker = self.breaker(hook);
        if breaker.is_some_and(Breaker::is_open) {
            self.record(hook, "tripped", Duration::ZERO);
            self.count_outcome(true, settings);
            return Err(PluginFailure::Tripped);
        }
        let started = Instant::now();
        let _ticking = self.clock.ticking();
        let taken = self.take_warm();
        let outcome = match taken {
            Some(warm) => Ok(warm),
            None => self.instantiate(settings),
        };
        let (outcome, refused_growth) = match outcome {
            Ok(mut warm) => {
                let state = warm.store.data_mut();
                state.config = settings.config.clone();
                state.limits.renew(settings);
                state.session_expires_at_millis = None;
                warm.store
                    .set_epoch_deadline(deadline_ticks(settings.timeout));
                let outcome = call(&mut warm);
                // A panic's message has no newline at its very end, maybe.
                warm.store.data_mut().log_printed(true);
                match outcome {
                    Ok(result) => (Ok((warm, result)), false),
                    Err(err) => (Err(err), warm.store.data().limits.refused_growth),
                }
            }
            Err(err) => (Err(err), false),
        };
        let elapsed = started.elapsed();
        match outcome {
            Ok((warm, result)) => {
                // The instance is sound whatever it answered.
                self.give_back(warm);
                if let Err(reason) = check(&result) {
                    if let Some(left_out) = self.failure_log.take() {
                        tracing::warn!(
                            tenant = %self.tenant,
                            version = %short(&self.version),
                            hook = hook.name(),
                            outcome = PluginFailure::BadOutput.label(),
                            %reason,
                            failures_not_logged = left_out,
                            "plugin returned something unusable"
                        );
                    }
                    self.record(hook, PluginFailure::BadOutput.label(), elapsed);
                    self.count_failure(hook);
                    self.count_outcome(true, settings);
                    return Err(PluginFailure::BadOutput);
                }
                if let Some(breaker) = breaker {
                    breaker.succeeded();
                }
                self.totals[hook as usize].count(false);
                let metrics = &self.ok_metrics[hook as usize];
                metrics.ok.increment(1);
                metrics.duration.record(elapsed.as_secs_f64());
                self.count_outcome(false, settings);
                Ok(result)
            }
            Err(err) => {
                let failure = classify(&err, refused_growth);
                if let Some(left_out) = self.failure_log.take() {
                    tracing::warn!(
                        tenant = %self.tenant,
                        version = %short(&self.version),
                        hook = hook.name(),
                        outcome = failure.label(),
                        error = %format!("{err:#}"),
                        failures_not_logged = left_out,
                        "plugin call failed"
                    );
                }
                self.record(hook, failure.label(), elapsed);
                self.count_failure(hook);
                self.count_outcome(true, settings);
                Err(failure)
            }
        }
    }

    /// The breaker of `hook`, if it has one.
    fn breaker(&self, hook: Hook) -> Option<&Breaker> {
        (hook != Hook::Authenticate).then(|| &self.breakers[hook as usize])
    }

    fn count_failure(&self, hook: Hook) {
        if self.breaker(hook).is_some_and(Breaker::failed) {
            tracing::error!(
                tenant = %self.tenant,
                version = %short(&self.version),
                hook = hook.name(),
                "plugin hook tripped: most of its calls in {:?} failed; skipped for {:?}",
                Breaker::WINDOW,
                Breaker::TRIP_FOR,
            );
        }
    }

    /// Counts a call the gateway did not make (e.g. `backlog`: too many
    /// messages waiting for this plugin); the failure policy applies.
    pub fn record_skipped(&self, hook: Hook, outcome: &'static str) {
        self.record(hook, outcome, Duration::ZERO);
    }

    fn record(&self, hook: Hook, outcome: &'static str, elapsed: Duration) {
        self.totals[hook as usize].count(true);
        if !self.exported {
            return;
        }
        crate::metrics::plugin_call(
            &self.tenant,
            short(&self.version),
            hook.name(),
            outcome,
            elapsed,
        );
    }

    /// `authenticate`: `Ok(Ok(admitted))`, `Ok(Err(rejection))`, or a
    /// failure.
    pub fn authenticate(
        &self,
        settings: &CallSettings,
        request: &Handshake,
    ) -> Result<Result<Authenticated, Rejection>, PluginFailure> {
        self.run(
            Hook::Authenticate,
            settings,
            |warm| {
                let guest = warm.authenticate.as_ref().ok_or_else(missing)?;
                let verdict = guest.call_authenticate(&mut warm.store, request)?;
                let expires_at_millis = warm.store.data().session_expires_at_millis;
                Ok(verdict.map(|identity| Authenticated {
                    identity,
                    expires_at_millis,
                }))
            },
            |verdict| match verdict {
                Ok(admitted) => {
                    check_identity(&admitted.identity.user, &admitted.identity.metadata)
                }
                Err(_) => Ok(()),
            },
        )
    }

    /// `on-publish`.
    pub fn on_publish(
        &self,
        settings: &CallSettings,
        message: &Message,
    ) -> Result<PublishVerdict, PluginFailure> {
        self.run(
            Hook::OnPublish,
            settings,
            |warm| {
                let guest = warm.on_publish.as_ref().ok_or_else(missing)?;
                guest.call_on_publish(&mut warm.store, message)
            },
            |verdict| match verdict {
                PublishVerdict::Replace(data) => check_replacement(data, settings.max_output_bytes),
                PublishVerdict::Pass | PublishVerdict::Drop(_) => Ok(()),
            },
        )
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
        self.run(
            Hook::OnDeliver,
            settings,
            |warm| {
                let guest = warm.on_deliver.as_ref().ok_or_else(missing)?;
                guest.call_on_deliver(&mut warm.store, message, profiles, recipients)
            },
            |verdicts| {
                if verdicts.len() != recipients.len() {
                    return Err(BadOutput::VerdictCount {
                        verdicts: verdicts.len(),
                        recipients: recipients.len(),
                    });
                }
                verdicts.iter().try_for_each(|verdict| match verdict {
                    DeliverVerdict::Replace(data) => {
                        check_replacement(data, settings.max_output_bytes)
                    }
                    DeliverVerdict::Pass | DeliverVerdict::Drop => Ok(()),
                })
            },
        )
    }
}

/// Linear memory held by the instances of `pool`.
fn pooled_memory(pool: &[Warm]) -> usize {
    pool.iter().map(|w| w.store.data().limits.memory()).sum()
}

fn missing() -> wasmtime::Error {
    wasmtime::format_err!("the plugin does not export this hook")
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// What a failed call was: the epoch deadline (timeout), a growth the
/// limits refused (memory), or anything else the plugin did (trap).
fn classify(err: &wasmtime::Error, refused_growth: bool) -> PluginFailure {
    if let Some(trap) = err.downcast_ref::<Trap>()
        && *trap == Trap::Interrupt
    {
        return PluginFailure::Timeout;
    }
    if refused_growth {
        return PluginFailure::Memory;
    }
    PluginFailure::Trap
}
