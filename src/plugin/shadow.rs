//! Shadow versions: a version that receives the same calls as the active
//! one, on a copy of their input and off the delivery path, and whose
//! verdicts are only compared — never applied.
//!
//! The caller hands the input and the active version's verdict to
//! [`Shadow`], which queues them for one node-wide thread (never a thread
//! that serves clients). Each tenant has a queue of its own, and the thread
//! takes one comparison of each tenant in turn: a tenant whose shadow is
//! slow, or whose traffic is heavy, fills only its own queue and waits only
//! for itself. A full queue skips the comparison (counted): a shadow may
//! see a sample of the traffic, never delay it. A shadow that fails is
//! counted and changes nothing for the tenant.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;
use serde_json::{Value, json};

use super::call::Authenticated;
use super::{
    CallSettings, CompiledPlugin, DeliverVerdict, Handshake, Hook, Message, PluginFailure,
    PublishVerdict, Recipient, Rejection, Target, hex_sha256,
};
use crate::sync::lock;

/// Comparisons of one tenant that may wait for the shadow thread.
const SHADOW_QUEUE: usize = 1_024;
/// Differing samples kept per shadow version, newest first out.
pub const MAX_SAMPLES: usize = 32;
/// Longest message data a sample keeps, in bytes.
const SAMPLE_DATA_BYTES: usize = 2_048;

type Job = Box<dyn FnOnce() + Send>;

/// The node's shadow thread: runs queued comparisons one at a time, one
/// tenant after the other.
#[derive(Clone)]
pub(crate) struct ShadowRunner {
    /// Dropped with the last runner: the thread then ends.
    handle: Arc<RunnerHandle>,
}

/// What the thread and the runners share.
#[derive(Default)]
struct Waiting {
    jobs: Mutex<TenantQueues>,
    ready: Condvar,
}

#[derive(Default)]
struct TenantQueues {
    by_tenant: BTreeMap<Arc<str>, VecDeque<Job>>,
    /// Tenants with comparisons waiting, in the order they take turns.
    turns: VecDeque<Arc<str>>,
    closed: bool,
}

struct RunnerHandle {
    waiting: Arc<Waiting>,
}

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        lock(&self.waiting.jobs).closed = true;
        self.waiting.ready.notify_all();
    }
}

impl ShadowRunner {
    /// Starts the thread; it ends when the last runner is dropped.
    pub(crate) fn start() -> Self {
        let waiting = Arc::new(Waiting::default());
        let shared = waiting.clone();
        std::thread::Builder::new()
            .name("plugin-shadow".to_owned())
            .spawn(move || {
                while let Some(job) = next_job(&shared) {
                    job();
                }
            })
            .expect("spawning the plugin shadow thread");
        Self {
            handle: Arc::new(RunnerHandle { waiting }),
        }
    }

    /// Queues `job` of `tenant`; false if the tenant's queue is full.
    fn queue(&self, tenant: &Arc<str>, job: Job) -> bool {
        let waiting = &self.handle.waiting;
        let mut queues = lock(&waiting.jobs);
        let queue = queues.by_tenant.entry(tenant.clone()).or_default();
        if queue.len() >= SHADOW_QUEUE {
            return false;
        }
        queue.push_back(job);
        if queue.len() == 1 {
            queues.turns.push_back(tenant.clone());
        }
        drop(queues);
        waiting.ready.notify_one();
        true
    }
}

/// The next comparison: the first of the tenant whose turn it is (who then
/// goes to the back of the line if it has more); `None` once closed.
fn next_job(waiting: &Waiting) -> Option<Job> {
    let mut queues = lock(&waiting.jobs);
    loop {
        if queues.closed {
            return None;
        }
        if let Some(tenant) = queues.turns.pop_front() {
            let queue = queues.by_tenant.get_mut(&tenant)?;
            let job = queue.pop_front();
            if queue.is_empty() {
                queues.by_tenant.remove(&tenant);
            } else {
                queues.turns.push_back(tenant);
            }
            if let Some(job) = job {
                return Some(job);
            }
            continue;
        }
        queues = waiting
            .ready
            .wait(queues)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

/// What one version decided, in a form two versions' decisions compare in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "data")]
pub enum Decision {
    Pass,
    Drop,
    Replace(String),
    /// `authenticate` admitted this user.
    Admit(String),
    /// `authenticate` rejected with this status.
    Reject(u16),
}

impl Decision {
    fn passes(&self) -> bool {
        matches!(self, Self::Pass | Self::Replace(_) | Self::Admit(_))
    }

    fn of_publish(verdict: &PublishVerdict) -> Self {
        match verdict {
            PublishVerdict::Pass => Self::Pass,
            PublishVerdict::Drop(_) => Self::Drop,
            PublishVerdict::Replace(data) => Self::Replace(data.clone()),
        }
    }

    fn of_deliver(verdict: &DeliverVerdict) -> Self {
        match verdict {
            DeliverVerdict::Pass => Self::Pass,
            DeliverVerdict::Drop => Self::Drop,
            DeliverVerdict::Replace(data) => Self::Replace(data.clone()),
        }
    }

    fn of_authenticate(verdict: &Result<Authenticated, Rejection>) -> Self {
        match verdict {
            Ok(admitted) => Self::Admit(admitted.identity.user.clone()),
            Err(rejection) => Self::Reject(rejection.status),
        }
    }

    fn redacted(self, redact: bool) -> Self {
        match self {
            Self::Replace(data) if redact => Self::Replace(redacted(&data)),
            Self::Admit(user) if redact => Self::Admit(redacted(&user)),
            other => other,
        }
    }
}

/// How the shadow's decision differs from the active's, as the
/// `pushgate_plugin_shadow_diff_total` label says; `None` if alike.
fn difference(active: &Decision, shadow: &Decision) -> Option<&'static str> {
    match (active.passes(), shadow.passes()) {
        _ if active == shadow => None,
        (true, false) => Some("pass_to_drop"),
        (false, true) => Some("drop_to_pass"),
        // Both dropped (perhaps with another status): alike for clients.
        (false, false) => None,
        (true, true) => Some("replaced_differently"),
    }
}

/// Size and a hash of `text`, instead of it.
fn redacted(text: &str) -> String {
    format!(
        "<{} bytes, sha256 {}>",
        text.len(),
        &hex_sha256(text.as_bytes())[..12]
    )
}

/// `text` as a sample keeps it: redacted, or cut at [`SAMPLE_DATA_BYTES`].
fn kept(text: &str, redact: bool) -> String {
    if redact {
        return redacted(text);
    }
    if text.len() <= SAMPLE_DATA_BYTES {
        return text.to_owned();
    }
    let mut end = SAMPLE_DATA_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One input on which the versions differed.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub hook: &'static str,
    pub kind: &'static str,
    pub input: Value,
    pub active: Decision,
    pub shadow: Decision,
}

/// What a shadow version did, for the admin API (this node's share).
#[derive(Debug, Default, Serialize)]
pub struct ShadowReport {
    /// By hook: `same`, `different`, `shadow_failed`, `active_failed`,
    /// `skipped` (the shadow thread was busy).
    pub calls: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// By hook: `pass_to_drop`, `drop_to_pass`, `replaced_differently`.
    pub differences: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// The latest differing inputs, oldest first.
    pub samples: Vec<Sample>,
}

/// The counts and samples of one shadow version on this node.
#[derive(Default)]
pub(crate) struct ShadowLog {
    counts: Mutex<ShadowReport>,
    samples: Mutex<VecDeque<Sample>>,
}

impl ShadowLog {
    fn count(&self, tenant: &str, hook: Hook, outcome: &'static str, by: u64) {
        *lock(&self.counts)
            .calls
            .entry(hook.name())
            .or_default()
            .entry(outcome)
            .or_default() += by;
        crate::metrics::plugin_shadow_call(tenant, hook.name(), outcome, by);
    }

    fn differed(&self, tenant: &str, hook: Hook, kind: &'static str) {
        *lock(&self.counts)
            .differences
            .entry(hook.name())
            .or_default()
            .entry(kind)
            .or_default() += 1;
        crate::metrics::plugin_shadow_diff(tenant, hook.name(), kind);
    }

    fn keep(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The counts and samples so far.
    pub(crate) fn report(&self) -> ShadowReport {
        let counts = lock(&self.counts);
        ShadowReport {
            calls: counts.calls.clone(),
            differences: counts.differences.clone(),
            samples: lock(&self.samples).iter().cloned().collect(),
        }
    }
}

/// A tenant's shadow version, as a hook's callers see it.
#[derive(Clone)]
pub struct Shadow {
    pub(crate) plugin: Arc<CompiledPlugin>,
    pub(crate) log: Arc<ShadowLog>,
    pub(crate) runner: ShadowRunner,
}

impl Shadow {
    /// Queues `work` for the shadow thread; counts it `skipped` if full.
    fn queue(&self, hook: Hook, calls: u64, work: impl FnOnce() + Send + 'static) {
        if !self.runner.queue(&self.plugin.tenant, Box::new(work)) {
            self.log.count(&self.plugin.tenant, hook, "skipped", calls);
        }
    }

    /// Compares `on-publish` of `message` with the active's `verdict`.
    pub fn on_publish(
        &self,
        settings: &CallSettings,
        message: &Message,
        verdict: &Result<PublishVerdict, PluginFailure>,
    ) {
        let verdict = verdict.as_ref().map(Decision::of_publish);
        self.compare_later(
            Hook::OnPublish,
            settings,
            verdict,
            message.clone(),
            |plugin, settings, message| {
                let verdict = plugin.on_publish(settings, message)?;
                Ok(Decision::of_publish(&verdict))
            },
            |message, redact| {
                json!({
                    "id": message.id,
                    "target": target_json(&message.target, redact),
                    "data": kept(&message.data, redact),
                })
            },
        );
    }

    /// Queues one call of the shadow on `input` and its comparison with
    /// the active's `verdict`; a sample describes `input` with `describe`.
    fn compare_later<I: Send + 'static>(
        &self,
        hook: Hook,
        settings: &CallSettings,
        verdict: Result<Decision, &PluginFailure>,
        input: I,
        call: fn(&CompiledPlugin, &CallSettings, &I) -> Result<Decision, PluginFailure>,
        describe: fn(&I, bool) -> Value,
    ) {
        let Ok(active) = verdict else {
            return self.active_failed(hook, 1);
        };
        let (shadow, settings) = (self.clone(), settings.clone());
        self.queue(hook, 1, move || {
            let outcome = call(&shadow.plugin, &settings, &input);
            let redact = settings.shadow.redact_samples;
            shadow.compare(hook, active, outcome, redact, |redact| {
                describe(&input, redact)
            });
        });
    }

    /// Compares `on-deliver` of one batch with the active's `verdicts`.
    pub fn on_deliver(
        &self,
        settings: &CallSettings,
        message: &Message,
        profiles: Vec<Vec<(String, String)>>,
        recipients: Vec<Recipient>,
        verdicts: &Result<Vec<DeliverVerdict>, PluginFailure>,
    ) {
        let calls = recipients.len() as u64;
        let Ok(verdicts) = verdicts else {
            return self.active_failed(Hook::OnDeliver, calls);
        };
        let active: Vec<Decision> = verdicts.iter().map(Decision::of_deliver).collect();
        let (shadow, settings, message) = (self.clone(), settings.clone(), message.clone());
        self.queue(Hook::OnDeliver, calls, move || {
            let outcome = shadow
                .plugin
                .on_deliver(&settings, &message, &profiles, &recipients);
            let tenant = &shadow.plugin.tenant;
            let outcome = match outcome {
                Ok(verdicts) => verdicts,
                Err(_) => {
                    return shadow
                        .log
                        .count(tenant, Hook::OnDeliver, "shadow_failed", calls);
                }
            };
            for ((active, verdict), recipient) in active.into_iter().zip(&outcome).zip(&recipients)
            {
                let decision = Decision::of_deliver(verdict);
                shadow.compare(
                    Hook::OnDeliver,
                    active,
                    Ok(decision),
                    settings.shadow.redact_samples,
                    |redact| {
                        json!({
                            "id": message.id,
                            "target": target_json(&message.target, redact),
                            "data": kept(&message.data, redact),
                            "recipient": kept(&recipient.user, redact),
                        })
                    },
                );
            }
        });
    }

    /// Compares `authenticate` of `handshake` with the active's `verdict`.
    /// Samples keep the path and header names, never the query or a
    /// header's value (credentials travel there).
    pub fn authenticate(
        &self,
        settings: &CallSettings,
        handshake: &Handshake,
        verdict: &Result<Result<Authenticated, Rejection>, PluginFailure>,
    ) {
        let verdict = verdict.as_ref().map(Decision::of_authenticate);
        self.compare_later(
            Hook::Authenticate,
            settings,
            verdict,
            handshake.clone(),
            |plugin, settings, handshake| {
                let verdict = plugin.authenticate(settings, handshake)?;
                Ok(Decision::of_authenticate(&verdict))
            },
            |handshake, _| {
                json!({
                    "path": handshake.path,
                    "headers": handshake.headers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
                })
            },
        );
    }

    fn active_failed(&self, hook: Hook, calls: u64) {
        self.log
            .count(&self.plugin.tenant, hook, "active_failed", calls);
    }

    /// Counts one comparison and keeps a sample of a difference.
    fn compare(
        &self,
        hook: Hook,
        active: Decision,
        shadow: Result<Decision, PluginFailure>,
        redact: bool,
        input: impl FnOnce(bool) -> Value,
    ) {
        let tenant = &self.plugin.tenant;
        let Ok(shadow) = shadow else {
            return self.log.count(tenant, hook, "shadow_failed", 1);
        };
        let Some(kind) = difference(&active, &shadow) else {
            return self.log.count(tenant, hook, "same", 1);
        };
        self.log.count(tenant, hook, "different", 1);
        self.log.differed(tenant, hook, kind);
        self.log.keep(Sample {
            at_ms: crate::clock::now_micros() / 1000,
            hook: hook.name(),
            kind,
            input: input(redact),
            active: active.redacted(redact),
            shadow: shadow.redacted(redact),
        });
    }
}

fn target_json(target: &Target, redact: bool) -> Value {
    match target {
        Target::Users(users) => {
            json!({"users": users.iter().map(|u| kept(u, redact)).collect::<Vec<_>>()})
        }
        // A topic may name a user (`orders.ann`): redacted like the rest.
        Target::Topic(topic) => json!({ "topic": kept(topic, redact) }),
        Target::Broadcast => json!("broadcast"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_named_by_what_clients_would_see() {
        use Decision::*;
        assert_eq!(difference(&Pass, &Pass), None);
        assert_eq!(difference(&Pass, &Drop), Some("pass_to_drop"));
        assert_eq!(
            difference(&Replace("x".into()), &Drop),
            Some("pass_to_drop")
        );
        assert_eq!(
            difference(&Drop, &Replace("x".into())),
            Some("drop_to_pass")
        );
        assert_eq!(
            difference(&Pass, &Replace("x".into())),
            Some("replaced_differently")
        );
        assert_eq!(
            difference(&Replace("x".into()), &Replace("y".into())),
            Some("replaced_differently")
        );
        assert_eq!(difference(&Reject(401), &Reject(403)), None);
        assert_eq!(
            difference(&Admit("a".into()), &Reject(401)),
            Some("pass_to_drop")
        );
        assert_eq!(
            difference(&Admit("a".into()), &Admit("b".into())),
            Some("replaced_differently")
        );
    }

    #[test]
    fn each_tenant_takes_its_turn_however_many_comparisons_another_queued() {
        let runner = ShadowRunner::start();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let (gate, wait_at_gate) = std::sync::mpsc::channel::<()>();
        let busy: Arc<str> = Arc::from("busy");
        let quiet: Arc<str> = Arc::from("quiet");
        assert!(runner.queue(
            &busy,
            Box::new(move || {
                let _ = wait_at_gate.recv();
            })
        ));
        for _ in 0..200 {
            let ran = ran.clone();
            assert!(runner.queue(&busy, Box::new(move || lock(&ran).push("busy"))));
        }
        let (done, finished) = std::sync::mpsc::channel();
        let quiet_ran = ran.clone();
        assert!(runner.queue(
            &quiet,
            Box::new(move || {
                lock(&quiet_ran).push("quiet");
                let _ = done.send(());
            })
        ));
        gate.send(()).unwrap();
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the quiet tenant's comparison ran");
        let ran = lock(&ran);
        let at = ran.iter().position(|t| *t == "quiet").unwrap();
        assert!(
            at <= 1,
            "the quiet tenant waited for {at} of the busy one's"
        );
    }

    #[test]
    fn redacted_samples_name_no_user_in_a_topic() {
        let target = target_json(&Target::Topic("orders.ann".into()), true);
        assert!(!target.to_string().contains("ann"), "{target}");
        let target = target_json(&Target::Topic("orders.ann".into()), false);
        assert_eq!(target["topic"], "orders.ann");
    }

    #[test]
    fn redacted_samples_keep_no_data() {
        let sample = kept("the secret plan", true);
        assert!(!sample.contains("secret"), "{sample}");
        assert!(sample.starts_with("<15 bytes, sha256 "), "{sample}");
        let long = "é".repeat(SAMPLE_DATA_BYTES);
        assert!(kept(&long, false).len() <= SAMPLE_DATA_BYTES + '…'.len_utf8());
    }
}
