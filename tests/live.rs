//! The live-connections API: presence, disconnect, server-side
//! subscriptions, and the push reply's count of offline users.

mod support;

use serde_json::json;
use support::TestNode;

#[tokio::test]
async fn presence_counts_a_users_devices_and_disconnect_closes_them_with_4008() {
    let node = TestNode::start("").await;
    let mut phone = node.connect_user("acme", "ann").await;
    let mut laptop = node.connect_user("acme", "ann").await;
    let _bob = node.connect_user("acme", "bob").await;

    let (status, answer) = node
        .post(
            "/v1/presence",
            Some("acme-key"),
            &json!({"users": ["ann", "bob", "cy"]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["users"]["ann"]["count"], 2, "{answer}");
    assert_eq!(answer["users"]["bob"]["count"], 1);
    assert_eq!(answer["users"]["cy"]["count"], 0);
    let first = &answer["users"]["ann"]["connections"][0];
    assert!(first["node"].is_string() && first["id"].is_u64() && first["opened_at_ms"].is_u64());
    // Another tenant's key sees its own users only.
    let (_, other) = node
        .post(
            "/v1/presence",
            Some("globex-key"),
            &json!({"users": ["ann"]}),
        )
        .await;
    assert_eq!(other["users"]["ann"]["count"], 0);

    // The push reply counts those with no connection anywhere.
    let (status, answer) = node
        .post(
            "/v1/push",
            Some("acme-key"),
            &json!({"users": ["ann", "cy", "dee"], "data": 1}),
        )
        .await;
    assert_eq!((status, answer["offline_users"].clone()), (202, json!(2)));
    assert_eq!(phone.next_data().await, 1);
    assert_eq!(laptop.next_data().await, 1);

    // One connection, then the rest.
    let (status, answer) = node
        .post(
            "/v1/disconnect",
            Some("acme-key"),
            &json!({"user": "ann", "connection": {"node": first["node"], "id": first["id"]}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["connections"], 1);
    assert_eq!(phone.close_code().await, 4008);
    let (status, _) = node
        .post("/v1/disconnect", Some("acme-key"), &json!({"user": "ann"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(laptop.close_code().await, 4008);
    node.wait_for(|n| n.sessions().tenant_connections("acme") == 1)
        .await;

    for (body, what) in [
        (json!({"users": []}), "no users"),
        (json!({"users": ["x".repeat(300)]}), "a user id too long"),
        (json!({"user": "ann", "extra": 1}), "an unknown field"),
    ] {
        let (status, answer) = node.post("/v1/presence", Some("acme-key"), &body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert!(answer["error"]["message"].is_string());
    }
    let (status, _) = node
        .post("/v1/disconnect", Some("wrong-key"), &json!({"user": "ann"}))
        .await;
    assert_eq!(status, 401);
    node.shutdown().await;
}

#[tokio::test]
async fn a_service_subscribes_a_users_live_connections_to_a_topic() {
    let node = TestNode::start("").await;
    let mut ann = node.connect_user("acme", "ann").await;
    let (status, answer) = node
        .post(
            "/v1/subscriptions",
            Some("acme-key"),
            &json!({"user": "ann", "subscribe": ["orders.ann"]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed_on_this_node"], 1);
    node.push(
        "acme-key",
        json!({"topic": "orders.ann", "data": "shipped"}),
    )
    .await;
    assert_eq!(ann.next_data().await, "shipped");

    node.post(
        "/v1/subscriptions",
        Some("acme-key"),
        &json!({"user": "ann", "unsubscribe": ["orders.ann"]}),
    )
    .await;
    node.push(
        "acme-key",
        json!({"topic": "orders.ann", "data": "not for her"}),
    )
    .await;
    node.push("acme-key", json!({"users": ["ann"], "data": "marker"}))
        .await;
    assert_eq!(
        ann.next_data().await,
        "marker",
        "unsubscribed: nothing before"
    );
    let (status, _) = node
        .post(
            "/v1/subscriptions",
            Some("acme-key"),
            &json!({"user": "ann"}),
        )
        .await;
    assert_eq!(status, 400, "no topic named");
    node.shutdown().await;
}

#[tokio::test]
async fn a_ban_closes_the_user_and_refuses_its_handshakes_for_its_time() {
    let node = TestNode::start("").await;
    let mut troll = node.connect_user("acme", "troll").await;
    let (status, answer) = node
        .post(
            "/v1/disconnect",
            Some("acme-key"),
            &json!({"user": "troll", "ban_seconds": 600}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["banned_until_ms"].is_u64(), "{answer}");
    assert_eq!(troll.close_code().await, 4008);
    // Back at once, or with a resume: refused, with a reason.
    for query in ["user=troll", "user=troll&since=abc-1"] {
        let url = format!("{}/ws/acme?{query}", node.ws_base);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 403, "{query}");
                let body: serde_json::Value =
                    serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "banned", "{body}");
            }
            other => panic!("{query}: refused expected, got {:?}", other.map(|_| ())),
        }
    }
    // Nobody else, and no other tenant's user of that name.
    let _ann = node.connect_user("acme", "ann").await;
    let _troll_elsewhere = node.connect_user("globex", "troll").await;
    // Bounded, and a ban names no single connection.
    for body in [
        json!({"user": "ann", "ban_seconds": 0}),
        json!({"user": "ann", "ban_seconds": 31 * 24 * 3600}),
        json!({"user": "ann", "ban_seconds": 60, "connection": {"node": "n", "id": 1}}),
    ] {
        let (status, _) = node.post("/v1/disconnect", Some("acme-key"), &body).await;
        assert_eq!(status, 400, "{body}");
    }
    node.shutdown().await;
}
