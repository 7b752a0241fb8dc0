//! Whether the RocketMQ engine carries messages right now, and why not.
//!
//! One state, under one lock, changed by the client thread (connecting,
//! sends, this node's own probes coming back) and read by `/readyz` and by
//! publishers. Transitions are logged once and counted in metrics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bus::BusStatus;
use crate::metrics;
use crate::sync::lock;

#[derive(Debug)]
struct State {
    /// Why the engine is not running yet (`None` once it runs).
    connecting: Option<String>,
    /// The last send error, until a send succeeds again.
    send_failing: Option<String>,
    /// When this node's own probe last came back.
    own_probe: Option<Instant>,
    stopping: bool,
    /// Ready at the last observation.
    was_ready: bool,
    /// Ready at any observation so far: becoming ready again is a reconnect.
    ever_ready: bool,
    /// When sends succeeded again after failing (the broker is back),
    /// until this node's consumer received one of its probes since.
    sends_recovered_at: Option<Instant>,
}

/// How soon after the broker is back this node's consumer must receive
/// again (its probes go out every heartbeat, and come back within
/// milliseconds) before it counts as stuck.
pub(super) const RECEIVE_AFTER_RECOVERY: Duration = Duration::from_secs(1);

/// The engine's readiness.
#[derive(Debug)]
pub(super) struct Readiness {
    state: Mutex<State>,
    /// How long after this node's last probe came back the consumer still
    /// counts as receiving.
    fresh_for: Duration,
    instance: String,
}

impl Readiness {
    /// Not ready: connecting.
    pub(super) fn new(instance: &str, fresh_for: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                connecting: Some("connecting to RocketMQ".to_owned()),
                send_failing: None,
                own_probe: None,
                stopping: false,
                was_ready: false,
                ever_ready: false,
                sends_recovered_at: None,
            }),
            fresh_for,
            instance: instance.to_owned(),
        }
    }

    /// Not running, for `reason`.
    pub(super) fn connecting(&self, reason: String) {
        lock(&self.state).connecting = Some(reason);
    }

    /// Producer and consumer run.
    pub(super) fn connected(&self) {
        lock(&self.state).connecting = None;
    }

    /// The engine is stopping: nothing more is sent.
    pub(super) fn stopping(&self) {
        lock(&self.state).stopping = true;
    }

    /// A send succeeded (`Ok`) or failed with this error. True if sends
    /// succeed again after failing.
    pub(super) fn sent(&self, result: Result<(), &str>) -> bool {
        let recovered = {
            let mut state = lock(&self.state);
            let failing = result.err().map(str::to_owned);
            let recovered = state.send_failing.is_some() && failing.is_none();
            state.send_failing = failing;
            if recovered {
                state.sends_recovered_at = Some(Instant::now());
            }
            recovered
        };
        self.observe();
        recovered
    }

    /// This node's own probe came back through its consumer.
    pub(super) fn own_probe_received(&self) {
        let mut state = lock(&self.state);
        state.own_probe = Some(Instant::now());
        state.sends_recovered_at = None;
        drop(state);
        self.observe();
    }

    /// Whether this node's own probe came back after `at`.
    pub(super) fn own_probe_since(&self, at: Instant) -> bool {
        lock(&self.state).own_probe.is_some_and(|seen| seen > at)
    }

    /// True once this node's consumer received one of its probes.
    pub(super) fn has_received_own_probe(&self) -> bool {
        lock(&self.state).own_probe.is_some()
    }

    /// Not ready only for reasons that make a send pointless right away.
    pub(super) fn send_status(&self) -> BusStatus {
        let state = lock(&self.state);
        if state.stopping {
            return BusStatus::NotReady("the bus is stopping".to_owned());
        }
        match &state.connecting {
            Some(reason) => BusStatus::NotReady(reason.clone()),
            None => BusStatus::Ready,
        }
    }

    /// True if the consumer received this node's probes before but none
    /// lately while sends succeed — or none within
    /// [`RECEIVE_AFTER_RECOVERY`] of the broker coming back: the consumer,
    /// not the broker, is stuck.
    pub(super) fn consumer_stalled(&self) -> bool {
        let state = lock(&self.state);
        let running = state.connecting.is_none() && !state.stopping;
        let sending = state.send_failing.is_none();
        let silent = state
            .own_probe
            .is_some_and(|at| at.elapsed() > self.fresh_for);
        let silent_since_recovery = state
            .sends_recovered_at
            .is_some_and(|at| at.elapsed() > RECEIVE_AFTER_RECOVERY);
        running && sending && (silent || silent_since_recovery)
    }

    /// Why the engine is not connected, if it is not.
    pub(super) fn not_connected(&self) -> Option<String> {
        lock(&self.state).connecting.clone()
    }

    /// Ready, or why not.
    pub(super) fn status(&self) -> BusStatus {
        let state = lock(&self.state);
        if state.stopping {
            return BusStatus::NotReady("the bus is stopping".to_owned());
        }
        if let Some(reason) = &state.connecting {
            return BusStatus::NotReady(reason.clone());
        }
        if let Some(err) = &state.send_failing {
            return BusStatus::NotReady(format!("publishing to RocketMQ fails: {err}"));
        }
        match state.own_probe {
            None => BusStatus::NotReady(
                "waiting for this node's consumer to receive its first message".to_owned(),
            ),
            Some(at) if at.elapsed() > self.fresh_for => BusStatus::NotReady(format!(
                "this node's consumer received nothing for {:.1}s",
                at.elapsed().as_secs_f64()
            )),
            Some(_) => BusStatus::Ready,
        }
    }

    /// Updates the readiness metrics; logs a change and counts a recovery.
    pub(super) fn observe(&self) {
        let status = self.status();
        let ready = status == BusStatus::Ready;
        ::metrics::gauge!(metrics::BUS_READY).set(if ready { 1.0 } else { 0.0 });
        let (before, ever) = {
            let mut state = lock(&self.state);
            let before = std::mem::replace(&mut state.was_ready, ready);
            let ever = state.ever_ready;
            state.ever_ready |= ready;
            (before, ever)
        };
        if ready && !before {
            if ever {
                ::metrics::counter!(metrics::BUS_RECONNECTS).increment(1);
                tracing::info!("bus ready again");
            } else {
                tracing::info!(instance = %self.instance, "bus ready: this node receives its own messages");
            }
        } else if !ready
            && before
            && let BusStatus::NotReady(reason) = status
        {
            tracing::warn!(%reason, "bus not ready");
        }
    }
}
