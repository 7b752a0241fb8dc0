//! Log lines that outside input can cause — a plugin failing on what a
//! client sent, a refused handshake — written a few a minute per source,
//! each carrying how many like it were left out since the last one. A
//! client can make the node do such work at will; it must not be able to
//! fill the node's log (or its disk) with it. Metrics count every one.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultDirectRateLimiter, Quota};

use crate::sync::rate_limiter;

/// Lines one source writes a minute at most (a burst of as many).
const LINES_PER_MINUTE: u32 = 10;

/// The budget of one source of log lines.
pub(crate) struct LogBudget {
    limiter: DefaultDirectRateLimiter,
    left_out: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        let lines = NonZeroU32::new(LINES_PER_MINUTE).expect("non-zero");
        Self {
            limiter: rate_limiter(Quota::per_minute(lines)),
            left_out: AtomicU64::new(0),
        }
    }
}

impl LogBudget {
    /// `Some(lines left out since the last one written)` if a line may be
    /// written now; `None` (and counted) if not.
    pub(crate) fn take(&self) -> Option<u64> {
        if self.limiter.check().is_ok() {
            Some(self.left_out.swap(0, Ordering::AcqRel))
        } else {
            self.left_out.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_written_then_counted_and_the_count_rides_on_the_next_line() {
        let budget = LogBudget::default();
        for _ in 0..LINES_PER_MINUTE {
            assert_eq!(budget.take(), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(budget.take(), None);
        }
        assert_eq!(budget.left_out.load(Ordering::Acquire), 25);
    }
}
