//! The `pushgate` binary as an operator runs it: the demo tenant without a
//! configuration file, clear configuration errors, and SIGTERM.

mod support;

use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::{Client, PATIENCE, Process};

/// `pushgate check-config --config FILE`, FILE holding `toml`.
fn check_config_file(toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pushgate.toml");
    std::fs::write(&file, toml).unwrap();
    pushgate()
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap()
}

fn pushgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushgate"));
    // Nothing from the caller's environment leaks into these runs.
    for (name, _) in std::env::vars() {
        if name.starts_with("PUSHGATE_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    // A state directory of the run's own (a few small files, left in the
    // system's temporary folder), not the working directory's.
    let state = tempfile::tempdir().expect("a temporary folder").keep();
    command.env("PUSHGATE_STATE__DIR", state);
    command
}

/// Reads the JSON log lines until both listener addresses were logged.
fn listening_addresses(process: &mut Process) -> (String, String) {
    let stdout = process.child.stdout.take().expect("stdout is piped");
    support::listening_addresses(stdout, "pushgate")
}

/// `pushgate serve` without a configuration file (the demo tenant) on free
/// ports: the process and its public and internal addresses.
fn demo_node() -> (Process, String, String) {
    let mut process = Process {
        child: pushgate()
            .arg("serve")
            .env("PUSHGATE_LISTEN__PUBLIC", "127.0.0.1:0")
            .env("PUSHGATE_LISTEN__INTERNAL", "127.0.0.1:0")
            .env("PUSHGATE_LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .spawn()
            .expect("pushgate starts"),
    };
    let (public, internal) = listening_addresses(&mut process);
    (process, public, internal)
}

#[tokio::test]
async fn without_a_config_file_the_binary_serves_the_demo_tenant_and_stops_on_sigterm() {
    let (mut process, public, internal) = demo_node();

    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{public}/ws/demo?user=alice"))
        .await
        .expect("the demo tenant admits alice");
    let mut client = Client { socket };
    let http = reqwest::Client::new();
    // The client may not be registered yet when the push arrives: push
    // until it receives one (each push is answered 202 either way).
    let mut received = None;
    for attempt in 0..100 {
        let response = http
            .post(format!("http://{internal}/v1/push"))
            .bearer_auth("demo-key")
            .json(&json!({"users": ["alice"], "data": {"attempt": attempt}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        if let Ok(frame) =
            tokio::time::timeout(std::time::Duration::from_millis(200), client.next_json()).await
        {
            received = Some(frame);
            break;
        }
    }
    let frame = received.expect("alice receives a push");
    assert_eq!(frame["type"], "message");

    let status = Command::new("kill")
        .args(["-TERM", &process.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(client.close_code().await, 1012);
    let deadline = std::time::Instant::now() + PATIENCE;
    let exit = loop {
        if let Some(exit) = process.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pushgate exits after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn a_wrong_configuration_value_stops_the_binary_with_the_field_named() {
    let cases = [
        (
            "PUSHGATE_WEBSOCKET__OUTBOUND_QUEUE",
            "0",
            "websocket.outbound_queue",
        ),
        ("PUSHGATE_WEBSOCKET__IDLE_TIMEOUT", "soon", "idle_timeout"),
        ("PUSHGATE_LISTEN__PUBLIC", "not-an-address", "public"),
    ];
    for (variable, value, field) in cases {
        let output = pushgate()
            .arg("check-config")
            .env(variable, value)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{variable}={value} is refused");
        // Errors from variables name the key in capitals, as it was set.
        let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
        assert!(stderr.contains(field), "{variable}={value}: {stderr}");
    }

    let output =
        check_config_file("[tenants.shop]\npush_keys = [\"k\"]\nmax_connections_per_user = -1\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_connections_per_user"), "{stderr}");

    let output = pushgate()
        .args(["check-config", "--config", "/nonexistent/pushgate.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not exist"));
}

#[tokio::test]
async fn the_cli_uploads_lists_and_rolls_back_plugins_on_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pushgate.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\npublic = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\n\
             [admin]\ntoken = \"cli-token\"\n[plugins]\nstore_dir = {:?}\n\
             [log]\nformat = \"json\"\n[tenants.shop]\npush_keys = [\"shop-key\"]\n",
            dir.path().join("plugins")
        ),
    )
    .unwrap();
    let mut process = Process {
        child: pushgate()
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .spawn()
            .expect("pushgate starts"),
    };
    let (_, internal) = listening_addresses(&mut process);
    let component = dir.path().join("keyword_filter.wasm");
    std::fs::write(&component, support::plugin("keyword_filter")).unwrap();
    let cli = |args: &[&str]| {
        pushgate()
            .arg("plugin")
            .args(args)
            .args(["--tenant", "shop", "--node", &format!("http://{internal}")])
            .env("PUSHGATE_ADMIN_TOKEN", "cli-token")
            .output()
            .unwrap()
    };

    let upload = cli(&["upload", component.to_str().unwrap()]);
    assert!(
        upload.status.success(),
        "{}",
        String::from_utf8_lossy(&upload.stderr)
    );
    let installed: Value = serde_json::from_slice(&upload.stdout).unwrap();
    assert_eq!(installed["active"], true);
    assert_eq!(installed["hooks"], json!(["on-publish"]));

    let list = cli(&["list"]);
    assert!(list.status.success());
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed["active"], installed["version"]);

    let rollback = cli(&["rollback"]);
    assert!(!rollback.status.success(), "nothing to roll back to");
    assert!(String::from_utf8_lossy(&rollback.stderr).contains("no earlier version"));

    // A second version, rolled out: as a shadow, then a canary raised step
    // by step, then ended.
    let personal = dir.path().join("personalize.wasm");
    std::fs::write(&personal, support::plugin("personalize")).unwrap();
    let second = cli(&["upload", "--no-activate", personal.to_str().unwrap()]);
    let second: Value = serde_json::from_slice(&second.stdout).unwrap();
    let version = &second["version"].as_str().unwrap()[..12];
    assert!(cli(&["shadow", version]).status.success());
    let report = cli(&["shadow-report"]);
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["version"], second["version"]);
    assert!(cli(&["end-shadow"]).status.success());
    for percent in ["5", "25"] {
        let canary = cli(&["canary", version, "--percent", percent]);
        assert!(
            canary.status.success(),
            "{}",
            String::from_utf8_lossy(&canary.stderr)
        );
        let canary: Value = serde_json::from_slice(&canary.stdout).unwrap();
        assert_eq!(canary["canary_percent"].to_string(), percent);
    }
    let listed: Value = serde_json::from_slice(&cli(&["list"]).stdout).unwrap();
    assert_eq!(listed["canary"]["percent"], 25, "{listed}");
    assert!(cli(&["end-canary"]).status.success());
    let refused = cli(&["end-canary"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("has no canary"));

    let wrong_token = pushgate()
        .args([
            "plugin",
            "list",
            "--tenant",
            "shop",
            "--node",
            &format!("http://{internal}"),
        ])
        .args(["--admin-token", "wrong"])
        .output()
        .unwrap();
    assert!(!wrong_token.status.success());
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("401"));
}

#[test]
fn a_log_written_to_a_pipe_carries_no_colour_codes() {
    let mut process = Process {
        child: pushgate()
            .arg("serve")
            .env("PUSHGATE_LISTEN__PUBLIC", "127.0.0.1:0")
            .env("PUSHGATE_LISTEN__INTERNAL", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("pushgate starts"),
    };
    let lines_rx = support::stdout_lines(&mut process.child);
    let mut log = Vec::new();
    while !log.iter().any(|line: &String| line.contains("push API")) {
        log.push(
            lines_rx
                .recv_timeout(PATIENCE)
                .expect("the node logs where it listens"),
        );
    }
    assert!(
        log.iter().all(|line| !line.contains('\u{1b}')),
        "colour codes in a piped log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|line| line.contains(" INFO ")),
        "a plain text log: {log:?}"
    );
}

#[test]
fn check_config_shows_no_secret_and_tenants_from_the_environment_replace_the_demo() {
    let output = check_config_file(
        "[admin]\ntoken = \"admin-secret-value\"\n\
         [tenants.shop]\npush_keys = [\"push-secret-value\"]\nauth = \"jwt\"\n\
         [tenants.shop.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret-value\"\n\
         [tenants.shop.plugin.config]\napi_key = \"plugin-secret-value\"\n",
    );
    assert!(output.status.success());
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains("api_key"), "{shown}");
    for secret in ["admin-secret", "push-secret", "jwt-secret", "plugin-secret"] {
        assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
    }

    // Without a file: the demo tenant, unless the environment names tenants.
    let tenants = |command: &mut Command| -> Vec<String> {
        let output = command.arg("check-config").output().unwrap();
        assert!(output.status.success());
        let config: Value = serde_json::from_slice(&output.stdout).unwrap();
        config["tenants"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(tenants(&mut pushgate()), ["demo"]);
    assert_eq!(
        tenants(pushgate().env("PUSHGATE_TENANTS__ENVCO__AUTH", "development")),
        ["envco"]
    );
}

/// `pushgate plugin try FILE ARGS…`: its JSON report.
fn try_plugin(plugin: &str, args: &[&str]) -> serde_json::Value {
    try_plugin_logging(plugin, args).0
}

/// `pushgate plugin try FILE ARGS…`: its JSON report and its log (where
/// the plugin's own lines go, as on a node).
fn try_plugin_logging(plugin: &str, args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{plugin}.wasm"));
    std::fs::write(&file, support::plugin(plugin)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args(["plugin", "try"])
        .arg(&file)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = serde_json::from_slice(&output.stdout).expect("a JSON report");
    (report, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn plugin_try_runs_each_hook_of_a_component_without_a_node() {
    let masked = try_plugin(
        "keyword_filter",
        &[
            "--hook",
            "on-publish",
            "--data",
            r#"{"text":"a Spoiler!"}"#,
            "--config",
            "words=spoiler",
            "--config",
            "mode=mask",
        ],
    );
    assert_eq!(masked["outcome"]["verdict"], "replace", "{masked}");
    assert_eq!(masked["outcome"]["data"]["text"], "a *******!");
    assert!(masked["memory_bytes"].as_u64().unwrap() > 0);

    let personal = try_plugin(
        "personalize",
        &[
            "--hook",
            "on-deliver",
            "--data",
            r#"{"i18n":{"en":"Hello","fr":"Bonjour"}}"#,
            "--recipient",
            "amelie:lang=fr",
            "--recipient",
            "bob",
        ],
    );
    assert_eq!(
        personal["outcome"][0]["data"]["text"], "Bonjour",
        "{personal}"
    );
    assert_eq!(personal["outcome"][1]["data"]["text"], "Hello");

    let refused = try_plugin(
        "jwt_auth",
        &[
            "--hook",
            "authenticate",
            "--request",
            "/ws/shop?token=forged",
            "--config",
            "secret=s",
        ],
    );
    assert_eq!(refused["outcome"]["verdict"], "reject", "{refused}");
    assert_eq!(refused["outcome"]["status"], 401);

    let stuck = try_plugin(
        "misbehave",
        &[
            "--hook",
            "on-publish",
            "--data",
            r#""loop""#,
            "--timeout",
            "20ms",
        ],
    );
    assert_eq!(stuck["outcome"]["failure"], "timeout", "{stuck}");

    // A panic's message is printed: it reaches the log as the plugin's.
    let (panicked, log) = try_plugin_logging(
        "misbehave",
        &["--hook", "on-publish", "--data", r#""a trap""#],
    );
    assert_eq!(panicked["outcome"]["failure"], "trap", "{panicked}");
    assert!(
        log.contains("asked to trap") && log.contains("panicked at"),
        "{log}"
    );
}

/// `plugin new` refuses a bad name and never writes over a folder; the
/// crate it writes is built and tried by `tests/docs.rs`, as the plugins'
/// README shows it.
#[test]
fn plugin_new_refuses_bad_names_and_existing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("my-shout");
    let new = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_pushgate"))
            .args(["plugin", "new", name, "--dir"])
            .arg(&crate_dir)
            .output()
            .unwrap()
    };
    let refused = new("My Shout");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("a plugin name is"));
    assert!(new("my-shout").status.success());
    let again = new("my-shout");
    assert!(!again.status.success(), "never over an existing folder");
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
}

/// A client can make a tenant's plugin fail (a handshake it traps on);
/// failures are counted in metrics, and logged a few a minute per plugin
/// with how many were left out — never a line each, which let any client
/// flood the node's log.
#[tokio::test]
async fn plugin_failures_clients_cause_are_logged_a_few_a_minute_not_one_each() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pushgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listen]
public = "127.0.0.1:0"
internal = "127.0.0.1:0"
[admin]
token = "{admin}"
[tenants.shop]
push_keys = ["shop-key"]
auth = "development"
"#,
            admin = support::ADMIN_TOKEN
        ),
    )
    .unwrap();
    let (_node, public, internal, log) = support::serve_keeping_log(&config, "node");
    let (status, answer) = support::admin(
        &format!("http://{internal}"),
        "POST",
        "/admin/v1/tenants/shop/plugins",
        Some(support::plugin("misbehave")),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    // Three failed handshakes an address (then it is throttled), from 40
    // addresses: 120 plugin failures.
    let server: std::net::SocketAddr = public.parse().unwrap();
    for address in 2..42u8 {
        for _ in 0..3 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind((std::net::Ipv4Addr::new(127, 0, 0, address), 0).into())
                .unwrap();
            let stream = socket.connect(server).await.unwrap();
            let refused = tokio_tungstenite::client_async(
                format!("ws://{public}/ws/shop?user=mallory&trap"),
                stream,
            )
            .await;
            assert!(refused.is_err(), "a trapping plugin admits nobody");
        }
    }
    let metrics = reqwest::get(format!("http://{internal}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = support::metric_value(
        &metrics,
        "pushgate_plugin_calls_total",
        &["hook=\"authenticate\"", "outcome=\"trap\""],
    );
    assert_eq!(failures, 120.0, "every failure counted");
    let lines = log.lock().unwrap().clone();
    let logged = lines
        .iter()
        .filter(|line| line.contains("plugin call failed"))
        .count();
    assert!(
        (1..=20).contains(&logged),
        "{logged} log lines for 120 failures"
    );
}
