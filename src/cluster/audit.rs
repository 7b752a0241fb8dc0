//! The audit trail: who changed what through the admin API, when, from
//! where, and how it ended.
//!
//! Every node keeps the entries of the changes it applies (each change
//! carries its [`Actor`]), so any node answers for the whole cluster; a
//! call refused before it became a change (no right, bad input) is kept by
//! the node that refused it. Each entry is also a log line.
//!
//! On disk: `audit.jsonl` in the state directory, one JSON entry a line,
//! appended and flushed as it happens. Bounded by count and age: once the
//! file holds twice the count, it is rewritten with what is kept. A line
//! cut short by a crash is skipped at start (with a warning).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::change::Actor;
use crate::durable::write_atomically;
use crate::sync::lock;

/// The audit file, in the state directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// One audited call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub key_id: String,
    pub key_name: String,
    pub address: String,
    pub route: String,
    pub tenant: Option<String>,
    /// What changed: names and versions, never secrets.
    pub change: Value,
    /// `applied`, `refused` (by every node alike) or `denied` (before it
    /// became a change: no right, bad input).
    pub outcome: String,
    pub error: Option<String>,
    /// The node that wrote the entry.
    pub node: String,
}

impl AuditEntry {
    pub fn new(by: &Actor, tenant: Option<&str>, change: Value, node: &str) -> Self {
        Self {
            at_ms: crate::clock::now_micros() / 1000,
            key_id: by.key_id.clone(),
            key_name: by.key_name.clone(),
            address: by.address.clone(),
            route: by.route.clone(),
            tenant: tenant.map(str::to_owned),
            change,
            outcome: String::new(),
            error: None,
            node: node.to_owned(),
        }
    }
}

struct Kept {
    entries: VecDeque<AuditEntry>,
    /// Lines in the file (kept entries and those dropped since the last
    /// rewrite).
    lines_in_file: usize,
}

/// This node's audit trail.
pub struct AuditLog {
    path: PathBuf,
    max_entries: usize,
    max_age: Duration,
    kept: Mutex<Kept>,
}

impl AuditLog {
    /// Opens the trail in `dir`, reading what it kept.
    pub fn open(dir: &Path, max_entries: usize, max_age: Duration) -> std::io::Result<Self> {
        let path = dir.join(AUDIT_FILE);
        let mut entries = VecDeque::new();
        let mut lines_in_file = 0;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for (number, line) in text.lines().enumerate() {
                    lines_in_file += 1;
                    match serde_json::from_str::<AuditEntry>(line) {
                        Ok(entry) => entries.push_back(entry),
                        // Rewritten below without it: what is appended
                        // next must not continue a line cut short.
                        Err(err) => {
                            lines_in_file = usize::MAX / 4;
                            tracing::warn!(
                            file = %path.display(),
                            line = number + 1,
                            %err,
                                "unreadable audit entry skipped"
                            )
                        }
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let log = Self {
            path,
            max_entries: max_entries.max(1),
            max_age,
            kept: Mutex::new(Kept {
                entries,
                lines_in_file,
            }),
        };
        log.trim(&mut lock(&log.kept))?;
        Ok(log)
    }

    /// Keeps `entry`, on disk before it returns, and logs it.
    pub fn record(&self, entry: AuditEntry) {
        tracing::info!(
            target: "pushgate::audit",
            key_id = %entry.key_id,
            key_name = %entry.key_name,
            address = %entry.address,
            route = %entry.route,
            tenant = entry.tenant.as_deref().unwrap_or(""),
            change = %entry.change,
            outcome = %entry.outcome,
            error = entry.error.as_deref().unwrap_or(""),
            "audit"
        );
        let mut kept = lock(&self.kept);
        let written = self.append(&entry);
        kept.entries.push_back(entry);
        kept.lines_in_file += 1;
        if let Err(err) = written.and_then(|()| self.trim(&mut kept)) {
            tracing::error!(file = %self.path.display(), %err, "audit entry not written to disk");
        }
    }

    fn append(&self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).expect("an audit entry serializes");
        line.push(b'\n');
        let mut file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(&line)?;
        file.sync_data()
    }

    /// Drops entries past the bounds; rewrites the file once it holds
    /// twice what is kept.
    fn trim(&self, kept: &mut Kept) -> std::io::Result<()> {
        let oldest =
            (crate::clock::now_micros() / 1000).saturating_sub(self.max_age.as_millis() as u64);
        while kept.entries.len() > self.max_entries
            || kept.entries.front().is_some_and(|e| e.at_ms < oldest)
        {
            kept.entries.pop_front();
        }
        if kept.lines_in_file > 2 * self.max_entries.max(kept.entries.len())
            || (kept.lines_in_file > kept.entries.len() && kept.entries.is_empty())
        {
            let mut bytes = Vec::new();
            for entry in &kept.entries {
                serde_json::to_writer(&mut bytes, entry).expect("an audit entry serializes");
                bytes.push(b'\n');
            }
            write_atomically(&self.path, &bytes)?;
            kept.lines_in_file = kept.entries.len();
        }
        Ok(())
    }

    /// The newest entries first, at most `limit`, of `tenant` (all for
    /// `None`).
    pub fn newest(&self, tenant: Option<&str>, limit: usize) -> Vec<AuditEntry> {
        lock(&self.kept)
            .entries
            .iter()
            .rev()
            .filter(|e| tenant.is_none() || e.tenant.as_deref() == tenant)
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str) -> AuditEntry {
        let by = Actor::node("n", "test");
        AuditEntry::new(&by, Some(tenant), Value::Null, "n")
    }

    #[test]
    fn kept_across_opens_bounded_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 5, Duration::from_secs(3600)).unwrap();
        for i in 0..12 {
            log.record(entry(if i % 2 == 0 { "a" } else { "b" }));
        }
        assert_eq!(log.newest(None, 100).len(), 5);
        assert!(
            log.newest(Some("a"), 100)
                .iter()
                .all(|e| e.tenant.as_deref() == Some("a"))
        );
        // A line cut short by a crash.
        let path = dir.path().join(AUDIT_FILE);
        let mut file = std::fs::File::options().append(true).open(&path).unwrap();
        file.write_all(b"{\"at_ms\":1").unwrap();
        let reopened = AuditLog::open(dir.path(), 5, Duration::from_secs(3600)).unwrap();
        assert_eq!(reopened.newest(None, 100), log.newest(None, 100));
    }
}
