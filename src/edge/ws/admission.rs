//! The handshake's admission phases, in the order a request meets them;
//! the first that refuses answers, with a status and a metric label:
//!
//! 1. [`target`]: a request target of bounded length, for a known tenant.
//! 2. [`upgrade`]: a valid RFC 6455 version-13 upgrade.
//! 3. The client's address (behind a trusted proxy, from
//!    `X-Forwarded-For`) and its connection slot; [`address_rate`]: the
//!    tenant's handshakes per address.
//! 4. [`capacity`]: the node is not draining; a slot of the tenant's
//!    connection limit, reserved now and held for the connection's life.
//! 5. [`origin`]: the tenant's allowed browser origins.
//! 6. [`authenticate`]: the tenant's plugin, else its built-in
//!    authenticator (fails closed).
//! 7. [`resume_request`]: the position to resume from and topics to
//!    subscribe to, if the client asks.
//! 8. Then 101, and the connection task starts once the upgrade completes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::authenticate::{Refusal, call_authenticate};
use super::connection::{Admitted, ResumeRequest, serve_client};
use super::upgrade::upgrade;
use super::{MAX_REQUEST_TARGET_BYTES, MAX_USER_BYTES, TENANT_FULL_RETRY};
use crate::bus::envelope::Position;
use crate::delivery::Reservation;
use crate::edge::Gateway;
use crate::edge::api_error::ApiError;
use crate::edge::listener::ConnectionContext;
use crate::plugin::registry::HookPlugins;
use crate::plugin::{self, Hook};
use crate::tenant::MAX_TOPIC_BYTES;
use crate::tenant::auth::{Admission, AuthError, HandshakeView, selected_subprotocol};
use crate::tenant::{Identity, RetryAfter, Tenant};

/// Which endpoint a client came to: the phases are the same but for the
/// upgrade, and what follows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    WebSocket,
    ServerSentEvents,
}

/// A client every phase admitted, and the slots it holds for its life.
pub(super) struct Passed {
    pub(super) tenant: Arc<Tenant>,
    pub(super) admitted: Admitted,
    pub(super) subprotocol: Option<&'static str>,
    pub(super) held: (Option<ConnectionContext>, Reservation),
}

/// Runs every phase; on success answers 101 and has the connection task
/// started once the client's side of the upgrade completes.
pub(super) async fn admit(
    gateway: &Arc<Gateway>,
    tenant_name: &str,
    request: &mut Request,
) -> Result<Response, Refusal> {
    let tenant = target(gateway, tenant_name, request)?;
    let key = upgrade(request.headers()).map_err(|e| Refusal::new("bad_request", e))?;
    let passed = admit_client(gateway, tenant, request, Transport::WebSocket).await?;
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        let error = ApiError::bad_request("connection cannot be upgraded");
        return Err(Refusal::new("bad_request", error));
    };
    let Passed {
        tenant,
        admitted,
        subprotocol,
        held,
    } = passed;

    let gateway = gateway.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // The per-address and the tenant's slots stay taken for
                // the connection's life.
                serve_client(gateway, tenant, admitted, upgraded, held).await;
            }
            Err(err) => tracing::debug!(%err, "upgrade failed"),
        }
    });

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if let Some(protocol) = subprotocol {
        // Browsers fail a handshake whose offered subprotocols get no answer.
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok(response
        .body(Body::empty())
        .expect("static response parts are valid"))
}

/// Runs every phase for a Server-Sent Events client: the same as a
/// WebSocket client's, but the upgrade (phase 2), and a reconnecting
/// `EventSource`'s `Last-Event-ID` as its `since`.
pub(super) async fn admit_events(
    gateway: &Arc<Gateway>,
    tenant_name: &str,
    request: &mut Request,
) -> Result<Passed, Refusal> {
    let tenant = target(gateway, tenant_name, request)?;
    admit_client(gateway, tenant, request, Transport::ServerSentEvents).await
}

/// What a Pusher client passes: phases 3 to 5 (it is authorised channel
/// by channel, not at the handshake). The slots it holds.
pub(in crate::edge) fn admit_pusher_client(
    gateway: &Gateway,
    tenant: &Tenant,
    request: &Request,
) -> Result<(Option<ConnectionContext>, Reservation), Refusal> {
    let (context, remote) = client_slot(request)?;
    address_rate(tenant, remote)?;
    not_draining(gateway)?;
    let reservation = capacity(gateway, tenant)?;
    origin(tenant, request.headers())?;
    Ok((context, reservation))
}

/// Phase 3's first part: the client's own address (also behind a trusted
/// proxy) and, taken for the connection's life, one of its address's
/// connection slots.
fn client_slot(
    request: &Request,
) -> Result<(Option<ConnectionContext>, Option<SocketAddr>), Refusal> {
    let mut context = request.extensions().get::<ConnectionContext>().cloned();
    let remote = context.as_ref().map(|c| c.client(request.headers()));
    if let (Some(context), Some(client)) = (&mut context, remote)
        && !context.take_client_slot(client.ip())
    {
        let error = ApiError::too_many_requests("too many connections from your address");
        return Err(Refusal::new("rate_limited", error));
    }
    Ok((context, remote))
}

/// Phases 3 to 7.
async fn admit_client(
    gateway: &Arc<Gateway>,
    tenant: Arc<Tenant>,
    // `&mut`: a `&Request` is not `Send` (its body is not `Sync`).
    request: &mut Request,
    transport: Transport,
) -> Result<Passed, Refusal> {
    let (context, remote) = client_slot(request)?;
    address_rate(&tenant, remote)?;
    not_draining(gateway)?;
    let reservation = capacity(gateway, &tenant)?;
    origin(&tenant, request.headers())?;
    let Admission {
        identity,
        subprotocol,
    } = authenticate(
        gateway,
        &tenant,
        HandshakeView {
            uri: request.uri(),
            headers: request.headers(),
        },
        remote,
    )
    .await?;
    // A drain may have begun while the plugin decided.
    not_draining(gateway)?;
    let mut resume = resume_request(
        &tenant,
        &identity,
        request.uri(),
        gateway.config.websocket.max_topics_per_connection,
    )?;
    if transport == Transport::ServerSentEvents && resume.since.is_none() {
        resume.since = last_event_id(request.headers())?;
    }
    Ok(Passed {
        tenant,
        admitted: Admitted {
            identity,
            remote,
            resume,
        },
        subprotocol,
        held: (context, reservation),
    })
}

/// The `Last-Event-ID` a reconnecting `EventSource` sends: the `id` of the
/// last event it received, a message's position.
fn last_event_id(headers: &HeaderMap) -> Result<Option<Position>, Refusal> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let position = value.to_str().ok().and_then(Position::parse);
    match position {
        Some(position) => Ok(Some(position)),
        None => Err(Refusal::new(
            "bad_request",
            ApiError::bad_request("Last-Event-ID: not a position this gateway gave"),
        )),
    }
}

/// Phase 1: a request target of bounded length, for a known tenant.
fn target(gateway: &Gateway, tenant_name: &str, request: &Request) -> Result<Arc<Tenant>, Refusal> {
    let uri = request.uri();
    let target_bytes = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if target_bytes > MAX_REQUEST_TARGET_BYTES {
        let error = ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("request target longer than {MAX_REQUEST_TARGET_BYTES} bytes"),
        );
        return Err(Refusal::new("bad_request", error));
    }
    gateway
        .tenants
        .snapshot()
        .get(tenant_name)
        .cloned()
        .ok_or_else(|| {
            let error = ApiError::not_found(format!("unknown tenant {tenant_name:?}"));
            Refusal::new("unknown_tenant", error)
        })
}

/// Phase 3: the tenant's handshakes per address, and the failed plugin
/// authentications the address caused.
fn address_rate(tenant: &Tenant, client: Option<SocketAddr>) -> Result<(), Refusal> {
    let Some(client) = client else {
        return Ok(());
    };
    let ip = client.ip();
    if let Err(RetryAfter(wait)) = tenant.admit_handshake(ip) {
        let error =
            ApiError::too_many_requests("too many handshakes from your address").retry_after(wait);
        return Err(Refusal::new("rate_limited", error));
    }
    if let Err(RetryAfter(wait)) = tenant.admit_after_failed_authentications(ip) {
        let error = ApiError::too_many_requests(
            "too many handshakes from your address made the tenant's authenticator fail",
        )
        .retry_after(wait);
        return Err(Refusal::new("rate_limited", error));
    }
    Ok(())
}

/// Phase 4: the tenant's connection limit on this node.
/// Reserves the connection's slot now, before the upgrade: the slot is held
/// until the connection ends.
fn capacity(gateway: &Gateway, tenant: &Tenant) -> Result<Reservation, Refusal> {
    gateway.sessions.reserve(tenant).ok_or_else(|| {
        let error = ApiError::unavailable("this tenant has reached its connection limit")
            .retry_after(TENANT_FULL_RETRY);
        Refusal::new("tenant_full", error)
    })
}

/// Phase 7: what the client asks of its connection besides who it is: to
/// resume after the last message it saw (`since`, a message frame's
/// `pos`), and topics to subscribe to from the start (`topics=a,b`,
/// within the subscription rules; the development authenticator takes
/// them as its own).
/// `topics=` is held to the rules of `subscribe`: at most `max_topics`
/// topics in all (with those of the identity), each 1 to 256 bytes, and a
/// client refused as many as `subscribe` allows is refused here too.
fn resume_request(
    tenant: &Tenant,
    identity: &Identity,
    uri: &axum::http::Uri,
    max_topics: usize,
) -> Result<ResumeRequest, Refusal> {
    let mut request = ResumeRequest::default();
    let query = uri.query().unwrap_or("");
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|err| {
        Refusal::new(
            "bad_request",
            ApiError::bad_request(format!("malformed query: {err}")),
        )
    })?;
    for (name, value) in params {
        match name.as_str() {
            "since" => {
                let since = Position::parse(&value).ok_or_else(|| {
                    let error = ApiError::bad_request(
                        "since: not a position this gateway gave (a message frame's `pos`)",
                    );
                    Refusal::new("bad_request", error)
                })?;
                request.since = Some(since);
            }
            "topics" => {
                for topic in value.split(',').filter(|t| !t.is_empty()) {
                    if topic.len() > MAX_TOPIC_BYTES {
                        let error = ApiError::bad_request(format!(
                            "topics: a topic is 1 to {MAX_TOPIC_BYTES} bytes"
                        ));
                        return Err(Refusal::new("bad_request", error));
                    }
                    if request.topics.contains(&topic.to_owned())
                        || request.denied_topics.contains(&topic.to_owned())
                    {
                        continue;
                    }
                    let allowed = identity.grant.covers(topic, &identity.user)
                        || tenant.subscriptions.allow(topic, &identity.user);
                    if allowed {
                        request.topics.push(topic.to_owned());
                    } else {
                        request.denied_topics.push(topic.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    // Distinct topics in all (the development authenticator takes those of
    // `topics=` as its identity's too).
    let wanted = identity
        .topics
        .iter()
        .chain(&request.topics)
        .chain(&request.denied_topics)
        .collect::<std::collections::HashSet<_>>()
        .len();
    if wanted > max_topics {
        let error = ApiError::bad_request(format!(
            "topics: {wanted} topics with the identity's; a connection may have at most \
             {max_topics} (websocket.max_topics_per_connection)"
        ));
        return Err(Refusal::new("bad_request", error));
    }
    let refused = request.denied_topics.len();
    ::metrics::counter!(
        crate::metrics::SUBSCRIPTIONS,
        "tenant" => tenant.name.to_string(),
        "outcome" => "denied"
    )
    .increment(refused as u64);
    if refused >= super::connection::MAX_REFUSED_SUBSCRIPTIONS as usize {
        let error = ApiError::forbidden(format!(
            "topics: {refused} topics this client may not subscribe to"
        ));
        return Err(Refusal::new("subscriptions_refused", error));
    }
    Ok(request)
}

/// Phase 4 (and again after phase 6, which may take a while): a draining
/// node takes no new client.
fn not_draining(gateway: &Gateway) -> Result<(), Refusal> {
    if gateway.is_ready() {
        return Ok(());
    }
    let error = ApiError::unavailable("this node is draining: connect to another one")
        .retry_after(TENANT_FULL_RETRY);
    Err(Refusal::new("draining", error))
}

/// Phase 5: the tenant's allowed browser origins.
fn origin(tenant: &Tenant, headers: &HeaderMap) -> Result<(), Refusal> {
    if let Some(origin) = headers.get(header::ORIGIN)
        && !tenant.allows_origin(origin.to_str().unwrap_or(""))
    {
        let error = ApiError::forbidden("this origin may not connect to this tenant");
        return Err(Refusal::new("origin_refused", error));
    }
    Ok(())
}

/// Phase 6: who the client is, by the tenant's plugin if it has an
/// `authenticate` hook, else by its built-in authenticator.
async fn authenticate(
    gateway: &Gateway,
    tenant: &Arc<Tenant>,
    handshake: HandshakeView<'_>,
    remote: Option<SocketAddr>,
) -> Result<Admission, Refusal> {
    let admission = match gateway.plugins.hook(&tenant.name, Hook::Authenticate) {
        Some(plugin) => {
            let call = plugin_handshake(&handshake, remote);
            let subprotocol = selected_subprotocol(handshake.headers);
            let admitted = plugin_admission(tenant, plugin, call, subprotocol).await;
            if let (Err(refusal), Some(remote)) = (&admitted, remote)
                && refusal.label == "plugin_failed"
            {
                // The input made the plugin fail: the client pays for it.
                tenant.charge_failed_authentication(remote.ip());
            }
            admitted?
        }
        None => tenant
            .authenticator
            .authenticate(&handshake)
            .map_err(|err| match err {
                AuthError::Unauthenticated(message) => {
                    Refusal::new("unauthorized", ApiError::unauthorized(message))
                }
                AuthError::Refused(message) => {
                    Refusal::new("refused", ApiError::forbidden(message))
                }
            })?,
    };
    if admission.identity.user.len() > MAX_USER_BYTES {
        let error = ApiError::unauthorized(format!("a user id is at most {MAX_USER_BYTES} bytes"));
        return Err(Refusal::new("unauthorized", error));
    }
    if let Some(until_ms) = gateway
        .cluster
        .banned_until(&tenant.name, &admission.identity.user)
    {
        let error = ApiError::new(
            StatusCode::FORBIDDEN,
            "banned",
            format!("this user is banned until {until_ms} (ms since the Unix epoch)"),
        );
        return Err(Refusal::new("banned", error));
    }
    // What authenticated the client (a token's claim, a plugin) grants no
    // more than a client may subscribe to: each grant costs memory for as
    // long as the connection lives.
    let granted = admission.identity.grant.count();
    let max = gateway.config.websocket.max_topics_per_connection;
    if granted > max {
        let error = ApiError::forbidden(format!(
            "the identity grants {granted} topics and patterns; a connection may have at most \
             {max} (websocket.max_topics_per_connection)"
        ));
        return Err(Refusal::new("too_many_topics", error));
    }
    Ok(admission)
}

/// The plugin's view of the handshake.
fn plugin_handshake(
    handshake: &HandshakeView<'_>,
    remote: Option<SocketAddr>,
) -> plugin::Handshake {
    plugin::Handshake {
        path: handshake.uri.path().to_owned(),
        query: handshake.uri.query().unwrap_or("").to_owned(),
        headers: handshake
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some(plugin::Header {
                    name: name.as_str().to_owned(),
                    value: value.to_str().ok()?.to_owned(),
                })
            })
            .collect(),
        remote_address: remote.map(|r| r.to_string()).unwrap_or_default(),
    }
}

/// Authenticates with the tenant's plugin, on the blocking pool within the
/// tenant's share (a share in use answers 503 with `Retry-After`).
async fn plugin_admission(
    tenant: &Arc<Tenant>,
    plugins: HookPlugins,
    request: plugin::Handshake,
    subprotocol: Option<&'static str>,
) -> Result<Admission, Refusal> {
    // A user is unknown until authenticated: a canary never authenticates;
    // a shadow version does, on a copy.
    let identity = call_authenticate(tenant, plugins.active, plugins.shadow, request).await?;
    Ok(Admission {
        identity,
        subprotocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_handshake_since_and_topics_are_taken_or_refused_never_a_panic() {
        use crate::config::{SubscriptionsConfig, TenantConfig};
        use crate::tenant::subscriptions::Grant;
        use crate::tenant::{Identity, Tenant};
        const MAX_TOPICS: usize = 8;
        const WORDS: &[&str] = &["news", "orders", "ann", "bob", ".", ",", "*", "{user}", ""];
        let tenant = Tenant::new(
            "t",
            TenantConfig {
                subscriptions: SubscriptionsConfig {
                    allow: vec!["news.*".into(), "orders.{user}".into()],
                },
                ..TenantConfig::default()
            },
        )
        .unwrap();
        arbtest::arbtest(|u| {
            let identity = Identity {
                user: "ann".into(),
                topics: vec!["news.start".into()],
                metadata: Default::default(),
                grant: Grant::from_entries(vec!["granted.*".into()]).1,
                expires_at_secs: None,
            };
            let since = match u.int_in_range(0..=2)? {
                0 => format!("{:x}-{}", u.arbitrary::<u64>()?, u.arbitrary::<u64>()?),
                1 => format!("{}-{}", u.arbitrary::<String>()?, u.arbitrary::<i128>()?),
                _ => u.arbitrary()?,
            };
            let topics: Vec<String> = (0..u.int_in_range(0..=12)?)
                .map(|_| {
                    let parts = u.int_in_range(1..=3)?;
                    (0..parts)
                        .map(|_| u.choose(WORDS).map(|w| (*w).to_owned()))
                        .collect::<arbtest::arbitrary::Result<Vec<_>>>()
                        .map(|parts| parts.join("."))
                })
                .collect::<arbtest::arbitrary::Result<_>>()?;
            let query = if u.arbitrary()? {
                serde_urlencoded::to_string([("since", since), ("topics", topics.join(","))])
                    .unwrap()
            } else {
                u.arbitrary::<String>()?.replace(['#', ' '], "")
            };
            let Ok(uri) = format!("/ws/t?{query}").parse::<axum::http::Uri>() else {
                return Ok(());
            };
            if let Ok(request) = resume_request(&tenant, &identity, &uri, MAX_TOPICS) {
                let mut seen = std::collections::HashSet::new();
                for topic in &request.topics {
                    assert!(seen.insert(topic), "{topic:?} twice");
                    assert!(
                        tenant.subscriptions.allow(topic, "ann") || topic.starts_with("granted."),
                        "{topic:?} taken without a rule"
                    );
                }
                let wanted: std::collections::HashSet<&String> = identity
                    .topics
                    .iter()
                    .chain(&request.topics)
                    .chain(&request.denied_topics)
                    .collect();
                assert!(wanted.len() <= MAX_TOPICS, "{} topics taken", wanted.len());
            }
            Ok(())
        })
        .run();
    }
}
