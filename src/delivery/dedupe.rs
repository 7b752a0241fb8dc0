//! At most one delivery per idempotency key: a message whose tenant already
//! had a message with the same key within the window is dropped (and
//! counted). Every node keeps its own record of the keys it dispatched, so
//! a retry is delivered at most once on every node, whichever node it was
//! pushed through.
//!
//! Bounded per tenant and in all: keys older than the window are
//! forgotten; a tenant keeps at most [`MAX_KEYS_PER_TENANT`], its oldest
//! going first; past [`MAX_KEYS`] in all, the tenant with the most gives up
//! its oldest — so that one tenant's flood of keys never makes another
//! tenant's retry a second delivery. Used by the dispatcher's one task: no
//! lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a key is remembered.
pub(crate) const WINDOW: Duration = Duration::from_secs(600);
/// Keys remembered on one node, over all tenants.
pub(crate) const MAX_KEYS: usize = 200_000;
/// Keys remembered on one node for one tenant.
pub(crate) const MAX_KEYS_PER_TENANT: usize = 50_000;

/// One tenant's keys.
#[derive(Default)]
struct TenantKeys {
    seen: HashSet<String>,
    /// The same keys, oldest first, for forgetting them in order.
    order: VecDeque<(Instant, String)>,
}

impl TenantKeys {
    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.seen.remove(&key);
        }
    }
}

/// The keys seen, by tenant, with when.
#[derive(Default)]
pub(crate) struct Deduplicator {
    tenants: HashMap<String, TenantKeys>,
    /// Keys remembered over all tenants.
    total: usize,
    /// When every tenant's expired keys were last forgotten.
    last_sweep: Option<Instant>,
}

/// Shortest time between two sweeps of every tenant's expired keys.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Deduplicator {
    /// True the first time `key` of `tenant` comes within the window; false
    /// for a repeat.
    pub(crate) fn first_time(&mut self, tenant: &str, key: &str, now: Instant) -> bool {
        if let Some(horizon) = now.checked_sub(WINDOW) {
            self.forget_before(tenant, horizon);
        }
        if self
            .tenants
            .get(tenant)
            .is_some_and(|keys| keys.seen.contains(key))
        {
            return false;
        }
        if self.total >= MAX_KEYS
            && let Some(horizon) = now.checked_sub(WINDOW)
            && self
                .last_sweep
                .is_none_or(|at| now.saturating_duration_since(at) > SWEEP_INTERVAL)
        {
            // Quiet tenants' expired keys first.
            self.last_sweep = Some(now);
            let tenants: Vec<String> = self.tenants.keys().cloned().collect();
            for quiet in &tenants {
                self.forget_before(quiet, horizon);
            }
        }
        if self.total >= MAX_KEYS {
            self.forget_one_of_the_largest(tenant);
        }
        let keys = self.tenants.entry(tenant.to_owned()).or_default();
        if keys.seen.len() >= MAX_KEYS_PER_TENANT {
            keys.forget_oldest();
            self.total -= 1;
        }
        keys.order.push_back((now, key.to_owned()));
        keys.seen.insert(key.to_owned());
        self.total += 1;
        true
    }

    /// Forgets `tenant`'s keys older than `horizon` (each tenant's as it
    /// next pushes a keyed message: a quiet tenant's stay until then,
    /// within the bounds).
    fn forget_before(&mut self, tenant: &str, horizon: Instant) {
        let Some(keys) = self.tenants.get_mut(tenant) else {
            return;
        };
        while keys.order.front().is_some_and(|(at, _)| *at < horizon) {
            keys.forget_oldest();
            self.total -= 1;
        }
        if keys.order.is_empty() {
            self.tenants.remove(tenant);
        }
    }

    /// Makes room: `tenant` gives up its oldest key if it holds at least
    /// its share (the flood case, no search); otherwise the tenant holding
    /// the most does.
    fn forget_one_of_the_largest(&mut self, tenant: &str) {
        let share = MAX_KEYS / self.tenants.len().max(1);
        let giver = match self.tenants.get(tenant) {
            Some(keys) if keys.seen.len() >= share => tenant.to_owned(),
            _ => match self.tenants.iter().max_by_key(|(_, keys)| keys.seen.len()) {
                Some((largest, _)) => largest.clone(),
                None => return,
            },
        };
        if let Some(keys) = self.tenants.get_mut(&giver) {
            keys.forget_oldest();
            self.total -= 1;
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

    #[test]
    fn one_tenants_flood_of_keys_never_forgets_anothers() {
        let mut dedupe = Deduplicator::default();
        let start = Instant::now();
        assert!(dedupe.first_time("quiet", "order-1", start));
        // Several flooding tenants, together past the bound in all.
        for tenant in 0..5 {
            for i in 0..MAX_KEYS_PER_TENANT + 1_000 {
                dedupe.first_time(&format!("loud-{tenant}"), &i.to_string(), start);
            }
        }
        assert!(
            !dedupe.first_time("quiet", "order-1", start + Duration::from_secs(1)),
            "the quiet tenant's retry is still a repeat"
        );
        assert!(dedupe.total <= MAX_KEYS);
        assert!(
            dedupe
                .tenants
                .values()
                .all(|keys| keys.seen.len() <= MAX_KEYS_PER_TENANT)
        );
        // A flooding tenant forgets its own oldest, not its newest.
        assert!(!dedupe.first_time("loud-0", &MAX_KEYS_PER_TENANT.to_string(), start));
    }
}
