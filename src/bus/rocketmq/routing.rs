//! Routing pushes to the nodes that hold their users
//! (`bus.rocketmq.route_to_holders`): each message is tagged with the node
//! it is for, and each node's consumer asks the broker only for messages
//! tagged for it or for every node. A node that holds none of a push's
//! users never pulls it: the broker filters by tag as it reads its queue.
//!
//! A push for users on several nodes goes as one copy per node, in one
//! batch, so that the copies sit next to each other in their tenant's
//! queue; each carries its index among them, and every node gives the
//! message the position of its first copy — the same position everywhere,
//! as without routing.
//!
//! The broker keeps one subscription per consumer group, so a routing node
//! consumes in a group of its own (`<consumer_group>-<node tag>`).

use std::sync::Arc;

use rocketmq_model::common::message::message_ext::MessageExt;

use crate::bus::envelope::Envelope;
use crate::bus::{Destinations, MOST_COPIES};
use crate::stable_hash::stable_hash;

/// The tag of what every node reads: control records, probes, broadcasts,
/// topic pushes (and, on a bus that does not route, everything).
pub(super) const EVERY_NODE: &str = "all";
/// The tag of a push none of whose users is connected: stored (a client
/// that resumes reads it back), pulled by nobody.
const NO_NODE: &str = "none";
/// The message property that carries a copy's index among its push's copies.
const COPY_PROPERTY: &str = "PGCOPY";

/// The tag of what node `node` reads: its name hashed (names may hold
/// characters a tag expression cannot).
pub(super) fn node_tag(node: &str) -> String {
    format!("n{:016x}", stable_hash(node.as_bytes()))
}

/// The tag expression node `node` subscribes with. Without spaces: the
/// client hashes each tag for the broker's filter before trimming it.
pub(super) fn subscription(node: &str, routes: bool) -> String {
    if routes {
        format!("{}||{EVERY_NODE}", node_tag(node))
    } else {
        "*".to_owned()
    }
}

/// The consumer group node `node` consumes in.
pub(super) fn consumer_group(group: &str, node: &str, routes: bool) -> String {
    if routes {
        format!("{group}-{}", node_tag(node))
    } else {
        group.to_owned()
    }
}

/// One message to send: its body, its tag, its index among its push's copies.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub(super) body: Arc<[u8]>,
    /// None: untagged, as a node of an older version sends (a tool's raw
    /// records).
    pub(super) tag: Option<Arc<str>>,
    pub(super) copy: u8,
}

impl Outgoing {
    /// One record, tagged `tag` (none: untagged).
    fn once(body: impl Into<Arc<[u8]>>, tag: Option<&str>) -> Self {
        Self {
            body: body.into(),
            tag: tag.map(Arc::from),
            copy: 0,
        }
    }

    /// A record every node reads.
    pub(super) fn to_every_node(body: Vec<u8>) -> Self {
        Self::once(body, Some(EVERY_NODE))
    }

    /// A record without a tag, as a node of an older version sends it.
    pub(super) fn untagged(body: Vec<u8>) -> Self {
        Self::once(body, None)
    }

    /// A record only `node` reads (a drain's barrier, a marker).
    pub(super) fn to_node(body: Vec<u8>, node: &str) -> Self {
        Self::once(body, Some(&node_tag(node)))
    }

    /// The messages of `envelope`, for `destinations`.
    pub(super) fn for_envelope(envelope: &Envelope, destinations: &Destinations) -> Vec<Self> {
        let body: Arc<[u8]> = envelope.encode().into();
        match destinations {
            Destinations::Nodes(nodes) if nodes.is_empty() => vec![Self::once(body, Some(NO_NODE))],
            Destinations::Nodes(nodes) if nodes.len() <= MOST_COPIES => nodes
                .iter()
                .enumerate()
                .map(|(copy, node)| Self {
                    body: body.clone(),
                    tag: Some(Arc::from(node_tag(node))),
                    copy: copy as u8,
                })
                .collect(),
            Destinations::Nodes(_) | Destinations::Everywhere => {
                vec![Self::once(body, Some(EVERY_NODE))]
            }
        }
    }

    /// Bytes on the wire (for the batch limits).
    pub(super) fn len(&self) -> usize {
        self.body.len()
    }

    /// The copy index as the message property says it.
    pub(super) fn copy_property(&self) -> Option<(&'static str, String)> {
        (self.copy > 0).then(|| (COPY_PROPERTY, self.copy.to_string()))
    }
}

/// What a consumed message is to this node.
pub(super) enum Received {
    /// For this node (or every node): the index of this copy among its
    /// push's copies (0 for a message sent once).
    Ours { copy: u64 },
    /// Without a tag: from a node of an older version (for every node).
    Untagged,
    /// Tagged for another node: a node that consumes everything (`*`)
    /// skips it, since that node delivers it.
    Others,
}

/// The index of `msg` among its push's copies, whoever it is for.
pub(super) fn copy_of(msg: &MessageExt) -> u64 {
    msg.message_inner()
        .property(COPY_PROPERTY)
        .and_then(|copy| copy.parse().ok())
        .unwrap_or(0)
}

/// Whether `msg` is for node `own_tag`.
pub(super) fn received(msg: &MessageExt, own_tag: &str) -> Received {
    let inner = msg.message_inner();
    match inner.tags() {
        None => Received::Untagged,
        Some(tag) if tag == EVERY_NODE || tag == own_tag => Received::Ours { copy: copy_of(msg) },
        Some(_) => Received::Others,
    }
}
