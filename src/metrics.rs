//! Metric names, their descriptions and the Prometheus exporter.
//!
//! Every metric the gateway records is named here, so that the README's
//! reference, dashboards and alert rules have one source. Hot paths hold
//! pre-registered handles ([`TenantMetrics`]) instead of looking labels up
//! per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open WebSocket connections (gauge; label `tenant`).
pub const CONNECTIONS: &str = "pushgate_connections";
/// Users with at least one open connection (gauge; label `tenant`).
pub const USERS: &str = "pushgate_users";
/// WebSocket handshakes (counter; labels `tenant`, `outcome`).
pub const HANDSHAKES: &str = "pushgate_handshakes_total";
/// Connections closed by the server or the client (counter; labels `tenant`, `reason`).
pub const DISCONNECTS: &str = "pushgate_disconnects_total";
/// Messages accepted by the bus from the push API (counter; label `tenant`).
pub const MESSAGES_PUSHED: &str = "pushgate_messages_pushed_total";
/// Frames queued to local connections (counter; label `tenant`).
pub const MESSAGES_DELIVERED: &str = "pushgate_messages_delivered_total";
/// Messages or frames not delivered (counter; labels `tenant`, `reason`).
pub const MESSAGES_DROPPED: &str = "pushgate_messages_dropped_total";
/// Outbound queues that overflowed, closing their client (counter; label `tenant`).
pub const QUEUE_OVERFLOWS: &str = "pushgate_queue_overflows_total";
/// Push API requests (counter; labels `route`, `status`).
pub const PUSH_REQUESTS: &str = "pushgate_push_requests_total";
/// Push accepted → frames queued to every local recipient, in seconds (histogram).
pub const DELIVERY_LATENCY: &str = "pushgate_delivery_latency_seconds";
/// Subscribe commands by outcome (counter; labels `tenant`, `outcome`:
/// `allowed` or `denied`).
pub const SUBSCRIPTIONS: &str = "pushgate_subscriptions_total";
/// Linear memory held by a plugin version's warm instances, in bytes
/// (gauge; labels `tenant`, `version`).
pub const PLUGIN_POOLED_MEMORY: &str = "pushgate_plugin_pooled_memory_bytes";
/// Plugin log lines dropped past a call's budget (counter; label `tenant`).
pub const PLUGIN_LOGS_DROPPED: &str = "pushgate_plugin_logs_dropped_total";
/// TCP connections refused because their address had too many (counter).
pub const CONNECTIONS_REFUSED: &str = "pushgate_connections_refused_total";
/// Envelopes a node could not read, e.g. from a newer major version (counter; label `reason`).
pub const ENVELOPES_REJECTED: &str = "pushgate_bus_envelopes_rejected_total";

/// 1 while the bus carries messages, 0 while it does not (gauge).
pub const BUS_READY: &str = "pushgate_bus_ready";
/// 1 while this node routes pushes to their users' nodes only, else 0
/// (gauge; `bus.rocketmq.route_to_holders`, see the README).
pub const BUS_ROUTING: &str = "pushgate_bus_routing";
/// Probes sent before their heartbeat because a connection of another node
/// waits for this node's routing fence (counter).
pub const BUS_EARLY_PROBES: &str = "pushgate_bus_early_probes_total";
/// Pulls a routing node made to read a tenant's queue back for resuming
/// clients, by whether the block was already kept (counter).
pub const BUS_READ_BACK_PULLS: &str = "pushgate_bus_read_back_pulls_total";
/// Batches the bus engine failed to publish (counter).
pub const BUS_PUBLISH_ERRORS: &str = "pushgate_bus_publish_errors_total";
/// Failed attempts to reach the broker at start (counter).
pub const BUS_CONNECT_FAILURES: &str = "pushgate_bus_connect_failures_total";
/// Times the bus became ready again after it was not (counter).
pub const BUS_RECONNECTS: &str = "pushgate_bus_reconnects_total";
/// Stored by the broker → handed to the dispatcher, in seconds (histogram).
pub const BUS_CONSUME_LAG: &str = "pushgate_bus_consume_lag_seconds";
/// Duration of one batch send to the broker, in seconds (histogram).
pub const BUS_SEND_DURATION: &str = "pushgate_bus_send_duration_seconds";
/// Queues of the topic this node sends to, over every broker (gauge).
pub const BUS_QUEUES: &str = "pushgate_bus_queues";
/// Times sends started avoiding a broker after a send to it failed: its
/// queues' traffic moved to the other broker groups (counter; label `broker`).
pub const BUS_BROKER_FAILOVERS: &str = "pushgate_bus_broker_failovers_total";
/// Control events applied from other nodes (counter; label `event`).
pub const CONTROL_EVENTS: &str = "pushgate_control_events_total";
pub const CONTROL_EVENTS_REFUSED: &str = "pushgate_control_events_refused_total";
/// Snapshots of the control state this node sent or installed (counter;
/// label `event`: `sent`, `installed`).
pub const CONTROL_SNAPSHOTS: &str = "pushgate_control_snapshots_total";
/// Live nodes of the cluster as this node sees them, itself included (gauge).
pub const CLUSTER_NODES: &str = "pushgate_cluster_nodes";
pub const RESUMES: &str = "pushgate_resumes_total";
pub const RESUMED_MESSAGES: &str = "pushgate_resumed_messages_total";
pub const HISTORY_MESSAGES: &str = "pushgate_history_messages";
pub const HISTORY_BYTES: &str = "pushgate_history_bytes";

/// Plugin calls (counter; labels `tenant`, `version`, `hook`, `outcome`).
pub const PLUGIN_CALLS: &str = "pushgate_plugin_calls_total";
/// Duration of plugin calls, in seconds (histogram; labels `tenant`, `hook`).
pub const PLUGIN_CALL_DURATION: &str = "pushgate_plugin_call_duration_seconds";

/// Shadow comparisons (counter; labels `tenant`, `hook`, `outcome`:
/// `same`, `different`, `shadow_failed`, `active_failed`, `skipped`).
pub const PLUGIN_SHADOW_CALLS: &str = "pushgate_plugin_shadow_calls_total";
/// Shadow verdicts unlike the active's (counter; labels `tenant`, `hook`,
/// `kind`: `pass_to_drop`, `drop_to_pass`, `replaced_differently`).
pub const PLUGIN_SHADOW_DIFF: &str = "pushgate_plugin_shadow_diff_total";
/// Share of users a canary version serves, in percent (gauge; labels
/// `tenant`, `version`); 0 when it ended.
pub const PLUGIN_CANARY_PERCENT: &str = "pushgate_plugin_canary_percent";
/// Canary versions rolled back because they failed (counter; labels
/// `tenant`, `version`); every node counts the rollback it applied.
pub const PLUGIN_CANARY_ROLLBACKS: &str = "pushgate_plugin_canary_rollbacks_total";

/// Reasons under [`MESSAGES_DROPPED`].
pub mod drop_reason {
    /// No connection on this node matched the message's address.
    pub const NO_LOCAL_RECIPIENT: &str = "no_local_recipient";
    /// A recipient's outbound queue was full (the recipient is closed).
    pub const QUEUE_FULL: &str = "queue_full";
    /// A recipient had closed between lookup and enqueue.
    pub const CONNECTION_GONE: &str = "connection_gone";
    /// The tenant's plugin dropped it (at publish or for a recipient).
    pub const PLUGIN: &str = "plugin";
    /// A message with the same idempotency key was delivered before.
    pub const DUPLICATE: &str = "duplicate";
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Installs the Prometheus recorder for this process and describes every
/// metric. Later calls return the handle of the first installation, so
/// several nodes in one test process share one registry.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .expect("bucket list is non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".to_owned())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawning the metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(CONNECTIONS, "Open WebSocket connections.");
    describe_gauge!(USERS, "Users with at least one open connection.");
    describe_counter!(HANDSHAKES, "WebSocket handshakes by outcome.");
    describe_counter!(DISCONNECTS, "Closed WebSocket connections by reason.");
    describe_counter!(
        MESSAGES_PUSHED,
        "Messages accepted by the bus from the push API."
    );
    describe_counter!(MESSAGES_DELIVERED, "Frames queued to local connections.");
    describe_counter!(
        MESSAGES_DROPPED,
        "Messages or frames not delivered, by reason."
    );
    describe_counter!(
        QUEUE_OVERFLOWS,
        "Slow clients closed because their queue was full."
    );
    describe_counter!(PUSH_REQUESTS, "Push API requests by route and status.");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "From push accepted to frames queued to every local recipient."
    );
    describe_gauge!(
        PLUGIN_POOLED_MEMORY,
        Unit::Bytes,
        "Linear memory held by a plugin version's warm instances."
    );
    describe_gauge!(
        BUS_QUEUES,
        "Queues of the RocketMQ topic this node sends to, over every broker."
    );
    describe_counter!(
        BUS_BROKER_FAILOVERS,
        "Times sends started avoiding a RocketMQ broker after a send to it failed."
    );
    describe_counter!(
        PLUGIN_SHADOW_CALLS,
        "Shadow plugin comparisons by hook and outcome."
    );
    describe_counter!(
        PLUGIN_SHADOW_DIFF,
        "Shadow plugin verdicts unlike the active version's, by hook and kind."
    );
    describe_gauge!(
        PLUGIN_CANARY_PERCENT,
        "Share of users a canary plugin version serves, in percent."
    );
    describe_counter!(
        PLUGIN_CANARY_ROLLBACKS,
        "Canary plugin versions rolled back automatically because they failed."
    );
    describe_counter!(
        PLUGIN_LOGS_DROPPED,
        "Plugin log lines dropped past a call's budget."
    );
    describe_counter!(
        SUBSCRIPTIONS,
        "Subscribe commands by tenant and outcome (allowed, denied)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "TCP connections refused by the per-address limit."
    );
    describe_counter!(
        PLUGIN_CALLS,
        "Plugin calls by tenant, version, hook and outcome."
    );
    describe_histogram!(
        PLUGIN_CALL_DURATION,
        Unit::Seconds,
        "Duration of plugin calls."
    );
    describe_counter!(
        ENVELOPES_REJECTED,
        "Bus envelopes that could not be decoded."
    );
    describe_gauge!(BUS_READY, "1 while the bus carries messages, else 0.");
    describe_gauge!(
        BUS_ROUTING,
        "1 while this node routes pushes to their users' nodes only, else 0."
    );
    describe_counter!(
        BUS_READ_BACK_PULLS,
        "Blocks of a tenant's queue read back for resuming clients: pulled from the broker, or kept from another resume."
    );
    describe_counter!(
        BUS_EARLY_PROBES,
        "Probes sent early because another node's connection waits for this node's fence."
    );
    describe_counter!(BUS_PUBLISH_ERRORS, "Batches the bus failed to publish.");
    describe_counter!(
        BUS_CONNECT_FAILURES,
        "Failed attempts to reach the broker at start."
    );
    describe_counter!(
        BUS_RECONNECTS,
        "Times the bus became ready again after it was not."
    );
    describe_histogram!(
        BUS_CONSUME_LAG,
        Unit::Seconds,
        "From stored by the broker to handed to the dispatcher."
    );
    describe_histogram!(
        BUS_SEND_DURATION,
        Unit::Seconds,
        "Duration of one batch send to the broker."
    );
    describe_counter!(
        CONTROL_EVENTS,
        "Control events applied from other nodes, by event."
    );
    describe_counter!(
        RESUMES,
        "Clients that reconnected with a position, by tenant and whether the history covered \
         all they missed."
    );
    describe_counter!(
        RESUMED_MESSAGES,
        "Messages handed from the history to clients that reconnected."
    );
    describe_gauge!(
        HISTORY_MESSAGES,
        "Messages this node keeps for clients that reconnect, by tenant."
    );
    describe_gauge!(
        HISTORY_BYTES,
        "Memory those kept messages take (data, frame and bookkeeping), in bytes."
    );
    describe_gauge!(
        CLUSTER_NODES,
        "Live nodes of the cluster as this node sees them, itself included: users' owners \
         are picked among them."
    );
    describe_counter!(
        CONTROL_SNAPSHOTS,
        "Snapshots of the control state this node sent to the control queue (asked for by a \
         node that lacks changes the broker dropped, or periodic) or installed, by event."
    );
    describe_counter!(
        CONTROL_EVENTS_REFUSED,
        "Control events every node refuses alike (an invalid change, or a malformed or \
         forged event), by event."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Lifecycle webhook events by tenant and outcome (sent, failed: refused or not \
         delivered within retry_for, dropped: the queue was full)."
    );
    describe_counter!(
        WEBHOOK_RETRIES,
        "Webhook batches tried again after a 5xx, 429, time-out or refused connection, by tenant."
    );
}

/// Lifecycle webhook events by tenant and outcome: `sent` (the receiver
/// answered 2xx), `failed` (refused with 4xx, or not delivered within
/// `retry_for`), `dropped` (the tenant's queue on this node was full).
pub const WEBHOOK_EVENTS: &str = "pushgate_webhook_events_total";
/// Webhook batches tried again (5xx, 429, time-out, no connection), by tenant.
pub const WEBHOOK_RETRIES: &str = "pushgate_webhook_retries_total";

/// Pre-registered per-tenant handles for the delivery path. The figures
/// the console charts ([`TenantTotals`]) are counted beside the exported
/// ones, for the node to read without parsing its own exposition.
#[derive(Clone)]
pub struct TenantMetrics {
    pub connections: Level,
    pub users: Level,
    pub pushed: Tally,
    pub delivered: Tally,
    pub dropped_no_recipient: Tally,
    pub dropped_queue_full: Tally,
    pub dropped_connection_gone: Tally,
    pub dropped_by_plugin: Tally,
    pub dropped_duplicate: Tally,
    pub queue_overflows: Counter,
    pub delivery_latency: Histogram,
    pub history_messages: Gauge,
    pub history_bytes: Gauge,
}

impl TenantMetrics {
    /// Registers the handles of `tenant`.
    pub fn new(tenant: &str) -> Self {
        let t = tenant.to_owned();
        let totals = tenant_totals(tenant);
        let dropped = |reason: &'static str, total: &Arc<AtomicU64>| Tally {
            exported: counter!(MESSAGES_DROPPED, "tenant" => t.clone(), "reason" => reason),
            total: total.clone(),
        };
        Self {
            connections: Level {
                exported: gauge!(CONNECTIONS, "tenant" => t.clone()),
                value: totals.connections.clone(),
            },
            users: Level {
                exported: gauge!(USERS, "tenant" => t.clone()),
                value: totals.users.clone(),
            },
            pushed: Tally {
                exported: counter!(MESSAGES_PUSHED, "tenant" => t.clone()),
                total: totals.pushed.clone(),
            },
            delivered: Tally {
                exported: counter!(MESSAGES_DELIVERED, "tenant" => t.clone()),
                total: totals.delivered.clone(),
            },
            dropped_no_recipient: dropped(drop_reason::NO_LOCAL_RECIPIENT, &totals.dropped[0]),
            dropped_queue_full: dropped(drop_reason::QUEUE_FULL, &totals.dropped[1]),
            dropped_connection_gone: dropped(drop_reason::CONNECTION_GONE, &totals.dropped[2]),
            dropped_by_plugin: dropped(drop_reason::PLUGIN, &totals.dropped[3]),
            dropped_duplicate: dropped(drop_reason::DUPLICATE, &totals.dropped[4]),
            queue_overflows: counter!(QUEUE_OVERFLOWS, "tenant" => t.clone()),
            delivery_latency: histogram!(DELIVERY_LATENCY, "tenant" => t.clone()),
            history_messages: gauge!(HISTORY_MESSAGES, "tenant" => t.clone()),
            history_bytes: gauge!(HISTORY_BYTES, "tenant" => t),
        }
    }
}

/// A counter exported to Prometheus whose total the node reads too.
#[derive(Clone)]
pub struct Tally {
    exported: Counter,
    total: Arc<AtomicU64>,
}

impl Tally {
    pub fn increment(&self, by: u64) {
        self.exported.increment(by);
        self.total.fetch_add(by, Ordering::Relaxed);
    }
}

/// A gauge exported to Prometheus whose value the node reads too.
#[derive(Clone)]
pub struct Level {
    exported: Gauge,
    value: Arc<AtomicI64>,
}

impl Level {
    pub fn increment(&self, by: f64) {
        self.exported.increment(by);
        self.value.fetch_add(by as i64, Ordering::Relaxed);
    }

    pub fn decrement(&self, by: f64) {
        self.exported.decrement(by);
        self.value.fetch_sub(by as i64, Ordering::Relaxed);
    }
}

/// One tenant's figures on this node since it started, as the node reads
/// them (the console's charts): kept by tenant name, so that a tenant whose
/// settings change (a new [`TenantMetrics`]) keeps counting where it was,
/// as its exported series do.
#[derive(Debug, Default)]
pub struct TenantTotals {
    pub connections: Arc<AtomicI64>,
    /// Distinct users with a connection on this node.
    pub users: Arc<AtomicI64>,
    pub pushed: Arc<AtomicU64>,
    pub delivered: Arc<AtomicU64>,
    /// By reason, in the order of [`DROP_REASONS`].
    pub dropped: [Arc<AtomicU64>; 5],
}

/// The reasons of [`TenantTotals::dropped`], in order.
pub const DROP_REASONS: [&str; 5] = [
    drop_reason::NO_LOCAL_RECIPIENT,
    drop_reason::QUEUE_FULL,
    drop_reason::CONNECTION_GONE,
    drop_reason::PLUGIN,
    drop_reason::DUPLICATE,
];

static TOTALS: std::sync::LazyLock<dashmap::DashMap<String, Arc<TenantTotals>>> =
    std::sync::LazyLock::new(Default::default);

/// `tenant`'s figures on this node (made on first use).
pub fn tenant_totals(tenant: &str) -> Arc<TenantTotals> {
    if let Some(totals) = TOTALS.get(tenant) {
        return totals.clone();
    }
    TOTALS.entry(tenant.to_owned()).or_default().clone()
}

/// Counts one handshake outcome (`accepted`, `unknown_tenant`, `bad_request`,
/// `unauthorized`, …).
pub fn handshake(tenant: &str, outcome: &'static str) {
    counter!(HANDSHAKES, "tenant" => tenant.to_owned(), "outcome" => outcome).increment(1);
}

/// Counts one closed connection.
pub fn disconnect(tenant: &str, reason: &'static str) {
    counter!(DISCONNECTS, "tenant" => tenant.to_owned(), "reason" => reason).increment(1);
}

/// Counts one push API request.
pub fn push_request(route: &'static str, status: u16) {
    counter!(PUSH_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
}

/// Pre-registered handles for a plugin version's successful calls of one
/// hook: the common case, kept off the label lookup.
#[derive(Clone)]
pub struct PluginCallMetrics {
    pub ok: Counter,
    pub duration: Histogram,
}

impl PluginCallMetrics {
    pub fn new(tenant: &str, version: &str, hook: &'static str) -> Self {
        Self {
            ok: counter!(
                PLUGIN_CALLS,
                "tenant" => tenant.to_owned(),
                "version" => version.to_owned(),
                "hook" => hook,
                "outcome" => "ok"
            ),
            duration: histogram!(PLUGIN_CALL_DURATION, "tenant" => tenant.to_owned(), "hook" => hook),
        }
    }
}

/// Counts one plugin call and its duration (any outcome; successful calls
/// are cheaper through [`PluginCallMetrics`]).
pub fn plugin_call(
    tenant: &str,
    version: &str,
    hook: &'static str,
    outcome: &'static str,
    elapsed: Duration,
) {
    counter!(
        PLUGIN_CALLS,
        "tenant" => tenant.to_owned(),
        "version" => version.to_owned(),
        "hook" => hook,
        "outcome" => outcome
    )
    .increment(1);
    if !elapsed.is_zero() {
        histogram!(PLUGIN_CALL_DURATION, "tenant" => tenant.to_owned(), "hook" => hook)
            .record(elapsed.as_secs_f64());
    }
}

/// Counts `by` shadow comparisons of one outcome.
pub fn plugin_shadow_call(tenant: &str, hook: &'static str, outcome: &'static str, by: u64) {
    counter!(
        PLUGIN_SHADOW_CALLS,
        "tenant" => tenant.to_owned(),
        "hook" => hook,
        "outcome" => outcome
    )
    .increment(by);
}

/// Counts one shadow verdict unlike the active's.
pub fn plugin_shadow_diff(tenant: &str, hook: &'static str, kind: &'static str) {
    counter!(
        PLUGIN_SHADOW_DIFF,
        "tenant" => tenant.to_owned(),
        "hook" => hook,
        "kind" => kind
    )
    .increment(1);
}

/// Sets the share of users `version`, a canary, serves.
pub fn plugin_canary_percent(tenant: &str, version: &str, percent: u8) {
    gauge!(
        PLUGIN_CANARY_PERCENT,
        "tenant" => tenant.to_owned(),
        "version" => version.to_owned()
    )
    .set(f64::from(percent));
}

/// Shows `version`'s rollback count at 0 while it is a canary, so that a
/// rollback is an increase the alert rule sees (a series that appears at 1
/// is not one).
pub fn plugin_canary_watched(tenant: &str, version: &str) {
    counter!(
        PLUGIN_CANARY_ROLLBACKS,
        "tenant" => tenant.to_owned(),
        "version" => version.to_owned()
    )
    .increment(0);
}

/// Counts one automatic rollback of a canary.
pub fn plugin_canary_rolled_back(tenant: &str, version: &str) {
    counter!(
        PLUGIN_CANARY_ROLLBACKS,
        "tenant" => tenant.to_owned(),
        "version" => version.to_owned()
    )
    .increment(1);
}
