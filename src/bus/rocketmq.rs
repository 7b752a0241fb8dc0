//! The RocketMQ bus engine: every node publishes to one topic and consumes
//! all of it in broadcasting mode, so each node sees every message and
//! delivers it to the connections it holds.
//!
//! The client runs on its own thread and runtime (it owns both, as the
//! client library requires); the node talks to it over channels:
//!
//! - **Publishing.** Push requests queue send jobs; a batcher takes every
//!   job waiting when it is free and sends them as one RocketMQ batch (up
//!   to `max_batch_messages`/`max_batch_bytes`, `max_batches_in_flight`
//!   batches at once). A job's caller hears `Ok` only after the broker
//!   stored its batch. Control events go to one fixed queue, one batch at
//!   a time, so that every node applies them in the order they were made.
//! - **Consuming.** The listener decodes each message and hands it to the
//!   dispatcher's bounded queue, blocking (on the client's blocking lane)
//!   while that queue is full: it never drops a message and never reports
//!   a failure, which in broadcasting mode would drop it. One consume
//!   thread keeps the order of each queue.
//! - **Draining.** A barrier sent to every queue, once back, proves that
//!   everything stored before it has been received.
//! - **Readiness.** The node publishes a heartbeat and is ready only once
//!   its own heartbeat came back through its consumer (a fresh consumer
//!   starts at the newest offset about a second after it started), and
//!   only while heartbeats keep coming back and sends succeed.
//!
//! A broker or name server that is unreachable at start is retried until
//! it answers; the node meanwhile serves WebSocket clients, answers pushes
//! with 503 and `/readyz` with the reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer,
    MessageListenerConcurrently, TelemetryHandle,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message as MqMessage;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};

use super::{Bus, BusError, BusReceiver, BusStatus};
use crate::config::RocketmqConfig;
use crate::control::{Change, ControlEvent};
use crate::envelope::{Envelope, Record, now_micros};
use crate::metrics;

/// Topic whose route lets a producer create topics (RocketMQ's default).
const CREATE_TOPIC_KEY: &str = "TBW102";
/// Messages handed to the listener at once.
const CONSUME_BATCH: u32 = 32;
/// Send jobs waiting for the batcher before publishers wait.
const SEND_QUEUE: usize = 4_096;
/// Control events waiting for the cluster module.
const CONTROL_QUEUE: usize = 1_024;
/// Longest pause between two attempts to reach the broker at start.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// Heartbeat period until the node's own first heartbeat came back.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Tells this node's barriers apart.
static BARRIER_IDS: AtomicU64 = AtomicU64::new(0);

/// Which queues of the topic a send goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Any queue the producer picks (messages).
    Any,
    /// The control queue, one batch at a time (control events, in order).
    Control,
    /// Every queue, one copy each (a drain's barrier).
    Every,
}

/// Records to send as one unit, and who waits for the outcome.
struct SendJob {
    records: Vec<Vec<u8>>,
    bytes: usize,
    route: Route,
    reply: oneshot::Sender<Result<(), BusError>>,
}

/// What the node and the client's thread share.
struct Shared {
    config: RocketmqConfig,
    instance: String,
    started_at_micros: u64,
    /// Why the engine is not running yet (`None` once it runs).
    connecting: Mutex<Option<String>>,
    /// The last send error, until a send succeeds again.
    send_failing: Mutex<Option<String>>,
    /// When this node's own heartbeat last came back.
    own_heartbeat: Mutex<Option<Instant>>,
    was_ready: AtomicBool,
    ever_ready: AtomicBool,
    /// Queues of the topic, once connected.
    queues: AtomicUsize,
    /// Copies of each of this node's barriers received back so far.
    barriers: Mutex<HashMap<u64, usize>>,
    barrier_seen: Notify,
    /// Envelopes handed to the dispatcher so far.
    received: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    fn status(&self) -> BusStatus {
        if self.stopping.load(Ordering::Acquire) {
            return BusStatus::NotReady("the bus is stopping".to_owned());
        }
        if let Some(reason) = lock(&self.connecting).clone() {
            return BusStatus::NotReady(reason);
        }
        if let Some(err) = lock(&self.send_failing).clone() {
            return BusStatus::NotReady(format!("publishing to RocketMQ fails: {err}"));
        }
        let fresh = self.config.heartbeat_interval * 3 + self.config.send_timeout;
        match *lock(&self.own_heartbeat) {
            None => BusStatus::NotReady(
                "waiting for this node's consumer to receive its first message".to_owned(),
            ),
            Some(at) if at.elapsed() > fresh => BusStatus::NotReady(format!(
                "this node's consumer received nothing for {:.1}s",
                at.elapsed().as_secs_f64()
            )),
            Some(_) => BusStatus::Ready,
        }
    }

    /// Updates the readiness metrics; counts a recovery once ready again.
    fn observe_readiness(&self) {
        let status = self.status();
        let ready = matches!(status, BusStatus::Ready);
        ::metrics::gauge!(metrics::BUS_READY).set(if ready { 1.0 } else { 0.0 });
        let before = self.was_ready.swap(ready, Ordering::AcqRel);
        if ready && !before {
            if self.ever_ready.swap(true, Ordering::AcqRel) {
                ::metrics::counter!(metrics::BUS_RECONNECTS).increment(1);
                tracing::info!("bus ready again");
            } else {
                tracing::info!(instance = %self.instance, "bus ready: this node receives its own messages");
            }
        } else if !ready
            && before
            && let BusStatus::NotReady(reason) = status
        {
            tracing::warn!(%reason, "bus not ready");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The RocketMQ engine as the node sees it.
pub struct RocketmqBus {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<SendJob>,
    dispatched: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RocketmqBus {
    /// Starts the engine's thread, which connects in the background. The
    /// dispatcher's queue holds `queue` envelopes. Returns the bus, the
    /// dispatcher's receiver and the control events from other nodes (and
    /// this node's own, which carry its origin).
    pub fn start(
        config: RocketmqConfig,
        instance: String,
        queue: usize,
    ) -> std::io::Result<(Self, BusReceiver, mpsc::Receiver<ControlEvent>)> {
        let (envelope_tx, envelope_rx) = mpsc::channel(queue);
        let (receiver, dispatched) = BusReceiver::new(envelope_rx);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (jobs_tx, jobs_rx) = mpsc::channel(SEND_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            instance,
            started_at_micros: now_micros(),
            connecting: Mutex::new(Some("connecting to RocketMQ".to_owned())),
            send_failing: Mutex::new(None),
            own_heartbeat: Mutex::new(None),
            was_ready: AtomicBool::new(false),
            ever_ready: AtomicBool::new(false),
            queues: AtomicUsize::new(0),
            barriers: Mutex::new(HashMap::new()),
            barrier_seen: Notify::new(),
            received: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        ::metrics::gauge!(metrics::BUS_READY).set(0.0);
        ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).absolute(0);
        let engine = Engine {
            shared: shared.clone(),
            sinks: Sinks {
                envelopes: envelope_tx,
                control: control_tx,
            },
            jobs: jobs_tx.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pushgate-rocketmq".to_owned())
            .spawn(move || engine.run_on_own_runtime(jobs_rx, stop_rx))?;
        let bus = Self {
            shared,
            jobs: jobs_tx,
            dispatched,
            stop,
            thread: Mutex::new(Some(thread)),
        };
        Ok((bus, receiver, control_rx))
    }

    async fn send(&self, records: Vec<Vec<u8>>, route: Route) -> Result<(), BusError> {
        if let BusStatus::NotReady(reason) = self.connecting_status() {
            return Err(BusError::Unavailable(reason));
        }
        let bytes = records.iter().map(Vec::len).sum();
        let limit = self.shared.config.max_batch_bytes;
        if bytes > limit {
            return Err(BusError::TooLarge(format!(
                "{bytes} bytes exceed bus.rocketmq.max_batch_bytes ({limit})"
            )));
        }
        let (reply, outcome) = oneshot::channel();
        let job = SendJob {
            records,
            bytes,
            route,
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| BusError::Unavailable("the bus stopped".to_owned()))?;
        outcome
            .await
            .unwrap_or_else(|_| Err(BusError::Unavailable("the bus stopped".to_owned())))
    }

    /// Publishes records already in the wire form, as one batch: for tools
    /// that speak the envelope format themselves (a replay tool, or a test
    /// playing a node of a newer version).
    pub async fn publish_raw(&self, records: Vec<Vec<u8>>) -> Result<(), BusError> {
        self.send(records, Route::Any).await
    }

    /// Not ready only for reasons that make a send pointless right away.
    fn connecting_status(&self) -> BusStatus {
        if self.shared.stopping.load(Ordering::Acquire) {
            return BusStatus::NotReady("the bus is stopping".to_owned());
        }
        match lock(&self.shared.connecting).clone() {
            Some(reason) => BusStatus::NotReady(reason),
            None => BusStatus::Ready,
        }
    }
}

impl Bus for RocketmqBus {
    fn publish(&self, batch: Vec<Arc<Envelope>>) -> BoxFuture<'_, Result<(), BusError>> {
        let records = batch.iter().map(|e| e.encode()).collect();
        self.send(records, Route::Any).boxed()
    }

    fn announce(&self, events: Vec<ControlEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        let records = events.iter().map(ControlEvent::encode).collect();
        self.send(records, Route::Control).boxed()
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
            let barrier = ControlEvent {
                origin: shared.instance.clone(),
                change: Change::Barrier { id },
            };
            if let Err(err) = self.send(vec![barrier.encode()], Route::Every).await {
                tracing::warn!(%err, "drain: no barrier through the broker; not waiting for it");
                return;
            }
            let queues = shared.queues.load(Ordering::Acquire);
            loop {
                let seen = shared.barrier_seen.notified();
                if lock(&shared.barriers).get(&id).copied().unwrap_or(0) >= queues {
                    break;
                }
                seen.await;
            }
            lock(&shared.barriers).remove(&id);
            let target = shared.received.load(Ordering::Acquire);
            let mut dispatched = self.dispatched.clone();
            let _ = dispatched.wait_for(|count| *count >= target).await;
        }
        .boxed()
    }

    fn status(&self) -> BusStatus {
        self.shared.status()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            self.shared.stopping.store(true, Ordering::Release);
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

/// Where the listener hands what it receives.
#[derive(Clone)]
struct Sinks {
    envelopes: mpsc::Sender<Arc<Envelope>>,
    control: mpsc::Sender<ControlEvent>,
}

/// The client side, on its own thread.
struct Engine {
    shared: Arc<Shared>,
    sinks: Sinks,
    /// Kept so that the heartbeat can queue sends like any publisher.
    jobs: mpsc::Sender<SendJob>,
}

/// A started producer and consumer.
struct Connected {
    producer: DefaultMQProducer,
    consumer: DefaultMQPushConsumer,
    control_queue: MessageQueue,
    queues: Vec<MessageQueue>,
}

impl Engine {
    fn run_on_own_runtime(self, jobs: mpsc::Receiver<SendJob>, stop: watch::Receiver<bool>) {
        let mut runtime_config = RuntimeConfig::for_parallelism(
            "pushgate-rocketmq",
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        );
        // The client runs consume calls on this lane and fails (in
        // broadcasting: drops) a batch it cannot queue there.
        runtime_config
            .blocking_lane_policies
            .metadata_io
            .max_queue_depth = 65_536;
        let owner = match RuntimeOwner::plan(runtime_config)
            .map_err(|err| err.to_string())
            .and_then(|plan| plan.build().map_err(|err| err.to_string()))
        {
            Ok(owner) => owner,
            Err(err) => {
                *lock(&self.shared.connecting) =
                    Some(format!("cannot start the RocketMQ client runtime: {err}"));
                tracing::error!(%err, "cannot start the RocketMQ client runtime");
                return;
            }
        };
        let client = match ClientRuntime::try_new(
            owner.root_context().component("pushgate-bus"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        ) {
            Ok(client) => client,
            Err(err) => {
                *lock(&self.shared.connecting) =
                    Some(format!("cannot start the RocketMQ client: {err}"));
                tracing::error!(%err, "cannot start the RocketMQ client");
                return;
            }
        };
        owner.block_on(self.run(client.clone(), jobs, stop));
        owner.block_on(async {
            let _ = client.shutdown().await;
        });
        let _ = owner.shutdown_runtime_blocking_with_timeout(Duration::from_secs(5));
    }

    async fn run(
        self,
        client: Arc<ClientRuntime>,
        jobs: mpsc::Receiver<SendJob>,
        mut stop: watch::Receiver<bool>,
    ) {
        let producer_slot: Arc<ArcSwapOption<Ready>> = Arc::new(ArcSwapOption::empty());
        let batcher = tokio::spawn(batch_loop(self.shared.clone(), producer_slot.clone(), jobs));
        let connected = tokio::select! {
            connected = self.connect_until_up(&client) => connected,
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let Some(Connected {
            producer,
            mut consumer,
            control_queue,
            queues,
        }) = connected
        else {
            batcher.abort();
            return;
        };
        self.shared.queues.store(queues.len(), Ordering::Release);
        *lock(&self.shared.connecting) = None;
        let ready = Arc::new(Ready {
            producer,
            control_queue,
            queues,
        });
        producer_slot.store(Some(ready.clone()));
        let heartbeat = tokio::spawn(heartbeat_loop(self.shared.clone(), self.jobs.clone()));
        let _ = stop.wait_for(|stop| *stop).await;

        // The node announced its departure before stopping the bus: what
        // is still queued now is answered "stopped".
        heartbeat.abort();
        batcher.abort();
        consumer.shutdown().await;
        producer_slot.store(None);
        if let Ok(mut ready) = Arc::try_unwrap(ready) {
            ready.producer.shutdown().await;
        }
    }

    /// Tries to start a producer and a consumer until both run.
    async fn connect_until_up(&self, client: &Arc<ClientRuntime>) -> Option<Connected> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.connect(client).await {
                Ok(connected) => {
                    tracing::info!(
                        instance = %self.shared.instance,
                        topic = %self.shared.config.topic,
                        "RocketMQ producer and broadcasting consumer started"
                    );
                    return Some(connected);
                }
                Err(err) => {
                    let reason = format!(
                        "cannot reach RocketMQ at {} (retrying): {err}",
                        self.shared.config.name_servers.join(";")
                    );
                    tracing::warn!(%reason);
                    *lock(&self.shared.connecting) = Some(reason);
                    ::metrics::counter!(metrics::BUS_CONNECT_FAILURES).increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
                }
            }
        }
    }

    async fn connect(&self, client: &Arc<ClientRuntime>) -> Result<Connected, String> {
        let config = &self.shared.config;
        let name_servers = config.name_servers.join(";");
        let mut client_config = ClientConfig::new();
        // Two nodes on one host would otherwise share one client id and
        // split the broadcast between them.
        client_config.set_instance_name(self.shared.instance.clone().into());
        let mut producer = DefaultMQProducer::builder(client.clone())
            .client_config(client_config.clone())
            .name_server_addr(name_servers.clone())
            .producer_group(config.producer_group.clone())
            .send_msg_timeout(config.send_timeout.as_millis() as u32)
            .retry_times_when_send_failed(1)
            .max_message_size(config.max_batch_bytes as u32 + 4096)
            .build();
        producer.start().await.map_err(|err| err.to_string())?;
        let queues = match self.ensure_topic(&mut producer).await {
            Ok(queues) => queues,
            Err(err) => {
                producer.shutdown().await;
                return Err(err);
            }
        };
        let all_queues = queues.clone();
        let control_queue = queues
            .into_iter()
            .min_by(|a, b| (a.broker_name(), a.queue_id()).cmp(&(b.broker_name(), b.queue_id())))
            .ok_or("the topic has no queue")?;

        let mut consumer = DefaultMQPushConsumer::builder(client.clone())
            .client_config(client_config)
            .name_server_addr(name_servers)
            .consumer_group(config.consumer_group.clone())
            .message_model(MessageModel::Broadcasting)
            // A (re)started node delivers what is pushed from now on; it
            // has no clients that missed older messages.
            .consume_from_where(ConsumeFromWhere::ConsumeFromLastOffset)
            .consume_thread_min(1)
            .consume_thread_max(1)
            .consume_message_batch_max_size(CONSUME_BATCH)
            .build();
        let started = async {
            consumer
                .subscribe(config.topic.as_str(), "*")
                .await
                .map_err(|err| err.to_string())?;
            consumer.register_message_listener_concurrently(Listener {
                shared: self.shared.clone(),
                sinks: self.sinks.clone(),
            });
            consumer.start().await.map_err(|err| err.to_string())
        }
        .await;
        if let Err(err) = started {
            consumer.shutdown().await;
            producer.shutdown().await;
            return Err(err);
        }
        Ok(Connected {
            producer,
            consumer,
            control_queue,
            queues: all_queues,
        })
    }

    /// The topic's queues, creating the topic first if the broker lacks it.
    async fn ensure_topic(
        &self,
        producer: &mut DefaultMQProducer,
    ) -> Result<Vec<MessageQueue>, String> {
        let config = &self.shared.config;
        if let Ok(queues) = producer.fetch_publish_message_queues(&config.topic).await
            && !queues.is_empty()
        {
            return Ok(queues);
        }
        producer
            .create_topic(
                CREATE_TOPIC_KEY,
                &config.topic,
                config.queues as i32,
                HashMap::new(),
            )
            .await
            .map_err(|err| format!("cannot create topic {:?}: {err}", config.topic))?;
        tracing::info!(topic = %config.topic, queues = config.queues, "topic created");
        // The name server learns of the new topic from the broker.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match producer.fetch_publish_message_queues(&config.topic).await {
                Ok(queues) if !queues.is_empty() => return Ok(queues),
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "topic {:?} was created but has no route yet",
                        config.topic
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// The started producer, shared by the batches in flight.
struct Ready {
    producer: DefaultMQProducer,
    control_queue: MessageQueue,
    queues: Vec<MessageQueue>,
}

/// Takes every job waiting and sends them in as few batches as the limits
/// allow; answers each job once its batch was stored or failed.
async fn batch_loop(
    shared: Arc<Shared>,
    ready: Arc<ArcSwapOption<Ready>>,
    mut jobs: mpsc::Receiver<SendJob>,
) {
    let in_flight = Arc::new(Semaphore::new(shared.config.max_batches_in_flight));
    // One control batch at a time keeps control events in order.
    let control_in_flight = Arc::new(Semaphore::new(1));
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
        while let Ok(job) = jobs.try_recv() {
            let fits = job.route == route
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
            let reason = lock(&shared.connecting)
                .clone()
                .unwrap_or_else(|| "the bus is not connected".to_owned());
            for job in batch {
                let _ = job.reply.send(Err(BusError::Unavailable(reason.clone())));
            }
            continue;
        };
        let permits = match route {
            Route::Any => &in_flight,
            Route::Control | Route::Every => &control_in_flight,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            send_batch(&shared, &producer, batch).await;
            drop(permit);
        });
    }
}

async fn send_batch(shared: &Shared, ready: &Ready, batch: Vec<SendJob>) {
    let topic = shared.config.topic.as_str();
    let message = |record: &Vec<u8>| {
        MqMessage::builder()
            .topic(topic)
            .body_slice(record)
            .build_unchecked()
    };
    let messages: Vec<MqMessage> = batch
        .iter()
        .flat_map(|job| job.records.iter().map(message))
        .collect();
    let route = batch.first().map_or(Route::Any, |job| job.route);
    let started = Instant::now();
    let send = async {
        match route {
            Route::Any => ready.producer.send_batch(messages).await.map(drop),
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
    let result = tokio::time::timeout(limit, send)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from the broker within {limit:?}")));
    ::metrics::histogram!(metrics::BUS_SEND_DURATION).record(started.elapsed().as_secs_f64());
    let outcome = match result {
        Ok(_) => {
            *lock(&shared.send_failing) = None;
            Ok(())
        }
        Err(err) => {
            tracing::warn!(%err, messages = batch.iter().map(|j| j.records.len()).sum::<usize>(), "RocketMQ send failed");
            ::metrics::counter!(metrics::BUS_PUBLISH_ERRORS).increment(1);
            *lock(&shared.send_failing) = Some(err.clone());
            Err(BusError::Unavailable(format!(
                "RocketMQ did not take the message: {err}"
            )))
        }
    };
    shared.observe_readiness();
    for job in batch {
        let _ = job.reply.send(outcome.clone());
    }
}

/// Announces this node: quickly until its own heartbeat came back (the
/// readiness probe), then every `heartbeat_interval`.
async fn heartbeat_loop(shared: Arc<Shared>, jobs: mpsc::Sender<SendJob>) {
    loop {
        let event = ControlEvent {
            origin: shared.instance.clone(),
            change: Change::Heartbeat {
                started_at_micros: shared.started_at_micros,
            },
        };
        let record = event.encode();
        let (reply, outcome) = oneshot::channel();
        let job = SendJob {
            bytes: record.len(),
            records: vec![record],
            route: Route::Control,
            reply,
        };
        if jobs.send(job).await.is_err() {
            return;
        }
        let _ = outcome.await;
        shared.observe_readiness();
        let pause = if lock(&shared.own_heartbeat).is_some() {
            shared.config.heartbeat_interval
        } else {
            PROBE_INTERVAL
        };
        tokio::time::sleep(pause).await;
    }
}

/// Hands each consumed message to the dispatcher or the cluster module.
struct Listener {
    shared: Arc<Shared>,
    sinks: Sinks,
}

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> rocketmq_client_rust::ClientResult<ConsumeConcurrentlyStatus> {
        for msg in msgs {
            self.hand_off(msg);
        }
        // Never a failure: in broadcasting mode the client would drop it.
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

impl Listener {
    fn hand_off(&self, msg: &MessageExt) {
        let Some(body) = msg.body() else {
            ::metrics::counter!(metrics::ENVELOPES_REJECTED, "reason" => "empty").increment(1);
            return;
        };
        let record = match Record::decode(&body) {
            Ok(record) => record,
            Err(err) => {
                tracing::warn!(%err, msg_id = %msg.msg_id(), "bus message ignored");
                ::metrics::counter!(metrics::ENVELOPES_REJECTED, "reason" => err.label())
                    .increment(1);
                return;
            }
        };
        let stored_at_ms = u64::try_from(msg.store_timestamp()).unwrap_or(0);
        match record {
            Record::Message(envelope) => {
                // Blocks while the dispatcher's queue is full: back-pressure
                // on the consumer instead of a lost message.
                if self
                    .sinks
                    .envelopes
                    .blocking_send(Arc::new(envelope))
                    .is_ok()
                {
                    self.shared.received.fetch_add(1, Ordering::AcqRel);
                }
                let lag_ms = (now_micros() / 1000).saturating_sub(stored_at_ms);
                ::metrics::histogram!(metrics::BUS_CONSUME_LAG).record(lag_ms as f64 / 1000.0);
            }
            Record::Control(event) => {
                let own = event.origin == self.shared.instance;
                match event.change {
                    Change::Heartbeat { .. } if own => {
                        *lock(&self.shared.own_heartbeat) = Some(Instant::now());
                        self.shared.observe_readiness();
                    }
                    Change::Barrier { id } => {
                        if own {
                            *lock(&self.shared.barriers).entry(id).or_default() += 1;
                            self.shared.barrier_seen.notify_waiters();
                        }
                    }
                    _ => {
                        let _ = self.sinks.control.blocking_send(event);
                    }
                }
            }
        }
    }
}
