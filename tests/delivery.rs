//! Delivery as users see it: addressing, sessions, heartbeats, slow clients
//! and shutdown, through real WebSocket and HTTP clients on loopback.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use serde_json::json;
use support::{Client, Ending, RawClient, TestNode, metric_value};

#[tokio::test]
async fn a_push_to_a_user_reaches_every_connection_of_that_user_and_nobody_else() {
    let node = TestNode::start("").await;
    let mut alice_phone = node.connect_user("acme", "alice").await;
    let mut alice_laptop = node.connect_user("acme", "alice").await;
    let mut bob = node.connect_user("acme", "bob").await;
    // Same user id in another tenant: another person.
    let mut other_alice = node.connect_user("globex", "alice").await;

    let id = node
        .push(
            "acme-key",
            json!({"users": ["alice"], "data": {"text": "hi alice"}}),
        )
        .await;
    for alice in [&mut alice_phone, &mut alice_laptop] {
        let frame = alice.next_json().await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["id"], id.as_str());
        assert_eq!(frame["data"], json!({"text": "hi alice"}));
    }

    // Bob and globex's alice got nothing: the next thing each receives is
    // the message pushed to them afterwards.
    node.push("acme-key", json!({"users": ["bob"], "data": "for bob"}))
        .await;
    node.push(
        "globex-key",
        json!({"users": ["alice"], "data": "for globex alice"}),
    )
    .await;
    assert_eq!(bob.next_data().await, json!("for bob"));
    assert_eq!(other_alice.next_data().await, json!("for globex alice"));
    node.shutdown().await;
}

#[tokio::test]
async fn topics_reach_subscribers_and_broadcast_reaches_the_whole_tenant() {
    let node = TestNode::start("").await;
    let mut from_handshake = node.connect("acme", "user=u1&topics=news,sport").await;
    let mut by_command = node.connect_user("acme", "u2").await;
    let mut not_subscribed = node.connect_user("acme", "u3").await;
    let mut other_tenant = node.connect_user("globex", "u1").await;

    by_command
        .send_json(json!({"type": "subscribe", "topic": "news"}))
        .await;
    assert_eq!(
        by_command.next_json().await,
        json!({"type": "subscribed", "topic": "news"})
    );
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 3)
        .await;

    node.push("acme-key", json!({"topic": "news", "data": 1}))
        .await;
    for client in [&mut from_handshake, &mut by_command] {
        let frame = client.next_json().await;
        assert_eq!(frame["topic"], "news");
        assert_eq!(frame["data"], 1);
    }

    by_command
        .send_json(json!({"type": "unsubscribe", "topic": "news"}))
        .await;
    assert_eq!(by_command.next_json().await["type"], "unsubscribed");
    node.push("acme-key", json!({"topic": "news", "data": 2}))
        .await;
    assert_eq!(from_handshake.next_data().await, 2);

    node.push("acme-key", json!({"broadcast": true, "data": "all"}))
        .await;
    // Everyone in acme gets the broadcast next; those who were not (or no
    // longer) subscribed never saw the topic messages.
    for client in [&mut from_handshake, &mut by_command, &mut not_subscribed] {
        assert_eq!(client.next_data().await, "all");
    }
    node.push("globex-key", json!({"broadcast": true, "data": "globex"}))
        .await;
    assert_eq!(other_tenant.next_data().await, "globex");
    node.shutdown().await;
}

/// Past a few thousand local recipients a message's writes are split over
/// every core: each client still gets every message once, in order.
#[tokio::test]
async fn a_broadcast_to_thousands_reaches_each_client_once_and_in_order() {
    const CLIENTS: usize = 2_500;
    let node = TestNode::start("[websocket]\nmax_connections_per_ip = 10000").await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        clients.push(node.connect("acme", &format!("user=fan{i}")).await);
    }
    node.wait_for(|n| n.sessions().tenant_connections("acme") == CLIENTS)
        .await;
    for n in 1..=3 {
        node.push("acme-key", json!({"broadcast": true, "data": n}))
            .await;
    }
    for client in &mut clients {
        for n in 1..=3 {
            assert_eq!(client.next_data().await, n);
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn the_per_user_cap_closes_the_oldest_connection_with_4001() {
    let node = TestNode::start("[tenants.capped]\npush_keys = [\"capped-key\"]\nauth = \"development\"\nmax_connections_per_user = 2").await;
    let mut oldest = node.connect_user("capped", "carol").await;
    let mut second = node.connect_user("capped", "carol").await;
    let mut newest = node.connect("capped", "user=carol").await;

    match oldest.ending().await {
        Ending::Closed(code, reason) => {
            assert_eq!(code, 4001);
            assert!(reason.contains("connection limit"), "{reason}");
        }
        other => panic!("expected a 4001 close, got {other:?}"),
    }
    node.wait_for(|n| n.sessions().tenant_connections("capped") == 2)
        .await;
    node.push(
        "capped-key",
        json!({"users": ["carol"], "data": "still here"}),
    )
    .await;
    assert_eq!(second.next_data().await, "still here");
    assert_eq!(newest.next_data().await, "still here");
    node.shutdown().await;
}

#[tokio::test]
async fn application_ping_gets_pong() {
    let node = TestNode::start("").await;
    let mut client = node.connect_user("acme", "pinger").await;
    // The JavaScript client's spelling (answered without parsing) and
    // another: a pong saying when to ping next, the node's 25 s on its
    // one-second heartbeat grid.
    for ping in [r#"{"type":"ping"}"#, r#"{ "type": "ping" }"#] {
        client.socket.send(Message::text(ping)).await.unwrap();
        let pong = client.next_json().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        let next = pong["next_ping_ms"].as_u64().expect("when to ping next");
        assert!((25_000..=26_000).contains(&next), "{pong}");
    }
    client.send_json(json!({"type": "shout"})).await;
    let answer = client.next_json().await;
    assert_eq!(answer["type"], "error");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("invalid command")
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout_and_a_live_one_is_not() {
    let node =
        TestNode::start("[websocket]\nping_interval = \"100ms\"\nidle_timeout = \"400ms\"").await;
    // A raw client that never writes: not even a pong.
    let mut silent = RawClient::upgrade(
        &node.node().public_addr().to_string(),
        "/ws/acme?user=silent",
    )
    .await;
    let live = node.connect_user("acme", "live").await;

    // The live client reads all the time, as a browser does, and so
    // answers every ping (tungstenite replies while it reads).
    let (pings_tx, mut pings) = tokio::sync::watch::channel(0u32);
    let (data_tx, mut data) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut socket = live.socket;
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Ping(_) => pings_tx.send_modify(|n| *n += 1),
                Message::Text(text) => {
                    let _ = data_tx.send(text.to_string());
                }
                _ => {}
            }
        }
    });

    assert_eq!(silent.close_code().await, Some(4003));
    // The live one outlives many idle timeouts' worth of pings.
    tokio::time::timeout(support::PATIENCE, pings.wait_for(|n| *n >= 12))
        .await
        .expect("pings in time")
        .unwrap();
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 1)
        .await;
    node.push("acme-key", json!({"users": ["live"], "data": "alive"}))
        .await;
    let frame = tokio::time::timeout(support::PATIENCE, data.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(frame.contains("alive"), "{frame}");
    node.shutdown().await;
    reader.await.unwrap();
}

#[tokio::test]
async fn a_client_that_pings_on_its_own_gets_no_protocol_pings_and_stays() {
    let node =
        TestNode::start("[websocket]\nping_interval = \"200ms\"\nidle_timeout = \"600ms\"").await;
    let mut client = node.connect_user("acme", "chatty").await;
    // Application pings every 50 ms, as the JavaScript client sends them
    // (every 25 s) against the server's 25 s: for ten intervals.
    let (pongs, protocol_pings) = pinging(
        &mut client,
        Duration::from_millis(50),
        Duration::from_secs(2),
    )
    .await;
    assert!(pongs >= 10, "{pongs} pongs");
    assert_eq!(
        protocol_pings, 0,
        "the server pinged a client it kept hearing from"
    );
    // Silent now: pinged once the interval passes (tungstenite answers
    // while the client reads), and kept.
    let ping = tokio::time::timeout(support::PATIENCE, async {
        loop {
            if let Some(Ok(Message::Ping(_))) = client.socket.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "a silent client was not pinged");
    node.push(
        "acme-key",
        json!({"users": ["chatty"], "data": "still here"}),
    )
    .await;
    assert_eq!(client.next_data().await, "still here");
    node.shutdown().await;
}

/// Sends application pings every `every` for `lasting`: the pongs and
/// the protocol pings the client got meanwhile.
async fn pinging(client: &mut Client, every: Duration, lasting: Duration) -> (usize, usize) {
    let (mut pongs, mut protocol_pings) = (0, 0);
    let start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(start + every, every);
    while start.elapsed() < lasting {
        tokio::select! {
            _ = ticks.tick() => client.send_json(json!({"type": "ping"})).await,
            frame = client.socket.next() => match frame {
                Some(Ok(Message::Ping(_))) => protocol_pings += 1,
                Some(Ok(Message::Text(text))) => {
                    assert!(text.contains("pong"), "{text}");
                    pongs += 1;
                }
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    (pongs, protocol_pings)
}

#[tokio::test]
async fn a_client_pinging_a_little_slower_than_the_server_is_not_raced_by_its_pings() {
    // The JavaScript client pings every 25 s against the server's 25 s:
    // whenever its ping arrived a moment after the server's timer, the
    // server pinged too. Here the client is 100 ms slower than a 2 s
    // interval, for three of its pings; the grace (a fifth: 400 ms) holds
    // the server's ping off.
    let node = TestNode::start("[websocket]\nping_interval = \"2s\"\nidle_timeout = \"10s\"").await;
    let mut client = node.connect_user("acme", "steady").await;
    let (pongs, protocol_pings) = pinging(
        &mut client,
        Duration::from_millis(2_100),
        Duration::from_millis(6_500),
    )
    .await;
    assert_eq!(pongs, 3);
    assert_eq!(
        protocol_pings, 0,
        "the server pinged a client whose own ping was due"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_and_others_keep_receiving() {
    let node = TestNode::start(
        "[websocket]\noutbound_queue = 8\n[tenants.bulk]\npush_keys = [\"bulk-key\"]\nauth = \"development\"\nmax_message_bytes = 200000",
    )
    .await;
    let stalled = node.connect_user("bulk", "stalled").await;
    let mut reader = node.connect_user("bulk", "reader").await;
    let (_, before) = node.get_text("/metrics").await;
    let overflows_before = metric_value(
        &before,
        "pushgate_queue_overflows_total",
        &["tenant=\"bulk\""],
    );

    // 100 KB messages to both: the stalled client's socket buffers fill,
    // then its 8-frame queue, and it is closed; the reader gets every one.
    let chunk = "x".repeat(100_000);
    let mut sent = 0;
    while node.node().sessions().tenant_connections("bulk") == 2 {
        assert!(sent < 2_000, "the stalled client was never cut off");
        node.push(
            "bulk-key",
            json!({"users": ["stalled", "reader"], "data": {"n": sent, "chunk": chunk}}),
        )
        .await;
        assert_eq!(reader.next_data().await["n"], sent);
        sent += 1;
    }
    let (_, after) = node.get_text("/metrics").await;
    let overflows_after = metric_value(
        &after,
        "pushgate_queue_overflows_total",
        &["tenant=\"bulk\""],
    );
    assert!(overflows_after > overflows_before, "overflow counted");
    drop(stalled);

    node.push(
        "bulk-key",
        json!({"users": ["reader"], "data": {"n": "after"}}),
    )
    .await;
    assert_eq!(reader.next_data().await["n"], "after");
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_1012_so_they_reconnect_elsewhere() {
    let node = TestNode::start("").await;
    let mut client = node.connect_user("acme", "leaving").await;
    let http = node.http.clone();
    let ready_url = format!("{}/readyz", node.http_base);
    assert_eq!(http.get(&ready_url).send().await.unwrap().status(), 200);
    let gateway = node.node().observer();

    let shutdown = tokio::spawn(node.shutdown());
    assert_eq!(client.close_code().await, 1012);
    assert!(!gateway.is_ready(), "readyz fails while draining");
    tokio::time::timeout(support::PATIENCE, shutdown)
        .await
        .expect("shutdown finishes once clients are gone")
        .unwrap();
    assert_eq!(gateway.sessions().connection_count(), 0);
}

#[tokio::test]
async fn metrics_count_connections_pushes_and_offline_users() {
    let node =
        TestNode::start("[tenants.metered]\npush_keys = [\"metered-key\"]\nauth = \"development\"")
            .await;
    let mut client = node.connect_user("metered", "m1").await;
    node.push("metered-key", json!({"users": ["m1"], "data": 1}))
        .await;
    client.next_data().await;
    // Pushing to a user who is offline is accepted, and counted.
    node.push("metered-key", json!({"users": ["nobody"], "data": 2}))
        .await;

    let (status, text) = node.get_text("/metrics").await;
    assert_eq!(status, 200);
    let tenant = "tenant=\"metered\"";
    assert_eq!(metric_value(&text, "pushgate_connections", &[tenant]), 1.0);
    assert_eq!(metric_value(&text, "pushgate_users", &[tenant]), 1.0);
    assert_eq!(
        metric_value(&text, "pushgate_messages_pushed_total", &[tenant]),
        2.0
    );
    assert_eq!(
        metric_value(&text, "pushgate_messages_delivered_total", &[tenant]),
        1.0
    );
    // The dispatcher counts the offline push right after the 202: wait for it.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let (_, text) = node.get_text("/metrics").await;
        let dropped = metric_value(
            &text,
            "pushgate_messages_dropped_total",
            &[tenant, "reason=\"no_local_recipient\""],
        );
        if dropped == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "offline push not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(text.contains("pushgate_delivery_latency_seconds_bucket"));
    assert!(text.contains("pushgate_handshakes_total{tenant=\"metered\",outcome=\"accepted\"}"));
    node.shutdown().await;
}

#[tokio::test]
async fn initial_topics_are_held_to_the_subscription_rules() {
    let node = TestNode::start("[websocket]\nmax_topics_per_connection = 2").await;
    let long = "t".repeat(300);
    // As `subscribe` would answer: an over-long name, or more topics than a
    // connection may have, is an error, never dropped silently.
    let refused = |query: String| {
        let url = format!("{}/ws/acme?{query}", node.ws_base);
        async move {
            match tokio_tungstenite::connect_async(url).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    response.status().as_u16()
                }
                other => panic!("refused: {:?}", other.map(|_| ())),
            }
        }
    };
    assert_eq!(refused(format!("user=topical&topics=b,{long}")).await, 400);
    assert_eq!(refused("user=topical&topics=b,a,a,c".to_owned()).await, 400);
    let _client = node.connect("acme", "user=topical&topics=b,a,a").await;
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 1)
        .await;
    let sessions = &node.node().sessions();
    let members = |topic: &str| {
        let mut count = 0;
        sessions.for_each_of_topic("acme", topic, |_| count += 1);
        count
    };
    // Duplicates count once.
    assert_eq!((members("a"), members("b")), (1, 1));
    node.shutdown().await;
}

#[tokio::test]
async fn retries_with_the_same_idempotency_key_are_delivered_once() {
    let node = TestNode::start("").await;
    let mut client = node.connect_user("acme", "ike").await;
    let push = |key: Option<&'static str>, body: serde_json::Value| {
        let mut request = node
            .http
            .post(format!("{}/v1/push", node.http_base))
            .bearer_auth("acme-key")
            .json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            response.status().as_u16()
        }
    };
    for attempt in 0..3 {
        let body = json!({"users": ["ike"], "data": {"attempt": attempt}});
        assert_eq!(push(Some("order-42"), body).await, 202);
    }
    let batch = json!({"messages": [
        {"users": ["ike"], "data": "a", "idempotency_key": "k1"},
        {"users": ["ike"], "data": "b", "idempotency_key": "k1"},
        {"users": ["ike"], "data": "c"},
    ]});
    let (status, _) = node.post("/v1/push/batch", Some("acme-key"), &batch).await;
    assert_eq!(status, 202);
    let bad = json!({"users": ["ike"], "data": "x"});
    assert_eq!(push(Some("not visible"), bad).await, 400);
    node.push("acme-key", json!({"users": ["ike"], "data": "end"}))
        .await;

    assert_eq!(client.next_data().await, json!({"attempt": 0}));
    for expected in ["a", "c", "end"] {
        assert_eq!(client.next_data().await, expected);
    }
    let (_, metrics) = node.get_text("/metrics").await;
    let duplicates = metric_value(
        &metrics,
        "pushgate_messages_dropped_total",
        &["tenant=\"acme\"", "reason=\"duplicate\""],
    );
    assert_eq!(duplicates, 3.0);
    node.shutdown().await;
}
