//! The RocketMQ client on its own thread and runtime (it owns both, as the
//! client library requires): starts the producer and the broadcasting
//! consumer, retrying until the broker answers, creates the topic if it is
//! missing, renews either when it is stuck, and stops both when the engine
//! stops.
//!
//! Producer and consumer are separate client instances (client ids), so
//! that each can be renewed alone: a fresh instance has fresh connections
//! and reconnection breakers. The producer's id carries a generation; the
//! consumer keeps one id for the node's run, and its offsets in the
//! client's local offset store (`~/.rocketmq_offsets/<client id>/`, removed
//! at stop), so that a renewed consumer resumes where the old one stopped —
//! nothing stored meanwhile is skipped. A restarted node has another id,
//! and starts from the newest message, as it always did.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rocketmq_client_rust::{
    ClientConfig, ClientError, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer,
    DefaultMQPushConsumer, MQPushConsumer, TelemetryHandle,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::consume::{ConsumeListener, Sinks};
use super::routing;
use super::send::{Ready, SendJob, batch_loop, probe_loop};
use crate::metrics;

mod offsets;

/// Topic whose route lets a producer create topics (RocketMQ's default).
const CREATE_TOPIC_KEY: &str = "TBW102";
/// Messages handed to the listener at once.
const CONSUME_BATCH: u32 = 32;
/// Longest pause between two attempts to reach the broker at start.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// How often (in heartbeats) a node asks the name servers whether the
/// topic has queues on more brokers than it knows.
const ROUTE_CHECK_HEARTBEATS: u32 = 5;
/// Shortest time between two producer renewals.
const PRODUCER_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);
/// Offsets of an earlier run of this node untouched this long are removed.
const STALE_OFFSETS: Duration = Duration::from_secs(24 * 3600);
/// Heartbeats a routing node reads every record for, listening for nodes
/// of an older version (untagged records), before it reads only what is
/// tagged for it: a live node probes within this time.
const LISTEN_FOR_OLDER_HEARTBEATS: u32 = 10;
/// Shortest time between two consumer renewals: a fresh consumer starts
/// pulling about a second after it started. Doubled after each renewal
/// that heard nothing of its own probe before the next, up to
/// [`CONSUMER_RENEWAL_MOST`]: on a broker too busy to take a fresh
/// consumer's subscription within seconds, renewing every 3 s kept each
/// node's consumer from ever starting (79 renewals of one node in ten
/// minutes, 27 nodes on two cores).
const CONSUMER_RENEWAL_INTERVAL: Duration = Duration::from_secs(3);
const CONSUMER_RENEWAL_MOST: Duration = Duration::from_secs(60);
/// How long a consumer being replaced may take to stop and save its
/// offsets (a pull in flight to a dead broker may hang much longer).
const CONSUMER_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The client side, on its own thread.
pub(super) struct Engine {
    pub(super) shared: Arc<Shared>,
    pub(super) sinks: Sinks,
    /// Kept so that the probes can queue sends like any control record.
    pub(super) control_jobs: mpsc::Sender<SendJob>,
}

/// The receiving ends of the two lanes of send jobs.
pub(super) struct JobLanes {
    pub(super) messages: mpsc::Receiver<SendJob>,
    pub(super) control: mpsc::Receiver<SendJob>,
    pub(super) read_backs: mpsc::Receiver<super::read_back::ReadBackJob>,
}

/// A started producer and consumer.
struct Connected {
    producer: DefaultMQProducer,
    consumer: DefaultMQPushConsumer,
    queues: Vec<MessageQueue>,
}

impl Engine {
    pub(super) fn run_on_own_runtime(self, jobs: JobLanes, stop: watch::Receiver<bool>) {
        let mut runtime_config =
            RuntimeConfig::for_parallelism("pushgate-rocketmq", self.shared.config.client_threads);
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
                self.shared
                    .readiness
                    .connecting(format!("cannot start the RocketMQ client runtime: {err}"));
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
                self.shared
                    .readiness
                    .connecting(format!("cannot start the RocketMQ client: {err}"));
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
        jobs: JobLanes,
        mut stop: watch::Receiver<bool>,
    ) {
        let producer_slot: Arc<ArcSwapOption<Ready>> = Arc::new(ArcSwapOption::empty());
        let messages = tokio::spawn(batch_loop(
            self.shared.clone(),
            producer_slot.clone(),
            jobs.messages,
            self.shared.config.max_batches_in_flight,
        ));
        let control = tokio::spawn(batch_loop(
            self.shared.clone(),
            producer_slot.clone(),
            jobs.control,
            1,
        ));
        let read_backs = tokio::spawn(super::read_back::serve(
            self.shared.clone(),
            client.clone(),
            producer_slot.clone(),
            jobs.read_backs,
        ));
        let connected = tokio::select! {
            connected = self.connect_until_up(&client) => connected,
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let Some(Connected {
            producer,
            consumer,
            queues,
        }) = connected
        else {
            messages.abort();
            control.abort();
            read_backs.abort();
            return;
        };
        self.shared
            .queues
            .store(queues.len(), std::sync::atomic::Ordering::Release);
        self.shared.readiness.connected();
        producer_slot.store(Some(Arc::new(Ready { producer, queues })));
        let probes = tokio::spawn(probe_loop(self.shared.clone(), self.control_jobs.clone()));
        let mut consumer = Some(consumer);
        let mut producer_generation = 0;
        let mut consumer_renewed = Instant::now();
        let mut renewal_interval = CONSUMER_RENEWAL_INTERVAL;
        let route_check_every = self.shared.config.heartbeat_interval * ROUTE_CHECK_HEARTBEATS;
        let mut route_check = tokio::time::interval_at(
            tokio::time::Instant::now() + route_check_every,
            route_check_every,
        );
        route_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let listen_for_older_nodes =
            tokio::time::sleep(self.shared.config.heartbeat_interval * LISTEN_FOR_OLDER_HEARTBEATS);
        tokio::pin!(listen_for_older_nodes);
        let mut listening = self.shared.config.route_to_holders;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                () = self.shared.renew_producer.notified() => {
                    producer_generation += 1;
                    self.renew_producer(&client, &producer_slot, producer_generation, None).await;
                }
                _ = route_check.tick() => {
                    if let Some(queues) = self.more_queues(&producer_slot).await {
                        producer_generation += 1;
                        self.renew_producer(&client, &producer_slot, producer_generation, Some(queues)).await;
                    }
                }
                () = self.shared.renew_consumer.notified(),
                    if consumer_renewed.elapsed() > renewal_interval =>
                {
                    renewal_interval = if self.shared.readiness.own_probe_since(consumer_renewed) {
                        CONSUMER_RENEWAL_INTERVAL
                    } else {
                        (renewal_interval * 2).min(CONSUMER_RENEWAL_MOST)
                    };
                    tracing::warn!(
                        next_within = ?renewal_interval,
                        "this node's RocketMQ consumer received nothing lately while sends succeed: renewing it"
                    );
                    consumer = self.renew_consumer(&client, consumer.take()).await;
                    consumer_renewed = Instant::now();
                }
                () = &mut listen_for_older_nodes, if listening => {
                    listening = false;
                    if self.shared.untagged_seen.load(std::sync::atomic::Ordering::Acquire) {
                        tracing::error!(
                            "a node of an older version runs on this topic (its records carry no tag): \
                             this node does not route pushes to their users' nodes \
                             (bus.rocketmq.route_to_holders needs every node on this version); \
                             restart it once they are"
                        );
                    } else {
                        tracing::info!("no node of an older version heard: reading only what is tagged for this node");
                        self.shared.narrowed.store(true, std::sync::atomic::Ordering::Release);
                        consumer = self.renew_consumer(&client, consumer.take()).await;
                        consumer_renewed = Instant::now();
                    }
                }
            }
        }

        // The node announced its departure before stopping the bus: what
        // is still queued now is answered "stopped".
        probes.abort();
        messages.abort();
        control.abort();
        read_backs.abort();
        if let Some(mut consumer) = consumer {
            consumer.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(self.consumer_offsets_dir());
        if let Some(ready) = producer_slot.swap(None) {
            retire(ready, Duration::ZERO).await;
        }
    }

    /// The topic's queues as the name servers have them now, if they are
    /// more than this node knows: a broker group that was down when the
    /// node started, or was added since. Queues are never dropped (a dead
    /// broker's are avoided while it is down), so every node ends up with
    /// the same list, and a tenant's key the same queue.
    async fn more_queues(&self, slot: &ArcSwapOption<Ready>) -> Option<Vec<MessageQueue>> {
        let current = slot.load_full()?;
        // A handle on the same client instance.
        let mut producer = current.producer.clone();
        let found = producer
            .fetch_publish_message_queues(&self.shared.config.topic)
            .await
            .ok()?;
        let mut queues = current.queues.clone();
        for queue in found {
            if !queues.contains(&queue) {
                queues.push(queue);
            }
        }
        if queues.len() == current.queues.len() {
            return None;
        }
        sort_queues(&mut queues);
        tracing::info!(
            before = current.queues.len(),
            now = queues.len(),
            "the topic has queues on more RocketMQ brokers: sending to them too"
        );
        Some(queues)
    }

    /// Replaces the producer with a fresh client instance (generation
    /// `generation`), at most once a [`PRODUCER_RENEWAL_INTERVAL`], with
    /// `queues` if given; the old one stops once its sends in flight are
    /// answered.
    async fn renew_producer(
        &self,
        client: &Arc<ClientRuntime>,
        slot: &ArcSwapOption<Ready>,
        generation: u64,
        queues: Option<Vec<MessageQueue>>,
    ) {
        tokio::time::sleep(PRODUCER_RENEWAL_INTERVAL).await;
        let Some(current) = slot.load_full() else {
            return;
        };
        match self.start_producer(client, generation).await {
            Ok(producer) => {
                let queues = queues.unwrap_or_else(|| current.queues.clone());
                ::metrics::gauge!(metrics::BUS_QUEUES).set(queues.len() as f64);
                let fresh = Arc::new(Ready { producer, queues });
                drop(current);
                if let Some(old) = slot.swap(Some(fresh)) {
                    tokio::spawn(retire(old, self.shared.config.send_timeout * 3));
                }
                tracing::info!(generation, "RocketMQ producer renewed");
            }
            Err(err) => {
                tracing::warn!(%err, "cannot renew the RocketMQ producer; retrying at the next failed send")
            }
        }
    }

    /// Replaces the consumer (one that stopped receiving, or one whose
    /// subscription changes) with a fresh one, which resumes from the
    /// offsets the old one saved as it stopped. Returns
    /// the consumer now running, if any (a failed start is retried at the
    /// next sign that nothing is received).
    async fn renew_consumer(
        &self,
        client: &Arc<ClientRuntime>,
        old: Option<DefaultMQPushConsumer>,
    ) -> Option<DefaultMQPushConsumer> {
        if let Some(mut old) = old {
            let store = old.offset_store();
            if tokio::time::timeout(CONSUMER_STOP_TIMEOUT, old.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(
                    "the old RocketMQ consumer did not stop within {CONSUMER_STOP_TIMEOUT:?}"
                );
            }
            // What it consumed, as it stopped: the client saves it in the
            // background, perhaps not before the fresh consumer reads it.
            if let Some(store) = store {
                let consumed = store.clone_offset_table(&self.shared.config.topic).await;
                if let Err(err) = self.save_offsets(&consumed) {
                    tracing::warn!(%err, "cannot save the consumer's offsets: the fresh consumer may skip what was stored meanwhile");
                }
            }
        }
        match self.start_consumer(client).await {
            Ok(consumer) => {
                tracing::info!("RocketMQ consumer renewed");
                Some(consumer)
            }
            Err(err) => {
                tracing::warn!(%err, "cannot start a fresh RocketMQ consumer; retrying");
                None
            }
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
                    self.shared.readiness.connecting(reason);
                    ::metrics::counter!(metrics::BUS_CONNECT_FAILURES).increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
                }
            }
        }
    }

    async fn connect(&self, client: &Arc<ClientRuntime>) -> Result<Connected, ConnectError> {
        self.forget_earlier_runs();
        let mut producer = self.start_producer(client, 0).await?;
        let queues = match self.ensure_topic(&mut producer).await {
            Ok(queues) => queues,
            Err(err) => {
                producer.shutdown().await;
                return Err(err);
            }
        };
        let mut queues = queues;
        sort_queues(&mut queues);
        ::metrics::gauge!(metrics::BUS_QUEUES).set(queues.len() as f64);
        self.resume_control_records(&queues);
        match self.start_consumer(client).await {
            Ok(consumer) => Ok(Connected {
                producer,
                consumer,
                queues,
            }),
            Err(err) => {
                producer.shutdown().await;
                Err(err)
            }
        }
    }

    /// The client settings of this node's producer of `generation`, or
    /// (with `None`) of its consumer: each a client instance of its own.
    /// Two nodes on one host would otherwise share one client id and
    /// split the broadcast between them.
    fn client_config(&self, producer_generation: Option<u64>) -> ClientConfig {
        let mut client_config = ClientConfig::new();
        let instance = &self.shared.instance;
        let name = match producer_generation {
            Some(generation) => format!("{instance}-producer-{generation}"),
            // One id for the node's run: where its offsets are kept.
            None => format!("{instance}-{}", self.shared.started_at_micros),
        };
        client_config.set_instance_name(name.into());
        client_config
    }

    async fn start_producer(
        &self,
        client: &Arc<ClientRuntime>,
        generation: u64,
    ) -> Result<DefaultMQProducer, ConnectError> {
        let config = &self.shared.config;
        let mut producer = DefaultMQProducer::builder(client.clone())
            .client_config(self.client_config(Some(generation)))
            .name_server_addr(config.name_servers.join(";"))
            .producer_group(config.producer_group.clone())
            .send_msg_timeout(config.send_timeout.as_millis() as u32)
            .retry_times_when_send_failed(1)
            .max_message_size(config.max_batch_bytes as u32 + 4096)
            .build();
        producer.start().await.map_err(ConnectError::Producer)?;
        Ok(producer)
    }

    async fn start_consumer(
        &self,
        client: &Arc<ClientRuntime>,
    ) -> Result<DefaultMQPushConsumer, ConnectError> {
        let config = &self.shared.config;
        let group = self.shared.consumer_group.clone();
        // Set only on a node that routes, once it listened for older nodes.
        let narrowed = self
            .shared
            .narrowed
            .load(std::sync::atomic::Ordering::Acquire);
        let offsets = self.consumer_offsets_dir().join(&group);
        if let Err(err) = std::fs::create_dir_all(&offsets) {
            tracing::warn!(dir = %offsets.display(), %err, "no directory for the consumer's offsets: a renewed consumer starts from the newest message");
        }
        let mut consumer = DefaultMQPushConsumer::builder(client.clone())
            .client_config(self.client_config(None))
            .name_server_addr(config.name_servers.join(";"))
            .consumer_group(group)
            .message_model(MessageModel::Broadcasting)
            // A (re)started node delivers what is pushed from now on; it
            // has no clients that missed older messages. A renewed
            // consumer resumes from the saved offsets instead.
            .consume_from_where(ConsumeFromWhere::ConsumeFromLastOffset)
            .consume_thread_min(1)
            .consume_thread_max(1)
            .consume_message_batch_max_size(CONSUME_BATCH)
            .build();
        let started = async {
            let expression = routing::subscription(&self.shared.instance, narrowed);
            consumer
                .subscribe(config.topic.as_str(), &expression)
                .await?;
            consumer.register_message_listener_concurrently(ConsumeListener {
                shared: self.shared.clone(),
                sinks: self.sinks.clone(),
            });
            consumer.start().await
        }
        .await
        .map_err(ConnectError::Consumer);
        if let Err(err) = started {
            consumer.shutdown().await;
            return Err(err);
        }
        Ok(consumer)
    }

    /// The topic's queues, creating the topic first if the broker lacks it.
    async fn ensure_topic(
        &self,
        producer: &mut DefaultMQProducer,
    ) -> Result<Vec<MessageQueue>, ConnectError> {
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
            .map_err(|cause| ConnectError::CreateTopic {
                topic: config.topic.clone(),
                cause,
            })?;
        tracing::info!(topic = %config.topic, queues = config.queues, "topic created");
        // The name server learns of the new topic from the broker.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match producer.fetch_publish_message_queues(&config.topic).await {
                Ok(queues) if !queues.is_empty() => return Ok(queues),
                _ if Instant::now() > deadline => {
                    return Err(ConnectError::NoRoute(config.topic.clone()));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Why this node could not connect to RocketMQ (it retries with backoff).
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("the producer did not start: {0}")]
    Producer(#[source] ClientError),
    #[error("the consumer did not start: {0}")]
    Consumer(#[source] ClientError),
    #[error("cannot create topic {topic:?}: {cause}")]
    CreateTopic {
        topic: String,
        #[source]
        cause: ClientError,
    },
    #[error("topic {0:?} was created but has no route yet")]
    NoRoute(String),
}

/// The same order on every node: a tenant's key picks the same queue,
/// control records go to the same (first live) one.
fn sort_queues(queues: &mut [MessageQueue]) {
    queues.sort_by(|a, b| (a.broker_name(), a.queue_id()).cmp(&(b.broker_name(), b.queue_id())));
}

/// Stops a producer that was replaced once its sends in flight are
/// answered (nothing else holds it then), or after `patience`.
async fn retire(ready: Arc<Ready>, patience: Duration) {
    let deadline = Instant::now() + patience;
    let mut ready = ready;
    loop {
        match Arc::try_unwrap(ready) {
            Ok(mut ready) => {
                ready.producer.shutdown().await;
                return;
            }
            Err(shared) if Instant::now() < deadline => {
                ready = shared;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Still sending: dropped, not stopped (its client stays).
            Err(_) => return,
        }
    }
}
