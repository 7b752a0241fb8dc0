//! The in-process bus engine: a bounded queue from the push API to this
//! node's dispatcher. Publishers wait while it is full (back-pressure), and
//! the push API bounds that wait.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Bus, BusError, BusReceiver};
use crate::envelope::Envelope;

/// The embedded bus of a single node.
pub struct LocalBus {
    queue: mpsc::Sender<Arc<Envelope>>,
}

impl LocalBus {
    /// A bus holding at most `capacity` envelopes, and its receiving end.
    pub fn new(capacity: usize) -> (Self, BusReceiver) {
        let (queue, receiver) = mpsc::channel(capacity);
        (Self { queue }, receiver)
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
            for (permit, envelope) in permits.zip(batch) {
                permit.send(envelope);
            }
            Ok(())
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
        assert_eq!(receiver.recv().await.unwrap().id, a.id);
        assert_eq!(receiver.recv().await.unwrap().id, b.id);
        drop(receiver);
        assert!(bus.publish(vec![a]).await.is_err());
    }
}
