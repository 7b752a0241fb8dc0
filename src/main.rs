//! The `pushgate` binary: parses the command line, sets up logging and runs
//! a node until SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pushgate::config::{Config, LogFormat};
use pushgate::node::{self, Node, raise_open_file_limit};
use tracing_subscriber::EnvFilter;

/// jemalloc's size classes keep less memory per idle connection than the
/// system allocator (BENCHMARKS.md, "jemalloc").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "pushgate", version, about = "Real-time WebSocket push gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default). Without --config it serves the `demo` tenant.
    Serve(ServeArgs),
    /// Load and validate a configuration, print it as the node would use it, and exit.
    CheckConfig(ServeArgs),
    /// Manage a tenant's plugins on a running node (through its admin API).
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Back up or restore the state directory (`state.dir`): tenants, keys,
    /// plugins and their rollout.
    #[command(subcommand)]
    State(StateCommand),
    /// Connect to a node as a WebSocket client: print every frame received,
    /// send each line typed (e.g. `{"type":"ping"}`). The tour's client.
    Client {
        /// The WebSocket URL, e.g. ws://127.0.0.1:8080/ws/demo?user=alice
        #[arg(default_value = "ws://127.0.0.1:8080/ws/demo?user=alice")]
        url: String,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Write the state as one JSON document (to standard output unless
    /// --output); a running node's state too.
    Export {
        #[command(flatten)]
        config: ServeArgs,
        /// The file to write.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Replace the state with a document `export` wrote; with the node
    /// stopped.
    Import {
        #[command(flatten)]
        config: ServeArgs,
        /// The document to read.
        file: PathBuf,
    },
}

/// Where the node's admin API is and how to authenticate to it.
#[derive(clap::Args)]
struct AdminTarget {
    /// The node's internal listener.
    #[arg(long, env = "PUSHGATE_NODE", default_value = "http://127.0.0.1:8081")]
    node: String,
    /// An admin key: the node's `admin.token`, or one made through the
    /// admin API (a tenant's own admin key manages its own tenant).
    #[arg(long, env = "PUSHGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The tenant whose plugins to manage.
    #[arg(long)]
    tenant: String,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Upload a component (validated, stored, and activated unless --no-activate).
    Upload {
        #[command(flatten)]
        target: AdminTarget,
        /// Install without activating.
        #[arg(long)]
        no_activate: bool,
        /// The component (.wasm).
        file: PathBuf,
    },
    /// List the tenant's versions and which is active.
    List {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Activate an installed version.
    Activate {
        #[command(flatten)]
        target: AdminTarget,
        version: String,
    },
    /// Re-activate the version that was active before the current one.
    Rollback {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Remove a version (removing the active one leaves the tenant without a plugin).
    Remove {
        #[command(flatten)]
        target: AdminTarget,
        version: String,
    },
    /// Serve PERCENT of the tenant's users (stable by user id) with VERSION,
    /// beside the active version; run again to raise or lower the share.
    /// It is rolled back on its own if it fails more than the active one.
    Canary {
        #[command(flatten)]
        target: AdminTarget,
        version: String,
        /// Share of users, 1 to 100.
        #[arg(long)]
        percent: u8,
    },
    /// End the canary: the active version serves every user again.
    EndCanary {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Give VERSION a copy of every call of the active version, off the
    /// delivery path, and count where its verdicts differ.
    Shadow {
        #[command(flatten)]
        target: AdminTarget,
        version: String,
    },
    /// What the shadow version did on the node: counts and differing samples.
    ShadowReport {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Stop the shadow version.
    EndShadow {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Run one hook of a component here, in a node's sandbox and limits, and
    /// print the verdict, the time and the memory it used. No node needed.
    Try(Box<TryArgs>),
    /// Start a plugin: a crate of its own (the WIT package copied in), with
    /// a publish filter to change.
    New {
        /// The plugin's crate name.
        name: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `pushgate plugin try`.
#[derive(clap::Args)]
struct TryArgs {
    /// The component (.wasm).
    file: PathBuf,
    /// The hook to call.
    #[arg(long, value_parser = ["on-publish", "on-deliver", "authenticate"])]
    hook: String,
    /// The message's data (JSON), for on-publish and on-deliver.
    #[arg(long, default_value = "{}")]
    data: String,
    /// on-publish: the message is for this topic …
    #[arg(long, conflicts_with = "users")]
    topic: Option<String>,
    /// … or these users (comma-separated); else for everyone.
    #[arg(long)]
    users: Option<String>,
    /// on-deliver: a recipient, `USER` or `USER:key=value,key=value` (its
    /// session metadata); repeat for more.
    #[arg(long = "recipient")]
    recipients: Vec<String>,
    /// authenticate: the handshake's path and query.
    #[arg(long, default_value = "/ws/trial")]
    request: String,
    /// authenticate: a handshake header, `name: value`; repeat for more.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A value of the tenant's plugin configuration, `key=value`; repeat.
    #[arg(long = "config")]
    config: Vec<String>,
    /// The tenant's `plugin.max_memory_bytes`.
    #[arg(long, default_value_t = 32 << 20)]
    max_memory_bytes: usize,
    /// The tenant's `plugin.timeout`.
    #[arg(long, default_value = "50ms", value_parser = humantime_serde::re::humantime::parse_duration)]
    timeout: std::time::Duration,
    /// The tenant's `max_message_bytes` (what a replacement may carry).
    #[arg(long, default_value_t = 64 << 10)]
    max_message_bytes: usize,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML configuration file; PUSHGATE_* variables override its values.
    #[arg(long, short, env = "PUSHGATE_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => {
            let config = Config::load(args.config.as_deref())?;
            node::check(&config)?;
            // Secrets stay out of terminals and CI logs.
            println!("{}", serde_json::to_string_pretty(&config.redacted())?);
            Ok(())
        }
        Command::State(command) => state_command(command),
        Command::Client { url } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(client(&url))
        }
        Command::Plugin(PluginCommand::Try(args)) => try_plugin(*args),
        Command::Plugin(PluginCommand::New { name, dir }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            pushgate::plugin::scaffold::new_plugin(&dir, &name)?;
            println!(
                "created {}: cd there, then `cargo build --release` (see its README.md)",
                dir.display()
            );
            Ok(())
        }
        Command::Plugin(command) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(plugin_command(command))
        }
    }
}

/// `pushgate client URL`: frames received to standard output, lines of
/// standard input sent as text frames; ends when the server closes or
/// input ends.
async fn client(url: &str) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio_tungstenite::tungstenite::Message;

    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    eprintln!("connected to {url}");
    let (mut write, mut read) = socket.split();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            frame = read.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Close(close))) => {
                    eprintln!("closed by the server: {close:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err.into()),
                None => return Ok(()),
            },
            line = stdin.next_line() => match line? {
                Some(line) if !line.trim().is_empty() => write.send(Message::text(line)).await?,
                Some(_) => {}
                None => {
                    write.send(Message::Close(None)).await?;
                    return Ok(());
                }
            },
        }
    }
}

/// `pushgate state export` and `pushgate state import`.
fn state_command(command: StateCommand) -> anyhow::Result<()> {
    use pushgate::cluster::backup;
    match command {
        StateCommand::Export { config, output } => {
            let config = Config::load(config.config.as_deref())?;
            let exported = backup::export(&config)?;
            let text = serde_json::to_string_pretty(&exported)?;
            match output {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
            Ok(())
        }
        StateCommand::Import { config, file } => {
            let config = Config::load(config.config.as_deref())?;
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let document: backup::Backup = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a pushgate backup", file.display()))?;
            let imported = backup::import(&config, &document)?;
            println!("{}", serde_json::to_string(&imported)?);
            Ok(())
        }
    }
}

/// Sends one admin API call and prints its JSON answer; an error status
/// becomes an error carrying the node's message.
async fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let plugins = |t: &AdminTarget| {
        format!(
            "{}/admin/v1/tenants/{}/plugins",
            t.node.trim_end_matches('/'),
            t.tenant
        )
    };
    let (target, request) = match &command {
        PluginCommand::Upload {
            target,
            no_activate,
            file,
        } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let url = format!("{}?activate={}", plugins(target), !no_activate);
            (target, http.post(url).body(bytes))
        }
        PluginCommand::List { target } => (target, http.get(plugins(target))),
        PluginCommand::Activate { target, version } => (
            target,
            http.post(format!("{}/{version}/activate", plugins(target))),
        ),
        PluginCommand::Rollback { target } => {
            (target, http.post(format!("{}/rollback", plugins(target))))
        }
        PluginCommand::Remove { target, version } => (
            target,
            http.delete(format!("{}/{version}", plugins(target))),
        ),
        PluginCommand::Canary {
            target,
            version,
            percent,
        } => (
            target,
            http.post(format!("{}/{version}/canary", plugins(target)))
                .json(&serde_json::json!({ "percent": percent })),
        ),
        PluginCommand::EndCanary { target } => {
            (target, http.delete(format!("{}/canary", plugins(target))))
        }
        PluginCommand::Shadow { target, version } => (
            target,
            http.post(format!("{}/{version}/shadow", plugins(target))),
        ),
        PluginCommand::ShadowReport { target } => {
            (target, http.get(format!("{}/shadow", plugins(target))))
        }
        PluginCommand::EndShadow { target } => {
            (target, http.delete(format!("{}/shadow", plugins(target))))
        }
        PluginCommand::Try(_) | PluginCommand::New { .. } => unreachable!("run without a node"),
    };
    let response = request
        .bearer_auth(&target.admin_token)
        .send()
        .await
        .with_context(|| format!("reaching the node at {}", target.node))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        anyhow::bail!("the node answered {status}: {message}");
    }
    if !body.is_null() {
        println!("{}", serde_json::to_string_pretty(&body)?);
    }
    Ok(())
}

/// `pushgate plugin try`: the report as JSON on stdout; the plugin's log
/// lines on stderr.
fn try_plugin(args: TryArgs) -> anyhow::Result<()> {
    use pushgate::plugin::trial::{TrialInput, try_plugin};
    use pushgate::plugin::{CallSettings, Target};
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::new("pushgate=debug"))
        .init();
    let pair = |text: &str, separator: char| -> anyhow::Result<(String, String)> {
        let (key, value) = text
            .split_once(separator)
            .with_context(|| format!("{text:?}: expected key{separator}value"))?;
        Ok((key.trim().to_owned(), value.trim().to_owned()))
    };
    let component =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let input = match args.hook.as_str() {
        "on-publish" => TrialInput::Publish {
            data: args.data,
            target: match (args.topic, args.users) {
                (Some(topic), _) => Target::Topic(topic),
                (None, Some(users)) => Target::Users(users.split(',').map(str::to_owned).collect()),
                (None, None) => Target::Broadcast,
            },
        },
        "on-deliver" => {
            let mut recipients = Vec::new();
            for recipient in &args.recipients {
                let (user, metadata) = recipient.split_once(':').unwrap_or((recipient, ""));
                let metadata = metadata
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(|m| pair(m, '='))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                recipients.push((user.to_owned(), metadata));
            }
            anyhow::ensure!(
                !recipients.is_empty(),
                "on-deliver needs at least one --recipient"
            );
            TrialInput::Deliver {
                data: args.data,
                recipients,
            }
        }
        _ => TrialInput::Authenticate {
            path_and_query: args.request,
            headers: args
                .headers
                .iter()
                .map(|h| pair(h, ':'))
                .collect::<anyhow::Result<_>>()?,
        },
    };
    let settings = CallSettings {
        config: std::sync::Arc::new(
            args.config
                .iter()
                .map(|c| pair(c, '='))
                .collect::<anyhow::Result<_>>()?,
        ),
        max_memory_bytes: args.max_memory_bytes,
        timeout: args.timeout,
        max_output_bytes: args.max_message_bytes,
        canary: Default::default(),
        shadow: Default::default(),
    };
    let report = try_plugin(&component, &input, &settings)?;
    println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    init_logging(&config);
    match raise_open_file_limit() {
        Ok(limit) => tracing::info!(limit, "open-file limit (each connection uses one)"),
        Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let node = Node::start(config).await?;
        let stopping = node.stopping();
        tokio::select! {
            () = shutdown_signal() => {}
            () = stopping => {}
        }
        node.shutdown().await;
        Ok(())
    })
}

/// The RocketMQ client logs its life cycle at `info`, every retry
/// included: it says what matters at `warn`, unless the filter names it.
/// Its local offset store is off on purpose (a (re)started node delivers
/// from the newest message on), which it would report every 5 s.
const QUIET_BUS_CLIENT: &str = "rocketmq_client_rust=warn,rocketmq_transport=warn,\
                                rocketmq_runtime=warn,rocketmq_observability=warn,\
                                rocketmq_client_rust::consumer::store::local_file_offset_store=off";

fn init_logging(config: &Config) {
    let directives = match std::env::var("RUST_LOG") {
        Ok(from_env) => from_env,
        Err(_) => config.log.filter.clone(),
    };
    let directives = if directives.contains("rocketmq") {
        directives
    } else {
        format!("{directives},{QUIET_BUS_CLIENT}")
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|err| {
        eprintln!("log filter {directives:?} is invalid ({err}); using \"info\"");
        EnvFilter::new("info")
    });
    // Colour codes only on a terminal: a file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
}
