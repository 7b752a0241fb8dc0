//! pushgate: a real-time WebSocket push gateway that tenants program with
//! WebAssembly.
//!
//! Business services push through an HTTP API on the internal listener;
//! browsers and apps hold WebSocket connections on the public listener; a
//! bus carries every message to the dispatcher of every node, which queues
//! it to the connections that node holds. See `README.md` for the tour.
//!
//! The parts, each a folder whose top comment says what it owns and what
//! it must not know:
//!
//! - [`config`]: the configuration's shape and named defaults.
//! - [`node`]: wiring, start order and the one shutdown sequence.
//! - `edge`: listeners, the WebSocket endpoint, the push, admin and
//!   operations APIs.
//! - `tenant`: the tenant directory, limits, authenticators, identity.
//! - `delivery`: the local session index, outbound queues, the dispatcher.
//! - [`cluster`]: the one place changes are applied, other nodes'
//!   connections, the per-user cap across nodes.
//! - [`bus`]: the bus trait, the wire format and the engines.
//! - [`plugin`]: the WebAssembly host, its limits and the registry.
//! - `metrics`: metric names and the exporter.
//! - `pusher`: the Pusher Channels protocol's channels, signatures and
//!   webhooks, for tenants that serve a Pusher app.
#![forbid(unsafe_code)]

pub mod bus;
mod clock;
pub mod cluster;
pub mod config;
pub(crate) mod delivery;
mod durable;
pub(crate) mod edge;
#[cfg(test)]
mod fuzzing;
mod log_budget;
pub(crate) mod metrics;
pub mod node;
pub mod plugin;
pub(crate) mod pusher;
mod stable_hash;
mod sync;
pub(crate) mod tenant;

pub use config::Config;
pub use delivery::{ConnectionHandle, SessionManager};
pub use node::{Node, StartError};
pub use plugin::registry::PluginRegistry;
