//! Each tenant's figures over the whole cluster, for the console: every
//! `admin.figures_every` each node takes its own (connections it holds,
//! users it owns that are online anywhere, messages pushed and delivered)
//! and puts them on the control queue; every node keeps the latest of
//! each other node and sums them with its own. Counting a user at its
//! owner only makes the sum count each online user once, whichever nodes
//! hold its connections. A node gone, or silent for three intervals, no
//! longer counts.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::Cluster;
use super::change::{Change, TenantFigures};
use crate::metrics::tenant_totals;
use crate::sync::lock;

/// Intervals after which a node's figures no longer count.
const STALE_AFTER_INTERVALS: u32 = 3;

/// A tenant's figures summed over the nodes that count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ClusterFigures {
    pub(crate) connections: u64,
    pub(crate) users: u64,
    pub(crate) pushed_per_second: f64,
    pub(crate) delivered_per_second: f64,
    /// Nodes whose figures are in the sum, this one included.
    pub(crate) nodes: usize,
}

/// One node's latest figures.
struct NodeFigures {
    received: Instant,
    interval: Duration,
    tenants: HashMap<String, TenantFigures>,
}

pub(super) struct Figures {
    every: Duration,
    own: std::sync::Mutex<NodeFigures>,
    peers: DashMap<String, NodeFigures>,
}

impl Figures {
    pub(super) fn new(every: Duration) -> Self {
        Self {
            every,
            own: std::sync::Mutex::new(NodeFigures {
                received: Instant::now(),
                interval: every,
                tenants: HashMap::new(),
            }),
            peers: DashMap::new(),
        }
    }
}

impl NodeFigures {
    fn add_to(&self, tenant: &str, sum: &mut ClusterFigures) {
        sum.nodes += 1;
        let Some(figures) = self.tenants.get(tenant) else {
            return;
        };
        let seconds = self.interval.as_secs_f64().max(0.001);
        sum.connections += figures.connections;
        sum.users += figures.users;
        sum.pushed_per_second += figures.pushed as f64 / seconds;
        sum.delivered_per_second += figures.delivered as f64 / seconds;
    }
}

impl Cluster {
    /// Takes this node's figures every interval and shares them.
    pub(crate) async fn take_figures(self: std::sync::Arc<Self>) {
        let every = self.figures.every;
        let mut last_totals: HashMap<String, (u64, u64)> = HashMap::new();
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let mut taken = HashMap::new();
            for tenant in self.state.tenants.snapshot().iter() {
                let name: &str = &tenant.name;
                let totals = tenant_totals(name);
                let now = (
                    totals.pushed.load(std::sync::atomic::Ordering::Relaxed),
                    totals.delivered.load(std::sync::atomic::Ordering::Relaxed),
                );
                let before = last_totals.insert(name.to_owned(), now).unwrap_or(now);
                let figures = TenantFigures {
                    tenant: name.to_owned(),
                    connections: self.state.sessions.tenant_connections(name) as u64,
                    users: self.owned_users_online(name),
                    pushed: now.0.saturating_sub(before.0),
                    delivered: now.1.saturating_sub(before.1),
                };
                taken.insert(name.to_owned(), figures);
            }
            last_totals.retain(|name, _| taken.contains_key(name));
            let shared: Vec<TenantFigures> = taken
                .values()
                .filter(|f| f.connections + f.users + f.pushed + f.delivered > 0)
                .cloned()
                .collect();
            *lock(&self.figures.own) = NodeFigures {
                received: Instant::now(),
                interval: every,
                tenants: taken,
            };
            if self.replicates_connections {
                self.queue_connection_event(Change::Figures {
                    interval_ms: every.as_millis() as u64,
                    tenants: shared,
                });
                self.announce_pusher_channels();
            }
        }
    }

    /// Users of `tenant` this node owns that hold a connection anywhere.
    fn owned_users_online(&self, tenant: &str) -> u64 {
        let mut users: HashSet<std::sync::Arc<str>> = HashSet::new();
        self.state.sessions.for_each_of_tenant(tenant, |handle| {
            let user = handle.user();
            if !users.contains(user) && self.membership.owns(tenant, user) {
                users.insert(user.clone());
            }
        });
        self.state.remote.for_each_user(tenant, |user| {
            if !users.contains(user) {
                users.insert(std::sync::Arc::from(user));
            }
        });
        users.len() as u64
    }

    /// Node `origin`'s figures arrived.
    pub(super) fn figures_received(
        &self,
        origin: &str,
        interval_ms: u64,
        tenants: Vec<TenantFigures>,
    ) {
        let figures = NodeFigures {
            received: Instant::now(),
            interval: Duration::from_millis(interval_ms),
            tenants: tenants.into_iter().map(|f| (f.tenant.clone(), f)).collect(),
        };
        self.figures.peers.insert(origin.to_owned(), figures);
    }

    /// Forgets what node `node` said (it is gone).
    pub(super) fn forget_figures_of(&self, node: &str) {
        self.figures.peers.remove(node);
    }

    /// `tenant`'s figures: this node's latest, plus every live node's that
    /// is recent.
    pub(crate) fn figures(&self, tenant: &str) -> ClusterFigures {
        let mut sum = ClusterFigures::default();
        lock(&self.figures.own).add_to(tenant, &mut sum);
        for peer in self.figures.peers.iter() {
            let fresh = peer.received.elapsed() < peer.interval * STALE_AFTER_INTERVALS;
            if fresh && self.peers.contains_key(peer.key()) {
                peer.add_to(tenant, &mut sum);
            }
        }
        sum
    }
}
