//! What a plugin instance lives with: its state as the host functions see
//! it (tenant, configuration, limits, the lines it logs and prints), and
//! the epoch clock that bounds every call's time. The engine
//! ([`super::host`]) links and compiles with them; a compiled version
//! ([`super::call`]) instantiates and calls with them.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use wasmtime::Engine;

use super::limits::{MAX_LOG_LINE_BYTES, PluginLimits, truncated};
use crate::clock::now_micros;
use crate::sync::lock;

/// How often the epoch advances: the resolution of call time limits.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// What a plugin's instance sees of the gateway.
pub(super) struct PluginState {
    pub(super) tenant: Arc<str>,
    pub(super) config: Arc<BTreeMap<String, String>>,
    pub(super) limits: PluginLimits,
    /// What `authenticate` said of its credentials' expiry, this call.
    pub(super) session_expires_at_millis: Option<u64>,
    /// What the plugin printed this call and has not ended with a newline.
    pub(super) printed: Vec<u8>,
}

impl PluginState {
    /// Logs one line as the plugin's, within its budget of lines per call:
    /// bounded and escaped, so that a plugin can neither flood the node's
    /// log nor forge lines in it.
    fn log_line(&mut self, level: super::pushgate::plugin::host::Level, message: &str) {
        use super::pushgate::plugin::host::Level;
        let tenant = &*self.tenant;
        if self.limits.log_lines_left == 0 {
            ::metrics::counter!(crate::metrics::PLUGIN_LOGS_DROPPED, "tenant" => tenant.to_owned())
                .increment(1);
            return;
        }
        self.limits.log_lines_left -= 1;
        // Debug formatting escapes newlines and control characters.
        let line = truncated(message, MAX_LOG_LINE_BYTES);
        match level {
            Level::Debug => tracing::debug!(tenant, plugin_log = ?line),
            Level::Info => tracing::info!(tenant, plugin_log = ?line),
            Level::Warn => tracing::warn!(tenant, plugin_log = ?line),
            Level::Error => tracing::error!(tenant, plugin_log = ?line),
        }
    }

    /// Takes what the plugin printed: each whole line is logged (as a
    /// warning: printing is what a panic does); a rest without a newline
    /// waits for more, unless `all`.
    pub(super) fn log_printed(&mut self, all: bool) {
        while let Some(end) = self.printed.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.printed.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            if !text.trim().is_empty() {
                self.log_line(super::pushgate::plugin::host::Level::Warn, &text);
            }
        }
        if all && !self.printed.is_empty() {
            let rest = std::mem::take(&mut self.printed);
            let text = String::from_utf8_lossy(&rest).into_owned();
            self.log_line(super::pushgate::plugin::host::Level::Warn, &text);
        }
    }

    /// Keeps printed `bytes`, at most a few lines' worth between newlines.
    pub(super) fn print(&mut self, bytes: impl IntoIterator<Item = u8>) {
        for byte in bytes {
            if self.printed.len() < MAX_LOG_LINE_BYTES || byte == b'\n' {
                self.printed.push(byte);
            }
        }
        self.log_printed(false);
    }
}

impl super::pushgate::plugin::types::Host for PluginState {}

impl super::pushgate::plugin::host::Host for PluginState {
    fn log(&mut self, level: super::pushgate::plugin::host::Level, message: String) {
        self.log_line(level, &message);
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn now_millis(&mut self) -> u64 {
        now_micros() / 1000
    }

    fn session_expires_at(&mut self, unix_millis: u64) {
        self.session_expires_at_millis = Some(unix_millis);
    }
}

/// The engine and its epoch clock, which ticks only while a call runs: an
/// idle node (or one without plugins) wakes up for nothing.
#[derive(Clone)]
pub(super) struct EpochClock {
    pub(super) engine: Engine,
    running: Arc<Running>,
}

/// Calls (and instantiations) running now, and a wake-up for the ticker.
#[derive(Default)]
struct Running {
    count: Mutex<usize>,
    started: Condvar,
}

/// Keeps the epoch ticking while it lives.
pub(super) struct Ticking(Arc<Running>);

impl Drop for Ticking {
    fn drop(&mut self) {
        *lock(&self.0.count) -= 1;
    }
}

impl EpochClock {
    /// The epoch advances until the guard is dropped.
    pub(super) fn ticking(&self) -> Ticking {
        *lock(&self.running.count) += 1;
        self.running.started.notify_one();
        Ticking(self.running.clone())
    }
}

/// How long the ticker sleeps between checks that its engine still exists
/// while no call runs.
const IDLE_CHECK: Duration = Duration::from_secs(60);

impl EpochClock {
    /// Starts the epoch ticker of `engine`: a plain thread, so that time
    /// limits hold however busy the async runtime is. It ticks every
    /// [`EPOCH_TICK`] while a call runs and sleeps otherwise; it ends once
    /// the engine is gone.
    pub(super) fn start(engine: Engine) -> wasmtime::Result<Self> {
        let running = Arc::new(Running::default());
        let ticker = engine.weak();
        let calls = running.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".to_owned())
            .spawn(move || {
                loop {
                    {
                        let mut count = lock(&calls.count);
                        while *count == 0 {
                            count = calls
                                .started
                                .wait_timeout(count, IDLE_CHECK)
                                .unwrap_or_else(|poisoned| poisoned.into_inner())
                                .0;
                            if ticker.upgrade().is_none() {
                                return;
                            }
                        }
                    }
                    let Some(engine) = ticker.upgrade() else {
                        return;
                    };
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(wasmtime::Error::new)?;
        Ok(Self { engine, running })
    }
}
