//! The figures the console charts: every `admin.figures_every` the node
//! takes each tenant's — the cluster's connections, users, pushes and
//! deliveries per second ([`Cluster::figures`]), this node's drops by
//! reason and plugin calls and failures by hook and version — and keeps
//! the last 15 minutes of them. `GET /admin/v1/tenants/{name}/figures`
//! answers them as rates, oldest first, with the figures of now.
//!
//! [`Cluster::figures`]: crate::cluster::Cluster::figures

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use serde_json::{Map, Value, json};

use super::access::{Access, Caller};
use super::respond;
use crate::cluster::figures::ClusterFigures;
use crate::edge::Gateway;
use crate::metrics::{DROP_REASONS, tenant_totals};
use crate::plugin::Hook;

/// How far back the charts go.
const KEPT: Duration = Duration::from_secs(15 * 60);

/// Calls and failures by hook (indexed like [`Hook::ALL`]).
type ByHook = [(u64, u64); 3];

/// One tenant's figures at one moment.
struct Sample {
    at_ms: u64,
    cluster: ClusterFigures,
    /// This node's drops since it started, in the order of [`DROP_REASONS`].
    dropped: [u64; DROP_REASONS.len()],
    /// This node's plugin calls and failures since it loaded each version,
    /// by version and hook (indexed like [`Hook::ALL`]).
    /// (Names shared between samples: 15 minutes of a tenant's samples
    /// hold each name once.)
    versions: Vec<(Arc<str>, ByHook)>,
}

/// The samples of every tenant, oldest first.
#[derive(Default)]
pub(crate) struct FigureHistory {
    tenants: DashMap<String, VecDeque<Sample>>,
}

/// Takes `tenant`'s figures now; version names are shared with `last`'s.
fn take(gateway: &Gateway, tenant: &str, last: Option<&Sample>) -> Sample {
    let totals = tenant_totals(tenant);
    let name = |version: &str| -> Arc<str> {
        last.and_then(|last| last.versions.iter().find(|(v, _)| &**v == version))
            .map_or_else(|| Arc::from(version), |(v, _)| v.clone())
    };
    Sample {
        at_ms: crate::clock::now_micros() / 1000,
        cluster: gateway.cluster.figures(tenant),
        dropped: std::array::from_fn(|i| totals.dropped[i].load(Ordering::Relaxed)),
        versions: gateway
            .plugins
            .versions(tenant)
            .iter()
            .map(|plugin| {
                (
                    name(&plugin.version),
                    std::array::from_fn(|i| plugin.totals(Hook::ALL[i])),
                )
            })
            .collect(),
    }
}

/// Takes every tenant's figures each `every`, keeping [`KEPT`] of them.
pub(crate) async fn keep_taking(gateway: Arc<Gateway>, every: Duration) {
    let kept = (KEPT.as_millis() / every.as_millis().max(1)).clamp(2, 900) as usize + 1;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let snapshot = gateway.tenants.snapshot();
        let history = &gateway.figure_history.tenants;
        history.retain(|name, _| snapshot.get(name).is_some());
        for tenant in snapshot.iter() {
            let mut samples = history.entry(tenant.name.to_string()).or_default();
            let sample = take(&gateway, &tenant.name, samples.back());
            if samples.len() == kept {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }
}

/// What happened between two samples, per second.
fn rates(before: &Sample, after: &Sample) -> Value {
    let seconds = (after.at_ms.saturating_sub(before.at_ms) as f64 / 1000.0).max(0.001);
    let per_second = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    let dropped: Map<String, Value> = DROP_REASONS
        .iter()
        .enumerate()
        .map(|(i, reason)| {
            let rate = per_second(before.dropped[i], after.dropped[i]);
            (reason.to_string(), json!(rate))
        })
        .collect();
    let mut calls = [0.0; 3];
    let mut failures = [0.0; 3];
    let mut versions = Map::new();
    for (version, hooks) in &after.versions {
        let earlier = before
            .versions
            .iter()
            .find(|(v, _)| v == version)
            .map_or([(0, 0); 3], |(_, hooks)| *hooks);
        let mut version_calls = 0.0;
        let mut version_failures = 0.0;
        for i in 0..3 {
            let c = per_second(earlier[i].0, hooks[i].0);
            let f = per_second(earlier[i].1, hooks[i].1);
            calls[i] += c;
            failures[i] += f;
            version_calls += c;
            version_failures += f;
        }
        versions.insert(
            version.to_string(),
            json!({"calls_per_second": version_calls, "failures_per_second": version_failures}),
        );
    }
    let by_hook = |values: [f64; 3]| -> Map<String, Value> {
        Hook::ALL
            .iter()
            .zip(values)
            .map(|(hook, value)| (hook.name().to_owned(), json!(value)))
            .collect()
    };
    json!({
        "at_ms": after.at_ms,
        "connections": after.cluster.connections,
        "users": after.cluster.users,
        "pushed_per_second": after.cluster.pushed_per_second,
        "delivered_per_second": after.cluster.delivered_per_second,
        "dropped_per_second": dropped,
        "plugin_calls_per_second": by_hook(calls),
        "plugin_failures_per_second": by_hook(failures),
        "versions": versions,
    })
}

/// `GET /admin/v1/tenants/{name}/figures`: the last 15 minutes of the
/// tenant's figures (`series`, oldest first; connections, users, pushes
/// and deliveries are the cluster's, the rest this node's), the figures of
/// now, and each version's calls and failures by hook on this node.
pub(crate) async fn tenant_figures(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    caller: Caller,
) -> Response {
    respond(caller.tenant(Access::Read(&name)).map(|_| {
        let now = take(&gateway, &name, None);
        let series: Vec<Value> = gateway
            .figure_history
            .tenants
            .get(&name)
            .map(|samples| {
                samples
                    .iter()
                    .zip(samples.iter().skip(1))
                    .map(|(before, after)| rates(before, after))
                    .collect()
            })
            .unwrap_or_default();
        let versions: Vec<Value> = now
            .versions
            .iter()
            .map(|(version, hooks)| {
                let hooks: Map<String, Value> = Hook::ALL
                    .iter()
                    .zip(hooks)
                    .map(|(hook, (calls, failures))| {
                        (
                            hook.name().to_owned(),
                            json!({"calls": calls, "failures": failures}),
                        )
                    })
                    .collect();
                json!({"version": version, "hooks": hooks})
            })
            .collect();
        Json(json!({
            "node": gateway.cluster.node(),
            "interval_ms": gateway.config.admin.figures_every.as_millis() as u64,
            "now": {
                "connections": now.cluster.connections,
                "users": now.cluster.users,
                "pushed_per_second": now.cluster.pushed_per_second,
                "delivered_per_second": now.cluster.delivered_per_second,
                "nodes": now.cluster.nodes,
                "connections_here": gateway.sessions.tenant_connections(&name),
            },
            "series": series,
            "versions": versions,
        }))
        .into_response()
    }))
}
