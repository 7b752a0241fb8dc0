//! Measures what plugins cost: the per-recipient cost of a trivial
//! `on-deliver` filter in batches of 1, 100 and 1000 recipients, a trivial
//! `on-publish` call, a `jwt-auth` call, and the WebSocket handshake
//! latency a jwt-auth plugin adds over the built-in development
//! authenticator, on a real node over loopback; and the keyword filter in
//! Rust next to its JavaScript twin (plugins/js): size, compilation,
//! first call (instantiation), calls with words configured.
//!
//! ```text
//! scripts/bench-plugins.sh
//! ```
//! (builds the plugins in plugins/ and runs this in release mode).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pushgate::plugin::{CallSettings, Handshake, Header, Message, PluginHost, Recipient, Target};
use pushgate::{Config, Node};

const ROUNDS: usize = 7;

fn component(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| format!("{}: build the plugins first", path.display()))
}

/// Median over [`ROUNDS`] of the time per iteration of `body`, run
/// `iterations` times per round.
fn per_iteration(iterations: u32, mut body: impl FnMut()) -> Duration {
    let mut rounds: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                body();
            }
            started.elapsed() / iterations
        })
        .collect();
    rounds.sort();
    rounds[ROUNDS / 2]
}

fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A tenant's call settings: its plugin configuration and limits.
fn settings(config: &[(&str, &str)], max_memory_bytes: usize, timeout: Duration) -> CallSettings {
    CallSettings {
        config: Arc::new(
            config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        max_memory_bytes,
        timeout,
        max_output_bytes: 64 << 10,
        canary: Default::default(),
        shadow: Default::default(),
    }
}

fn calls(host: &PluginHost) -> anyhow::Result<()> {
    let settings = settings(
        &[("secret", "bench-secret")],
        32 << 20,
        Duration::from_millis(50),
    );
    let message = Message {
        id: "0192f5c0-0000-7000-8000-000000000000".to_owned(),
        tenant: "bench".to_owned(),
        target: Target::Broadcast,
        data: r#"{"text":"a message of about a hundred bytes, as a push typically carries","n":1}"#
            .to_owned(),
    };

    let deliver = host.compile("bench", &component("pass_through")?)?;
    for batch in [1usize, 100, 1000] {
        // Two distinct metadata sets among the recipients, as when sessions
        // differ by language.
        let profiles = vec![
            vec![("lang".to_owned(), "en".to_owned())],
            vec![("lang".to_owned(), "fr".to_owned())],
        ];
        let recipients: Vec<Recipient> = (0..batch)
            .map(|i| Recipient {
                user: format!("user-{i}"),
                profile: (i % 2) as u32,
            })
            .collect();
        let iterations = (20_000 / batch).max(50) as u32;
        let call = per_iteration(iterations, || {
            deliver
                .on_deliver(&settings, &message, &profiles, &recipients)
                .unwrap();
        });
        println!(
            "on-deliver pass-through, batch {batch:>4}: {:>8.2} µs per call, {:>7.0} ns per recipient",
            call.as_secs_f64() * 1e6,
            call.as_secs_f64() * 1e9 / batch as f64
        );
    }

    let publish = host.compile("bench", &component("keyword_filter")?)?;
    let call = per_iteration(20_000, || {
        publish.on_publish(&settings, &message).unwrap();
    });
    println!(
        "on-publish keyword-filter (no words configured): {:.2} µs per call",
        call.as_secs_f64() * 1e6
    );

    rust_and_javascript(host, &message)?;
    deliver_in_batches(host)?;

    let auth = host.compile("bench", &component("jwt_auth")?)?;
    let token = hs256(
        "bench-secret",
        &serde_json::json!({"sub": "ann", "exp": 4_000_000_000u64, "topics": ["a", "b"]}),
    );
    let request = Handshake {
        path: "/ws/bench".to_owned(),
        query: format!("token={token}"),
        headers: vec![Header {
            name: "host".to_owned(),
            value: "127.0.0.1".to_owned(),
        }],
        remote_address: "127.0.0.1:50000".to_owned(),
    };
    let call = per_iteration(20_000, || {
        auth.authenticate(&settings, &request).unwrap().unwrap();
    });
    println!(
        "authenticate jwt-auth: {:.2} µs per call",
        call.as_secs_f64() * 1e6
    );
    Ok(())
}

/// A JavaScript plugin of plugins/js, as `npm run build` left it.
fn js_component(name: &str) -> anyhow::Result<Vec<u8>> {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("plugins/js/target/{name}.wasm"));
    std::fs::read(&js).with_context(|| {
        format!(
            "{}: build it first (cd plugins/js && npm ci && npm run build)",
            js.display()
        )
    })
}

/// `on-deliver` of the personalize plugin, Rust and JavaScript, for
/// batches of recipients (the dispatcher hands up to 256 per call): the
/// cost per recipient.
fn deliver_in_batches(host: &PluginHost) -> anyhow::Result<()> {
    let settings = settings(&[], 64 << 20, Duration::from_secs(2));
    let message = Message {
        id: "0192f5c0-0000-7000-8000-000000000000".to_owned(),
        tenant: "bench".to_owned(),
        target: Target::Broadcast,
        data: r#"{"i18n":{"en":"Hello","fr":"Bonjour"},"n":1}"#.to_owned(),
    };
    let profiles = vec![
        vec![("lang".to_owned(), "en".to_owned())],
        vec![("lang".to_owned(), "fr".to_owned())],
    ];
    for (language, bytes) in [
        ("Rust", component("personalize")?),
        ("JavaScript", js_component("personalize")?),
    ] {
        let plugin = host.compile("bench", &bytes)?;
        let mut line = format!("personalize on-deliver in {language}:");
        for batch in [1u32, 16, 256] {
            let recipients: Vec<Recipient> = (0..batch)
                .map(|n| Recipient {
                    user: format!("user-{n}"),
                    profile: n % 2,
                })
                .collect();
            let mut failures = 0;
            let call = per_iteration(20_000 / batch, || {
                if plugin
                    .on_deliver(&settings, &message, &profiles, &recipients)
                    .is_err()
                {
                    failures += 1;
                }
            });
            line += &format!(
                " batch {batch}: {:.2} µs per recipient{};",
                call.as_secs_f64() * 1e6 / f64::from(batch),
                if failures > 0 {
                    format!(" ({failures} calls failed)")
                } else {
                    String::new()
                }
            );
        }
        println!("{}", line.trim_end_matches(';'));
    }
    Ok(())
}

/// The keyword filter built from Rust and from JavaScript, side by side.
fn rust_and_javascript(host: &PluginHost, message: &Message) -> anyhow::Result<()> {
    let javascript = js_component("keyword-filter")?;
    let settings = settings(
        &[("words", "spoiler,secret plan")],
        64 << 20,
        Duration::from_secs(2),
    );
    for (language, bytes) in [
        ("Rust", component("keyword_filter")?),
        ("JavaScript", javascript),
    ] {
        let started = Instant::now();
        let plugin = host.compile("bench", &bytes)?;
        let compiled = started.elapsed();
        let started = Instant::now();
        plugin.on_publish(&settings, message).unwrap();
        let first = started.elapsed();
        let call = per_iteration(5_000, || {
            plugin.on_publish(&settings, message).unwrap();
        });
        println!(
            "keyword-filter in {language}: {:.1} MB, compiled in {:.0} ms, first call {:.2} ms, \
             then {:.2} µs per call",
            bytes.len() as f64 / 1e6,
            compiled.as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e3,
            call.as_secs_f64() * 1e6
        );
    }
    Ok(())
}

async fn handshake_latency(samples: usize) -> anyhow::Result<()> {
    let store = std::env::temp_dir().join(format!("pushgate-bench-{}", std::process::id()));
    let mut config = Config::from_toml(
        r#"
[listen]
public = "127.0.0.1:0"
internal = "127.0.0.1:0"
[websocket]
max_connections_per_ip = 1000000
[log]
filter = "warn"
[admin]
token = "bench-admin"
[tenants.builtin]
auth = "development"
max_connections_per_user = 1000000
[tenants.plugin]
max_connections_per_user = 1000000
[tenants.plugin.plugin.config]
secret = "bench-secret"
"#,
    )?;
    config.state.dir = store.clone();
    let node = Node::start(config).await?;
    node.plugins()
        .install("plugin", &component("jwt_auth")?, true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let token = hs256(
        "bench-secret",
        &serde_json::json!({"sub": "ann", "exp": 4_000_000_000u64}),
    );
    let base = format!("ws://{}", node.public_addr());
    let mut report = Vec::new();
    for (name, path) in [
        (
            "development authenticator",
            "/ws/builtin?user=ann".to_owned(),
        ),
        ("jwt-auth plugin", format!("/ws/plugin?token={token}")),
    ] {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let started = Instant::now();
            let (socket, _) = tokio_tungstenite::connect_async(format!("{base}{path}")).await?;
            times.push(started.elapsed());
            drop(socket);
        }
        times.sort();
        let median = times[samples / 2];
        let p99 = times[samples * 99 / 100];
        println!(
            "handshake with the {name}: median {:.0} µs, p99 {:.0} µs ({samples} sequential handshakes)",
            median.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        report.push(median);
    }
    println!(
        "jwt-auth adds {:.0} µs to the median handshake",
        report[1].as_secs_f64() * 1e6 - report[0].as_secs_f64() * 1e6
    );
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(store);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = PluginHost::new().map_err(|e| anyhow::anyhow!("{e}"))?;
    calls(&host)?;
    handshake_latency(1000).await
}
