//! Consuming: the listener decodes each message and hands it on — an
//! envelope to the dispatcher's bounded queue, a control record or another
//! node's probe to the cluster part — blocking (on the client's blocking
//! lane) while a queue is full: it never drops a message and never
//! reports a failure, which in broadcasting mode would drop it. This
//! node's own probes and barriers stay here: they tell readiness and
//! drains what the consumer received.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rocketmq_client_rust::{
    ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, MessageListenerConcurrently,
};
use rocketmq_model::common::message::message_ext::MessageExt;
use tokio::sync::{Notify, mpsc};

use super::Shared;
use super::routing::{self, Received};
use crate::bus::envelope::{Envelope, Position, Record};
use crate::bus::{ControlPosition, Inbound};
use crate::clock::now_micros;
use crate::metrics;
use crate::sync::lock;

/// Copies of this node's barriers received back so far.
#[derive(Default)]
pub(super) struct Barriers {
    copies: Mutex<HashMap<u64, usize>>,
    seen: Notify,
}

impl Barriers {
    fn received(&self, id: u64) {
        *lock(&self.copies).entry(id).or_default() += 1;
        self.seen.notify_waiters();
    }

    /// Resolves once `copies` copies of barrier `id` came back, and
    /// forgets it.
    pub(super) async fn wait_for(&self, id: u64, copies: usize) {
        loop {
            let seen = self.seen.notified();
            if lock(&self.copies).get(&id).copied().unwrap_or(0) >= copies {
                break;
            }
            seen.await;
        }
        lock(&self.copies).remove(&id);
    }
}

/// Where the listener hands what it receives.
#[derive(Clone)]
pub(super) struct Sinks {
    pub(super) envelopes: mpsc::Sender<Arc<Envelope>>,
    pub(super) inbound: mpsc::Sender<Inbound>,
}

/// Hands each consumed message to the dispatcher or the cluster part.
pub(super) struct ConsumeListener {
    pub(super) shared: Arc<Shared>,
    pub(super) sinks: Sinks,
}

impl MessageListenerConcurrently for ConsumeListener {
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

impl ConsumeListener {
    /// The first message read of the queue control records resume from
    /// is the one asked for, unless the broker no longer keeps it: then
    /// the cluster part hears which are lost.
    fn check_resumed_at(&self, msg: &MessageExt) {
        // Every consumed message passes here: no lock once it is settled.
        if !self.shared.resume_unchecked.load(Ordering::Acquire) {
            return;
        }
        let mut resumed_at = lock(&self.shared.resumed_at);
        let Some(expected) = resumed_at.as_ref() else {
            return;
        };
        if *msg.broker_name() != *expected.broker.as_str()
            || i64::from(expected.queue) != i64::from(msg.queue_id())
        {
            return;
        }
        let first_read = u64::try_from(msg.queue_offset()).unwrap_or(0);
        let expected = resumed_at.take().expect("checked above");
        self.shared.resume_unchecked.store(false, Ordering::Release);
        if first_read > expected.offset {
            let _ = self.sinks.inbound.blocking_send(Inbound::ControlLost {
                missing: expected,
                first_read,
            });
        }
    }

    fn hand_off(&self, msg: &MessageExt) {
        let copy = match routing::received(msg, &self.shared.own_tag) {
            Received::Ours { copy } => copy,
            Received::Untagged => {
                self.shared.untagged_seen.store(true, Ordering::Release);
                0
            }
            Received::Others => return,
        };
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
        self.check_resumed_at(msg);
        let stored_at_ms = u64::try_from(msg.store_timestamp()).unwrap_or(0);
        // A node that catches up reads the control queue again from where
        // it stopped: of what was stored before it started, only control
        // records matter (the cluster part takes their admin changes).
        // Pushes, probes and barriers of then are over: no client of this
        // run missed them, and no drain of this run waits for them.
        // (This node's own probes are told apart by their run, not by the
        // broker's clock: they decide readiness.)
        let from_before_start = stored_at_ms.saturating_add(crate::bus::HISTORY_MARGIN_MS)
            < self.shared.started_at_micros / 1000;
        let own_probe =
            matches!(&record, Record::Probe { origin, .. } if *origin == self.shared.instance);
        if from_before_start && !own_probe && !matches!(record, Record::Control(_)) {
            return;
        }
        match record {
            Record::Message(envelope) => {
                // Every node reads the same queue and offset of the push's
                // first copy: the position.
                let _ = envelope.position.set(Position {
                    stream: Position::stream_of(msg.broker_name(), msg.queue_id()),
                    offset: u64::try_from(msg.queue_offset())
                        .unwrap_or(0)
                        .saturating_sub(copy),
                });
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
            Record::Control(record) => {
                let position = ControlPosition {
                    broker: msg.broker_name().to_string(),
                    queue: u32::try_from(msg.queue_id()).unwrap_or(0),
                    offset: u64::try_from(msg.queue_offset()).unwrap_or(0),
                };
                let _ = self.sinks.inbound.blocking_send(Inbound::Control {
                    record,
                    position: Some(position),
                    stored_at_ms,
                });
            }
            Record::Probe {
                origin,
                started_at_micros,
                routing,
            } => {
                if origin == self.shared.instance {
                    // An earlier run's, read again while catching up: not
                    // this run's.
                    if started_at_micros != self.shared.started_at_micros {
                        return;
                    }
                    // After the control records stored before it, to the
                    // cluster part too: it has them all then.
                    let _ = self.sinks.inbound.blocking_send(Inbound::OwnProbe);
                    self.shared.readiness.own_probe_received();
                } else {
                    let _ = self.sinks.inbound.blocking_send(Inbound::PeerProbe {
                        node: origin,
                        started_at_micros,
                        routing,
                    });
                }
            }
            Record::Barrier { origin, id } => {
                if origin == self.shared.instance {
                    self.shared.barriers.received(id);
                }
            }
        }
    }
}
