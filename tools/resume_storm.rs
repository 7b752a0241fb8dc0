//! A reconnect storm, as after a deploy: `--clients` clients of tenant
//! `storm`, whose `on-deliver` plugin runs for every message a client gets,
//! reconnect at once with `since`, each having missed `--missed`
//! broadcasts, while one client of tenant `quiet` pings its node without
//! pause. Prints one JSON line: how long the storm took, the resumes'
//! times, what it cost the quiet tenant (its ping round trips before and
//! during the storm), and the node's CPU time per replayed message.
//!
//! ```text
//! scripts/bench-storm.sh            # starts a release node and runs this
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Parser)]
#[command(about = "A reconnect storm against a running pushgate node")]
struct Args {
    /// The node's public (WebSocket) listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    ws_addr: String,
    /// The node's internal (push API) listener.
    #[arg(long, default_value = "127.0.0.1:8081")]
    http_addr: String,
    /// The node's PID, to read the CPU time it spent.
    #[arg(long)]
    server_pid: u32,
    /// The storm tenant's push key.
    #[arg(long, default_value = "storm-key")]
    key: String,
    /// Clients that resume at once.
    #[arg(long, default_value_t = 5_000)]
    clients: usize,
    /// Broadcasts each of them missed.
    #[arg(long, default_value_t = 20)]
    missed: usize,
    /// The data of each broadcast (a JSON value).
    #[arg(long, default_value = r#"{"i18n": {"en": "hello", "fr": "bonjour"}}"#)]
    data: String,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Quiet clients pinging, each every [`PING_EVERY`].
const PINGERS: usize = 8;
const PING_EVERY: Duration = Duration::from_millis(60);

async fn connect(url: &str) -> anyhow::Result<Socket> {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(socket)
}

/// The next JSON frame.
async fn next_json(socket: &mut Socket) -> anyhow::Result<Value> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("the connection ended"),
        }
    }
}

/// CPU time (user and system) the process spent, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    json!({
        "count": values.len(),
        "p50": percentile(&values, 0.5),
        "p99": percentile(&values, 0.99),
        "max": values.last().copied().unwrap_or(f64::NAN),
    })
}

/// Pings the quiet tenant's client until `stop`, one at a time: each
/// round trip in milliseconds.
async fn ping_until(
    mut socket: Socket,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Socket, Vec<f64>)> {
    let mut round_trips = Vec::new();
    while !*stop.borrow() {
        let sent = Instant::now();
        socket
            .send(Message::text(json!({"type": "ping"}).to_string()))
            .await?;
        loop {
            if next_json(&mut socket).await?["type"] == "pong" {
                break;
            }
        }
        round_trips.push(sent.elapsed().as_secs_f64() * 1000.0);
        // Within a client's command budget (20 a second).
        tokio::time::sleep(PING_EVERY).await;
    }
    Ok((socket, round_trips))
}

/// A pinger's socket, and its round trips in milliseconds.
type Pinged = (Socket, Vec<f64>);

/// The quiet tenant's clients ping until told to stop.
struct Pinging {
    stop: tokio::sync::watch::Sender<bool>,
    pingers: Vec<tokio::task::JoinHandle<anyhow::Result<Pinged>>>,
}

impl Pinging {
    /// Pings on `runtime`, a thread of their own: round trips measure the
    /// node, not the storm's clients queued on the same workers.
    fn start(runtime: &tokio::runtime::Handle, sockets: Vec<Socket>) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let pingers = sockets
            .into_iter()
            .map(|socket| runtime.spawn(ping_until(socket, stopped.clone())))
            .collect();
        Self { stop, pingers }
    }

    /// Stops them: their sockets, and every round trip in milliseconds.
    async fn stop(self) -> anyhow::Result<(Vec<Socket>, Vec<f64>)> {
        // A pinger may have ended on its own (an error): its outcome says why.
        let _ = self.stop.send(true);
        let mut sockets = Vec::new();
        let mut round_trips = Vec::new();
        for pinger in self.pingers {
            let (socket, trips) = pinger.await??;
            sockets.push(socket);
            round_trips.extend(trips);
        }
        Ok((sockets, round_trips))
    }
}

/// Loopback source addresses the storm's clients come from (a node bounds
/// the connections of one address).
const SOURCE_ADDRESSES: u8 = 50;

/// One client that resumes, from loopback address `source`: until its
/// `recovered` frame, how long it took and how many messages it got.
async fn resume(server: String, source: u8, url: String) -> anyhow::Result<(f64, usize)> {
    let started = Instant::now();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::new(127, 0, 0, source), 0).into())?;
    let stream = socket.connect(server.parse()?).await?;
    let (mut socket, _) =
        tokio_tungstenite::client_async(url.as_str(), MaybeTlsStream::Plain(stream))
            .await
            .with_context(|| format!("connecting to {url}"))?;
    let mut messages = 0;
    loop {
        let frame = next_json(&mut socket).await?;
        match frame["type"].as_str() {
            Some("message") => messages += 1,
            Some("recovered") => break,
            _ => {}
        }
    }
    let took = started.elapsed().as_secs_f64() * 1000.0;
    let _ = socket.close(None).await;
    Ok((took, messages))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data: Value = serde_json::from_str(&args.data).context("--data is JSON")?;
    let http = reqwest::Client::new();
    let push = |data: &Value| {
        http.post(format!("http://{}/v1/push", args.http_addr))
            .bearer_auth(&args.key)
            .json(&json!({"broadcast": true, "data": data}))
            .send()
    };

    // Where the clients saw their last message: a marker's position.
    let mut marker = connect(&format!("ws://{}/ws/storm?user=marker", args.ws_addr)).await?;
    let answer = push(&json!("marker")).await?;
    if !answer.status().is_success() {
        bail!("the marker push answered {}", answer.status());
    }
    let seen = loop {
        let frame = next_json(&mut marker).await?;
        if frame["type"] == "message" {
            break frame["pos"].as_str().context("a position")?.to_owned();
        }
    };
    // What they miss; the marker client waits for the last of it.
    for _ in 0..args.missed {
        let answer = push(&data).await?;
        if !answer.status().is_success() {
            bail!("a push answered {}", answer.status());
        }
    }
    let mut received = 0;
    while received < args.missed {
        if next_json(&mut marker).await?["type"] == "message" {
            received += 1;
        }
    }
    drop(marker);

    let pinger_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let pingers = pinger_runtime.handle().clone();
    let mut quiet = Vec::new();
    for n in 0..PINGERS {
        let url = format!("ws://{}/ws/quiet?user=q{n}", args.ws_addr);
        quiet.push(pingers.spawn(async move { connect(&url).await }).await??);
    }
    let pinging = Pinging::start(&pingers, quiet);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (quiet, before) = pinging.stop().await?;

    let cpu_before = cpu_seconds(args.server_pid)?;
    let pinging = Pinging::start(&pingers, quiet);
    let started = Instant::now();
    let storm: Vec<_> = (0..args.clients)
        .map(|n| {
            let url = format!("ws://{}/ws/storm?user=u{n}&since={seen}", args.ws_addr);
            let source = 2 + (n % SOURCE_ADDRESSES as usize) as u8;
            tokio::spawn(resume(args.ws_addr.clone(), source, url))
        })
        .collect();
    let mut times = Vec::new();
    let mut replayed = 0;
    let mut failed = 0;
    for client in storm {
        match client.await? {
            Ok((took, messages)) => {
                times.push(took);
                replayed += messages;
            }
            Err(err) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("a resume failed: {err:#}");
                }
            }
        }
    }
    let storm_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cpu = cpu_seconds(args.server_pid)? - cpu_before;
    let (_, during) = pinging.stop().await?;
    pinger_runtime.shutdown_background();

    println!(
        "{}",
        json!({
            "clients": args.clients,
            "missed_each": args.missed,
            "resumes_failed": failed,
            "messages_replayed": replayed,
            "storm_ms": storm_ms,
            "resume_ms": summary(times),
            "quiet_ping_ms_before": summary(before),
            "quiet_ping_ms_during": summary(during),
            "server_cpu_s": cpu,
            "server_cpu_us_per_replayed_message": cpu * 1e6 / replayed.max(1) as f64,
        })
    );
    Ok(())
}
