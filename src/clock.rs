//! Wall-clock time in the one unit the parts exchange.
//!
//! Knows nothing of any part of the gateway.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: comparable across the nodes of a
/// cluster, unlike `Instant`.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
