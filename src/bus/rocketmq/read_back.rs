//! Reading a tenant's messages back from the broker's queue, for a client
//! that resumes on a node that routes pushes to their users' nodes: that
//! node's own history holds only what was routed to it, the broker's queue
//! holds everything. Read with a pull consumer of the node's own, on the
//! client's runtime, one request at a time per caller.

// The classic pull consumer reads a range of one queue by offset, which is
// what a read-back is; the lite one keeps one position per queue for all
// its callers.
#![allow(deprecated)]

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rocketmq_client_rust::DefaultMQPullConsumer;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::result::PullStatus;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::Shared;
use super::routing;
use super::send::Ready;
use crate::bus::ReadBack;
use crate::bus::envelope::{Position, Record};

/// Messages asked for in one pull.
const PULL_BATCH: i32 = 32;

/// A request to read back the messages of one stream in `(after, through]`.
pub(super) struct ReadBackJob {
    pub(super) stream: u64,
    pub(super) after: u64,
    pub(super) through: u64,
    pub(super) reply: oneshot::Sender<Result<ReadBack, String>>,
}

/// The stream id of `queue` (as a message's position gives it).
pub(super) fn stream_of(queue: &MessageQueue) -> u64 {
    Position::stream_of(queue.broker_name(), queue.queue_id())
}

/// Answers read-back requests until the node stops; the pull consumer is
/// started on the first one.
pub(super) async fn serve(
    shared: Arc<Shared>,
    client: Arc<rocketmq_client_rust::ClientRuntime>,
    ready: Arc<ArcSwapOption<Ready>>,
    mut jobs: mpsc::Receiver<ReadBackJob>,
) {
    let consumer: Arc<Mutex<Option<Arc<DefaultMQPullConsumer>>>> = Arc::default();
    while let Some(job) = jobs.recv().await {
        let (shared, client, ready, consumer) = (
            shared.clone(),
            client.clone(),
            ready.clone(),
            consumer.clone(),
        );
        tokio::spawn(async move {
            let answer = async {
                let queue = ready
                    .load()
                    .as_ref()
                    .and_then(|ready| {
                        ready
                            .queues
                            .iter()
                            .find(|queue| stream_of(queue) == job.stream)
                            .cloned()
                    })
                    .ok_or_else(|| "no queue of the topic has this position".to_owned())?;
                let consumer = started(&shared, &client, &consumer).await?;
                read(&consumer, &queue, job.after, job.through).await
            }
            .await;
            let _ = job.reply.send(answer);
        });
    }
    if let Some(consumer) = consumer.lock().await.take() {
        let _ = consumer.shutdown().await;
    }
}

/// The pull consumer, started on first use.
async fn started(
    shared: &Shared,
    client: &Arc<rocketmq_client_rust::ClientRuntime>,
    slot: &Mutex<Option<Arc<DefaultMQPullConsumer>>>,
) -> Result<Arc<DefaultMQPullConsumer>, String> {
    let mut slot = slot.lock().await;
    if let Some(consumer) = slot.as_ref() {
        return Ok(consumer.clone());
    }
    let config = &shared.config;
    let consumer = DefaultMQPullConsumer::builder(client.clone())
        .consumer_group(format!(
            "{}-read-{}",
            config.consumer_group,
            routing::node_tag(&shared.instance)
        ))
        .name_server_addr(config.name_servers.join(";"))
        .build()
        .map_err(|err| err.to_string())?;
    consumer.start().await.map_err(|err| err.to_string())?;
    let consumer = Arc::new(consumer);
    *slot = Some(consumer.clone());
    Ok(consumer)
}

/// The messages of `queue` in `(after, through]`, each once (a push copied
/// to several nodes is read from its first copy).
async fn read(
    consumer: &DefaultMQPullConsumer,
    queue: &MessageQueue,
    after: u64,
    through: u64,
) -> Result<ReadBack, String> {
    let mut read = ReadBack {
        envelopes: Vec::new(),
        complete: true,
    };
    let mut offset = after + 1;
    while offset <= through {
        let result = consumer
            .pull(queue, "*", offset as i64, PULL_BATCH)
            .await
            .map_err(|err| err.to_string())?;
        if result.min_offset() > after + 1 {
            // The broker no longer keeps the oldest of them.
            read.complete = false;
        }
        match result.pull_status() {
            PullStatus::Found => {}
            PullStatus::OffsetIllegal if result.min_offset() > offset => {
                read.complete = false;
                offset = result.min_offset();
                continue;
            }
            _ => break,
        }
        for msg in result.msg_found_list().unwrap_or_default() {
            let at = u64::try_from(msg.queue_offset()).unwrap_or(0);
            if at > through {
                return Ok(read);
            }
            // Any node's copy reads the same; the first is enough.
            if routing::copy_of(msg) > 0 {
                continue;
            }
            let Some(body) = msg.body() else { continue };
            if let Ok(Record::Message(envelope)) = Record::decode(&body) {
                let _ = envelope.position.set(Position {
                    stream: stream_of(queue),
                    offset: at,
                });
                read.envelopes.push(Arc::new(envelope));
            }
        }
        if result.next_begin_offset() <= offset {
            break;
        }
        offset = result.next_begin_offset();
    }
    Ok(read)
}
