//! Who is on each Pusher channel, across the cluster: each node counts
//! its own subscriptions and presence members ([`Channels::join`],
//! [`Channels::leave`]) and tells the others its part of a channel
//! whenever it changes, and again every figures interval (so a node that
//! joins later learns every channel within one); a node that goes has its
//! parts forgotten ([`Channels::forget_node`]).
//!
//! A change made here is judged against the whole cluster as this node
//! knows it: the first subscription anywhere occupies a channel, a user's
//! first connection on a presence channel anywhere adds a member. The node
//! where the change happened sends what follows from it (the member
//! events, the webhooks); for a node that went, the channel's owner node
//! does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::sync::lock;

/// One node's part of one channel, as it tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelPart {
    pub tenant: String,
    pub channel: String,
    /// Subscriptions this node holds.
    pub subscriptions: u32,
    /// Presence members on this node: user id, `user_info` as JSON text.
    pub members: Vec<(String, String)>,
}

/// A presence member on this node.
#[derive(Debug, Clone, Default)]
struct LocalMember {
    info: String,
    connections: u32,
}

#[derive(Debug, Default)]
struct LocalChannel {
    subscriptions: u32,
    members: BTreeMap<String, LocalMember>,
}

type ChannelKey = (String, String);

/// What a change made of a channel, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Occupied,
    Vacated,
    /// A user's first connection on the channel: id, `user_info` (JSON).
    MemberAdded(String, String),
    MemberRemoved(String),
}

/// A channel's state across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelView {
    pub subscriptions: u64,
    /// Presence members: user id → `user_info` (JSON text).
    pub members: BTreeMap<String, String>,
}

/// The directory of Pusher channels this node knows.
#[derive(Default)]
pub struct Channels {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    local: HashMap<ChannelKey, LocalChannel>,
    /// Other nodes' parts: channel → node → part.
    remote: HashMap<ChannelKey, HashMap<String, ChannelPart>>,
}

impl State {
    fn view(&self, key: &ChannelKey) -> ChannelView {
        let mut view = ChannelView::default();
        if let Some(local) = self.local.get(key) {
            view.subscriptions += u64::from(local.subscriptions);
            for (id, member) in &local.members {
                view.members.insert(id.clone(), member.info.clone());
            }
        }
        for part in self.remote.get(key).into_iter().flat_map(|n| n.values()) {
            view.subscriptions += u64::from(part.subscriptions);
            for (id, info) in &part.members {
                view.members
                    .entry(id.clone())
                    .or_insert_with(|| info.clone());
            }
        }
        view
    }

    fn local_part(&self, key: &ChannelKey) -> ChannelPart {
        let local = self.local.get(key);
        ChannelPart {
            tenant: key.0.clone(),
            channel: key.1.clone(),
            subscriptions: local.map_or(0, |l| l.subscriptions),
            members: local
                .map(|l| {
                    l.members
                        .iter()
                        .map(|(id, m)| (id.clone(), m.info.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// What went from `before` to `after`.
fn transitions(before: &ChannelView, after: &ChannelView) -> Vec<Transition> {
    let mut changes = Vec::new();
    if before.subscriptions == 0 && after.subscriptions > 0 {
        changes.push(Transition::Occupied);
    }
    for (id, info) in &after.members {
        if !before.members.contains_key(id) {
            changes.push(Transition::MemberAdded(id.clone(), info.clone()));
        }
    }
    for id in before.members.keys() {
        if !after.members.contains_key(id) {
            changes.push(Transition::MemberRemoved(id.clone()));
        }
    }
    if before.subscriptions > 0 && after.subscriptions == 0 {
        changes.push(Transition::Vacated);
    }
    changes
}

/// A change of this node's part: what it made of the channel, and the
/// part to tell the other nodes.
#[derive(Debug)]
pub struct Changed {
    pub transitions: Vec<Transition>,
    pub part: ChannelPart,
}

impl Channels {
    /// A subscription of this node to `channel`, as presence member
    /// `member` (id, `user_info`) if it is one.
    pub fn join(&self, tenant: &str, channel: &str, member: Option<(&str, &str)>) -> Changed {
        self.change(tenant, channel, |local| {
            local.subscriptions += 1;
            if let Some((id, info)) = member {
                let entry = local.members.entry(id.to_owned()).or_default();
                entry.info = info.to_owned();
                entry.connections += 1;
            }
        })
    }

    /// The end of a subscription [`join`](Self::join) made.
    pub fn leave(&self, tenant: &str, channel: &str, member: Option<&str>) -> Changed {
        self.change(tenant, channel, |local| {
            local.subscriptions = local.subscriptions.saturating_sub(1);
            if let Some(id) = member
                && let Some(entry) = local.members.get_mut(id)
            {
                entry.connections -= 1;
                if entry.connections == 0 {
                    local.members.remove(id);
                }
            }
        })
    }

    fn change(&self, tenant: &str, channel: &str, edit: impl FnOnce(&mut LocalChannel)) -> Changed {
        let key = (tenant.to_owned(), channel.to_owned());
        let mut state = lock(&self.state);
        let before = state.view(&key);
        let local = state.local.entry(key.clone()).or_default();
        edit(local);
        if local.subscriptions == 0 && local.members.is_empty() {
            state.local.remove(&key);
        }
        let after = state.view(&key);
        Changed {
            transitions: transitions(&before, &after),
            part: state.local_part(&key),
        }
    }

    /// Node `node` told its part of a channel.
    pub fn apply(&self, node: &str, part: ChannelPart) {
        let key = (part.tenant.clone(), part.channel.clone());
        let mut state = lock(&self.state);
        let nodes = state.remote.entry(key.clone()).or_default();
        if part.subscriptions == 0 && part.members.is_empty() {
            nodes.remove(node);
            if nodes.is_empty() {
                state.remote.remove(&key);
            }
        } else {
            nodes.insert(node.to_owned(), part);
        }
    }

    /// Forgets node `node`'s parts (it is gone): each channel it changed,
    /// with what that made of it.
    pub fn forget_node(&self, node: &str) -> Vec<(String, String, Vec<Transition>)> {
        let mut state = lock(&self.state);
        let keys: Vec<ChannelKey> = state
            .remote
            .iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(key, _)| key.clone())
            .collect();
        let mut changed = Vec::new();
        for key in keys {
            let before = state.view(&key);
            if let Some(nodes) = state.remote.get_mut(&key) {
                nodes.remove(node);
                if nodes.is_empty() {
                    state.remote.remove(&key);
                }
            }
            let after = state.view(&key);
            changed.push((key.0, key.1, transitions(&before, &after)));
        }
        changed
    }

    /// This node's part of every channel it has subscriptions on.
    pub fn own_parts(&self) -> Vec<ChannelPart> {
        let state = lock(&self.state);
        state
            .local
            .keys()
            .map(|key| state.local_part(key))
            .collect()
    }

    /// `channel` of `tenant` across the cluster.
    pub fn view(&self, tenant: &str, channel: &str) -> ChannelView {
        lock(&self.state).view(&(tenant.to_owned(), channel.to_owned()))
    }

    /// Every occupied channel of `tenant` across the cluster.
    pub fn occupied(&self, tenant: &str) -> BTreeMap<String, ChannelView> {
        let state = lock(&self.state);
        let names: HashSet<&String> = state
            .local
            .keys()
            .chain(state.remote.keys())
            .filter(|(t, _)| t == tenant)
            .map(|(_, channel)| channel)
            .collect();
        names
            .into_iter()
            .map(|name| (name.clone(), state.view(&(tenant.to_owned(), name.clone()))))
            .filter(|(_, view)| view.subscriptions > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_is_occupied_and_vacated_once_across_nodes() {
        let channels = Channels::default();
        let first = channels.join("t", "news", None);
        assert_eq!(first.transitions, vec![Transition::Occupied]);
        assert_eq!(first.part.subscriptions, 1);
        channels.apply(
            "b",
            ChannelPart {
                tenant: "t".into(),
                channel: "news".into(),
                subscriptions: 2,
                members: vec![],
            },
        );
        assert_eq!(channels.view("t", "news").subscriptions, 3);
        // The other node still holds it: not vacated.
        assert!(channels.leave("t", "news", None).transitions.is_empty());
        let gone = channels.forget_node("b");
        assert_eq!(
            gone,
            vec![("t".into(), "news".into(), vec![Transition::Vacated])]
        );
        assert!(channels.occupied("t").is_empty());
    }

    #[test]
    fn a_member_is_added_by_its_first_connection_anywhere_and_removed_by_its_last() {
        let channels = Channels::default();
        let added = channels.join("t", "presence-r", Some(("ann", r#"{"n":1}"#)));
        assert_eq!(
            added.transitions,
            vec![
                Transition::Occupied,
                Transition::MemberAdded("ann".into(), r#"{"n":1}"#.into())
            ]
        );
        assert!(
            channels
                .join("t", "presence-r", Some(("ann", "{}")))
                .transitions
                .is_empty()
        );
        channels.apply(
            "b",
            ChannelPart {
                tenant: "t".into(),
                channel: "presence-r".into(),
                subscriptions: 1,
                members: vec![("ann".into(), "{}".into())],
            },
        );
        assert!(
            channels
                .leave("t", "presence-r", Some("ann"))
                .transitions
                .is_empty()
        );
        assert!(
            channels
                .leave("t", "presence-r", Some("ann"))
                .transitions
                .is_empty()
        );
        assert_eq!(
            channels.forget_node("b"),
            vec![(
                "t".into(),
                "presence-r".into(),
                vec![Transition::MemberRemoved("ann".into()), Transition::Vacated]
            )]
        );
    }
}
