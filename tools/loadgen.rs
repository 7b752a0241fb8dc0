//! pushgate's load generator.
//!
//! Opens many WebSocket connections to a running node (spread over several
//! worker processes, past the per-process open-file limit, and over many
//! loopback source addresses, past the ephemeral-port limit), then measures:
//!
//! - server RSS per idle connection;
//! - broadcast fan-out: time from the push until the last client has it;
//! - unicast pushes at fixed rates: delivery latency (push sent → client
//!   received) percentiles;
//!
//! and the CPU time the server and the load generator spent in each phase.
//!
//! ```text
//! cargo run --release --example loadgen -- --server-pid PID --connections 10000
//! ```
//! `scripts/bench.sh` starts a node with `tools/loadgen.toml` and runs this.
//!
//! `--server nchan` runs the same load against nginx + nchan (see
//! `scripts/bench-nchan.sh`): each client subscribes over WebSocket to its
//! user's channel and to the channel `all`, and pushes are nchan publishes.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(about = "Load generator for pushgate")]
struct Cli {
    #[command(subcommand)]
    worker: Option<WorkerCommand>,
    #[command(flatten)]
    run: RunArgs,
}

/// The server under load.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    /// `GET /ws/{tenant}?user=…`; `POST /v1/push` with a push key.
    Pushgate,
    /// nginx + nchan: `GET /sub/{user}` (multiplexed with channel `all`);
    /// `POST /pub/{user}` and `POST /pub/all` carry the message itself.
    Nchan,
}

#[derive(clap::Args, Clone)]
struct Target {
    #[arg(long, value_enum, default_value = "pushgate")]
    server: ServerKind,
    /// The nodes' public (WebSocket) listeners, comma-separated: connections
    /// are spread over them in turn.
    #[arg(
        long = "ws-addr",
        value_delimiter = ',',
        default_value = "127.0.0.1:8080"
    )]
    ws_addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "bench")]
    tenant: String,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// The nodes' internal (push API) listeners, comma-separated: pushes go
    /// to them in turn.
    #[arg(
        long = "http-addr",
        value_delimiter = ',',
        default_value = "127.0.0.1:8081"
    )]
    http_addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "bench-key")]
    key: String,
    /// PIDs of the nodes (comma-separated), to sample their RSS and CPU time
    /// (summed).
    #[arg(long = "server-pid", value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// WebSocket connections to open in total.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Worker processes holding them (each is below the open-file limit).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 8)]
    source_ips: u8,
    /// Broadcasts to time.
    #[arg(long, default_value_t = 20)]
    broadcasts: usize,
    /// Unicast push rates to measure, messages per second.
    #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
    rates: Vec<u64>,
    /// Seconds per unicast rate.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Push requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Unicast messages per request: 1 uses `POST /v1/push`, more use
    /// `POST /v1/push/batch` (each message to its own user).
    #[arg(long, default_value_t = 1)]
    batch: u64,
    #[command(flatten)]
    behaviour: ClientBehaviour,
    /// Seconds to hold the connections without traffic once open (the
    /// servers' CPU over them is the idle figure; a connection that ends
    /// meanwhile is counted).
    #[arg(long, default_value_t = 0)]
    hold_seconds: u64,
    /// Last: kill this node (`kill -9`, 1 = the first `--server-pid`) while
    /// pushing to every user through the others at `--kill-rate`, until
    /// its clients are back on other nodes (with `--reconnect`).
    #[arg(long)]
    kill_node: Option<usize>,
    /// Unicast pushes per second while a node is killed.
    #[arg(long, default_value_t = 200)]
    kill_rate: u64,
    /// Most seconds to wait for a killed node's clients to be back.
    #[arg(long, default_value_t = 300)]
    kill_patience: u64,
    /// Print a JSON summary of every phase as the last line.
    #[arg(long)]
    summary: bool,
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// (internal) hold connections and report what they receive.
    Worker {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        behaviour: ClientBehaviour,
        #[arg(long)]
        first_user: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        source_ips: u8,
        #[arg(long)]
        ip_offset: u8,
    },
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Source address `n` of the spread: 127.0.1.1, 127.0.1.2, …
fn source_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, n.max(1))
}

/// As the nodes: jemalloc keeps less memory per idle connection than the
/// system allocator, and at a million clients the generator's memory is
/// what the machine runs out of first.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// ----- worker side -----

#[derive(Default)]
struct Received {
    count: AtomicU64,
    last_at_us: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u32>>,
    /// `n` of each numbered push received (a unicast's number), to tell
    /// what was lost from what came twice.
    numbers: std::sync::Mutex<Vec<u64>>,
    /// The count a `wait` command waits for: reaching it wakes that wait
    /// (not every frame, which would cost a wake-up per frame).
    wanted: AtomicU64,
    reached: Notify,
    /// Connections open now.
    open: AtomicU64,
    /// Times a connection was ended by the server (or its node went).
    ended: AtomicU64,
    /// Reconnections made (with `--reconnect`), and when the last one was.
    reconnected: AtomicU64,
    back_at_us: AtomicU64,
    /// `recovered` frames (the end of a resume's replay), and those saying
    /// part of the gap is gone; when the last one came.
    recovered: AtomicU64,
    incomplete: AtomicU64,
    recovered_at_us: AtomicU64,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    pos: Option<String>,
    #[serde(default)]
    data: Option<Payload>,
    #[serde(default)]
    complete: Option<bool>,
}

#[derive(Deserialize)]
struct Payload {
    t: u64,
    /// The push's number, for unicasts.
    #[serde(default)]
    n: Option<u64>,
}

#[derive(Serialize, Deserialize, Default)]
struct Report {
    connected: usize,
    failed: usize,
    received: u64,
    last_at_us: u64,
    latencies_us: Vec<u32>,
    #[serde(default)]
    numbers: Vec<u64>,
    cpu_ticks: u64,
    #[serde(default)]
    open: u64,
    #[serde(default)]
    ended: u64,
    #[serde(default)]
    reconnected: u64,
    #[serde(default)]
    back_at_us: u64,
    #[serde(default)]
    incomplete: u64,
    #[serde(default)]
    recovered: u64,
    #[serde(default)]
    recovered_at_us: u64,
}

/// How a worker's clients behave.
#[derive(clap::Args, Clone)]
struct ClientBehaviour {
    /// Seconds between each client's `{"type":"ping"}` (what the JavaScript
    /// client sends every 25 s); 0 sends none.
    #[arg(long, default_value_t = 0)]
    ping_seconds: u64,
    /// A client whose connection ends reconnects to the next node, with
    /// `since` the last position it received.
    #[arg(long)]
    reconnect: bool,
}

/// One client's own state across its connections.
#[derive(Default)]
struct ClientState {
    /// The position of the last message received, to resume from.
    last_pos: Option<Box<str>>,
    /// Between a resume's handshake and its `recovered` frame.
    replaying: bool,
    /// Reconnected at least once.
    moved: bool,
}

/// What every client task of a worker shares.
struct Clients {
    target: Target,
    behaviour: ClientBehaviour,
    received: Received,
    opening: Arc<Semaphore>,
}

/// Opens user `user`'s WebSocket connection to node `node` from `ip`.
async fn open_client(
    clients: &Clients,
    node: usize,
    ip: Ipv4Addr,
    user: usize,
    since: Option<&str>,
) -> anyhow::Result<WebSocketStream<tokio::net::TcpStream>> {
    let target = &clients.target;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    let ws_addr = target.ws_addrs[node % target.ws_addrs.len()];
    let stream = socket.connect(ws_addr).await?;
    let mut path = match target.server {
        ServerKind::Pushgate => format!("/ws/{}?user=u{user}", target.tenant),
        ServerKind::Nchan => format!("/sub/u{user}"),
    };
    if let Some(since) = since {
        path.push_str("&since=");
        path.push_str(since);
    }
    handshake(stream, &ws_addr.to_string(), &path).await
}

/// The client's side of the WebSocket handshake on `stream`.
///
/// Not tungstenite's client handshake: that keeps its 4 KiB handshake
/// buffer as the connection's read buffer (whatever `read_buffer_size`
/// says), 4 of the 6.4 KiB the generator held per client — a million
/// clients' 4 GB on this machine. Here the answer is read into a buffer on
/// the stack and only what follows it (frames sent at once) is kept.
async fn handshake(
    mut stream: tokio::net::TcpStream,
    host: &str,
    path: &str,
) -> anyhow::Result<WebSocketStream<tokio::net::TcpStream>> {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = [0u8; 2048];
    let mut filled = 0;
    let (head, accept) = loop {
        let read = stream.read(&mut answer[filled..]).await?;
        if read == 0 {
            bail!("the server closed during the handshake");
        }
        filled += read;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(&answer[..filled])? {
            if response.code != Some(101) {
                bail!("handshake answered {:?}", response.code);
            }
            let accept = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                .map(|h| h.value.to_vec());
            break (head, accept);
        }
        if filled == answer.len() {
            bail!("handshake answer too long");
        }
    };
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        bail!("handshake answer without the right Sec-WebSocket-Accept");
    }
    // Small buffers: the generator's own memory must not be the limit.
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0);
    let socket = WebSocketStream::from_partially_read(
        stream,
        answer[head..filled].to_vec(),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        Some(config),
    )
    .await;
    Ok(socket)
}

impl Clients {
    fn count_frame(&self, text: &str, client: &mut ClientState) {
        let received = &self.received;
        let at = now_micros();
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            return;
        };
        if frame.kind == "recovered" {
            client.replaying = false;
            if frame.complete == Some(false) {
                received.incomplete.fetch_add(1, Ordering::Relaxed);
            }
            received.recovered.fetch_add(1, Ordering::Relaxed);
            received.recovered_at_us.fetch_max(at, Ordering::Relaxed);
            return;
        }
        if frame.kind != "message" {
            return;
        }
        if self.behaviour.reconnect {
            client.last_pos = frame.pos.map(String::into_boxed_str);
        }
        if let Some(data) = frame.data {
            // A replayed push's latency is the outage's, not delivery's;
            // a client that moved waits for its resume: the latency
            // figures are the other clients'.
            if !client.replaying && !client.moved {
                let latency = at.saturating_sub(data.t).min(u32::MAX as u64);
                received.latencies_us.lock().unwrap().push(latency as u32);
            }
            if let Some(n) = data.n {
                received.numbers.lock().unwrap().push(n);
            }
        }
        received.last_at_us.fetch_max(at, Ordering::Relaxed);
        let count = received.count.fetch_add(1, Ordering::AcqRel) + 1;
        if count == received.wanted.load(Ordering::Acquire) {
            received.reached.notify_one();
        }
    }

    /// Reads `socket` until it ends, pinging as the behaviour says.
    async fn read_until_end(
        &self,
        socket: &mut WebSocketStream<tokio::net::TcpStream>,
        user: usize,
        client: &mut ClientState,
    ) {
        let every = Duration::from_secs(self.behaviour.ping_seconds);
        // Spread over the interval, as clients that connected at
        // different times would be.
        let mut next_ping = (!every.is_zero()).then(|| {
            let spread = (user as u64).wrapping_mul(7919) % every.as_millis().max(1) as u64;
            tokio::time::Instant::now() + Duration::from_millis(spread)
        });
        loop {
            let ping = async {
                match next_ping {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                incoming = socket.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        // The pong says when to ping next (on the node's
                        // heartbeat grid), as the JavaScript client follows.
                        if let (Some(_), Some(after)) = (next_ping, next_ping_hint(&text)) {
                            next_ping = Some(tokio::time::Instant::now() + after);
                        }
                        self.count_frame(&text, client)
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
                () = ping => {
                    next_ping = next_ping.map(|at| at + every);
                    if socket.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Holds user `user`'s connection; with `--reconnect`, connects again
    /// (to the next node, from the last position) each time it ends.
    async fn hold(
        self: Arc<Self>,
        mut socket: WebSocketStream<tokio::net::TcpStream>,
        user: usize,
        mut node: usize,
        ip: Ipv4Addr,
    ) {
        let received = &self.received;
        let mut client = ClientState::default();
        loop {
            self.read_until_end(&mut socket, user, &mut client).await;
            received.open.fetch_sub(1, Ordering::Relaxed);
            received.ended.fetch_add(1, Ordering::Relaxed);
            if !self.behaviour.reconnect {
                return;
            }
            let mut backoff = Duration::from_millis(50);
            // The lost node's clients spread over the others, as a
            // client's own choice of another address would.
            let nodes = self.target.ws_addrs.len().max(2);
            node += 1 + user / nodes % (nodes - 1);
            socket = loop {
                let permit = self.opening.acquire().await.expect("semaphore open");
                let since = client.last_pos.as_deref();
                // Boxed: a held client's task keeps no room for a handshake.
                let opened = Box::pin(open_client(&self, node, ip, user, since)).await;
                drop(permit);
                match opened {
                    Ok(socket) => break socket,
                    Err(_) => {
                        node += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            };
            client.replaying = client.last_pos.is_some();
            client.moved = true;
            received.open.fetch_add(1, Ordering::Relaxed);
            received.reconnected.fetch_add(1, Ordering::Relaxed);
            received
                .back_at_us
                .fetch_max(now_micros(), Ordering::Relaxed);
        }
    }

    fn report(&self, connected: usize, failed: usize) -> Report {
        let received = &self.received;
        Report {
            connected,
            failed,
            received: received.count.load(Ordering::Acquire),
            last_at_us: received.last_at_us.load(Ordering::Relaxed),
            latencies_us: std::mem::take(&mut *received.latencies_us.lock().unwrap()),
            numbers: std::mem::take(&mut *received.numbers.lock().unwrap()),
            cpu_ticks: cpu_ticks(std::process::id()).unwrap_or(0),
            open: received.open.load(Ordering::Relaxed),
            ended: received.ended.load(Ordering::Relaxed),
            reconnected: received.reconnected.load(Ordering::Relaxed),
            back_at_us: received.back_at_us.load(Ordering::Relaxed),
            incomplete: received.incomplete.load(Ordering::Relaxed),
            recovered: received.recovered.load(Ordering::Relaxed),
            recovered_at_us: received.recovered_at_us.load(Ordering::Relaxed),
        }
    }
}

async fn worker(
    target: Target,
    behaviour: ClientBehaviour,
    first_user: usize,
    count: usize,
    source_ips: u8,
    ip_offset: u8,
) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let clients = Arc::new(Clients {
        target,
        behaviour,
        received: Received::default(),
        opening: Arc::new(Semaphore::new(256)),
    });
    // A handshake's task is spawned once it may start, and its outcome
    // comes back on a channel (not a kept join handle): the few in flight
    // are all that handshakes hold, not one task per client between the
    // held ones (which left 4 KiB per client of the generator's memory).
    let (outcomes, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
    {
        let clients = clients.clone();
        tokio::spawn(async move {
            for i in 0..count {
                let permit = clients.opening.clone().acquire_owned().await;
                let permit = permit.expect("semaphore open");
                let clients = clients.clone();
                let outcomes = outcomes.clone();
                let ip = source_ip(ip_offset.wrapping_add((i % source_ips.max(1) as usize) as u8));
                tokio::spawn(async move {
                    let user = first_user + i;
                    let opened = open_client(&clients, user, ip, user, None).await;
                    drop(permit);
                    let outcome = opened.map(|socket| {
                        clients.received.open.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(clients.clone().hold(socket, user, user, ip));
                    });
                    let _ = outcomes.send(outcome);
                });
            }
        });
    }
    let (mut connected, mut failed) = (0, 0);
    while let Some(outcome) = handshakes.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(err) => {
                if failed == 0 {
                    eprintln!("worker: connection failed: {err}");
                }
                failed += 1;
            }
        }
    }
    let mut out = tokio::io::stdout();
    let mut say = async |report: &Report| -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(report)?;
        line.push(b'\n');
        out.write_all(&line).await?;
        out.flush().await?;
        Ok(())
    };
    say(&clients.report(connected, failed)).await?;

    // Commands: "reset", or "wait N MS" (until N frames arrived since the
    // last reset or MS passed, then report).
    let received = &clients.received;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reset"] => {
                received.count.store(0, Ordering::Release);
                received.last_at_us.store(0, Ordering::Relaxed);
                received.latencies_us.lock().unwrap().clear();
                received.numbers.lock().unwrap().clear();
                say(&Report::default()).await?;
            }
            ["wait", n, ms] => {
                let want: u64 = n.parse()?;
                let deadline = tokio::time::Instant::now() + Duration::from_millis(ms.parse()?);
                received.wanted.store(want, Ordering::Release);
                // The count is read after `wanted` is stored, so a reach is
                // either seen here or notified; a wake-up left over from an
                // earlier wait only makes this look again.
                while received.count.load(Ordering::Acquire) < want {
                    let reached = received.reached.notified();
                    if tokio::time::timeout_at(deadline, reached).await.is_err() {
                        break;
                    }
                }
                received.wanted.store(0, Ordering::Release);
                say(&clients.report(connected, failed)).await?;
            }
            _ => bail!("unknown command {line:?}"),
        }
    }
    Ok(())
}

// ----- coordinator side -----

struct Worker {
    _child: Child,
    pid: u32,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    connections: usize,
}

impl Worker {
    async fn ask(&mut self, command: &str) -> anyhow::Result<Report> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let line = self.stdout.next_line().await?.context("worker exited")?;
        Ok(serde_json::from_str(&line)?)
    }
}

/// utime + stime of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_ticks_split(pid).map(|(user, system)| user + system)
}

/// (utime, stime) of a process, in clock ticks.
fn cpu_ticks_split(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

fn addr_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Summed RSS of the nodes, if every one can be read.
fn servers_rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// CPU seconds spent by the servers and by the load generator over a phase.
struct CpuMeter {
    server_pids: Vec<u32>,
    worker_pids: Vec<u32>,
    start: CpuSample,
}

/// Clock ticks so far: the servers' in user space and in the kernel, the
/// load generator's in all.
#[derive(Clone)]
struct CpuSample {
    server_user: u64,
    server_system: u64,
    /// Each server's, in the order of the pids.
    each_server: Vec<u64>,
    generator: u64,
}

/// What a phase cost, in CPU seconds.
struct CpuSpent {
    server: f64,
    /// The servers' share spent in the kernel (system calls, the network
    /// stack, waking the load generator's threads), 0..=1.
    server_kernel_share: f64,
    /// Each server's CPU seconds, in the order of the pids.
    each_server: Vec<f64>,
    generator: f64,
}

impl CpuMeter {
    fn sample(server_pids: &[u32], workers: &[u32]) -> CpuSample {
        let (server_user, server_system) = server_pids
            .iter()
            .filter_map(|p| cpu_ticks_split(*p))
            .fold((0, 0), |(u, s), (user, system)| (u + user, s + system));
        let generator = workers.iter().filter_map(|p| cpu_ticks(*p)).sum::<u64>()
            + cpu_ticks(std::process::id()).unwrap_or(0);
        CpuSample {
            server_user,
            server_system,
            each_server: server_pids
                .iter()
                .map(|p| cpu_ticks(*p).unwrap_or(0))
                .collect(),
            generator,
        }
    }

    fn start(server_pids: &[u32], worker_pids: Vec<u32>) -> Self {
        let start = Self::sample(server_pids, &worker_pids);
        Self {
            server_pids: server_pids.to_vec(),
            worker_pids,
            start,
        }
    }

    /// CPU spent since start.
    fn stop(&self) -> CpuSpent {
        let now = Self::sample(&self.server_pids, &self.worker_pids);
        let user = now.server_user.saturating_sub(self.start.server_user);
        let system = now.server_system.saturating_sub(self.start.server_system);
        CpuSpent {
            server: (user + system) as f64 / 100.0,
            server_kernel_share: system as f64 / (user + system).max(1) as f64,
            each_server: now
                .each_server
                .iter()
                .zip(&self.start.each_server)
                .map(|(now, start)| now.saturating_sub(*start) as f64 / 100.0)
                .collect(),
            generator: now.generator.saturating_sub(self.start.generator) as f64 / 100.0,
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let procs = args.procs.max(1);
    let rss_before = servers_rss_kib(&args.server_pids);
    let each_rss_before: Vec<Option<u64>> = args.server_pids.iter().map(|p| rss_kib(*p)).collect();
    println!(
        "# {} connections over {procs} worker process(es) and {} source addresses",
        args.connections, args.source_ips
    );

    let opened = Instant::now();
    let mut workers = Vec::new();
    for p in 0..procs {
        let count = args.connections / procs + usize::from(p < args.connections % procs);
        let first_user = workers
            .iter()
            .map(|w: &Worker| w.connections)
            .sum::<usize>();
        let server = match args.target.server {
            ServerKind::Pushgate => "pushgate",
            ServerKind::Nchan => "nchan",
        };
        let mut child = Command::new(&exe)
            .args(["worker", "--ws-addr", &addr_list(&args.target.ws_addrs)])
            .args(["--server", server])
            .args(["--tenant", &args.target.tenant])
            .args([
                "--first-user",
                &first_user.to_string(),
                "--count",
                &count.to_string(),
            ])
            .args(["--source-ips", &args.source_ips.to_string()])
            .args([
                "--ip-offset",
                &(1 + (p as u8).wrapping_mul(args.source_ips)).to_string(),
            ])
            .args(["--ping-seconds", &args.behaviour.ping_seconds.to_string()])
            .args(args.behaviour.reconnect.then_some("--reconnect"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("worker pid")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        workers.push(Worker {
            _child: child,
            pid,
            stdin,
            stdout,
            connections: count,
        });
    }
    let mut connected = 0;
    for worker in &mut workers {
        let line = worker.stdout.next_line().await?.context("worker exited")?;
        let report: Report = serde_json::from_str(&line)?;
        connected += report.connected;
        if report.failed > 0 {
            println!(
                "! {} connections failed in worker {}",
                report.failed, worker.pid
            );
        }
    }
    let connect_seconds = opened.elapsed().as_secs_f64();
    println!("connected {connected} in {connect_seconds:.1} s");
    let mut summary = Summary {
        connections: args.connections,
        connections_held: connected,
        connect_seconds,
        connections_per_second: connected as f64 / connect_seconds,
        ..Summary::default()
    };
    let worker_pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let generator_rss: u64 = worker_pids.iter().filter_map(|p| rss_kib(*p)).sum();

    // Idle memory: let the server settle registrations, then sample.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(before), Some(after)) = (rss_before, servers_rss_kib(&args.server_pids)) {
        println!(
            "idle: server RSS {before} KiB -> {after} KiB = {:.2} KiB per connection \
             (load generator {:.2} KiB per connection)",
            (after.saturating_sub(before)) as f64 / connected.max(1) as f64,
            generator_rss as f64 / connected.max(1) as f64,
        );
    }
    if args.server_pids.len() > 1 {
        // Each node's own growth: its clients' share, and what it keeps of
        // the other nodes' clients.
        let own = connected as f64 / args.server_pids.len() as f64;
        for (pid, before) in args.server_pids.iter().zip(&each_rss_before) {
            if let (Some(before), Some(after)) = (before, rss_kib(*pid)) {
                println!(
                    "idle: server {pid}: RSS {before} KiB -> {after} KiB = {:.2} KiB per own connection \
                     (~{own:.0} own, {} held by the others)",
                    after.saturating_sub(*before) as f64 / own.max(1.0),
                    connected as f64 - own,
                );
            }
        }
    }

    summary.sample_memory(&args.server_pids, &worker_pids);
    if args.hold_seconds > 0 {
        hold(&args, &mut workers, connected, &mut summary).await?;
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let pusher = Pusher {
        http,
        server: args.target.server,
        bases: Arc::new(
            args.http_addrs
                .iter()
                .map(|addr| format!("http://{addr}"))
                .collect(),
        ),
        key: args.key.clone(),
    };
    let batch = args.batch.max(1);
    if batch > 1 && args.target.server == ServerKind::Nchan {
        bail!("nchan has no batch publish: use --batch 1");
    }

    // Broadcast fan-out.
    if args.broadcasts > 0 {
        let mut fanout_ms = Vec::new();
        let cpu = CpuMeter::start(&args.server_pids, worker_pids.clone());
        for _ in 0..args.broadcasts {
            for worker in &mut workers {
                worker.ask("reset").await?;
            }
            let (sent, refused) = pusher.broadcast_until_taken().await?;
            summary.broadcast_refused += refused;
            let mut last = 0;
            let mut got = 0;
            // One minute for all of them, not a minute each.
            let deadline = Instant::now() + Duration::from_secs(60);
            for worker in &mut workers {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis();
                let report = worker
                    .ask(&format!("wait {} {left}", worker.connections))
                    .await?;
                got += report.received;
                last = last.max(report.last_at_us);
            }
            if got < connected as u64 {
                println!("! broadcast reached {got} of {connected}");
            }
            summary.broadcast_missing += (connected as u64).saturating_sub(got);
            fanout_ms.push(last.saturating_sub(sent) as f64 / 1000.0);
        }
        summary.broadcast_ms.clone_from(&fanout_ms);
        let spent = cpu.stop();
        let frames = (args.broadcasts * connected) as f64;
        let mut sorted = fanout_ms.clone();
        println!(
            "broadcast to {connected}: median {:.1} ms until the last client had it \
             (min {:.1}, max {:.1}, {} runs); server CPU {:.2} us per frame \
             ({:.0} % in the kernel), load generator CPU {:.2} us per frame",
            median(&mut sorted),
            sorted.first().copied().unwrap_or(f64::NAN),
            sorted.last().copied().unwrap_or(f64::NAN),
            args.broadcasts,
            spent.server * 1e6 / frames,
            spent.server_kernel_share * 100.0,
            spent.generator * 1e6 / frames,
        );
    }

    // Unicast at fixed rates.
    for &rate in &args.rates {
        for worker in &mut workers {
            worker.ask("reset").await?;
        }
        let cpu = CpuMeter::start(&args.server_pids, worker_pids.clone());
        let started = Instant::now();
        let unicasts = Unicasts {
            pusher: pusher.clone(),
            rate,
            users: connected as u64,
            concurrency: args.concurrency,
            batch,
        };
        let sent = unicasts.send(0, rate * args.seconds, None).await;
        let elapsed = started.elapsed().as_secs_f64();
        let accepted = sent.len() as u64;
        let mut arrived = Arrived::default();
        arrived.collect(&mut workers, accepted, connected).await?;
        let received = arrived.count;
        let mut latencies = std::mem::take(&mut arrived.latencies_us);
        let (lost, twice) = arrived.lost_and_twice(&sent);
        summary.unicast_accepted = accepted;
        summary.unicast_lost = lost;
        summary.unicast_twice = twice;
        let spent = cpu.stop();
        latencies.sort_unstable();
        summary.unicast_p50_ms = percentile(&latencies, 0.5);
        summary.unicast_p99_ms = percentile(&latencies, 0.99);
        println!(
            "unicast at {rate}/s target: {accepted} accepted in {elapsed:.1} s ({:.0}/s), \
             {received} delivered ({lost} lost, {twice} twice); latency push->client p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             server CPU {:.1} us per message ({:.0} % in the kernel), \
             load generator CPU {:.1} us per message",
            accepted as f64 / elapsed,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
            spent.server * 1e6 / accepted.max(1) as f64,
            spent.server_kernel_share * 100.0,
            spent.generator * 1e6 / accepted.max(1) as f64,
        );
        if spent.each_server.len() > 1 {
            let each: Vec<String> = spent
                .each_server
                .iter()
                .map(|cpu| format!("{:.1}", cpu * 1e6 / accepted.max(1) as f64))
                .collect();
            println!(
                "unicast at {rate}/s target: CPU us per message of each server: {}",
                each.join(" ")
            );
        }
    }
    if let Some(node) = args.kill_node {
        let unicasts = Unicasts {
            pusher: pusher.clone(),
            rate: args.kill_rate,
            users: connected as u64,
            concurrency: args.concurrency,
            batch,
        };
        kill_node(&args, node, unicasts, &mut workers, connected, &mut summary).await?;
    }
    if let Some(rss) = servers_rss_kib(&args.server_pids) {
        println!("server RSS at the end: {rss} KiB");
    }
    if args.summary {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// Every phase's figures, for `--summary`.
#[derive(Serialize, Default)]
struct Summary {
    connections: usize,
    /// Connections open at the end of the hold (or once connected).
    connections_held: usize,
    connect_seconds: f64,
    connections_per_second: f64,
    /// Connections that ended while held.
    held_ended: u64,
    hold_seconds: u64,
    /// Time from each broadcast until the last client had it.
    broadcast_ms: Vec<f64>,
    /// Deliveries of the broadcasts that never arrived.
    broadcast_missing: u64,
    /// Broadcasts answered 503 (the node's bus not ready) and sent again.
    broadcast_refused: u64,
    nodes_rss_bytes: u64,
    /// The nodes' proportional set size: a page shared by several nodes
    /// (the binary's code) counted once in all, not once per node.
    nodes_pss_bytes: u64,
    loadgen_rss_bytes: u64,
    /// The whole machine's: total less available (clients, kernel and all).
    machine_used_bytes: u64,
    /// All nodes' CPU over the hold, per cent of one core.
    idle_cpu_percent_of_core: f64,
    unicast_accepted: u64,
    unicast_p50_ms: f64,
    unicast_p99_ms: f64,
    unicast_lost: u64,
    unicast_twice: u64,
    /// From the kill until the last of the killed node's clients was back:
    /// reconnected, and told its gap was replayed (`recovered`).
    node_kill_back_s: f64,
    /// From the kill until the last of them had reconnected.
    node_kill_reconnected_s: f64,
    node_kill_clients: u64,
    node_kill_pushes: u64,
    node_kill_lost: u64,
    node_kill_twice: u64,
    /// Resumes told part of their gap was gone.
    node_kill_incomplete: u64,
    /// Pushes delivered live meanwhile to the clients that did not move.
    node_kill_p99_ms: f64,
}

impl Summary {
    fn sample_memory(&mut self, server_pids: &[u32], worker_pids: &[u32]) {
        self.nodes_rss_bytes = servers_rss_kib(server_pids).unwrap_or(0) * 1024;
        self.nodes_pss_bytes = server_pids.iter().filter_map(|p| pss_kib(*p)).sum::<u64>() * 1024;
        self.loadgen_rss_bytes = worker_pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>() * 1024;
        self.machine_used_bytes = machine_used_kib().unwrap_or(0) * 1024;
    }
}

/// A process's proportional set size.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// MemTotal less MemAvailable.
fn machine_used_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

/// Every worker's counts now, without waiting.
async fn status(workers: &mut [Worker]) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::with_capacity(workers.len());
    for worker in workers {
        reports.push(worker.ask("wait 0 0").await?);
    }
    Ok(reports)
}

/// Holds the connections without pushes for `--hold-seconds`: the nodes'
/// CPU meanwhile, and every connection that ended.
async fn hold(
    args: &RunArgs,
    workers: &mut [Worker],
    connected: usize,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let worker_pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let cpu = CpuMeter::start(&args.server_pids, worker_pids.clone());
    let started = Instant::now();
    let ended_before: u64 = status(workers).await?.iter().map(|r| r.ended).sum();
    let mut ended = 0;
    while started.elapsed() < Duration::from_secs(args.hold_seconds) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let reports = status(workers).await?;
        ended = reports.iter().map(|r| r.ended).sum::<u64>() - ended_before;
        let open: u64 = reports.iter().map(|r| r.open).sum();
        println!(
            "hold: {:.0} s, {open} open, {ended} ended",
            started.elapsed().as_secs_f64()
        );
    }
    let spent = cpu.stop();
    let seconds = started.elapsed().as_secs_f64();
    summary.hold_seconds = args.hold_seconds;
    summary.held_ended = ended;
    summary.connections_held = connected.saturating_sub(ended as usize);
    summary.idle_cpu_percent_of_core = spent.server / seconds * 100.0;
    summary.sample_memory(&args.server_pids, &worker_pids);
    println!(
        "hold: {} s, {} held, {ended} ended; nodes' CPU {:.2} % of a core \
         (load generator {:.2} %); RSS of the nodes {} MiB (PSS {} MiB), of the load generator \
         {} MiB; machine used {} MiB",
        args.hold_seconds,
        summary.connections_held,
        summary.idle_cpu_percent_of_core,
        spent.generator / seconds * 100.0,
        summary.nodes_rss_bytes >> 20,
        summary.nodes_pss_bytes >> 20,
        summary.loadgen_rss_bytes >> 20,
        summary.machine_used_bytes >> 20,
    );
    Ok(())
}

/// Unicast pushes at a fixed rate, each to a user of `0..users`.
struct Unicasts {
    pusher: Pusher,
    rate: u64,
    users: u64,
    concurrency: usize,
    batch: u64,
}

impl Unicasts {
    /// Sends pushes `first..first + total` (or until `stop`), each at its
    /// scheduled time (an open loop); the numbers accepted.
    async fn send(&self, first: u64, total: u64, stop: Option<Arc<AtomicBool>>) -> Vec<u64> {
        let next = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = tokio::time::Instant::now();
        let (rate, users, batch) = (self.rate.max(1), self.users, self.batch);
        let senders: Vec<_> = (0..self.concurrency)
            .map(|_| {
                let pusher = self.pusher.clone();
                let (accepted, next, stop) = (accepted.clone(), next.clone(), stop.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(batch, Ordering::Relaxed);
                        if i >= total || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                            break;
                        }
                        tokio::time::sleep_until(
                            started + Duration::from_secs_f64(i as f64 / rate as f64),
                        )
                        .await;
                        let count = batch.min(total - i);
                        if pusher.unicast(first + i, count, users).await {
                            accepted
                                .lock()
                                .unwrap()
                                .extend(first + i..first + i + count);
                        }
                    }
                })
            })
            .collect();
        for sender in senders {
            let _ = sender.await;
        }
        std::mem::take(&mut *accepted.lock().unwrap())
    }
}

/// What the workers received of a phase's pushes.
#[derive(Default)]
struct Arrived {
    count: u64,
    latencies_us: Vec<u32>,
    numbers: Vec<u64>,
}

impl Arrived {
    fn add(&mut self, report: Report) {
        self.latencies_us.extend(report.latencies_us);
        self.numbers.extend(report.numbers);
    }

    /// Waits until the workers received `accepted` frames since their
    /// last reset, or 10 s passed without.
    async fn collect(
        &mut self,
        workers: &mut [Worker],
        accepted: u64,
        connected: usize,
    ) -> anyhow::Result<()> {
        // Users are spread evenly: each worker first waits for its share
        // (or 10 s); as a share is not exact, those short of the total are
        // then asked again, for what is missing, until 10 s passed.
        let mut counts = vec![0u64; workers.len()];
        let waiting_since = Instant::now();
        let mut first = true;
        loop {
            for (worker, count) in workers.iter_mut().zip(counts.iter_mut()) {
                let (want, ms) = if first {
                    let share = accepted * worker.connections as u64 / connected.max(1) as u64;
                    (share, 10_000)
                } else {
                    (*count + 1, 500)
                };
                let report = worker.ask(&format!("wait {want} {ms}")).await?;
                *count = report.received;
                self.add(report);
            }
            self.count = counts.iter().sum::<u64>();
            if self.count >= accepted {
                return Ok(());
            }
            if waiting_since.elapsed() > Duration::from_secs(10) {
                // Workers asked early in this pass may have received more
                // while a later one waited out its share: their final
                // counts, without waiting.
                self.count = 0;
                for (worker, count) in workers.iter_mut().zip(counts.iter_mut()) {
                    let report = worker.ask(&format!("wait {count} 0")).await?;
                    self.count += report.received;
                    self.add(report);
                }
                return Ok(());
            }
            first = false;
        }
    }

    /// Of the pushes `sent`, how many never arrived and how many arrived
    /// more than once.
    fn lost_and_twice(&self, sent: &[u64]) -> (u64, u64) {
        let mut seen = std::collections::HashMap::<u64, u64>::new();
        for n in &self.numbers {
            *seen.entry(*n).or_default() += 1;
        }
        let lost = sent.iter().filter(|n| !seen.contains_key(n)).count() as u64;
        let twice = seen.values().map(|times| times - 1).sum();
        (lost, twice)
    }
}

/// Kills node `node` (1-based) with SIGKILL while pushing to every user
/// through the other nodes; waits until its clients are back elsewhere,
/// then for what was pushed meanwhile.
async fn kill_node(
    args: &RunArgs,
    node: usize,
    mut unicasts: Unicasts,
    workers: &mut [Worker],
    connected: usize,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let nodes = args.server_pids.len();
    if node == 0 || node > nodes || args.target.ws_addrs.len() != nodes {
        bail!("--kill-node: 1 to {nodes}, with one --ws-addr per --server-pid, in the same order");
    }
    if !args.behaviour.reconnect {
        bail!("--kill-node needs --reconnect");
    }
    let pid = args.server_pids[node - 1];
    // Its clients: user u connects to node u % nodes.
    let its_clients = (0..connected).filter(|u| u % nodes == node - 1).count() as u64;
    let bases: Vec<String> = unicasts
        .pusher
        .bases
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != (node - 1) % unicasts.pusher.bases.len())
        .map(|(_, base)| base.clone())
        .collect();
    unicasts.pusher.bases = Arc::new(bases);
    // A broadcast first: every client has a recent position to resume from.
    for worker in workers.iter_mut() {
        worker.ask("reset").await?;
    }
    unicasts.pusher.broadcast_until_taken().await?;
    for worker in workers.iter_mut() {
        worker
            .ask(&format!("wait {} 60000", worker.connections))
            .await?;
    }
    for worker in workers.iter_mut() {
        worker.ask("reset").await?;
    }
    let before = status(workers).await?;
    let ended_before: u64 = before.iter().map(|r| r.ended).sum();
    let recovered_before: u64 = before.iter().map(|r| r.recovered).sum();
    let stop = Arc::new(AtomicBool::new(false));
    let pushing = {
        let stop = stop.clone();
        tokio::spawn(async move { unicasts.send(1 << 40, u64::MAX >> 1, Some(stop)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = now_micros();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    if !killed.success() {
        bail!("kill -9 {pid} failed");
    }
    println!("kill: node {node} (pid {pid}) killed; {its_clients} clients to come back");
    let patience = Instant::now();
    let mut arrived = Arrived::default();
    let mut back = false;
    while patience.elapsed() < Duration::from_secs(args.kill_patience) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reports = status(workers).await?;
        let ended = reports.iter().map(|r| r.ended).sum::<u64>() - ended_before;
        let open: u64 = reports.iter().map(|r| r.open).sum();
        let recovered = reports.iter().map(|r| r.recovered).sum::<u64>() - recovered_before;
        for report in reports {
            arrived.add(report);
        }
        if ended >= its_clients && open >= connected as u64 && recovered >= its_clients {
            back = true;
            break;
        }
    }
    // Pushes go on a little while after everyone is back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = pushing.await?;
    let reports = status(workers).await?;
    let reconnected_at = reports.iter().map(|r| r.back_at_us).max().unwrap_or(0);
    let back_at = reports.iter().map(|r| r.recovered_at_us).max().unwrap_or(0);
    summary.node_kill_incomplete = reports.iter().map(|r| r.incomplete).sum();
    for report in reports {
        arrived.add(report);
    }
    // Counts are since the reset before the kill: wait for them all.
    let mut rest = Arrived::default();
    rest.collect(workers, sent.len() as u64, connected).await?;
    arrived.latencies_us.extend(rest.latencies_us);
    arrived.numbers.extend(rest.numbers);
    let (lost, twice) = arrived.lost_and_twice(&sent);
    arrived.latencies_us.sort_unstable();
    summary.node_kill_clients = its_clients;
    summary.node_kill_reconnected_s = reconnected_at.saturating_sub(killed_at) as f64 / 1e6;
    summary.node_kill_back_s = if back {
        back_at.saturating_sub(killed_at) as f64 / 1e6
    } else {
        f64::NAN
    };
    summary.node_kill_pushes = sent.len() as u64;
    summary.node_kill_lost = lost;
    summary.node_kill_twice = twice;
    summary.node_kill_p99_ms = percentile(&arrived.latencies_us, 0.99);
    println!(
        "kill: {} reconnected in {:.1} s, back with their gap in {:.1} s ({}); {} pushes at {}/s meanwhile: {lost} lost, {twice} twice, \
         {} resumes incomplete; live p99 {:.1} ms",
        its_clients,
        summary.node_kill_reconnected_s,
        summary.node_kill_back_s,
        if back { "all" } else { "not all" },
        sent.len(),
        args.kill_rate,
        summary.node_kill_incomplete,
        summary.node_kill_p99_ms,
    );
    Ok(())
}

/// Sends pushes the way the server under load takes them.
#[derive(Clone)]
struct Pusher {
    http: reqwest::Client,
    server: ServerKind,
    /// `http://addr` of each node's push API, used in turn.
    bases: Arc<Vec<String>>,
    key: String,
}

/// The user message `n` goes to.
fn user_of(n: u64, users: u64) -> String {
    format!("u{}", n.wrapping_mul(2_654_435_761) % users)
}

impl Pusher {
    /// Sends a broadcast, again while it is answered 503 (for at most a
    /// minute, as a service would retry): when it was sent, and how many
    /// times it was refused first.
    async fn broadcast_until_taken(&self) -> anyhow::Result<(u64, u64)> {
        let started = Instant::now();
        let mut refused = 0;
        loop {
            let sent = now_micros();
            let status = self.broadcast(sent).await?;
            if status.is_success() {
                return Ok((sent, refused));
            }
            if status != reqwest::StatusCode::SERVICE_UNAVAILABLE
                || started.elapsed() > Duration::from_secs(60)
            {
                bail!("broadcast answered {status}");
            }
            refused += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn broadcast(&self, sent_at_micros: u64) -> anyhow::Result<reqwest::StatusCode> {
        let data = serde_json::json!({"t": sent_at_micros});
        let base = &self.bases[0];
        let request = match self.server {
            ServerKind::Pushgate => self
                .http
                .post(format!("{base}/v1/push"))
                .bearer_auth(&self.key)
                .json(&serde_json::json!({"broadcast": true, "data": data})),
            ServerKind::Nchan => self
                .http
                .post(format!("{base}/pub/all"))
                .json(&serde_json::json!({ "data": data })),
        };
        Ok(request.send().await?.status())
    }

    /// Messages `n..n + count`, each to its own user, in one request;
    /// true if accepted.
    async fn unicast(&self, n: u64, count: u64, users: u64) -> bool {
        let base = &self.bases[(n / count.max(1)) as usize % self.bases.len()];
        let request = match self.server {
            ServerKind::Pushgate => {
                let message = |m: u64| serde_json::json!({"users": [user_of(m, users)], "data": {"t": now_micros(), "n": m}});
                let request = if count == 1 {
                    self.http.post(format!("{base}/v1/push")).json(&message(n))
                } else {
                    let messages: Vec<_> = (n..n + count).map(message).collect();
                    self.http
                        .post(format!("{base}/v1/push/batch"))
                        .json(&serde_json::json!({ "messages": messages }))
                };
                request.bearer_auth(&self.key)
            }
            ServerKind::Nchan => self
                .http
                .post(format!("{base}/pub/{}", user_of(n, users)))
                .json(&serde_json::json!({"data": {"t": now_micros(), "n": n}})),
        };
        match request.send().await {
            Ok(response) => match self.server {
                ServerKind::Pushgate => response.status() == 202,
                ServerKind::Nchan => response.status().is_success(),
            },
            Err(_) => false,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.worker {
        // A worker's clients share one thread: a frame costs one wake-up of
        // it, with no other thread to wake or contend with, so the
        // generator takes as little of the cores the server also needs as
        // it can (spread clients over processes with --procs instead).
        Some(WorkerCommand::Worker {
            target,
            behaviour,
            first_user,
            count,
            source_ips,
            ip_offset,
        }) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(worker(
                target, behaviour, first_user, count, source_ips, ip_offset,
            )),
        None => tokio::runtime::Runtime::new()?.block_on(run(cli.run)),
    }
}

/// When a pong says to ping next: `{"type":"pong","next_ping_ms":N}`.
fn next_ping_hint(text: &str) -> Option<Duration> {
    let millis = text
        .strip_prefix(r#"{"type":"pong","next_ping_ms":"#)?
        .strip_suffix('}')?;
    millis.parse().ok().map(Duration::from_millis)
}
