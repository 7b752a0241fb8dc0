//! The RocketMQ client on its own thread and runtime (it owns both, as the
//! client library requires): starts the producer and the broadcasting
//! consumer, retrying until the broker answers, creates the topic if it is
//! missing, and stops both when the engine stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, DefaultMQPushConsumer,
    MQPushConsumer, TelemetryHandle,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::consume::{ConsumeListener, Sinks};
use super::send::{Ready, SendJob, batch_loop, probe_loop};
use crate::metrics;

/// Topic whose route lets a producer create topics (RocketMQ's default).
const CREATE_TOPIC_KEY: &str = "TBW102";
/// Messages handed to the listener at once.
const CONSUME_BATCH: u32 = 32;
/// Longest pause between two attempts to reach the broker at start.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

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
}

/// A started producer and consumer.
struct Connected {
    producer: DefaultMQProducer,
    consumer: DefaultMQPushConsumer,
    control_queue: MessageQueue,
    queues: Vec<MessageQueue>,
}

impl Engine {
    pub(super) fn run_on_own_runtime(self, jobs: JobLanes, stop: watch::Receiver<bool>) {
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
            messages.abort();
            control.abort();
            return;
        };
        self.shared
            .queues
            .store(queues.len(), std::sync::atomic::Ordering::Release);
        self.shared.readiness.connected();
        let ready = Arc::new(Ready {
            producer,
            control_queue,
            queues,
        });
        producer_slot.store(Some(ready.clone()));
        let probes = tokio::spawn(probe_loop(self.shared.clone(), self.control_jobs.clone()));
        let _ = stop.wait_for(|stop| *stop).await;

        // The node announced its departure before stopping the bus: what
        // is still queued now is answered "stopped".
        probes.abort();
        messages.abort();
        control.abort();
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
                    self.shared.readiness.connecting(reason);
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
        // The same order on every node: a tenant's key picks the same queue.
        let mut all_queues = queues.clone();
        all_queues
            .sort_by(|a, b| (a.broker_name(), a.queue_id()).cmp(&(b.broker_name(), b.queue_id())));
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
            consumer.register_message_listener_concurrently(ConsumeListener {
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
