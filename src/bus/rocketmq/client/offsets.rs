//! The consumer's offsets in the client's local offset store: where a
//! renewed consumer resumes, where a restarted node resumes reading the
//! control log (seeded before the consumer starts), and earlier runs'
//! offsets removed once stale.

use std::collections::HashMap;

use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_protocol::protocol::RemotingSerializable;

use super::{Engine, STALE_OFFSETS};
use crate::bus::{ControlPosition, ResumeControl};

impl Engine {
    /// Where the client keeps this run's consumer offsets (its local
    /// offset store: the directory must exist for it to save them).
    pub(super) fn consumer_offsets_dir(&self) -> std::path::PathBuf {
        offsets_root().join(self.client_config(None).build_mq_client_id())
    }

    /// Writes `offsets` where the client's local offset store reads them
    /// when a consumer starts (its own format, written atomically).
    pub(super) fn save_offsets(&self, offsets: &HashMap<MessageQueue, i64>) -> std::io::Result<()> {
        let table: serde_json::Map<String, serde_json::Value> = offsets
            .iter()
            .filter_map(|(queue, offset)| Some((queue.serialize_json().ok()?, (*offset).into())))
            .collect();
        let file = self
            .consumer_offsets_dir()
            .join(&self.shared.consumer_group)
            .join("offsets.json");
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temporary = file.with_extension("json.pushgate");
        std::fs::write(
            &temporary,
            serde_json::json!({ "offsetTable": table }).to_string(),
        )?;
        std::fs::rename(&temporary, &file)
    }

    /// Has the first consumer read the control queue from where the node
    /// asked (see [`ResumeControl`]): an offset in its local offset store,
    /// which it reads as it starts. Every other queue starts at the newest
    /// message.
    pub(super) fn resume_control_records(&self, queues: &[MessageQueue]) {
        let Some(resume) = crate::sync::lock(&self.shared.resume).take() else {
            return;
        };
        let (queue, next) = match &resume {
            ResumeControl::Now => return,
            // The first queue takes control records while its broker lives.
            ResumeControl::FromStart => match queues.first() {
                Some(queue) => (queue.clone(), 0),
                None => return,
            },
            ResumeControl::After(position) => match queues.iter().find(|queue| {
                queue.broker_name() == position.broker.as_str()
                    && u32::try_from(queue.queue_id()).ok() == Some(position.queue)
            }) {
                Some(queue) => (queue.clone(), position.offset as i64 + 1),
                None => {
                    tracing::warn!(
                        broker = %position.broker,
                        queue = position.queue,
                        "the control queue this node last read is gone: it reads from now on"
                    );
                    return;
                }
            },
        };
        let offsets = HashMap::from([(queue.clone(), next)]);
        *crate::sync::lock(&self.shared.resumed_at) = Some(ControlPosition {
            broker: queue.broker_name().to_string(),
            queue: u32::try_from(queue.queue_id()).unwrap_or(0),
            offset: next as u64,
        });
        self.shared
            .resume_unchecked
            .store(true, std::sync::atomic::Ordering::Release);
        match self.save_offsets(&offsets) {
            Ok(()) => tracing::info!(
                broker = %queue.broker_name(),
                queue = queue.queue_id(),
                offset = next,
                "reading the control records this node has not applied yet"
            ),
            Err(err) => tracing::error!(
                %err,
                "cannot have the consumer read the control records this node missed: \
                 it reads from now on"
            ),
        }
    }

    /// Removes the offsets earlier runs of this node left (a node that
    /// was killed does not remove its own) once untouched for a day:
    /// `<client id of this run>` differs from theirs only in the run's
    /// start time. Recent ones may be another process's under the same
    /// name (a test harness runs several clusters on one host).
    pub(super) fn forget_earlier_runs(&self) {
        let ours = self.client_config(None).build_mq_client_id();
        let Some((run_prefix, _)) = ours.rsplit_once('-') else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(offsets_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let earlier_run = name
                .strip_prefix(run_prefix)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_digit()));
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age > STALE_OFFSETS);
            if earlier_run && stale && name != ours {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The client's local offset store: where it keeps each client id's
/// offsets (`rocketmq.client.localOffsetStoreDir`, else `~/.rocketmq_offsets`).
pub(super) fn offsets_root() -> std::path::PathBuf {
    std::env::var_os("rocketmq.client.localOffsetStoreDir")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| std::path::PathBuf::from(home).join(".rocketmq_offsets"))
        })
        .unwrap_or_else(|| std::path::PathBuf::from("/tmp/.rocketmq_offsets"))
}
