//! The RocketMQ bus engine: every node publishes to one topic and consumes
//! it in broadcasting mode, so each node sees every message and delivers
//! it to the connections it holds — or, with `route_to_holders`, only the
//! messages tagged for it or for every node (see [`routing`]; a resume
//! then reads what it missed back from the broker, see [`read_back`]).
//!
//! The client runs on its own thread and runtime (it owns both, as the
//! client library requires); the node talks to it over channels:
//!
//! - [`client`]: the client's thread, producer and consumer start-up.
//! - [`send`]: batching sends; control records to one queue, in order.
//! - [`consume`]: handing on what the consumer receives, never dropping it;
//!   one consume thread keeps the order of each queue.
//! - [`routing`]: tags, copies and each node's subscription.
//! - [`read_back`]: a range of a queue read again, for resumes.
//! - [`readiness`]: the node publishes probes and is ready only once its
//!   own probe came back through its consumer (a fresh consumer starts at
//!   the newest offset about a second after it started), and only while
//!   probes keep coming back and sends succeed.
//! - Draining: a barrier sent to every queue, once back, proves that
//!   everything stored before it has been received.
//!
//! A broker or name server that is unreachable at start is retried until
//! it answers; the node meanwhile serves WebSocket clients, answers pushes
//! with 503 and `/readyz` with the reason.
//!
//! Coming back fast: the client refuses to reconnect to a broker for 30 s
//! after 5 failed connects (a breaker per address, per client instance,
//! that no setting reaches), and a pull in flight when the broker died
//! hangs until its own 30 s timeout. So the engine renews what is stuck:
//! a failed send has the producer replaced by a fresh client instance (at
//! most once a second); a consumer that stopped receiving this node's own
//! probes while sends succeed is replaced by a fresh one that resumes from
//! the old one's offsets (see [`client`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

use super::envelope::Position;
use super::envelope::{Envelope, encode_barrier, encode_control};
use super::{
    Bus, BusError, BusReceiver, BusStatus, ControlPosition, Destinations, EngineError,
    INBOUND_QUEUE, Inbound, NotTaken, ReadBack, ResumeControl, Router,
};
use crate::clock::now_micros;
use crate::config::RocketmqConfig;
use crate::metrics;
use crate::stable_hash::stable_hash;
use crate::sync::lock;

mod client;
mod consume;
mod read_back;
mod readiness;
mod routing;
mod send;

use client::{Engine, JobLanes};
use consume::{Barriers, Sinks};
use readiness::Readiness;
use routing::Outgoing;
use send::{Claim, Route, SEND_QUEUE, SendJob};

/// Tells this node's barriers apart.
static BARRIER_IDS: AtomicU64 = AtomicU64::new(0);

/// What the node and the client's thread share.
struct Shared {
    config: RocketmqConfig,
    instance: String,
    started_at_micros: u64,
    readiness: Readiness,
    /// Queues of the topic, once connected.
    queues: AtomicUsize,
    barriers: Barriers,
    /// Envelopes handed to the dispatcher so far.
    received: AtomicU64,
    /// Asks for a fresh producer (a send failed).
    renew_producer: tokio::sync::Notify,
    /// Asks for a fresh consumer (it stopped receiving).
    renew_consumer: tokio::sync::Notify,
    /// Brokers sends avoid for now.
    avoided: send::AvoidedBrokers,
    /// Where the first consumer starts reading control records; taken
    /// when it starts.
    resume: Mutex<Option<ResumeControl>>,
    /// The first message the consumer should read of the queue it resumes
    /// control records from, until one of that queue arrives.
    resumed_at: Mutex<Option<ControlPosition>>,
    /// True while `resumed_at` waits for its first message.
    resume_unchecked: std::sync::atomic::AtomicBool,
    /// The tag of messages for this node alone.
    own_tag: String,
    /// The consumer group this node consumes in (one of its own when it
    /// routes, see [`routing`]).
    consumer_group: String,
    /// A routing node reads every record at first, and only those tagged
    /// for it (or every node) once it saw no untagged one — from a node of
    /// an older version — for a while: then it reports that it routes.
    narrowed: std::sync::atomic::AtomicBool,
    /// An untagged record was read: a node of an older version runs.
    untagged_seen: std::sync::atomic::AtomicBool,
    /// Decides where pushes go, when this bus routes them.
    router: std::sync::OnceLock<Arc<dyn Router>>,
}

/// The RocketMQ engine as the node sees it.
pub struct RocketmqBus {
    shared: Arc<Shared>,
    /// Pushed messages' send jobs.
    jobs: mpsc::Sender<SendJob>,
    /// Control records' and barriers' send jobs.
    control_jobs: mpsc::Sender<SendJob>,
    /// Requests to read messages back from the broker.
    read_backs: mpsc::Sender<read_back::ReadBackJob>,
    dispatched: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RocketmqBus {
    /// Starts the engine's thread, which connects in the background. The
    /// dispatcher's queue holds `queue` envelopes. Returns the bus, the
    /// dispatcher's receiver, and what arrives for the cluster part:
    /// control records (this node's own included) and other nodes' probes.
    pub fn start(
        config: RocketmqConfig,
        instance: String,
        queue: usize,
        resume: ResumeControl,
    ) -> std::io::Result<(Self, BusReceiver, mpsc::Receiver<Inbound>)> {
        let (envelope_tx, envelope_rx) = mpsc::channel(queue);
        let (receiver, dispatched) = BusReceiver::new(envelope_rx, false);
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (jobs_tx, jobs_rx) = mpsc::channel(SEND_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(SEND_QUEUE);
        let (read_backs_tx, read_backs_rx) = mpsc::channel(SEND_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        let fresh_for = config.heartbeat_interval * 3 + config.send_timeout;
        let shared = Arc::new(Shared {
            readiness: Readiness::new(&instance, fresh_for),
            own_tag: routing::node_tag(&instance),
            consumer_group: routing::consumer_group(
                &config.consumer_group,
                &instance,
                config.route_to_holders,
            ),
            narrowed: std::sync::atomic::AtomicBool::new(false),
            untagged_seen: std::sync::atomic::AtomicBool::new(false),
            router: std::sync::OnceLock::new(),
            config,
            instance,
            started_at_micros: now_micros(),
            queues: AtomicUsize::new(0),
            barriers: Barriers::default(),
            received: AtomicU64::new(0),
            renew_producer: tokio::sync::Notify::new(),
            renew_consumer: tokio::sync::Notify::new(),
            avoided: send::AvoidedBrokers::default(),
            resume: Mutex::new(Some(resume)),
            resumed_at: Mutex::new(None),
            resume_unchecked: std::sync::atomic::AtomicBool::new(false),
        });
        ::metrics::gauge!(metrics::BUS_READY).set(0.0);
        ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).absolute(0);
        let engine = Engine {
            shared: shared.clone(),
            sinks: Sinks {
                envelopes: envelope_tx,
                inbound: inbound_tx,
            },
            control_jobs: control_tx.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pushgate-rocketmq".to_owned())
            .spawn(move || {
                let lanes = JobLanes {
                    messages: jobs_rx,
                    control: control_rx,
                    read_backs: read_backs_rx,
                };
                engine.run_on_own_runtime(lanes, stop_rx)
            })?;
        let bus = Self {
            shared,
            jobs: jobs_tx,
            control_jobs: control_tx,
            read_backs: read_backs_tx,
            dispatched,
            stop,
            thread: Mutex::new(Some(thread)),
        };
        Ok((bus, receiver, inbound_rx))
    }

    /// Sends `records` as one unit. With `withdraw_after`, a job the batcher
    /// has not taken by then is withdrawn (nothing is published); one it
    /// took is waited for until the broker answers (the batcher bounds that).
    async fn send(
        &self,
        records: Vec<Outgoing>,
        route: Route,
        withdraw_after: Option<Duration>,
    ) -> Result<(), BusError> {
        if let BusStatus::NotReady(reason) = self.shared.readiness.send_status() {
            return Err(NotTaken::NotReady(reason).into());
        }
        let bytes = records.iter().map(Outgoing::len).sum();
        let limit = self.shared.config.max_batch_bytes;
        if bytes > limit {
            return Err(BusError::TooLarge {
                size: bytes,
                limit,
                unit: "bytes (bus.rocketmq.max_batch_bytes)",
            });
        }
        let (reply, mut outcome) = oneshot::channel();
        let claim = Arc::new(Claim::default());
        let job = SendJob {
            records,
            bytes,
            route,
            reply,
            claim: claim.clone(),
        };
        let stopped = || BusError::from(NotTaken::Stopping);
        let lane = match route {
            Route::Any | Route::Keyed(_) => &self.jobs,
            Route::Control | Route::Log | Route::Every => &self.control_jobs,
        };
        let Some(withdraw_after) = withdraw_after else {
            lane.send(job).await.map_err(|_| stopped())?;
            return outcome.await.unwrap_or_else(|_| Err(stopped()));
        };
        let deadline = tokio::time::Instant::now() + withdraw_after;
        let not_taken = || BusError::from(NotTaken::NotWithin(withdraw_after));
        match tokio::time::timeout_at(deadline, lane.send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => return Err(not_taken()),
        }
        tokio::select! {
            answer = &mut outcome => answer.unwrap_or_else(|_| Err(stopped())),
            () = tokio::time::sleep_until(deadline) => {
                if claim.withdraw() {
                    return Err(not_taken());
                }
                outcome.await.unwrap_or_else(|_| Err(stopped()))
            }
        }
    }

    /// Publishes records already in the wire form, as one batch and
    /// untagged (as every node reads them, and as a node of a version
    /// before routing sent them): for tools that speak the envelope format
    /// themselves (a replay tool, or a test playing a node of another
    /// version).
    pub async fn publish_raw(&self, records: Vec<Vec<u8>>) -> Result<(), BusError> {
        let records = records.into_iter().map(Outgoing::untagged).collect();
        self.send(records, Route::Any, None).await
    }
}

impl Bus for RocketmqBus {
    fn publish(
        &self,
        batch: Vec<Arc<Envelope>>,
        withdraw_after: Duration,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        // A batch is one tenant's (the push API's unit).
        let key = batch
            .first()
            .map_or(0, |e| stable_hash(e.tenant.as_bytes()));
        let router = self.shared.router.get();
        // Held until the broker answered: this node's routing report
        // counts this batch as routed by its view of now.
        let publishing = router.map(|router| router.publishing());
        let records = batch
            .iter()
            .flat_map(|envelope| {
                let destinations = router.as_ref().map_or(Destinations::Everywhere, |router| {
                    router.destinations(envelope)
                });
                Outgoing::for_envelope(envelope, &destinations)
            })
            .collect();
        async move {
            let sent = self
                .send(records, Route::Keyed(key), Some(withdraw_after))
                .await;
            drop(publishing);
            sent
        }
        .boxed()
    }

    fn announce(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<(), BusError>> {
        let records = records
            .iter()
            .map(|r| Outgoing::to_every_node(encode_control(r)))
            .collect();
        self.send(records, Route::Control, None).boxed()
    }

    fn append_to_log(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<(), BusError>> {
        let records = records
            .iter()
            .map(|r| Outgoing::to_every_node(encode_control(r)))
            .collect();
        self.send(records, Route::Log, None).boxed()
    }

    fn reaches_other_nodes(&self) -> bool {
        true
    }

    fn routes(&self) -> bool {
        self.shared.router.get().is_some()
    }

    fn mark(&self, marker: Envelope) -> BoxFuture<'_, Result<(), BusError>> {
        let key = stable_hash(marker.tenant.as_bytes());
        let records = vec![Outgoing::to_node(marker.encode(), &self.shared.instance)];
        self.send(records, Route::Keyed(key), None).boxed()
    }

    fn read_back(
        &self,
        since: Position,
        through: u64,
    ) -> BoxFuture<'_, Result<ReadBack, BusError>> {
        async move {
            let (reply, answer) = oneshot::channel();
            let job = read_back::ReadBackJob {
                stream: since.stream,
                after: since.offset,
                through,
                reply,
            };
            let stopped = || BusError::from(NotTaken::Stopping);
            self.read_backs.send(job).await.map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?.map_err(|err| {
                let cause = EngineError(Arc::new(std::io::Error::other(err)));
                BusError::from(NotTaken::Refused(cause))
            })
        }
        .boxed()
    }

    fn route_with(&self, router: Arc<dyn Router>) -> bool {
        if !self.shared.config.route_to_holders {
            return false;
        }
        let _ = self.shared.router.set(router);
        true
    }

    /// Sends a barrier to every queue of the topic and waits until all its
    /// copies came back: each queue is consumed in order, so everything the
    /// broker stored before (from any node) has been received by then; then
    /// waits until that has been dispatched. Without a broker there is
    /// nothing more to wait for.
    fn drained(&self) -> BoxFuture<'_, ()> {
        async move {
            let shared = &self.shared;
            let id = BARRIER_IDS.fetch_add(1, Ordering::Relaxed);
            let barrier = Outgoing::to_node(encode_barrier(&shared.instance, id), &shared.instance);
            if let Err(err) = self.send(vec![barrier], Route::Every, None).await {
                tracing::warn!(%err, "drain: no barrier through the broker; not waiting for it");
                return;
            }
            let queues = shared.queues.load(Ordering::Acquire);
            shared.barriers.wait_for(id, queues).await;
            let target = shared.received.load(Ordering::Acquire);
            let mut dispatched = self.dispatched.clone();
            let _ = dispatched.wait_for(|count| *count >= target).await;
        }
        .boxed()
    }

    fn status(&self) -> BusStatus {
        self.shared.readiness.status()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            self.shared.readiness.stopping();
            self.stop.send_replace(true);
            let thread = lock(&self.thread).take();
            if let Some(thread) = thread {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        }
        .boxed()
    }

    fn engine(&self) -> &'static str {
        "rocketmq"
    }
}
