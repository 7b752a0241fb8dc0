//! One running node: wiring and start order, and the one shutdown
//! sequence. The only part that knows all the others.
//!
//! Start: tenants and TLS (refused with a clear error if misconfigured),
//! the bus, plugins, the session index with the cluster's cap rule, the
//! cluster part, the dispatcher, then the two listeners — the public one
//! serves `/ws/{tenant}` to the internet with tight limits, the internal
//! one the push, admin and operations APIs.
//!
//! Shutdown, whether asked by a signal, the admin API or [`Node::shutdown`]:
//! drain (`/readyz` fails, the public listener stops accepting) → the bus
//! delivers what it accepted → the plugin lanes finish → clients get what
//! was queued and then 1012, spread over the drain window → the other
//! nodes are told → the bus stops → the internal listener stops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::bus;
use crate::cluster::control::ControlStore;
use crate::cluster::remote::RemoteConnections;
use crate::cluster::state::StateError;
use crate::cluster::{Cluster, Replicated};
use crate::config::{Config, ConfigError};
use crate::delivery::dispatch::Dispatcher;
use crate::delivery::{CloseReason, SessionManager};
use crate::edge::listener::AcceptLoop;
use crate::edge::{self, Gateway};
use crate::metrics;
use crate::plugin::PluginHost;
use crate::plugin::registry::PluginRegistry;
use crate::sync::{InFlight, Stop};
use crate::tenant::TenantDirectory;

mod name;

/// How often idle addresses are forgotten by the handshake rate limiters.
const RATE_LIMITER_CLEANUP: Duration = Duration::from_secs(60);

/// Why a node could not start; each says which side is at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration (a tenant's authenticator, the TLS files, …).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key cannot be used.
    #[error("invalid configuration: {0}")]
    Tls(#[from] edge::tls::TlsSettingsError),
    /// This node could not start its WebAssembly engine.
    #[error("cannot start the plugin host: {0:#}")]
    Plugins(#[source] wasmtime::Error),
    /// The state directory cannot be used (locked, damaged, unwritable).
    #[error(transparent)]
    State(#[from] StateError),
    /// A tenant's plugin rollout cannot be read.
    #[error(transparent)]
    PluginStore(#[from] crate::plugin::registry::DamagedStore),
    /// This node could not start its bus engine.
    #[error("cannot start the bus: {0}")]
    Bus(#[source] std::io::Error),
    /// The address is taken or not this host's.
    #[error("cannot listen on {field} = {addr}: {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Builds what the configuration only describes — every tenant's
/// authenticator, the TLS acceptor — and so refuses what cannot work, with
/// the field at fault. `check-config` and [`Node::start`] both use it.
pub fn check(config: &Config) -> Result<(), StartError> {
    prepare(config).map(drop)
}

fn prepare(config: &Config) -> Result<(TenantDirectory, Option<TlsAcceptor>), StartError> {
    let tenants = TenantDirectory::from_config(config)?;
    let tls = match &config.listen.tls {
        Some(tls) => Some(edge::tls::acceptor(tls)?),
        None => None,
    };
    Ok((tenants, tls))
}

/// A started node.
pub struct Node {
    gateway: Arc<Gateway>,
    public_addr: SocketAddr,
    internal_addr: SocketAddr,
    public_listener: JoinHandle<()>,
    internal_listener: JoinHandle<()>,
    /// Stops the internal listener, which serves (`/readyz` answering 503,
    /// metrics, pushes) until the drain is over.
    stop_internal: Arc<Stop>,
    drain: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

/// What can be watched of a node, also while and after it stops.
#[derive(Clone)]
pub struct NodeObserver(Arc<Gateway>);

impl NodeObserver {
    /// False once the node started draining.
    pub fn is_ready(&self) -> bool {
        self.0.is_ready()
    }

    /// The connections the node holds.
    pub fn sessions(&self) -> &SessionManager {
        &self.0.sessions
    }
}

async fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            field,
            addr,
            source,
        })
}

impl Node {
    /// Binds both listeners and starts serving. Port 0 picks a free port;
    /// [`public_addr`](Self::public_addr) tells which.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        // Before any handle is registered: handles taken earlier would
        // record into nothing.
        let metrics = metrics::install();
        let (_, tls) = prepare(&config)?;
        let public = bind("listen.public", config.listen.public).await?;
        let internal = bind("listen.internal", config.listen.internal).await?;
        let public_addr = public.local_addr().expect("bound socket has an address");
        let internal_addr = internal.local_addr().expect("bound socket has an address");

        let instance = name::instance_name(&config, internal_addr);
        // The tenants are the state directory's: the configuration file
        // seeds it (see `cluster::state`).
        let control = {
            let config = config.clone();
            let instance = instance.clone();
            tokio::task::spawn_blocking(move || ControlStore::open(&config, &instance))
                .await
                .expect("opening the state does not panic")?
        };
        let control = Arc::new(control);
        let tenants = Arc::new(TenantDirectory::new(
            &control.tenants(),
            config.plugins.max_call_timeout,
        )?);
        let remote = Arc::new(RemoteConnections::new(&instance));
        let sessions = Arc::new(SessionManager::new(remote.clone()));
        let bus::StartedBus {
            bus,
            envelopes,
            inbound,
        } = bus::start(&config.bus, &instance, control.resume()).map_err(StartError::Bus)?;
        let host = PluginHost::with_compiled_cache(Some(&config.state.dir.join("compiled")))
            .map_err(StartError::Plugins)?;
        let store_dir = config.plugin_store_dir();
        let known = tenants.clone();
        let plugins = tokio::task::spawn_blocking(move || {
            let registry = PluginRegistry::open(host, store_dir)?;
            // Plugins of a tenant removed while they were being written
            // (a crash between the two) serve nobody.
            registry.retain_tenants(|tenant| known.snapshot().get(tenant).is_some());
            Ok::<_, StartError>(registry)
        })
        .await
        .map_err(|err| StartError::Plugins(wasmtime::Error::new(err)))??;
        let plugins = Arc::new(plugins);
        let lanes_in_flight = Arc::new(InFlight::default());
        let dispatcher = Dispatcher::new(
            sessions.clone(),
            tenants.clone(),
            plugins.clone(),
            lanes_in_flight.clone(),
        );
        let (cluster, connection_events) = Cluster::new(
            instance,
            crate::cluster::Timing {
                heartbeat_interval: config.bus.rocketmq.heartbeat_interval,
                snapshot_every: config.state.snapshot_every,
                figures_every: config.admin.figures_every,
            },
            bus.clone(),
            Replicated {
                tenants: tenants.clone(),
                sessions: sessions.clone(),
                plugins: plugins.clone(),
                remote,
                lanes: dispatcher.lanes(),
                control,
                channels: Arc::default(),
            },
            config.websocket.max_topics_per_connection,
        );
        let cluster = Arc::new(cluster);
        let gateway = Arc::new(Gateway {
            config: config.clone(),
            tenants: tenants.clone(),
            sessions,
            bus,
            plugins,
            cluster: cluster.clone(),
            metrics,
            figure_history: Default::default(),
            event_streams: Default::default(),
            draining: Arc::new(Stop::default()),
        });

        let background = vec![
            tokio::spawn(dispatcher.run(envelopes)),
            tokio::spawn(forget_idle_addresses(tenants)),
            tokio::spawn(cluster.clone().send_connection_events(connection_events)),
            tokio::spawn(cluster.clone().roll_back_failing_canaries()),
            tokio::spawn(cluster.clone().take_figures()),
            tokio::spawn(crate::edge::keep_figures(
                gateway.clone(),
                config.admin.figures_every,
            )),
            tokio::spawn(cluster.run(inbound)),
        ];
        let drain = tokio::spawn(drain(gateway.clone(), lanes_in_flight));

        let stop_internal = Arc::new(Stop::default());
        let public_listener = tokio::spawn(
            AcceptLoop::public(
                public,
                (
                    edge::public_router(gateway.clone()),
                    edge::event_stream_server(gateway.clone()),
                ),
                &config,
                tls,
                gateway.draining.clone(),
            )
            .run(),
        );
        let internal_listener = tokio::spawn(
            AcceptLoop::internal(
                internal,
                edge::internal_router(gateway.clone()),
                &config,
                stop_internal.clone(),
            )
            .run(),
        );
        let scheme = if config.listen.tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        tracing::info!(%public_addr, "WebSocket clients: {scheme}://{public_addr}/ws/{{tenant}}");
        tracing::info!(%internal_addr, "push API, metrics and health: http://{internal_addr}");
        Ok(Self {
            gateway,
            public_addr,
            internal_addr,
            public_listener,
            internal_listener,
            stop_internal,
            drain,
            background,
        })
    }

    /// Where WebSocket clients connect.
    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// Where the push API, metrics and health endpoints are.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    /// The connections this node holds.
    pub fn sessions(&self) -> &SessionManager {
        &self.gateway.sessions
    }

    /// The tenants' plugins on this node.
    pub fn plugins(&self) -> &PluginRegistry {
        &self.gateway.plugins
    }

    /// False once the node started draining.
    pub fn is_ready(&self) -> bool {
        self.gateway.is_ready()
    }

    /// A view of the node that outlives [`shutdown`](Self::shutdown).
    pub fn observer(&self) -> NodeObserver {
        NodeObserver(self.gateway.clone())
    }

    /// Drains and stops the node: the sequence in the module's comment.
    pub async fn shutdown(self) {
        self.gateway.begin_drain();
        let _ = self.drain.await;
        let _ = self.public_listener.await;
        // The other nodes stop counting this node's connections.
        self.gateway.cluster.announce_departure().await;
        let grace = self.gateway.config.shutdown.grace_period;
        if tokio::time::timeout(grace, self.gateway.bus.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the bus did not stop within the grace period");
        }
        self.stop_internal.trigger();
        let _ = self.internal_listener.await;
        for task in self.background {
            task.abort();
        }
        // Another node (or an import) may use the state directory now.
        self.gateway.cluster.control().release();
        tracing::info!("stopped");
    }

    /// Resolves once the node was asked to stop by other means than
    /// [`shutdown`](Self::shutdown) (e.g. an admin drain), for the binary.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        self.gateway.draining.triggered()
    }
}

/// Waits for a drain (SIGTERM, the admin API, [`Node::shutdown`]) and
/// carries it out: `/readyz` already fails and the listeners stop
/// accepting; messages the bus already accepted are dispatched; every
/// client gets what was queued for it and then 1012 (reconnect elsewhere),
/// the closes spread over `shutdown.drain_window`; at most
/// `shutdown.grace_period` is then given for the last ones to go.
async fn drain(gateway: Arc<Gateway>, lanes: Arc<InFlight>) {
    gateway.draining.triggered().await;
    let shutdown = &gateway.config.shutdown;
    let sessions = &gateway.sessions;
    tracing::info!(
        open = sessions.connection_count(),
        window = ?shutdown.drain_window,
        "draining: closing client connections"
    );
    let dispatched = async {
        gateway.bus.drained().await;
        lanes.wait_until_none().await;
    };
    if tokio::time::timeout(shutdown.grace_period, dispatched)
        .await
        .is_err()
    {
        tracing::warn!("grace period over before every accepted message was dispatched");
    }
    sessions
        .close_gradually(CloseReason::ShuttingDown, shutdown.drain_window)
        .await;
    if tokio::time::timeout(shutdown.grace_period, sessions.wait_until_empty())
        .await
        .is_err()
    {
        tracing::warn!(
            left = sessions.connection_count(),
            "grace period over with connections still open"
        );
    }
}

async fn forget_idle_addresses(tenants: Arc<TenantDirectory>) {
    let mut ticks = tokio::time::interval(RATE_LIMITER_CLEANUP);
    loop {
        ticks.tick().await;
        for tenant in tenants.snapshot().iter() {
            tenant.forget_idle_addresses();
        }
    }
}

/// Raises this process's soft open-file limit to its hard limit: every
/// connection is a file descriptor. Returns the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}
