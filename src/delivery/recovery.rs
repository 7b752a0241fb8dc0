//! A client that reconnects with the position of the last message it saw
//! (`since`) is registered and handed what it missed in one step, inside
//! its tenant's history lock, which delivery holds while it delivers and
//! keeps a message (see `history`): every message is either among those
//! handed over or delivered live after them — in order, once. Then a
//! `recovered` frame says whether the history covered the whole gap.
//!
//! Missed messages pass through the tenant's `on-deliver` plugin like
//! live ones.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::connection::ConnectionHandle;
use super::dispatch::{DispatchOutcome, Personal};
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
    let history = sessions.history.tenant(&tenant.name);
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let advanced = history.advanced();
        tokio::pin!(advanced);
        advanced.as_mut().enable();
        if !history.lock().behind(since) {
            break;
        }
        if tokio::time::timeout_at(deadline, advanced).await.is_err() {
            break;
        }
    }
    let plugin = plugins.hook(&tenant.name, Hook::OnDeliver);
    let through_plugin = plugin.is_some();
    let sessions = sessions.clone();
    let tenant = tenant.clone();
    let step = move || resume(&sessions, plugin, &tenant, identity, queue_capacity, since);
    if !through_plugin {
        return step();
    }
    // A plugin runs on a blocking thread, as on the tenant's lane.
    tokio::task::spawn_blocking(step)
        .await
        .expect("resuming a connection does not panic")
}

fn resume(
    sessions: &SessionManager,
    plugins: Option<HookPlugins>,
    tenant: &Tenant,
    identity: Identity,
    queue_capacity: usize,
    since: Position,
) -> ConnectionHandle {
    let history = sessions.history.tenant(&tenant.name);
    let mut kept = history.lock();
    let limits = &tenant.config.history;
    kept.expire(limits.max_age);
    let user = identity.user.clone();
    let topics: HashSet<String> = identity.topics.iter().cloned().collect();
    // Room for what it missed on top of the usual queue.
    let handle = sessions.register(tenant, identity, queue_capacity + limits.max_messages);
    let missed = kept.missed_since(&sessions.history, since);
    let plugin = plugins.as_ref().map(|p| p.serving(&user));
    let fallback = if tenant.config.plugin.failure_policy == FailurePolicy::Open {
        DeliverVerdict::Pass
    } else {
        DeliverVerdict::Drop
    };
    let mut outcome = DispatchOutcome::default();
    for entry in &missed.entries {
        let envelope = &entry.envelope;
        let for_this_client = match &envelope.target {
            Target::Users(users) => users.contains(&user),
            Target::Topic(topic) => topics.contains(topic),
            Target::Broadcast => true,
        };
        if !for_this_client {
            continue;
        }
        match &plugin {
            // Replayed as it was delivered live: by the version serving
            // this user, and compared by no shadow (it saw it then).
            Some(plugin) => Personal {
                tenant,
                plugin,
                shadow: None,
                envelope,
                message: &super::plugin_message(envelope),
                frame: &entry.frame,
                fallback: &fallback,
            }
            .deliver(std::slice::from_ref(&handle), &mut outcome),
            None => outcome.count(handle.enqueue(entry.frame.clone())),
        }
    }
    // What was handed over (a plugin may have dropped some).
    let replayed = outcome.queued;
    let recovered = serde_json::json!({
        "type": "recovered",
        "complete": missed.complete,
        "replayed": replayed,
    });
    handle.enqueue(WireFrame::text(recovered.to_string()));
    ::metrics::counter!(
        crate::metrics::RESUMES,
        "tenant" => tenant.name.to_string(),
        "complete" => if missed.complete { "true" } else { "false" }
    )
    .increment(1);
    ::metrics::counter!(crate::metrics::RESUMED_MESSAGES, "tenant" => tenant.name.to_string())
        .increment(replayed);
    handle
}
