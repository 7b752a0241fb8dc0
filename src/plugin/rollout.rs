//! Rolling a new version out to some users first: which version serves a
//! user during a canary, each version's recent failure rate, and the
//! judgement that rolls a failing canary back.
//!
//! A canary serves a stable share of users: a user is in it when the hash
//! of its id, modulo 100, is below the percentage — so raising the
//! percentage only adds users, and a user reconnecting to any node meets
//! the same version. Each node judges the calls it made; the first node
//! that finds the canary failing asks the cluster to roll it back, and
//! every node does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{CompiledPlugin, short};
use crate::config::{CanaryPolicy, MAX_CANARY_WINDOW};
use crate::sync::lock;

/// True if `key` (a user id) falls in a canary of `percent`.
pub fn in_canary(key: &str, percent: u8) -> bool {
    crate::stable_hash::stable_hash(key.as_bytes()) % 100 < u64::from(percent)
}

/// Calls and failures of one version, by second, over the longest canary
/// window — counted only while a canary is judged by them (the canary's,
/// and the active version's it runs beside): other calls pay nothing.
#[derive(Default)]
pub(crate) struct CallTally {
    /// Canaries judged by this tally now.
    watchers: AtomicUsize,
    seconds: Mutex<VecDeque<Second>>,
}

struct Second {
    /// Seconds since the Unix epoch.
    at: u64,
    calls: u64,
    failures: u64,
}

fn now_secs() -> u64 {
    crate::clock::now_micros() / 1_000_000
}

impl CallTally {
    /// Starts counting for one more canary; a tally that was not counting
    /// starts afresh.
    pub(crate) fn watch(&self) {
        if self.watchers.fetch_add(1, Ordering::AcqRel) == 0 {
            lock(&self.seconds).clear();
        }
    }

    /// One canary no longer needs the count.
    pub(crate) fn unwatch(&self) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts one call, if a canary needs it.
    pub(crate) fn record(&self, failed: bool) {
        if self.watchers.load(Ordering::Acquire) == 0 {
            return;
        }
        let now = now_secs();
        let mut seconds = lock(&self.seconds);
        match seconds.back_mut() {
            Some(last) if last.at == now => {
                last.calls += 1;
                last.failures += u64::from(failed);
            }
            _ => seconds.push_back(Second {
                at: now,
                calls: 1,
                failures: u64::from(failed),
            }),
        }
        let oldest_kept = now.saturating_sub(MAX_CANARY_WINDOW.as_secs());
        while seconds.front().is_some_and(|s| s.at < oldest_kept) {
            seconds.pop_front();
        }
    }

    /// Calls and failures within the last `window`.
    pub(crate) fn over(&self, window: Duration) -> (u64, u64) {
        let since = now_secs().saturating_sub(window.as_secs());
        lock(&self.seconds)
            .iter()
            .filter(|s| s.at > since)
            .fold((0, 0), |(calls, failures), s| {
                (calls + s.calls, failures + s.failures)
            })
    }
}

/// A canary found failing by this node, for the cluster to roll back.
#[derive(Debug, Clone)]
pub struct CanaryFailing {
    pub tenant: String,
    pub version: String,
    /// The figures that condemned it, for the operator's log.
    pub reason: String,
}

/// What a canary version compares itself with, and whom it tells.
pub(crate) struct CanaryWatch {
    /// The active version the canary runs beside.
    pub(crate) baseline: Arc<CompiledPlugin>,
    pub(crate) report: tokio::sync::mpsc::UnboundedSender<CanaryFailing>,
    /// Told once: the rollback is on its way.
    pub(crate) reported: bool,
}

impl CanaryWatch {
    /// Reports the canary once if its failure rate over the policy's window
    /// exceeds the baseline's by more than the margin.
    pub(crate) fn judge(&mut self, canary: &CompiledPlugin, policy: &CanaryPolicy) {
        if self.reported {
            return;
        }
        let (calls, failures) = canary.tally.over(policy.window);
        if calls < u64::from(policy.min_calls) {
            return;
        }
        let (base_calls, base_failures) = self.baseline.tally.over(policy.window);
        let rate = failures as f64 / calls as f64;
        let base_rate = if base_calls == 0 {
            0.0
        } else {
            base_failures as f64 / base_calls as f64
        };
        if rate <= base_rate + policy.margin {
            return;
        }
        self.reported = true;
        let reason = format!(
            "{failures} of its {calls} calls in the last {:?} failed ({:.1} %), against {:.1} % \
             for the active version {} (margin {:.1} points)",
            policy.window,
            rate * 100.0,
            base_rate * 100.0,
            short(&self.baseline.version),
            policy.margin * 100.0,
        );
        let _ = self.report.send(CanaryFailing {
            tenant: canary.tenant.to_string(),
            version: canary.version.clone(),
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_takes_a_stable_share_of_users_that_only_grows_with_its_percentage() {
        let users: Vec<String> = (0..10_000).map(|n| format!("user-{n}")).collect();
        let share = |percent| users.iter().filter(|u| in_canary(u, percent)).count();
        assert!((800..1_200).contains(&share(10)), "{}", share(10));
        assert_eq!(share(0), 0);
        assert_eq!(share(100), users.len());
        for user in &users {
            if in_canary(user, 10) {
                assert!(in_canary(user, 20), "{user} left the canary as it grew");
            }
        }
    }

    #[test]
    fn the_tally_counts_calls_within_its_window() {
        let tally = CallTally::default();
        tally.record(true);
        assert_eq!(
            tally.over(Duration::from_secs(60)),
            (0, 0),
            "no canary: not counted"
        );
        tally.watch();
        for n in 0..10 {
            tally.record(n % 5 == 0);
        }
        assert_eq!(tally.over(Duration::from_secs(60)), (10, 2));
        tally.unwatch();
        tally.watch();
        assert_eq!(
            tally.over(Duration::from_secs(60)),
            (0, 0),
            "a new canary starts afresh"
        );
    }
}
