//! What one plugin instance may take, enforced by the store's resource
//! limiter: linear memory counted over all its memories together (so two
//! memories cannot hold twice the tenant's limit), table elements, and the
//! number of instances, tables and memories; plus the bounds on what a
//! plugin hands back (log lines, rejection reasons, identities).
//!
//! A refused growth is remembered: that is how a failed call is told to be
//! a memory bomb rather than a trap.

use wasmtime::{StoreLimits, StoreLimitsBuilder};

use super::CallSettings;

/// Core instances one plugin instance may create (a component is several).
const MAX_INSTANCES: usize = 4;
/// Tables, and elements in each table.
const MAX_TABLES: usize = 8;
const MAX_TABLE_ELEMENTS: usize = 20_000;
/// Linear memories (their bytes together are bounded by the tenant).
const MAX_MEMORIES: usize = 2;
/// Log lines one call may write; more are dropped and counted.
pub(super) const MAX_LOG_LINES_PER_CALL: u32 = 16;
/// Longest log line kept, in bytes; the rest is cut.
pub(super) const MAX_LOG_LINE_BYTES: usize = 1024;
/// Longest rejection reason an `authenticate` hook may give, in bytes.
pub const MAX_REJECTION_BYTES: usize = 256;
/// Longest user id an identity may carry.
pub const MAX_IDENTITY_USER_BYTES: usize = 256;
/// Metadata entries an identity may carry, and their sizes.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_BYTES: usize = 64;
pub const MAX_METADATA_VALUE_BYTES: usize = 256;

/// Why what a hook handed back is unusable, if it is: each check here is
/// counted once, as the call's outcome (`bad_output`), and counts toward
/// the hook's breaker.
pub(super) fn check_replacement(data: &str, max_bytes: usize) -> Result<(), BadOutput> {
    if data.len() > max_bytes {
        return Err(BadOutput::TooLarge {
            size: data.len(),
            max_bytes,
        });
    }
    serde_json::from_str::<serde::de::IgnoredAny>(data)
        .map(drop)
        .map_err(BadOutput::NotJson)
}

/// What is wrong with what a hook handed back.
#[derive(Debug, thiserror::Error)]
pub(super) enum BadOutput {
    #[error("replacement data of {size} bytes, over the tenant's max_message_bytes ({max_bytes})")]
    TooLarge { size: usize, max_bytes: usize },
    #[error("replacement data is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("a user id is 1 to {MAX_IDENTITY_USER_BYTES} bytes")]
    User,
    #[error(
        "metadata is at most {MAX_METADATA_ENTRIES} entries of {MAX_METADATA_KEY_BYTES}-byte \
         keys and {MAX_METADATA_VALUE_BYTES}-byte values"
    )]
    Metadata,
    #[error("{verdicts} verdicts for {recipients} recipients")]
    VerdictCount { verdicts: usize, recipients: usize },
}

/// Why an identity from `authenticate` is unusable, if it is.
pub(super) fn check_identity(user: &str, metadata: &[(String, String)]) -> Result<(), BadOutput> {
    if user.is_empty() || user.len() > MAX_IDENTITY_USER_BYTES {
        return Err(BadOutput::User);
    }
    let fits = metadata.len() <= MAX_METADATA_ENTRIES
        && metadata.iter().all(|(key, value)| {
            key.len() <= MAX_METADATA_KEY_BYTES && value.len() <= MAX_METADATA_VALUE_BYTES
        });
    if !fits {
        return Err(BadOutput::Metadata);
    }
    Ok(())
}

/// The limits of one instance, for its current call.
pub(super) struct PluginLimits {
    /// Bytes of linear memory the instance may hold, over all memories.
    max_memory: usize,
    /// Bytes it holds now (kept across calls: a pooled instance keeps what
    /// it grew).
    memory: usize,
    /// Counts and table elements.
    others: StoreLimits,
    pub(super) refused_growth: bool,
    /// Log lines this call may still write.
    pub(super) log_lines_left: u32,
}

impl PluginLimits {
    pub(super) fn new(settings: &CallSettings) -> Self {
        Self {
            max_memory: settings.max_memory_bytes,
            memory: 0,
            others: StoreLimitsBuilder::new()
                .instances(MAX_INSTANCES)
                .tables(MAX_TABLES)
                .table_elements(MAX_TABLE_ELEMENTS)
                .memories(MAX_MEMORIES)
                .trap_on_grow_failure(true)
                .build(),
            refused_growth: false,
            log_lines_left: MAX_LOG_LINES_PER_CALL,
        }
    }

    /// Starts a new call under `settings`: its bound, a fresh log budget;
    /// the memory the instance holds stays counted.
    pub(super) fn renew(&mut self, settings: &CallSettings) {
        self.max_memory = settings.max_memory_bytes;
        self.refused_growth = false;
        self.log_lines_left = MAX_LOG_LINES_PER_CALL;
    }

    /// Bytes of linear memory the instance holds.
    pub(super) fn memory(&self) -> usize {
        self.memory
    }

    /// The bound the instance runs under.
    pub(super) fn max_memory(&self) -> usize {
        self.max_memory
    }
}

impl wasmtime::ResourceLimiter for PluginLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let total = self.memory.saturating_add(growth);
        if total > self.max_memory || maximum.is_some_and(|max| desired > max) {
            self.refused_growth = true;
            return Err(wasmtime::format_err!(
                "the plugin's memory limit of {} bytes was reached",
                self.max_memory
            ));
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.others.table_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.refused_growth = true;
        }
        allowed
    }

    fn instances(&self) -> usize {
        self.others.instances()
    }

    fn tables(&self) -> usize {
        self.others.tables()
    }

    fn memories(&self) -> usize {
        self.others.memories()
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use wasmtime::ResourceLimiter;

    use super::*;

    fn limits(max_memory_bytes: usize) -> PluginLimits {
        PluginLimits::new(&CallSettings {
            config: Arc::default(),
            max_memory_bytes,
            timeout: Duration::from_millis(10),
            max_output_bytes: 1024,
            canary: Default::default(),
            shadow: Default::default(),
        })
    }

    #[test]
    fn memory_is_counted_over_every_memory_of_the_instance() {
        let mut limits = limits(100);
        assert!(limits.memory_growing(0, 60, None).unwrap());
        assert!(
            limits.memory_growing(0, 60, None).is_err(),
            "a second memory may not hold the limit again"
        );
        assert!(limits.refused_growth);
        assert_eq!(limits.memory(), 60);
    }

    #[test]
    fn a_new_call_keeps_what_the_instance_holds() {
        let mut limits = limits(100);
        assert!(limits.memory_growing(0, 90, None).unwrap());
        limits.renew(&CallSettings {
            config: Arc::default(),
            max_memory_bytes: 100,
            timeout: Duration::from_millis(10),
            max_output_bytes: 1024,
            canary: Default::default(),
            shadow: Default::default(),
        });
        assert!(limits.memory_growing(90, 120, None).is_err());
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncated("héllo", 2), "h");
        assert_eq!(truncated("abc", 10), "abc");
    }

    #[test]
    fn fuzz_truncation_keeps_a_prefix_within_the_bound() {
        arbtest::arbtest(|u| {
            let text: String = u.arbitrary()?;
            let max = u.int_in_range(0..=text.len() + 2)?;
            let cut = truncated(&text, max);
            assert!(cut.len() <= max && text.starts_with(cut));
            Ok(())
        })
        .run();
    }
}
