//! Which node owns a user: the one node that keeps the user's connection
//! list for the per-user cap and answers presence for it.
//!
//! Rendezvous (highest random weight) hashing over the live nodes: each
//! node scores each user, the highest score owns it. Every node computes
//! the same owner from the same list of live nodes without asking anyone,
//! and when a node joins or leaves only the users it wins or held move —
//! about 1/N of them — so a membership change re-announces that share of
//! the connections, not all of them.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::stable_hash::stable_hash;

/// The live nodes as this node knows them, itself included.
pub(crate) struct Membership {
    this: Arc<str>,
    /// Sorted by name; replaced whole on a change.
    members: ArcSwap<Vec<Arc<str>>>,
}

/// One user of one tenant, hashed once for scoring against every node.
#[derive(Clone, Copy)]
pub(crate) struct UserKey(u64);

impl UserKey {
    pub(crate) fn new(tenant: &str, user: &str) -> Self {
        // Hashed apart, so that ("ab", "c") and ("a", "bc") differ.
        let tenant_hash = stable_hash(tenant.as_bytes());
        Self(mix(tenant_hash ^ mix(stable_hash(user.as_bytes()))))
    }

    /// The user's hash, as a map key.
    pub(crate) fn hash(self) -> u64 {
        self.0
    }
}

/// A 64-bit finaliser (SplitMix64's): FNV alone avalanches poorly, and
/// rendezvous needs scores that look independent for every node and user.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The owner of `key` among `members` (which must not be empty).
fn owner_among(members: &[Arc<str>], key: UserKey) -> &Arc<str> {
    members
        .iter()
        .max_by_key(|node| (mix(stable_hash(node.as_bytes()) ^ key.0), &***node))
        .expect("the membership always holds this node")
}

impl Membership {
    /// Only this node, until it hears of others.
    pub(crate) fn new(this: &str) -> Self {
        let this: Arc<str> = Arc::from(this);
        Self {
            members: ArcSwap::from_pointee(vec![this.clone()]),
            this,
        }
    }

    /// This node's name.
    pub(crate) fn this(&self) -> &Arc<str> {
        &self.this
    }

    /// The node that owns `user` of `tenant` now.
    pub(crate) fn owner(&self, tenant: &str, user: &str) -> Arc<str> {
        owner_among(&self.members.load(), UserKey::new(tenant, user)).clone()
    }

    /// The node that owns `task` among the live nodes other than `except`
    /// (this node if it is alone).
    pub(crate) fn owner_except(&self, task: &str, except: &str) -> Arc<str> {
        let members = self.members.load();
        let others: Vec<Arc<str>> = members
            .iter()
            .filter(|node| ***node != *except)
            .cloned()
            .collect();
        if others.is_empty() {
            return self.this.clone();
        }
        owner_among(&others, UserKey::new("", task)).clone()
    }

    /// True if this node owns `user` of `tenant`.
    pub(crate) fn owns(&self, tenant: &str, user: &str) -> bool {
        self.owner(tenant, user) == self.this
    }

    /// Replaces the other nodes with `peers`; returns the view before and
    /// after, or `None` if nothing changed.
    pub(crate) fn set_peers<'a>(
        &self,
        peers: impl IntoIterator<Item = &'a str>,
    ) -> Option<(View, View)> {
        let mut members: Vec<Arc<str>> = peers
            .into_iter()
            .filter(|peer| **peer != *self.this)
            .map(Arc::from)
            .chain([self.this.clone()])
            .collect();
        members.sort_unstable();
        members.dedup();
        let before = self.members.load_full();
        if *before == members {
            return None;
        }
        let after = Arc::new(members);
        self.members.store(after.clone());
        Some((View(before), View(after)))
    }

    /// The live nodes now.
    pub(crate) fn view(&self) -> View {
        View(self.members.load_full())
    }
}

/// The live nodes at one moment.
#[derive(Clone)]
pub(crate) struct View(Arc<Vec<Arc<str>>>);

impl View {
    pub(crate) fn owner(&self, tenant: &str, user: &str) -> &Arc<str> {
        owner_among(&self.0, UserKey::new(tenant, user))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(membership: &Membership, users: usize) -> Vec<Arc<str>> {
        (0..users)
            .map(|u| membership.owner("acme", &format!("user-{u}")))
            .collect()
    }

    #[test]
    fn users_spread_evenly_and_a_join_moves_only_the_newcomers_share() {
        let a = Membership::new("a");
        assert!(a.owns("acme", "anyone"), "alone, a node owns everyone");
        a.set_peers(["b", "c"]).unwrap();
        let before = owners(&a, 30_000);
        for node in ["a", "b", "c"] {
            let share = before.iter().filter(|o| ***o == *node).count();
            assert!((9_000..11_000).contains(&share), "{node} owns {share}");
        }
        let (_, after_view) = a.set_peers(["b", "c", "d"]).unwrap();
        assert_eq!(after_view.len(), 4);
        let after = owners(&a, 30_000);
        let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
        assert!(
            moved.iter().all(|(_, now)| &***now == "d"),
            "only users d wins move"
        );
        assert!((6_500..8_500).contains(&moved.len()), "{}", moved.len());
        assert!(a.set_peers(["d", "c", "b", "a"]).is_none(), "same nodes");
    }

    #[test]
    fn every_node_agrees_on_the_owner() {
        let (a, b) = (Membership::new("a"), Membership::new("b"));
        a.set_peers(["b", "c"]).unwrap();
        b.set_peers(["c", "a"]).unwrap();
        assert_eq!(owners(&a, 1_000), owners(&b, 1_000));
    }
}
