//! The bus between the push API and delivery: one trait, one engine per
//! deployment. The `local` engine hands envelopes to this node's dispatcher
//! in process (the embedded default); the `rocketmq` engine carries them to
//! every node of a cluster, with the control events that keep the nodes in
//! step.
//!
//! An engine only carries envelopes and events; it knows nothing of
//! sessions or plugins.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use crate::control::ControlEvent;
use crate::envelope::Envelope;

pub mod local;
pub mod rocketmq;

/// Envelopes arriving from the bus, for the dispatcher, with a count of
/// those dispatched so far (so that a draining node can wait for them).
pub struct BusReceiver {
    envelopes: mpsc::Receiver<Arc<Envelope>>,
    dispatched: watch::Sender<u64>,
    holding: bool,
}

impl BusReceiver {
    /// A receiver over `envelopes`, and a watch of how many were dispatched.
    pub fn new(envelopes: mpsc::Receiver<Arc<Envelope>>) -> (Self, watch::Receiver<u64>) {
        let (dispatched, watcher) = watch::channel(0);
        let receiver = Self {
            envelopes,
            dispatched,
            holding: false,
        };
        (receiver, watcher)
    }

    /// The next envelope. Asking for it marks the previous one as
    /// dispatched: the dispatcher handles one envelope at a time.
    pub async fn next(&mut self) -> Option<Arc<Envelope>> {
        if std::mem::take(&mut self.holding) {
            self.dispatched.send_modify(|count| *count += 1);
        }
        let envelope = self.envelopes.recv().await;
        self.holding = envelope.is_some();
        envelope
    }
}

/// Why the bus did not accept a publish.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The bus is not running (the node is shutting down, or lost its broker).
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// What was published is larger than the bus carries at once.
    #[error("too large for the bus: {0}")]
    TooLarge(String),
}

/// Whether the bus carries messages right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusStatus {
    Ready,
    /// Not now, and why (for `/readyz`).
    NotReady(String),
}

/// Carries envelopes to every node's dispatcher.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `batch`. Resolves `Ok` only once the bus has taken every
    /// envelope of it for delivery; on `Err` none of them was taken.
    fn publish(&self, batch: Vec<Arc<Envelope>>) -> BoxFuture<'_, Result<(), BusError>>;

    /// Tells every other node of the cluster about changes, in this order.
    /// Resolves `Ok` once the bus has taken them. A single node has nobody
    /// to tell.
    fn announce(&self, events: Vec<ControlEvent>) -> BoxFuture<'_, Result<(), BusError>>;

    /// Resolves once every envelope this node published before the call has
    /// been dispatched to its local recipients.
    fn drained(&self) -> BoxFuture<'_, ()>;

    /// Whether the bus carries messages right now.
    fn status(&self) -> BusStatus;

    /// Stops the engine (after the node's last announcement).
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    /// The engine's name, for logs and `/readyz`.
    fn engine(&self) -> &'static str;
}
