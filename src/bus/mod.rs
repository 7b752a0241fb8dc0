//! The bus between the push API and delivery: one trait, one engine per
//! deployment. The `local` engine hands envelopes to this node's dispatcher
//! in process (the embedded default); the `rocketmq` engine carries them to
//! every node of a cluster (or, routing, to the nodes holding their users:
//! [`Router`]), with the control records that keep the nodes in step.
//!
//! Owns the wire format ([`envelope`]) and its own record kinds: probes
//! (is this node's consumer receiving? which other nodes are alive?) and
//! barriers (has everything stored before been received?). An engine only
//! carries envelopes and opaque control records; it knows nothing of
//! sessions, plugins or what a control record means.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use crate::config::{BusConfig, BusEngine};

pub mod envelope;
pub(crate) mod local;
pub mod rocketmq;

use envelope::{Envelope, Position, RoutingReport};

/// Envelopes arriving from the bus, for the dispatcher, with a count of
/// those dispatched so far (so that a draining node can wait for them).
pub struct BusReceiver {
    envelopes: mpsc::Receiver<Arc<Envelope>>,
    dispatched: watch::Sender<u64>,
    holding: bool,
    /// On the local bus, this node is the stream: positions are this run's
    /// id and a sequence. A cluster bus positions envelopes itself.
    own_stream: Option<OwnStream>,
}

/// The positions the local bus gives: a stream per run of the node, so
/// that a restarted node is not mistaken for the one before.
struct OwnStream {
    stream: u64,
    last_offset: u64,
}

impl BusReceiver {
    /// A receiver over `envelopes`, and a watch of how many were dispatched.
    /// `positions_by_this_node`: this node numbers the envelopes (the local
    /// bus); otherwise the engine set their positions.
    pub fn new(
        envelopes: mpsc::Receiver<Arc<Envelope>>,
        positions_by_this_node: bool,
    ) -> (Self, watch::Receiver<u64>) {
        let (dispatched, watcher) = watch::channel(0);
        let own_stream = positions_by_this_node.then(|| OwnStream {
            // Start time and a random id: unique per run.
            stream: crate::stable_hash::stable_hash(
                format!("{}-{}", crate::clock::now_micros(), uuid::Uuid::new_v4()).as_bytes(),
            ) >> 16,
            last_offset: 0,
        });
        let receiver = Self {
            envelopes,
            dispatched,
            holding: false,
            own_stream,
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
        if let (Some(envelope), Some(own)) = (&envelope, &mut self.own_stream) {
            own.last_offset += 1;
            let _ = envelope.position.set(Position {
                stream: own.stream,
                offset: own.last_offset,
            });
        }
        self.holding = envelope.is_some();
        envelope
    }
}

/// Why the bus did not take what it was given. The variant says whether
/// any of it may have been published — callers decide by it alone (503 or
/// 504) — and the cause is kept whole, the engine's own error included.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Nothing of it was published.
    #[error("bus unavailable: {0}")]
    Unavailable(#[from] NotTaken),
    /// More than the bus carries at once: nothing of it was published.
    #[error("too large for the bus: {size} {unit}, at most {limit}")]
    TooLarge {
        size: usize,
        limit: usize,
        unit: &'static str,
    },
    /// The broker did not answer: what was sent may have been stored all
    /// the same (a retry may deliver it twice, unless it carries the same
    /// idempotency key).
    #[error("no answer from the bus, the message may have been published: {0}")]
    Unknown(#[from] NoAnswer),
}

/// Why the bus took nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotTaken {
    /// The node is stopping (or the bus stopped).
    #[error("the node is stopping")]
    Stopping,
    /// Nothing took it within the time its caller gives a publish.
    #[error("not taken within {0:?}; nothing was published")]
    NotWithin(Duration),
    /// The bus is not connected to its broker (why, as `/readyz` says).
    #[error("{0}")]
    NotReady(String),
    /// The topic has no queue to send to.
    #[error("the topic has no queue")]
    NoQueue,
    /// The broker refused it, or could not be reached.
    #[error("the broker did not take it: {0}")]
    Refused(#[source] EngineError),
    /// Admin changes keep to the control log's queue; its broker did not
    /// take this one (they wait for it).
    #[error(
        "the control log's broker {broker} did not take it (admin changes wait for it): {cause}"
    )]
    LogBrokerDown {
        broker: String,
        #[source]
        cause: EngineError,
    },
}

/// Why the bus cannot say whether it published.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoAnswer {
    /// No answer within this long (a frozen broker).
    #[error("no answer from the broker within {0:?}")]
    TimedOut(Duration),
    /// The request may have reached the broker before the failure.
    #[error("the broker did not answer the send: {0}")]
    Lost(#[source] EngineError),
}

/// An error of the bus's engine (the RocketMQ client's), kept whole.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub Arc<dyn std::error::Error + Send + Sync>);

/// Whether the bus carries messages right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusStatus {
    Ready,
    /// Not now, and why (for `/readyz`).
    NotReady(String),
}

/// Messages read back from where a cluster bus stores them.
#[derive(Debug, Default)]
pub struct ReadBack {
    pub envelopes: Vec<Arc<Envelope>>,
    /// False if the broker no longer keeps some of them.
    pub complete: bool,
}

/// Nodes one push is copied to at most: a push for users on more nodes
/// goes to every node once (each copy costs the publisher a message).
pub const MOST_COPIES: usize = 4;

/// Which nodes a pushed message must reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destinations {
    /// Every node (a broadcast, a topic, or a push whose recipients are
    /// on too many nodes for copies to pay).
    Everywhere,
    /// Only these nodes (the ones holding a connection of its users; none
    /// when no user of it is connected: it is stored all the same).
    Nodes(Vec<Arc<str>>),
}

/// Decides where each pushed message goes: the cluster part, which knows
/// where users are connected, answers for a cluster bus that routes.
pub trait Router: Send + Sync + 'static {
    /// The nodes `envelope` must reach.
    fn destinations(&self, envelope: &Envelope) -> Destinations;

    /// Held by the bus from routing a batch until the broker answered for
    /// it (see [`RoutingReport`]).
    fn publishing(&self) -> Box<dyn Send>;

    /// What this node says of its routing in its next probe.
    fn report(&self) -> RoutingReport;

    /// Notified when this node's next probe should go now: a connection
    /// somewhere may wait for this node's fence.
    fn probe_soon(&self) -> &tokio::sync::Notify;
}

/// Carries envelopes to every node's dispatcher.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `batch`. Resolves `Ok` only once the bus has taken every
    /// envelope of it for delivery; on `Err` other than
    /// [`BusError::Unknown`] none of them was taken. A batch the bus has not
    /// started to send after `withdraw_after` is withdrawn (an error: it was
    /// published nowhere); one it started to send is waited for until the
    /// bus answers, in a time the engine bounds.
    fn publish(
        &self,
        batch: Vec<Arc<Envelope>>,
        withdraw_after: Duration,
    ) -> BoxFuture<'_, Result<(), BusError>>;

    /// Carries control records (opaque bytes) to every node, this one
    /// included, in this order and in the same order as every other
    /// node's. Resolves `Ok` once the bus has taken them.
    fn announce(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<(), BusError>>;

    /// Carries admin changes (and snapshots of them) like
    /// [`Bus::announce`], on the log a restarted node reads again: one
    /// place on a cluster bus, never another (refused while it is down),
    /// so that every change is where a node resumes reading.
    fn append_to_log(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<(), BusError>> {
        self.announce(records)
    }

    /// Whether other nodes receive what this bus carries.
    fn reaches_other_nodes(&self) -> bool;

    /// Whether pushes to users go only to the nodes `router` names (a
    /// cluster bus set to route them); the bus keeps `router` if so.
    fn route_with(&self, _router: Arc<dyn Router>) -> bool {
        false
    }

    /// Whether this bus routes pushes to their users' nodes: a client that
    /// resumes here then reads what it missed back from the bus
    /// ([`Bus::read_back`]), after a marker ([`Bus::mark`]).
    fn routes(&self) -> bool {
        false
    }

    /// Sends `marker` (see [`envelope::marker`]) into its tenant's stream,
    /// to this node only: once it is dispatched here, every message stored
    /// in the stream before it has been stored.
    fn mark(&self, _marker: Envelope) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Err(NotTaken::NotReady("this bus does not route".into()).into()) })
    }

    /// The messages stored in stream `since.stream` after `since` and up
    /// to `through` (an offset of the same stream), oldest first, each
    /// with its position.
    fn read_back(
        &self,
        _since: Position,
        _through: u64,
    ) -> BoxFuture<'_, Result<ReadBack, BusError>> {
        Box::pin(async { Err(NotTaken::NotReady("this bus does not route".into()).into()) })
    }

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

/// Where a control record is kept in a cluster bus: its queue and its
/// offset there. The cluster part keeps the position of the last change it
/// applied with its state, so that a restarted node reads the control
/// records after it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlPosition {
    pub broker: String,
    pub queue: u32,
    pub offset: u64,
}

/// Records a cluster bus stored longer than this before the node started
/// are history, read again only for the admin changes among them (the
/// margin keeps a broker's clock a little behind from hiding news).
pub(crate) const HISTORY_MARGIN_MS: u64 = 5_000;

/// Where a cluster bus starts reading control records at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeControl {
    /// From the newest (what a node without a state of its own does not
    /// need to read again).
    Now,
    /// From the record after this one (a node that kept its state).
    After(ControlPosition),
    /// From the first record the broker still keeps (a node with an empty
    /// state directory).
    FromStart,
}

/// What the bus hands to the cluster part, in the order it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A control record, from any node (this one included): where the bus
    /// keeps it (a cluster bus) and when it was stored.
    Control {
        record: Vec<u8>,
        position: Option<ControlPosition>,
        stored_at_ms: u64,
    },
    /// This node's own probe came back: every control record stored before
    /// it was handed on before it.
    OwnProbe,
    /// The bus resumed reading control records at `first_read` rather than
    /// at `missing`: the records between are gone (the broker no longer
    /// keeps them).
    ControlLost {
        missing: ControlPosition,
        first_read: u64,
    },
    /// Another node's probe: it is alive; a new `started_at_micros` means
    /// it restarted.
    PeerProbe {
        node: String,
        started_at_micros: u64,
        /// Its routing report, if it routes pushes to their users' nodes.
        routing: Option<RoutingReport>,
    },
}

/// Control records waiting for the cluster part.
pub(crate) const INBOUND_QUEUE: usize = 1_024;

/// A started engine: the bus, the dispatcher's receiver, and what arrives
/// for the cluster part.
pub(crate) struct StartedBus {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) envelopes: BusReceiver,
    pub(crate) inbound: mpsc::Receiver<Inbound>,
}

/// Starts the engine `config` names, as node `instance`; a cluster bus
/// reads control records from where `resume` says.
pub(crate) fn start(
    config: &BusConfig,
    instance: &str,
    resume: ResumeControl,
) -> std::io::Result<StartedBus> {
    Ok(match config.engine {
        BusEngine::Local => {
            let (bus, envelopes, inbound) = local::LocalBus::new(config.local_queue);
            StartedBus {
                bus: Arc::new(bus),
                envelopes,
                inbound,
            }
        }
        BusEngine::Rocketmq => {
            let (bus, envelopes, inbound) = rocketmq::RocketmqBus::start(
                config.rocketmq.clone(),
                instance.to_owned(),
                config.local_queue,
                resume,
            )?;
            StartedBus {
                bus: Arc::new(bus),
                envelopes,
                inbound,
            }
        }
    })
}
