//! The state one node shares between its listeners, its dispatcher and its
//! background tasks, and the node's life cycle (ready → draining → stopped).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::bus::Bus;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::plugin::registry::PluginRegistry;
use crate::session::SessionManager;
use crate::tenant::TenantDirectory;

/// Everything a request handler may need.
pub struct Gateway {
    pub config: Arc<Config>,
    pub tenants: Arc<TenantDirectory>,
    pub sessions: Arc<SessionManager>,
    pub bus: Arc<dyn Bus>,
    pub plugins: Arc<PluginRegistry>,
    pub cluster: Arc<Cluster>,
    pub metrics: PrometheusHandle,
    draining: AtomicBool,
    stop: watch::Sender<bool>,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        tenants: Arc<TenantDirectory>,
        sessions: Arc<SessionManager>,
        bus: Arc<dyn Bus>,
        plugins: Arc<PluginRegistry>,
        cluster: Arc<Cluster>,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            config,
            tenants,
            sessions,
            bus,
            plugins,
            cluster,
            metrics,
            draining: AtomicBool::new(false),
            stop: watch::Sender::new(false),
        }
    }

    /// False once the node started draining: `/readyz` fails so that load
    /// balancers stop sending new clients here.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
    }

    /// Marks the node as draining and tells the public listener to stop
    /// accepting.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }

    /// A watch that turns true when [`begin_drain`](Self::begin_drain) is
    /// called.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Resolves once [`begin_drain`](Self::begin_drain) was called.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        stopped(self.stop_signal())
    }
}

/// Resolves once `stop` turns true (or its sender is gone: stop as well).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
