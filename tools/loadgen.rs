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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Notify, Semaphore};
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
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// (internal) hold connections and report what they receive.
    Worker {
        #[command(flatten)]
        target: Target,
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

// ----- worker side -----

#[derive(Default)]
struct Received {
    count: AtomicU64,
    last_at_us: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u32>>,
    /// The count a `wait` command waits for: reaching it wakes that wait
    /// (not every frame, which would cost a wake-up per frame).
    wanted: AtomicU64,
    reached: Notify,
}

#[derive(Deserialize)]
struct Frame {
    data: Payload,
}

#[derive(Deserialize)]
struct Payload {
    t: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct Report {
    connected: usize,
    failed: usize,
    received: u64,
    last_at_us: u64,
    latencies_us: Vec<u32>,
    cpu_ticks: u64,
}

async fn worker(
    target: Target,
    first_user: usize,
    count: usize,
    source_ips: u8,
    ip_offset: u8,
) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let received = Arc::new(Received::default());
    let opening = Arc::new(Semaphore::new(256));
    let mut handshakes = Vec::with_capacity(count);
    for i in 0..count {
        let target = target.clone();
        let received = received.clone();
        let opening = opening.clone();
        let ip = source_ip(ip_offset.wrapping_add((i % source_ips.max(1) as usize) as u8));
        handshakes.push(tokio::spawn(async move {
            let permit = opening.acquire_owned().await.expect("semaphore open");
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((ip, 0)))?;
            let ws_addr = target.ws_addrs[(first_user + i) % target.ws_addrs.len()];
            let stream = socket.connect(ws_addr).await?;
            let user = first_user + i;
            let url = match target.server {
                ServerKind::Pushgate => format!("ws://{ws_addr}/ws/{}?user=u{user}", target.tenant),
                ServerKind::Nchan => format!("ws://{ws_addr}/sub/u{user}"),
            };
            // Small buffers: the generator's own memory must not be the limit.
            let config = WebSocketConfig::default()
                .read_buffer_size(1024)
                .write_buffer_size(0);
            let (mut socket, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
            drop(permit);
            tokio::spawn(async move {
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        let at = now_micros();
                        if let Ok(frame) = serde_json::from_str::<Frame>(&text) {
                            let latency = at.saturating_sub(frame.data.t).min(u32::MAX as u64);
                            received.latencies_us.lock().unwrap().push(latency as u32);
                        }
                        received.last_at_us.fetch_max(at, Ordering::Relaxed);
                        let count = received.count.fetch_add(1, Ordering::AcqRel) + 1;
                        if count == received.wanted.load(Ordering::Acquire) {
                            received.reached.notify_one();
                        }
                    }
                }
            });
            anyhow::Ok(())
        }));
    }
    let mut report = Report::default();
    for handshake in handshakes {
        match handshake.await? {
            Ok(()) => report.connected += 1,
            Err(err) => {
                if report.failed == 0 {
                    eprintln!("worker: connection failed: {err}");
                }
                report.failed += 1;
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
    say(&report).await?;

    // Commands: "reset", or "wait N MS" (until N frames arrived since the
    // last reset or MS passed, then report).
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reset"] => {
                received.count.store(0, Ordering::Release);
                received.last_at_us.store(0, Ordering::Relaxed);
                received.latencies_us.lock().unwrap().clear();
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
                let report = Report {
                    connected: report.connected,
                    failed: report.failed,
                    received: received.count.load(Ordering::Acquire),
                    last_at_us: received.last_at_us.load(Ordering::Relaxed),
                    latencies_us: std::mem::take(&mut *received.latencies_us.lock().unwrap()),
                    cpu_ticks: cpu_ticks(std::process::id()).unwrap_or(0),
                };
                say(&report).await?;
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
    println!(
        "connected {connected} in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
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
            let sent = now_micros();
            let status = pusher.broadcast(sent).await?;
            if !status.is_success() {
                bail!("broadcast answered {status}");
            }
            let mut last = 0;
            let mut got = 0;
            for worker in &mut workers {
                let report = worker
                    .ask(&format!("wait {} 30000", worker.connections))
                    .await?;
                got += report.received;
                last = last.max(report.last_at_us);
            }
            if got < connected as u64 {
                println!("! broadcast reached {got} of {connected}");
            }
            fanout_ms.push(last.saturating_sub(sent) as f64 / 1000.0);
        }
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
        let total = rate * args.seconds;
        let accepted = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let cpu = CpuMeter::start(&args.server_pids, worker_pids.clone());
        let started = tokio::time::Instant::now();
        let senders: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let pusher = pusher.clone();
                let (accepted, next) = (accepted.clone(), next.clone());
                let users = connected as u64;
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(batch, Ordering::Relaxed);
                        if n >= total {
                            break;
                        }
                        // Open loop: message n leaves at its scheduled time.
                        tokio::time::sleep_until(
                            started + Duration::from_secs_f64(n as f64 / rate as f64),
                        )
                        .await;
                        let count = batch.min(total - n);
                        if pusher.unicast(n, count, users).await {
                            accepted.fetch_add(count, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let accepted = accepted.load(Ordering::Relaxed);
        let mut latencies = Vec::new();
        // Users are spread evenly: each worker first waits for its share
        // (or 10 s); as a share is not exact, those short of the total are
        // then asked again, for what is missing, until 10 s passed.
        let mut counts = vec![0u64; workers.len()];
        let waiting_since = Instant::now();
        let mut received;
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
                latencies.extend(report.latencies_us);
            }
            received = counts.iter().sum::<u64>();
            if received >= accepted {
                break;
            }
            if waiting_since.elapsed() > Duration::from_secs(10) {
                // Workers asked early in this pass may have received more
                // while a later one waited out its share: their final
                // counts, without waiting.
                received = 0;
                for (worker, count) in workers.iter_mut().zip(counts.iter_mut()) {
                    let report = worker.ask(&format!("wait {count} 0")).await?;
                    *count = report.received;
                    received += report.received;
                    latencies.extend(report.latencies_us);
                }
                break;
            }
            first = false;
        }
        let spent = cpu.stop();
        latencies.sort_unstable();
        println!(
            "unicast at {rate}/s target: {accepted} accepted in {elapsed:.1} s ({:.0}/s), \
             {received} delivered; latency push->client p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
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
    if let Some(rss) = servers_rss_kib(&args.server_pids) {
        println!("server RSS at the end: {rss} KiB");
    }
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
                let message = |m: u64| serde_json::json!({"users": [user_of(m, users)], "data": {"t": now_micros()}});
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
                .json(&serde_json::json!({"data": {"t": now_micros()}})),
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
            first_user,
            count,
            source_ips,
            ip_offset,
        }) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(worker(target, first_user, count, source_ips, ip_offset)),
        None => tokio::runtime::Runtime::new()?.block_on(run(cli.run)),
    }
}
