//! The in-process bus engine: a bounded queue from the push API to this
//! node's dispatcher. Publishers wait while it is full (back-pressure), and
//! the push API bounds that wait.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};

use super::{Bus, BusError, BusReceiver, BusStatus};
use crate::control::ControlEvent;
use crate::envelope::Envelope;

/// The embedded bus of a single node.
pub struct LocalBus {
    queue: mpsc::Sender<Arc<Envelope>>,
    accepted: AtomicU64,
    dispatched: watch::Receiver<u64>,
}

impl LocalBus {
    /// A bus holding at most `capacity` envelopes, and its receiving end.
    pub fn new(capacity: usize) -> (Self, BusReceiver) {
        let (queue, envelopes) = mpsc::channel(capacity);
        let (receiver, dispatched) = BusReceiver::new(envelopes);
        // In process: always ready, never a publish error.
        ::metrics::gauge!(crate::metrics::BUS_READY).set(1.0);
        ::metrics::counter!(crate::metrics::BUS_PUBLISH_ERRORS).absolute(0);
        let bus = Self {
            queue,
            accepted: AtomicU64::new(0),
            dispatched,
        };
        (bus, receiver)
    }
}

impl Bus for LocalBus {
    fn publish(&self, batch: Vec<Arc<Envelope>>) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            if batch.len() > self.queue.max_capacity() {
                return Err(BusError::Unavailable(format!(
                    "batch of {} exceeds the local bus capacity of {}",
                    batch.len(),
                    self.queue.max_capacity()
                )));
            }
            // Reserving every slot first makes the batch all-or-nothing.
            let permits = self
                .queue
                .reserve_many(batch.len())
                .await
                .map_err(|_| BusError::Unavailable("dispatcher stopped".to_owned()))?;
            let count = batch.len() as u64;
            for (permit, envelope) in permits.zip(batch) {
                permit.send(envelope);
            }
            self.accepted.fetch_add(count, Ordering::AcqRel);
            Ok(())
        }
        .boxed()
    }

    fn announce(&self, _events: Vec<ControlEvent>) -> BoxFuture<'_, Result<(), BusError>> {
        // One node: the change was already made here, nobody else to tell.
        async { Ok(()) }.boxed()
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
    use crate::envelope::Target;

    #[tokio::test]
    async fn publishes_in_order_and_refuses_when_stopped() {
        let (bus, mut receiver) = LocalBus::new(4);
        let a = Arc::new(Envelope::new("t", Target::Broadcast, "1".into()));
        let b = Arc::new(Envelope::new("t", Target::Broadcast, "2".into()));
        bus.publish(vec![a.clone(), b.clone()]).await.unwrap();
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
        assert!(bus.publish(vec![a]).await.is_err());
    }
}
