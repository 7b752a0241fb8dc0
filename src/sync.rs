//! Small synchronisation tools every part may use: a poison-tolerant lock,
//! a one-way stop signal, a counter of work in flight that can be awaited
//! down to zero, and rate limiters on one shared clock.
//!
//! Knows nothing of any part of the gateway.

use std::future::Future;
use std::sync::{LazyLock, Mutex, MutexGuard};

use governor::clock::DefaultClock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use tokio::sync::watch;

/// Locks `mutex`, carrying on with its data if a holder panicked: every
/// mutex here guards data that stays consistent between statements, so a
/// panic elsewhere must not take the node down with it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A rate limiter of `quota` on the process's one clock. governor's own
/// `RateLimiter::direct` makes a clock per limiter, and making one asks
/// the CPU (CPUID) whether its cycle counter can be trusted: on a virtual
/// machine a trap to the hypervisor, which took ~11 µs per limiter and
/// 44 % of an idle node's CPU while 19,000 connections each sent their
/// first command (perf).
pub(crate) fn rate_limiter(quota: Quota) -> DefaultDirectRateLimiter {
    static CLOCK: LazyLock<DefaultClock> = LazyLock::new(DefaultClock::default);
    RateLimiter::direct_with_clock(quota, CLOCK.clone())
}

/// A signal that turns on once and stays on: "stop accepting", "stop
/// the engine".
#[derive(Debug)]
pub(crate) struct Stop(watch::Sender<bool>);

impl Default for Stop {
    fn default() -> Self {
        Self(watch::Sender::new(false))
    }
}

impl Stop {
    /// Turns the signal on; true the first time.
    pub(crate) fn trigger(&self) -> bool {
        !self.0.send_replace(true)
    }

    /// Whether the signal is on.
    pub(crate) fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the signal is on (at once if it already is).
    pub(crate) fn triggered(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.0.subscribe();
        async move {
            // An error means the sender is gone: stop as well.
            let _ = receiver.wait_for(|on| *on).await;
        }
    }
}

/// How many things are in flight (connections open, envelopes queued for
/// a plugin lane, …), and a way to wait until none is.
#[derive(Debug)]
pub(crate) struct InFlight(watch::Sender<usize>);

impl Default for InFlight {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl InFlight {
    /// One more in flight. Nobody waits for a rise: waiters are not woken.
    pub(crate) fn start(&self) {
        self.0.send_if_modified(|count| {
            *count += 1;
            false
        });
    }

    /// One fewer in flight; wakes the waiters when none is left.
    pub(crate) fn finish(&self) {
        self.0.send_if_modified(|count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }

    /// How many are in flight now.
    pub(crate) fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once nothing is in flight.
    pub(crate) async fn wait_until_none(&self) {
        let mut receiver = self.0.subscribe();
        let _ = receiver.wait_for(|count| *count == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn in_flight_resolves_at_zero_only() {
        let in_flight = InFlight::default();
        in_flight.start();
        in_flight.start();
        let mut waiting = std::pin::pin!(in_flight.wait_until_none());
        assert!(waiting.as_mut().now_or_never().is_none());
        in_flight.finish();
        assert!(waiting.as_mut().now_or_never().is_none());
        in_flight.finish();
        waiting.await;
        assert_eq!(in_flight.count(), 0);
    }

    #[tokio::test]
    async fn stop_stays_on() {
        let stop = Stop::default();
        let triggered = stop.triggered();
        assert!(stop.trigger());
        assert!(!stop.trigger());
        triggered.await;
        stop.triggered().await;
        assert!(stop.is_triggered());
    }
}
