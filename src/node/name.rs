//! This node's name in the cluster.

use std::net::SocketAddr;

use crate::config::Config;

/// This node's name in the cluster: `bus.rocketmq.instance_name`, or the
/// host name and the internal port, which are unique on a network and
/// stable across restarts.
pub(super) fn instance_name(config: &Config, internal: SocketAddr) -> String {
    if let Some(name) = &config.bus.rocketmq.instance_name {
        return name.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let host = if host.is_empty() {
        "pushgate".to_owned()
    } else {
        host
    };
    format!("{host}-{}", internal.port())
}
