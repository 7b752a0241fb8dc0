//! Operating a node: the admin API (tenants changed without a restart, key
//! rotation, the admin token), per-tenant limits, and drain.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Ending, TestNode, metric_value};

async fn node(extra: &str) -> TestNode {
    TestNode::start(&format!(
        "[admin]\ntoken = \"{}\"\n{extra}",
        support::ADMIN_TOKEN
    ))
    .await
}

async fn admin(node: &TestNode, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    node.admin(method, path, body.map(|b| b.to_string().into_bytes()))
        .await
}

#[tokio::test]
async fn admin_calls_need_the_admin_token() {
    let node = node("").await;
    let url = format!("{}/admin/v1/tenants", node.http_base);
    let no_token = node.http.get(&url).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong = node
        .http
        .get(&url)
        .bearer_auth("acme-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let drain = node
        .http
        .post(format!("{}/admin/v1/drain", node.http_base))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(drain.status(), 401);
    assert!(node.node().is_ready(), "a refused drain drains nothing");
    node.shutdown().await;

    let without_admin = TestNode::start("").await;
    let response = without_admin
        .http
        .get(format!("{}/admin/v1/tenants", without_admin.http_base))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        403,
        "no admin.token: the admin API is off"
    );
    without_admin.shutdown().await;
}

#[tokio::test]
async fn tenants_are_created_changed_and_removed_without_a_restart() {
    let node = node("").await;
    let settings = json!({"push_keys": ["fresh-key-1"], "auth": "development"});
    let (status, view) = admin(&node, "PUT", "/admin/v1/tenants/fresh", Some(settings)).await;
    assert_eq!(status, 201, "{view}");
    assert!(
        !view.to_string().contains("fresh-key-1"),
        "keys are never shown: {view}"
    );
    assert_eq!(view["push_keys"].as_array().unwrap().len(), 1);

    let mut client = node.connect_user("fresh", "f1").await;
    node.push("fresh-key-1", json!({"users": ["f1"], "data": "welcome"}))
        .await;
    assert_eq!(client.next_data().await, "welcome");

    // A change keeps open connections and applies at once.
    let changed =
        json!({"push_keys": ["fresh-key-1"], "auth": "development", "max_message_bytes": 10});
    let (status, view) = admin(&node, "PUT", "/admin/v1/tenants/fresh", Some(changed)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["connections"], 1);
    let (status, _) = node
        .post(
            "/v1/push",
            Some("fresh-key-1"),
            &json!({"users": ["f1"], "data": "far too long for ten bytes"}),
        )
        .await;
    assert_eq!(status, 413, "the new limit applies");
    node.push("fresh-key-1", json!({"users": ["f1"], "data": "short"}))
        .await;
    assert_eq!(client.next_data().await, "short");

    // Invalid changes are refused and change nothing.
    let (status, body) = admin(
        &node,
        "PUT",
        "/admin/v1/tenants/fresh",
        Some(json!({"push_keys": ["acme-key"]})),
    )
    .await;
    assert_eq!(status, 400, "a key of another tenant: {body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("acme"),
        "{body}"
    );
    let (status, _) = admin(
        &node,
        "PUT",
        "/admin/v1/tenants/fresh",
        Some(json!({"max_conections": 1})),
    )
    .await;
    assert_eq!(status, 400, "unknown field");
    let (status, _) = admin(
        &node,
        "PUT",
        "/admin/v1/tenants/Not%20Valid",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "bad name");
    node.push("fresh-key-1", json!({"users": ["f1"], "data": "still"}))
        .await;
    assert_eq!(client.next_data().await, "still");

    let (status, list) = admin(&node, "GET", "/admin/v1/tenants", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "fresh", "globex"]);

    // Removal closes the tenant's clients and revokes its keys.
    let (status, _) = admin(&node, "DELETE", "/admin/v1/tenants/fresh", None).await;
    assert_eq!(status, 204);
    assert_eq!(client.close_code().await, 4004);
    let (status, _) = node
        .post(
            "/v1/push",
            Some("fresh-key-1"),
            &json!({"broadcast": true, "data": 1}),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = admin(&node, "GET", "/admin/v1/tenants/fresh", None).await;
    assert_eq!(status, 404);
    node.shutdown().await;
}

#[tokio::test]
async fn rotating_a_push_key_while_pushing_loses_no_message() {
    let node = node("").await;
    let mut client = node.connect_user("acme", "rotator").await;
    let (use_new_key, mut switch) = tokio::sync::watch::channel(false);
    let (sent_with_new_tx, mut sent_with_new) = tokio::sync::watch::channel(0u32);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let http = node.http.clone();
    let url = format!("{}/v1/push", node.http_base);
    let pusher = tokio::spawn(async move {
        let mut sent = 0u32;
        let mut with_new = 0u32;
        while !*stopped.borrow_and_update() {
            let key = if *switch.borrow_and_update() {
                "acme-key-2"
            } else {
                "acme-key"
            };
            let response = http
                .post(&url)
                .bearer_auth(key)
                .json(&json!({"users": ["rotator"], "data": sent}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "push {sent} with {key}");
            sent += 1;
            if key == "acme-key-2" {
                with_new += 1;
                sent_with_new_tx.send_replace(with_new);
            }
        }
        sent
    });

    let both = json!({"push_keys": ["acme-key", "acme-key-2"], "auth": "development"});
    assert_eq!(
        admin(&node, "PUT", "/admin/v1/tenants/acme", Some(both))
            .await
            .0,
        200
    );
    use_new_key.send_replace(true);
    sent_with_new.wait_for(|n| *n >= 5).await.unwrap();
    let new_only = json!({"push_keys": ["acme-key-2"], "auth": "development"});
    assert_eq!(
        admin(&node, "PUT", "/admin/v1/tenants/acme", Some(new_only))
            .await
            .0,
        200
    );
    let after = *sent_with_new.borrow();
    sent_with_new.wait_for(|n| *n >= after + 5).await.unwrap();
    stop.send_replace(true);
    let sent = pusher.await.unwrap();

    for expected in 0..sent {
        assert_eq!(client.next_data().await, expected);
    }
    let (status, _) = node
        .post(
            "/v1/push",
            Some("acme-key"),
            &json!({"broadcast": true, "data": 1}),
        )
        .await;
    assert_eq!(status, 401, "the old key is gone");
    node.shutdown().await;
}

#[tokio::test]
async fn limits_answer_with_their_documented_status() {
    let node = node(
        "[tenants.limited]\npush_keys = [\"limited-key\"]\nauth = \"development\"\n\
         max_connections = 2\npush_rate_per_second = 1\npush_burst = 3\nhandshakes_per_second_per_ip = 1000",
    )
    .await;
    // Push rate: a burst of 3 passes, the 4th waits.
    for n in 0..3 {
        node.push("limited-key", json!({"broadcast": true, "data": n}))
            .await;
    }
    let response = node
        .http
        .post(format!("{}/v1/push", node.http_base))
        .bearer_auth("limited-key")
        .json(&json!({"broadcast": true, "data": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let (_, metrics) = node.get_text("/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "pushgate_push_requests_total",
            &["status=\"429\""]
        ) >= 1.0
    );
    // Other tenants are not limited by it.
    node.push("acme-key", json!({"broadcast": true, "data": "acme"}))
        .await;

    // Connections per tenant.
    let _a = node.connect_user("limited", "a").await;
    let _b = node.connect_user("limited", "b").await;
    let refused =
        tokio_tungstenite::connect_async(format!("{}/ws/limited?user=c", node.ws_base)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    let (_, metrics) = node.get_text("/metrics").await;
    let tenant_full = ["tenant=\"limited\"", "outcome=\"tenant_full\""];
    assert_eq!(
        metric_value(&metrics, "pushgate_handshakes_total", &tenant_full),
        1.0
    );
    node.shutdown().await;

    // Handshakes per second from one address.
    let node = node_with_handshake_limit().await;
    let mut refused = 0;
    for _ in 0..10 {
        if let Err(tokio_tungstenite::tungstenite::Error::Http(response)) =
            tokio_tungstenite::connect_async(format!("{}/ws/slow?user=s", node.ws_base)).await
        {
            assert_eq!(response.status(), 429);
            refused += 1;
        }
    }
    assert!(
        refused >= 5,
        "a 2/s budget refuses most of 10 quick handshakes ({refused})"
    );
    let (_, metrics) = node.get_text("/metrics").await;
    let limited = ["tenant=\"slow\"", "outcome=\"rate_limited\""];
    assert_eq!(
        metric_value(&metrics, "pushgate_handshakes_total", &limited),
        f64::from(refused)
    );
    node.shutdown().await;
}

async fn node_with_handshake_limit() -> TestNode {
    node("[tenants.slow]\nauth = \"development\"\nmax_connections_per_user = 100\nhandshakes_per_second_per_ip = 2").await
}

#[tokio::test]
async fn a_drain_flushes_queued_messages_then_closes_clients_spread_over_the_window() {
    let mut config = support::config(&format!("[admin]\ntoken = \"{}\"", support::ADMIN_TOKEN));
    config.shutdown.drain_window = Duration::from_millis(1500);
    let node = TestNode::start_with(config).await;
    let mut clients = Vec::new();
    for n in 0..12 {
        clients.push(node.connect_user("acme", &format!("d{n}")).await);
    }
    // Acknowledged messages, then the drain: every client gets all of them
    // before its close.
    let batch: Vec<Value> = (0..20)
        .map(|n| json!({"broadcast": true, "data": n}))
        .collect();
    let (status, _) = node
        .post(
            "/v1/push/batch",
            Some("acme-key"),
            &json!({"messages": batch}),
        )
        .await;
    assert_eq!(status, 202);
    let (status, _) = admin(&node, "POST", "/admin/v1/drain", None).await;
    assert_eq!(status, 202);
    let (ready, _) = node.get_text("/readyz").await;
    assert_eq!(ready, 503, "readyz fails first");

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                for n in 0..20 {
                    assert_eq!(client.next_data().await, n);
                }
                let ending = client.ending().await;
                (ending, Instant::now())
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for reader in readers {
        let (ending, at) = reader.await.unwrap();
        assert!(matches!(ending, Ending::Closed(1012, _)), "{ending:?}");
        closed_at.push(at);
    }
    let first = closed_at.iter().min().unwrap();
    let last = closed_at.iter().max().unwrap();
    assert!(
        *last - *first >= Duration::from_millis(300),
        "closes spread over the window, not all at once ({:?})",
        *last - *first
    );
    node.wait_for(|n| n.sessions().connection_count() == 0)
        .await;
    let refused =
        tokio_tungstenite::connect_async(format!("{}/ws/acme?user=late", node.ws_base)).await;
    assert!(refused.is_err(), "a drained node accepts no new clients");
    node.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_shows_no_secret_of_a_tenant() {
    let node = node("").await;
    let settings = json!({
        "push_keys": ["a-push-secret"], "auth": "jwt",
        "jwt": {"algorithm": "HS256", "secret": "a-jwt-secret"},
        "plugin": {"config": {"api_key": "a-plugin-secret", "words": "spoiler"}}
    });
    let (status, view) = admin(&node, "PUT", "/admin/v1/tenants/secretive", Some(settings)).await;
    assert_eq!(status, 201, "{view}");
    let (status, listed) = admin(&node, "GET", "/admin/v1/tenants", None).await;
    assert_eq!(status, 200);
    for shown in [view.to_string(), listed.to_string()] {
        for secret in ["a-push-secret", "a-jwt-secret", "a-plugin-secret"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
    }
    assert_eq!(view["plugin"]["config"]["api_key"], "<redacted>");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_handshakes_never_passes_the_tenants_connection_limit() {
    let node = node(
        "[tenants.tiny]\npush_keys = [\"tiny-key\"]\nauth = \"development\"\nmax_connections = 3",
    )
    .await;
    let url = format!("{}/ws/tiny?user=u", node.ws_base);
    let handshakes: Vec<_> = (0..12)
        .map(|_| tokio::spawn(tokio_tungstenite::connect_async(url.clone())))
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for handshake in handshakes {
        match handshake.await.unwrap() {
            Ok((socket, _)) => open.push(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                refused += 1;
            }
            Err(other) => panic!("unexpected handshake error {other}"),
        }
    }
    assert_eq!((open.len(), refused), (3, 9));
    // A slot comes back when its connection ends.
    drop(open.pop());
    let deadline = std::time::Instant::now() + support::PATIENCE;
    while tokio_tungstenite::connect_async(url.clone()).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot of a closed connection never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}
