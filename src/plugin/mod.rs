//! The WebAssembly plugin host: one wasmtime engine per process, each
//! uploaded plugin version validated and compiled once, pre-linked, and run
//! from a small pool of reused instances under memory and time limits.
//!
//! A plugin is a component of the `pushgate:plugin@0.1` package (`wit/`):
//! one built against any 0.1.x is served (wasmtime matches its imports and
//! exports to this host's 0.1.1 by semver).
//! It may import only `pushgate:plugin/host` (log, its tenant's plugin
//! configuration, the clock) and the WASI command-line and I/O interfaces
//! that a language's standard library links for printing and exit: what
//! is printed (a Rust panic's message among it) goes to the node's log as
//! the plugin's lines, any other function of those interfaces stops the
//! call with a clear error. Anything else — a filesystem, sockets, HTTP —
//! is refused at upload.
//!
//! Knows nothing of sockets or the bus: callers hand it a hook's input and
//! get the plugin's verdict, or a [`PluginFailure`] to apply the tenant's
//! failure policy to.

//!
//! - [`host`]: the engine, validation and compilation of an upload.
//! - [`call`]: a compiled version, its pool of warm instances, the calls
//!   and their limits.
//! - [`limits`]: what one instance may take and what a plugin may hand back.
//! - [`breaker`]: a hook that keeps failing is skipped for a while.
//! - [`registry`]: each tenant's versions, the active one, the store.
//! - [`rollout`]: canary versions — who they serve, and when they are
//!   rolled back.
//! - [`shadow`]: shadow versions, compared with the active one off the
//!   delivery path.
//! - [`trial`]: one hook of a component run outside any node
//!   (`pushgate plugin try`).
//! - [`scaffold`]: a plugin crate of its own (`pushgate plugin new`).

mod breaker;
pub mod call;
pub mod host;
mod instance;
pub mod limits;
pub mod registry;
pub mod rollout;
pub mod scaffold;
pub mod shadow;
pub mod trial;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use call::{Authenticated, CompiledPlugin};
pub use host::PluginHost;

/// The version of the WIT package (`wit/`) this host speaks, in one place.
macro_rules! wit_version {
    () => {
        "0.1.1"
    };
}

wasmtime::component::bindgen!({
    world: "plugin",
    path: "wit",
});

pub use exports::pushgate::plugin::{authenticate, on_deliver, on_publish};
pub use pushgate::plugin::types::{
    DeliverVerdict, Handshake, Header, Identity, Message, PublishVerdict, Recipient, Rejection,
    Target,
};

/// The version of the WIT package this host speaks.
pub const WIT_VERSION: &str = wit_version!();
/// The WIT package this host speaks, with its version.
pub const WIT_PACKAGE: &str = concat!("pushgate:plugin@", wit_version!());

/// One hook of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Authenticate = 0,
    OnPublish = 1,
    OnDeliver = 2,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Authenticate, Hook::OnPublish, Hook::OnDeliver];

    /// The hook's name, as in the WIT package and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Authenticate => "authenticate",
            Self::OnPublish => "on-publish",
            Self::OnDeliver => "on-deliver",
        }
    }

    fn export_name(self) -> String {
        format!("pushgate:plugin/{}@{WIT_VERSION}", self.name())
    }
}

/// Why an upload was refused; the message says why, for the uploader.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPlugin(pub String);

/// True if `import` names `interface` of a WIT package version this host
/// is compatible with (the same major and minor version).
fn speaks_our_wit(import: &str, interface: &str) -> bool {
    let compatible = WIT_VERSION
        .rsplit_once('.')
        .map_or(WIT_VERSION, |(major_minor, _)| major_minor);
    import
        .strip_prefix("pushgate:plugin/")
        .and_then(|rest| rest.strip_prefix(interface))
        .and_then(|rest| rest.strip_prefix('@'))
        .is_some_and(|version| {
            version == compatible || version.starts_with(&format!("{compatible}."))
        })
}

/// Why a call did not produce a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginFailure {
    /// The plugin trapped (a panic, an unreachable, a trapping import).
    Trap,
    /// It ran past the tenant's time limit.
    Timeout,
    /// It tried to grow its memory past the tenant's limit.
    Memory,
    /// It failed too often lately and is skipped for a while.
    Tripped,
    /// It returned something unusable (e.g. data that is not JSON).
    BadOutput,
}

impl PluginFailure {
    /// The `outcome` label of the plugin-call metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::Tripped => "tripped",
            Self::BadOutput => "bad_output",
        }
    }
}

/// Limits and configuration a call runs with (from the tenant's settings).
#[derive(Debug, Clone)]
pub struct CallSettings {
    pub config: Arc<BTreeMap<String, String>>,
    pub max_memory_bytes: usize,
    pub timeout: Duration,
    /// Largest data a replacement may carry (the tenant's
    /// `max_message_bytes`).
    pub max_output_bytes: usize,
    /// When this version, as a canary, is rolled back.
    pub canary: crate::config::CanaryPolicy,
    /// What this version's differing samples keep, as a shadow.
    pub shadow: crate::config::ShadowPolicy,
}

/// True if `text` is a version as [`hex_sha256`] writes it.
pub fn is_version(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The plugin version: hex SHA-256 of its bytes.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first 12 hex digits of a version, for labels and logs.
pub fn short(version: &str) -> &str {
    &version[..version.len().min(12)]
}
