//! The circuit breaker of one plugin version: after a run of failures the
//! version is skipped for a while (the tenant's failure policy applies),
//! so that a broken plugin costs no more time per message than a refusal.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_micros;

/// Failure counting for one plugin version.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    consecutive_failures: AtomicU32,
    /// Micros since the Unix epoch until which the version is skipped.
    open_until: AtomicU64,
}

impl Breaker {
    /// Consecutive failures after which a plugin version is tripped.
    pub(super) const TRIP_AFTER_FAILURES: u32 = 5;
    /// How long a tripped plugin version is skipped before it is tried again.
    pub(super) const TRIP_FOR: Duration = Duration::from_secs(30);

    /// True while the version is to be skipped.
    pub(super) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) > now_micros()
    }

    /// A call succeeded: the run of failures is over.
    pub(super) fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A call failed; true if this failure tripped the breaker.
    pub(super) fn failed(&self) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < Self::TRIP_AFTER_FAILURES {
            return false;
        }
        let until = now_micros() + Self::TRIP_FOR.as_micros() as u64;
        self.open_until.store(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_a_run_of_failures_and_a_success_ends_the_run() {
        let breaker = Breaker::default();
        for _ in 1..Breaker::TRIP_AFTER_FAILURES {
            assert!(!breaker.failed());
        }
        breaker.succeeded();
        for _ in 1..Breaker::TRIP_AFTER_FAILURES {
            assert!(!breaker.failed());
        }
        assert!(!breaker.is_open());
        assert!(breaker.failed(), "the fifth failure in a row trips it");
        assert!(breaker.is_open());
    }
}
