//! The `pushgate` binary: parses the command line, sets up logging and runs
//! a node until SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pushgate::config::{Config, LogFormat};
use pushgate::server::{Node, raise_open_file_limit};
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
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(())
        }
    }
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

fn init_logging(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
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
