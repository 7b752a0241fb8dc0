//! A real RocketMQ name server and broker on free loopback ports, and
//! `pushgate` node processes clustered through them. Every process is
//! stopped by its PID when its handle is dropped, whatever the test did.
//!
//! The binaries come from `scripts/rocketmq.sh install` (which
//! `scripts/test.sh` runs): `$PUSHGATE_ROCKETMQ_ROOT/bin`, by default
//! `/opt/rocketmq/bin`. Without them a cluster test fails and says so.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Process, eventually_blocking};

/// How long a cluster may take to get somewhere on a loaded machine:
/// longer than [`super::PATIENCE`], as the client's own reconnection after
/// a broker restart takes about 30 s.
pub const CLUSTER_PATIENCE: Duration = Duration::from_secs(120);

fn binary(name: &str) -> PathBuf {
    let root = std::env::var_os("PUSHGATE_ROCKETMQ_ROOT")
        .map_or_else(|| PathBuf::from("/opt/rocketmq"), PathBuf::from);
    let path = root.join("bin").join(name);
    assert!(
        path.is_file(),
        "the cluster tests need a real RocketMQ broker, and {} is missing: run \
         `scripts/rocketmq.sh install` (scripts/test.sh does it), or set \
         PUSHGATE_ROCKETMQ_ROOT to where it is installed",
        path.display()
    );
    path
}

/// A port nobody listens on right now, below the ephemeral range: a port
/// the OS hands out for port 0 may be taken by an outgoing connection (the
/// nodes' own clients) before the broker binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = 10_000 + (random % 20_000) as u16;
        if port_is_free(port) {
            return port;
        }
    }
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A broker port whose companion port (port − 2, RocketMQ's "fast" port)
/// is free too.
fn free_broker_port() -> u16 {
    loop {
        let port = free_port();
        if port > 1026 && port_is_free(port - 2) {
            return port;
        }
    }
}

/// A plain HTTP/1.0 GET of `path` on `127.0.0.1:port`: status and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// A directory for a broker's store. On tmpfs where there is one: the
/// broker refuses writes once the file system it stores on is 90 % used
/// (counting space only root may use), which a build machine's disk can be.
fn broker_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let mut builder = tempfile::Builder::new();
    builder.prefix("pushgate-rocketmq-");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return dir;
    }
    builder.tempdir().expect("a directory for the broker")
}

/// Broker settings that delete every segment of the log but the newest
/// (1 MiB) within seconds: what a broker past its retention does.
const SHORT_RETENTION: &str = r#"mappedFileSizeCommitLog = 1048576
fileReservedTime = 0
deleteFileBatchMax = 10
deleteWhen = "00;01;02;03;04;05;06;07;08;09;10;11;12;13;14;15;16;17;18;19;20;21;22;23"
"#;

/// A name server and a broker in a directory of their own (or, for a
/// second broker group, a broker registering with another's name servers).
pub struct Rocketmq {
    dir: tempfile::TempDir,
    pub name_server_port: u16,
    /// A second name server the broker registers with too, if started.
    second_name_server_port: Option<u16>,
    broker_name: String,
    broker_port: u16,
    ha_port: u16,
    health_port: u16,
    name_server: Option<Process>,
    second_name_server: Option<Process>,
    broker: Option<Process>,
    /// Lines added to the broker's `[store]` settings.
    store_settings: &'static str,
}

impl Rocketmq {
    /// Ports for a pair, nothing started yet.
    pub fn new() -> Self {
        let dir = broker_dir();
        Self {
            dir,
            name_server_port: free_port(),
            second_name_server_port: None,
            broker_name: "pushgate-test-broker".to_owned(),
            broker_port: free_broker_port(),
            ha_port: free_port(),
            health_port: free_port(),
            name_server: None,
            second_name_server: None,
            broker: None,
            store_settings: "mappedFileSizeCommitLog = 67108864",
        }
    }

    /// A started pair.
    pub fn start() -> Self {
        let mut rocketmq = Self::new();
        rocketmq.start_name_server();
        rocketmq.start_broker();
        rocketmq
    }

    /// A started pair whose broker keeps only its newest segment of
    /// 1 MiB: every older one is deleted at its next clean-up (every 10 s),
    /// as a broker past its retention (`fileReservedTime`) does.
    pub fn start_with_short_retention() -> Self {
        let mut rocketmq = Self::new();
        rocketmq.store_settings = SHORT_RETENTION;
        rocketmq.start_name_server();
        rocketmq.start_broker();
        rocketmq
    }

    /// True while the broker keeps the first segment of its log.
    pub fn keeps_first_segment(&self) -> bool {
        self.path("store")
            .join("commitlog")
            .join(format!("{:020}", 0))
            .exists()
    }

    /// Picks other broker ports (after a start that lost a port race).
    fn repick_broker_ports(&mut self) {
        self.broker_port = free_broker_port();
        self.ha_port = free_port();
        self.health_port = free_port();
    }

    /// A name server, a second one, and a broker registered with both.
    pub fn start_with_two_name_servers() -> Self {
        let mut rocketmq = Self::new();
        rocketmq.start_name_server();
        let first = rocketmq.name_server_port;
        let second = free_port();
        rocketmq.name_server_port = second;
        let process = rocketmq.spawn_name_server("namesrv-2");
        rocketmq.second_name_server = Some(process);
        rocketmq.name_server_port = first;
        rocketmq.second_name_server_port = Some(second);
        rocketmq.start_broker();
        rocketmq
    }

    /// A second broker group (another broker name, same cluster) that
    /// registers with this one's name servers, started and ready.
    pub fn start_second_broker(&self) -> Self {
        let mut second = Self::new();
        second.name_server_port = self.name_server_port;
        second.second_name_server_port = self.second_name_server_port;
        second.broker_name = format!("{}-2", self.broker_name);
        second.start_broker();
        second
    }

    /// `host:port` of the name servers, `;` between them.
    pub fn name_server(&self) -> String {
        let mut addresses = format!("127.0.0.1:{}", self.name_server_port);
        if let Some(port) = self.second_name_server_port {
            addresses += &format!(";127.0.0.1:{port}");
        }
        addresses
    }

    /// Kills the first name server at once (SIGKILL).
    pub fn kill_name_server(&mut self) {
        if let Some(mut name_server) = self.name_server.take() {
            name_server.kill();
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, binary_name: &str, log: &str) -> Command {
        let home = self.path("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut command = Command::new(binary(binary_name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(log))
            .unwrap();
        command
            .env("ROCKETMQ_HOME", &home)
            .env("ROCKETMQ_SECURITY_PROFILE", "development-insecure-loopback")
            .env_remove("NAMESRV_ADDR")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        command
    }

    pub fn start_name_server(&mut self) {
        let process = self.spawn_name_server("namesrv");
        self.name_server = Some(process);
    }

    /// Starts a name server on `name_server_port` (files named `label`)
    /// and waits until it listens.
    fn spawn_name_server(&self, label: &str) -> Process {
        let home = self.path("home");
        let config = self.path(&format!("{label}.toml"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(
            &config,
            format!(
                "rocketmqHome = {home:?}\nkvConfigPath = {kv:?}\nconfigStorePath = {store:?}\n\
                 listenPort = {port}\nbindAddress = \"127.0.0.1\"\n",
                kv = home.join(format!("{label}-kvConfig.json")),
                store = home.join(format!("{label}.properties")),
                port = self.name_server_port,
            ),
        )
        .unwrap();
        let child = self
            .command("rocketmq-namesrv-rust", &format!("{label}.log"))
            .arg("-c")
            .arg(&config)
            .args(["--bindAddress", "127.0.0.1", "--listenPort"])
            .arg(self.name_server_port.to_string())
            .spawn()
            .expect("the name server starts");
        let process = Process { child };
        let port = self.name_server_port;
        eventually_blocking("the name server listens", super::PATIENCE, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        process
    }

    /// Starts the broker and waits until it is ready. A broker that exits
    /// at once is started again: on other ports at its first start (a port
    /// taken meanwhile), on a fresh HA port once its address is free when
    /// it restarts.
    pub fn start_broker(&mut self) {
        let first_start = self.broker.is_none() && !self.path("broker.toml").exists();
        for attempt in 1..=3 {
            if self.try_start_broker() {
                return;
            }
            assert!(
                attempt < 3,
                "the broker exited before it was ready:\n{}",
                tail(&self.path("broker.log"))
            );
            if first_start {
                self.repick_broker_ports();
            } else {
                // A restart keeps its address (the nodes know it); its
                // HA port, which only it uses, may still be held by the run
                // before, and so may its address for a moment.
                self.ha_port = free_port();
                let port = self.broker_port;
                eventually_blocking("the broker's port is free again", super::PATIENCE, || {
                    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                });
            }
        }
    }

    /// True once the broker is ready; false if it exited first.
    fn try_start_broker(&mut self) -> bool {
        // A fresh health port on every start: the readiness polls of a
        // broker before a restart leave that port in TIME_WAIT, and a
        // restarted broker that cannot bind it gives up its start.
        self.health_port = free_port();
        let store = self.path("store");
        let config = self.path("broker.toml");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(
            &config,
            format!(
                r#"[broker]
namesrvAddr = "{namesrv}"
brokerIp1 = "127.0.0.1"
listenPort = {port}
storePathRootDir = {store:?}
autoCreateTopicEnable = true
autoCreateSubscriptionGroup = true

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "{broker_name}"
brokerClusterName = "pushgate-test"
brokerId = 0

[store]
storeType = "LocalFile"
brokerRole = "ASYNC_MASTER"
storePathRootDir = {store:?}
haListenAddress = "127.0.0.1"
haListenPort = {ha}
{store_settings}
"#,
                namesrv = self.name_server(),
                broker_name = self.broker_name,
                port = self.broker_port,
                ha = self.ha_port,
                store_settings = self.store_settings,
            ),
        )
        .unwrap();
        let child = self
            .command("rocketmq-broker-rust", "broker.log")
            .env(
                "ROCKETMQ_HEALTH_BIND_ADDR",
                format!("127.0.0.1:{}", self.health_port),
            )
            .arg("-c")
            .arg(&config)
            .arg("-n")
            .arg(self.name_server())
            .spawn()
            .expect("the broker starts");
        let mut broker = Process { child };
        let health = self.health_port;
        let log = self.path("broker.log");
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        while http_get(health, "/readyz").map(|(status, _)| status) != Some(200) {
            if broker.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not become ready:\n{}",
                tail(&log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.broker = Some(broker);
        true
    }

    /// Freezes the broker (SIGSTOP): its sockets stay open, nothing answers.
    pub fn pause_broker(&self) {
        self.signal_broker("-STOP");
    }

    /// Lets a frozen broker run again (SIGCONT).
    pub fn resume_broker(&self) {
        self.signal_broker("-CONT");
    }

    fn signal_broker(&self, signal: &str) {
        let broker = self.broker.as_ref().expect("the broker runs");
        let status = Command::new("kill")
            .arg(signal)
            .arg(broker.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Kills the broker at once (SIGKILL), as a crash would.
    pub fn kill_broker(&mut self) {
        if let Some(mut broker) = self.broker.take() {
            broker.kill();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A `pushgate` node process of a cluster.
pub struct NodeProcess {
    pub name: String,
    pub public: String,
    pub internal: String,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts node `name` with the rocketmq bus on `name_server`, the
    /// admin token [`super::ADMIN_TOKEN`], and `tenants` (TOML) appended.
    pub fn start(name: &str, name_server: &str, topic: &str, tenants: &str) -> Self {
        Self::start_with_state(name, name_server, topic, tenants, "")
    }

    /// [`NodeProcess::start`] with `state` (TOML) added to its `[state]`
    /// settings.
    pub fn start_with_state(
        name: &str,
        name_server: &str,
        topic: &str,
        tenants: &str,
        state: &str,
    ) -> Self {
        Self::start_with_settings(name, name_server, topic, tenants, state, "")
    }

    /// [`NodeProcess::start_with_state`] with `admin` (TOML) added to its
    /// `[admin]` settings.
    pub fn start_with_settings(
        name: &str,
        name_server: &str,
        topic: &str,
        tenants: &str,
        state: &str,
        admin: &str,
    ) -> Self {
        Self::start_configured(name, name_server, topic, tenants, (state, admin, ""))
    }

    /// [`NodeProcess::start`] with pushes routed to their users' nodes
    /// (`bus.rocketmq.route_to_holders`).
    pub fn start_routing(name: &str, name_server: &str, topic: &str, tenants: &str) -> Self {
        let bus = "route_to_holders = true";
        Self::start_configured(name, name_server, topic, tenants, ("", "", bus))
    }

    /// `state`, `admin` and `bus` (TOML) added to its `[state]`, `[admin]`
    /// and `[bus.rocketmq]` settings.
    fn start_configured(
        name: &str,
        name_server: &str,
        topic: &str,
        tenants: &str,
        (state, admin, bus): (&str, &str, &str),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("pushgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[listen]
public = "127.0.0.1:0"
internal = "127.0.0.1:0"

[admin]
token = "{admin_token}"
{admin}

[shutdown]
drain_window = "50ms"

[state]
dir = {state_dir:?}
{state}

[bus]
engine = "rocketmq"

[bus.rocketmq]
name_servers = ["{name_server}"]
topic = "{topic}"
instance_name = "{name}"
heartbeat_interval = "500ms"
send_timeout = "2s"
{bus}

{tenants}
"#,
                state_dir = dir.path().join("state"),
                admin_token = super::ADMIN_TOKEN,
            ),
        )
        .unwrap();
        let (process, public, internal) = super::serve(&config, name);
        Self {
            name: name.to_owned(),
            public,
            internal,
            _process: process,
            _dir: dir,
        }
    }

    /// Kills the node (SIGKILL, as a crash) and starts it again on the
    /// same configuration and state directory (on new ports).
    pub fn kill_and_start_again(&mut self) {
        self._process.kill();
        let (process, public, internal) =
            super::serve(&self._dir.path().join("pushgate.toml"), &self.name);
        self._process = process;
        self.public = public;
        self.internal = internal;
    }

    /// The node's directory: its configuration and state directory.
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Stops the node as an operator would (SIGTERM: it drains) and waits
    /// until it exited.
    pub fn terminate(&mut self) {
        let pid = self._process.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self._process.child.wait();
    }

    /// Kills the node at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self._process.kill();
    }

    fn internal_port(&self) -> u16 {
        self.internal.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `/readyz`: status and body.
    pub fn readyz(&self) -> (u16, Value) {
        let (status, body) =
            http_get(self.internal_port(), "/readyz").unwrap_or((0, String::new()));
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Waits until the node's bus receives (its `/readyz` answers 200).
    pub fn wait_ready(&self) {
        eventually_blocking(
            &format!("node {} ready", self.name),
            CLUSTER_PATIENCE,
            || self.readyz().0 == 200,
        );
    }

    pub fn ws_url(&self, tenant: &str, user: &str) -> String {
        format!("ws://{}/ws/{tenant}?user={user}", self.public)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    /// The node's metrics.
    pub fn metrics(&self) -> String {
        http_get(self.internal_port(), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

/// Ready nodes called `names` on `name_server` and a topic of `test`'s
/// own, with `tenants`, routing pushes to their users' nodes or not.
pub fn start_nodes(
    name_server: &str,
    test: &str,
    names: &[&str],
    tenants: &str,
    routing: bool,
) -> Vec<NodeProcess> {
    let topic = test_topic(test);
    let nodes: Vec<NodeProcess> = names
        .iter()
        .map(|name| match routing {
            true => NodeProcess::start_routing(name, name_server, &topic, tenants),
            false => NodeProcess::start(name, name_server, &topic, tenants),
        })
        .collect();
    for node in &nodes {
        node.wait_ready();
    }
    nodes
}

/// A bus of its own on `topic` as node `name` would have (ready), for a
/// test that plays a node of another version by publishing raw records;
/// what it receives is dropped.
pub async fn raw_bus(
    name_server: &str,
    topic: &str,
    name: &str,
) -> pushgate::bus::rocketmq::RocketmqBus {
    use pushgate::bus::Bus;
    let config = pushgate::config::RocketmqConfig {
        name_servers: vec![name_server.to_owned()],
        topic: topic.to_owned(),
        heartbeat_interval: Duration::from_millis(500),
        ..Default::default()
    };
    let (bus, _envelopes, _control) = pushgate::bus::rocketmq::RocketmqBus::start(
        config,
        name.to_owned(),
        64,
        pushgate::bus::ResumeControl::Now,
    )
    .expect("the bus starts");
    super::eventually(&format!("{name}'s bus is ready"), CLUSTER_PATIENCE, || {
        bus.status() == pushgate::bus::BusStatus::Ready
    })
    .await;
    bus
}

/// Waits until each of `nodes` routes pushes to their users' nodes (it
/// heard no node of an older version, and every other node routes).
pub async fn until_routing(nodes: &[NodeProcess]) {
    for node in nodes {
        super::eventually(
            &format!("node {} routes", node.name),
            CLUSTER_PATIENCE,
            || super::metric_value(&node.metrics(), "pushgate_bus_routing", &[]) == 1.0,
        )
        .await;
    }
}

/// Waits until pushes to `user` through `node` (push key `key`) reach
/// `client`, whose connection a routing node may not know of yet: markers
/// until one arrives, then a last one — the queue is read in order, so
/// nothing of the earlier ones is on its way after it.
pub async fn until_routed(node: &NodeProcess, client: &mut super::Client, user: &str, key: &str) {
    let http = reqwest::Client::new();
    let mut attempt = 0;
    for _ in 0..2 {
        tokio::time::timeout(CLUSTER_PATIENCE, async {
            loop {
                attempt += 1;
                let marker = format!("routed-{attempt}");
                let response = http
                    .post(node.http("/v1/push"))
                    .bearer_auth(key)
                    .json(&serde_json::json!({"users": [user], "data": {"marker": marker}}))
                    .send()
                    .await
                    .expect("push request");
                assert_eq!(
                    response.status().as_u16(),
                    202,
                    "marker through {}",
                    node.name
                );
                let arrived = tokio::time::timeout(Duration::from_secs(1), async {
                    while client.next_json().await["data"]["marker"] != marker {}
                })
                .await;
                if arrived.is_ok() {
                    return;
                }
            }
        })
        .await
        .expect("pushes through the node reach the client");
    }
}

/// A topic of its own for one test, so that tests never see each other's
/// messages.
pub fn test_topic(test: &str) -> String {
    format!("pushgate_{test}_{}", std::process::id())
}
