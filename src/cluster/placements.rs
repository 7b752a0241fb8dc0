//! Which node holds each connection of each user, kept compactly: every
//! routing node keeps it for every user of the cluster
//! ([`super::locations`]), so its size per user is paid once per node — at
//! a million users on fifty nodes, fifty million entries.
//!
//! A user with one connection (most) costs its map slot alone, 32 bytes
//! (about 50 with the map's spare room, by the sizes, not measured apart):
//! the node is an index into a table of names, the time it opened is kept
//! to the second, and only a user with several connections has an
//! allocation of its own. (A vector per user, with the node's name and the
//! time in microseconds, came to ~90 bytes by the same count.)

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

/// A node's place in [`Placements`]' table of names.
type NodeIndex = u32;

/// One connection of a user.
#[derive(Clone, Copy)]
struct Held {
    connection: u64,
    /// Seconds since the Unix epoch, rounded down: a node that restarted
    /// within the second keeps the older run's connections too, which errs
    /// on the safe side (a push routed to a node more).
    opened_at_secs: u32,
    node: NodeIndex,
}

/// A user's connections: one inline, more in a slice of their own.
enum Placement {
    One(Held),
    Many(Box<[Held]>),
}

impl Placement {
    fn all(&self) -> &[Held] {
        match self {
            Self::One(held) => std::slice::from_ref(held),
            Self::Many(all) => all,
        }
    }

    /// Keeps the connections `keep` says; false when none is left.
    fn retain(&mut self, mut keep: impl FnMut(&Held) -> bool) -> bool {
        match self {
            Self::One(held) => keep(held),
            Self::Many(all) => {
                let kept: Vec<Held> = all.iter().copied().filter(|h| keep(h)).collect();
                match kept.as_slice() {
                    [] => return false,
                    [one] => *self = Self::One(*one),
                    _ => *self = Self::Many(kept.into_boxed_slice()),
                }
                true
            }
        }
    }
}

/// Every user's connections by node, keyed by the user's hash (two users
/// sharing one only share their nodes: a push routed to a node more).
#[derive(Default)]
pub(super) struct Placements {
    users: DashMap<u64, Placement>,
    names: RwLock<NodeNames>,
}

#[derive(Default)]
struct NodeNames {
    index: HashMap<Arc<str>, NodeIndex>,
    names: Vec<Arc<str>>,
}

fn seconds(micros: u64) -> u32 {
    u32::try_from(micros / 1_000_000).unwrap_or(u32::MAX)
}

impl Placements {
    /// `node`'s index, if it was ever named here.
    fn known(&self, node: &str) -> Option<NodeIndex> {
        self.names
            .read()
            .expect("node names")
            .index
            .get(node)
            .copied()
    }

    /// `node`'s index, named now if it is new.
    fn index_of(&self, node: &str) -> NodeIndex {
        if let Some(index) = self.names.read().expect("node names").index.get(node) {
            return *index;
        }
        let mut names = self.names.write().expect("node names");
        if let Some(index) = names.index.get(node) {
            return *index;
        }
        let index = NodeIndex::try_from(names.names.len()).expect("fewer than 2^32 node names");
        let name: Arc<str> = Arc::from(node);
        names.names.push(name.clone());
        names.index.insert(name, index);
        index
    }

    /// `node` holds `connection` of the user `key`.
    pub(super) fn held(&self, key: u64, node: &str, connection: u64, opened_at_micros: u64) {
        let held = Held {
            connection,
            opened_at_secs: seconds(opened_at_micros),
            node: self.index_of(node),
        };
        let same = |h: &Held| h.connection == connection && h.node == held.node;
        match self.users.entry(key) {
            dashmap::mapref::entry::Entry::Vacant(vacant) => {
                vacant.insert(Placement::One(held));
            }
            dashmap::mapref::entry::Entry::Occupied(mut occupied) => {
                let placement = occupied.get_mut();
                if !placement.all().iter().any(same) {
                    let mut all = placement.all().to_vec();
                    all.push(held);
                    *placement = Placement::Many(all.into_boxed_slice());
                }
            }
        }
    }

    /// `connection` of the user `key` on `node` ended.
    pub(super) fn closed(&self, key: u64, node: &str, connection: u64) {
        let Some(node) = self.known(node) else {
            return;
        };
        self.users.remove_if_mut(&key, |_, placement| {
            !placement.retain(|h| !(h.connection == connection && h.node == node))
        });
    }

    /// Forgets `node`'s connections (opened before `opened_before_micros`
    /// only, when it restarted: the newer ones are its new run's).
    pub(super) fn forget_node(&self, node: &str, opened_before_micros: Option<u64>) {
        let Some(node) = self.known(node) else {
            return;
        };
        let before = opened_before_micros.map(seconds);
        self.users.retain(|_, placement| {
            placement.retain(|h| h.node != node || before.is_some_and(|t| h.opened_at_secs >= t))
        });
    }

    /// Calls `visit` with the node of each connection of the user `key`.
    pub(super) fn for_each_node(&self, key: u64, mut visit: impl FnMut(&Arc<str>)) {
        let Some(placement) = self.users.get(&key) else {
            return;
        };
        let names = self.names.read().expect("node names");
        for held in placement.all() {
            visit(&names.names[held.node as usize]);
        }
    }

    /// Users with a connection somewhere.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_keeps_each_connection_once_and_goes_with_the_last() {
        assert_eq!(std::mem::size_of::<Placement>(), 24);
        let map = Placements::default();
        map.held(1, "a", 10, 0);
        map.held(1, "a", 10, 0);
        map.held(1, "b", 11, 0);
        let nodes = |key| {
            let mut nodes = Vec::new();
            map.for_each_node(key, |node| nodes.push(node.to_string()));
            nodes
        };
        assert_eq!(nodes(1), ["a", "b"]);
        map.closed(1, "a", 10);
        assert_eq!(nodes(1), ["b"]);
        map.closed(1, "b", 11);
        assert!(nodes(1).is_empty());
        assert_eq!(map.len(), 0);
    }
}
