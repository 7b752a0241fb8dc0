//! Delivery on this node: consumes the bus, finds the local recipients of
//! each envelope and queues one shared frame to each of them.
//!
//! A frame is encoded once per message and shared (reference-counted) by
//! every recipient, and written to each recipient's socket from the
//! delivering thread when nothing waits before it (see
//! [`ConnectionHandle::enqueue`]). A large fan-out is split over every core.
//! Queuing never waits: a recipient whose queue is full is closed as a slow
//! client, so no client slows down anybody else.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc};

use super::dedupe::Deduplicator;
use super::outbound::{ConnectionHandle, Enqueued, Metadata};
use super::sessions::SessionManager;
use super::wire::{WireFrame, frame_with_data, message_frame};
use crate::bus::BusReceiver;
use crate::bus::envelope::{Envelope, Target};
use crate::clock::now_micros;
use crate::config::{DEFAULT_WAITING_MESSAGES, FailurePolicy};
use crate::plugin::registry::PluginRegistry;
use crate::plugin::shadow::Shadow;
use crate::plugin::{CompiledPlugin, DeliverVerdict, Hook, Recipient};
use crate::sync::{InFlight, lock};
use crate::tenant::{Tenant, TenantDirectory};

/// Most recipients handed to one `on-deliver` call, to bound what a plugin
/// must hold at once.
const DELIVER_BATCH: usize = 1_000;

/// From this many local recipients on, a message's writes are split over
/// every core (each write to a socket costs microseconds of the kernel's
/// time; one thread would write them one after another) …
const PARALLEL_FAN_OUT: usize = 2_048;
/// … in chunks of this many.
const FAN_OUT_CHUNK: usize = 512;

/// Tallies of one dispatch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DispatchOutcome {
    pub queued: u64,
    pub overflowed: u64,
    pub gone: u64,
    pub dropped_by_plugin: u64,
}

/// Messages that may wait on a lane past its plugin's own backlog
/// (`plugin.max_waiting_messages`): they keep their order and get the
/// failure policy without a plugin call. Past both, a message gets the
/// policy at once, ahead of those waiting (counted and logged).
const LANE_OVERFLOW: usize = 16_384;

/// How a message reaches its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The tenant has no `on-deliver` plugin: queued as it is, and no
    /// plugin is called whatever happens meanwhile (the dispatcher's way).
    Direct,
    /// Through the tenant's `on-deliver` plugin (a lane's way, on a
    /// blocking thread).
    ThroughPlugin,
    /// The plugin could not be called (its lane was full): the tenant's
    /// failure policy decides.
    PluginSkipped,
}

/// What delivery needs; shared by the dispatcher and its plugin lanes.
#[derive(Clone)]
struct Delivery {
    sessions: Arc<SessionManager>,
    tenants: Arc<TenantDirectory>,
    plugins: Arc<PluginRegistry>,
}

/// Delivers envelopes to the connections this node holds.
///
/// Messages of tenants without an `on-deliver` plugin are delivered right
/// away by the dispatcher task. Those of a tenant with one go to that
/// tenant's lane: a task that runs the plugin on a blocking thread, one
/// message after another (so the tenant's order holds), so that a slow
/// plugin delays only its own tenant.
pub struct Dispatcher {
    delivery: Delivery,
    lanes: Arc<Lanes>,
    backlog: Arc<InFlight>,
}

/// The threads that write large fan-outs: one per core, parked (no
/// wake-ups) between them.
fn fan_out_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("fan-out-{i}"))
            .build()
            .expect("threads for fan-outs")
    })
}

impl DispatchOutcome {
    fn add(self, other: Self) -> Self {
        Self {
            queued: self.queued + other.queued,
            overflowed: self.overflowed + other.overflowed,
            gone: self.gone + other.gone,
            dropped_by_plugin: self.dropped_by_plugin + other.dropped_by_plugin,
        }
    }

    pub(super) fn count(&mut self, enqueued: Enqueued) {
        match enqueued {
            Enqueued::Queued => self.queued += 1,
            Enqueued::Overflowed => self.overflowed += 1,
            Enqueued::Gone => self.gone += 1,
        }
    }
}

impl Dispatcher {
    pub fn new(
        sessions: Arc<SessionManager>,
        tenants: Arc<TenantDirectory>,
        plugins: Arc<PluginRegistry>,
        backlog: Arc<InFlight>,
    ) -> Self {
        Self {
            delivery: Delivery {
                sessions,
                tenants,
                plugins,
            },
            lanes: Arc::default(),
            backlog,
        }
    }

    /// The tenants' lanes, for whoever removes tenants.
    pub(crate) fn lanes(&self) -> Arc<Lanes> {
        self.lanes.clone()
    }

    /// Consumes `bus` until every publisher is gone.
    pub async fn run(self, mut bus: BusReceiver) {
        let mut dedupe = Deduplicator::default();
        while let Some(envelope) = bus.next().await {
            if let Some(key) = &envelope.idempotency_key
                && !dedupe.first_time(&envelope.tenant, key, std::time::Instant::now())
            {
                if let Some(tenant) = self.delivery.tenants.snapshot().get(&envelope.tenant) {
                    tenant.metrics.dropped_duplicate.increment(1);
                }
                continue;
            }
            if let Some(position) = envelope.position.get() {
                self.delivery.sessions.history.saw(*position);
            }
            self.dispatch(envelope);
        }
    }

    fn dispatch(&self, envelope: Arc<Envelope>) {
        let plugin = self
            .delivery
            .plugins
            .hook(&envelope.tenant, Hook::OnDeliver);
        let lane = self.lanes.get(envelope.tenant.as_str()).map(|l| l.clone());
        let lane = match lane {
            // With a plugin, or while messages still wait on the lane (the
            // plugin was deactivated meanwhile): behind them, in order.
            Some(lane) if plugin.is_some() || lane.waiting() > 0 => lane,
            None if plugin.is_some() => self
                .lanes
                .entry(envelope.tenant.clone())
                .or_insert_with(|| self.spawn_lane(tenant_lane_capacity(&self.delivery, &envelope)))
                .clone(),
            // Never calls a plugin: one activated since the lookup above
            // serves the next message, on its lane.
            _ => {
                self.delivery.deliver(&envelope, Route::Direct);
                return;
            }
        };
        self.backlog.start();
        lane.shared.waiting.fetch_add(1, Ordering::AcqRel);
        let refused = match lane.hand(envelope) {
            Handed::Queued => return,
            Handed::Overflowed => {
                if let Some(plugins) = &plugin {
                    plugins.active.record_skipped(Hook::OnDeliver, "backlog");
                }
                return;
            }
            Handed::Refused(envelope) => envelope,
        };
        lane.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        self.backlog.finish();
        tracing::warn!(tenant = %refused.tenant, "on-deliver lane full: delivered ahead of its queue");
        if lane.sender.is_closed() {
            self.lanes.remove(refused.tenant.as_str());
        }
        if let Some(plugins) = plugin {
            plugins.active.record_skipped(Hook::OnDeliver, "backlog");
        }
        // The dispatcher never runs a plugin: the failure policy applies.
        self.delivery.deliver(&refused, Route::PluginSkipped);
    }

    fn spawn_lane(&self, capacity: usize) -> Lane {
        let (sender, mut jobs) = mpsc::channel::<Arc<Envelope>>(capacity);
        let lane = Lane {
            sender,
            shared: Arc::default(),
        };
        let shared = lane.shared.clone();
        let delivery = self.delivery.clone();
        let backlog = self.backlog.clone();
        tokio::spawn(async move {
            loop {
                // The channel holds the older messages, the overflow the
                // newer ones (nothing enters the channel while the overflow
                // holds any): channel first keeps the order.
                let next = match jobs.try_recv() {
                    Ok(envelope) => Some((envelope, Route::ThroughPlugin)),
                    Err(_) => shared.take_overflow().map(|e| (e, Route::PluginSkipped)),
                };
                let (envelope, route) = match next {
                    Some(next) => next,
                    None => tokio::select! {
                        received = jobs.recv() => match received {
                            Some(envelope) => (envelope, Route::ThroughPlugin),
                            None => return,
                        },
                        () = shared.wake.notified() => continue,
                    },
                };
                let delivery = delivery.clone();
                let _ =
                    tokio::task::spawn_blocking(move || delivery.deliver(&envelope, route)).await;
                shared.waiting.fetch_sub(1, Ordering::AcqRel);
                backlog.finish();
            }
        });
        lane
    }
}

/// The room of a new lane: the tenant's `plugin.max_waiting_messages`.
fn tenant_lane_capacity(delivery: &Delivery, envelope: &Envelope) -> usize {
    delivery
        .tenants
        .snapshot()
        .get(&envelope.tenant)
        .map_or(DEFAULT_WAITING_MESSAGES, |t| {
            t.config.plugin.max_waiting_messages
        })
}

/// What became of a message handed to a lane.
enum Handed {
    /// On the lane, for the plugin.
    Queued,
    /// Behind the lane's queue, in order, for the failure policy.
    Overflowed,
    /// Neither has room (or the lane ended).
    Refused(Arc<Envelope>),
}

/// Every tenant's `on-deliver` lane.
#[derive(Default)]
pub(crate) struct Lanes(DashMap<String, Lane>);

impl std::ops::Deref for Lanes {
    type Target = DashMap<String, Lane>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Lanes {
    /// Drops a removed tenant's lane: its task ends once what waits on it
    /// is delivered (to nobody: the tenant's clients are gone).
    pub(crate) fn forget_tenant(&self, tenant: &str) {
        self.0.remove(tenant);
    }
}

/// One tenant's `on-deliver` lane.
#[derive(Clone)]
pub(crate) struct Lane {
    sender: mpsc::Sender<Arc<Envelope>>,
    shared: Arc<LaneShared>,
}

/// What a lane's task and the dispatcher share.
#[derive(Default)]
struct LaneShared {
    /// Messages handed to the lane and not delivered yet.
    waiting: AtomicUsize,
    /// Messages past the channel's room, in order.
    overflow: Mutex<VecDeque<Arc<Envelope>>>,
    /// Wakes the lane's task when the overflow got a message.
    wake: Notify,
}

impl LaneShared {
    fn take_overflow(&self) -> Option<Arc<Envelope>> {
        lock(&self.overflow).pop_front()
    }
}

impl Lane {
    fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// Queues `envelope` behind everything already handed to the lane.
    fn hand(&self, envelope: Arc<Envelope>) -> Handed {
        let mut overflow = lock(&self.shared.overflow);
        // While the overflow holds messages, newer ones go behind them.
        let envelope = if overflow.is_empty() {
            match self.sender.try_send(envelope) {
                Ok(()) => return Handed::Queued,
                Err(mpsc::error::TrySendError::Closed(envelope)) => {
                    return Handed::Refused(envelope);
                }
                Err(mpsc::error::TrySendError::Full(envelope)) => envelope,
            }
        } else {
            envelope
        };
        if overflow.len() >= LANE_OVERFLOW {
            return Handed::Refused(envelope);
        }
        overflow.push_back(envelope);
        drop(overflow);
        self.shared.wake.notify_one();
        Handed::Overflowed
    }
}

impl Delivery {
    /// Hands `frame` to every local recipient of `envelope`. Returns when
    /// all have it (written or queued), so that the next message follows
    /// it on every connection.
    fn fan_out(&self, envelope: &Envelope, frame: &WireFrame) -> DispatchOutcome {
        let hand = |recipients: &[ConnectionHandle]| {
            let mut outcome = DispatchOutcome::default();
            for connection in recipients {
                outcome.count(connection.enqueue(frame.clone()));
            }
            outcome
        };
        if let Target::Users(_) = &envelope.target {
            // A few connections per user: handed while visited.
            let mut outcome = DispatchOutcome::default();
            self.for_each_recipient(envelope, |connection| {
                outcome.count(connection.enqueue(frame.clone()));
            });
            return outcome;
        }
        // Collected first: no socket is written while the index is locked.
        let mut recipients = Vec::new();
        self.for_each_recipient(envelope, |c| recipients.push(c.clone()));
        if recipients.len() < PARALLEL_FAN_OUT {
            return hand(&recipients);
        }
        use rayon::prelude::*;
        fan_out_pool().install(|| {
            recipients
                .par_chunks(FAN_OUT_CHUNK)
                .map(hand)
                .reduce(DispatchOutcome::default, DispatchOutcome::add)
        })
    }

    /// Calls `visit` for each local connection `envelope` is addressed to.
    fn for_each_recipient(&self, envelope: &Envelope, mut visit: impl FnMut(&ConnectionHandle)) {
        let name = &envelope.tenant;
        match &envelope.target {
            Target::Users(users) => {
                for user in users {
                    self.sessions.for_each_of_user(name, user, &mut visit);
                }
            }
            Target::Topic(topic) => self.sessions.for_each_of_topic(name, topic, &mut visit),
            Target::Broadcast => self.sessions.for_each_of_tenant(name, &mut visit),
        }
    }

    /// Queues `envelope`'s frame to each local recipient the way `route`
    /// says, keeps it in the tenant's history, and records metrics. The
    /// history is held throughout: a client resuming meanwhile gets the
    /// message either from the history or live (see `recovery`).
    fn deliver(&self, envelope: &Arc<Envelope>, route: Route) {
        let snapshot = self.tenants.snapshot();
        let Some(tenant) = snapshot.get(&envelope.tenant) else {
            tracing::debug!(tenant = %envelope.tenant, id = %envelope.id, "message for an unknown tenant");
            return;
        };
        let history = self.sessions.history.tenant(&tenant.name);
        let mut kept = history.lock();
        if envelope.is_marker() {
            // In order with the tenant's messages, under the history lock
            // that live delivery holds: see `recovery`.
            self.sessions.history.marker_dispatched(envelope);
            return;
        }
        let frame = match message_frame(envelope) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::warn!(id = %envelope.id, %err, "message with invalid JSON data dropped");
                return;
            }
        };
        let mut outcome = DispatchOutcome::default();
        let plugin = match route {
            Route::Direct => None,
            Route::ThroughPlugin | Route::PluginSkipped => {
                self.plugins.hook(&tenant.name, Hook::OnDeliver)
            }
        };
        let fail_open = tenant.config.plugin.failure_policy == FailurePolicy::Open;
        match plugin {
            Some(plugins) if route == Route::ThroughPlugin => {
                let mut recipients = Vec::new();
                self.for_each_recipient(envelope, |c| recipients.push(c.clone()));
                let message = crate::delivery::plugin_message(envelope);
                let fallback = if fail_open {
                    DeliverVerdict::Pass
                } else {
                    DeliverVerdict::Drop
                };
                for (plugin, recipients) in plugins.split_by_user(recipients, |c| c.user()) {
                    for batch in recipients.chunks(DELIVER_BATCH) {
                        let personal = Personal {
                            tenant,
                            plugin,
                            shadow: plugins.shadow.as_ref(),
                            envelope,
                            message: &message,
                            frame: &frame,
                            fallback: &fallback,
                        };
                        personal.deliver(batch, &mut outcome);
                    }
                }
            }
            Some(_) if !fail_open => self.for_each_recipient(envelope, |_| {
                outcome.dropped_by_plugin += 1;
            }),
            _ => outcome = self.fan_out(envelope, &frame),
        }
        if let Some(position) = envelope.position.get() {
            let histories = &self.sessions.history;
            kept.append(
                histories,
                *position,
                envelope,
                &frame,
                &tenant.config.history,
            );
            let (messages, bytes) = kept.size();
            tenant.metrics.history_messages.set(messages as f64);
            tenant.metrics.history_bytes.set(bytes as f64);
        }
        drop(kept);
        history.notify_advanced();
        record(tenant, envelope, outcome);
    }
}

/// Records one message's delivery in the tenant's metrics.
fn record(tenant: &Tenant, envelope: &Envelope, outcome: DispatchOutcome) {
    let metrics = &tenant.metrics;
    metrics.delivered.increment(outcome.queued);
    if outcome.overflowed > 0 {
        metrics.dropped_queue_full.increment(outcome.overflowed);
        metrics.queue_overflows.increment(outcome.overflowed);
    }
    if outcome.gone > 0 {
        metrics.dropped_connection_gone.increment(outcome.gone);
    }
    if outcome.dropped_by_plugin > 0 {
        metrics
            .dropped_by_plugin
            .increment(outcome.dropped_by_plugin);
    }
    if outcome == DispatchOutcome::default() {
        metrics.dropped_no_recipient.increment(1);
    }
    let waited = now_micros().saturating_sub(envelope.published_at_micros);
    metrics
        .delivery_latency
        .record(Duration::from_micros(waited).as_secs_f64());
}

/// One message on its way through a tenant's `on-deliver` plugin.
pub(super) struct Personal<'a> {
    pub(super) tenant: &'a Tenant,
    /// The version serving these recipients (the active one, or a canary).
    pub(super) plugin: &'a CompiledPlugin,
    /// A shadow version, handed a copy of each call.
    pub(super) shadow: Option<&'a Shadow>,
    pub(super) envelope: &'a Envelope,
    /// The plugin's view of the message, built once for all batches.
    pub(super) message: &'a crate::plugin::Message,
    /// The shared frame, for recipients whose verdict is `pass`.
    pub(super) frame: &'a WireFrame,
    /// The tenant's failure policy, as a verdict for a failed call.
    pub(super) fallback: &'a DeliverVerdict,
}

impl Personal<'_> {
    /// Runs the hook for one batch of recipients and queues what it
    /// decided: the shared frame, nothing, or a frame of their own.
    pub(super) fn deliver(&self, batch: &[ConnectionHandle], outcome: &mut DispatchOutcome) {
        // Sessions with equal metadata share one allocation: each distinct
        // set crosses into the plugin once, and recipients refer to it.
        let mut profile_of: HashMap<*const Metadata, u32> = HashMap::new();
        let mut profiles: Vec<Vec<(String, String)>> = Vec::new();
        let recipients: Vec<Recipient> = batch
            .iter()
            .map(|c| {
                let profile = *profile_of
                    .entry(Arc::as_ptr(c.metadata()))
                    .or_insert_with(|| {
                        profiles.push(
                            c.metadata()
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        );
                        (profiles.len() - 1) as u32
                    });
                Recipient {
                    user: c.user().to_string(),
                    profile,
                }
            })
            .collect();
        let settings = &self.tenant.plugin_settings;
        let verdicts = self
            .plugin
            .on_deliver(settings, self.message, &profiles, &recipients);
        if let Some(shadow) = self.shadow {
            shadow.on_deliver(settings, self.message, profiles, recipients, &verdicts);
        }
        let verdicts = verdicts.unwrap_or_else(|_| vec![self.fallback.clone(); batch.len()]);
        for (connection, verdict) in batch.iter().zip(verdicts) {
            let own_frame = match verdict {
                DeliverVerdict::Pass => Some(self.frame.clone()),
                DeliverVerdict::Drop => None,
                // Checked in the call: JSON within max_message_bytes.
                DeliverVerdict::Replace(data) => match frame_with_data(self.envelope, &data) {
                    Ok(own) => Some(own),
                    Err(_) => {
                        matches!(self.fallback, DeliverVerdict::Pass).then(|| self.frame.clone())
                    }
                },
            };
            match own_frame {
                Some(own) => outcome.count(connection.enqueue(own)),
                None => outcome.dropped_by_plugin += 1,
            }
        }
    }
}
