//! Reading a tenant's messages back from the broker's queue, for a client
//! that resumes on a node that routes pushes to their users' nodes: that
//! node's own history holds only what was routed to it, the broker's queue
//! holds everything. Read with a pull consumer of the node's own, on the
//! client's runtime, one request at a time per caller, in blocks of
//! `PULL_BATCH` offsets that the node keeps a little while: the clients of
//! a lost node resume together, on the same few nodes, from nearby
//! positions of the same queue, and each read the same thousands of
//! messages again (100,000 clients on seven nodes, one node killed: 14,285
//! resumes took 62 s to be back, other users' pushes waited up to 52 s
//! behind their pulls). A block read once now serves them all.

// The classic pull consumer reads a range of one queue by offset, which is
// what a read-back is; the lite one keeps one position per queue for all
// its callers.
#![allow(deprecated)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rocketmq_client_rust::DefaultMQPullConsumer;
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::result::PullStatus;
use tokio::sync::{Mutex, OnceCell, mpsc, oneshot};

use super::Shared;
use super::routing;
use super::send::Ready;
use crate::bus::ReadBack;
use crate::bus::envelope::{Envelope, Position, Record};
use crate::metrics;
use crate::sync::lock;

/// Messages asked for in one pull: a block's offsets.
const PULL_BATCH: i32 = 32;
/// Blocks a node keeps (at most ~16,000 messages, a few MB) …
const KEPT_BLOCKS: usize = 512;
/// … for this long: a storm of resumes is over by then.
const BLOCK_KEPT_FOR: Duration = Duration::from_secs(30);

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
    let blocks = Arc::new(Blocks::default());
    while let Some(job) = jobs.recv().await {
        let (shared, client, ready, consumer, blocks) = (
            shared.clone(),
            client.clone(),
            ready.clone(),
            consumer.clone(),
            blocks.clone(),
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
                read(&consumer, &blocks, &queue, job.after, job.through).await
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

/// What one pull at an offset found: the messages that are pushes, first
/// copies only (any node's copy reads the same), with their offsets.
struct Pulled {
    status: PullStatus,
    min_offset: u64,
    next_begin: u64,
    messages: Vec<(u64, Arc<Envelope>)>,
    at: Instant,
}

impl Pulled {
    /// Whether it holds every offset of the block starting at `start`:
    /// then nothing in it can change, and it may be kept.
    fn is_whole_block(&self, start: u64) -> bool {
        self.status == PullStatus::Found && self.next_begin >= start + PULL_BATCH as u64
    }
}

async fn pull(
    consumer: &DefaultMQPullConsumer,
    queue: &MessageQueue,
    offset: u64,
) -> Result<Pulled, String> {
    let result = consumer
        .pull(queue, "*", offset as i64, PULL_BATCH)
        .await
        .map_err(|err| err.to_string())?;
    let mut messages = Vec::new();
    for msg in result.msg_found_list().unwrap_or_default() {
        if routing::copy_of(msg) > 0 {
            continue;
        }
        let Some(body) = msg.body() else { continue };
        if let Ok(Record::Message(envelope)) = Record::decode(&body) {
            let at = u64::try_from(msg.queue_offset()).unwrap_or(0);
            let _ = envelope.position.set(Position {
                stream: stream_of(queue),
                offset: at,
            });
            messages.push((at, Arc::new(envelope)));
        }
    }
    Ok(Pulled {
        status: *result.pull_status(),
        min_offset: result.min_offset(),
        next_begin: result.next_begin_offset(),
        messages,
        at: Instant::now(),
    })
}

type BlockKey = (u64, u64);

/// Whole blocks read lately, by stream and first offset; a block being
/// pulled is waited for by whoever else asks for it.
#[derive(Default)]
struct Blocks {
    kept: std::sync::Mutex<HashMap<BlockKey, Arc<OnceCell<Arc<Pulled>>>>>,
    order: std::sync::Mutex<VecDeque<BlockKey>>,
}

impl Blocks {
    /// The block of `queue` at `start` (a multiple of `PULL_BATCH`): kept,
    /// or pulled now (and kept if whole).
    async fn get(
        &self,
        consumer: &DefaultMQPullConsumer,
        queue: &MessageQueue,
        start: u64,
    ) -> Result<Arc<Pulled>, String> {
        let key = (stream_of(queue), start);
        let cell = {
            let mut kept = lock(&self.kept);
            let cell = kept.entry(key).or_default();
            if cell.get().is_some_and(|p| p.at.elapsed() > BLOCK_KEPT_FOR) {
                *cell = Arc::default();
            }
            cell.clone()
        };
        let mut pulled_here = false;
        let pulled = cell
            .get_or_try_init(|| {
                pulled_here = true;
                async { pull(consumer, queue, start).await.map(Arc::new) }
            })
            .await
            .cloned();
        let block = if pulled_here { "pulled" } else { "kept" };
        ::metrics::counter!(metrics::BUS_READ_BACK_PULLS, "block" => block).increment(1);
        match &pulled {
            Ok(block) if block.is_whole_block(start) => {
                if pulled_here {
                    self.remember(key);
                }
            }
            // Not whole (the queue's end, a failure): asked again next time.
            _ => {
                let mut kept = lock(&self.kept);
                if kept.get(&key).is_some_and(|kept| Arc::ptr_eq(kept, &cell)) {
                    kept.remove(&key);
                }
            }
        }
        pulled
    }

    /// Keeps `key`, forgetting the oldest beyond `KEPT_BLOCKS`.
    fn remember(&self, key: BlockKey) {
        let mut order = lock(&self.order);
        order.push_back(key);
        let mut kept = lock(&self.kept);
        while order.len() > KEPT_BLOCKS {
            if let Some(oldest) = order.pop_front() {
                kept.remove(&oldest);
            }
        }
    }
}

/// The messages of `queue` in `(after, through]`, each once (a push copied
/// to several nodes is read from its first copy), through the node's kept
/// blocks.
async fn read(
    consumer: &DefaultMQPullConsumer,
    blocks: &Blocks,
    queue: &MessageQueue,
    after: u64,
    through: u64,
) -> Result<ReadBack, String> {
    let mut read = ReadBack {
        envelopes: Vec::new(),
        complete: true,
    };
    let batch = PULL_BATCH as u64;
    let mut offset = after + 1;
    while offset <= through {
        let start = offset - offset % batch;
        let mut pulled = blocks.get(consumer, queue, start).await?;
        if pulled.status == PullStatus::Found && pulled.next_begin <= offset {
            // A short block (the broker sent less than asked) that ends
            // before `offset`: read on from `offset` itself.
            pulled = Arc::new(pull(consumer, queue, offset).await?);
            ::metrics::counter!(metrics::BUS_READ_BACK_PULLS, "block" => "pulled").increment(1);
        }
        if pulled.min_offset > after + 1 {
            // The broker no longer keeps the oldest of them.
            read.complete = false;
        }
        match pulled.status {
            PullStatus::Found => {}
            PullStatus::OffsetIllegal if pulled.min_offset > offset => {
                read.complete = false;
                offset = pulled.min_offset;
                continue;
            }
            _ => break,
        }
        for (at, envelope) in &pulled.messages {
            if *at < offset {
                continue;
            }
            if *at > through {
                return Ok(read);
            }
            read.envelopes.push(envelope.clone());
        }
        if pulled.next_begin <= offset {
            break;
        }
        offset = pulled.next_begin;
    }
    Ok(read)
}
