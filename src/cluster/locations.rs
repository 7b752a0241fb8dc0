//! Where each user's connections are, as every node knows it when the bus
//! routes pushes to their users' nodes (`bus.rocketmq.route_to_holders`):
//! kept from this node's own connections and from the other nodes'
//! connection announcements (which every node reads), so that a push is
//! routed without asking anyone.
//!
//! How stale it may be: another node's connection is known here once its
//! announcement was read (the control queue's lag, milliseconds when the
//! broker is healthy). A node that just started knows only what was
//! announced since: it sends every push to every node until the others
//! have announced their connections to it again (they do when it joins)
//! and for a few heartbeats after it started.
//!
//! Routing to more nodes than needed is always safe (a node delivers only
//! to connections it holds); the map only ever errs that way for the
//! nodes that left: their entries go when they are seen gone.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use super::ownership::UserKey;
use super::placements::Placements;
use crate::bus::envelope::{Envelope, RoutingReport, Target};
use crate::bus::{ControlPosition, Destinations, MOST_COPIES, Router};
use crate::sync::lock;

/// Checkpoints of this node's fence kept at most (older ones are dropped:
/// the fence then advances in coarser steps).
const MOST_CHECKPOINTS: usize = 4_096;

/// Every user's connections, by node; this node's fence; the other nodes'.
pub(crate) struct Locations {
    users: Placements,
    /// Until then this node sends every push everywhere: it has not heard
    /// every connection opened before it started yet.
    routes_from: Instant,
    /// False while a live node does not route (it consumes everything and
    /// does not announce every connection): pushes then go everywhere.
    everyone_routes: AtomicBool,
    /// Whether this node routed the last push it routed (for the gauge).
    routing: AtomicBool,
    fence: std::sync::Mutex<Fence>,
    /// The other nodes' latest reports (`None`: a node that does not
    /// route), and when each came.
    reports: std::sync::Mutex<HashMap<String, (Option<RoutingReport>, Instant)>>,
    /// A node silent this long no longer holds a fence back: whatever it
    /// routed before it went silent is stored by then, or never will be.
    silent_after: Duration,
    /// Signalled on each report from another node.
    reported: Notify,
    /// Asks the bus for an early probe.
    probe_soon: Notify,
    /// This node's connections waiting to hear where their announcement
    /// was applied, by id.
    announcing: std::sync::Mutex<HashMap<u64, oneshot::Sender<RoutingReport>>>,
}

/// Connection announcements among the control records applied.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Announcement {
    /// This node's connections with these ids.
    Own(Vec<u64>),
    /// Another node's.
    Others,
}

/// How far this node's routing is fenced: the control positions it
/// applied, each with the number of pushes routed before it; a position is
/// fenced once every push routed before it was answered by the broker.
#[derive(Default)]
struct Fence {
    next_publish: u64,
    in_flight: BTreeSet<u64>,
    checkpoints: VecDeque<(RoutingReport, u64)>,
    fenced: Option<RoutingReport>,
}

/// Held while a batch of pushes routed by this node's view is on its way.
struct Publishing {
    locations: Arc<Locations>,
    seq: u64,
}

impl Drop for Publishing {
    fn drop(&mut self) {
        lock(&self.locations.fence).in_flight.remove(&self.seq);
    }
}

/// The stream id of the control queue at `position` (as a message
/// position's).
pub(crate) fn control_stream(position: &ControlPosition) -> u64 {
    crate::bus::envelope::Position::stream_of(&position.broker, position.queue)
}

impl Locations {
    /// An empty map, which routes after `settle`; a node silent for
    /// `silent_after` no longer holds fences back.
    pub(crate) fn new(settle: Duration, silent_after: Duration) -> Self {
        Self {
            users: Placements::default(),
            routes_from: Instant::now() + settle,
            silent_after,
            everyone_routes: AtomicBool::new(true),
            routing: AtomicBool::new(false),
            fence: std::sync::Mutex::default(),
            reports: std::sync::Mutex::default(),
            reported: Notify::new(),
            probe_soon: Notify::new(),
            announcing: std::sync::Mutex::default(),
        }
    }

    /// This node applied the control record at `position`, which may be a
    /// connection `announcement`: pushes it routes from now on know every
    /// connection announced up to there.
    pub(crate) fn applied(&self, position: &ControlPosition, announcement: Option<Announcement>) {
        let report = RoutingReport {
            control_stream: control_stream(position),
            fenced_through: position.offset,
        };
        {
            let mut fence = lock(&self.fence);
            let seq = fence.next_publish;
            match fence.checkpoints.back_mut() {
                Some((last, at)) if *at == seq => *last = report,
                _ => {
                    if fence.checkpoints.len() == MOST_CHECKPOINTS {
                        fence.checkpoints.pop_front();
                    }
                    fence.checkpoints.push_back((report, seq));
                }
            }
        }
        match announcement {
            // Its connection waits to hear where (it has this node probe
            // early itself, see `wait_fenced`).
            Some(Announcement::Own(ids)) => {
                let mut announcing = lock(&self.announcing);
                for id in ids {
                    if let Some(waiting) = announcing.remove(&id) {
                        let _ = waiting.send(report);
                    }
                }
            }
            // The node holding it may wait for this node's fence to pass
            // it: an early probe (at most every `EARLY_PROBE_SPACING` of
            // the bus: during a ramp of connections, a few a second).
            Some(Announcement::Others) => self.probe_soon.notify_one(),
            None => {}
        }
    }

    /// Whether this node routes by its map: it settled, and every live
    /// node says it routes — which also says every live node reads a batch
    /// of connection facts ([`super::Change::Connections`]), as only this
    /// version or a later one routes.
    pub(crate) fn everyone_reads_batches(&self) -> bool {
        Instant::now() >= self.routes_from && self.everyone_routes.load(Ordering::Acquire)
    }

    /// `node` said `report` in its probe.
    pub(crate) fn peer_reported(&self, node: &str, report: Option<RoutingReport>) {
        let mut reports = lock(&self.reports);
        reports.insert(node.to_owned(), (report, Instant::now()));
        self.reports_changed(reports);
    }

    /// `node` is gone: its report no longer counts.
    pub(crate) fn peer_gone(&self, node: &str) {
        let mut reports = lock(&self.reports);
        reports.remove(node);
        self.reports_changed(reports);
    }

    /// Whether everyone routes now, and a wake-up for the fences' waiters.
    fn reports_changed(
        &self,
        reports: std::sync::MutexGuard<'_, HashMap<String, (Option<RoutingReport>, Instant)>>,
    ) {
        let everyone = reports.values().all(|(report, _)| report.is_some());
        drop(reports);
        self.everyone_routes.store(everyone, Ordering::Release);
        self.reported.notify_waiters();
    }

    /// Registers this node's connection `id` as about to be announced:
    /// the receiver hears where its announcement was applied.
    fn announcing(&self, id: u64) -> oneshot::Receiver<RoutingReport> {
        let (tell, told) = oneshot::channel();
        lock(&self.announcing).insert(id, tell);
        told
    }

    /// Whether a connection of this node waits for the other nodes' fences
    /// to pass its announcement (a resume does; a fresh connection does
    /// not wait for anything): only then do they probe early for it.
    pub(crate) fn awaited(&self, id: u64) -> bool {
        lock(&self.announcing).contains_key(&id)
    }

    /// Forgets a connection that closed before its announcement came back.
    pub(crate) fn not_announcing(&self, id: u64) {
        lock(&self.announcing).remove(&id);
    }

    /// True once this node and every other node that routes report a
    /// fence at or past `(stream, offset)`: every push routed from then on
    /// knows the connection announced there.
    fn fenced_everywhere(&self, at: RoutingReport) -> bool {
        // On another control queue (it moved) the offsets do not compare:
        // passed. A node that had applied nothing when it reported has not
        // passed anything, whatever the queue.
        let passed = |report: &RoutingReport| {
            if report.control_stream == at.control_stream {
                report.fenced_through >= at.fenced_through
            } else {
                *report != NOTHING_APPLIED
            }
        };
        lock(&self.reports)
            .values()
            .filter(|(_, at)| at.elapsed() < self.silent_after)
            .filter_map(|(report, _)| report.as_ref())
            .all(passed)
            && self.current_fence().is_some_and(|own| passed(&own))
    }

    /// Waits until every routing node's fence passed `at` (see
    /// [`Locations::fenced_everywhere`]), or `patience` passed: false then.
    async fn wait_fenced(&self, at: RoutingReport, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let reported = self.reported.notified();
            if self.fenced_everywhere(at) {
                return true;
            }
            self.probe_soon.notify_one();
            // This node's own fence moves without a report: look again soon.
            let soon = (tokio::time::Instant::now() + FENCE_RECHECK).min(deadline);
            let _ = tokio::time::timeout_at(soon, reported).await;
            if tokio::time::Instant::now() >= deadline {
                return self.fenced_everywhere(at);
            }
        }
    }

    /// This node's fence now.
    fn current_fence(&self) -> Option<RoutingReport> {
        let mut fence = lock(&self.fence);
        let oldest_in_flight = fence.in_flight.first().copied().unwrap_or(u64::MAX);
        while let Some((report, seq)) = fence.checkpoints.front().copied() {
            if seq > oldest_in_flight {
                break;
            }
            fence.fenced = Some(report);
            fence.checkpoints.pop_front();
        }
        fence.fenced
    }

    /// `node` holds `connection` of `user`.
    pub(crate) fn held(
        &self,
        (tenant, user): (&str, &str),
        node: &str,
        connection: u64,
        opened_at_micros: u64,
    ) {
        let key = UserKey::new(tenant, user).hash();
        self.users.held(key, node, connection, opened_at_micros);
    }

    /// `connection` of `user` on `node` ended.
    pub(crate) fn closed(&self, (tenant, user): (&str, &str), node: &str, connection: u64) {
        let key = UserKey::new(tenant, user).hash();
        self.users.closed(key, node, connection);
    }

    /// Forgets `node`'s connections (opened before `opened_before_micros`
    /// only, when it restarted: the newer ones are its new run's).
    pub(crate) fn forget_node(&self, node: &str, opened_before_micros: Option<u64>) {
        self.users.forget_node(node, opened_before_micros);
    }

    /// Users with a connection somewhere.
    #[cfg(test)]
    fn users(&self) -> usize {
        self.users.len()
    }
}

/// Whether every node routes a new connection's pushes to its node yet.
/// Until then a push accepted elsewhere may have been routed by a view
/// without it (only to the user's other nodes, or nowhere): a resuming
/// connection reads such pushes back (see `delivery::recovery`).
pub(crate) struct RoutedHere(Option<Announced>);

/// A connection of this node announced, and where to watch the fences.
struct Announced {
    locations: Arc<Locations>,
    applied_at: oneshot::Receiver<RoutingReport>,
}

impl RoutedHere {
    /// On a bus that does not route: nothing to wait for.
    pub(crate) fn at_once() -> Self {
        Self(None)
    }

    /// This node's connection `id`, about to be announced.
    pub(crate) fn after_announcement(locations: &Arc<Locations>, id: u64) -> Self {
        Self(Some(Announced {
            locations: locations.clone(),
            applied_at: locations.announcing(id),
        }))
    }

    /// Waits (at most `patience`) until every node routes this
    /// connection's pushes here: its announcement applied here, then every
    /// routing node's fence past it. True at once when the bus does not
    /// route; false if the wait ran out.
    pub(crate) async fn wait(self, patience: Duration) -> bool {
        let Some(Announced {
            locations,
            applied_at,
        }) = self.0
        else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + patience;
        let Ok(Ok(at)) = tokio::time::timeout_at(deadline, applied_at).await else {
            return false;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        locations.wait_fenced(at, left).await
    }
}

/// What a routing node reports before its fence passed any control
/// record: no connection's announcement is behind it yet.
const NOTHING_APPLIED: RoutingReport = RoutingReport {
    control_stream: 0,
    fenced_through: 0,
};

/// How often a connection waiting for the fences looks at this node's own.
const FENCE_RECHECK: Duration = Duration::from_millis(10);

/// [`Locations`] shared with the bus, as its router.
pub(crate) struct SharedLocations(pub(crate) Arc<Locations>);

impl Router for SharedLocations {
    fn destinations(&self, envelope: &Envelope) -> Destinations {
        self.0.destinations(envelope)
    }

    fn publishing(&self) -> Box<dyn Send> {
        let seq = {
            let mut fence = lock(&self.0.fence);
            let seq = fence.next_publish;
            fence.next_publish += 1;
            fence.in_flight.insert(seq);
            seq
        };
        Box::new(Publishing {
            locations: self.0.clone(),
            seq,
        })
    }

    fn report(&self) -> RoutingReport {
        self.0.routes_now();
        self.0.current_fence().unwrap_or(NOTHING_APPLIED)
    }

    fn probe_soon(&self) -> &Notify {
        &self.0.probe_soon
    }
}

impl Locations {
    /// Whether pushes go only to their users' nodes now (noted in the
    /// gauge when that changes).
    fn routes_now(&self) -> bool {
        let routes = self.everyone_reads_batches();
        if self.routing.swap(routes, Ordering::AcqRel) != routes {
            ::metrics::gauge!(crate::metrics::BUS_ROUTING).set(if routes { 1.0 } else { 0.0 });
        }
        routes
    }

    fn destinations(&self, envelope: &Envelope) -> Destinations {
        let Target::Users(users) = &envelope.target else {
            return Destinations::Everywhere;
        };
        if !self.routes_now() {
            return Destinations::Everywhere;
        }
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut too_many = false;
        for user in users {
            let key = UserKey::new(&envelope.tenant, user).hash();
            self.users.for_each_node(key, |node| {
                if !nodes.contains(node) {
                    too_many |= nodes.len() == MOST_COPIES;
                    nodes.push(node.clone());
                }
            });
            if too_many {
                return Destinations::Everywhere;
            }
        }
        Destinations::Nodes(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_to(users: &[&str]) -> Envelope {
        Envelope::new(
            "acme",
            Target::Users(users.iter().map(|u| (*u).to_owned()).collect()),
            "{}".into(),
        )
    }

    fn nodes(destinations: Destinations) -> Vec<String> {
        match destinations {
            Destinations::Nodes(nodes) => nodes.iter().map(|n| n.to_string()).collect(),
            Destinations::Everywhere => vec!["*".into()],
        }
    }

    #[test]
    fn a_push_goes_to_the_nodes_holding_its_users() {
        let map = Locations::new(Duration::ZERO, Duration::from_secs(1));
        map.held(("acme", "ann"), "b", 1, 10);
        map.held(("acme", "ann"), "b", 1, 10);
        map.held(("acme", "ann"), "c", 2, 10);
        map.held(("acme", "bob"), "a", 3, 10);
        map.held(("other", "cy"), "d", 4, 10);
        assert_eq!(nodes(map.destinations(&push_to(&["ann"]))), ["b", "c"]);
        assert_eq!(
            nodes(map.destinations(&push_to(&["ann", "bob"]))),
            ["b", "c", "a"]
        );
        assert!(nodes(map.destinations(&push_to(&["cy", "nobody"]))).is_empty());
        map.closed(("acme", "ann"), "b", 1);
        assert_eq!(nodes(map.destinations(&push_to(&["ann"]))), ["c"]);
        map.forget_node("c", None);
        assert!(nodes(map.destinations(&push_to(&["ann"]))).is_empty());
        assert_eq!(map.users(), 2);
        let topic = Envelope::new("acme", Target::Topic("news".into()), "{}".into());
        assert_eq!(nodes(map.destinations(&topic)), ["*"]);
    }

    #[test]
    fn a_restarted_node_keeps_its_new_connections_and_too_many_nodes_mean_everywhere() {
        let map = Locations::new(Duration::ZERO, Duration::from_secs(1));
        map.held(("acme", "ann"), "b", 1, 10_000_000);
        map.held(("acme", "ann"), "b", 2, 30_000_000);
        map.forget_node("b", Some(20_000_000));
        map.closed(("acme", "ann"), "b", 1);
        assert_eq!(nodes(map.destinations(&push_to(&["ann"]))), ["b"]);
        for (i, node) in ["c", "d", "e", "f"].iter().enumerate() {
            map.held(("acme", "ann"), node, 10 + i as u64, 40);
        }
        assert_eq!(nodes(map.destinations(&push_to(&["ann"]))), ["*"]);
    }

    fn at(offset: u64) -> ControlPosition {
        ControlPosition {
            broker: "b".into(),
            queue: 0,
            offset,
        }
    }

    #[test]
    fn the_fence_passes_a_position_once_every_push_routed_before_it_was_answered() {
        let map = Arc::new(Locations::new(Duration::ZERO, Duration::from_secs(1)));
        let router = SharedLocations(map.clone());
        let stream = control_stream(&at(0));
        let through = |offset| RoutingReport {
            control_stream: stream,
            fenced_through: offset,
        };
        assert_eq!(map.current_fence(), None, "nothing applied yet");
        let early = router.publishing();
        map.applied(&at(10), None);
        let late = router.publishing();
        map.applied(&at(11), None);
        assert_eq!(
            map.current_fence(),
            None,
            "a push routed before 10 is on its way"
        );
        assert!(!map.fenced_everywhere(through(10)));
        drop(early);
        assert_eq!(map.current_fence().map(|f| f.fenced_through), Some(10));
        assert!(map.fenced_everywhere(through(10)));
        assert!(
            !map.fenced_everywhere(through(11)),
            "one routed before 11 is on its way"
        );
        drop(late);
        assert_eq!(map.current_fence().map(|f| f.fenced_through), Some(11));
        // Another node's report holds the fence back until it passes too,
        // or until it is silent.
        map.peer_reported(
            "b",
            Some(RoutingReport {
                control_stream: stream,
                fenced_through: 9,
            }),
        );
        assert!(!map.fenced_everywhere(through(11)));
        map.peer_reported(
            "b",
            Some(RoutingReport {
                control_stream: stream,
                fenced_through: 11,
            }),
        );
        assert!(map.fenced_everywhere(through(11)));
        // Nor has a node passed it that reported before its fence passed
        // anything (it had just started, or a push was always on its way).
        map.peer_reported("b", Some(NOTHING_APPLIED));
        assert!(!map.fenced_everywhere(through(11)));
        // One on another control queue (it moved) is not compared.
        let moved = RoutingReport {
            control_stream: stream + 1,
            fenced_through: 3,
        };
        map.peer_reported("b", Some(moved));
        assert!(map.fenced_everywhere(through(11)));
        // A node that does not route: pushes go everywhere.
        map.peer_reported("c", None);
        assert_eq!(nodes(map.destinations(&push_to(&["ann"]))), ["*"]);
        map.peer_gone("c");
        assert!(nodes(map.destinations(&push_to(&["ann"]))).is_empty());
    }

    #[test]
    fn a_node_that_just_started_sends_everywhere() {
        let map = Locations::new(Duration::from_secs(60), Duration::from_secs(1));
        map.held(("acme", "ann"), "b", 1, 10);
        assert_eq!(nodes(map.destinations(&push_to(&["ann"]))), ["*"]);
    }
}
