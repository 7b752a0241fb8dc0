//! Each tenant's recent messages on this node, in position order, so that
//! a client that reconnects — to this node or any other: every node
//! consumes the whole bus and gives a message the same position — receives
//! what it missed.
//!
//! A tenant's history is appended to where its messages are delivered, in
//! the same critical section (see `dispatch`), and a resuming connection
//! is registered and handed what it missed in that critical section too
//! (see `recovery`): a message is either in what it is handed or delivered
//! to it live, never both, never neither.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::WireFrame;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::bus::envelope::{Envelope, Position};
use crate::config::HistoryConfig;
use crate::sync::lock;

/// What one kept message costs besides its data and frame: the entry, the
/// envelope's other fields and allocations, the allocator's rounding
/// (measured: 949 bytes of RSS per kept message of 100 bytes, whose frame
/// is ~200; scripts/bench-history.py, BENCHMARKS.md).
const ENTRY_OVERHEAD_BYTES: usize = 650;

/// Every tenant's history on this node.
#[derive(Default)]
pub struct Histories {
    tenants: DashMap<Arc<str>, Arc<TenantHistory>>,
    /// The first offset of each stream this node delivered: from there on
    /// it saw every message of the stream.
    first_seen: Mutex<HashMap<u64, u64>>,
    /// Resumes waiting for their marker to be dispatched, by its id.
    markers: Mutex<HashMap<String, Vec<MarkerWait>>>,
    /// By tenant, the marker that resumes join now (not sent yet) …
    gathering: Mutex<HashMap<Arc<str>, String>>,
    /// … and a lock held while one of the tenant's markers is being sent.
    sending: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
}

/// A resume waiting for its marker (see `recovery`): its connection (none
/// for a service reading the history), and who hears the marker's
/// position and how many frames the connection had queued when it was
/// dispatched.
pub(super) struct MarkerWait {
    pub(super) handle: Option<super::ConnectionHandle>,
    pub(super) tell: tokio::sync::oneshot::Sender<(Position, usize)>,
}

impl Histories {
    /// The history of `tenant`, made on first use.
    pub fn tenant(&self, tenant: &Arc<str>) -> Arc<TenantHistory> {
        if let Some(history) = self.tenants.get(tenant) {
            return history.clone();
        }
        self.tenants.entry(tenant.clone()).or_default().clone()
    }

    /// Forgets a removed tenant's history, and its marker bookkeeping.
    pub fn forget(&self, tenant: &str) {
        self.tenants.remove(tenant);
        lock(&self.gathering).remove(tenant);
        lock(&self.sending).remove(tenant);
    }

    /// Notes that this node is about to deliver the message at `position`
    /// (called for every message, in the order the bus hands them over).
    pub fn saw(&self, position: Position) {
        lock(&self.first_seen)
            .entry(position.stream)
            .or_insert(position.offset);
    }

    /// Joins `wait` to `tenant`'s marker that has not been sent yet (made
    /// if there is none): its id. Resumes that come together share one
    /// marker — a lost node's clients, thousands at once, would otherwise
    /// each put one in the tenant's queue, and crowd the very span they
    /// read back.
    pub(super) fn join_marker(&self, tenant: &Arc<str>, wait: MarkerWait) -> String {
        let id = lock(&self.gathering)
            .entry(tenant.clone())
            .or_insert_with(|| crate::bus::envelope::marker(tenant).id)
            .clone();
        lock(&self.markers)
            .entry(id.clone())
            .or_default()
            .push(wait);
        id
    }

    /// The lock held while one of `tenant`'s markers is being sent: one at
    /// a time, so that resumes arriving meanwhile gather on the next.
    pub(super) fn marker_sending(&self, tenant: &Arc<str>) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.sending)
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    /// True if marker `id` was still gathering (it is not any more): the
    /// caller sends it. False if another resume of it already did.
    pub(super) fn close_marker(&self, tenant: &str, id: &str) -> bool {
        let mut gathering = lock(&self.gathering);
        if gathering
            .get(tenant)
            .is_some_and(|gathering| gathering == id)
        {
            gathering.remove(tenant);
            true
        } else {
            false
        }
    }

    /// Forgets the marker `id` (it was not sent): its resumes hear nothing.
    pub(super) fn forget_marker(&self, id: &str) {
        lock(&self.markers).remove(id);
    }

    /// Forgets the waits of marker `id` whose resumes stopped listening
    /// (one gave up on it): the others sharing it still hear it.
    pub(super) fn forget_marker_wait(&self, id: &str) {
        let mut markers = lock(&self.markers);
        if let Some(waits) = markers.get_mut(id) {
            waits.retain(|wait| !wait.tell.is_closed());
            if waits.is_empty() {
                markers.remove(id);
            }
        }
    }

    /// The marker `envelope` is being dispatched, in its stream's order:
    /// tells each of its resumes where, and what its connection had queued
    /// then.
    pub(super) fn marker_dispatched(&self, envelope: &Envelope) {
        let Some(waits) = lock(&self.markers).remove(&envelope.id) else {
            return;
        };
        let Some(position) = envelope.position.get() else {
            return;
        };
        for wait in waits {
            let queued = wait.handle.as_ref().map_or(0, |handle| handle.queued());
            let _ = wait.tell.send((*position, queued));
        }
    }

    fn first_seen(&self, stream: u64) -> Option<u64> {
        lock(&self.first_seen).get(&stream).copied()
    }
}

/// One tenant's history, and a signal each time it advanced.
#[derive(Default)]
pub struct TenantHistory {
    kept: Mutex<Kept>,
    advanced: Notify,
}

impl TenantHistory {
    /// The history, held while a message is delivered or a client resumes.
    pub fn lock(&self) -> MutexGuard<'_, Kept> {
        lock(&self.kept)
    }

    /// Wakes clients waiting for this node to catch up with their position.
    pub fn notify_advanced(&self) {
        self.advanced.notify_waiters();
    }

    /// Resolves at the next [`notify_advanced`](Self::notify_advanced).
    pub fn advanced(&self) -> tokio::sync::futures::Notified<'_> {
        self.advanced.notified()
    }
}

/// One kept message.
pub struct Entry {
    pub position: Position,
    pub envelope: Arc<Envelope>,
    /// The frame every recipient without a plugin received.
    pub frame: WireFrame,
    at: Instant,
    bytes: usize,
}

/// A tenant's kept messages, oldest first, and what this node knows of
/// the stream they are on.
#[derive(Default)]
pub struct Kept {
    /// The stream the tenant's messages are on (a broker queue; this run
    /// of the node on the local bus). A message on another stream starts
    /// the history again: positions on the old one can no longer be
    /// compared.
    stream: Option<u64>,
    /// From this offset on, this node saw every message of the stream.
    watching_from: u64,
    /// The last offset delivered here.
    last: u64,
    /// The highest offset a bound dropped.
    dropped_through: Option<u64>,
    entries: VecDeque<Entry>,
    bytes: usize,
}

/// What a resuming client missed, as far as this node knows.
pub struct Missed<'a> {
    /// The messages after its position, oldest first.
    pub entries: Vec<&'a Entry>,
    /// True if those are all it missed; false if some are gone (past a
    /// bound, before this node started, or on a stream it no longer
    /// knows), and the client should reload its state.
    pub complete: bool,
}

impl Kept {
    /// Keeps the message at `position`, within `limits`.
    pub fn append(
        &mut self,
        histories: &Histories,
        position: Position,
        envelope: &Arc<Envelope>,
        frame: &WireFrame,
        limits: &HistoryConfig,
    ) {
        if self.stream != Some(position.stream) {
            *self = Kept {
                stream: Some(position.stream),
                watching_from: histories
                    .first_seen(position.stream)
                    .unwrap_or(position.offset),
                ..Kept::default()
            };
        }
        self.last = self.last.max(position.offset);
        let bytes = envelope.data.len() + frame.len() + ENTRY_OVERHEAD_BYTES;
        if limits.max_messages > 0 && bytes <= limits.max_bytes {
            let entry = Entry {
                position,
                envelope: envelope.clone(),
                frame: frame.clone(),
                at: Instant::now(),
                bytes,
            };
            // Messages come in position order, but for one delivered ahead
            // of its lane's queue (see `dispatch`): keep the order here.
            let at = self
                .entries
                .iter()
                .rposition(|e| e.position.offset < position.offset)
                .map_or(0, |i| i + 1);
            self.entries.insert(at, entry);
            self.bytes += bytes;
        } else {
            self.drop_through(position.offset);
        }
        // Bounds lowered since (the tenant's settings changed) apply too.
        while self.entries.len() > limits.max_messages || self.bytes > limits.max_bytes {
            self.pop_oldest();
        }
        self.expire(limits.max_age);
    }

    /// Drops what is older than `max_age`.
    pub fn expire(&mut self, max_age: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.at.elapsed() > max_age)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.bytes;
            self.drop_through(entry.position.offset);
        }
    }

    /// Messages kept, and the memory they take.
    pub fn size(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    fn drop_through(&mut self, offset: u64) {
        self.dropped_through = Some(self.dropped_through.map_or(offset, |d| d.max(offset)));
    }

    /// True if `since` is on this tenant's stream but past what this node
    /// delivered: it has yet to catch up with the client.
    pub fn behind(&self, since: Position) -> bool {
        self.stream == Some(since.stream) && since.offset > self.last
    }

    /// Every kept message, oldest first.
    pub fn missed_all(&self) -> Vec<&Entry> {
        self.entries.iter().collect()
    }

    /// What a client that last saw `since` missed.
    pub fn missed_since(&self, histories: &Histories, since: Position) -> Missed<'_> {
        if self.stream.is_none() {
            // Nothing of the tenant delivered here since this node started:
            // nothing missed, if this node watched the client's stream
            // from before its position on.
            let watched = histories
                .first_seen(since.stream)
                .is_some_and(|first| since.offset.saturating_add(1) >= first);
            return Missed {
                entries: Vec::new(),
                complete: watched,
            };
        }
        if self.stream != Some(since.stream) || since.offset > self.last {
            return Missed {
                entries: self.entries.iter().collect(),
                complete: false,
            };
        }
        let entries: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.position.offset > since.offset)
            .collect();
        let watched = since.offset.saturating_add(1) >= self.watching_from;
        let none_dropped = self.dropped_through.is_none_or(|d| d <= since.offset);
        Missed {
            entries,
            complete: watched && none_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::envelope::Target;

    fn message(offset: u64) -> (Position, Arc<Envelope>, WireFrame) {
        let envelope = Arc::new(Envelope::new("t", Target::Broadcast, format!("{offset}")));
        let position = Position { stream: 7, offset };
        (
            position,
            envelope,
            WireFrame::text(format!("frame {offset}")),
        )
    }

    /// Appends the message at `offset` (stream 7) under `limits`.
    fn keep(kept: &mut Kept, histories: &Histories, offset: u64, limits: &HistoryConfig) {
        let (position, envelope, frame) = message(offset);
        kept.append(histories, position, &envelope, &frame, limits);
    }

    fn offsets(missed: &Missed<'_>) -> Vec<u64> {
        missed.entries.iter().map(|e| e.position.offset).collect()
    }

    #[test]
    fn a_client_gets_what_came_after_its_position_and_learns_when_some_is_gone() {
        let histories = Histories::default();
        let limits = HistoryConfig {
            max_messages: 3,
            ..HistoryConfig::default()
        };
        let mut kept = Kept::default();
        for offset in 1..=3 {
            histories.saw(Position { stream: 7, offset });
            keep(&mut kept, &histories, offset, &limits);
        }
        let since = |offset| Position { stream: 7, offset };
        let missed = kept.missed_since(&histories, since(1));
        assert_eq!((offsets(&missed), missed.complete), (vec![2, 3], true));
        // A fourth pushes the first out: from 0 the gap is not covered.
        keep(&mut kept, &histories, 4, &limits);
        let missed = kept.missed_since(&histories, since(0));
        assert_eq!((offsets(&missed), missed.complete), (vec![2, 3, 4], false));
        let missed = kept.missed_since(&histories, since(1));
        assert!(missed.complete, "1 itself was seen by the client");
        // Another stream, or a position from the future: all, incomplete.
        let other = Position {
            stream: 8,
            offset: 2,
        };
        assert!(!kept.missed_since(&histories, other).complete);
        assert!(kept.behind(since(9)));
        assert!(!kept.missed_since(&histories, since(9)).complete);
    }

    #[test]
    fn a_node_that_started_late_does_not_claim_what_it_never_saw() {
        let histories = Histories::default();
        let mut kept = Kept::default();
        histories.saw(Position {
            stream: 7,
            offset: 50,
        });
        keep(&mut kept, &histories, 50, &HistoryConfig::default());
        let missed = kept.missed_since(
            &histories,
            Position {
                stream: 7,
                offset: 10,
            },
        );
        assert_eq!((offsets(&missed), missed.complete), (vec![50], false));
        let missed = kept.missed_since(
            &histories,
            Position {
                stream: 7,
                offset: 49,
            },
        );
        assert!(missed.complete);
    }

    #[test]
    fn a_history_turned_off_keeps_nothing_more() {
        let histories = Histories::default();
        let mut kept = Kept::default();
        for offset in 1..=3 {
            keep(&mut kept, &histories, offset, &HistoryConfig::default());
        }
        let off = HistoryConfig {
            max_messages: 0,
            ..HistoryConfig::default()
        };
        keep(&mut kept, &histories, 4, &off);
        assert_eq!(kept.size(), (0, 0));
        let missed = kept.missed_since(
            &histories,
            Position {
                stream: 7,
                offset: 1,
            },
        );
        assert!(!missed.complete, "what was kept is gone");
    }

    #[test]
    fn age_and_bytes_bound_the_history() {
        let histories = Histories::default();
        let limits = HistoryConfig {
            max_messages: 100,
            max_bytes: 2 * (ENTRY_OVERHEAD_BYTES + 16),
            max_age: Duration::from_secs(60),
        };
        let mut kept = Kept::default();
        for offset in 1..=5 {
            keep(&mut kept, &histories, offset, &limits);
        }
        assert_eq!(kept.entries.len(), 2);
        kept.expire(Duration::ZERO);
        assert!(kept.entries.is_empty());
        assert_eq!(kept.bytes, 0);
    }

    #[test]
    fn resumes_share_a_marker_and_one_giving_up_leaves_the_others_waiting() {
        let histories = Histories::default();
        let tenant: Arc<str> = "t".into();
        let wait = || {
            let (tell, told) = tokio::sync::oneshot::channel();
            (MarkerWait { handle: None, tell }, told)
        };
        let ((first, mut first_told), (second, gave_up), (third, mut third_told)) =
            (wait(), wait(), wait());
        let id = histories.join_marker(&tenant, first);
        assert_eq!(histories.join_marker(&tenant, second), id);
        assert!(histories.close_marker(&tenant, &id), "one resume sends it");
        assert!(!histories.close_marker(&tenant, &id), "and only one");
        let next = histories.join_marker(&tenant, third);
        assert_ne!(next, id, "a resume after the send gathers on the next");

        drop(gave_up);
        histories.forget_marker_wait(&id);
        let mut marker = crate::bus::envelope::marker(&tenant);
        marker.id = id.clone();
        marker.position = Position {
            stream: 7,
            offset: 9,
        }
        .into();
        histories.marker_dispatched(&marker);
        let told = first_told.try_recv().expect("the others still hear it");
        assert_eq!(told.0.offset, 9);
        assert!(third_told.try_recv().is_err(), "the next is not sent yet");
    }
}
