//! The Pusher Channels protocol, with the real libraries (npm's
//! `pusher-js`, `laravel-echo` and `pusher`, driven by
//! tests/pusher/driver.mjs) against real nodes: one node, Chromium, two
//! nodes on a real broker; and by hand, what a hostile client or caller
//! sends: refused with the protocol's codes, nothing delivered.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures_util::SinkExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::rocketmq::{NodeProcess, Rocketmq, test_topic};
use support::{Client, PATIENCE, Process, TestNode, eventually};
use tokio_tungstenite::tungstenite::Message;

/// Tenant `shop`'s Pusher app (client events on) …
const APP: (&str, &str, &str) = ("1", "shop-app-key", "shop-app-secret");
/// … and tenant `globex`'s, whose signatures must open nothing of `shop`.
const OTHER_APP: (&str, &str, &str) = ("2", "globex-app-key", "globex-app-secret");
/// How long one driver scenario may take, its libraries included.
const DRIVER_PATIENCE: Duration = Duration::from_secs(180);

fn tenants(webhook_url: Option<&str>) -> String {
    let webhook = webhook_url.map_or(String::new(), |url| format!("webhook_url = \"{url}\""));
    format!(
        r#"
[tenants.shop]
push_keys = ["shop-key"]
auth = "development"
[tenants.shop.pusher]
app_id = "{}"
key = "{}"
secret = "{}"
client_events = true
recovery = true
{webhook}

[tenants.globex.pusher]
app_id = "{}"
key = "{}"
secret = "{}"
"#,
        APP.0, APP.1, APP.2, OTHER_APP.0, OTHER_APP.1, OTHER_APP.2
    )
}

fn app_json((id, key, secret): (&str, &str, &str)) -> Value {
    json!({ "id": id, "key": key, "secret": secret })
}

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pusher")
}

/// Runs driver `scenario` with `args` until it prints "ok" (each step it
/// passed is printed as it goes); fails with its output otherwise.
fn drive(scenario: &str, args: &Value) {
    if !driver_dir().join("node_modules/pusher-js").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(driver_dir())
            .status()
            .expect("npm runs (Node.js 20 or newer is needed)");
        assert!(status.success(), "npm ci in tests/pusher failed");
    }
    let mut driver = Process {
        child: Command::new("node")
            .arg(driver_dir().join("driver.mjs"))
            .args([scenario, &args.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs the Pusher driver"),
    };
    let lines = support::stdout_lines(&mut driver.child);
    let deadline = std::time::Instant::now() + DRIVER_PATIENCE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line == "ok" => return,
            Ok(line) => {
                println!("{line}");
                seen.push(line);
            }
            Err(err) => panic!(
                "the Pusher driver ({scenario}) ended without \"ok\" ({err:?}):\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// A webhook receiver on a free loopback port.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<(HeaderMap, Bytes)>>>);

async fn take_hook(State(hooks): State<Hooks>, headers: HeaderMap, body: Bytes) -> StatusCode {
    hooks.0.lock().unwrap().push((headers, body));
    StatusCode::OK
}

impl Hooks {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/pusher", listener.local_addr().unwrap());
        let hooks = Self::default();
        let app = axum::Router::new()
            .route("/pusher", axum::routing::post(take_hook))
            .with_state(hooks.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (hooks, url)
    }

    /// Every event, each request's key and signature checked.
    fn events(&self) -> Vec<Value> {
        let mut events = Vec::new();
        for (headers, body) in self.0.lock().unwrap().iter() {
            assert_eq!(headers["x-pusher-key"], APP.1);
            assert_eq!(
                headers["x-pusher-signature"].to_str().unwrap(),
                hmac_hex(APP.2, body),
                "signed with the app's secret"
            );
            let batch: Value = serde_json::from_slice(body).unwrap();
            assert!(batch["time_ms"].as_u64().is_some());
            events.extend(batch["events"].as_array().unwrap().iter().cloned());
        }
        events
    }
}

fn hmac_hex(secret: &str, text: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(text);
    hex::encode(mac.finalize().into_bytes())
}

fn has(events: &[Value], expected: &Value) -> bool {
    events.iter().any(|event| {
        expected
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| event.get(k) == Some(v))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn pusher_js_laravel_echo_and_the_pusher_library_on_one_node() {
    let (hooks, url) = Hooks::start().await;
    let node = TestNode::start(&tenants(Some(&url))).await;
    let args = json!({
        "ws": node.ws_base,
        "api": node.http_base,
        "app": app_json(APP),
        "otherApp": app_json(OTHER_APP),
        "pushKey": "shop-key",
    });
    tokio::task::spawn_blocking(move || drive("one-node", &args))
        .await
        .unwrap();

    // The app heard of it all, in Pusher's format, signed.
    let expected = [
        json!({"name": "channel_occupied", "channel": "news"}),
        json!({"name": "member_added", "channel": "presence-room", "user_id": "bob"}),
        json!({"name": "member_removed", "channel": "presence-room", "user_id": "bob"}),
        json!({"name": "client_event", "channel": "private-orders", "event": "client-typing",
               "data": "{\"who\":\"ann\"}"}),
        json!({"name": "channel_vacated", "channel": "private-encrypted-secrets"}),
    ];
    let mut events = Vec::new();
    eventually("the app's webhooks", PATIENCE, || {
        events = hooks.events();
        expected.iter().all(|e| has(&events, e))
    })
    .await;
    let client_event = events.iter().find(|e| e["name"] == "client_event").unwrap();
    assert!(client_event["socket_id"].as_str().unwrap().contains('.'));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pusher_js_in_chromium() {
    let node = TestNode::start(&tenants(None)).await;
    let args = json!({ "ws": node.ws_base, "api": node.http_base, "app": app_json(APP) });
    tokio::task::spawn_blocking(move || drive("browser", &args))
        .await
        .unwrap();
    node.shutdown().await;
}

#[test]
fn pusher_clients_on_two_nodes_of_one_broker() {
    let rocketmq = Rocketmq::start();
    let topic = test_topic("pusher-two-nodes");
    let nodes: Vec<NodeProcess> = ["pusher-a", "pusher-b"]
        .iter()
        .map(|name| NodeProcess::start(name, &rocketmq.name_server(), &topic, &tenants(None)))
        .collect();
    for node in &nodes {
        node.wait_ready();
    }
    let addresses: Vec<Value> = nodes
        .iter()
        .map(|n| json!({ "ws": format!("ws://{}", n.public), "api": format!("http://{}", n.internal) }))
        .collect();
    drive(
        "two-nodes",
        &json!({ "nodes": addresses, "app": app_json(APP), "pushKey": "shop-key" }),
    );
}

/// A Pusher client by hand: `/app/{key}?{query}`.
async fn pusher_client(node: &TestNode, key: &str, query: &str) -> Client {
    support::connect_url(format!("{}/app/{key}?{query}", node.ws_base)).await
}

/// Connects and returns the client with its socket id.
async fn established(node: &TestNode) -> (Client, String) {
    let mut client = pusher_client(node, APP.1, "protocol=7&client=js&version=8.6.0").await;
    let hello = client.next_json().await;
    assert_eq!(hello["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["activity_timeout"], 120);
    (client, data["socket_id"].as_str().unwrap().to_owned())
}

async fn subscribe(client: &mut Client, data: Value) -> Value {
    client
        .send_json(json!({"event": "pusher:subscribe", "data": data}))
        .await;
    client.next_json().await
}

/// The data of a `pusher:error` frame.
fn error_data(frame: &Value) -> Value {
    assert_eq!(frame["event"], "pusher:error", "{frame}");
    frame["data"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_handshakes_are_refused_with_the_protocols_codes() {
    let node = TestNode::start(&tenants(None)).await;
    for (key, query, code) in [
        ("no-such-key", "protocol=7", 4001),
        (APP.1, "client=js", 4008),
        (APP.1, "protocol=99", 4007),
    ] {
        let mut client = pusher_client(&node, key, query).await;
        let data = error_data(&client.next_json().await);
        assert_eq!(data["code"], code, "{key} {query}: {data}");
        assert_eq!(client.close_code().await, code, "{key} {query}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_subscriptions_and_broken_frames_are_refused_and_nothing_leaks() {
    let node = TestNode::start(&tenants(None)).await;
    let (mut client, socket_id) = established(&node).await;
    let joined = subscribe(&mut client, json!({"channel": "news"})).await;
    assert_eq!(joined["event"], "pusher_internal:subscription_succeeded");

    // A forged signature, another app's signature, presence data that was
    // not signed: each refused (401) on its channel.
    let other_app = format!(
        "{}:{}",
        OTHER_APP.1,
        hmac_hex(
            OTHER_APP.2,
            format!("{socket_id}:private-orders").as_bytes()
        )
    );
    let other_key = format!(
        "{}:{}",
        APP.1,
        hmac_hex(
            OTHER_APP.2,
            format!("{socket_id}:private-orders").as_bytes()
        )
    );
    let signed_presence = hmac_hex(
        APP.2,
        format!("{socket_id}:presence-room:{{\"user_id\":\"ann\"}}").as_bytes(),
    );
    for data in [
        json!({"channel": "private-orders", "auth": format!("{}:{}", APP.1, "0".repeat(64))}),
        json!({"channel": "private-orders", "auth": other_app}),
        json!({"channel": "private-orders", "auth": other_key}),
        json!({"channel": "private-orders"}),
        json!({"channel": "presence-room", "auth": format!("{}:{signed_presence}", APP.1),
               "channel_data": "{\"user_id\":\"admin\"}"}),
        json!({"channel": "#server-to-user-ann"}),
    ] {
        let refused = subscribe(&mut client, data.clone()).await;
        assert_eq!(
            refused["event"], "pusher:subscription_error",
            "{data}: {refused}"
        );
        assert!(refused["data"]["status"] == 401 || refused["data"]["status"] == 403);
    }
    // Malformed and binary frames: an error each, the connection stays.
    client.socket.send(Message::text("{nope")).await.unwrap();
    assert!(error_data(&client.next_json().await)["code"].is_null());
    client
        .socket
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert!(error_data(&client.next_json().await)["code"].is_null());
    // Client events on a public channel: refused.
    client
        .send_json(json!({"event": "client-x", "channel": "news", "data": {}}))
        .await;
    error_data(&client.next_json().await);

    // What the refused channels get is not delivered: the next event is
    // the one pushed after them to the subscribed channel.
    for (topic, event) in [
        ("private-orders", "leak"),
        ("presence-room", "leak"),
        ("news", "after"),
    ] {
        node.push(
            "shop-key",
            json!({"topic": topic, "event": event, "data": {}}),
        )
        .await;
    }
    node.push("shop-key", json!({"users": ["ann"], "data": {}}))
        .await;
    let next = client.next_json().await;
    assert_eq!(
        (next["event"].as_str(), next["channel"].as_str()),
        (Some("after"), Some("news"))
    );
    client
        .send_json(json!({"event": "pusher:ping", "data": {}}))
        .await;
    assert_eq!(client.next_json().await["event"], "pusher:pong");

    // Past ten refusals the client is closed (4009: do not reconnect).
    for _ in 0..4 {
        let refused = subscribe(&mut client, json!({"channel": "private-x", "auth": "x:y"})).await;
        assert_eq!(refused["event"], "pusher:subscription_error");
    }
    assert_eq!(client.close_code().await, 4009);

    // An oversized frame closes with 1009.
    let (mut client, _) = established(&node).await;
    let big = "x".repeat(2 * 1024 * 1024);
    let _ = client.socket.send(Message::text(big)).await;
    assert_eq!(client.close_code().await, 1009);
    node.shutdown().await;
}

/// A Pusher API request signed as the libraries sign it, at `timestamp`.
fn signed_query(
    app: (&str, &str, &str),
    method: &str,
    path: &str,
    body: &str,
    timestamp: u64,
) -> String {
    let mut params = vec![
        ("auth_key".to_owned(), app.1.to_owned()),
        ("auth_timestamp".to_owned(), timestamp.to_string()),
        ("auth_version".to_owned(), "1.0".to_owned()),
    ];
    if !body.is_empty() {
        params.push((
            "body_md5".to_owned(),
            hex::encode(md5::Md5::digest(body.as_bytes())),
        ));
    }
    params.sort();
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let query = query.join("&");
    let signature = hmac_hex(app.2, format!("{method}\n{path}\n{query}").as_bytes());
    format!("{query}&auth_signature={signature}")
}

#[tokio::test(flavor = "multi_thread")]
async fn api_calls_with_stale_forged_or_foreign_signatures_are_refused_and_deliver_nothing() {
    let node = TestNode::start(&tenants(None)).await;
    let (mut client, _) = established(&node).await;
    subscribe(&mut client, json!({"channel": "news"})).await;
    let path = format!("/apps/{}/events", APP.0);
    let post = |query: String, body: String| {
        let url = format!("{}{path}?{query}", node.http_base);
        let http = node.http.clone();
        async move {
            let response = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let body = |event: &str| json!({"name": event, "channels": ["news"], "data": "{}"}).to_string();
    let now = support::now_secs();
    let refused = [
        (
            "stale",
            signed_query(APP, "POST", &path, &body("stale"), now - 601),
        ),
        (
            "forged",
            signed_query(
                (APP.0, APP.1, "wrong-secret"),
                "POST",
                &path,
                &body("forged"),
                now,
            ),
        ),
        (
            "foreign",
            signed_query(OTHER_APP, "POST", &path, &body("foreign"), now),
        ),
        (
            "other-body",
            signed_query(APP, "POST", &path, &body("other"), now),
        ),
        (
            "unsigned",
            format!("auth_key={}&auth_timestamp={now}&auth_version=1.0", APP.1),
        ),
    ];
    for (what, query) in refused {
        let (status, text) = post(query, body(what)).await;
        assert_eq!(status, 401, "{what}: {text}");
    }
    let (status, text) = post(signed_query(APP, "POST", &path, "{", now), "{".to_owned()).await;
    assert_eq!(status, 400, "malformed: {text}");
    let (status, _) = post(
        signed_query(APP, "POST", &path, &body("sent"), now),
        body("sent"),
    )
    .await;
    assert_eq!(status, 200);
    // Only the signed event arrived.
    let next = client.next_json().await;
    assert_eq!(next["event"], "sent", "{next}");

    // Another app's id under this app's signature: unknown there.
    let foreign = format!("/apps/{}/events", OTHER_APP.0);
    let url = format!(
        "{}{foreign}?{}",
        node.http_base,
        signed_query(APP, "POST", &foreign, &body("x"), now)
    );
    let response = node.http.post(url).body(body("x")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    node.shutdown().await;
}
