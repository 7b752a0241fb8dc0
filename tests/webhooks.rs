//! Lifecycle webhooks, against a real HTTP receiver: what is told, signed
//! and batched; a receiver down for 10 s gets everything once it is back;
//! a slow one holds up no client; a full queue drops and counts.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{PATIENCE, TestNode};
use tokio::sync::Notify;

const SECRET: &str = "webhook-test-secret";

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    /// 503 until then.
    DownUntil(Instant),
    /// Each request waits for [`Receiver::release`] (30 s at most).
    Held,
}

/// A webhook receiver on a free loopback port: every request it took.
#[derive(Clone)]
struct Receiver {
    taken: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    refused: Arc<Mutex<u32>>,
    /// Requests that reached a held receiver.
    arrived: Arc<Mutex<u32>>,
    mode: Arc<Mutex<Mode>>,
    released: Arc<Notify>,
    url: String,
}

async fn take(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mode = *receiver.mode.lock().unwrap();
    match mode {
        Mode::DownUntil(until) if Instant::now() < until => {
            *receiver.refused.lock().unwrap() += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        Mode::Held => {
            let released = receiver.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            *receiver.arrived.lock().unwrap() += 1;
            let _ = tokio::time::timeout(Duration::from_secs(30), released).await;
        }
        _ => {}
    }
    receiver.taken.lock().unwrap().push((headers, body));
    StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            taken: Arc::default(),
            refused: Arc::default(),
            arrived: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            released: Arc::new(Notify::new()),
            url: format!("http://{}/hooks", listener.local_addr().unwrap()),
        };
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(take))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    fn release(&self) {
        *self.mode.lock().unwrap() = Mode::Ok;
        self.released.notify_waiters();
    }

    /// Every event taken, in order, after checking each request's
    /// signature and timestamp.
    fn events(&self) -> Vec<Value> {
        let taken = self.taken.lock().unwrap();
        let mut events = Vec::new();
        for (headers, body) in taken.iter() {
            let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
            mac.update(body);
            let expected: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                headers["x-pushgate-signature"].to_str().unwrap(),
                format!("sha256={expected}"),
                "signed with the tenant's secret"
            );
            let batch: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(
                headers["x-pushgate-timestamp"].to_str().unwrap(),
                batch["sent_at"].to_string(),
                "the timestamp is the signed one"
            );
            let batched = batch["events"].as_array().unwrap();
            assert!((1..=100).contains(&batched.len()));
            events.extend(batched.iter().cloned());
        }
        events
    }

    /// Waits until the events taken satisfy `condition`.
    async fn until(
        &self,
        what: &str,
        patience: Duration,
        condition: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + patience;
        loop {
            let events = self.events();
            if condition(&events) {
                return events;
            }
            assert!(Instant::now() < deadline, "{what}: never; got {events:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn node_config(url: &str, extra: &str) -> String {
    format!(
        r#"
[tenants.shop]
push_keys = ["shop-key"]
auth = "development"
[tenants.shop.webhooks]
url = "{url}"
secret = "{SECRET}"
events = ["connected", "disconnected", "subscribed", "unsubscribed", "user_online", "user_offline"]
{extra}
"#
    )
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

#[tokio::test]
async fn connections_subscriptions_and_users_are_told_signed_and_batched() {
    let receiver = Receiver::start(Mode::Ok).await;
    let node = TestNode::start(&node_config(&receiver.url, "")).await;
    let mut phone = node.connect_user("shop", "ann").await;
    let laptop = node.connect_user("shop", "ann").await;
    phone
        .send_json(json!({"type": "subscribe", "topic": "news"}))
        .await;
    assert_eq!(phone.next_json().await["type"], "subscribed");
    phone
        .send_json(json!({"type": "unsubscribe", "topic": "news"}))
        .await;
    assert_eq!(phone.next_json().await["type"], "unsubscribed");
    // Subscribed by the service: told too.
    let (status, _) = node
        .post(
            "/v1/subscriptions",
            Some("shop-key"),
            &json!({"user": "ann", "subscribe": ["orders.ann"]}),
        )
        .await;
    assert_eq!(status, 200);
    drop(phone);
    drop(laptop);

    let events = receiver
        .until("ann online, subscribed, then offline", PATIENCE, |events| {
            !of_type(events, "user_offline").is_empty()
                && of_type(events, "disconnected").len() == 2
        })
        .await;
    assert_eq!(of_type(&events, "connected").len(), 2);
    assert_eq!(of_type(&events, "user_online").len(), 1, "once per user");
    assert_eq!(of_type(&events, "user_offline").len(), 1);
    let subscribed: Vec<&Value> = of_type(&events, "subscribed");
    assert_eq!(
        subscribed.len(),
        3,
        "news by the client, orders.ann on both: {subscribed:?}"
    );
    assert_eq!(subscribed[0]["topic"], "news");
    assert_eq!(of_type(&events, "unsubscribed")[0]["topic"], "news");
    let first = &events[0];
    assert_eq!(first["type"], "connected");
    assert_eq!(
        (&first["tenant"], &first["user"]),
        (&json!("shop"), &json!("ann"))
    );
    assert!(first["connection"].is_u64() && first["node"].is_string() && first["at"].is_u64());
    let position = |kind: &str| events.iter().position(|e| e["type"] == kind).unwrap();
    assert!(position("user_online") < position("subscribed"));
    assert!(
        position("disconnected") < events.len() - 1,
        "offline comes after the last close"
    );
    assert!(
        receiver.taken.lock().unwrap().len() < events.len(),
        "events are batched"
    );
}

/// A receiver answering 503 for 10 s gets every event once it is back, in
/// order, each once.
#[tokio::test]
async fn a_receiver_down_for_ten_seconds_gets_everything_once_it_is_back() {
    let receiver = Receiver::start(Mode::DownUntil(Instant::now() + Duration::from_secs(10))).await;
    let node = TestNode::start(&node_config(&receiver.url, "")).await;
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(node.connect_user("shop", &format!("user-{i}")).await);
    }
    let events = receiver
        .until(
            "five connections, after the outage",
            Duration::from_secs(60),
            |events| of_type(events, "connected").len() >= 5,
        )
        .await;
    assert!(*receiver.refused.lock().unwrap() >= 2, "it was retried");
    let connected: Vec<&Value> = of_type(&events, "connected");
    assert_eq!(connected.len(), 5, "each once: {connected:?}");
    let users_told: Vec<&str> = connected
        .iter()
        .map(|e| e["user"].as_str().unwrap())
        .collect();
    assert_eq!(
        users_told,
        ["user-0", "user-1", "user-2", "user-3", "user-4"],
        "in order"
    );
    let metrics = node.get_text("/metrics").await.1;
    assert!(
        support::metric_value(
            &metrics,
            "pushgate_webhook_retries_total",
            &["tenant=\"shop\""]
        ) >= 2.0
    );
}

/// A receiver that takes its time holds up no handshake and no push; a
/// full queue drops events, counted, and the clients never notice.
#[tokio::test]
async fn a_slow_receiver_holds_up_no_client_and_a_full_queue_drops_counted() {
    let receiver = Receiver::start(Mode::Held).await;
    let node = TestNode::start(&node_config(&receiver.url, "max_queue = 3")).await;
    // The first batch is held by the receiver; the queue fills behind it.
    let _first = node.connect_user("shop", "first").await;
    support::eventually("the receiver holds the first batch", PATIENCE, || {
        *receiver.arrived.lock().unwrap() == 1
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(node.connect_user("shop", &format!("user-{i}")).await);
    }
    // Meanwhile pushes go out as ever.
    node.push(
        "shop-key",
        json!({"users": ["user-9"], "data": "still here"}),
    )
    .await;
    assert_eq!(clients[9].next_data().await, json!("still here"));
    assert!(
        receiver.taken.lock().unwrap().is_empty(),
        "the receiver still holds the first batch"
    );
    receiver.release();
    receiver
        .until("the first batch", PATIENCE, |events| !events.is_empty())
        .await;
    let metrics = node.get_text("/metrics").await.1;
    let dropped = support::metric_value(
        &metrics,
        "pushgate_webhook_events_total",
        &["tenant=\"shop\"", "outcome=\"dropped\""],
    );
    assert!(dropped > 0.0, "a queue of 3 overflowed: {dropped}");
}

/// In a cluster a user is told online once and offline once — by its
/// owner node — however many nodes hold its connections.
#[tokio::test]
async fn a_user_on_two_nodes_is_told_online_and_offline_once() {
    use support::rocketmq::{NodeProcess, Rocketmq, test_topic};
    let receiver = Receiver::start(Mode::Ok).await;
    let rocketmq = Rocketmq::start();
    let topic = test_topic("webhooks");
    let tenants = node_config(&receiver.url, "");
    let nodes: Vec<NodeProcess> = ["a", "b", "c"]
        .iter()
        .map(|name| NodeProcess::start(name, &rocketmq.name_server(), &topic, &tenants))
        .collect();
    for node in &nodes {
        node.wait_ready();
    }
    let connect = |node: &NodeProcess| {
        let url = node.ws_url("shop", "ann");
        async move {
            let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            socket
        }
    };
    let on_a = connect(&nodes[0]).await;
    let on_c = connect(&nodes[2]).await;
    let events = receiver
        .until("two connections and one user_online", PATIENCE, |events| {
            of_type(events, "connected").len() == 2 && of_type(events, "user_online").len() == 1
        })
        .await;
    let mut holders: Vec<&str> = of_type(&events, "connected")
        .iter()
        .map(|e| e["node"].as_str().unwrap())
        .collect();
    holders.sort_unstable();
    assert_eq!(holders, ["a", "c"], "each told by the node that holds it");
    drop(on_a);
    drop(on_c);
    let events = receiver
        .until("ann offline", PATIENCE, |events| {
            of_type(events, "user_offline").len() == 1 && of_type(events, "disconnected").len() == 2
        })
        .await;
    let online = of_type(&events, "user_online")[0]["node"].clone();
    assert_eq!(
        of_type(&events, "user_offline")[0]["node"],
        online,
        "both by the owner"
    );
}
