//! pushgate: a real-time WebSocket push gateway that tenants program with
//! WebAssembly.
//!
//! Business services push through an HTTP API on the internal listener;
//! browsers and apps hold WebSocket connections on the public listener; a
//! bus carries every message to the dispatcher of every node, which queues
//! it to the connections that node holds. See `README.md` for the tour.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod envelope;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod ops;
pub mod plugin;
pub mod push;
pub mod server;
pub mod session;
pub mod tenant;
pub mod tls;
pub mod ws;

pub use config::Config;
pub use server::Node;
