//! A client that reconnects with the position of the last message it saw
//! (`since`) is registered and handed what it missed, then a `recovered`
//! frame that says whether the history covered the whole gap.
//!
//! In three steps, so that no resume holds anything other clients wait on:
//! 1. Briefly inside its tenant's history lock (which delivery holds while
//!    it delivers and keeps a message, see `history`), on the blocking
//!    pool: the connection is registered and the messages it missed are
//!    taken (shared, not copied). Every message is either among those or
//!    delivered live to the registered connection after them.
//! 2. Outside the lock: the frames it missed are made — through the
//!    tenant's `on-deliver` plugin like live ones, on the blocking pool
//!    within the tenant's plugin share (a resume waits for a slot of its
//!    own tenant's share, and costs no other tenant anything).
//! 3. They are put ahead of whatever arrived live meanwhile (nothing was
//!    written to the client yet), with the `recovered` frame behind them:
//!    in order, once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::dispatch::{DispatchOutcome, Personal};
use super::history::Entry;
use super::outbound::ConnectionHandle;
use super::sessions::SessionManager;
use super::wire::WireFrame;
use crate::bus::envelope::{Position, Target};
use crate::config::FailurePolicy;
use crate::plugin::registry::{HookPlugins, PluginRegistry};
use crate::plugin::{DeliverVerdict, Hook};
use crate::tenant::{Identity, Tenant};

/// How long a resuming client waits for this node to deliver up to its
/// position (the client saw it on a node that consumed faster).
const CATCH_UP: Duration = Duration::from_secs(5);

/// What a resuming client missed, taken under the lock.
struct Missed {
    entries: Vec<MissedEntry>,
    complete: bool,
}

/// One message it missed: shared with the history, not copied.
struct MissedEntry {
    envelope: Arc<crate::bus::envelope::Envelope>,
    frame: WireFrame,
}

impl From<&Entry> for MissedEntry {
    fn from(entry: &Entry) -> Self {
        Self {
            envelope: entry.envelope.clone(),
            frame: entry.frame.clone(),
        }
    }
}

/// Registers a connection of `identity` that last saw `since`, with what
/// it missed queued ahead of anything live, then the `recovered` frame.
pub async fn register_resuming(
    sessions: &Arc<SessionManager>,
    plugins: &PluginRegistry,
    tenant: &Arc<Tenant>,
    identity: Identity,
    queue_capacity: usize,
    since: Position,
) -> ConnectionHandle {
    catch_up(sessions, tenant, since).await;

    // 1. Registered, and what it missed taken, inside the lock.
    let user = identity.user.clone();
    let topics: HashSet<String> = identity.topics.iter().cloned().collect();
    let (handle, missed) = {
        let sessions = sessions.clone();
        let tenant = tenant.clone();
        tokio::task::spawn_blocking(move || {
            let history = sessions.history.tenant(&tenant.name);
            let mut kept = history.lock();
            let limits = &tenant.config.history;
            kept.expire(limits.max_age);
            // Room for what it missed on top of the usual queue.
            let handle = sessions.register(&tenant, identity, queue_capacity + limits.max_messages);
            let missed = kept.missed_since(&sessions.history, since);
            let missed = Missed {
                entries: missed
                    .entries
                    .into_iter()
                    .filter(|entry| for_client(&entry.envelope.target, &user, &topics))
                    .map(MissedEntry::from)
                    .collect(),
                complete: missed.complete,
            };
            (handle, missed)
        })
        .await
        .expect("registering a connection does not panic")
    };

    // 2. Its frames, outside the lock.
    let complete = missed.complete;
    let frames = match plugins.hook(&tenant.name, Hook::OnDeliver) {
        Some(plugin) if !missed.entries.is_empty() => {
            let for_handle = handle.clone();
            let for_tenant = tenant.clone();
            tenant
                .run_plugin_work_when_free(move || {
                    through_plugin(&for_tenant, plugin, &for_handle, &missed.entries)
                })
                .await
                // The node is stopping: nothing to replay to.
                .unwrap_or_default()
        }
        _ => missed
            .entries
            .into_iter()
            .map(|entry| entry.frame)
            .collect(),
    };

    // 3. Ahead of what arrived live meanwhile.
    let replayed = frames.len() as u64;
    let recovered = serde_json::json!({
        "type": "recovered",
        "complete": complete,
        "replayed": replayed,
    });
    let mut frames = frames;
    frames.push(WireFrame::text(recovered.to_string()));
    handle.enqueue_ahead(frames);
    count_resume(tenant, complete, replayed);
    handle
}

/// Counts one resume and the messages it replayed.
fn count_resume(tenant: &Tenant, complete: bool, replayed: u64) {
    ::metrics::counter!(
        crate::metrics::RESUMES,
        "tenant" => tenant.name.to_string(),
        "complete" => if complete { "true" } else { "false" }
    )
    .increment(1);
    ::metrics::counter!(crate::metrics::RESUMED_MESSAGES, "tenant" => tenant.name.to_string())
        .increment(replayed);
}

/// Waits (a moment at most) until this node delivered up to `since`: the
/// client saw it on a node that consumed faster.
async fn catch_up(sessions: &SessionManager, tenant: &Tenant, since: Position) {
    let history = sessions.history.tenant(&tenant.name);
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let advanced = history.advanced();
        tokio::pin!(advanced);
        advanced.as_mut().enable();
        let kept = history.clone();
        let behind = tokio::task::spawn_blocking(move || kept.lock().behind(since))
            .await
            .expect("reading the history does not panic");
        if !behind {
            break;
        }
        if tokio::time::timeout_at(deadline, advanced).await.is_err() {
            break;
        }
    }
}

/// What a client subscribing to `topic` again missed of it since it last
/// saw `since` (a Pusher client's recovery): `subscribe` runs inside the
/// tenant's history lock, so every message of the topic is either among
/// the frames returned (oldest first, through the tenant's `on-deliver`
/// plugin like live ones) or delivered live after them. Also whether the
/// history covered the whole gap.
pub async fn subscribe_resuming<R>(
    sessions: &Arc<SessionManager>,
    plugins: &PluginRegistry,
    tenant: &Arc<Tenant>,
    handle: &ConnectionHandle,
    (topic, since): (&str, Position),
    subscribe: impl FnOnce() -> R,
) -> (R, Vec<WireFrame>, bool) {
    catch_up(sessions, tenant, since).await;
    let (subscribed, missed) = {
        let history = sessions.history.tenant(&tenant.name);
        let mut kept = history.lock();
        kept.expire(tenant.config.history.max_age);
        let subscribed = subscribe();
        let missed = kept.missed_since(&sessions.history, since);
        let missed = Missed {
            entries: missed
                .entries
                .into_iter()
                .filter(|entry| matches!(&entry.envelope.target, Target::Topic(t) if t == topic))
                .map(MissedEntry::from)
                .collect(),
            complete: missed.complete,
        };
        (subscribed, missed)
    };
    let complete = missed.complete;
    let frames = match plugins.hook(&tenant.name, Hook::OnDeliver) {
        Some(plugin) if !missed.entries.is_empty() => {
            let (for_handle, for_tenant) = (handle.clone(), tenant.clone());
            tenant
                .run_plugin_work_when_free(move || {
                    through_plugin(&for_tenant, plugin, &for_handle, &missed.entries)
                })
                .await
                .unwrap_or_default()
        }
        _ => missed.entries.into_iter().map(|e| e.frame).collect(),
    };
    count_resume(tenant, complete, frames.len() as u64);
    (subscribed, frames, complete)
}

/// True if a message addressed to `target` was for this client.
fn for_client(target: &Target, user: &str, topics: &HashSet<String>) -> bool {
    match target {
        Target::Users(users) => users.iter().any(|u| u == user),
        Target::Topic(topic) => topics.contains(topic),
        Target::Broadcast => true,
    }
}

/// The frames `handle`'s client gets of `missed`, by the plugin version
/// serving its user: made as live delivery makes them, into a scratch
/// queue of the client's own (never the live one).
fn through_plugin(
    tenant: &Tenant,
    plugins: HookPlugins,
    handle: &ConnectionHandle,
    missed: &[MissedEntry],
) -> Vec<WireFrame> {
    let plugin = plugins.serving(handle.user());
    let fallback = if tenant.config.plugin.failure_policy == FailurePolicy::Open {
        DeliverVerdict::Pass
    } else {
        DeliverVerdict::Drop
    };
    let scratch = handle.scratch(missed.len());
    let mut outcome = DispatchOutcome::default();
    for entry in missed {
        // Replayed as it was delivered live: by the version serving this
        // user, and compared by no shadow (it saw it then).
        Personal {
            tenant,
            plugin,
            shadow: None,
            envelope: &entry.envelope,
            message: &super::plugin_message(&entry.envelope),
            frame: &entry.frame,
            fallback: &fallback,
        }
        .deliver(std::slice::from_ref(&scratch), &mut outcome);
    }
    std::iter::from_fn(|| scratch.next_frame()).collect()
}

/// Whose messages a service reads back (`POST /v1/history`).
pub enum HistoryOf {
    /// Messages to this topic.
    Topic(String),
    /// Messages to this user, and broadcasts: what every client of the
    /// user receives whatever its topics.
    User(String),
}

/// What this node keeps of a tenant's messages for a service.
pub struct HistoryPage {
    /// The messages as a client receives them (with `pos`), oldest first.
    pub frames: Vec<WireFrame>,
    /// True if nothing after `since` is missing (always false without
    /// `since`: what came before the oldest kept message is unknown).
    pub complete: bool,
}

/// The latest `limit` messages of `of` after `since` (all kept without
/// it) — for a user, each as the tenant's `on-deliver` plugin gives it to
/// that user (with no session metadata) — as a resuming client would get
/// them.
pub async fn read_history(
    sessions: &Arc<SessionManager>,
    plugins: &PluginRegistry,
    tenant: &Arc<Tenant>,
    of: HistoryOf,
    since: Option<Position>,
    limit: usize,
) -> HistoryPage {
    let of_user = match &of {
        HistoryOf::User(user) => Some(user.clone()),
        HistoryOf::Topic(_) => None,
    };
    let wanted = move |target: &Target| match &of {
        HistoryOf::Topic(topic) => matches!(target, Target::Topic(t) if t == topic),
        HistoryOf::User(user) => for_client(target, user, &HashSet::new()),
    };
    let for_sessions = sessions.clone();
    let for_tenant = tenant.clone();
    let (entries, complete) = tokio::task::spawn_blocking(move || {
        let history = for_sessions.history.tenant(&for_tenant.name);
        let mut kept = history.lock();
        kept.expire(for_tenant.config.history.max_age);
        let (entries, complete) = match since {
            Some(since) => {
                let missed = kept.missed_since(&for_sessions.history, since);
                (missed.entries, missed.complete)
            }
            None => (kept.missed_all(), false),
        };
        let mut entries: Vec<MissedEntry> = entries
            .into_iter()
            .filter(|entry| wanted(&entry.envelope.target))
            .map(MissedEntry::from)
            .collect();
        // The latest `limit`: a page that leaves older ones out is not all
        // that came after `since`.
        let cut = entries.len().saturating_sub(limit);
        entries.drain(..cut);
        (entries, complete && cut == 0)
    })
    .await
    .expect("reading the history does not panic");
    let frames = match (of_user, plugins.hook(&tenant.name, Hook::OnDeliver)) {
        (Some(user), Some(plugin)) if !entries.is_empty() => {
            let reader = ConnectionHandle::new(
                0,
                tenant.name.clone(),
                Arc::from(user.as_str()),
                Arc::default(),
                entries.len(),
            );
            let for_tenant = tenant.clone();
            tenant
                .run_plugin_work_when_free(move || {
                    through_plugin(&for_tenant, plugin, &reader, &entries)
                })
                .await
                .unwrap_or_default()
        }
        _ => entries.into_iter().map(|entry| entry.frame).collect(),
    };
    HistoryPage { frames, complete }
}
