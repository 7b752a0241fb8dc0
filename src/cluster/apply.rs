//! How a change goes through the cluster: submitted on the control log
//! ([`Cluster::submit`]), read back by every node, and applied by the one
//! function that changes a node's state ([`Cluster::apply_change`]),
//! which hands each domain to a function of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{
    Applied, ApplyError, CHANGE_ROUND_TRIP, Change, Cluster, ControlEvent, Forget, Pending,
    SubmitError, admin_changes, check_user, nodes,
};
use crate::bus::ControlPosition;
use crate::clock::now_micros;
use crate::metrics;
use crate::plugin::CompiledPlugin;
use crate::sync::lock;

impl Cluster {
    /// Makes `change` on every node: puts it on the bus and answers with
    /// this node's outcome once it came back and was applied here.
    /// `prepared` is the plugin a `PluginInstalled` change carries, already
    /// compiled.
    pub(crate) async fn submit(
        &self,
        change: Change,
        prepared: Option<Arc<CompiledPlugin>>,
    ) -> Result<Applied, SubmitError> {
        let id = self.next_change.fetch_add(1, Ordering::Relaxed);
        let (reply, outcome) = oneshot::channel();
        lock(&self.pending).insert(id, Pending { reply, prepared });
        // However this call ends (answered, timed out, its caller gone),
        // the entry goes; applying the change removes it first otherwise.
        let _forget = Forget {
            waiting: &self.pending,
            id,
        };
        let event = ControlEvent {
            origin: self.node.clone(),
            id,
            change,
        };
        self.bus.append_to_log(vec![event.encode()]).await?;
        match tokio::time::timeout(CHANGE_ROUND_TRIP, outcome).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) | Err(_) => Err(SubmitError::NotBackYet(CHANGE_ROUND_TRIP)),
        }
    }

    pub(super) fn fact(&self, change: Change) -> ControlEvent {
        ControlEvent {
            origin: self.node.clone(),
            id: 0,
            change,
        }
    }

    /// Applies one event, whichever node it came from, and answers the
    /// request that made it if that was on this node.
    pub(super) async fn apply(
        &self,
        event: ControlEvent,
        position: Option<ControlPosition>,
        stored_at_ms: u64,
    ) {
        let ControlEvent { origin, id, change } = event;
        let change = change.into_current(&origin);
        let own = origin == self.node;
        if own && change.is_connection_fact() {
            // This node knows its own connections first-hand.
            return;
        }
        let admin = admin_changes::describe(&change);
        let ban_in_force =
            matches!(&change, Change::Ban { until_ms, .. } if *until_ms > now_micros() / 1000);
        if admin.is_none()
            && !ban_in_force
            && stored_at_ms.saturating_add(crate::bus::HISTORY_MARGIN_MS) < self.started_at_ms
        {
            // Read again to catch up with admin changes: what it says of
            // connections (a disconnect, a cap, a question) is over.
            return;
        }
        let pending = if own {
            lock(&self.pending).remove(&id)
        } else {
            None
        };
        let label = change.label();
        ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => label).increment(1);
        let (reply, prepared) = match pending {
            Some(Pending { reply, prepared }) => (Some(reply), prepared),
            None => (None, None),
        };
        let result = self.apply_change(&origin, change, prepared).await;
        if let Some((by, tenant, what)) = &admin {
            self.audit(by, what, tenant.as_deref(), &result);
            if let Err(err) = self.state.control.note_applied(position).await {
                tracing::error!(%err, "cannot note the change as applied");
            }
        }
        match &result {
            Ok(Applied::Noted) => {}
            Ok(applied) => {
                tracing::info!(node = %origin, change = label, ?applied, "change applied")
            }
            Err(err) => {
                ::metrics::counter!(metrics::CONTROL_EVENTS_REFUSED, "event" => label).increment(1);
                tracing::warn!(node = %origin, change = label, %err, "change refused")
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    /// The one function that makes a change to this node's state.
    pub(super) async fn apply_change(
        &self,
        origin: &str,
        change: Change,
        prepared: Option<Arc<CompiledPlugin>>,
    ) -> Result<Applied, ApplyError> {
        match change {
            Change::Tenant { change, .. } => self.apply_tenant(change).await,
            Change::Plugin { tenant, change, .. } => {
                self.apply_plugin(tenant, change, prepared).await
            }
            Change::Key { change, .. } => self.apply_key(change).await,
            Change::Ban {
                tenant,
                user,
                until_ms,
            } => {
                check_user(&user)?;
                self.ban(tenant, user, until_ms);
                Ok(Applied::Noted)
            }
            Change::TenantPut { .. }
            | Change::TenantRemoved { .. }
            | Change::PluginInstalled { .. }
            | Change::PluginActivated { .. }
            | Change::PluginRolledBack { .. }
            | Change::PluginRemoved { .. }
            | Change::PluginCanary { .. }
            | Change::PluginCanaryEnded { .. }
            | Change::PluginCanaryFailed { .. }
            | Change::PluginShadow { .. } => {
                // `apply` turned them into their domain form first.
                Box::pin(self.apply_change(origin, change.into_current(origin), prepared)).await
            }
            // Taken by the snapshot path before they reach here.
            Change::SnapshotWanted { .. } | Change::SnapshotPart(_) | Change::SnapshotDue => {
                Ok(Applied::Noted)
            }
            Change::Figures {
                interval_ms,
                tenants,
            } => {
                self.figures_received(origin, interval_ms, tenants);
                Ok(Applied::Noted)
            }
            Change::PusherChannels { parts } => {
                self.pusher_parts_received(origin, parts);
                Ok(Applied::Noted)
            }
            Change::NodeStopped => {
                self.node_gone(origin, nodes::NodeGone::Stopped);
                Ok(Applied::Noted)
            }
            Change::Connections(facts) => {
                // Each as its own record would be; the first refusal is
                // what the record's outcome says.
                let mut outcome = Ok(Applied::Noted);
                for fact in facts {
                    let applied = self.apply_connection_fact(origin, fact.into_change());
                    if outcome.is_ok() && applied.is_err() {
                        outcome = applied;
                    }
                }
                outcome
            }
            fact @ (Change::ConnectionOpened { .. }
            | Change::ConnectionHeld { .. }
            | Change::CapExceeded { .. }
            | Change::PresenceAsked { .. }
            | Change::PresenceAnswered { .. }
            | Change::ConnectionClosed { .. }
            | Change::Disconnect { .. }
            | Change::Subscriptions { .. }) => self.apply_connection_fact(origin, fact),
        }
    }
}
