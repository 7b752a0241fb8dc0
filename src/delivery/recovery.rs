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
use super::history::{Entry, MarkerWait};
use super::outbound::ConnectionHandle;
use super::sessions::SessionManager;
use super::wire::WireFrame;
use crate::bus::envelope::{Position, Target};
use crate::bus::{Bus, ReadBack};
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
    let frames = replayed_frames(plugins, tenant, &handle, missed.entries).await;

    // 3. Ahead of what arrived live meanwhile.
    finish_resume(tenant, &handle, frames, complete);
    handle
}

/// How long a resume on a routing node waits for its marker to come back.
const MARKER_ROUND_TRIP: Duration = Duration::from_secs(10);
/// How far back a routing node reads a tenant's queue, in times the
/// tenant's `history.max_messages` (the queue holds other tenants' too):
/// a resume from further back reads that much and says it is incomplete,
/// as a node's own history would.
const READ_BACK_SPAN: u64 = 4;

/// Registers a connection of `identity` that last saw `since` on a node
/// whose bus routes pushes to their users' nodes (see `Bus::routes`):
/// this node's history holds only what was routed here, so what the
/// client missed is read back from the bus. In order:
/// 1. Registered: live delivery to it starts (queued, not yet written).
/// 2. `announce` tells the cluster and resolves once every node routes
///    this connection's pushes here (false if that took too long).
/// 3. A marker sent to this node alone in the tenant's stream: once it is
///    dispatched here, everything a node routed elsewhere before it knew
///    of this connection is stored before the marker, and what was
///    delivered live to the connection until then is counted.
/// 4. The stream read back from `since` to the marker, for this client:
///    those frames replace what was delivered live before the marker
///    (the same messages and more, in the stream's order); what came live
///    after the marker stays behind them.
pub async fn register_resuming_from_bus<F>(
    sessions: &Arc<SessionManager>,
    (plugins, bus): (&PluginRegistry, &Arc<dyn Bus>),
    tenant: &Arc<Tenant>,
    (identity, queue_capacity): (Identity, usize),
    since: Position,
    announce: impl FnOnce(&ConnectionHandle) -> F,
) -> ConnectionHandle
where
    F: std::future::Future<Output = bool>,
{
    let user = identity.user.clone();
    let topics: HashSet<String> = identity.topics.iter().cloned().collect();
    let limits = tenant.config.history.clone();
    let handle = sessions.register(tenant, identity, queue_capacity + limits.max_messages);
    let routed_everywhere = announce(&handle).await;

    let read = stream_to_marker(sessions, bus, tenant, Some(&handle), Some(since)).await;
    let Some((read, delivered_before)) = read else {
        finish_resume(tenant, &handle, Vec::new(), false);
        return handle;
    };
    let (entries, complete) = missed_of_read_back(read, &limits, &user, &topics);
    let complete = complete && routed_everywhere;
    let frames = replayed_frames(plugins, tenant, &handle, entries).await;
    handle.drop_oldest_queued(delivered_before);
    finish_resume(tenant, &handle, frames, complete);
    handle
}

/// What `tenant`'s stream holds after `since` — or, without it (or on
/// another stream: the tenant's queue moved), its latest messages — up to
/// a marker this node sends itself, read back from the bus; with how many
/// frames `handle` had queued when the marker was dispatched. At most
/// `READ_BACK_SPAN` times the tenant's history bound back; `complete` only
/// if that covers everything after `since`. `None` if the marker did not
/// come back.
async fn stream_to_marker(
    sessions: &Arc<SessionManager>,
    bus: &Arc<dyn Bus>,
    tenant: &Tenant,
    handle: Option<&ConnectionHandle>,
    since: Option<Position>,
) -> Option<(ReadBack, usize)> {
    let (marked_at, queued) = mark(sessions, bus, tenant, handle).await?;
    let span = tenant.config.history.max_messages as u64 * READ_BACK_SPAN;
    let window_start = marked_at.offset.saturating_sub(span + 1);
    let after = match since {
        Some(since) if since.stream == marked_at.stream => since.offset.max(window_start),
        _ => window_start,
    };
    let covers_since = since.is_some_and(|s| s.stream == marked_at.stream && s.offset >= after);
    if after + 1 >= marked_at.offset {
        let nothing = ReadBack {
            envelopes: Vec::new(),
            complete: covers_since,
        };
        return Some((nothing, queued));
    }
    let from = Position {
        stream: marked_at.stream,
        offset: after,
    };
    let read = match bus.read_back(from, marked_at.offset - 1).await {
        Ok(mut read) => {
            read.complete &= covers_since;
            read
        }
        Err(err) => {
            tracing::warn!(%err, "the tenant's stream could not be read back");
            ReadBack::default()
        }
    };
    Some((read, queued))
}

/// Has a marker sent into `tenant`'s stream to this node — sent after
/// this call began, shared with the resumes that came meanwhile — and
/// waits until it is dispatched here: its position, and how many frames
/// `handle` had queued then. `None` if it was not sent or did not come
/// back in time.
async fn mark(
    sessions: &Arc<SessionManager>,
    bus: &Arc<dyn Bus>,
    tenant: &Tenant,
    handle: Option<&ConnectionHandle>,
) -> Option<(Position, usize)> {
    let history = &sessions.history;
    let (tell, mut told) = tokio::sync::oneshot::channel();
    let handle = handle.cloned();
    let marker_id = history.join_marker(&tenant.name, MarkerWait { handle, tell });
    let one_at_a_time = history.marker_sending(&tenant.name).lock_owned().await;
    if history.close_marker(&tenant.name, &marker_id) {
        // Sent by a task of its own: the resumes sharing this marker must
        // not hear nothing because this one's client left mid-send.
        let (sessions, bus) = (sessions.clone(), bus.clone());
        let mut marker = crate::bus::envelope::marker(&tenant.name);
        marker.id = marker_id.clone();
        tokio::spawn(async move {
            let _one_at_a_time = one_at_a_time;
            let id = marker.id.clone();
            if let Err(err) = bus.mark(marker).await {
                tracing::warn!(%err, "a marker was not sent: nothing is read back");
                sessions.history.forget_marker(&id);
            }
        });
    } else {
        drop(one_at_a_time);
    }
    let marked = tokio::time::timeout(MARKER_ROUND_TRIP, &mut told)
        .await
        .ok()
        .and_then(Result::ok);
    if marked.is_none() {
        drop(told);
        history.forget_marker_wait(&marker_id);
    }
    marked
}

/// Of what was read back, the messages for this client (the latest
/// `max_messages` within `max_age`, once per idempotency key), each with
/// its frame; and whether that is all it missed.
fn missed_of_read_back(
    read: ReadBack,
    limits: &crate::config::HistoryConfig,
    user: &str,
    topics: &HashSet<String>,
) -> (Vec<MissedEntry>, bool) {
    let oldest_micros =
        crate::clock::now_micros().saturating_sub(limits.max_age.as_micros() as u64);
    let mut complete = read.complete;
    let mut keys = HashSet::new();
    let mut entries: Vec<MissedEntry> = Vec::new();
    for envelope in read.envelopes {
        if envelope.is_marker() || !for_client(&envelope.target, user, topics) {
            continue;
        }
        if envelope.published_at_micros < oldest_micros {
            complete = false;
            continue;
        }
        if let Some(key) = &envelope.idempotency_key
            && !keys.insert(key.clone())
        {
            continue;
        }
        if let Ok(frame) = super::wire::message_frame(&envelope) {
            entries.push(MissedEntry { envelope, frame });
        }
    }
    let cut = entries.len().saturating_sub(limits.max_messages);
    if cut > 0 {
        complete = false;
        entries.drain(..cut);
    }
    (entries, complete)
}

/// Queues `frames` ahead of what came live, then the `recovered` frame.
fn finish_resume(
    tenant: &Tenant,
    handle: &ConnectionHandle,
    frames: Vec<WireFrame>,
    complete: bool,
) {
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
    let frames = replayed_frames(plugins, tenant, handle, missed.entries).await;
    count_resume(tenant, complete, frames.len() as u64);
    (subscribed, frames, complete)
}

/// The frames `handle`'s client gets of what it missed: through the
/// tenant's `on-deliver` plugin like live ones (on the blocking pool,
/// within the tenant's plugin share), or as they were kept.
async fn replayed_frames(
    plugins: &PluginRegistry,
    tenant: &Arc<Tenant>,
    handle: &ConnectionHandle,
    entries: Vec<MissedEntry>,
) -> Vec<WireFrame> {
    match plugins.hook(&tenant.name, Hook::OnDeliver) {
        Some(plugin) if !entries.is_empty() => {
            let (for_handle, for_tenant) = (handle.clone(), tenant.clone());
            tenant
                .run_plugin_work_when_free(move || {
                    through_plugin(&for_tenant, plugin, &for_handle, &entries)
                })
                .await
                // The node is stopping: nothing to replay to.
                .unwrap_or_default()
        }
        _ => entries.into_iter().map(|entry| entry.frame).collect(),
    }
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
    (plugins, bus): (&PluginRegistry, &Arc<dyn Bus>),
    tenant: &Arc<Tenant>,
    of: HistoryOf,
    since: Option<Position>,
    limit: usize,
) -> HistoryPage {
    let of_user = match &of {
        HistoryOf::User(user) => Some(user.clone()),
        HistoryOf::Topic(_) => None,
    };
    // A routing node keeps a user's pushes only from while the user was
    // connected here: the bus keeps them all.
    if let (Some(user), true) = (&of_user, bus.routes()) {
        let read = stream_to_marker(sessions, bus, tenant, None, since).await;
        let (mut entries, complete) = read.map_or((Vec::new(), false), |(read, _)| {
            missed_of_read_back(read, &tenant.config.history, user, &HashSet::new())
        });
        let cut = entries.len().saturating_sub(limit);
        entries.drain(..cut);
        let frames = history_frames(plugins, tenant, user, entries).await;
        return HistoryPage {
            frames,
            complete: complete && cut == 0,
        };
    }
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
    let frames = match of_user {
        Some(user) => history_frames(plugins, tenant, &user, entries).await,
        None => entries.into_iter().map(|entry| entry.frame).collect(),
    };
    HistoryPage { frames, complete }
}

/// A user's history as that user's clients get it: through the tenant's
/// `on-deliver` plugin (with no session metadata).
async fn history_frames(
    plugins: &PluginRegistry,
    tenant: &Arc<Tenant>,
    user: &str,
    entries: Vec<MissedEntry>,
) -> Vec<WireFrame> {
    let reader = ConnectionHandle::new(
        0,
        tenant.name.clone(),
        Arc::from(user),
        Arc::default(),
        entries.len(),
    );
    replayed_frames(plugins, tenant, &reader, entries).await
}
