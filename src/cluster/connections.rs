//! Connections across nodes: each node announces the connections it opens
//! and closes to their users' owners ([`super::ownership`]); an owner keeps
//! its users' lists ([`super::remote`]), holds the per-user cap across the
//! cluster and answers presence; a service's disconnects and subscription
//! changes reach every node. These facts are not admin changes: they are
//! not kept, and a node that catches up skips the old ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::change::{ConnectionFact, HeldConnection};
use super::lifecycle::Seen;
use super::locations::RoutedHere;
use super::{
    ANNOUNCE_BATCH, ANNOUNCE_RETRY_FIRST, ANNOUNCE_RETRY_MOST, ANSWER_ROUND_TRIP, Applied,
    ApplyError, AskError, Change, Cluster, ControlEvent, Forget, LiveConnection,
    MAX_PRESENCE_USERS, MAX_TOPICS_PER_CHANGE, check_user,
};
use crate::clock::now_micros;
use crate::config::WebhookEvent;
use crate::delivery::{CloseReason, ConnectionHandle};
use crate::metrics;
use crate::sync::lock;
use crate::tenant::MAX_TOPIC_BYTES;

/// Bans each node keeps.
const MAX_BANS: usize = 100_000;

impl Cluster {
    /// Tells the owner of `handle`'s user that this node opened it (this
    /// node's own index is the owner's list of its own connections).
    pub(crate) fn connection_opened(&self, handle: &ConnectionHandle) {
        self.announce_opened(handle, false);
    }

    /// As [`Cluster::connection_opened`], for a connection that waits
    /// until every node routes its pushes here (a resume): on a bus that
    /// routes pushes to their users' nodes, the answer resolves then (see
    /// [`RoutedHere`]), and the other nodes probe early for it. Registered
    /// before the announcement is queued, so the announcement always says
    /// it is awaited.
    pub(crate) fn connection_opened_waiting(&self, handle: &ConnectionHandle) -> RoutedHere {
        self.announce_opened(handle, true)
    }

    fn announce_opened(&self, handle: &ConnectionHandle, waits: bool) -> RoutedHere {
        let owner = self.membership.owner(handle.tenant(), handle.user());
        let mut routed = RoutedHere::at_once();
        if let Some(locations) = &self.locations {
            let who = (&**handle.tenant(), &**handle.user());
            locations.held(who, &self.node, handle.id(), handle.opened_at_micros());
            if waits {
                routed = RoutedHere::after_announcement(locations, handle.id());
            }
        }
        // Routing nodes hear of every connection (pushes to its user come
        // here); otherwise only the owner does.
        if owner != *self.membership.this() || self.locations.is_some() {
            self.queue_connection_event(opened(&owner, handle));
        }
        self.tell(
            handle.tenant(),
            WebhookEvent::Connected,
            handle.user(),
            Some(handle.id()),
            None,
        );
        self.note_user(handle.tenant(), handle.user(), Seen::Changed);
        routed
    }

    /// Tells the owner of `handle`'s user that it ended.
    pub(crate) fn connection_closed(&self, handle: &ConnectionHandle) {
        self.tell(
            handle.tenant(),
            WebhookEvent::Disconnected,
            handle.user(),
            Some(handle.id()),
            None,
        );
        if let Some(locations) = &self.locations {
            let who = (&**handle.tenant(), &**handle.user());
            locations.closed(who, &self.node, handle.id());
            locations.not_announcing(handle.id());
        }
        if self.membership.owns(handle.tenant(), handle.user()) {
            self.note_user(handle.tenant(), handle.user(), Seen::Changed);
            if self.locations.is_none() {
                return;
            }
        }
        let _gate = lock(&self.announce_gate);
        self.queue_connection_event(Change::ConnectionClosed {
            tenant: handle.tenant().to_string(),
            user: handle.user().to_string(),
            connection: handle.id(),
        });
    }

    /// Notes in the routing map that `origin` opened `connection` of a
    /// user at `opened_at_micros`, or closed it (`None`). (This node's own
    /// are noted as they happen: its own facts are not applied again.)
    fn located(&self, origin: &str, who: (&str, &str), connection: u64, opened_at: Option<u64>) {
        let Some(locations) = &self.locations else {
            return;
        };
        match opened_at {
            Some(opened_at_micros) => locations.held(who, origin, connection, opened_at_micros),
            None => locations.closed(who, origin, connection),
        }
    }

    pub(super) fn queue_connection_event(&self, change: Change) {
        if !self.replicates_connections {
            return;
        }
        if self.connection_events.try_send(self.fact(change)).is_err() {
            ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => "dropped_announcement")
                .increment(1);
            self.announcements_dropped.store(true, Ordering::Relaxed);
        }
    }

    /// Sends this node's connection announcements, many at a time, in order.
    ///
    /// None is given up: an owner missing one holds the per-user cap short
    /// of a connection, and a routing node sends the user's pushes past it.
    /// A batch the bus does not take (a busy or absent broker) is sent
    /// again until it is; announcements dropped meanwhile because the
    /// outbox was full are made good by announcing every connection of this
    /// node again once it has emptied.
    pub(crate) async fn send_connection_events(
        self: Arc<Self>,
        mut outbox: mpsc::Receiver<ControlEvent>,
    ) {
        let mut batch = Vec::with_capacity(ANNOUNCE_BATCH);
        while outbox.recv_many(&mut batch, ANNOUNCE_BATCH).await > 0 {
            let records = self.records_of(batch.drain(..));
            let mut wait = ANNOUNCE_RETRY_FIRST;
            while let Err(err) = self.bus.announce(records.clone()).await {
                tracing::debug!(%err, "connection announcements not taken: sending them again");
                ::metrics::counter!(metrics::CONTROL_EVENTS, "event" => "announcement_resent")
                    .increment(1);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(ANNOUNCE_RETRY_MOST);
            }
            if outbox.is_empty() && self.announcements_dropped.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    "connection announcements were dropped: announcing every connection again"
                );
                let every = self.state.sessions.all_connections();
                self.announce_again_in_background(every, self.membership.view());
            }
        }
    }

    /// The records that carry `events`: one each, or — while every node
    /// routes, and so reads the batched form — their connection facts
    /// together, in order with the other events.
    fn records_of(&self, events: impl Iterator<Item = ControlEvent>) -> Vec<Vec<u8>> {
        let Some(locations) = self
            .locations
            .as_ref()
            .filter(|locations| locations.everyone_reads_batches())
        else {
            return events.map(|event| event.encode()).collect();
        };
        let mut records = Vec::new();
        let mut facts = Vec::new();
        for event in events {
            match ConnectionFact::of(event.change) {
                Ok(mut fact) => {
                    if let ConnectionFact::Held {
                        connection,
                        awaited,
                        ..
                    } = &mut fact
                    {
                        *awaited = locations.awaited(*connection);
                    }
                    facts.push(fact);
                }
                Err(change) => {
                    if !facts.is_empty() {
                        let facts = std::mem::take(&mut facts);
                        records.push(self.fact(Change::Connections(facts)).encode());
                    }
                    let change = *change;
                    records.push(ControlEvent { change, ..event }.encode());
                }
            }
        }
        if !facts.is_empty() {
            records.push(self.fact(Change::Connections(facts)).encode());
        }
        records
    }

    /// Keeps node `origin`'s connection of `user` if this node is its
    /// `owner`, and holds the cap for the user.
    pub(super) fn keep_connection(
        &self,
        owner: bool,
        origin: &str,
        (tenant, user): (&str, &str),
        connection: u64,
        opened_at_micros: u64,
        seen: Seen,
    ) -> Result<Applied, ApplyError> {
        check_user(user)?;
        if owner && let Some(tenant) = self.state.tenants.snapshot().get(tenant) {
            self.state
                .remote
                .opened(&tenant.name, user, origin, connection, opened_at_micros);
            self.state.sessions.enforce_cap(tenant, user);
            self.note_user(&tenant.name, user, seen);
        }
        Ok(Applied::Noted)
    }

    /// The connections `user` holds that this node knows first-hand (its
    /// own, but those asked to close: a presence read right after a
    /// disconnect no longer lists them) and as the user's owner (the
    /// others').
    pub(super) fn held_here(&self, tenant: &str, user: &str) -> Vec<HeldConnection> {
        let mut held = Vec::new();
        self.state
            .sessions
            .for_each_of_user(tenant, user, |handle| {
                if handle.close_reason().is_some() {
                    // Asked to close (a disconnect, a cap): leaving.
                    return;
                }
                held.push(HeldConnection {
                    node: self.node.clone(),
                    id: handle.id(),
                    opened_at_micros: handle.opened_at_micros(),
                });
            });
        for (node, id, opened_at_micros) in self.state.remote.of_user(tenant, user) {
            held.push(HeldConnection {
                node: node.to_string(),
                id,
                opened_at_micros,
            });
        }
        held
    }

    /// The connections each of `users` of `tenant` holds on every node, in
    /// the order asked, oldest first: asked of each user's owner (over the
    /// bus unless this node owns it), with this node's own connections
    /// added first-hand (the owner may not have heard of the newest yet).
    pub(crate) async fn presence(
        &self,
        tenant: &str,
        users: &[String],
    ) -> Result<Vec<Vec<LiveConnection>>, AskError> {
        let mut answers: Vec<Vec<HeldConnection>> = vec![Vec::new(); users.len()];
        let mut by_owner: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (index, user) in users.iter().enumerate() {
            let owner = self.membership.owner(tenant, user);
            if owner == *self.membership.this() {
                answers[index] = self.held_here(tenant, user);
            } else {
                by_owner.entry(owner).or_default().push(index);
            }
        }
        let asked = by_owner.into_iter().map(|(owner, indexes)| async move {
            let names = indexes.iter().map(|&i| users[i].clone()).collect();
            let held = self.ask(owner, tenant, names).await?;
            Ok::<_, AskError>(indexes.into_iter().zip(held))
        });
        for answered in futures_util::future::try_join_all(asked).await? {
            for (index, held) in answered {
                answers[index] = held;
            }
        }
        let this: Arc<str> = self.membership.this().clone();
        Ok(users
            .iter()
            .zip(answers)
            .map(|(user, held)| {
                let mut live: Vec<LiveConnection> = held
                    .into_iter()
                    .filter(|c| c.node != self.node)
                    .map(|c| LiveConnection {
                        node: Arc::from(c.node),
                        id: c.id,
                        opened_at_micros: c.opened_at_micros,
                    })
                    .collect();
                self.state
                    .sessions
                    .for_each_of_user(tenant, user, |handle| {
                        if handle.close_reason().is_some() {
                            return;
                        }
                        live.push(LiveConnection {
                            node: this.clone(),
                            id: handle.id(),
                            opened_at_micros: handle.opened_at_micros(),
                        });
                    });
                live.sort_by(|a, b| {
                    (a.opened_at_micros, &a.node, a.id).cmp(&(b.opened_at_micros, &b.node, b.id))
                });
                live
            })
            .collect())
    }

    /// How many of `users` hold no connection anywhere, or `None` if an
    /// owner did not answer. Users with a connection here are online, and
    /// users this node owns are answered here, without asking (on one
    /// node, every user).
    pub(crate) async fn offline_users(&self, tenant: &str, users: &[String]) -> Option<usize> {
        let mut offline = 0;
        let mut ask = Vec::new();
        for user in users {
            let mut here = false;
            self.state
                .sessions
                .for_each_of_user(tenant, user, |_| here = true);
            if here {
                continue;
            }
            if self.membership.owns(tenant, user) {
                offline += usize::from(!self.state.remote.has_user(tenant, user));
            } else {
                ask.push(user.clone());
            }
        }
        if ask.is_empty() {
            return Some(offline);
        }
        match self.presence(tenant, &ask).await {
            Ok(live) => Some(offline + live.iter().filter(|c| c.is_empty()).count()),
            Err(err) => {
                tracing::warn!(%err, "offline users not counted");
                None
            }
        }
    }

    /// Asks `owner` for the connections of `users`.
    pub(super) async fn ask(
        &self,
        owner: Arc<str>,
        tenant: &str,
        users: Vec<String>,
    ) -> Result<Vec<Vec<HeldConnection>>, AskError> {
        let id = self.next_change.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        lock(&self.questions).insert(id, reply);
        let _forget = Forget {
            waiting: &self.questions,
            id,
        };
        let asked = users.len();
        let event = self.fact(Change::PresenceAsked {
            owner: owner.to_string(),
            id,
            tenant: tenant.to_owned(),
            users,
        });
        self.bus.announce(vec![event.encode()]).await?;
        match tokio::time::timeout(ANSWER_ROUND_TRIP, answer).await {
            Ok(Ok(held)) if held.len() == asked => Ok(held),
            _ => Err(AskError::NoAnswer(owner, ANSWER_ROUND_TRIP)),
        }
    }

    /// Applies a fact about connections (the change types
    /// [`Cluster::apply_change`] hands here; anything else is refused).
    pub(super) fn apply_connection_fact(
        &self,
        origin: &str,
        fact: Change,
    ) -> Result<Applied, ApplyError> {
        let state = &self.state;
        match fact {
            Change::ConnectionOpened {
                tenant,
                user,
                connection,
                opened_at_micros,
            } => {
                self.located(origin, (&tenant, &user), connection, Some(opened_at_micros));
                let owner = self.membership.owns(&tenant, &user);
                let who = (tenant.as_str(), user.as_str());
                self.keep_connection(
                    owner,
                    origin,
                    who,
                    connection,
                    opened_at_micros,
                    Seen::Changed,
                )
            }
            Change::ConnectionHeld {
                owner,
                tenant,
                user,
                connection,
                opened_at_micros,
            } => {
                self.located(origin, (&tenant, &user), connection, Some(opened_at_micros));
                // Kept by the node it was announced to, which may see the
                // cluster a moment ahead of or behind this one: when the
                // views settle, connections are announced again.
                let owner = owner == self.node;
                let who = (tenant.as_str(), user.as_str());
                self.keep_connection(
                    owner,
                    origin,
                    who,
                    connection,
                    opened_at_micros,
                    Seen::Again,
                )
            }
            Change::CapExceeded {
                tenant,
                user,
                connection,
            } => {
                check_user(&user)?;
                if connection.node == self.node {
                    state.sessions.for_each_of_user(&tenant, &user, |handle| {
                        if handle.id() == connection.id {
                            handle.close(CloseReason::Replaced);
                        }
                    });
                }
                Ok(Applied::Noted)
            }
            Change::PresenceAsked {
                owner,
                id,
                tenant,
                users,
            } => {
                if users.len() > MAX_PRESENCE_USERS {
                    return Err(ApplyError::Malformed(
                        "a presence question names 1,000 users at most",
                    ));
                }
                for user in &users {
                    check_user(user)?;
                }
                if owner == self.node {
                    let held = users
                        .iter()
                        .map(|user| self.held_here(&tenant, user))
                        .collect();
                    self.queue_connection_event(Change::PresenceAnswered {
                        to: origin.to_owned(),
                        id,
                        users: held,
                    });
                }
                Ok(Applied::Noted)
            }
            Change::PresenceAnswered { to, id, users } => {
                if to == self.node
                    && let Some(answer) = lock(&self.questions).remove(&id)
                {
                    let _ = answer.send(users);
                }
                Ok(Applied::Noted)
            }
            Change::ConnectionClosed {
                tenant,
                user,
                connection,
            } => {
                self.located(origin, (&tenant, &user), connection, None);
                state.remote.closed(&tenant, &user, origin, connection);
                self.note_user(&tenant, &user, Seen::Changed);
                Ok(Applied::Noted)
            }
            Change::Disconnect {
                tenant,
                user,
                connection,
            } => {
                check_user(&user)?;
                let mut closed = 0;
                state.sessions.for_each_of_user(&tenant, &user, |handle| {
                    let named = connection
                        .as_ref()
                        .is_none_or(|c| c.node == self.node && c.id == handle.id());
                    if named {
                        handle.close(CloseReason::Disconnected);
                        closed += 1;
                    }
                });
                Ok(Applied::Connections(closed))
            }
            Change::Subscriptions {
                tenant,
                user,
                subscribe,
                unsubscribe,
            } => {
                check_user(&user)?;
                let topics = subscribe.iter().chain(&unsubscribe);
                if subscribe.len() + unsubscribe.len() > MAX_TOPICS_PER_CHANGE
                    || topics
                        .into_iter()
                        .any(|t| t.is_empty() || t.len() > MAX_TOPIC_BYTES)
                {
                    return Err(ApplyError::Malformed(
                        "topics: at most 64, each 1 to 256 bytes",
                    ));
                }
                let mut changed = 0;
                let mut told = Vec::new();
                state.sessions.for_each_of_user(&tenant, &user, |handle| {
                    for topic in &unsubscribe {
                        state.sessions.unsubscribe(handle, topic);
                        told.push((WebhookEvent::Unsubscribed, handle.id(), topic));
                    }
                    for topic in &subscribe {
                        let subscribed = state.sessions.subscribe(
                            handle,
                            Arc::from(topic.as_str()),
                            self.max_topics,
                        );
                        if subscribed != crate::delivery::Subscribed::AtLimit {
                            told.push((WebhookEvent::Subscribed, handle.id(), topic));
                        }
                    }
                    changed += 1;
                });
                for (event, connection, topic) in told {
                    self.tell(&tenant, event, &user, Some(connection), Some(topic));
                }
                Ok(Applied::Connections(changed))
            }
            _ => Err(ApplyError::Malformed("not a fact about connections")),
        }
    }

    /// Until when `user` of `tenant` is banned (ms since the Unix epoch),
    /// if it is now.
    pub(crate) fn banned_until(&self, tenant: &str, user: &str) -> Option<u64> {
        let until = *self.bans.get(&(tenant.to_owned(), user.to_owned()))?;
        (until > now_micros() / 1000).then_some(until)
    }

    /// Keeps a ban; past [`MAX_BANS`], those over go first, then the
    /// soonest to end.
    pub(super) fn ban(&self, tenant: String, user: String, until_ms: u64) {
        if self.bans.len() >= MAX_BANS {
            let now = now_micros() / 1000;
            self.bans.retain(|_, until| *until > now);
            if self.bans.len() >= MAX_BANS
                && let Some(soonest) = self
                    .bans
                    .iter()
                    .min_by_key(|entry| *entry.value())
                    .map(|entry| entry.key().clone())
            {
                self.bans.remove(&soonest);
            }
        }
        self.bans.insert((tenant, user), until_ms);
    }
}

/// The announcement of `handle` to `owner`, the owner of its user.
pub(super) fn opened(owner: &str, handle: &ConnectionHandle) -> Change {
    Change::ConnectionHeld {
        owner: owner.to_owned(),
        tenant: handle.tenant().to_string(),
        user: handle.user().to_string(),
        connection: handle.id(),
        opened_at_micros: handle.opened_at_micros(),
    }
}
