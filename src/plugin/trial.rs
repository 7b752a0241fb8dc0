//! One hook of a component run outside any node, in the same sandbox and
//! under the same limits as on a node: what `pushgate plugin try` prints,
//! so that a plugin author sees a verdict, its time and its memory before
//! uploading anything.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{
    CallSettings, CompiledPlugin, DeliverVerdict, Handshake, Header, Hook, InvalidPlugin, Message,
    PluginFailure, PluginHost, PublishVerdict, Recipient, Target,
};

/// What to call the hook with.
pub enum TrialInput {
    /// `on-publish` of a message with this JSON `data`, to `target`.
    Publish { data: String, target: Target },
    /// `on-deliver` of a message with this JSON `data` to these recipients
    /// (user and session metadata).
    Deliver {
        data: String,
        recipients: Vec<(String, Vec<(String, String)>)>,
    },
    /// `authenticate` of a handshake to `path_and_query` with `headers`.
    Authenticate {
        path_and_query: String,
        headers: Vec<(String, String)>,
    },
}

/// What came of the call.
#[derive(Debug)]
pub struct TrialReport {
    /// The hooks the component exports.
    pub hooks: Vec<Hook>,
    pub compiled_in: Duration,
    /// The first call: an instance is made for it.
    pub first_call: Duration,
    /// A second, identical call on the warm instance.
    pub warm_call: Duration,
    /// Linear memory the instance holds after the call.
    pub memory_bytes: usize,
    /// The verdict (or the failure), as JSON.
    pub outcome: Value,
}

impl TrialReport {
    /// The report as `pushgate plugin try` prints it and the console shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "hooks": self.hooks.iter().map(|h| h.name()).collect::<Vec<_>>(),
            "compiled_ms": self.compiled_in.as_secs_f64() * 1e3,
            "first_call_ms": self.first_call.as_secs_f64() * 1e3,
            "warm_call_us": self.warm_call.as_secs_f64() * 1e6,
            "memory_bytes": self.memory_bytes,
            "outcome": self.outcome,
        })
    }
}

/// Why the hook was not called (a call that fails is a report, not this).
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("cannot start the engine: {0:#}")]
    Engine(#[source] wasmtime::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidPlugin),
    #[error("the component does not export {hook}; it exports {exported:?}")]
    NoSuchHook {
        hook: &'static str,
        exported: Vec<&'static str>,
    },
}

/// Compiles `component` as an upload would be, then calls the hook `input`
/// names twice under `settings`.
pub fn try_plugin(
    component: &[u8],
    input: &TrialInput,
    settings: &CallSettings,
) -> Result<TrialReport, TrialError> {
    let host = PluginHost::new().map_err(TrialError::Engine)?;
    let started = Instant::now();
    let plugin = host.compile("trial", component)?;
    let compiled_in = started.elapsed();
    try_compiled(&plugin, compiled_in, input, settings)
}

/// Calls the hook `input` names twice on `plugin` (a version a node already
/// compiled: [`CompiledPlugin::for_trial`]) under `settings`.
pub fn try_compiled(
    plugin: &CompiledPlugin,
    compiled_in: Duration,
    input: &TrialInput,
    settings: &CallSettings,
) -> Result<TrialReport, TrialError> {
    let hook = match input {
        TrialInput::Publish { .. } => Hook::OnPublish,
        TrialInput::Deliver { .. } => Hook::OnDeliver,
        TrialInput::Authenticate { .. } => Hook::Authenticate,
    };
    if !plugin.has(hook) {
        return Err(TrialError::NoSuchHook {
            hook: hook.name(),
            exported: plugin.hooks.iter().map(|h| h.name()).collect(),
        });
    }
    let call = || -> Value {
        match input {
            TrialInput::Publish { data, target } => {
                let message = message(data, target.clone());
                match plugin.on_publish(settings, &message) {
                    Ok(PublishVerdict::Pass) => json!({"verdict": "pass"}),
                    Ok(PublishVerdict::Drop(reason)) => {
                        json!({"verdict": "drop", "reason": reason})
                    }
                    Ok(PublishVerdict::Replace(data)) => {
                        json!({"verdict": "replace", "data": as_json(&data)})
                    }
                    Err(failure) => failed(failure),
                }
            }
            TrialInput::Deliver { data, recipients } => {
                let message = message(data, Target::Broadcast);
                let profiles: Vec<Vec<(String, String)>> =
                    recipients.iter().map(|(_, m)| m.clone()).collect();
                let list: Vec<Recipient> = recipients
                    .iter()
                    .enumerate()
                    .map(|(i, (user, _))| Recipient {
                        user: user.clone(),
                        profile: i as u32,
                    })
                    .collect();
                match plugin.on_deliver(settings, &message, &profiles, &list) {
                    Ok(verdicts) => Value::Array(
                        recipients
                            .iter()
                            .zip(verdicts)
                            .map(|((user, _), verdict)| match verdict {
                                DeliverVerdict::Pass => json!({"user": user, "verdict": "pass"}),
                                DeliverVerdict::Drop => json!({"user": user, "verdict": "drop"}),
                                DeliverVerdict::Replace(data) => {
                                    json!({"user": user, "verdict": "replace", "data": as_json(&data)})
                                }
                            })
                            .collect(),
                    ),
                    Err(failure) => failed(failure),
                }
            }
            TrialInput::Authenticate {
                path_and_query,
                headers,
            } => {
                let (path, query) = path_and_query
                    .split_once('?')
                    .unwrap_or((path_and_query, ""));
                let request = Handshake {
                    path: path.to_owned(),
                    query: query.to_owned(),
                    headers: headers
                        .iter()
                        .map(|(name, value)| Header {
                            name: name.to_ascii_lowercase(),
                            value: value.clone(),
                        })
                        .collect(),
                    remote_address: "127.0.0.1:50000".to_owned(),
                };
                match plugin.authenticate(settings, &request) {
                    Ok(Ok(admitted)) => json!({
                        "verdict": "admit",
                        "user": admitted.identity.user,
                        "topics": admitted.identity.topics,
                        "metadata": admitted.identity.metadata,
                        "expires_at_ms": admitted.expires_at_millis,
                    }),
                    Ok(Err(rejection)) => json!({
                        "verdict": "reject",
                        "status": rejection.status,
                        "reason": rejection.reason,
                    }),
                    Err(failure) => failed(failure),
                }
            }
        }
    };
    let started = Instant::now();
    let outcome = call();
    let first_call = started.elapsed();
    let started = Instant::now();
    call();
    let warm_call = started.elapsed();
    Ok(TrialReport {
        hooks: plugin.hooks.clone(),
        compiled_in,
        first_call,
        warm_call,
        memory_bytes: plugin.warm_memory(),
        outcome,
    })
}

fn message(data: &str, target: Target) -> Message {
    Message {
        id: "00000000-0000-7000-8000-000000000000".to_owned(),
        tenant: "trial".to_owned(),
        target,
        data: data.to_owned(),
    }
}

/// The data as JSON if it is, else as the text it is (a node refuses it).
fn as_json(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|_| json!({"not_json": data}))
}

fn failed(failure: PluginFailure) -> Value {
    json!({"failure": failure.label()})
}
