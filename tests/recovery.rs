//! Clients that reconnect with the position of the last message they saw
//! receive what they missed, in order, once, then the live stream.

mod support;

use serde_json::{Value, json};
use support::{Client, TestNode};

/// Tenant `small` keeps three messages.
const SMALL: &str = r#"
[admin]
token = "admin-test-token"

[tenants.small]
push_keys = ["small-key"]
auth = "development"
[tenants.small.history]
max_messages = 3
"#;

/// Reads message frames until `recovered`; returns their data and it.
async fn until_recovered(client: &mut Client) -> (Vec<Value>, Value) {
    let mut data = Vec::new();
    loop {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("message") => data.push(frame["data"].clone()),
            Some("recovered") => return (data, frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// Receives one message frame and returns its position.
async fn position_of_next(client: &mut Client) -> String {
    let frame = client.next_json().await;
    assert_eq!(frame["type"], "message", "{frame}");
    frame["pos"].as_str().expect("a position").to_owned()
}

#[tokio::test]
async fn a_client_back_from_a_disconnect_gets_what_it_missed_then_the_live_stream() {
    let node = TestNode::start(SMALL).await;
    let mut ann = node.connect_user("acme", "ann").await;
    node.push("acme-key", json!({"users": ["ann"], "data": "seen"}))
        .await;
    let seen = position_of_next(&mut ann).await;
    drop(ann);
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 0)
        .await;

    // While she is away: hers, a topic she follows, a broadcast, and two
    // that are not hers.
    for body in [
        json!({"users": ["ann"], "data": 1}),
        json!({"users": ["bob"], "data": "bob's"}),
        json!({"topic": "news", "data": 2}),
        json!({"topic": "sports", "data": "not followed"}),
        json!({"broadcast": true, "data": 3}),
    ] {
        node.push("acme-key", body).await;
    }
    let mut ann = node
        .connect("acme", &format!("user=ann&topics=news&since={seen}"))
        .await;
    let (missed, recovered) = until_recovered(&mut ann).await;
    assert_eq!(missed, [json!(1), json!(2), json!(3)]);
    assert_eq!(recovered["complete"], true, "{recovered}");
    assert_eq!(recovered["replayed"], 3, "{recovered}");
    node.push("acme-key", json!({"users": ["ann"], "data": "live"}))
        .await;
    assert_eq!(ann.next_data().await, "live");

    // Nothing missed: nothing handed over, complete.
    let last = {
        node.push("acme-key", json!({"users": ["ann"], "data": "last"}))
            .await;
        position_of_next(&mut ann).await
    };
    drop(ann);
    let mut ann = node
        .connect("acme", &format!("user=ann&since={last}"))
        .await;
    let (missed, recovered) = until_recovered(&mut ann).await;
    assert!(missed.is_empty(), "{missed:?}");
    assert_eq!(recovered["complete"], true);
    node.shutdown().await;
}

#[tokio::test]
async fn a_gap_longer_than_the_history_is_reported_incomplete() {
    let node = TestNode::start(SMALL).await;
    let mut cy = node.connect_user("small", "cy").await;
    node.push("small-key", json!({"users": ["cy"], "data": 0}))
        .await;
    let seen = position_of_next(&mut cy).await;
    drop(cy);
    node.wait_for(|n| n.sessions().tenant_connections("small") == 0)
        .await;
    for n in 1..=5 {
        node.push("small-key", json!({"users": ["cy"], "data": n}))
            .await;
    }
    let mut cy = node
        .connect("small", &format!("user=cy&since={seen}"))
        .await;
    let (missed, recovered) = until_recovered(&mut cy).await;
    assert_eq!(missed, [json!(3), json!(4), json!(5)], "the three kept");
    assert_eq!(recovered["complete"], false, "{recovered}");

    // A position of another stream (another run of a node): all that is
    // kept, and incomplete. A malformed one is refused at the handshake.
    let mut cy = node.connect("small", "user=cy&since=abc-1").await;
    let (missed, recovered) = until_recovered(&mut cy).await;
    assert_eq!(missed.len(), 3);
    assert_eq!(recovered["complete"], false);
    let refused = tokio_tungstenite::connect_async(format!(
        "{}/ws/small?user=cy&since=yesterday",
        node.ws_base
    ))
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
        }
        other => panic!("a malformed position must be refused: {other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_while_messages_keep_coming_loses_none_and_repeats_none() {
    let node = TestNode::start("").await;
    let mut dee = node.connect_user("acme", "dee").await;
    node.push("acme-key", json!({"users": ["dee"], "data": 0}))
        .await;
    position_of_next(&mut dee).await;
    let total = 600;
    let pusher = {
        let http = node.http.clone();
        let url = format!("{}/v1/push", node.http_base);
        tokio::spawn(async move {
            for n in 1..=total {
                let response = http
                    .post(&url)
                    .bearer_auth("acme-key")
                    .json(&json!({"users": ["dee"], "data": n}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
            }
        })
    };
    // Reconnect again and again while the pushes go on; each time resume
    // from the last position received. Every number arrives once, in order.
    let mut next = 1;
    let mut reconnects = 0;
    while next <= total {
        let frame = dee.next_json().await;
        match frame["type"].as_str() {
            Some("message") => {
                assert_eq!(frame["data"], next, "in order, once: {frame}");
                next += 1;
                let seen = frame["pos"].as_str().unwrap();
                if next % 100 == 0 {
                    drop(dee);
                    dee = node
                        .connect("acme", &format!("user=dee&since={seen}"))
                        .await;
                    reconnects += 1;
                }
            }
            Some("recovered") => assert_eq!(frame["complete"], true, "{frame}"),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    pusher.await.unwrap();
    assert!(reconnects >= 5);
    node.shutdown().await;
}

/// Reads `POST /v1/history` with `key` until it answers `count` messages
/// (pushes are answered before they are delivered and kept).
async fn history_of(node: &TestNode, key: &str, body: Value, count: usize) -> Value {
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let (status, answer) = node.post("/v1/history", Some(key), &body).await;
        assert_eq!(status, 200, "{answer}");
        if answer["messages"].as_array().unwrap().len() == count {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "history never had {count} messages: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A service reads back what was sent to a topic or a user, as clients
/// receive it: with positions to continue from, the latest first cut by
/// `limit`, a user's through the tenant's `on-deliver` plugin.
#[tokio::test]
async fn a_service_reads_a_topics_and_a_users_recent_messages_over_http() {
    let node = TestNode::start(
        r#"
[admin]
token = "admin-test-token"

[tenants.news]
push_keys = ["news-key"]
auth = "development"
[tenants.news.plugin.config]
default_lang = "fr"
"#,
    )
    .await;
    let (status, answer) = node
        .admin(
            "POST",
            "/admin/v1/tenants/news/plugins",
            Some(support::plugin("personalize")),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    for body in [
        json!({"topic": "sport", "data": {"n": 1}}),
        json!({"users": ["alice"], "data": {"i18n": {"en": "hi", "fr": "salut"}}}),
        json!({"topic": "sport", "data": {"n": 2}}),
        json!({"users": ["bob"], "data": {"n": "for bob"}}),
        json!({"broadcast": true, "data": {"n": "all"}}),
        json!({"topic": "sport", "data": {"n": 3}}),
    ] {
        node.push("news-key", body).await;
    }

    let sport = history_of(&node, "news-key", json!({"topic": "sport"}), 3).await;
    let data: Vec<&Value> = sport["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"]["n"])
        .collect();
    assert_eq!(data, [1, 2, 3], "oldest first: {sport}");
    assert_eq!(
        sport["complete"], false,
        "without since, what came before is unknown"
    );
    let first = sport["messages"][0]["pos"].as_str().unwrap().to_owned();

    // After a position: what came since, and that it is all of it.
    let after = history_of(
        &node,
        "news-key",
        json!({"topic": "sport", "since": first}),
        2,
    )
    .await;
    assert_eq!(after["messages"][0]["data"]["n"], 2);
    assert_eq!(after["complete"], true, "{after}");
    let cut = history_of(
        &node,
        "news-key",
        json!({"topic": "sport", "since": first, "limit": 1}),
        1,
    )
    .await;
    assert_eq!(cut["messages"][0]["data"]["n"], 3, "the latest");
    assert_eq!(cut["complete"], false, "one left out: {cut}");

    // A user's: to them, and broadcasts, through the plugin (no session
    // metadata: the tenant's default language).
    let alice = history_of(&node, "news-key", json!({"user": "alice"}), 2).await;
    assert_eq!(
        alice["messages"][0]["data"],
        json!({"text": "salut"}),
        "{alice}"
    );
    assert_eq!(alice["messages"][1]["data"]["n"], "all");

    // Bad input: a clear 400 (or 401), nothing else disturbed.
    for (body, says) in [
        (json!({}), "either a"),
        (json!({"topic": "sport", "user": "alice"}), "either"),
        (json!({"topic": "sport", "since": "nope"}), "not a position"),
        (json!({"topic": "sport", "limit": 0}), "limit"),
        (json!({"topic": "sport", "limit": 5000}), "limit"),
        (json!({"topic": "sport", "extra": 1}), "unknown field"),
    ] {
        let (status, answer) = node.post("/v1/history", Some("news-key"), &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.to_string().contains(says), "{body}: {answer}");
    }
    let (status, _) = node
        .post("/v1/history", Some("wrong-key"), &json!({"topic": "sport"}))
        .await;
    assert_eq!(status, 401);
}
