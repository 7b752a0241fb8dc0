//! At most one delivery per idempotency key: a message whose tenant already
//! had a message with the same key within the window is dropped (and
//! counted). Every node keeps its own record of the keys it dispatched, so
//! a retry is delivered at most once on every node, whichever node it was
//! pushed through.
//!
//! Bounded: keys older than the window are forgotten, and past
//! [`MAX_KEYS`] the oldest go first. Used by the dispatcher's one task: no
//! lock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a key is remembered.
pub(crate) const WINDOW: Duration = Duration::from_secs(600);
/// Keys remembered on one node, over all tenants.
pub(crate) const MAX_KEYS: usize = 200_000;

/// The keys seen, by tenant and key, with when.
#[derive(Default)]
pub(crate) struct Deduplicator {
    seen: HashMap<(String, String), Instant>,
    /// The same keys, oldest first, for forgetting them in order.
    order: VecDeque<(Instant, String, String)>,
}

impl Deduplicator {
    /// True the first time `key` of `tenant` comes within the window; false
    /// for a repeat.
    pub(crate) fn first_time(&mut self, tenant: &str, key: &str, now: Instant) -> bool {
        self.forget_before(now.checked_sub(WINDOW));
        let entry = (tenant.to_owned(), key.to_owned());
        if self.seen.contains_key(&entry) {
            return false;
        }
        if self.seen.len() >= MAX_KEYS
            && let Some((_, tenant, key)) = self.order.pop_front()
        {
            self.seen.remove(&(tenant, key));
        }
        self.order
            .push_back((now, entry.0.clone(), entry.1.clone()));
        self.seen.insert(entry, now);
        true
    }

    fn forget_before(&mut self, horizon: Option<Instant>) {
        let Some(horizon) = horizon else {
            return;
        };
        while let Some((at, _, _)) = self.order.front() {
            if *at >= horizon {
                break;
            }
            let (_, tenant, key) = self.order.pop_front().expect("front exists");
            self.seen.remove(&(tenant, key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_passes_once_per_tenant_within_the_window() {
        let mut dedupe = Deduplicator::default();
        let start = Instant::now();
        assert!(dedupe.first_time("a", "k", start));
        assert!(!dedupe.first_time("a", "k", start + Duration::from_secs(1)));
        assert!(dedupe.first_time("b", "k", start), "another tenant's key");
        assert!(
            dedupe.first_time("a", "k", start + WINDOW + Duration::from_secs(2)),
            "forgotten after the window"
        );
    }
}
