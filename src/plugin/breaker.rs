//! The circuit breaker of one hook of one plugin version: when most of its
//! recent calls fail, the hook is skipped for a while (the tenant's failure
//! policy applies), so that a broken plugin costs no more time per message
//! than a refusal.
//!
//! It counts a failure rate over a window, not a run of failures, so that
//! a few bad inputs among many good ones never switch a tenant's filter off.
//! `authenticate` has none: a handshake that makes it fail is charged to the
//! client's address by the caller, not to everybody.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_micros;
use crate::sync::lock;

/// Calls and failures of the current window.
#[derive(Debug, Default)]
struct Window {
    started_at_micros: u64,
    calls: u32,
    failures: u32,
}

/// Failure counting for one hook of one plugin version.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    window: Mutex<Window>,
    /// Micros since the Unix epoch until which the hook is skipped.
    open_until: AtomicU64,
}

impl Breaker {
    /// The span over which the failure rate is counted.
    pub(super) const WINDOW: Duration = Duration::from_secs(30);
    /// Fewest calls in a window before it may trip.
    pub(super) const MIN_CALLS: u32 = 5;
    /// How long a tripped hook is skipped before it is tried again.
    pub(super) const TRIP_FOR: Duration = Duration::from_secs(30);

    /// True while the hook is to be skipped.
    pub(super) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) > now_micros()
    }

    /// A call succeeded.
    pub(super) fn succeeded(&self) {
        self.count(false);
    }

    /// A call failed; true if this failure tripped the breaker: at least
    /// [`MIN_CALLS`](Self::MIN_CALLS) calls in the window, half or more of
    /// them failed.
    pub(super) fn failed(&self) -> bool {
        self.count(true)
    }

    fn count(&self, failed: bool) -> bool {
        let now = now_micros();
        let mut window = lock(&self.window);
        if now.saturating_sub(window.started_at_micros) > Self::WINDOW.as_micros() as u64 {
            *window = Window {
                started_at_micros: now,
                ..Window::default()
            };
        }
        window.calls += 1;
        window.failures += u32::from(failed);
        let trips =
            failed && window.calls >= Self::MIN_CALLS && window.failures * 2 >= window.calls;
        if trips {
            *window = Window {
                started_at_micros: now,
                ..Window::default()
            };
            let until = now + Self::TRIP_FOR.as_micros() as u64;
            self.open_until.store(until, Ordering::Relaxed);
        }
        trips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_when_most_calls_of_the_window_fail() {
        let breaker = Breaker::default();
        for _ in 1..Breaker::MIN_CALLS {
            assert!(!breaker.failed());
        }
        assert!(breaker.failed(), "five failures of five calls trip it");
        assert!(breaker.is_open());
    }

    #[test]
    fn a_few_failures_among_many_successes_never_trip_it() {
        let breaker = Breaker::default();
        for _ in 0..100 {
            breaker.succeeded();
            breaker.succeeded();
            assert!(!breaker.failed());
        }
        assert!(!breaker.is_open());
    }
}
