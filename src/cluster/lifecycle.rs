//! What the tenants' lifecycle webhooks are told: connections opened and
//! closed and their subscriptions, by the node that holds them; users
//! coming online and going offline, by each user's owner node — the one
//! node that knows all of a user's connections — so that each change of a
//! user is told once across the cluster.
//!
//! The owner keeps the users it has told online (only for tenants whose
//! webhooks ask for `user_online` or `user_offline`). A user it comes to own
//! when the nodes change, whose connections are announced to it again,
//! was online before: it is kept without telling, and told offline when
//! its last connection ends. (Left out: a user whose owner and every node
//! holding its connections went at once is never told offline.)

use crate::config::WebhookEvent;

use super::Cluster;

/// How a user's connections changed, for [`Cluster::note_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// A connection opened or closed: a change to tell.
    Changed,
    /// Connections announced again to a new owner: nothing changed for
    /// the user.
    Again,
}

impl Cluster {
    /// Tells `tenant`'s webhooks of `event`, if it has any.
    pub(crate) fn tell(
        &self,
        tenant: &str,
        event: WebhookEvent,
        user: &str,
        connection: Option<u64>,
        topic: Option<&str>,
    ) {
        let snapshot = self.state.tenants.snapshot();
        if let Some(webhooks) = snapshot.get(tenant).and_then(|t| t.webhooks.as_ref()) {
            webhooks.send(event, user, connection, topic, &self.node);
        }
    }

    /// Looks again at whether `user`, if this node owns it, holds a
    /// connection anywhere, and tells a change.
    pub(super) fn note_user(&self, tenant: &str, user: &str, seen: Seen) {
        let snapshot = self.state.tenants.snapshot();
        let Some(webhooks) = snapshot.get(tenant).and_then(|t| t.webhooks.as_ref()) else {
            return;
        };
        if !webhooks.wants(WebhookEvent::UserOnline) && !webhooks.wants(WebhookEvent::UserOffline) {
            return;
        }
        let owned = self.membership.owns(tenant, user);
        let mut here = false;
        self.state
            .sessions
            .for_each_of_user(tenant, user, |_| here = true);
        let online = owned && (here || self.state.remote.has_user(tenant, user));
        let key = (tenant.to_owned(), user.to_owned());
        if online {
            if self.online.insert(key, ()).is_none() && seen == Seen::Changed {
                webhooks.send(WebhookEvent::UserOnline, user, None, None, &self.node);
            }
        } else if self.online.remove(&key).is_some() && owned {
            webhooks.send(WebhookEvent::UserOffline, user, None, None, &self.node);
        }
    }

    /// After the nodes changed: users this node no longer owns are
    /// forgotten (their new owner tells), users it now owns with a
    /// connection here are kept, users whose connections were on a node
    /// gone are told offline.
    pub(super) fn recheck_online_users(&self) {
        let counted: Vec<(String, String)> = self
            .online
            .iter()
            .map(|entry| entry.key().clone())
            .collect();
        for (tenant, user) in counted {
            self.note_user(&tenant, &user, Seen::Changed);
        }
        for handle in self.state.sessions.all_connections() {
            self.note_user(handle.tenant(), handle.user(), Seen::Again);
        }
    }
}
