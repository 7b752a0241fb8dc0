//! What the edge's handlers reach: the parts they call, and the node's
//! draining signal.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::bus::Bus;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::delivery::SessionManager;
use crate::plugin::registry::PluginRegistry;
use crate::sync::Stop;
use crate::tenant::TenantDirectory;

/// Everything a request handler may need. The node builds it once.
pub(crate) struct Gateway {
    pub(crate) config: Arc<Config>,
    pub(crate) tenants: Arc<TenantDirectory>,
    pub(crate) sessions: Arc<SessionManager>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) plugins: Arc<PluginRegistry>,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) metrics: PrometheusHandle,
    /// Live Server-Sent Events streams, for their commands.
    pub(crate) event_streams: crate::edge::ws::EventStreams,
    /// The last 15 minutes of each tenant's figures, for the console.
    pub(crate) figure_history: crate::edge::admin::figures::FigureHistory,
    /// On once the node drains: `/readyz` fails, the public listener stops
    /// accepting. The node owns what follows.
    pub(crate) draining: Arc<Stop>,
}

impl Gateway {
    /// False once the node started draining: `/readyz` fails so that load
    /// balancers stop sending new clients here.
    pub(crate) fn is_ready(&self) -> bool {
        !self.draining.is_triggered()
    }

    /// Starts the node's drain (see the node's shutdown sequence).
    pub(crate) fn begin_drain(&self) {
        self.draining.trigger();
    }
}
