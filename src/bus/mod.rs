//! The bus between the push API and delivery: one trait, one engine per
//! deployment. The `local` engine hands envelopes to this node's dispatcher
//! in process (the embedded default).
//!
//! An engine only carries envelopes; it knows nothing of sessions or plugins.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::envelope::Envelope;

pub mod local;

/// Envelopes arriving from the bus, for the dispatcher.
pub type BusReceiver = mpsc::Receiver<Arc<Envelope>>;

/// Why the bus did not accept a publish.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus is not running (the node is shutting down, or lost its broker).
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Carries envelopes to every node's dispatcher.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `batch`. Resolves `Ok` only once the bus has taken every
    /// envelope of it for delivery; on `Err` none of them was taken.
    fn publish(&self, batch: Vec<Arc<Envelope>>) -> BoxFuture<'_, Result<(), BusError>>;

    /// The engine's name, for logs and `/readyz`.
    fn engine(&self) -> &'static str;
}
