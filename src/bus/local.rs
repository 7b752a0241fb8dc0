//! The in-process bus engine: a bounded queue from the push API to this
//! node's dispatcher, and one from the admin API to this node's cluster
//! part (a change is applied when it comes back, as on a cluster bus).
//! Publishers wait while a queue is full (back-pressure), and the push API
//! bounds that wait.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};

use super::envelope::Envelope;
use super::{Bus, BusError, BusReceiver, BusStatus, INBOUND_QUEUE, Inbound, NotTaken};

/// The embedded bus of a single node.
pub struct LocalBus {
    queue: mpsc::Sender<Arc<Envelope>>,
    control: mpsc::Sender<Inbound>,
    accepted: AtomicU64,
    dispatched: watch::Receiver<u64>,
}

impl LocalBus {
    /// A bus holding at most `capacity` envelopes, its receiving end, and
    /// the control records announced on it.
    pub fn new(capacity: usize) -> (Self, BusReceiver, mpsc::Receiver<Inbound>) {
        let (queue, envelopes) = mpsc::channel(capacity);
        let (control, inbound) = mpsc::channel(INBOUND_QUEUE);
        let (receiver, dispatched) = BusReceiver::new(envelopes, true);
        // In process: always ready, never a publish error.
        ::metrics::gauge!(crate::metrics::BUS_READY).set(1.0);
        ::metrics::counter!(crate::metrics::BUS_PUBLISH_ERRORS).absolute(0);
        let bus = Self {
            queue,
            control,
            accepted: AtomicU64::new(0),
            dispatched,
        };
        (bus, receiver, inbound)
    }
}

impl Bus for LocalBus {
    fn publish(
        &self,
        batch: Vec<Arc<Envelope>>,
        withdraw_after: Duration,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            if batch.len() > self.queue.max_capacity() {
                return Err(BusError::TooLarge {
                    size: batch.len(),
                    limit: self.queue.max_capacity(),
                    unit: "messages at once",
                });
            }
            // Reserving every slot first makes the batch all-or-nothing;
            // until they are all reserved, nothing is published.
            let permits =
                match tokio::time::timeout(withdraw_after, self.queue.reserve_many(batch.len()))
                    .await
                {
                    Ok(Ok(permits)) => permits,
                    Ok(Err(_)) => return Err(NotTaken::Stopping.into()),
                    Err(_) => return Err(NotTaken::NotWithin(withdraw_after).into()),
                };
            let count = batch.len() as u64;
            for (permit, envelope) in permits.zip(batch) {
                permit.send(envelope);
            }
            self.accepted.fetch_add(count, Ordering::AcqRel);
            Ok(())
        }
        .boxed()
    }

    fn announce(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            if records.len() > self.control.max_capacity() {
                return Err(BusError::TooLarge {
                    size: records.len(),
                    limit: self.control.max_capacity(),
                    unit: "control records at once",
                });
            }
            // Reserving every slot first keeps the records together and
            // makes them all-or-nothing.
            let permits = self
                .control
                .reserve_many(records.len())
                .await
                .map_err(|_| NotTaken::Stopping)?;
            for (permit, record) in permits.zip(records) {
                permit.send(Inbound::Control {
                    record,
                    position: None,
                    stored_at_ms: crate::clock::now_micros() / 1000,
                });
            }
            Ok(())
        }
        .boxed()
    }

    fn reaches_other_nodes(&self) -> bool {
        false
    }

    fn status(&self) -> BusStatus {
        if self.queue.is_closed() {
            BusStatus::NotReady("the dispatcher stopped".to_owned())
        } else {
            BusStatus::Ready
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }

    fn drained(&self) -> BoxFuture<'_, ()> {
        let target = self.accepted.load(Ordering::Acquire);
        let mut dispatched = self.dispatched.clone();
        async move {
            // An error means the dispatcher is gone: nothing more will come.
            let _ = dispatched.wait_for(|count| *count >= target).await;
        }
        .boxed()
    }

    fn engine(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::envelope::Target;

    #[tokio::test]
    async fn publishes_in_order_and_refuses_when_stopped() {
        let (bus, mut receiver, _inbound) = LocalBus::new(4);
        let a = Arc::new(Envelope::new("t", Target::Broadcast, "1".into()));
        let b = Arc::new(Envelope::new("t", Target::Broadcast, "2".into()));
        let wait = std::time::Duration::from_secs(5);
        bus.publish(vec![a.clone(), b.clone()], wait).await.unwrap();
        let mut drained = std::pin::pin!(bus.drained());
        assert_eq!(receiver.next().await.unwrap().id, a.id);
        assert_eq!(receiver.next().await.unwrap().id, b.id);
        assert!(
            drained.as_mut().now_or_never().is_none(),
            "b is still being dispatched"
        );
        let next =
            tokio::time::timeout(std::time::Duration::from_millis(10), receiver.next()).await;
        assert!(next.is_err(), "nothing more was published");
        drained.await;
        drop(receiver);
        assert!(bus.publish(vec![a], wait).await.is_err());
    }
}
