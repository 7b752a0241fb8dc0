//! Sending: every job waiting when the batcher is free goes out as one
//! RocketMQ batch (up to `max_batch_messages`/`max_batch_bytes`,
//! `max_batches_in_flight` batches at once); a job's caller hears `Ok` only
//! after the broker stored its batch. Control records go to one fixed
//! queue, one batch at a time, so that every node applies them in the order
//! they were made. Probes go the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::{MessageTrait, message_single};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::Shared;
use super::readiness::RECEIVE_AFTER_RECOVERY;
use super::routing::Outgoing;
use crate::bus::envelope::encode_probe;
use crate::bus::{BusError, EngineError, NoAnswer, NotTaken};
use crate::metrics;

/// Send jobs waiting for the batcher before publishers wait.
pub(super) const SEND_QUEUE: usize = 4_096;
/// Least time between two probes of a routing node: a node applying a
/// ramp of other nodes' connection announcements probes early, and every
/// node reads every probe, so at most ten a second each.
const EARLY_PROBE_SPACING: std::time::Duration = std::time::Duration::from_millis(100);
/// Probe period until the node's own first probe came back.
const FIRST_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Which queues of the topic a send goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Any queue the producer picks (raw records from tools).
    Any,
    /// The queue this key picks (a tenant's hash: all of a tenant's
    /// messages go to one queue, so that every node sees them in one order
    /// and gives them the same positions).
    Keyed(u64),
    /// The control queue, one batch at a time (control events, in order):
    /// the first live queue.
    Control,
    /// The control log: the topic's first queue (of the first broker group
    /// by name) whether or not its broker is live — admin changes stay on
    /// the one queue a restarted node resumes reading, and are refused
    /// while its broker is down rather than sent where nobody resumes.
    Log,
    /// Every queue, one copy each (a drain's barrier).
    Every,
}

impl Route {
    /// Whether jobs of `self` and `other` may share a batch (a batch goes
    /// to one queue) when the topic has `queues` queues.
    fn same_queue(self, other: Route, queues: usize) -> bool {
        match (self, other) {
            (Route::Keyed(a), Route::Keyed(b)) => a % queues as u64 == b % queues as u64,
            (a, b) => a == b,
        }
    }
}

/// Records to send as one unit, and who waits for the outcome.
/// Who has a job: still its caller (who may withdraw it), or the batcher
/// (who sends it; the caller then waits for the answer, whatever it is).
#[derive(Debug, Default)]
pub(super) struct Claim(AtomicU8);

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

impl Claim {
    /// The batcher takes the job; false if its caller withdrew it.
    fn take(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The caller withdraws the job; false if it is already being sent.
    pub(super) fn withdraw(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

pub(super) struct SendJob {
    pub(super) records: Vec<Outgoing>,
    pub(super) bytes: usize,
    pub(super) route: Route,
    pub(super) reply: oneshot::Sender<Result<(), BusError>>,
    pub(super) claim: Arc<Claim>,
}

/// The started producer, shared by the batches in flight.
pub(super) struct Ready {
    pub(super) producer: DefaultMQProducer,
    /// Every queue of the topic, in the same order on every node (broker
    /// name, then queue id).
    pub(super) queues: Vec<MessageQueue>,
}

impl Ready {
    /// The queues of brokers that sends do not avoid now; all of them if
    /// every broker is avoided (a send may as well try).
    pub(super) fn live_queues(&self, avoided: &AvoidedBrokers) -> Vec<&MessageQueue> {
        let live = avoided.not_avoided(&self.queues);
        if live.is_empty() {
            self.queues.iter().collect()
        } else {
            live
        }
    }

    /// True if a broker other than `broker` is not avoided now.
    fn other_broker_live(&self, broker: &str, avoided: &AvoidedBrokers) -> bool {
        avoided
            .not_avoided(&self.queues)
            .iter()
            .any(|queue| queue.broker_name() != broker)
    }

    /// The queue a keyed or control send goes to now: the key's among the
    /// live queues (a tenant keeps its queue while its broker lives), or
    /// the first live one for control records.
    fn queue_for(&self, route: Route, avoided: &AvoidedBrokers) -> Option<MessageQueue> {
        let live = self.live_queues(avoided);
        let index = match route {
            Route::Keyed(key) => (key % live.len().max(1) as u64) as usize,
            Route::Control => 0,
            Route::Log => return self.queues.first().cloned(),
            Route::Any | Route::Every => return None,
        };
        live.get(index).map(|queue| (*queue).clone())
    }
}

/// How long sends avoid a broker after one to it failed: then the next
/// send tries it again (and, if it fails, goes elsewhere).
const AVOID_BROKER_FOR: std::time::Duration = std::time::Duration::from_secs(10);
/// A send without an answer this long (they take milliseconds) has its
/// broker avoided by the next batches while it waits for its own answer —
/// when another broker group is live. The client answers a send to a
/// broker that died only at the send timeout.
const SLOW_SEND: std::time::Duration = std::time::Duration::from_millis(500);

/// Brokers sends avoid for a while: a send to one failed (it is down, or
/// the client will not reconnect to it yet). With several broker groups,
/// their queues take the sends meanwhile.
#[derive(Default)]
pub(super) struct AvoidedBrokers(std::sync::Mutex<std::collections::HashMap<String, Avoided>>);

/// Since when a broker is avoided, and whether a send to it failed (not
/// only took long).
struct Avoided {
    since: Instant,
    failed: bool,
}

impl AvoidedBrokers {
    /// Avoids `broker`: a send to it `failed`, or has no answer yet long
    /// after sends usually have one.
    fn avoid(&self, broker: &str, failed: bool) {
        let mut avoided = crate::sync::lock(&self.0);
        if !avoided.contains_key(broker) {
            tracing::warn!(
                broker,
                "sends avoid this RocketMQ broker for {AVOID_BROKER_FOR:?}: a send to it failed"
            );
            ::metrics::counter!(metrics::BUS_BROKER_FAILOVERS, "broker" => broker.to_owned())
                .increment(1);
        }
        let failed = failed || avoided.get(broker).is_some_and(|a| a.failed);
        avoided.insert(
            broker.to_owned(),
            Avoided {
                since: Instant::now(),
                failed,
            },
        );
    }

    /// The queues of `queues` whose broker is not avoided now (one look
    /// at the table for all of them).
    fn not_avoided<'q>(&self, queues: &'q [MessageQueue]) -> Vec<&'q MessageQueue> {
        let avoided = crate::sync::lock(&self.0);
        queues
            .iter()
            .filter(|queue| {
                avoided
                    .get(queue.broker_name().as_str())
                    .is_none_or(|avoided| avoided.since.elapsed() >= AVOID_BROKER_FOR)
            })
            .collect()
    }

    /// A send to `broker` succeeded; true if a send to it had failed
    /// before (it is back).
    fn reached(&self, broker: &str) -> bool {
        let mut avoided = crate::sync::lock(&self.0);
        if avoided.is_empty() {
            return false;
        }
        avoided.remove(broker).is_some_and(|a| a.failed)
    }
}

/// Takes every job waiting and sends them in as few batches as the limits
/// allow, at most `batches_in_flight` at once; answers each job once its
/// batch was stored or failed.
///
/// There is one batcher per lane of jobs: pushed messages on one; control
/// records, barriers and probes on the other (one batch at a time keeps
/// control records in order). Neither waits behind the other's batch in
/// flight: a probe to a frozen broker does not hold pushes up, nor a slow
/// push batch the probes that tell readiness.
pub(super) async fn batch_loop(
    shared: Arc<Shared>,
    ready: Arc<ArcSwapOption<Ready>>,
    mut jobs: mpsc::Receiver<SendJob>,
    batches_in_flight: usize,
) {
    let in_flight = Arc::new(Semaphore::new(batches_in_flight));
    let mut carried: Option<SendJob> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let route = first.route;
        let mut count = first.records.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        let current = ready.load_full();
        let queues = current
            .as_ref()
            .map_or(1, |ready| ready.live_queues(&shared.avoided).len().max(1));
        while let Ok(job) = jobs.try_recv() {
            let fits = route.same_queue(job.route, queues)
                && route != Route::Every
                && count + job.records.len() <= shared.config.max_batch_messages
                && bytes + job.bytes <= shared.config.max_batch_bytes;
            if !fits {
                carried = Some(job);
                break;
            }
            count += job.records.len();
            bytes += job.bytes;
            batch.push(job);
        }
        let Some(producer) = current else {
            let reason = shared
                .readiness
                .not_connected()
                .unwrap_or_else(|| "the bus is not connected".to_owned());
            for job in batch {
                let _ = job
                    .reply
                    .send(Err(NotTaken::NotReady(reason.clone()).into()));
            }
            continue;
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // From here on a job is sent: its caller can no longer withdraw it.
        batch.retain(|job| job.claim.take());
        if batch.is_empty() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut permit = Some(permit);
            send_batch(&shared, &producer, batch, &mut permit).await;
        });
    }
}

/// Sends `batch` and answers its jobs; `in_flight` is its place among the
/// batches in flight, given up early when its broker is slow to answer.
async fn send_batch(
    shared: &Arc<Shared>,
    ready: &Ready,
    batch: Vec<SendJob>,
    in_flight: &mut Option<OwnedSemaphorePermit>,
) {
    let topic = shared.config.topic.as_str();
    let message = |record: &Outgoing| {
        let mut builder = message_single::Message::builder()
            .topic(topic)
            .body_slice(&record.body);
        if let Some(tag) = &record.tag {
            builder = builder.tags(tag.as_ref());
        }
        let mut message = builder.build_unchecked();
        if let Some((name, copy)) = record.copy_property() {
            message.put_property(name.into(), copy.into());
        }
        message
    };
    let messages: Vec<message_single::Message> = batch
        .iter()
        .flat_map(|job| job.records.iter().map(message))
        .collect();
    let route = batch.first().map_or(Route::Any, |job| job.route);
    let started = Instant::now();
    let send = async {
        match route {
            Route::Any => ready
                .producer
                .send_batch(messages)
                .await
                .map(drop)
                .map_err(send_failure),
            Route::Keyed(_) | Route::Control | Route::Log => {
                send_to_live_queue(shared, ready, route, messages, in_flight).await
            }
            Route::Every => {
                let live: Vec<MessageQueue> = ready
                    .live_queues(&shared.avoided)
                    .into_iter()
                    .cloned()
                    .collect();
                shared.queues.store(live.len(), Ordering::Release);
                let mut sent = Ok(());
                for queue in live {
                    sent = send_to(shared, ready, &queue, messages.clone(), in_flight).await;
                    if sent.is_err() {
                        break;
                    }
                }
                sent
            }
        }
    };
    // The client bounds each attempt by the send timeout; this bounds the
    // whole, retries included, so that every caller hears back.
    let limit = shared.config.send_timeout * 3;
    let Ok(result) = tokio::time::timeout(limit, send).await else {
        // The batch may be stored all the same: say so, not "refused".
        let err = BusError::from(NoAnswer::TimedOut(limit));
        tracing::warn!(%err, "RocketMQ send without an answer");
        ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).increment(1);
        let _ = shared.readiness.sent(Err(&err.to_string()));
        shared.renew_producer.notify_one();
        for job in batch {
            let _ = job.reply.send(Err(err.clone()));
        }
        return;
    };
    ::metrics::histogram!(metrics::BUS_SEND_DURATION).record(started.elapsed().as_secs_f64());
    let outcome = match result {
        Ok(_) => {
            if shared.readiness.sent(Ok(())) {
                // The broker is back: the consumer must receive again soon.
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RECEIVE_AFTER_RECOVERY).await;
                    if shared.readiness.consumer_stalled() {
                        shared.renew_consumer.notify_one();
                    }
                });
            }
            Ok(())
        }
        Err(err) => {
            // `Unknown` when the request may have reached the broker: a
            // retry with the same idempotency key is safe, a "not taken"
            // is not.
            let maybe_stored = matches!(err, BusError::Unknown(_));
            tracing::warn!(%err, maybe_stored, messages = batch.iter().map(|j| j.records.len()).sum::<usize>(), "RocketMQ send failed");
            ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).increment(1);
            let _ = shared.readiness.sent(Err(&err.to_string()));
            shared.renew_producer.notify_one();
            Err(err)
        }
    };
    for job in batch {
        let _ = job.reply.send(outcome.clone());
    }
}

/// Sends `messages` to `queue`; a failure has its broker avoided, a
/// success after one has the consumer renewed (its pulls from that broker
/// may be held by the client's reconnection breaker).
async fn send_to(
    shared: &Arc<Shared>,
    ready: &Ready,
    queue: &MessageQueue,
    messages: Vec<message_single::Message>,
    in_flight: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), BusError> {
    let send = ready.producer.send_batch_to_queue(messages, queue.clone());
    tokio::pin!(send);
    let result = tokio::select! {
        result = &mut send => result,
        () = tokio::time::sleep(SLOW_SEND) => {
            // Never sent twice: this batch waits for its answer, the next
            // ones (free to go: its place in flight is given up) go to the
            // other brokers' queues.
            if ready.other_broker_live(queue.broker_name(), &shared.avoided) {
                shared.avoided.avoid(queue.broker_name(), false);
                in_flight.take();
            }
            send.await
        }
    };
    match result {
        Ok(_) => {
            if shared.avoided.reached(queue.broker_name()) {
                tracing::info!(broker = %queue.broker_name(), "RocketMQ broker reached again");
                shared.renew_consumer.notify_one();
            }
            Ok(())
        }
        Err(err) => {
            shared.avoided.avoid(queue.broker_name(), true);
            // A fresh client instance reconnects at once when the broker
            // is back (this one's breaker may hold it for 30 s).
            shared.renew_producer.notify_one();
            Err(send_failure(err))
        }
    }
}

/// What a failed send means: [`NotTaken`] only for errors that prove
/// nothing was stored — no connection, no route, the broker's own refusal;
/// otherwise (no answer, a connection lost while waiting) the request may
/// have reached the broker and the outcome is unknown ([`NoAnswer`]).
fn send_failure(err: rocketmq_client_rust::ClientError) -> BusError {
    let not_sent = {
        let code = err.descriptor().code().as_str();
        [
            "transport.connection.",
            "transport.dns.",
            "transport.endpoint.",
            "transport.remote.rate_limited",
            "rpc.broker_address.",
            "client.lifecycle.",
            "client.component.",
        ]
        .iter()
        .any(|prefix| code.starts_with(prefix))
            // The broker answered: it refused, and stored nothing.
            || err.broker_response_code().is_some()
    };
    let cause = EngineError(Arc::new(err));
    if not_sent {
        NotTaken::Refused(cause).into()
    } else {
        NoAnswer::Lost(cause).into()
    }
}

/// Sends a keyed or control batch to its queue among the live ones; if
/// that broker fails it, once more to the queue the route has among the
/// others (with a single broker group there is none: the failure stands).
async fn send_to_live_queue(
    shared: &Arc<Shared>,
    ready: &Ready,
    route: Route,
    messages: Vec<message_single::Message>,
    in_flight: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), BusError> {
    let Some(queue) = ready.queue_for(route, &shared.avoided) else {
        return Err(NotTaken::NoQueue.into());
    };
    let first = match send_to(shared, ready, &queue, messages.clone(), in_flight).await {
        Ok(()) => return Ok(()),
        Err(failure) => failure,
    };
    if route == Route::Log {
        return Err(match first {
            BusError::Unavailable(NotTaken::Refused(cause)) => NotTaken::LogBrokerDown {
                broker: queue.broker_name().to_string(),
                cause,
            }
            .into(),
            other => other,
        });
    }
    match ready.queue_for(route, &shared.avoided) {
        Some(other) if other.broker_name() != queue.broker_name() => {
            send_to(shared, ready, &other, messages, in_flight)
                .await
                // Unknown if the first broker may have stored it.
                .map_err(|second| match first {
                    BusError::Unknown(_) if !matches!(second, BusError::Unknown(_)) => first,
                    _ => second,
                })
        }
        _ => Err(first),
    }
}

/// Announces this node with probes: quickly until its own probe came
/// back (the readiness probe), then every `heartbeat_interval`. Other
/// nodes learn from them that this node is alive.
pub(super) async fn probe_loop(shared: Arc<Shared>, jobs: mpsc::Sender<SendJob>) {
    loop {
        // A routing node says it routes once it reads only its own.
        let routing = shared
            .router
            .get()
            .filter(|_| shared.narrowed.load(Ordering::Acquire))
            .map(|router| router.report());
        let record = Outgoing::to_every_node(encode_probe(
            &shared.instance,
            shared.started_at_micros,
            routing,
        ));
        let (reply, outcome) = oneshot::channel();
        let job = SendJob {
            bytes: record.len(),
            records: vec![record],
            route: Route::Control,
            reply,
            claim: Arc::default(),
        };
        if jobs.send(job).await.is_err() {
            return;
        }
        let _ = outcome.await;
        shared.readiness.observe();
        if shared.readiness.consumer_stalled() {
            shared.renew_consumer.notify_one();
        }
        let pause = if shared.readiness.has_received_own_probe() {
            shared.config.heartbeat_interval
        } else {
            FIRST_PROBE_INTERVAL
        };
        match shared.router.get() {
            // Early when a connection may wait for this node's fence (see
            // `Router::probe_soon`), never twice within the spacing.
            Some(router) => {
                tokio::time::sleep(EARLY_PROBE_SPACING).await;
                let notified = router.probe_soon().notified();
                if tokio::time::timeout(pause, notified).await.is_ok() {
                    ::metrics::counter!(crate::metrics::BUS_EARLY_PROBES).increment(1);
                }
            }
            None => tokio::time::sleep(pause).await,
        }
    }
}
