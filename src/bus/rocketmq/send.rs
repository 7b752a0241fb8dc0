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
use rocketmq_model::common::message::message_single;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::Shared;
use super::readiness::RECEIVE_AFTER_RECOVERY;
use crate::bus::BusError;
use crate::bus::envelope::encode_probe;
use crate::metrics;

/// Send jobs waiting for the batcher before publishers wait.
pub(super) const SEND_QUEUE: usize = 4_096;
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
    /// The control queue, one batch at a time (control events, in order).
    Control,
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
    pub(super) records: Vec<Vec<u8>>,
    pub(super) bytes: usize,
    pub(super) route: Route,
    pub(super) reply: oneshot::Sender<Result<(), BusError>>,
    pub(super) claim: Arc<Claim>,
}

/// The started producer, shared by the batches in flight.
pub(super) struct Ready {
    pub(super) producer: DefaultMQProducer,
    pub(super) control_queue: MessageQueue,
    pub(super) queues: Vec<MessageQueue>,
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
        let queues = shared
            .queues
            .load(std::sync::atomic::Ordering::Acquire)
            .max(1);
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
        let Some(producer) = ready.load_full() else {
            let reason = shared
                .readiness
                .not_connected()
                .unwrap_or_else(|| "the bus is not connected".to_owned());
            for job in batch {
                let _ = job.reply.send(Err(BusError::Unavailable(reason.clone())));
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
            send_batch(&shared, &producer, batch).await;
            drop(permit);
        });
    }
}

async fn send_batch(shared: &Arc<Shared>, ready: &Ready, batch: Vec<SendJob>) {
    let topic = shared.config.topic.as_str();
    let message = |record: &Vec<u8>| {
        message_single::Message::builder()
            .topic(topic)
            .body_slice(record)
            .build_unchecked()
    };
    let messages: Vec<message_single::Message> = batch
        .iter()
        .flat_map(|job| job.records.iter().map(message))
        .collect();
    let route = batch.first().map_or(Route::Any, |job| job.route);
    let started = Instant::now();
    let send = async {
        match route {
            Route::Any => ready.producer.send_batch(messages).await.map(drop),
            Route::Keyed(key) if !ready.queues.is_empty() => {
                let queue = &ready.queues[(key % ready.queues.len() as u64) as usize];
                ready
                    .producer
                    .send_batch_to_queue(messages, queue.clone())
                    .await
                    .map(drop)
            }
            Route::Keyed(_) => ready.producer.send_batch(messages).await.map(drop),
            Route::Control => ready
                .producer
                .send_batch_to_queue(messages, ready.control_queue.clone())
                .await
                .map(drop),
            Route::Every => {
                let mut sent = Ok(());
                for queue in &ready.queues {
                    sent = ready
                        .producer
                        .send_batch_to_queue(messages.clone(), queue.clone())
                        .await
                        .map(drop);
                    if sent.is_err() {
                        break;
                    }
                }
                sent
            }
        }
        .map_err(|err| err.to_string())
    };
    // The client bounds each attempt by the send timeout; this bounds the
    // whole, retries included, so that every caller hears back.
    let limit = shared.config.send_timeout * 3;
    let Ok(result) = tokio::time::timeout(limit, send).await else {
        // The batch may be stored all the same: say so, not "refused".
        let err = format!("no answer from the broker within {limit:?}");
        tracing::warn!(%err, "RocketMQ send without an answer");
        ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).increment(1);
        let _ = shared.readiness.sent(Err(&err));
        shared.renew_producer.notify_one();
        for job in batch {
            let _ = job.reply.send(Err(BusError::Unknown(err.clone())));
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
            tracing::warn!(%err, messages = batch.iter().map(|j| j.records.len()).sum::<usize>(), "RocketMQ send failed");
            ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).increment(1);
            let _ = shared.readiness.sent(Err(&err));
            shared.renew_producer.notify_one();
            Err(BusError::Unavailable(format!(
                "RocketMQ did not take the message: {err}"
            )))
        }
    };
    for job in batch {
        let _ = job.reply.send(outcome.clone());
    }
}

/// Announces this node with probes: quickly until its own probe came
/// back (the readiness probe), then every `heartbeat_interval`. Other
/// nodes learn from them that this node is alive.
pub(super) async fn probe_loop(shared: Arc<Shared>, jobs: mpsc::Sender<SendJob>) {
    loop {
        let record = encode_probe(&shared.instance, shared.started_at_micros);
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
        tokio::time::sleep(pause).await;
    }
}
