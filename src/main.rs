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
}

/// Where the node's admin API is and how to authenticate to it.
#[derive(clap::Args)]
struct AdminTarget {
    /// The node's internal listener.
    #[arg(long, env = "PUSHGATE_NODE", default_value = "http://127.0.0.1:8081")]
    node: String,
    /// The node's `admin.token`.
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
        Command::Plugin(command) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(plugin_command(command))
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
